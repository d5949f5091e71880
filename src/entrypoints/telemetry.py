"""Opt-in OpenTelemetry SDK set-up: OTLP/HTTP export of traces and metrics (Jaeger accepts OTLP).

Library code only uses the OpenTelemetry *API*; nothing is exported until a host or the CLI calls
:func:`setup_telemetry`. Needs the ``otel`` extra (``pip install 'voxcore[otel]'``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from voxcore.core.ports.errors import ConfigurationError


@dataclass
class Telemetry:
    """The installed providers; call :meth:`shutdown` to flush and stop exporting."""

    tracer_provider: Any
    meter_provider: Any

    def shutdown(self) -> None:
        """Flush pending spans/metrics and shut the exporters down."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(
    service_name: str = "voxcore", endpoint: str | None = None, *, export_interval_ms: int = 5000
) -> Telemetry:
    """Install global tracer and meter providers exporting over OTLP/HTTP.

    Args:
        service_name: ``service.name`` resource attribute (what Jaeger lists).
        endpoint: OTLP/HTTP base URL, e.g. ``http://127.0.0.1:4318``; defaults to
            ``OTEL_EXPORTER_OTLP_ENDPOINT`` and then to the OpenTelemetry default.
        export_interval_ms: How often metrics are pushed.

    Raises:
        ConfigurationError: the ``otel`` extra is not installed.
    """
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(
            "telemetry needs the OpenTelemetry SDK: pip install 'voxcore[otel]'"
        ) from exc

    base = (endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://127.0.0.1:4318").rstrip("/")
    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces")))
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{base}/v1/metrics"), export_interval_millis=export_interval_ms
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
