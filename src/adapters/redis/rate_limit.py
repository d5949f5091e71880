"""``RedisRateLimiter``: GCRA in one Lua script on the Redis server clock, atomic and fail-soft."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from voxcore.adapters.redis.guard import Failure, RedisGuard
from voxcore.core.domain.keys import MAX_KEY_LENGTH
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.ports.rate_limit import RateLimitDecision, RateLimiter
from voxcore.events import emit

log = logging.getLogger(__name__)

# The theoretical arrival time (TAT) and all arithmetic are whole microseconds held in Lua doubles:
# exact up to 2**53 us (285 years), so the server clock plus the tolerance must stay below it.
_MAX_TOLERANCE_US: Final = 2**52

# GCRA (Generic Cell Rate Algorithm). State per subject: one string, the theoretical arrival time
# (TAT): the moment (server clock, microseconds) at which the subject is back at full capacity. A
# request of `cost` is allowed iff TAT' - tolerance <= now, where TAT' = max(TAT, now) + interval *
# cost; only then is TAT' stored, expiring at TAT' (from then on "no key" and "idle" are the same
# state). A denial writes nothing, so hammering while limited costs no allowance.
# ARGV: emission interval (us per unit), tolerance (interval * burst, us), cost (units).
# Returns ONE integer, the subject's distance from idle in microseconds: TAT' - now (>= 1) when
# allowed, -(TAT - now) - 1 (<= -1) when denied. Remaining units, retry-after and reset-after follow
# from it exactly (see `_decide`). A single integer is the cheapest reply there is (the same shape as
# `return 1`): a 4-element array costs the server and the parser ~15% more per call.
_GCRA_LUA: Final = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval * tonumber(ARGV[3])
if new_tat - tolerance > now then return now - tat - 1 end
redis.call('PSETEX', KEYS[1], math.ceil((new_tat - now) / 1000), new_tat)
return new_tat - now
"""
_GCRA_SHA: Final = hashlib.sha1(_GCRA_LUA.encode()).hexdigest()
# Costs encoded once: redis-py would otherwise format the int on every call.
_COST_ARGS: Final = tuple(str(n).encode() for n in range(64))


class RedisRateLimiter(RateLimiter):
    """A distributed rate limiter: GCRA with the state of each subject in one Redis key.

    Each :meth:`acquire` is one ``EVALSHA`` round trip. The script reads the Redis server clock
    (``TIME``), so clients on machines whose clocks disagree still share one exact limit, and it
    runs atomically, so any number of concurrent callers get exactly the allowance (100 callers
    racing for a limit of 10 get 10 grants). Denied requests write nothing and consume nothing.
    Requires Redis >= 5 (a write after ``TIME`` in a script needs effects replication).

    Semantics: a subject may spend ``burst`` units at once from idle, and regains one unit every
    ``period_s / limit`` seconds (the emission interval, rounded to a whole microsecond). With the
    default ``burst = limit`` that is "``limit`` per ``period_s``" with an instant start; in any
    window of ``period_s`` at most ``burst + limit`` units pass.

    Keys are ``<key_prefix><namespace><subject>`` and expire (``PSETEX``) when the subject is back
    at full capacity, so idle subjects leave nothing behind. The script is sent by SHA; after a
    restart or ``SCRIPT FLUSH`` (``NOSCRIPT``) it is loaded and the call retried once.

    Soft failures: when Redis fails, :meth:`acquire` logs ``rate_limit_error`` ``{subject, error}``
    (rate-limited; circuit state changes are one ``redis_circuit`` line each) and answers by policy
    (``decided_by="policy"``). The script is never resent: when its reply is lost after sending,
    the decision says ``outcome_known=False`` (at most one charge happened). Fail-open allows
    (``remaining = burst - cost``, as if the subject were idle); fail-closed denies with
    ``retry_after_s`` set to when Redis will next be tried. After a connection-level failure or a
    missed deadline a circuit breaker answers at once while one background PING per window finds
    out when Redis is back. Each denial is logged as ``rate_limited`` ``{subject, retry_after_s}``
    at INFO.

    Args:
        redis_client: The client to use (``decode_responses`` either way). It stays the caller's:
            :meth:`aclose` does not close it.
        limit: Units regained per ``period_s`` (>= 1).
        period_s: The period in seconds (> 0).
        key_prefix: Prepended to every key (for a Redis shared with other applications).
        namespace: Between the prefix and the subject.
        burst: Units that may pass at once from idle; ``limit`` when omitted.
        fail_open: Policy while Redis fails: allow (True) or deny (False).
        queue_timeout_s: How long a call waits for a free pool connection before failing softly
            (within ``op_timeout_s``).
        op_timeout_s: Deadline of one :meth:`acquire`'s Redis call, queueing included; a missed
            deadline counts as a Redis failure (the breaker opens) and is answered by policy.
        breaker: Fast-fail policy; a default one is made when omitted.
        clock: Monotonic seconds for the breaker (injectable for tests). The limit itself always
            uses the Redis server clock.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        redis_client: redis.Redis | RedisCluster,
        *,
        limit: int,
        period_s: float,
        key_prefix: str = "",
        namespace: str = "ratelimit:",
        burst: int | None = None,
        fail_open: bool = True,
        queue_timeout_s: float = 1.0,
        op_timeout_s: float = 1.0,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if redis_client is None:
            raise ValueError("redis_client is required")
        if not _positive_int(limit):
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        if isinstance(period_s, bool) or not isinstance(period_s, int | float) or not 0 < period_s < math.inf:
            raise ValueError(f"period_s must be a positive number of seconds, got {period_s!r}")
        if burst is None:
            burst = limit
        elif not _positive_int(burst):
            raise ValueError(f"burst must be a positive int, got {burst!r}")
        if not isinstance(key_prefix, str) or not isinstance(namespace, str):
            raise ValueError("key_prefix and namespace must be strings")
        if not isinstance(fail_open, bool):
            raise ValueError(f"fail_open must be a bool, got {fail_open!r}")
        if isinstance(queue_timeout_s, bool) or not isinstance(queue_timeout_s, int | float):
            raise ValueError(f"queue_timeout_s must be a number of seconds, got {queue_timeout_s!r}")
        if not queue_timeout_s > 0:
            raise ValueError(f"queue_timeout_s must be positive, got {queue_timeout_s!r}")
        if (
            isinstance(op_timeout_s, bool)
            or not isinstance(op_timeout_s, int | float)
            or not op_timeout_s > 0
        ):
            raise ValueError(f"op_timeout_s must be a positive number of seconds, got {op_timeout_s!r}")
        interval_us = round(period_s * 1_000_000 / limit)
        if interval_us < 1:
            raise ValueError(f"{limit} per {period_s} s is more than one request per microsecond")
        if interval_us * burst > _MAX_TOLERANCE_US:
            raise ValueError(f"burst x period/limit is too long: {interval_us * burst} us")
        self._client = redis_client
        self._limit = limit
        self._period_s = float(period_s)
        self._burst = burst
        self._interval_us = interval_us
        self._tolerance_us = interval_us * burst
        self._prefix = key_prefix + namespace
        self._fail_open = fail_open
        self._clock = clock
        self._closed = False
        self._script_args = (str(interval_us).encode(), str(self._tolerance_us).encode())
        # Bounds in-flight calls to the client's pool size: beyond it a plain ConnectionPool raises
        # "Too many connections", which is an overload, not an outage; callers queue instead.
        pool = getattr(redis_client, "connection_pool", None)
        pool_size: object = getattr(pool, "max_connections", None)
        if isinstance(redis_client, RedisCluster):  # a pool per node, each of this size
            pool_size = redis_client.get_connection_kwargs().get("max_connections")
        self._guard = RedisGuard(
            component="rate_limit",
            target=_describe_pool(pool),
            breaker=breaker or CircuitBreaker(),
            op_timeout_s=float(op_timeout_s),
            queue_timeout_s=float(queue_timeout_s),
            max_in_flight=pool_size if isinstance(pool_size, int) and pool_size >= 1 else None,
            retries=0,
            error_event="rate_limit_error",
            key_field="subject",
            clock=clock,
        )

    # -- configuration -----------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """Units regained per period."""
        return self._limit

    @property
    def period_s(self) -> float:
        """The period in seconds."""
        return self._period_s

    @property
    def burst(self) -> int:
        """Capacity: units that may pass at once from idle (``RateLimitDecision.limit``)."""
        return self._burst

    @property
    def fail_open(self) -> bool:
        """True when Redis failures allow requests, False when they deny them."""
        return self._fail_open

    def key_for(self, subject: str) -> str:
        """The Redis key holding ``subject``'s state."""
        return self._prefix + subject

    # -- port ------------------------------------------------------------------------------------

    async def acquire(self, subject: str, *, cost: int = 1) -> RateLimitDecision:
        """Consume ``cost`` units of ``subject``'s allowance if available (one round trip).

        Args:
            subject: Who is limited (non-empty, at most 1024 characters).
            cost: Units to consume, ``1..burst``.

        Returns:
            The decision; the policy's decision when Redis fails (never raises for that).

        Raises:
            ValueError: bad ``subject`` or ``cost``.
        """
        if type(subject) is not str or not 0 < len(subject) <= MAX_KEY_LENGTH:
            raise ValueError(f"rate limit subject must be a string of 1..{MAX_KEY_LENGTH} characters")
        if type(cost) is not int or not 0 < cost <= self._burst:
            raise ValueError(f"cost must be an int in 1..{self._burst}, got {cost!r}")
        distance_us = await self._eval(subject, cost)
        if isinstance(distance_us, Failure):
            return self._fallback(cost, distance_us)
        return self._decide(subject, cost, distance_us)

    async def aclose(self) -> None:
        """Stop the breaker's background probe; later calls answer by policy. Safe to call twice.

        The Redis client is not closed: it belongs to whoever passed it in.
        """
        self._closed = True
        await self._guard.aclose()

    # -- internals ------------------------------------------------------------------------------

    def _decide(self, subject: str, cost: int, distance_us: int) -> RateLimitDecision:
        """The decision from the script's reply (integer arithmetic, exact to the microsecond)."""
        interval, tolerance = self._interval_us, self._tolerance_us
        if distance_us > 0:  # allowed; the subject is now `distance_us` from idle
            return RateLimitDecision(
                True, (tolerance - distance_us) // interval, 0.0, self._burst, distance_us / 1e6
            )
        distance_us = -distance_us - 1  # denied; the state was left as it was
        retry_after_s = (distance_us + interval * cost - tolerance) / 1e6
        emit(log, "rate_limited", logging.INFO, subject=subject, retry_after_s=retry_after_s)
        remaining = max(0, (tolerance - distance_us) // interval)
        return RateLimitDecision(False, remaining, retry_after_s, self._burst, distance_us / 1e6)

    async def _eval(self, subject: str, cost: int) -> int | Failure:
        """One EVALSHA through the guard (breaker, deadline, pool bound); a ``Failure`` when it failed.

        The script writes, so it is never resent: it goes over a connection of its own from the
        client's pool (whatever retry policy that client has), and a reply lost after sending is
        reported as ``uncertain``.
        """
        if self._closed:
            return self._guard.log_failure("acquire", subject, Failure("closed", "rate limiter is closed"))
        args = (
            _GCRA_SHA,
            1,
            self._prefix + subject,
            *self._script_args,
            _COST_ARGS[cost] if cost < len(_COST_ARGS) else cost,
        )

        async def script(client: redis.Redis | RedisCluster) -> int:
            if isinstance(client, RedisCluster):
                # One node per key slot; the cluster client follows MOVED/ASK and failovers itself.
                return int(await client.evalsha(*args))  # type: ignore[misc,unused-ignore]
            pool = client.connection_pool
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                # send + read on one connection, no retry: redis-py disconnects it on any failure
                # or cancellation, so a late reply can never be read by another command.
                await connection.send_command("EVALSHA", *args)
                reply = await connection.read_response()
            finally:
                await pool.release(connection)
            return int(reply)

        return await self._guard.run(
            self._client, "acquire", subject, script, idempotent=False, script=_GCRA_LUA
        )

    def _fallback(self, cost: int, failure: Failure) -> RateLimitDecision:
        known = not failure.uncertain
        if self._fail_open:
            return RateLimitDecision(True, self._burst - cost, 0.0, self._burst, 0.0, "policy", known)
        breaker = self._guard.breaker
        retry_after_s = breaker.retry_in(self._clock()) or breaker.base_window_s
        return RateLimitDecision(False, 0, retry_after_s, self._burst, 0.0, "policy", known)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _describe_pool(pool: object) -> str:
    kwargs: Any = getattr(pool, "connection_kwargs", None) or {}
    host, port, db = kwargs.get("host"), kwargs.get("port"), kwargs.get("db", 0)
    if host is None:
        return "redis (host client)"
    return f"redis://{host}:{port}/{db}"
