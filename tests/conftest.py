"""Shared fixtures: a real Redis for the whole session, and per-test caches with their own key space.

Redis comes from, in order: ``REDIS_URL`` (used as is; tests only touch keys under their own
random prefix and delete them afterwards), a testcontainers ``redis`` container when a Docker
engine answers, or a ``redis-server`` child process on a free 127.0.0.1 port (no persistence).
Never fakeredis, never a mocked client.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as redis

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.entrypoints.embedded_redis import EmbeddedRedis, redis_server_available


@dataclass(frozen=True)
class RedisTarget:
    """Where the session's Redis is and how it was provided."""

    url: str
    kind: str  # "env", "testcontainers" or "redis-server"


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
def redis_target() -> Iterator[RedisTarget]:
    """The session's real Redis server."""
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
    """A plain redis.asyncio client on the session server; removes the test's keys afterwards."""
    client = redis.Redis.from_url(redis_target.url)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{key_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def cache(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> AsyncIterator[RedisCacheManager]:
    """A connected ``RedisCacheManager`` whose keys live under the test's prefix."""
    manager = RedisCacheManager(
        RedisConfig(url=redis_target.url), key_prefix=key_prefix, tts_ttl_seconds=3600
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
