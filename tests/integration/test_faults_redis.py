"""Redis faults with real tools: a half-open proxy, late replies (DEBUG SLEEP), outages, random cancellations.

Issue 9, items 2-6: bounded waits, miss vs outage, no silent truncation, no double-applied
commands, cancellation honoured, quiet logs. Times are measured by ``bench/bench_faults.py``; the
bounds asserted here are correctness bounds (a call must not hang), several times the targets.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as redis

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.adapters.redis.rate_limit import RedisRateLimiter
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.ports.errors import AudioStreamIncompleteError, CacheUnavailableError
from voxcore.entrypoints.embedded_redis import EmbeddedRedis, redis_server_available
from voxcore.events import FIELDS_ATTR
from voxcore.testing.faults import FaultProxy, cancel_at_random_point

#: A correctness bound for one call on a half-open Redis (the deadline is 250 ms; the defect was 2-4 s).
HANG_BOUND_S = 1.5


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS_ATTR, {}) for r in caplog.records if r.getMessage() == name]


@pytest.fixture
def debug_redis() -> Iterator[EmbeddedRedis]:
    """A private redis-server that accepts DEBUG SLEEP (late replies on demand)."""
    if not redis_server_available():
        pytest.skip("needs a redis-server binary")
    with EmbeddedRedis(extra_args=("--enable-debug-command", "yes")) as server:
        yield server


@pytest.fixture
async def proxy(debug_redis: EmbeddedRedis) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", debug_redis.port) as p:
        yield p


def proxied_cache(proxy: FaultProxy, server: EmbeddedRedis, **kwargs: Any) -> RedisCacheManager:
    return RedisCacheManager(
        RedisConfig(url=proxy.url(server.password)),
        breaker=CircuitBreaker(base_window_s=0.2, max_window_s=0.4),
        **kwargs,
    )


async def debug_sleep(server: EmbeddedRedis, seconds: float) -> asyncio.Task[Any]:
    """Block the whole server for ``seconds`` (from another connection); returns the running task."""
    client = redis.Redis.from_url(server.url)
    await client.ping()

    async def sleep() -> None:
        try:
            await client.execute_command("DEBUG", "SLEEP", seconds)  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()

    task = asyncio.ensure_future(sleep())
    await asyncio.sleep(0.05)  # the server is asleep now
    return task


# -- item 3: half-open Redis ---------------------------------------------------------------------------


async def test_half_open_redis_is_bounded_then_fast_then_recovers(
    proxy: FaultProxy, debug_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    cache = proxied_cache(proxy, debug_redis)
    await cache.connect()
    try:
        assert await cache.set_audio_chunks("static:a", [b"1", b"2"])
        caplog.set_level(logging.INFO, logger="voxcore")
        proxy.mode = "stall"  # warm pooled connections and new ones: accepted, never answered
        started = time.perf_counter()
        assert await cache.get_audio_chunks("static:a") is None
        assert time.perf_counter() - started < HANG_BOUND_S
        assert cache.failed_operations == {"timeout": 1}  # the deadline, counted by the breaker
        assert not cache.available
        with pytest.raises(CacheUnavailableError):  # an outage is not a miss
            await cache.fetch_audio_chunks("static:a")
        with pytest.raises(CacheUnavailableError):
            await cache.open_audio_stream("static:a", raise_on_outage=True)
        assert cache.failed_operations["circuit_open"] == 2  # answered at once by the breaker
        await asyncio.sleep(0.3)  # the window ends: the next call starts a probe on a new connection
        assert await cache.get_text("summary:session:x") is None
        started = time.perf_counter()
        assert await cache.get_audio_chunks("static:a") is None  # still open while the probe waits
        assert time.perf_counter() - started < HANG_BOUND_S

        proxy.mode = "pass"
        for _ in range(250):  # the next probe after the window finds Redis back
            if await cache.get_audio_chunks("static:a") == [b"1", b"2"]:
                break
            await asyncio.sleep(0.02)
        assert await cache.get_audio_chunks("static:a") == [b"1", b"2"]  # recovered by itself
        states = [e["state"] for e in events(caplog, "redis_circuit")]
        assert states[0] == "open" and states[-1] == "closed" and "half_open" in states
        # a miss is still a miss
        assert await cache.fetch_audio_chunks("static:none") is None
    finally:
        await cache.close()


# -- item 2: no silent truncation ----------------------------------------------------------------------


async def test_tail_fetch_failure_ends_the_stream_with_a_typed_error(
    proxy: FaultProxy, debug_redis: EmbeddedRedis
) -> None:
    cache = proxied_cache(proxy, debug_redis, bulk_timeout_ms=300)
    await cache.connect()
    try:
        chunks = [bytes([i % 251]) * 640 for i in range(50)]
        assert await cache.set_audio_chunks("static:long", chunks)
        stream = await cache.open_audio_stream("static:long")
        assert stream is not None
        proxy.mode = "stall"  # the tail fetch (started after the first chunk) never gets an answer
        got: list[bytes] = []
        with pytest.raises(AudioStreamIncompleteError) as info:
            async for chunk in stream:
                got.append(chunk)
        assert got == chunks[:4]  # the head, then a typed error: never a normal end after 80 ms
        assert (info.value.key, info.value.reason, info.value.delivered) == ("static:long", "unavailable", 4)
        assert info.value.transient
    finally:
        proxy.mode = "pass"
        await cache.close()


# -- item 4: late replies never run twice ----------------------------------------------------------------


async def test_late_limiter_reply_charges_once_and_says_unknown(debug_redis: EmbeddedRedis) -> None:
    client = RedisConfig(url=debug_redis.url).build()
    limiter = RedisRateLimiter(client, limit=10, period_s=60, op_timeout_s=0.2, fail_open=True)
    try:
        assert (await limiter.acquire("warm-up")).decided_by == "redis"  # a pooled connection
        sleeper = await debug_sleep(debug_redis, 0.5)
        decision = await limiter.acquire("caller")  # sent at once; the reply comes after the deadline
        assert decision.decided_by == "policy" and not decision.outcome_known
        await sleeper
        ttl_ms = await client.pttl("ratelimit:caller")
        # one unit is 6 s of the subject's budget: the script ran exactly once (twice would be ~12 s)
        assert 5_000 < ttl_ms <= 6_000
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_late_write_is_not_resent_and_reported_unknown(
    debug_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisCacheManager(RedisConfig(url=debug_redis.url), bulk_timeout_ms=200)
    await cache.connect()
    raw = redis.Redis.from_url(debug_redis.url)
    try:
        assert await cache.set_audio_chunks("static:w", [b"old"])  # also warms a pooled connection
        await raw.config_resetstat()
        caplog.set_level(logging.INFO, logger="voxcore")
        sleeper = await debug_sleep(debug_redis, 0.5)
        result = await cache.load_audio_file("static:w", "/nonexistent")  # refused before Redis
        assert not result.ok
        written = await cache.set_audio_chunks("static:w", [b"new"])
        assert written is False  # not confirmed...
        assert events(caplog, "cache_write_unknown")  # ...and said to be unknown, not "failed"
        await sleeper
        stats = await raw.info("commandstats")
        assert stats["cmdstat_rpush"]["calls"] == 1  # sent once, applied once
        assert await raw.lrange("static:w", 0, -1) == [b"new"]
    finally:
        await raw.aclose()
        await cache.close()


# -- item 6: quiet logs during an outage -------------------------------------------------------------------


async def test_outage_with_concurrent_callers_logs_a_handful_of_lines(
    own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisCacheManager(
        RedisConfig(url=own_redis.url), breaker=CircuitBreaker(base_window_s=0.1, max_window_s=0.4)
    )
    await cache.connect()
    try:
        await asyncio.to_thread(own_redis.stop)
        caplog.set_level(logging.INFO, logger="voxcore")
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.5

        async def caller() -> int:
            calls = 0
            while loop.time() < until:
                assert await cache.get_audio_chunks("static:x") is None
                calls += 1
                await asyncio.sleep(0)
            return calls

        calls = sum(await asyncio.gather(*(caller() for _ in range(20))))
        lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert calls > 1000 and sum(cache.failed_operations.values()) == calls  # all counted
        assert len(lines) <= 40  # one line per circuit change + rate-limited per-op lines
        assert {r.getMessage() for r in lines} <= {"redis_error", "redis_circuit"}
    finally:
        await cache.close()


# -- item 5: cancellation honoured -------------------------------------------------------------------------


async def test_random_point_cancellations_are_never_swallowed(
    cache: RedisCacheManager, redis_target: Any, key_prefix: str
) -> None:
    """200 trials here (fast suite); ``bench/bench_faults.py`` runs 1 000 on 3.11 and on 3.13."""
    assert await cache.set_audio_chunks("static:c", [b"x" * 640] * 40)
    assert await cache.set_text("summary:session:c", "text", 60)
    client = redis.Redis.from_url(redis_target.url)
    limiter = RedisRateLimiter(client, limit=1_000_000, period_s=1, key_prefix=key_prefix)

    async def read_stream() -> None:
        stream = await cache.open_audio_stream("static:c")
        assert stream is not None
        async with stream:
            async for _ in stream:
                pass

    calls = [
        lambda: cache.get_audio_chunks("static:c"),
        lambda: cache.get_text("summary:session:c"),
        lambda: cache.set_text("summary:session:c", "t", 60),
        lambda: cache.set_audio_chunks("static:c", [b"x" * 640] * 40),
        read_stream,
        lambda: limiter.acquire("s"),
    ]
    rng = random.Random(9)
    outcomes: dict[str, int] = {}
    try:
        for i in range(200):
            outcome = await cancel_at_random_point(calls[i % len(calls)], rng)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        await limiter.aclose()
        await client.aclose()
    assert outcomes.get("swallowed", 0) == 0 and outcomes.get("error", 0) == 0
    assert outcomes.get("cancelled", 0) > 30  # enough cancels landed inside a running call
    # the cache still works afterwards (no connection left with a reply pending)
    assert await cache.get_text("summary:session:c") in ("t", "text")
    assert await cache.get_audio_chunks("static:c") == [b"x" * 640] * 40


async def test_a_blocked_event_loop_is_not_blamed_on_redis(cache: RedisCacheManager) -> None:
    """A host that blocks its loop past the deadline (sync work) gets its reply; the breaker stays closed."""
    assert await cache.set_audio_chunks("static:b", [b"1"])
    quick = RedisCacheManager(cache.config, key_prefix=cache.key_prefix, op_timeout_ms=50)
    await quick.connect()
    try:
        task = asyncio.ensure_future(quick.get_audio_chunks("static:b"))
        await asyncio.sleep(0)  # the command is sent
        time.sleep(0.3)  # noqa: ASYNC251 - the host's blocking work, on purpose
        assert await task == [b"1"]
        assert quick.available and quick.failed_operations == {}
    finally:
        await quick.close()
