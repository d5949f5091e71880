"""The whole LLM stack as a host assembles it: container -> real adapters -> simulator over HTTP -> Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis

from tests.conftest import RedisTarget
from tests.otlp_receiver import otlp_receiver
from voxcore.application.manager import ConversationManager
from voxcore.core.domain.keys import summary_key
from voxcore.core.ports.errors import LLMAuthError, LLMProtocolError, LLMRateLimitedError
from voxcore.entrypoints.container import Container
from voxcore.entrypoints.runtime import simulator_reply
from voxcore.entrypoints.settings import load_settings
from voxcore.simulator import Fault, OpenAISimulator

KEY = "sk-test-simulator"


@pytest.fixture
async def simulator() -> AsyncIterator[OpenAISimulator]:
    async with OpenAISimulator(api_key=KEY, reply=simulator_reply, first_token_delay_ms=5) as sim:
        yield sim


def make_container(sim: OpenAISimulator, redis_target: RedisTarget, key_prefix: str, **env: str) -> Container:
    settings = load_settings(
        env={
            "OPENAI_BASE_URL": sim.base_url,
            "OPENAI_API_KEY": KEY,
            **redis_target.env(),
            "VOXCORE_CACHE__KEY_PREFIX": key_prefix,
            "VOXCORE_LOGGING__CONFIGURE": "false",
            **env,
        }
    )
    return Container(settings=settings)


@pytest.fixture
async def container(
    simulator: OpenAISimulator, redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> AsyncIterator[Container]:
    c = make_container(simulator, redis_target, key_prefix)
    await c.init_resources()
    try:
        yield c
    finally:
        await c.shutdown_resources()


async def say(manager: ConversationManager, text: str) -> tuple[str, list[Any]]:
    chunks = [chunk async for chunk in manager.process_user_turn(text)]
    return "".join(c.text_chunk for c in chunks), chunks


async def test_host_gets_a_ready_manager_in_one_call(
    container: Container, simulator: OpenAISimulator
) -> None:
    manager = await container.open_conversation("call-1")
    try:
        assert simulator.request_count("/v1/models") >= 1  # the handshake happened before any turn
        reply, chunks = await say(manager, "Здравствуйте! Сколько стоит полис?")
        assert reply == "Вы сказали: Здравствуйте! Сколько стоит полис?"
        assert chunks[0].is_safe is True and chunks[0].aggression_score == 0
        assert chunks[-1].is_final_chunk and chunks[-1].text_chunk == ""
        second, _ = await say(manager, "Спасибо")
        assert second == "Вы сказали: Спасибо"
        history = manager.active_context.get_history_for_summary()
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
        assert manager.last_turn_metrics is not None and manager.last_turn_metrics.connection_reused is True
        assert simulator.connections_accepted == 1  # handshake, warm-ups and turns share one connection
    finally:
        await manager.shutdown()
        await manager.shutdown()


async def test_bad_key_fails_at_the_handshake(
    simulator: OpenAISimulator, redis_target: RedisTarget, key_prefix: str
) -> None:
    c = make_container(simulator, redis_target, key_prefix, OPENAI_API_KEY="sk-wrong")
    with pytest.raises(LLMAuthError):
        await c.open_conversation("call-bad-key")
    await asyncio.sleep(0.05)
    assert simulator.open_connections == 0  # nothing leaked


@pytest.mark.parametrize(
    ("fault", "error", "kwargs"),
    [
        (Fault.RATE_LIMIT, LLMRateLimitedError, {"retry_after": 3}),
        (Fault.MALFORMED, LLMProtocolError, {}),
        (Fault.TRUNCATED, LLMProtocolError, {"after_chunks": 3}),
        (Fault.INVALID_JSON, LLMProtocolError, {}),
    ],
)
async def test_provider_errors_end_the_turn_cleanly(
    container: Container,
    simulator: OpenAISimulator,
    fault: Fault,
    error: type[Exception],
    kwargs: dict[str, Any],
) -> None:
    manager = await container.open_conversation("call-errors")
    try:
        await say(manager, "Первый вопрос")
        before = manager.active_context.get_history_for_summary()
        simulator.inject(fault, **kwargs)
        async with asyncio.timeout(10):
            with pytest.raises(error) as caught:
                await say(manager, "Второй вопрос")
        if isinstance(caught.value, LLMRateLimitedError):
            assert caught.value.retry_after == 3 and caught.value.transient
        after = manager.active_context.get_history_for_summary()
        # nothing half-added: no partial assistant reply; the user message stays only if text was heard
        assert after[: len(before)] == before
        assert all(m["role"] == "user" for m in after[len(before) :])
        reply, _ = await say(manager, "Третий вопрос")  # the connection and the manager still work
        assert reply == "Вы сказали: Третий вопрос"
    finally:
        await manager.shutdown()


@pytest.mark.all_redis_modes
async def test_handover_under_load_loses_nothing(
    simulator: OpenAISimulator, redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    c = make_container(
        simulator,
        redis_target,
        key_prefix,
        VOXCORE_LLM__CONTEXT_WINDOW_TOKENS="520",
        VOXCORE_DUAL_CONTEXT__RECENT_MESSAGES="2",
    )
    await c.init_resources()
    try:

        managers: dict[int, ConversationManager] = {}
        last_turn: dict[int, int] = {}

        async def conversation(n: int) -> None:
            manager = managers[n] = await c.open_conversation(f"load-{n}")
            turn = 0
            # Ten turns, then (on a machine too busy for a summary to land meanwhile) a few more once
            # the warm-up has finished, until the standby takes over.
            while turn < 10 or (manager.dual_context.handovers == 0 and turn < 15):
                if turn >= 10:
                    await asyncio.wait_for(manager.dual_context.wait_warmup(), 30)
                reply, _ = await say(manager, f"Разговор {n}, вопрос {turn}")
                assert reply == f"Вы сказали: Разговор {n}, вопрос {turn}"
                last_turn[n] = turn
                turn += 1
                await asyncio.sleep(0.02)  # let background warm-ups progress between turns

        try:
            await asyncio.gather(*(conversation(n) for n in range(6)))
            for n, manager in managers.items():
                assert manager.dual_context.handovers >= 1
                history = manager.active_context.get_history_for_summary()
                # the newest turns are always there, verbatim, after any number of handovers
                assert history[-2:] == [
                    {"role": "user", "content": f"Разговор {n}, вопрос {last_turn[n]}"},
                    {"role": "assistant", "content": f"Вы сказали: Разговор {n}, вопрос {last_turn[n]}"},
                ]
                assert manager.active_context.summary  # the standby brought the summary along
                assert manager.active_context.estimate_usage_ratio() < 1.0
        finally:
            for manager in managers.values():  # every call is closed, whatever failed
                await manager.shutdown()
    finally:
        await c.shutdown_resources()


@pytest.mark.all_redis_modes
async def test_summary_cache_miss_then_hit_and_never_for_other_history(
    container: Container, simulator: OpenAISimulator, raw_redis: redis.Redis, key_prefix: str
) -> None:
    manager = await container.open_conversation("summary-session")
    try:
        await say(manager, "Хочу застраховать квартиру")
        await say(manager, "Площадь 54 метра")
        history = manager.active_context.get_history_for_summary()
        calls = simulator.request_count("/v1/chat/completions")
        first = await manager.summarize(history)
        assert simulator.request_count("/v1/chat/completions") == calls + 1  # a miss asks the model
        key = f"{key_prefix}{summary_key('summary-session')}"
        assert 0 < await raw_redis.ttl(key) <= 24 * 3600
    finally:
        await manager.shutdown()
    replay = await container.open_conversation("summary-session")
    try:
        calls = simulator.request_count("/v1/chat/completions")
        assert await replay.summarize(history) == first  # the same dialogue hits the cache
        assert simulator.request_count("/v1/chat/completions") == calls
        other = [*history, {"role": "user", "content": "И машину тоже"}]
        await replay.summarize(other)  # a longer history is not covered by the cached summary
        assert simulator.request_count("/v1/chat/completions") == calls + 1
    finally:
        await replay.shutdown()


def test_a_real_turn_exports_its_span_tree_over_otlp(redis_target: RedisTarget, key_prefix: str) -> None:
    code = textwrap.dedent(
        f"""
        import asyncio
        from voxcore.entrypoints.container import Container
        from voxcore.entrypoints.runtime import simulator_reply
        from voxcore.entrypoints.settings import load_settings
        from voxcore.simulator import OpenAISimulator

        async def main():
            async with OpenAISimulator(api_key="k", reply=simulator_reply) as sim:
                settings = load_settings(env={{
                    "OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "k",
                    "REDIS_URL": "{redis_target.url}", "VOXCORE_CACHE__KEY_PREFIX": "{key_prefix}",
                    "VOXCORE_TELEMETRY__ENABLED": "true",
                    "VOXCORE_TELEMETRY__SERVICE_NAME": "voxcore-otlp-test",
                    "VOXCORE_LLM__CONTEXT_WINDOW_TOKENS": "520", "VOXCORE_DUAL_CONTEXT__RECENT_MESSAGES": "2",
                    "VOXCORE_LOGGING__CONFIGURE": "false",
                }})
                container = Container(settings=settings)
                await container.init_resources()
                manager = await container.open_conversation("otlp-call")
                for i in range(7):
                    async for _ in manager.process_user_turn(f"Вопрос {{i}} о страховке дома"):
                        pass
                    await asyncio.sleep(0.3)
                await manager.shutdown()
                await container.shutdown_resources()

        asyncio.run(main())
        """
    )
    with otlp_receiver() as receiver:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=90
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert receiver.wait_for(
            lambda r: len(r.by_name("voxcore.turn")) >= 7 and r.by_name("voxcore.handover")
        )
        spans = {s.span_id: s for s in receiver.spans}
        assert {s.service_name for s in receiver.spans} == {"voxcore-otlp-test"}
        (call,) = receiver.by_name("voxcore.call")  # one call, one trace
        assert call.parent_span_id == "" and call.attributes["gen_ai.conversation.id"]
        assert {s.trace_id for s in receiver.spans} == {call.trace_id}
        (handshake,) = receiver.by_name("llm.handshake")
        assert handshake.parent_span_id == call.span_id
        turns = receiver.by_name("voxcore.turn")
        assert all(t.parent_span_id == call.span_id for t in turns)
        chats = [s for s in receiver.spans if s.name == "chat gpt-4o-mini"]
        turn_chats = [
            c for c in chats if spans.get(c.parent_span_id) and spans[c.parent_span_id].name == "voxcore.turn"
        ]
        assert len(turn_chats) == 7
        chat = turn_chats[0]
        assert chat.kind == 3  # SPAN_KIND_CLIENT
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.provider.name"] == "openai"
        assert chat.attributes["gen_ai.request.model"] == "gpt-4o-mini"
        assert chat.attributes["gen_ai.request.stream"] is True
        assert chat.attributes["gen_ai.response.time_to_first_chunk"] > 0
        assert (
            chat.attributes["gen_ai.usage.input_tokens"] > 0
            and chat.attributes["gen_ai.usage.output_tokens"] > 0
        )
        summary = receiver.by_name("voxcore.summary")[0]
        assert summary.parent_span_id == call.span_id  # in the call's trace...
        ((_, trigger),) = summary.links
        assert spans[trigger].name == "voxcore.turn"  # ...linked to the turn that set it off
        children = {s.name for s in receiver.spans if s.parent_span_id == summary.span_id}
        assert {"voxcore.summary_cache.check", "chat gpt-4o-mini", "voxcore.summary_cache.save"} <= children
        handover = receiver.by_name("voxcore.handover")[0]
        assert spans[handover.parent_span_id].name == "voxcore.turn"
        assert receiver.wait_for(
            lambda r: (
                {
                    "gen_ai.client.operation.duration",
                    "gen_ai.client.operation.time_to_first_chunk",
                    "voxcore.llm.handshake.duration",
                    "voxcore.dual_context.handover.duration",
                    "voxcore.llm.context.usage_ratio",
                }
                <= r.metric_names
            )
        ), receiver.metric_names
        json.dumps([s.__dict__ for s in receiver.spans], default=str)  # all attributes decodable
