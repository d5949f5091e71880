"""The project's own fixtures, built on the ``voxcore.testing`` pytest plugin's.

The plugin (installed with voxcore, entry point ``pytest11``) provides ``voxcore_redis`` (a real
Redis for the session: a container when a container engine answers, else a local ``redis-server``
on a free port, else ``REDIS_URL``), ``voxcore_simulator`` and ``voxcore_container``. Here: per-test
key spaces on that server and a private server for outage tests. Never fakeredis, never a mocked
client.

Tests marked ``all_redis_modes`` also run against a Redis Cluster (3 primaries + 3 replicas) and a
Sentinel-managed primary (1 replica, 3 Sentinels) of real ``redis-server`` processes when asked:
``pytest --redis-modes=standalone,cluster,sentinel`` (``make test-cluster``). Their ``redis_target``
then carries the mode, and ``redis_target.config()`` builds the matching ``RedisConfig``
(``voxcore.testing.topologies``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as redis

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.entrypoints.embedded_redis import EmbeddedRedis, redis_server_available
from voxcore.testing import RedisTarget as PluginRedisTarget
from voxcore.testing.topologies import RedisDeployment

#: What ``redis_target`` is: the session's Redis in the test's mode (tests import it from here).
RedisTarget = RedisDeployment
__all__ = ["RedisTarget"]

REDIS_MODES = ("standalone", "cluster", "sentinel")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-modes",
        default=os.environ.get("VOXCORE_TEST_REDIS_MODES", "standalone"),
        help="comma-separated Redis deployments the all_redis_modes tests run against: "
        "standalone, cluster, sentinel (default: standalone)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "all_redis_modes: run against every Redis deployment given by --redis-modes"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_target" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("all_redis_modes") is None:
        return
    modes = [m.strip() for m in str(metafunc.config.getoption("--redis-modes")).split(",") if m.strip()]
    unknown = sorted(set(modes) - set(REDIS_MODES))
    if unknown:
        raise pytest.UsageError(f"--redis-modes: unknown {', '.join(unknown)} (use {', '.join(REDIS_MODES)})")
    if modes != ["standalone"]:
        metafunc.parametrize("redis_mode", modes, scope="session")


@pytest.fixture(scope="session")
def redis_mode() -> str:
    """The deployment of ``redis_target`` (parametrized for ``all_redis_modes`` tests)."""
    return "standalone"


@pytest.fixture(scope="session")
def redis_target(request: pytest.FixtureRequest, redis_mode: str) -> RedisDeployment:
    """The session's real Redis in the requested deployment."""
    target: RedisDeployment = request.getfixturevalue(f"{redis_mode}_redis_target")
    return target


@pytest.fixture(scope="session")
def standalone_redis_target(voxcore_redis: PluginRedisTarget) -> RedisDeployment:
    """The plugin's ``voxcore_redis`` (one server)."""
    return RedisDeployment(voxcore_redis.url, voxcore_redis.kind)


@pytest.fixture(scope="session")
def cluster_redis_target(voxcore_redis_cluster: RedisDeployment) -> RedisDeployment:
    """The plugin's 3-primary/3-replica Redis Cluster (started on first use)."""
    return voxcore_redis_cluster


@pytest.fixture(scope="session")
def sentinel_redis_target(voxcore_redis_sentinel: RedisDeployment) -> RedisDeployment:
    """The plugin's primary + replica watched by 3 Sentinels (started on first use)."""
    return voxcore_redis_sentinel


@pytest.fixture
def key_prefix() -> str:
    """A key space of this test's own on the shared server."""
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def raw_redis(redis_target: RedisDeployment, key_prefix: str) -> AsyncIterator[redis.Redis]:
    """A plain redis.asyncio client on the session server; removes the test's keys afterwards.

    (A ``RedisCluster`` in cluster mode: SCAN then covers every primary.)
    """
    client: Any = redis_target.config().build()
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{key_prefix}*", count=1000)]
        for key in keys:  # one by one: in a cluster the keys live in different slots
            await client.delete(key)
        await client.aclose()


@pytest.fixture
async def cache(
    redis_target: RedisDeployment, key_prefix: str, raw_redis: redis.Redis
) -> AsyncIterator[RedisCacheManager]:
    """A connected ``RedisCacheManager`` whose keys live under the test's prefix."""
    manager = RedisCacheManager(redis_target.config(), key_prefix=key_prefix, tts_ttl_seconds=3600)
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
