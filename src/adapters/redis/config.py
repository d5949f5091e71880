"""Redis client configuration and factory (SPEC-B), with explicit short timeouts and a bounded pool.

redis-py's own defaults differ between versions (and some let one call stall for seconds), so every
timeout and the pool size are set here explicitly, and redis-py's command retry is switched off: a
command whose reply is late must not be sent a second time (a script or MULTI/EXEC that writes would
run twice). voxcore's guard retries idempotent reads itself, within each call's deadline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from voxcore.core.domain.secrets import MASK, mask_url

try:  # redis-py >= 6.4 probes CLIENT MAINT_NOTIFICATIONS on every new connection unless told not to
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

_LOCATION = ("host", "port", "db", "password", "url")


def _env_int(name: str, default: int) -> int:
    raw = os.getenv(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


@dataclass(slots=True, init=False)
class RedisConfig:
    """The single place Redis client settings come from.

    Arguments given explicitly always win. The environment only fills what was not given:
    ``REDIS_HOST``/``REDIS_PORT``/``REDIS_DB``/``REDIS_PASSWORD`` each fill their own field, and
    ``REDIS_URL`` is used only when no location argument (``url``, ``host``, ``port``, ``db``) was
    passed - so a config built for a specific server never silently talks to another one. An
    explicit ``url`` wins over the four fields. Nothing is read at import time.

    The password never appears in ``repr()``, :meth:`describe` or error messages.

    Attributes:
        host, port, db, password: Where Redis is (SPEC-B).
        url: A ``redis://`` or ``rediss://`` URL; overrides the four fields above.
        decode_responses: Always False: audio is stored as bytes.
        socket_timeout: Seconds a command may wait for its reply (each cache call also has its
            own, shorter deadline).
        socket_connect_timeout: Seconds to establish a TCP connection.
        max_connections: Pool bound. The pool itself fails fast when exhausted; the cache queues
            its callers for a free connection instead (within their deadline).
        pool_timeout: Seconds a rate-limiter call waits for a free connection.
        retries: Retries of an *idempotent* call (reads, PING) after a connection error, within
            the call's deadline. Writes and scripts are never retried.
        health_check_interval: Seconds of idleness after which a pooled connection is PINGed first.
    """

    host: str
    port: int
    db: int
    password: str | None = field(repr=False)
    url: str | None = field(repr=False)
    decode_responses: bool
    socket_timeout: float
    socket_connect_timeout: float
    max_connections: int
    pool_timeout: float
    retries: int
    health_check_interval: int
    client_name: str

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        password: str | None = None,
        url: str | None = None,
        decode_responses: bool = False,
        socket_timeout: float = 1.0,
        socket_connect_timeout: float = 0.5,
        max_connections: int = 32,
        pool_timeout: float = 1.0,
        retries: int = 1,
        health_check_interval: int = 30,
        client_name: str = "voxcore",
    ) -> None:
        located = url is not None or host is not None or port is not None or db is not None
        self.host = host if host is not None else (os.getenv("REDIS_HOST") or "127.0.0.1")
        self.port = port if port is not None else _env_int("REDIS_PORT", 6379)
        self.db = db if db is not None else _env_int("REDIS_DB", 0)
        self.password = password if password is not None else (os.getenv("REDIS_PASSWORD") or None)
        self.url = url if url is not None else (None if located else (os.getenv("REDIS_URL") or None))
        self.decode_responses = decode_responses
        self.socket_timeout = socket_timeout
        self.socket_connect_timeout = socket_connect_timeout
        self.max_connections = max_connections
        self.pool_timeout = pool_timeout
        self.retries = retries
        self.health_check_interval = health_check_interval
        self.client_name = client_name
        self._validate()

    def _validate(self) -> None:
        if self.decode_responses:
            raise ValueError("RedisConfig.decode_responses must stay False: audio chunks are bytes")
        for name in ("socket_timeout", "socket_connect_timeout", "pool_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RedisConfig.{name} must be positive")
        if self.max_connections < 1:
            raise ValueError("RedisConfig.max_connections must be at least 1")
        if self.retries < 0:
            raise ValueError("RedisConfig.retries must not be negative")
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"RedisConfig.url must be a redis://, rediss:// or unix:// URL, got {mask_url(self.url)!r}"
            )

    def __repr__(self) -> str:
        location = (
            f"url={mask_url(self.url)!r}"
            if self.url
            else f"host={self.host!r}, port={self.port}, db={self.db}"
        )
        password = f", password={MASK!r}" if self.password else ""
        return (
            f"RedisConfig({location}{password}, socket_timeout={self.socket_timeout}, "
            f"socket_connect_timeout={self.socket_connect_timeout}, max_connections={self.max_connections}, "
            f"pool_timeout={self.pool_timeout}, retries={self.retries})"
        )

    __str__ = __repr__

    def describe(self) -> str:
        """Where this config points, without the password (for logs and messages)."""
        if self.url:
            scheme, _, rest = self.url.partition("://")
            rest = rest.rpartition("@")[2]
            return mask_url(f"{scheme}://{rest}")
        return f"redis://{self.host}:{self.port}/{self.db}"

    def build(self) -> redis.Redis:
        """Return a ``redis.asyncio.Redis`` over its own bounded connection pool.

        A plain ``ConnectionPool`` (not ``BlockingConnectionPool``, whose wait costs ~20 us per
        command even when a connection is free); callers that need queueing bound their own
        concurrency to ``max_connections`` (as ``RedisCacheManager`` does).

        redis-py's retry is off (``Retry(NoBackoff(), 0)``): on a lost or late reply it would send
        the command again on a new connection, and a write would run twice.

        ``decode_responses=False`` keeps list elements as ``bytes``. Closing the client
        (``aclose()``) also closes the pool.
        """
        options: dict[str, Any] = {
            "decode_responses": self.decode_responses,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": self.health_check_interval,
            "client_name": self.client_name,
            "max_connections": self.max_connections,
        }
        if MaintNotificationsConfig is not None:
            # Cluster maintenance push notifications are useless here and cost a round trip
            # (and an error reply on Redis < 8) per new connection.
            options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        if self.url:
            pool = redis.ConnectionPool.from_url(self.url, **options)
        else:
            pool = redis.ConnectionPool(
                host=self.host, port=self.port, db=self.db, password=self.password, **options
            )
        return redis.Redis.from_pool(pool)
