"""The 30-day dialogue cache on a real Redis; a call resumed through the container (LLM simulator)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from tests.conftest import RedisTarget
from tests.integration.test_conversation_stack import make_container, say
from voxcore.adapters.redis.config import RedisConfig
from voxcore.adapters.redis.dialogue import DEFAULT_TTL_SECONDS, RedisDialogueStore
from voxcore.application.dialogue import DialogueRecorder
from voxcore.core.domain.dialogue import ContextMark, CorruptDialogueError, StoredMessage
from voxcore.core.domain.keys import (
    EVENTS_INDEX_KEY,
    dialogue_messages_key,
    dialogue_summary_key,
    events_stream_key,
)
from voxcore.entrypoints.container import Container
from voxcore.entrypoints.embedded_redis import EmbeddedRedis
from voxcore.entrypoints.runtime import simulator_reply
from voxcore.simulator import OpenAISimulator

KEY = "sk-test-simulator"

# The tests on redis_target also run on a Redis Cluster and a Sentinel set (make test-cluster).
pytestmark = pytest.mark.all_redis_modes


@pytest.fixture
async def simulator() -> AsyncIterator[OpenAISimulator]:
    async with OpenAISimulator(api_key=KEY, reply=simulator_reply, first_token_delay_ms=5) as sim:
        yield sim


def msg(seq: int, role: str = "user", content: str | None = None) -> StoredMessage:
    return StoredMessage(seq=seq, role=role, content=content or f"сообщение {seq}", ts=1.5 * seq)  # type: ignore[arg-type]


async def test_one_multi_per_write_ttl_30_days_refreshed_and_bounded(
    raw_redis: redis.Redis, key_prefix: str
) -> None:
    store = RedisDialogueStore(raw_redis, max_messages=4, key_prefix=key_prefix)
    messages_key = key_prefix + dialogue_messages_key("call-ttl")
    summary_key = key_prefix + dialogue_summary_key("call-ttl")
    assert (
        "{" in messages_key
        and messages_key.split("{")[1].split("}")[0] == summary_key.split("{")[1].split("}")[0]
    )
    await store.append("call-ttl", [msg(1), msg(2, "assistant")], ContextMark(None, 1))
    assert 0 < await raw_redis.ttl(messages_key) <= DEFAULT_TTL_SECONDS
    assert DEFAULT_TTL_SECONDS - 5 <= await raw_redis.ttl(summary_key) <= DEFAULT_TTL_SECONDS
    await raw_redis.expire(messages_key, 100)
    await raw_redis.expire(summary_key, 100)
    await store.append(
        "call-ttl", [msg(3), msg(4, "assistant"), msg(5), msg(6, "assistant")], ContextMark("итог", 3)
    )
    assert await raw_redis.ttl(messages_key) > DEFAULT_TTL_SECONDS - 5  # refreshed by the write
    assert await raw_redis.ttl(summary_key) > DEFAULT_TTL_SECONDS - 5
    snapshot = await store.load("call-ttl")
    assert snapshot is not None
    assert [m.seq for m in snapshot.messages] == [3, 4, 5, 6]  # LTRIM kept the newest 4
    assert snapshot.mark == ContextMark("итог", 3, snapshot.mark.ts)
    assert [m.message for m in snapshot.active_history()] == [
        {"role": "user", "content": "сообщение 3"},
        {"role": "assistant", "content": "сообщение 4"},
        {"role": "user", "content": "сообщение 5"},
        {"role": "assistant", "content": "сообщение 6"},
    ]
    # replace=True starts the session over
    await store.append("call-ttl", [msg(1, content="заново")], ContextMark(None, 1), replace=True)
    again = await store.load("call-ttl")
    assert again is not None and [m.content for m in again.messages] == ["заново"]
    await store.delete("call-ttl")
    assert await store.load("call-ttl") is None


async def test_corrupt_and_foreign_version_records_are_refused(
    raw_redis: redis.Redis, key_prefix: str
) -> None:
    store = RedisDialogueStore(raw_redis, key_prefix=key_prefix)
    key = key_prefix + dialogue_messages_key("call-bad")
    await raw_redis.rpush(key, b"{not json")
    with pytest.raises(CorruptDialogueError, match="not valid JSON"):
        await store.load("call-bad")
    await raw_redis.delete(key)
    record = {"v": 99, "seq": 1, "role": "user", "content": "x", "ts": 1.0}
    await raw_redis.rpush(key, json.dumps(record).encode())
    with pytest.raises(CorruptDialogueError, match="format version 99"):
        await store.load("call-bad")


async def test_outage_loses_nothing_in_memory_and_writes_after_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    own_redis = EmbeddedRedis(data_dir=tmp_path / "redis").start()  # its data survives the restart
    client = RedisConfig(url=own_redis.url, retries=0, socket_timeout=0.5, socket_connect_timeout=0.2).build()
    store = RedisDialogueStore(client)
    recorder = DialogueRecorder(store=store, session_id="call-outage", drain_timeout_s=5)
    try:
        recorder.record(
            ({"role": "user", "content": "раз"}, {"role": "assistant", "content": "ответ"}),
            history_length=2,
            summary=None,
        )
        assert await recorder.flush(5)
        await asyncio.to_thread(own_redis.stop)
        with caplog.at_level(logging.WARNING, logger="voxcore.dialogue"):
            recorder.record(({"role": "user", "content": "два"},), history_length=3, summary=None)
            recorder.record(({"role": "assistant", "content": "снова"},), history_length=4, summary=None)
            await asyncio.sleep(0.5)
            assert recorder.pending == 2  # kept in memory while Redis is down
            assert any(r.message == "dialogue_write_failed" for r in caplog.records)
        await asyncio.to_thread(own_redis.start)
        assert await recorder.flush(10)
        snapshot = await store.load("call-outage")
        assert snapshot is not None
        assert [m.content for m in snapshot.messages] == ["раз", "ответ", "два", "снова"]
    finally:
        await recorder.aclose()
        await client.aclose()
        own_redis.close()


async def test_resumed_call_restores_summary_and_turns_bit_for_bit(
    simulator: OpenAISimulator, redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    env = {"VOXCORE_LLM__CONTEXT_WINDOW_TOKENS": "520", "VOXCORE_DUAL_CONTEXT__RECENT_MESSAGES": "2"}
    first = make_container(simulator, redis_target, key_prefix, **env)
    await first.init_resources()
    try:
        manager = await first.open_conversation("call-resume")
        for turn in range(10):
            await say(manager, f"Вопрос {turn}: «цена?»\n")
            await asyncio.sleep(0.02)
        assert manager.dual_context.handovers >= 1
        summary = manager.active_context.summary
        history = manager.active_context.messages
        assert summary and len(history) < 18
        await manager.shutdown()  # the pending turns are written first
    finally:
        await first.shutdown_resources()
    # The worker died; another one picks the call up.
    second = make_container(simulator, redis_target, key_prefix, **env)
    await second.init_resources()
    try:
        resumed = await second.open_conversation("call-resume", resume=True)
        try:
            assert resumed.active_context.summary == summary
            assert resumed.active_context.messages == history  # bit for bit
            reply, _ = await say(resumed, "Продолжим")
            assert reply == "Вы сказали: Продолжим"
        finally:
            await resumed.shutdown()
        again = await second.open_conversation("call-resume", resume=True)
        try:
            assert again.active_context.messages[-2:] == (
                {"role": "user", "content": "Продолжим"},
                {"role": "assistant", "content": "Вы сказали: Продолжим"},
            )
            assert again.active_context.messages[: len(history)] == history
        finally:
            await again.shutdown()
        # Resume events were published: call_started with resumed=True.
        entries = await raw_redis.xrange(key_prefix + events_stream_key("call-resume"))
        started = [json.loads(f[b"d"]) for _, f in entries if f[b"t"] == b"call_started"]
        assert started[-1]["resumed"] is True and started[-1]["restored_messages"] == len(history) + 2
    finally:
        await second.shutdown_resources()


async def test_corrupt_record_starts_fresh_with_a_clear_log_line(
    simulator: OpenAISimulator,
    redis_target: RedisTarget,
    key_prefix: str,
    raw_redis: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = {"v": 2, "seq": 1, "role": "user", "content": "из будущего", "ts": 1.0}
    await raw_redis.rpush(key_prefix + dialogue_messages_key("call-corrupt"), json.dumps(record).encode())
    c = make_container(simulator, redis_target, key_prefix)
    await c.init_resources()
    try:
        with caplog.at_level(logging.WARNING, logger="voxcore.dialogue"):
            manager = await c.open_conversation("call-corrupt", resume=True)
        refused = [r for r in caplog.records if r.message == "dialogue_restore_refused"]
        assert refused and refused[0].voxcore_fields["reason"] == "corrupt"  # type: ignore[attr-defined]
        assert "format version 2" in refused[0].voxcore_fields["error"]  # type: ignore[attr-defined]
        try:
            assert manager.active_context.messages == ()
            await say(manager, "Начнём сначала")
        finally:
            await manager.shutdown()
        # The fresh conversation replaced the refused record.
        store = RedisDialogueStore(raw_redis, key_prefix=key_prefix)
        snapshot = await store.load("call-corrupt")
        assert snapshot is not None and [m.content for m in snapshot.messages][0] == "Начнём сначала"
    finally:
        await c.shutdown_resources()


async def test_events_of_a_call_cover_its_turns(
    simulator: OpenAISimulator, redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    c: Container = make_container(simulator, redis_target, key_prefix, VOXCORE_EVENTS__COALESCE_MS="0")
    await c.init_resources()
    try:
        manager = await c.open_conversation("call-events")
        await say(manager, "Здравствуйте")
        await manager.shutdown()
        publisher = await c.event_publisher()
        assert await publisher.flush(5)
        entries = await raw_redis.xrange(key_prefix + events_stream_key("call-events"))
        kinds = [f[b"t"].decode() for _, f in entries]
        assert kinds[0] == "call_started" and kinds[-1] == "call_ended"
        assert "user_text" in kinds and "answer_text" in kinds and "turn" in kinds
        turn = next(json.loads(f[b"d"]) for _, f in entries if f[b"t"] == b"turn")
        assert turn["time_to_first_token_ms"] > 0 and turn["time_to_first_text_ms"] > 0
        text = "".join(json.loads(f[b"d"])["text"] for _, f in entries if f[b"t"] == b"answer_text")
        assert text == "Вы сказали: Здравствуйте"
        index = await raw_redis.xrange(key_prefix + EVENTS_INDEX_KEY)
        assert [json.loads(f[b"d"])["session_id"] for _, f in index] == ["call-events", "call-events"]
        assert c.event_token("call-events") != c.event_token("call-other") != c.operator_token()
    finally:
        await c.shutdown_resources()
