"""``RedisKeyLeases``: short per-key leases (``SET NX PX`` + compare-and-delete), fail-soft."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import redis.asyncio as redis
from redis import exceptions as redis_exc
from redis.asyncio.cluster import RedisCluster

from voxcore.adapters.redis.config import SlotMapGate
from voxcore.adapters.redis.keyspace import Keyspace
from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.ports.lease import KeyLeases, Lease, LeaseState
from voxcore.events import emit

log = logging.getLogger(__name__)

# Delete the lease only if it is still ours: an expired lease may already belong to someone else.
_RELEASE_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RELEASE_SHA: Final = hashlib.sha1(_RELEASE_LUA.encode()).hexdigest()
_CONNECTION_ERRORS: Final = (
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    OSError,
    TimeoutError,
    redis_exc.ClusterDownError,
    redis_exc.SlotNotCoveredError,
)
T = TypeVar("T")


class _Unavailable(Exception):
    """The breaker is open: the call was not sent."""


class RedisKeyLeases(KeyLeases):
    """Leases in Redis: ``P voxcore:lease:{P<key>}`` holds the holder's random token.

    :meth:`acquire` is one ``SET key token NX PX ttl`` (atomic across every worker on the same
    Redis: exactly one of N concurrent callers gets ``ACQUIRED``); :meth:`release` is one script
    that deletes the key only while it still holds this holder's token. The lease key shares the
    hash slot of the key it is about (cluster-safe, see ``keyspace``).

    Soft: any Redis failure is logged as ``lease_error`` ``{op, key, error}`` and answered with
    ``UNAVAILABLE`` (acquire) or ``False`` (release); the lease then simply expires. After a
    connection-level failure a circuit breaker answers ``UNAVAILABLE`` at once (no socket timeout
    on the path of a TTS miss) until a trial call gets through.

    Args:
        redis_client: The client to use (it stays the caller's: nothing here closes it).
        key_prefix: Prepended to every key (the cache's ``key_prefix``).
        breaker: Fast-fail policy; a default one is made when omitted.
        clock: Monotonic seconds for the breaker.
    """

    def __init__(
        self,
        redis_client: redis.Redis | RedisCluster,
        *,
        key_prefix: str = "",
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client: Any = redis_client
        self._keys = Keyspace(key_prefix, cluster=isinstance(redis_client, RedisCluster))
        self._gate = SlotMapGate(redis_client)
        self._breaker = breaker or CircuitBreaker()
        self._clock = clock

    def key_for(self, key: str) -> str:
        """The Redis key holding ``key``'s lease."""
        return self._keys.lease(key)

    async def acquire(self, key: str, ttl_ms: int) -> Lease:
        if not isinstance(key, str) or not key:
            raise ValueError("lease key must be a non-empty string")
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms < 1:
            raise ValueError(f"ttl_ms must be a positive int, got {ttl_ms!r}")
        token = secrets.token_hex(8)
        try:
            name = self._keys.lease(key)
            taken = await self._call(lambda: self._client.set(name, token, nx=True, px=ttl_ms))
        except _Unavailable:
            return Lease(key, LeaseState.UNAVAILABLE)
        except (DomainError, redis_exc.RedisError, redis_exc.RedisClusterException) as exc:
            return self._failed("acquire", key, exc)
        if taken:
            return Lease(key, LeaseState.ACQUIRED, token)
        return Lease(key, LeaseState.HELD)

    async def release(self, lease: Lease) -> bool:
        if not lease.acquired or lease.token is None:
            return False
        name, token = self._keys.lease(lease.key), lease.token

        async def compare_and_delete() -> Any:
            try:
                return await self._client.evalsha(_RELEASE_SHA, 1, name, token)
            except redis_exc.NoScriptError:
                await self._client.script_load(_RELEASE_LUA)
                return await self._client.evalsha(_RELEASE_SHA, 1, name, token)

        try:
            deleted = await self._call(compare_and_delete)
        except _Unavailable:
            return False
        except (redis_exc.RedisError, redis_exc.RedisClusterException) as exc:
            self._log("release", lease.key, exc)
            return False
        return bool(deleted)

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        """One call through the breaker; connection failures open it (and raise ``_Unavailable``)."""
        breaker = self._breaker
        if not breaker.allow(self._clock()):
            raise _Unavailable
        try:
            result = await self._gate.run(call)
        except asyncio.CancelledError:
            breaker.release_trial()
            raise
        except _CONNECTION_ERRORS as exc:
            breaker.record_failure(self._clock())
            self._log("call", "", exc)
            raise _Unavailable from exc
        except (redis_exc.RedisError, redis_exc.RedisClusterException):
            breaker.record_success()  # the server answered
            raise
        except Exception as exc:  # a client-side breakage (see SlotMapGate): soft, like an outage
            breaker.record_failure(self._clock())
            self._log("call", "", exc)
            raise _Unavailable from exc
        breaker.record_success()
        return result

    def _failed(self, op: str, key: str, exc: BaseException) -> Lease:
        self._log(op, key, exc)
        return Lease(key, LeaseState.UNAVAILABLE)

    def _log(self, op: str, key: str, exc: BaseException) -> None:
        emit(log, "lease_error", logging.WARNING, op=op, key=key, error=f"{type(exc).__name__}: {exc}")
