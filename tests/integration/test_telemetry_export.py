"""Spans and metrics leave the process over OTLP/HTTP and arrive with the right tree; logs carry ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.otlp_receiver import otlp_receiver


def run_script(code: str, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=60
    )


def test_setup_telemetry_exports_span_tree_and_metrics_over_the_wire() -> None:
    code = """
        import logging, sys
        from opentelemetry import metrics, trace
        from voxcore.entrypoints.logging import configure_logging
        from voxcore.entrypoints.telemetry import setup_telemetry
        from voxcore.events import emit

        telemetry = setup_telemetry("voxcore-test", export_interval_ms=100)
        configure_logging("INFO", stream=sys.stdout)
        tracer = trace.get_tracer("test")
        histogram = metrics.get_meter("test").create_histogram("voxcore.test.duration", unit="s")
        with tracer.start_as_current_span("voxcore.turn"):
            with tracer.start_as_current_span("chat sim-model"):
                emit(logging.getLogger("voxcore.test"), "inside_chat", n=1)
            histogram.record(0.25)
        telemetry.shutdown()
    """
    with otlp_receiver() as receiver:
        done = run_script(code, receiver.endpoint)
        assert done.returncode == 0, done.stderr
        assert receiver.wait_for(lambda r: len(r.spans) >= 2 and "voxcore.test.duration" in r.metric_names)
        (turn,) = receiver.by_name("voxcore.turn")
        (chat,) = receiver.by_name("chat sim-model")
        assert chat.parent_span_id == turn.span_id and chat.trace_id == turn.trace_id
        assert turn.parent_span_id == "" and turn.service_name == "voxcore-test"
        log = json.loads(done.stdout.strip().splitlines()[-1])
        assert log["event"] == "inside_chat"
        assert (log["trace_id"], log["span_id"]) == (chat.trace_id, chat.span_id)
