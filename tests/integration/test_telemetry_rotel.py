"""One call, one trace, through a real OpenTelemetry collector (rotel), over gRPC and over HTTP.

A host process (a subprocess here: OpenTelemetry's global providers are once per process) opens a
call inside its own request span, speaks seven turns (the dual context summarizes in the
background), plays a hybrid reply for the call, and shuts down. rotel receives the export and
forwards it; the test reads what rotel forwarded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisTarget
from tests.rotel_collector import rotel_collector

HOST = textwrap.dedent(
    """
    import asyncio, sys
    from opentelemetry import trace
    from voxcore import Container, load_settings
    from voxcore.core.domain.playlist import Playlist, TTSItem
    from voxcore.entrypoints.runtime import simulator_reply
    from voxcore.simulator import OpenAISimulator

    async def main():
        async with OpenAISimulator(api_key="k", reply=simulator_reply) as sim:
            settings = load_settings(env={
                "OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "k",
                "REDIS_URL": sys.argv[1], "VOXCORE_CACHE__KEY_PREFIX": sys.argv[2],
                "VOXCORE_TELEMETRY__ENABLED": "true",
                "VOXCORE_TELEMETRY__SERVICE_NAME": "from-the-config-file",
                "VOXCORE_TELEMETRY__METRIC_EXPORT_INTERVAL_MS": "200",
                "VOXCORE_TELEMETRY__RECORD_TEXT": "true",
                "VOXCORE_LLM__CONTEXT_WINDOW_TOKENS": "520", "VOXCORE_DUAL_CONTEXT__RECENT_MESSAGES": "2",
                "VOXCORE_LOGGING__CONFIGURE": "true",
            })
            container = Container(settings=settings)
            await container.init_resources()
            with trace.get_tracer("host").start_as_current_span("host.request"):
                manager = await container.open_conversation("rotel-call")
            for i in range(int(sys.argv[3])):
                async for _ in manager.process_user_turn(f"Вопрос {i} о страховке дома"):
                    pass
                await asyncio.sleep(0.2)
            responder = await container.open_hybrid_responder()
            async for _ in responder.play(Playlist.of(TTSItem("сумма")), parent=manager.call_span):
                pass
            await responder.shutdown()
            print(manager.trace_id)
            await manager.shutdown()
            await container.shutdown_resources()

    asyncio.run(main())
    """
)


def run_host(
    redis_target: RedisTarget, key_prefix: str, turns: int = 7, **env: str
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VOXCORE_", "REDIS_", "OPENAI_"))
    }
    return subprocess.run(
        [sys.executable, "-c", HOST, redis_target.url, key_prefix, str(turns)],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=120,
    )


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_call_is_one_trace_in_the_collector(
    protocol: str, redis_target: RedisTarget, key_prefix: str, raw_redis: Any, tmp_path: Path
) -> None:
    with rotel_collector(tmp_path) as collector:
        endpoint = collector.grpc_endpoint if protocol == "grpc" else collector.http_endpoint
        done = run_host(
            redis_target,
            key_prefix,
            OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_SERVICE_NAME="voxcore-rotel",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        received = collector.received
        assert received.wait_for(
            lambda r: (
                r.by_name("voxcore.call")
                and len(r.by_name("voxcore.turn")) == 7
                and r.by_name("voxcore.summary")
            )
        ), done.stderr[-2000:]
        assert received.wait_for(lambda r: "gen_ai.client.token.usage" in r.metric_names)

    trace_id = done.stdout.strip().splitlines()[-1]
    spans = {s.span_id: s for s in received.spans}
    (host,) = received.by_name("host.request")
    (call,) = received.by_name("voxcore.call")
    assert (
        call.trace_id == trace_id and call.parent_span_id == host.span_id
    )  # the host's span stays the parent
    assert call.attributes["gen_ai.conversation.id"] and call.attributes["voxcore.call.turns"] == 7
    assert {s.trace_id for s in received.spans} == {trace_id}  # one call, one trace
    assert {s.service_name for s in received.spans} == {"voxcore-rotel"}  # OTEL_SERVICE_NAME wins

    def parent(name: str) -> set[str]:
        return {spans[s.parent_span_id].name for s in received.by_name(name)}

    assert parent("voxcore.turn") == {"voxcore.call"}
    assert parent("llm.handshake") == {"voxcore.call"}
    assert parent("voxcore.hybrid.playlist") == {"voxcore.call"}
    assert parent("voxcore.handover") == {"voxcore.turn"}
    for summary in received.by_name("voxcore.summary"):  # background work: in the call, linked to its turn
        assert summary.parent_span_id == call.span_id
        assert [spans[span_id].name for _, span_id in summary.links] == ["voxcore.turn"]
    turn = received.by_name("voxcore.turn")[0]
    assert turn.attributes["voxcore.redactable_attributes"] == [
        "gen_ai.input.messages",
        "gen_ai.output.messages",
    ]
    assert turn.attributes["gen_ai.input.messages"].startswith("Вопрос")

    tokens = received.metric_points["gen_ai.client.token.usage"]
    assert {p["gen_ai.token.type"] for p in tokens} == {"input", "output"}
    assert all(p["gen_ai.response.model"] == "gpt-4o-mini" for p in tokens)

    # Every voxcore log line of the call carries the call's trace id.
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    during = [
        line
        for line in lines
        if line["event"] in {"user_turn_finish", "conn_handshake_finish", "hybrid_turn"}
    ]
    assert during and all(line.get("trace_id") == trace_id for line in during), [
        (line["event"], line.get("trace_id")) for line in during if line.get("trace_id") != trace_id
    ]
    assert len([line for line in lines if line["event"] == "user_turn_finish"]) == 7


def test_metrics_off_for_a_traces_only_collector(
    redis_target: RedisTarget, key_prefix: str, raw_redis: Any, tmp_path: Path
) -> None:
    with rotel_collector(tmp_path) as collector:
        done = run_host(
            redis_target,
            key_prefix,
            turns=1,
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.http_endpoint,
            OTEL_METRICS_EXPORTER="none",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert collector.received.wait_for(lambda r: r.by_name("voxcore.call"))
    assert collector.received.metric_names == set()
    assert {s.service_name for s in collector.received.spans} == {"from-the-config-file"}
