"""``RedisGuard``: how every voxcore Redis call runs - bounded, fail-soft, quiet, cancellable.

One guard per component (the cache, the rate limiter) wraps each call in:

* the circuit breaker: while Redis is unreachable calls fail in microseconds, one background PING
  per window finds out when it is back;
* a per-call deadline covering the wait for a connection, connecting and the reply (redis-py's own
  timeouts and retries cannot stretch it);
* error mapping to a :class:`Failure` value (never an exception) that says why, and whether a
  non-idempotent command may have run anyway (``uncertain``);
* quiet logs: one ``redis_circuit`` line per breaker state change with the counts since the last
  one, per-operation error lines rate-limited (the next line says how many were suppressed), and a
  ``voxcore.redis.failed_operations`` counter;
* cancellation honoured: on Python 3.11 redis-py's ``asyncio.wait_for`` can swallow a
  ``task.cancel()`` that lands as the socket write completes; the guard notices the pending
  cancellation request and raises ``CancelledError`` as the caller asked.

Idempotent calls (reads, PING) are retried once after a connection error within the deadline;
redis-py's own retry is off (``RedisConfig.build``), so a command is never resent blindly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, TypeAlias, TypeVar

from opentelemetry import metrics
from redis import exceptions as redis_exc

from voxcore.adapters.redis.config import RedisClient, SlotMapGate, sent_nothing
from voxcore.core.domain.resilience import OPEN, CircuitBreaker
from voxcore.events import emit

log = logging.getLogger("voxcore.redis")

T = TypeVar("T")

FailureReason: TypeAlias = Literal[
    "not_connected", "circuit_open", "busy", "timeout", "connection", "error", "closed"
]

# Failures that mean "Redis cannot be reached": they open the circuit breaker. Other RedisErrors
# (WRONGTYPE, NOSCRIPT, ...) are answers from a live server and leave it closed. In a cluster, a
# slot without a reachable primary (CLUSTERDOWN, a slot not covered while a replica is promoted) is
# an outage of that shard too.
CONNECTION_ERRORS: Final = (
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    OSError,
    redis_exc.ClusterDownError,
    redis_exc.SlotNotCoveredError,
)
# The server answered (it is up, the command was wrong), or the cluster client refused the command.
ANSWERED_ERRORS: Final = (redis_exc.RedisError, redis_exc.RedisClusterException)

_meter = metrics.get_meter("voxcore.redis")
_FAILED_OPS = _meter.create_counter(
    "voxcore.redis.failed_operations",
    unit="{operation}",
    description="Redis operations that failed softly (by component, operation and reason).",
)


class Failure:
    """A call that failed softly; its error has been counted (and logged, unless rate-limited).

    Attributes:
        reason: ``circuit_open`` (fast fail), ``timeout`` (the deadline), ``connection``, ``busy``
            (no free connection in time), ``error`` (Redis refused the command), ``not_connected``
            or ``closed``.
        error: What went wrong, for messages (no secrets).
        uncertain: True when a non-idempotent command may have been executed by Redis anyway
            (its reply was lost or late): the caller must report the outcome as unknown.
    """

    __slots__ = ("error", "reason", "uncertain")

    def __init__(self, reason: FailureReason, error: str, *, uncertain: bool = False) -> None:
        self.reason = reason
        self.error = error
        self.uncertain = uncertain

    @property
    def outage(self) -> bool:
        """True when Redis could not answer (as opposed to answering with an error)."""
        return self.reason in ("circuit_open", "timeout", "connection", "busy", "not_connected", "closed")

    def __repr__(self) -> str:
        return f"Failure({self.reason!r}, {self.error!r}, uncertain={self.uncertain})"


class _RateLimitedLog:
    """At most ``burst`` lines per ``window_s`` per event key; the next line carries ``suppressed``."""

    __slots__ = ("_burst", "_clock", "_state", "_window_s")

    def __init__(self, clock: Callable[[], float], burst: int = 5, window_s: float = 1.0) -> None:
        self._clock = clock
        self._burst = burst
        self._window_s = window_s
        self._state: dict[str, list[float]] = {}  # key -> [window start, lines in window, suppressed]

    def admit(self, key: str) -> int | None:
        """``None`` to suppress this line, else the number of lines suppressed before it."""
        now = self._clock()
        state = self._state.get(key)
        if state is None:
            if len(self._state) > 256:
                self._state.clear()
            self._state[key] = [now, 1, 0]
            return 0
        if now - state[0] >= self._window_s:
            suppressed = int(state[2])
            state[0], state[1], state[2] = now, 1, 0
            return suppressed
        if state[1] < self._burst:
            state[1] += 1
            suppressed = int(state[2])
            state[2] = 0
            return suppressed
        state[2] += 1
        return None


class Slots:
    """A bound on in-flight calls: a plain counter while slots are free, a FIFO queue when not.

    ``asyncio.Semaphore`` would do, but costs ~1 us per call even when free (and its wake-ups under
    cancellation differ between Python versions). A released slot goes straight to the oldest live
    waiter, so ``free > 0`` implies nobody is waiting.
    """

    __slots__ = ("_waiters", "free")

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Take a slot, queueing when none is free (bound the wait with a deadline around it)."""
        if self.free:
            self.free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()  # release() skips it
            raise

    def release(self) -> None:
        """Give the slot to the oldest live waiter, or back to the pool."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class RedisGuard:
    """Runs one component's Redis calls (see the module docstring).

    Args:
        component: ``cache`` or ``rate_limit`` (in log lines and metrics).
        target: Where Redis is, without secrets (for the circuit lines).
        breaker: The fast-fail policy.
        op_timeout_s: Default per-call deadline.
        max_in_flight: Calls in flight at once (the pool size); more wait within their deadline.
        retries: Retries of an idempotent call after a connection error (within its deadline).
        error_event: The per-operation error event (``redis_error``, ``rate_limit_error``).
        key_field: Name of the key field in that event (``key``, ``subject``).
        queue_timeout_s: Bound of the wait for a free connection (within the deadline).
        clock: Monotonic seconds.
        log_burst: Per-operation error lines allowed per second and operation.
    """

    def __init__(
        self,
        *,
        component: str,
        target: str,
        breaker: CircuitBreaker,
        op_timeout_s: float,
        max_in_flight: int | None,
        retries: int = 1,
        error_event: str = "redis_error",
        key_field: str = "key",
        queue_timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_burst: int = 5,
    ) -> None:
        if not op_timeout_s > 0:
            raise ValueError(f"op_timeout_s must be positive, got {op_timeout_s!r}")
        self.component = component
        self.target = target
        self.breaker = breaker
        self.op_timeout_s = float(op_timeout_s)
        self.retries = retries
        self._error_event = error_event
        self._key_field = key_field
        self._queue_timeout_s = queue_timeout_s
        self._clock = clock
        self._slots = Slots(max_in_flight) if max_in_flight else None
        self._log_limit = _RateLimitedLog(clock, burst=log_burst)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gate: SlotMapGate | None = None
        self._gate_client: object = None
        self._last_error = ""
        self._attributes = {"component": component}
        #: Failed operations by reason since start (the metric's in-process twin, for tools and tests).
        self.failed: dict[str, int] = {}

    # -- the call ----------------------------------------------------------------------------------

    async def run(
        self,
        client: RedisClient | None,
        op: str,
        key: str,
        call: Callable[[RedisClient], Awaitable[T]],
        *,
        timeout_s: float | None = None,
        idempotent: bool = True,
        script: str | None = None,
        log_failure: bool = True,
    ) -> T | Failure:
        """Run ``call(client)`` under the breaker and a deadline; a :class:`Failure` instead of raising.

        Args:
            client: The Redis client (``None``: not connected).
            op: Operation name for logs and metrics.
            key: The key concerned (logs).
            call: The commands to run.
            timeout_s: This call's deadline (default ``op_timeout_s``).
            idempotent: False for commands that must never run twice (scripts that write,
                MULTI/EXEC writes): no retry, and a lost reply is reported as ``uncertain``.
            script: Lua source to load and retry once on a NOSCRIPT reply.
            log_failure: Log the per-operation error line (rate-limited).

        Raises:
            asyncio.CancelledError: the caller was cancelled (even when redis-py swallowed it).
        """
        if client is None:
            return self._fail(
                op, key, Failure("not_connected", "not connected: call connect() first"), log_failure
            )
        breaker = self.breaker
        if not breaker.is_closed:
            return self._fast_fail(client, op, key)
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        deadline_s = self.op_timeout_s if timeout_s is None else timeout_s
        attempts = 1 + (self.retries if idempotent else 0)
        outcome: T | Failure
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + deadline_s
        while True:
            attempts -= 1
            outcome = await self._attempt(client, call, ends_at, idempotent, script)
            if task is not None and task.cancelling() > cancelling:
                # A cancel() reached this task but was swallowed inside redis-py (3.11's wait_for):
                # the caller asked to stop, so stop, whatever the call returned.
                self._note_cancel(outcome)
                raise asyncio.CancelledError
            if not isinstance(outcome, Failure) or outcome.reason != "connection" or attempts <= 0:
                break
            if loop.time() >= ends_at:
                break
        if isinstance(outcome, Failure):
            if outcome.reason in ("connection", "timeout"):
                breaker.record_failure(self._clock())
                self._last_error = outcome.error
            elif outcome.reason == "error":
                breaker.record_success(self._clock())  # the server answered: it is up
            self._flush_transitions()
            return self._fail(op, key, outcome, log_failure)
        if breaker.has_transitions:
            self._flush_transitions()
        return outcome

    async def _attempt(
        self,
        client: RedisClient,
        call: Callable[[RedisClient], Awaitable[T]],
        ends_at: float,
        idempotent: bool,
        script: str | None,
    ) -> T | Failure:
        slots = self._slots
        phase = "queue"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as scope:
                # The deadline is armed by a timer of ours that can tell a slow Redis from a blocked
                # event loop (see _expire).
                timer = loop.call_at(ends_at, _expire, scope, loop, ends_at)
                if slots is not None:
                    if slots.free or self._queue_timeout_s is None:
                        await slots.acquire()
                    else:
                        async with asyncio.timeout(self._queue_timeout_s):
                            await slots.acquire()
                try:
                    phase = "call"
                    try:
                        return await self._gate_for(client).run(lambda: call(client))
                    except redis_exc.NoScriptError:
                        if script is None:
                            raise
                        await client.script_load(script)
                        return await call(client)
                finally:
                    timer.cancel()
                    if slots is not None:
                        slots.release()
        except TimeoutError:  # the deadline (redis-py raises its own TimeoutError class)
            if phase == "queue":
                return Failure("busy", "no free Redis connection in time (pool exhausted)")
            return Failure("timeout", "no reply before the per-call deadline", uncertain=not idempotent)
        except CONNECTION_ERRORS as exc:
            # Refused or unreachable while connecting: nothing was sent, so nothing can have run.
            return Failure("connection", _describe(exc), uncertain=not sent_nothing(exc) and not idempotent)
        except ANSWERED_ERRORS as exc:
            return Failure("error", _describe(exc))
        except Exception as exc:
            # A client-side breakage (redis-py's cluster client can raise AttributeError on a
            # connection torn down while its slot map is re-read during a failover): soft, and an
            # outage for the breaker, which spares the callers until a probe succeeds.
            return Failure("connection", _describe(exc), uncertain=not idempotent)

    def _gate_for(self, client: RedisClient) -> SlotMapGate:
        """One gate per client: a cluster client's slot map is (re)read by one call at a time."""
        gate = self._gate
        if gate is None or self._gate_client is not client:
            gate = self._gate = SlotMapGate(client)
            self._gate_client = client
        return gate

    # -- breaker -----------------------------------------------------------------------------------

    def _fast_fail(self, client: RedisClient, op: str, key: str) -> Failure:
        breaker = self.breaker
        now = self._clock()
        if breaker.allow(now):
            self._spawn(self._probe(client))
        breaker.record_rejected()
        self._count("circuit_open", op)
        if breaker.has_transitions:
            self._flush_transitions()
        retry_ms = round(breaker.retry_in(now) * 1000, 1)
        return Failure("circuit_open", f"Redis unavailable (circuit open; next probe in {retry_ms} ms)")

    async def _probe(self, client: RedisClient) -> None:
        """The breaker's trial call: close it if Redis answers, reopen it (longer) if not."""
        try:
            async with asyncio.timeout(self.op_timeout_s):
                await client.ping()
        except asyncio.CancelledError:
            self.breaker.release_trial()
            raise
        except (*CONNECTION_ERRORS, *ANSWERED_ERRORS, TimeoutError) as exc:
            self.breaker.record_failure(self._clock())
            self._last_error = _describe(exc) if not isinstance(exc, TimeoutError) else "probe timed out"
        else:
            self.breaker.record_success(self._clock())
        self._flush_transitions()

    def _flush_transitions(self) -> None:
        for change in self.breaker.drain():
            level = logging.ERROR if change.state == OPEN else logging.INFO
            emit(
                log,
                "redis_circuit",
                level,
                component=self.component,
                target=self.target,
                state=change.state,
                previous=change.previous,
                failures=change.failures,
                rejected=change.rejected,
                consecutive_failures=change.consecutive_failures,
                window_ms=round(change.window_s * 1000, 1),
                since_ms=round(change.since_s * 1000, 1),
                error=self._last_error if change.state == OPEN else None,
            )

    # -- bookkeeping -------------------------------------------------------------------------------

    def log_failure(self, op: str, key: str, failure: Failure) -> Failure:
        """Count and log a failure found outside :meth:`run` (e.g. a closed component)."""
        return self._fail(op, key, failure, True)

    def _fail(self, op: str, key: str, failure: Failure, log_failure: bool) -> Failure:
        self._count(failure.reason, op)
        if log_failure:
            self.log_error(op, key, failure.error, reason=failure.reason)
        return failure

    def _count(self, reason: str, op: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1
        _FAILED_OPS.add(1, {**self._attributes, "op": op, "reason": reason})

    def _note_cancel(self, outcome: object) -> None:
        if isinstance(outcome, Failure) and outcome.reason in ("connection", "timeout"):
            self.breaker.record_failure(self._clock())
            self._flush_transitions()

    def log_error(self, op: str, key: str, error: object, *, reason: str = "error") -> None:
        """One per-operation error line, rate-limited per operation (``suppressed`` counts the rest)."""
        suppressed = self._log_limit.admit(op)
        if suppressed is None:
            return
        text = _describe(error) if isinstance(error, BaseException) else str(error)
        fields: dict[str, Any] = {"op": op, self._key_field: key, "error": text, "reason": reason}
        if suppressed:
            fields["suppressed"] = suppressed
        emit(log_for(self.component), self._error_event, logging.ERROR, **fields)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Cancel a running probe."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


#: A deadline timer this late means the event loop was blocked (a host's synchronous work, CPU
#: starvation), not that Redis was slow: a reply may already be waiting in the socket.
_LOOP_BLOCKED_S: Final = 0.05


def _expire(scope: asyncio.Timeout, loop: asyncio.AbstractEventLoop, due: float) -> None:
    """The per-call deadline's timer: expire the call, or once grant a blocked loop a short grace.

    When the loop was blocked past the deadline, the I/O that arrived meanwhile (the reply) has not
    been processed yet; expiring now would blame Redis for the host's stall and open the breaker.
    One extra ``_LOOP_BLOCKED_S`` lets it be read first; after that the deadline is final.
    """
    now = loop.time()
    try:
        scope.reschedule(now + _LOOP_BLOCKED_S if now - due > _LOOP_BLOCKED_S else now)
    except RuntimeError:  # the call already finished (its scope is closed)
        pass


def log_for(component: str) -> logging.Logger:
    """The logger of a component's per-operation lines (kept where they always were)."""
    return _LOGGERS.get(component, log)


_LOGGERS: Final = {
    "cache": logging.getLogger("voxcore.adapters.redis.cache"),
    "rate_limit": logging.getLogger("voxcore.adapters.redis.rate_limit"),
}


def _describe(exc: object) -> str:
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    return str(exc)
