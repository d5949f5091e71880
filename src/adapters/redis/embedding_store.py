"""Redis L2 of the embedding cache: encoded vectors as Strings with a TTL, batches in one round trip.

A batch is a non-transactional pipeline of single-key ``GET``/``SET ... EX`` commands: one round trip
on a standalone server, and cluster-safe as it is (no command spans two keys, so content-addressed
keys need no shared hash tag; a cluster client sends one pipeline per node).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from redis import exceptions as redis_exc

from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.ports.embeddings import EmbeddingStore
from voxcore.events import emit

__all__ = ["RedisEmbeddingStore"]

log = logging.getLogger("voxcore.embeddings.store")

# Failures that mean "Redis cannot be reached": they open the breaker. Other RedisErrors do not.
_CONNECTION_ERRORS: Final = (redis_exc.ConnectionError, redis_exc.TimeoutError, OSError, TimeoutError)


class RedisEmbeddingStore(EmbeddingStore):
    """Soft ``get_many``/``set_many`` over a redis-py asyncio client (bytes responses).

    Args:
        client: A ``redis.asyncio.Redis`` (or cluster) client; its lifetime is the caller's.
        breaker: Fast-fail policy while Redis is unreachable (a default one when omitted).
        clock: Monotonic seconds for the breaker.
    """

    def __init__(
        self,
        client: Any,
        *,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._breaker = breaker or CircuitBreaker()
        self._clock = clock

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One pipeline of ``GET``s; every key ``None`` when Redis is unavailable (logged)."""
        if not keys:
            return []
        if not self._allow("get_many"):
            return [None] * len(keys)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                values = await pipe.execute()
        except asyncio.CancelledError:
            self._breaker.release_trial()
            raise
        except Exception as exc:
            self._failed("get_many", exc, len(keys))
            return [None] * len(keys)
        self._breaker.record_success()
        return [value if isinstance(value, bytes) else None for value in values]

    async def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl_seconds: int) -> bool:
        """One pipeline of ``SET key value EX ttl``; False when Redis is unavailable (logged)."""
        if not items:
            return True
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        if not self._allow("set_many"):
            return False
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(key, value, ex=ttl_seconds)
                results = await pipe.execute()
        except asyncio.CancelledError:
            self._breaker.release_trial()
            raise
        except Exception as exc:
            self._failed("set_many", exc, len(items))
            return False
        self._breaker.record_success()
        return all(bool(r) for r in results)

    def _allow(self, op: str) -> bool:
        now = self._clock()
        if self._breaker.allow(now):
            return True
        emit(
            log,
            "redis_unavailable",
            logging.DEBUG,
            op=op,
            retry_in_ms=round(self._breaker.retry_in(now) * 1000, 1),
        )
        return False

    def _failed(self, op: str, exc: BaseException, keys: int) -> None:
        if isinstance(exc, _CONNECTION_ERRORS):
            self._breaker.record_failure(self._clock())
        else:
            self._breaker.record_success()  # the server answered; the command was refused
        emit(
            log,
            "redis_error",
            logging.WARNING,
            op=f"embeddings.{op}",
            keys=keys,
            error_type=type(exc).__name__,
            error=str(exc),
        )
