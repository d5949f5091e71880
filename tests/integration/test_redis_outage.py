"""Redis stopped mid-run: soft, fast failures while it is down, and recovery without intervention."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.entrypoints.embedded_redis import EmbeddedRedis
from voxcore.events import FIELDS_ATTR


def redis_errors(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS_ATTR) for r in caplog.records if r.getMessage() == "redis_error"]


async def wait_until(predicate: Any, limit_s: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


def make_cache(server: EmbeddedRedis) -> RedisCacheManager:
    return RedisCacheManager(
        RedisConfig(url=server.url), breaker=CircuitBreaker(base_window_s=0.1, max_window_s=0.4)
    )


async def test_outage_fails_fast_and_recovers(
    own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_cache(own_redis)
    await cache.connect()
    try:
        assert await cache.set_audio_chunks("static:a", [b"1", b"2"])
        assert await cache.set_text("summary:session:s", "before", 60)
        await asyncio.to_thread(own_redis.stop)
        caplog.set_level(logging.INFO, logger="voxcore")

        results = []
        for _ in range(200):
            results += [
                await cache.get_audio_chunks("static:a"),
                await cache.get_text("summary:session:s"),
                await cache.set_text("summary:session:s", "during", 60),
                await cache.set_audio_chunks("static:a", [b"x"]),
                await cache.open_audio_stream("static:a"),
                await cache.get_audio_format("static:a"),
            ]
        assert all(r in (None, False) for r in results)
        errors = redis_errors(caplog)
        assert len(errors) == len(results)  # one redis_error per failed call, never an exception
        assert {e["op"] for e in errors} >= {"get_audio_chunks", "set_text", "set_audio_chunks"}
        fast = [e for e in errors if "fast fail" in e["error"]]
        # almost every call is answered by the breaker, not by a connection attempt
        assert len(fast) >= len(errors) - 20

        await asyncio.to_thread(own_redis.start)
        assert await wait_until(cache.ping)  # recovers by itself: no reconnect call needed
        assert any(r.getMessage() == "redis_recovered" for r in caplog.records)
        assert await cache.set_text("summary:session:s", "after", 60)
        assert await cache.get_text("summary:session:s") == "after"
        assert await cache.set_audio_chunks("static:a", [b"3"])
        assert await cache.get_audio_chunks("static:a") == [b"3"]
    finally:
        await cache.close()


async def test_connect_while_redis_is_down_is_soft(caplog: pytest.LogCaptureFixture) -> None:
    server = EmbeddedRedis()  # not started yet: nothing listens on its port
    try:
        cache = make_cache(server)
        caplog.set_level(logging.INFO, logger="voxcore")
        await cache.connect()  # logs, does not raise
        assert redis_errors(caplog)[0]["op"] == "ping"
        assert await cache.get_text("summary:session:x") is None
        await asyncio.to_thread(server.start)
        assert await wait_until(cache.ping)
        assert await cache.set_text("summary:session:x", "up", 10)
        await cache.close()
    finally:
        await asyncio.to_thread(server.close)


async def test_redis_killed_during_a_streaming_read(own_redis: EmbeddedRedis) -> None:
    cache = make_cache(own_redis)
    await cache.connect()
    try:
        await cache.set_audio_chunks("static:big", [b"z" * 640] * 20_000)
        stream = await cache.open_audio_stream("static:big")
        assert stream is not None
        first = await stream.__anext__()
        await asyncio.to_thread(own_redis.stop)
        rest = [c async for c in stream]
        # either the tail had already arrived, or the stream ends early: never an exception
        assert first == b"z" * 640 and len(rest) in (3, 19_999)  # the head holds 4 chunks
    finally:
        await cache.close()
