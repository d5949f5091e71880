"""A real OTLP/HTTP receiver for tests: decodes protobuf trace and metric exports sent over the wire."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


@dataclass
class ReceivedSpan:
    """A span as it arrived: ids in hex, attributes decoded."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int
    service_name: str
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace_id, span_id)


@dataclass
class OTLPReceiver:
    """Collects what exporters POST to ``/v1/traces`` and ``/v1/metrics``."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    metric_names: set[str] = field(default_factory=set)
    #: Attributes of every histogram/sum/gauge data point received, by metric name.
    metric_points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: int = 0
    endpoint: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, path: str, body: bytes) -> None:
        with self._lock:
            self.requests += 1
            if path == "/v1/traces":
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = next(
                        (
                            _value(a.value)
                            for a in resource_spans.resource.attributes
                            if a.key == "service.name"
                        ),
                        "",
                    )
                    for scope in resource_spans.scope_spans:
                        for span in scope.spans:
                            self.spans.append(
                                ReceivedSpan(
                                    name=span.name,
                                    trace_id=span.trace_id.hex(),
                                    span_id=span.span_id.hex(),
                                    parent_span_id=span.parent_span_id.hex(),
                                    kind=span.kind,
                                    attributes={a.key: _value(a.value) for a in span.attributes},
                                    status_code=span.status.code,
                                    service_name=service,
                                    links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                                )
                            )
            elif path == "/v1/metrics":
                request = ExportMetricsServiceRequest.FromString(body)
                for resource_metrics in request.resource_metrics:
                    for scope in resource_metrics.scope_metrics:
                        self.metric_names.update(m.name for m in scope.metrics)
                        for metric in scope.metrics:
                            kind = metric.WhichOneof("data")
                            points = getattr(metric, kind).data_points if kind else []
                            self.metric_points.setdefault(metric.name, []).extend(
                                {a.key: _value(a.value) for a in point.attributes} for point in points
                            )

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self):
                    return True
            time.sleep(0.02)
        return False

    def by_name(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]


@contextmanager
def otlp_receiver() -> Iterator[OTLPReceiver]:
    """Run a receiver on a free 127.0.0.1 port for the duration of the block."""
    receiver = OTLPReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            encoding = self.headers.get("Content-Encoding", "")
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            receiver.handle(self.path, body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the access log
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
