"""Redis client configuration and factory (SPEC-B), with explicit short timeouts and a bounded pool.

redis-py's own defaults differ between versions (and some let one call stall for seconds), so every
timeout, the pool size and the retry policy are set here explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

try:  # redis-py >= 6.4 probes CLIENT MAINT_NOTIFICATIONS on every new connection unless told not to
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]


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

    def __post_init__(self) -> None:
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
        if self.url:
            scheme, _, rest = self.url.partition("://")
            return f"{scheme}://{rest.rpartition('@')[2]}"
        return f"redis://{self.host}:{self.port}/{self.db}"

    def build(self) -> redis.Redis:
        """Return a ``redis.asyncio.Redis`` over its own bounded connection pool.

        A plain ``ConnectionPool`` (not ``BlockingConnectionPool``, whose wait costs ~20 us per
        command even when a connection is free); callers that need queueing bound their own
        concurrency to ``max_connections`` (as ``RedisCacheManager`` does).

        ``decode_responses=False`` keeps list elements as ``bytes``. Closing the client
        (``aclose()``) also closes the pool.
        """
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
        if self.url:
            pool = redis.ConnectionPool.from_url(self.url, **options)
        else:
            pool = redis.ConnectionPool(
                host=self.host, port=self.port, db=self.db, password=self.password, **options
            )
        return redis.Redis.from_pool(pool)
