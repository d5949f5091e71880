"""``RedisRateLimiter``: GCRA in one Lua script on the Redis server clock, atomic and fail-soft."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import redis.asyncio as redis
from redis import exceptions as redis_exc
from redis.asyncio.cluster import RedisCluster

from voxcore.adapters.redis.config import SlotMapGate
from voxcore.core.domain.keys import MAX_KEY_LENGTH
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.ports.rate_limit import RateLimitDecision, RateLimiter
from voxcore.events import emit

log = logging.getLogger(__name__)

# Failures that mean "Redis cannot be reached": they open the circuit breaker. Other RedisErrors
# (WRONGTYPE, a script error) are answers from a live server and leave it closed.
# In a cluster, a slot without a reachable primary (CLUSTERDOWN, a slot not covered while a replica
# is promoted) is an outage of that shard too.
_CONNECTION_ERRORS: Final = (
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    OSError,
    TimeoutError,
    redis_exc.ClusterDownError,
    redis_exc.SlotNotCoveredError,
)
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
    and answers by policy. Fail-open allows (``remaining = burst - cost``, as if the subject were
    idle); fail-closed denies with ``retry_after_s`` set to when Redis will next be tried. After a
    connection-level failure a circuit breaker answers at once (no socket timeout per call) while
    one background PING per window finds out when Redis is back. Each denial is logged as
    ``rate_limited`` ``{subject, retry_after_s}`` at INFO.

    Args:
        redis_client: The client to use (``decode_responses`` either way). It stays the caller's:
            :meth:`aclose` does not close it.
        limit: Units regained per ``period_s`` (>= 1).
        period_s: The period in seconds (> 0).
        key_prefix: Prepended to every key (for a Redis shared with other applications).
        namespace: Between the prefix and the subject.
        burst: Units that may pass at once from idle; ``limit`` when omitted.
        fail_open: Policy while Redis fails: allow (True) or deny (False).
        queue_timeout_s: How long a call waits for a free pool connection before failing softly.
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
        self._queue_timeout_s = float(queue_timeout_s)
        self._breaker = breaker or CircuitBreaker()
        self._clock = clock
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._script_args = (str(interval_us).encode(), str(self._tolerance_us).encode())
        # Bounds in-flight calls to the client's pool size: beyond it a plain ConnectionPool raises
        # "Too many connections", which is an overload, not an outage; callers queue instead.
        pool_size: object = getattr(getattr(redis_client, "connection_pool", None), "max_connections", None)
        if isinstance(redis_client, RedisCluster):  # a pool per node, each of this size
            pool_size = redis_client.get_connection_kwargs().get("max_connections")
        self._slots = _Slots(pool_size) if isinstance(pool_size, int) and pool_size >= 1 else None
        self._gate = SlotMapGate(redis_client)

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
        if distance_us is None:
            return self._fallback(cost)
        return self._decide(subject, cost, distance_us)

    async def aclose(self) -> None:
        """Stop the breaker's background probe; later calls answer by policy. Safe to call twice.

        The Redis client is not closed: it belongs to whoever passed it in.
        """
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

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

    async def _eval(self, subject: str, cost: int) -> int | None:
        """One EVALSHA through the breaker and the pool bound; ``None`` after a logged failure."""
        if self._closed:
            self._log_error(subject, "rate limiter is closed")
            return None
        breaker = self._breaker
        if not breaker.is_closed:
            # Redis was unreachable: answer at once. When the window is over, one background
            # PING finds out whether it is back, so no caller ever waits on a dead socket.
            now = self._clock()
            if breaker.allow(now):
                self._spawn(self._probe())
            retry_ms = round(breaker.retry_in(now) * 1000, 1)
            self._log_error(subject, f"Redis unavailable (fast fail; next probe in {retry_ms} ms)")
            return None
        slots = self._slots
        if slots is not None:
            if slots.free:
                slots.free -= 1
            elif not await slots.wait(self._queue_timeout_s):
                self._log_error(subject, f"no free Redis connection within {self._queue_timeout_s} s")
                return None
        client = self._client
        args = (
            _GCRA_SHA,
            1,
            self._prefix + subject,
            *self._script_args,
            _COST_ARGS[cost] if cost < len(_COST_ARGS) else cost,
        )
        try:
            try:
                reply = await self._gate.run(lambda: cast("Awaitable[int]", client.evalsha(*args)))
            except redis_exc.NoScriptError:
                # A restarted or flushed server forgot the script: load it and retry once.
                await client.script_load(_GCRA_LUA)
                reply = await cast("Awaitable[int]", client.evalsha(*args))
        except _CONNECTION_ERRORS as exc:
            breaker.record_failure(self._clock())
            self._log_error(subject, exc)
            return None
        except (redis_exc.RedisError, redis_exc.RedisClusterException) as exc:
            breaker.record_success()  # the server answered: it is up, the call was refused
            self._log_error(subject, exc)
            return None
        except Exception as exc:
            # A client-side breakage (redis-py's cluster client can raise AttributeError on a
            # connection torn down while its slot map is re-read during a failover): soft.
            breaker.record_failure(self._clock())
            self._log_error(subject, exc)
            return None
        finally:
            if slots is not None:
                slots.release()
        breaker.record_success()
        return reply

    def _fallback(self, cost: int) -> RateLimitDecision:
        if self._fail_open:
            return RateLimitDecision(True, self._burst - cost, 0.0, self._burst, 0.0)
        breaker = self._breaker
        retry_after_s = breaker.retry_in(self._clock()) or breaker.base_window_s
        return RateLimitDecision(False, 0, retry_after_s, self._burst, 0.0)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self) -> None:
        """The breaker's trial call: close it if Redis answers, reopen it (longer) if not."""
        try:
            await self._client.ping()
        except asyncio.CancelledError:
            self._breaker.release_trial()
            raise
        except (*_CONNECTION_ERRORS, redis_exc.RedisError, redis_exc.RedisClusterException) as exc:
            self._breaker.record_failure(self._clock())
            emit(log, "rate_limit_probe_failed", logging.DEBUG, error=f"{type(exc).__name__}: {exc}")
            return
        self._breaker.record_success()
        emit(log, "rate_limit_recovered")

    def _log_error(self, subject: str, error: object) -> None:
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        emit(log, "rate_limit_error", logging.ERROR, subject=subject, error=text)


class _Slots:
    """A bound on in-flight calls: a plain counter while slots are free, a FIFO queue when not.

    ``asyncio.Semaphore`` would do, but costs ~1 us per call even when free; on a ~100 us round trip
    that is a visible share of the limiter's budget. A released slot goes straight to the oldest
    live waiter, so ``free > 0`` implies nobody is waiting.
    """

    __slots__ = ("_waiters", "free")

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def wait(self, timeout_s: float) -> bool:
        """Queue for a slot (call only when ``free == 0``); False when none came within the timeout."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()  # release() skips it
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True

    def release(self) -> None:
        """Give the slot to the oldest live waiter, or back to the pool."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
