"""RedisKeyLeases on a real Redis: one winner among concurrent callers, owner-only release, soft outages."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as redis

from tests.conftest import RedisTarget
from voxcore.adapters.redis.keyspace import Keyspace
from voxcore.adapters.redis.lease import RedisKeyLeases
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.ports.lease import Lease, LeaseState
from voxcore.entrypoints.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.all_redis_modes


async def test_exactly_one_of_many_concurrent_callers_gets_the_lease(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    clients = [redis_target.config().build() for _ in range(3)]
    leases = [RedisKeyLeases(c, key_prefix=key_prefix) for c in clients]
    try:
        results = await asyncio.gather(*(leases[i % 3].acquire("tts:abc", 5000) for i in range(60)))
        assert sum(r.acquired for r in results) == 1
        assert {r.state for r in results if not r.acquired} == {LeaseState.HELD}
        name = Keyspace(key_prefix).lease("tts:abc")
        assert name == f"{key_prefix}voxcore:lease:{{{key_prefix}tts:abc}}"
        assert 0 < await raw_redis.pttl(name) <= 5000
    finally:
        for c in clients:
            await c.aclose()


async def test_only_the_holder_releases_and_an_expired_lease_is_free(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    client = redis_target.config().build()
    leases = RedisKeyLeases(client, key_prefix=key_prefix)
    try:
        mine = await leases.acquire("tts:k", 150)
        assert mine.acquired
        forged = Lease("tts:k", LeaseState.ACQUIRED, "not-the-token")
        assert await leases.release(forged) is False
        assert (await leases.acquire("tts:k", 150)).state is LeaseState.HELD
        await asyncio.sleep(0.25)  # expired: the next caller gets it, and the old holder cannot free it
        theirs = await leases.acquire("tts:k", 5000)
        assert theirs.acquired
        assert await leases.release(mine) is False
        assert await leases.release(theirs) is True
        assert (await leases.acquire("tts:k", 5000)).acquired
    finally:
        await client.aclose()


async def test_bad_arguments_are_refused(redis_target: RedisTarget, key_prefix: str) -> None:
    client = redis_target.config().build()
    leases = RedisKeyLeases(client, key_prefix=key_prefix)
    try:
        with pytest.raises(ValueError):
            await leases.acquire("", 100)
        with pytest.raises(ValueError):
            await leases.acquire("tts:x", 0)
    finally:
        await client.aclose()


@pytest.mark.redis_restart
async def test_an_outage_answers_unavailable_at_once(
    own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    leases = RedisKeyLeases(client, breaker=CircuitBreaker(base_window_s=0.2, max_window_s=0.4))
    caplog.set_level(logging.WARNING, logger="voxcore")
    try:
        assert (await leases.acquire("tts:o", 1000)).acquired
        own_redis.stop()
        assert (await leases.acquire("tts:p", 1000)).state is LeaseState.UNAVAILABLE  # logged once
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(50):  # the breaker answers without a socket timeout each
            assert (await leases.acquire("tts:p", 1000)).state is LeaseState.UNAVAILABLE
        assert loop.time() - started < 0.5
        assert any(r.getMessage() == "lease_error" for r in caplog.records)
        own_redis.start()
        await asyncio.sleep(0.5)
        assert (await leases.acquire("tts:q", 1000)).acquired  # a trial call closed the breaker
    finally:
        await client.aclose()
