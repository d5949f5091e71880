"""Opt-in OpenTelemetry SDK set-up for the CLI and hosts that ask; never over a host's own providers.

Library code only uses the OpenTelemetry *API*: a host that installs its own tracer and meter
providers (``opentelemetry-instrument``, its own ``TracerProvider``) gets voxcore's spans and
metrics in its pipeline without calling anything here. :func:`setup_telemetry` is for programs that
have no set-up (voxcore's CLI, ``telemetry.enabled: true``): it installs the SDK providers only
where none is installed yet, exports over OTLP (``http/protobuf`` or ``grpc``), and stops within
``shutdown_timeout_s`` even when the collector does not answer.

The standard environment variables win over the arguments (the deployment overrides the
configuration): ``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER`` (``otlp`` or
``none``) and ``OTEL_METRIC_EXPORT_INTERVAL``. Needs the ``otel`` extra.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from voxcore.core.ports.errors import ConfigurationError
from voxcore.events import emit

logger = logging.getLogger("voxcore.telemetry")

PROTOCOLS = ("http/protobuf", "grpc")
EXPORTERS = ("otlp", "none")
_DEFAULT_ENDPOINTS = {"http/protobuf": "http://127.0.0.1:4318", "grpc": "http://127.0.0.1:4317"}


@dataclass
class Telemetry:
    """What :func:`setup_telemetry` installed; :meth:`shutdown` flushes and stops only that.

    Attributes:
        tracer_provider: The global tracer provider (voxcore's, or the host's when it had one).
        meter_provider: The global meter provider (likewise).
        owns_tracer_provider: voxcore installed the tracer provider (and will shut it down).
        owns_meter_provider: voxcore installed the meter provider.
        protocol: ``http/protobuf`` or ``grpc``.
        endpoint: The OTLP endpoint (``None`` when nothing is exported).
        service_name: The ``service.name`` resource attribute of voxcore's providers.
        shutdown_timeout_s: The longest :meth:`shutdown` waits.
    """

    tracer_provider: Any
    meter_provider: Any
    owns_tracer_provider: bool = True
    owns_meter_provider: bool = True
    protocol: str = "http/protobuf"
    endpoint: str | None = None
    service_name: str = "voxcore"
    shutdown_timeout_s: float = 1.0
    _done: bool = field(default=False, repr=False)

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Flush pending spans/metrics and stop voxcore's providers, waiting at most ``timeout_s``.

        A host's providers are left alone. When the collector does not answer, the export is
        abandoned after the timeout (its threads are daemons: they never hold the process up).
        """
        if self._done:
            return
        self._done = True
        budget = self.shutdown_timeout_s if timeout_s is None else timeout_s
        owned = [
            provider
            for provider, owns in (
                (self.tracer_provider, self.owns_tracer_provider),
                (self.meter_provider, self.owns_meter_provider),
            )
            if owns and provider is not None
        ]
        if not owned:
            return

        def stop() -> None:
            for provider in owned:
                try:
                    if hasattr(provider, "force_flush"):
                        provider.force_flush(int(budget * 1000))
                    provider.shutdown()
                except Exception as exc:  # a broken exporter must not break the host's shutdown
                    emit(logger, "telemetry_shutdown_failed", logging.WARNING, error=repr(exc))

        worker = threading.Thread(target=stop, name="voxcore-telemetry-shutdown", daemon=True)
        worker.start()
        worker.join(budget)
        if worker.is_alive():
            emit(
                logger,
                "telemetry_shutdown_timeout",
                logging.WARNING,
                timeout_s=budget,
                endpoint=self.endpoint,
            )


def _setting(
    env: Mapping[str, str], variable: str, value: str | None, default: str, allowed: tuple[str, ...]
) -> str:
    """The environment variable, else the configured value, else the default; checked against ``allowed``."""
    chosen = (env.get(variable) or value or default).strip().lower()
    if chosen not in allowed:
        raise ConfigurationError(f"{variable}={chosen!r}: expected one of {', '.join(allowed)}")
    return chosen


def setup_telemetry(
    service_name: str | None = None,
    endpoint: str | None = None,
    *,
    export_interval_ms: int | None = None,
    protocol: str | None = None,
    traces_exporter: str | None = None,
    metrics_exporter: str | None = None,
    shutdown_timeout_s: float = 1.0,
    env: Mapping[str, str] | None = None,
) -> Telemetry:
    """Install OTLP-exporting tracer and meter providers where the host has none.

    Args:
        service_name: ``service.name`` (``OTEL_SERVICE_NAME`` wins; default ``voxcore``).
        endpoint: OTLP base URL, e.g. ``http://127.0.0.1:4318`` (``OTEL_EXPORTER_OTLP_ENDPOINT``
            wins; default port 4318 for ``http/protobuf``, 4317 for ``grpc``).
        export_interval_ms: How often metrics are pushed (``OTEL_METRIC_EXPORT_INTERVAL`` wins;
            default 5000).
        protocol: ``http/protobuf`` or ``grpc`` (``OTEL_EXPORTER_OTLP_PROTOCOL`` wins).
        traces_exporter: ``otlp`` or ``none`` (``OTEL_TRACES_EXPORTER`` wins).
        metrics_exporter: ``otlp`` or ``none`` (``OTEL_METRICS_EXPORTER`` wins); ``none`` for a
            collector that takes traces only (Jaeger v1).
        shutdown_timeout_s: The longest :meth:`Telemetry.shutdown` waits for the collector.
        env: The environment (``os.environ`` by default).

    Returns:
        The providers in use; a provider the host had already installed is used, never replaced
        (and :meth:`Telemetry.shutdown` leaves it alone).

    Raises:
        ConfigurationError: the ``otel`` extra (or the grpc exporter) is missing, or a value is
            not one of the allowed ones.
    """
    env = os.environ if env is None else env
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(
            "telemetry needs the OpenTelemetry SDK: pip install 'voxcore[otel]'"
        ) from exc

    name = env.get("OTEL_SERVICE_NAME") or service_name or "voxcore"
    chosen_protocol = _setting(env, "OTEL_EXPORTER_OTLP_PROTOCOL", protocol, "http/protobuf", PROTOCOLS)
    want_traces = _setting(env, "OTEL_TRACES_EXPORTER", traces_exporter, "otlp", EXPORTERS) == "otlp"
    want_metrics = _setting(env, "OTEL_METRICS_EXPORTER", metrics_exporter, "otlp", EXPORTERS) == "otlp"
    interval_ms = int(env.get("OTEL_METRIC_EXPORT_INTERVAL") or export_interval_ms or 5000)
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or endpoint or _DEFAULT_ENDPOINTS[chosen_protocol]
    base = base.rstrip("/")
    span_exporter_cls, metric_exporter_cls = _exporter_classes(chosen_protocol)

    def exporter_args(signal: str) -> dict[str, Any]:
        if chosen_protocol == "grpc":
            return {"endpoint": base, "insecure": base.startswith("http://")}
        return {"endpoint": f"{base}/v1/{signal}"}

    resource = Resource.create({"service.name": name})
    telemetry = Telemetry(
        tracer_provider=trace.get_tracer_provider(),
        meter_provider=metrics.get_meter_provider(),
        owns_tracer_provider=False,
        owns_meter_provider=False,
        protocol=chosen_protocol,
        endpoint=base if (want_traces or want_metrics) else None,
        service_name=name,
        shutdown_timeout_s=shutdown_timeout_s,
    )
    if _host_installed(telemetry.tracer_provider, "tracer"):
        emit(logger, "telemetry_host_tracer_provider", logging.DEBUG)
    else:
        # Our shutdown is bounded; the SDK's own atexit hook would wait up to 30 s per provider.
        tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        if want_traces:
            tracer_provider.add_span_processor(
                BatchSpanProcessor(span_exporter_cls(**exporter_args("traces")))
            )
        trace.set_tracer_provider(tracer_provider)
        telemetry.tracer_provider, telemetry.owns_tracer_provider = tracer_provider, True
    if _host_installed(telemetry.meter_provider, "meter"):
        emit(logger, "telemetry_host_meter_provider", logging.DEBUG)
    else:
        readers = (
            [
                PeriodicExportingMetricReader(
                    metric_exporter_cls(**exporter_args("metrics")), export_interval_millis=interval_ms
                )
            ]
            if want_metrics
            else []
        )
        meter_provider = MeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
        metrics.set_meter_provider(meter_provider)
        telemetry.meter_provider, telemetry.owns_meter_provider = meter_provider, True
    emit(
        logger,
        "telemetry_started",
        service_name=name,
        protocol=chosen_protocol,
        endpoint=telemetry.endpoint,
        traces=want_traces,
        metrics=want_metrics,
        host_tracer_provider=not telemetry.owns_tracer_provider,
        host_meter_provider=not telemetry.owns_meter_provider,
    )
    return telemetry


def _host_installed(provider: Any, kind: str) -> bool:
    """True when ``provider`` is a real one somebody installed (not the API's proxy or no-op default)."""
    from opentelemetry import metrics, trace

    if kind == "tracer":
        return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    from opentelemetry.metrics import _internal as metrics_internal

    return not isinstance(provider, metrics_internal._ProxyMeterProvider | metrics.NoOpMeterProvider)


def _exporter_classes(protocol: str) -> tuple[Any, Any]:
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(
            f"OTLP over {protocol} needs its exporter: pip install 'voxcore[otel]'"
        ) from exc
    return OTLPSpanExporter, OTLPMetricExporter
