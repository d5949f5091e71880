"""Redis client configuration and factory (SPEC-B), with explicit short timeouts and a bounded pool.

redis-py's own defaults differ between versions (and some let one call stall for seconds), so every
timeout, the pool size and the retry policy are set here explicitly. Three deployments are supported
(``mode``): one server (``standalone``), a Redis Cluster (``cluster``: ``redis.asyncio.RedisCluster``
over the startup ``nodes``) and a Sentinel-managed primary (``sentinel``: the primary of
``sentinel_service`` as the ``sentinels`` report it, re-discovered after a failover).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, TypeVar, cast

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

try:  # redis-py >= 6.4 probes CLIENT MAINT_NOTIFICATIONS on every new connection unless told not to
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]


RedisMode: TypeAlias = Literal["standalone", "cluster", "sentinel"]
#: The client :meth:`RedisConfig.build` returns: a ``Redis`` (standalone, or the Sentinel-managed
#: primary) or a ``RedisCluster``. Both speak the same command API for what voxcore uses.
RedisClient: TypeAlias = "redis.Redis | RedisCluster"
MODES: Final = ("standalone", "cluster", "sentinel")
T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    raw = os.getenv(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


@dataclass(slots=True)
class RedisConfig:
    """The single place Redis client settings come from.

    Defaults are read from ``REDIS_URL`` or ``REDIS_HOST``/``REDIS_PORT``/``REDIS_DB``/
    ``REDIS_PASSWORD`` when an instance is created (never at import time). ``url``, when set, wins
    over host/port/db/password.

    Attributes:
        host, port, db, password: Where Redis is (SPEC-B).
        url: A ``redis://`` or ``rediss://`` URL; overrides the four fields above.
        mode: ``standalone`` (one server), ``cluster`` (Redis Cluster) or ``sentinel`` (a primary
            managed by Redis Sentinel).
        nodes: Cluster startup nodes as ``host:port`` (any reachable node is enough; the client
            discovers the rest). Empty: ``url`` or ``host``/``port`` is the one startup node.
        sentinels: Sentinel addresses as ``host:port`` (``mode: sentinel``; at least one).
        sentinel_service: The primary's name in the Sentinel configuration (``sentinel monitor``).
        sentinel_password: Password of the Sentinel processes themselves (not of the data nodes).
        decode_responses: Always False: audio is stored as bytes.
        socket_timeout: Seconds a command may wait for its reply.
        socket_connect_timeout: Seconds to establish a TCP connection.
        max_connections: Pool bound. The pool itself fails fast when exhausted; the cache queues
            its callers for a free connection instead (up to ``pool_timeout``).
        pool_timeout: Seconds a cache call waits for a free connection.
        retries: Retries of a command after a connection error or timeout (with backoff).
        health_check_interval: Seconds of idleness after which a pooled connection is PINGed first.
    """

    host: str = field(default_factory=lambda: os.getenv("REDIS_HOST") or "127.0.0.1")
    port: int = field(default_factory=lambda: _env_int("REDIS_PORT", 6379))
    db: int = field(default_factory=lambda: _env_int("REDIS_DB", 0))
    password: str | None = field(default_factory=lambda: os.getenv("REDIS_PASSWORD") or None)
    url: str | None = field(default_factory=lambda: os.getenv("REDIS_URL") or None)
    decode_responses: bool = False
    socket_timeout: float = 1.0
    socket_connect_timeout: float = 0.5
    max_connections: int = 32
    pool_timeout: float = 1.0
    retries: int = 1
    health_check_interval: int = 30
    client_name: str = "voxcore"
    mode: RedisMode = "standalone"
    nodes: tuple[str, ...] = ()
    sentinels: tuple[str, ...] = ()
    sentinel_service: str = "mymaster"
    sentinel_password: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RedisConfig.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.nodes = tuple(self.nodes)
        self.sentinels = tuple(self.sentinels)
        for name in ("nodes", "sentinels"):
            for address in getattr(self, name):
                parse_address(address, what=f"RedisConfig.{name}")
        if self.mode == "sentinel":
            if not self.sentinels:
                raise ValueError("RedisConfig.sentinels must list at least one host:port in sentinel mode")
            if not self.sentinel_service:
                raise ValueError("RedisConfig.sentinel_service must name the monitored primary")
        if self.mode == "cluster" and self._db() != 0:
            raise ValueError("Redis Cluster has only database 0: RedisConfig.db (or the URL's) must be 0")
        if self.decode_responses:
            raise ValueError("RedisConfig.decode_responses must stay False: audio chunks are bytes")
        for name in ("socket_timeout", "socket_connect_timeout", "pool_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RedisConfig.{name} must be positive")
        if self.max_connections < 1:
            raise ValueError("RedisConfig.max_connections must be at least 1")
        if self.retries < 0:
            raise ValueError("RedisConfig.retries must not be negative")

    def describe(self) -> str:
        """Where this config points, without the password (for logs and messages)."""
        if self.mode == "sentinel":
            return f"sentinel://{','.join(self.sentinels)}/{self.sentinel_service}"
        if self.mode == "cluster" and self.nodes:
            return f"cluster://{','.join(self.nodes)}"
        if self.url:
            scheme, _, rest = self.url.partition("://")
            where = f"{scheme}://{rest.rpartition('@')[2]}"
        else:
            where = f"redis://{self.host}:{self.port}/{self.db}"
        return where.replace("redis", "cluster+redis", 1) if self.mode == "cluster" else where

    def build(self) -> RedisClient:
        """Return the client for :attr:`mode` (see :meth:`build_standalone`, :meth:`build_cluster`,
        :meth:`build_sentinel`). Nothing connects here: the first command does."""
        if self.mode == "cluster":
            return self.build_cluster()
        if self.mode == "sentinel":
            return self.build_sentinel()
        return self.build_standalone()

    def _db(self) -> int:
        if self.url:
            return int(parse_url(self.url).get("db", 0) or 0)
        return self.db

    def _common_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "decode_responses": self.decode_responses,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "socket_keepalive": True,
            "retry": Retry(ExponentialBackoff(cap=0.05, base=0.005), self.retries),
            "health_check_interval": self.health_check_interval,
            "client_name": self.client_name,
            "max_connections": self.max_connections,
        }
        if MaintNotificationsConfig is not None:
            # Cluster maintenance push notifications are useless here and cost a round trip
            # (and an error reply on Redis < 8) per new connection.
            options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        return options

    def _credentials(self) -> dict[str, Any]:
        """Password (and user, TLS) of the data nodes: from ``url`` when set, else ``password``."""
        if not self.url:
            return {"password": self.password} if self.password else {}
        parsed = dict(parse_url(self.url))
        credentials = {k: parsed[k] for k in ("username", "password") if parsed.get(k)}
        if self.url.startswith("rediss://"):
            credentials["ssl"] = True
        return credentials

    def build_cluster(self) -> RedisCluster:
        """A ``RedisCluster`` over the startup nodes (``nodes``, else ``url``/``host:port``).

        ``max_connections`` bounds the pool of each node. Slot moves (``MOVED``/``ASK``) are
        followed, and after a connection error or ``CLUSTERDOWN`` the client re-reads the slot map
        before its retry, so a promoted replica is found without a restart.
        """
        if self.nodes:
            addresses = [parse_address(node, what="RedisConfig.nodes") for node in self.nodes]
        elif self.url:
            parsed = parse_url(self.url)
            addresses = [(str(parsed.get("host", "127.0.0.1")), int(parsed.get("port", 6379)))]
        else:
            addresses = [(self.host, self.port)]
        options = self._common_options()
        return RedisCluster(
            # reinitialize_steps stays redis-py's: re-reading the slot map closes every node's
            # connections, in-flight commands included, so doing it on each MOVED fails calls.
            startup_nodes=[ClusterNode(host, port) for host, port in addresses],
            **self._credentials(),
            **options,
        )

    def build_sentinel(self) -> redis.Redis:
        """A client of the primary named ``sentinel_service``, discovered through ``sentinels``.

        Every new connection asks the Sentinels where the primary is; a connection that meets a
        demoted primary (``READONLY``) is dropped and the command retried on the new one. Closing
        the client (``aclose()``) also closes the connections to the Sentinels.
        """
        options = self._common_options()
        sentinel_options: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "socket_keepalive": True,
            "client_name": self.client_name,
        }
        if self.sentinel_password:
            sentinel_options["password"] = self.sentinel_password
        sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
            [parse_address(address, what="RedisConfig.sentinels") for address in self.sentinels],
            sentinel_kwargs=sentinel_options,
        )
        client = cast(
            "SentinelPrimaryClient",
            sentinel.master_for(
                self.sentinel_service,
                redis_class=SentinelPrimaryClient,
                db=self._db(),
                **self._credentials(),
                **options,
            ),
        )
        client.sentinel_manager = sentinel
        return client

    def build_standalone(self) -> redis.Redis:
        """Return a ``redis.asyncio.Redis`` over its own bounded connection pool.

        A plain ``ConnectionPool`` (not ``BlockingConnectionPool``, whose wait costs ~20 us per
        command even when a connection is free); callers that need queueing bound their own
        concurrency to ``max_connections`` (as ``RedisCacheManager`` does).

        ``decode_responses=False`` keeps list elements as ``bytes``. Closing the client
        (``aclose()``) also closes the pool.
        """
        options = self._common_options()
        if self.url:
            pool = redis.ConnectionPool.from_url(self.url, **options)
        else:
            pool = redis.ConnectionPool(
                host=self.host, port=self.port, db=self.db, password=self.password, **options
            )
        return redis.Redis.from_pool(pool)


class SlotMapGate:
    """Lets calls through one at a time while a ``RedisCluster`` (re)reads its slot map.

    redis-py's asyncio ``RedisCluster`` reads the slot map on first use and again after a
    connection error (a failover); many coroutines doing that at once tear down each other's
    connections (failed calls, even an ``AttributeError``). Through the gate, the first call does
    it alone and the rest follow once the map is read. For other clients (and for a cluster client
    whose map is current) :meth:`run` costs one attribute check.
    """

    __slots__ = ("_client", "_lock")

    def __init__(self, client: object) -> None:
        self._client = client if isinstance(client, RedisCluster) else None
        self._lock = asyncio.Lock()

    def _rereading(self) -> bool:
        # RedisCluster._initialize: True until the slot map has been read (again).
        return self._client is not None and bool(getattr(self._client, "_initialize", False))

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call()``, alone while the slot map is being (re)read."""
        if self._rereading():
            async with self._lock:
                if self._rereading():
                    return await call()
        return await call()


class SentinelPrimaryClient(redis.Redis):
    """The Sentinel-managed primary's client; ``aclose()`` also closes the Sentinel connections.

    (redis-py leaves the ``Sentinel`` object, and its connections, to the caller.)
    """

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            sentinel, self.sentinel_manager = self.sentinel_manager, None
            if sentinel is not None:
                await sentinel.aclose()


def parse_address(address: str, *, what: str = "address") -> tuple[str, int]:
    """``"host:port"`` -> ``("host", port)``; ``[v6]:port`` is accepted too.

    Raises:
        ValueError: not ``host:port`` with a port in 1..65535.
    """
    if not isinstance(address, str):
        raise ValueError(f"{what}: expected 'host:port', got {address!r}")
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: expected 'host:port', got {address!r}")
    return host, int(port)
