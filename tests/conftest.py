"""The project's own fixtures, built on the ``voxcore.testing`` pytest plugin's.

The plugin (installed with voxcore, entry point ``pytest11``) provides ``voxcore_redis`` (a real
Redis for the session: a container when a container engine answers, else a local ``redis-server``
on a free port, else ``REDIS_URL``), ``voxcore_simulator`` and ``voxcore_container``. Here: per-test
key spaces on that server and a private server for outage tests. Never fakeredis, never a mocked
client.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as redis

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.entrypoints.embedded_redis import EmbeddedRedis, redis_server_available
from voxcore.testing import RedisTarget
from voxcore.testing.plugin import delete_keys

__all__ = ["RedisTarget"]  # tests import it from here


@pytest.fixture(scope="session")
def redis_target(voxcore_redis: RedisTarget) -> RedisTarget:
    """The session's real Redis server (the plugin's ``voxcore_redis``)."""
    return voxcore_redis


@pytest.fixture
def key_prefix() -> str:
    """A key space of this test's own on the shared server."""
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def raw_redis(voxcore_redis: RedisTarget, key_prefix: str) -> AsyncIterator[redis.Redis]:
    """A plain redis.asyncio client on the session server; removes the test's keys afterwards."""
    client = redis.Redis.from_url(voxcore_redis.url)
    try:
        yield client
    finally:
        await client.aclose()
        await delete_keys(voxcore_redis.url, key_prefix)


@pytest.fixture
async def cache(
    voxcore_redis: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> AsyncIterator[RedisCacheManager]:
    """A connected ``RedisCacheManager`` whose keys live under the test's prefix."""
    manager = RedisCacheManager(
        RedisConfig(url=voxcore_redis.url), key_prefix=key_prefix, tts_ttl_seconds=3600
    )
    await manager.connect()
    try:
        yield manager
    finally:
        await manager.close()


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A private redis-server this test may stop and restart (outage tests)."""
    if not redis_server_available():
        pytest.skip("outage tests need a redis-server binary (.ci/run installs it)")
    with EmbeddedRedis() as server:
        yield server
