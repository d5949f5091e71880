"""Redis stopped mid-run: soft, fast failures while it is down, and recovery without intervention."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.ports.errors import AudioStreamIncompleteError
from voxcore.entrypoints.embedded_redis import EmbeddedRedis
from voxcore.events import FIELDS_ATTR


def redis_errors(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS_ATTR) for r in caplog.records if r.getMessage() == "redis_error"]


def circuit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS_ATTR) for r in caplog.records if r.getMessage() == "redis_circuit"]


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
        assert all(r in (None, False) for r in results)  # never an exception
        failed = cache.failed_operations
        assert sum(failed.values()) == len(results)  # every failure counted...
        # ...almost all answered by the breaker, not by a connection attempt...
        assert failed["circuit_open"] >= len(results) - 20
        # ...and the log stays quiet: rate-limited per-op lines plus one line per circuit change
        assert len(redis_errors(caplog)) <= 6 * 4
        circuit = circuit_lines(caplog)
        assert circuit[0]["state"] == "open" and circuit[0]["previous"] == "closed"
        assert circuit[0]["error"] and circuit[0]["component"] == "cache"

        await asyncio.to_thread(own_redis.start)
        assert await wait_until(cache.ping)  # recovers by itself: no reconnect call needed
        closed = [c for c in circuit_lines(caplog) if c["state"] == "closed"]
        assert closed and closed[-1]["previous"] == "half_open"
        # the counts since the previous line add up to every fast-failed call
        assert sum(c["rejected"] for c in circuit_lines(caplog)) == cache.failed_operations["circuit_open"]
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
        rest: list[bytes] = []
        try:
            async for chunk in stream:
                rest.append(chunk)
        except AudioStreamIncompleteError as exc:
            # the stream says it is incomplete: never a silent end after the head
            assert (exc.reason, exc.delivered, exc.transient) == ("unavailable", 4, True)
            assert len(rest) == 3  # the head holds 4 chunks
        else:
            assert len(rest) == 19_999  # the tail had already arrived
        assert first == b"z" * 640
    finally:
        await cache.close()
