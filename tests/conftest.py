"""Shared fixtures: a real Redis for the whole session, and per-test caches with their own key space.

Redis comes from, in order: ``REDIS_URL`` (used as is; tests only touch keys under their own
random prefix and delete them afterwards), a testcontainers ``redis`` container when a Docker
engine answers, or a ``redis-server`` child process on a free 127.0.0.1 port (no persistence).
Never fakeredis, never a mocked client.

Tests marked ``all_redis_modes`` also run against a Redis Cluster (3 primaries + 3 replicas) and a
Sentinel-managed primary (1 replica, 3 Sentinels) of real ``redis-server`` processes when asked:
``pytest --redis-modes=standalone,cluster,sentinel`` (``make test-cluster``). Their ``redis_target``
then carries the mode, and ``redis_target.config()`` builds the matching ``RedisConfig``.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.entrypoints.embedded_redis import EmbeddedRedis, redis_server_available
from voxcore.testing.topologies import LocalRedisCluster, LocalRedisSentinel

REDIS_MODES = ("standalone", "cluster", "sentinel")


@dataclass(frozen=True)
class RedisTarget:
    """Where the session's Redis is and how it was provided."""

    url: str
    kind: str  # "env", "testcontainers", "redis-server", "cluster" or "sentinel"
    mode: str = "standalone"
    nodes: tuple[str, ...] = ()
    sentinels: tuple[str, ...] = ()
    service: str = ""
    topology: Any = field(default=None, compare=False, repr=False)

    def config(self, **overrides: Any) -> RedisConfig:
        """A ``RedisConfig`` for this target (``overrides``: any other RedisConfig field)."""
        if self.mode == "cluster":
            return RedisConfig(mode="cluster", nodes=self.nodes, **overrides)
        if self.mode == "sentinel":
            return RedisConfig(
                mode="sentinel", sentinels=self.sentinels, sentinel_service=self.service, **overrides
            )
        return RedisConfig(url=self.url, **overrides)

    def env(self) -> dict[str, str]:
        """Environment variables that point ``load_settings`` at this target."""
        variables = {"REDIS_URL": self.url, "VOXCORE_REDIS__MODE": self.mode}
        if self.mode == "cluster":
            variables["VOXCORE_REDIS__NODES"] = ",".join(self.nodes)
        if self.mode == "sentinel":
            variables["VOXCORE_REDIS__SENTINELS"] = ",".join(self.sentinels)
            variables["VOXCORE_REDIS__SENTINEL_SERVICE"] = self.service
        return variables


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
def redis_target(request: pytest.FixtureRequest, redis_mode: str) -> RedisTarget:
    """The session's real Redis of the requested deployment."""
    target: RedisTarget = request.getfixturevalue(f"{redis_mode}_redis_target")
    return target


@pytest.fixture(scope="session")
def cluster_redis_target() -> Iterator[RedisTarget]:
    """A 3-primary/3-replica Redis Cluster of real redis-server processes (started on first use)."""
    if not redis_server_available():
        pytest.fail("cluster tests need redis-server (.ci/run installs it)")
    with LocalRedisCluster() as cluster:
        nodes = cluster.startup_nodes
        yield RedisTarget(f"redis://{nodes[0]}/0", "cluster", "cluster", nodes=nodes, topology=cluster)


@pytest.fixture(scope="session")
def sentinel_redis_target() -> Iterator[RedisTarget]:
    """A primary + replica watched by 3 Sentinels, real redis-server processes (started on first use)."""
    if not redis_server_available():
        pytest.fail("sentinel tests need redis-server (.ci/run installs it)")
    with LocalRedisSentinel() as topology:
        yield RedisTarget(
            f"redis://{topology.primary_address()}/0",
            "sentinel",
            "sentinel",
            sentinels=topology.sentinel_addresses,
            service=topology.service,
            topology=topology,
        )


def _docker_engine_answers() -> bool:
    """True if a Docker engine answers ``GET /_ping`` (unix socket or tcp DOCKER_HOST), in <= 2 s."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = host[len("unix://") :]
        elif host.startswith("tcp://"):
            name, _, port = host[len("tcp://") :].rpartition(":")
            sock, address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), (name, int(port))
        else:
            return False
        with sock:
            sock.settimeout(2)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(256)
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def standalone_redis_target() -> Iterator[RedisTarget]:
    """The session's real single Redis server."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield RedisTarget(url, "env")
        return
    if _docker_engine_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield RedisTarget(f"redis://{host}:{port}/0", "testcontainers")
        return
    if not redis_server_available():
        pytest.fail("no Redis for tests: set REDIS_URL, start a Docker engine, or install redis-server")
    with EmbeddedRedis() as server:
        yield RedisTarget(server.url, "redis-server")


@pytest.fixture
def key_prefix() -> str:
    """A key space of this test's own on the shared server."""
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def raw_redis(redis_target: RedisTarget, key_prefix: str) -> AsyncIterator[redis.Redis]:
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
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
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
