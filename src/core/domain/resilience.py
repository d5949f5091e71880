"""Circuit breaker state machine for fast failure while a backend is down (pure: ``now`` passed in).

The breaker also keeps the counts an operator needs to read an outage from a handful of log lines:
each state change is reported once, as a :class:`BreakerTransition` carrying the failures and the
fast-failed calls since the previous change (the adapter logs it; per-call lines are not needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

BreakerState: TypeAlias = Literal["closed", "open", "half_open"]

#: Default cap of the fast-fail window (so a recovered backend is noticed within ~1 s).
DEFAULT_MAX_WINDOW_S: Final = 0.75

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """One state change of a :class:`CircuitBreaker`, with what happened since the previous one.

    Attributes:
        state: The new state (``closed``, ``open`` or ``half_open``).
        previous: The state it left.
        failures: Connection-level failures recorded since the previous transition.
        rejected: Calls answered at once (fast fail) since the previous transition.
        consecutive_failures: Failures since the last success (0 when closed).
        window_s: The fast-fail window now running (0 unless ``open``).
        since_s: Seconds spent in ``previous``.
    """

    state: BreakerState
    previous: BreakerState
    failures: int
    rejected: int
    consecutive_failures: int
    window_s: float
    since_s: float


@dataclass(slots=True)
class CircuitBreaker:
    """Open after a connection failure; let one trial call through when the window ends.

    While open, :meth:`allow` answers False at once, so callers fail in microseconds instead of
    waiting for a socket timeout on every call. After ``base_window_s`` one *trial* call is allowed
    (half-open); its success closes the circuit, its failure reopens it with a doubled window (capped
    at ``max_window_s``). Only connection-level failures should be recorded: a bad command is not an
    outage. Failures of calls that were already in flight when the circuit opened are counted but do
    not lengthen the window.

    Every state change is queued as a :class:`BreakerTransition`; :meth:`drain` hands them over
    (the adapter logs one line per transition).

    Attributes:
        base_window_s: First fast-fail window after a failure.
        max_window_s: Cap of the exponentially growing window: the longest a recovered backend can
            go unnoticed. Default: :data:`DEFAULT_MAX_WINDOW_S` (or ``base_window_s`` if longer).
    """

    base_window_s: float = 0.25
    max_window_s: float = 0.0
    _state: BreakerState = field(default=CLOSED, init=False)
    _open_until: float = field(default=0.0, init=False)
    _window_s: float = field(default=0.0, init=False)
    _trial_in_flight: bool = field(default=False, init=False)
    _failures: int = field(default=0, init=False)
    _since: float | None = field(default=None, init=False)
    _failed_since_change: int = field(default=0, init=False)
    _rejected_since_change: int = field(default=0, init=False)
    _pending: list[BreakerTransition] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not self.max_window_s:
            self.max_window_s = max(DEFAULT_MAX_WINDOW_S, self.base_window_s)
        if self.base_window_s <= 0 or self.max_window_s < self.base_window_s:
            raise ValueError("breaker windows must satisfy 0 < base_window_s <= max_window_s")

    @property
    def is_closed(self) -> bool:
        """True while no failure is being remembered."""
        return self._failures == 0

    @property
    def state(self) -> BreakerState:
        """``closed``, ``open`` (fast-failing) or ``half_open`` (one trial call in flight)."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures recorded since the last success."""
        return self._failures

    @property
    def has_transitions(self) -> bool:
        """True when :meth:`drain` has something to hand over."""
        return bool(self._pending)

    def retry_in(self, now: float) -> float:
        """Seconds until the next trial call is allowed (0 when calls may go through)."""
        return max(0.0, self._open_until - now) if self._failures else 0.0

    def allow(self, now: float) -> bool:
        """Whether a call may go to the backend now.

        Closed: always. Open: never before the window ends; after it, exactly one caller gets a
        trial until that trial reports back through :meth:`record_success` or :meth:`record_failure`.
        """
        if not self._failures:
            return True
        if now < self._open_until or self._trial_in_flight:
            return False
        self._trial_in_flight = True
        self._change(HALF_OPEN, now)
        return True

    def record_rejected(self) -> None:
        """Count a call that was answered at once because the circuit is open."""
        self._rejected_since_change += 1

    def record_success(self, now: float | None = None) -> None:
        """A call reached the backend: close the circuit."""
        if not self._failures:
            return
        self._failures = 0
        self._window_s = 0.0
        self._open_until = 0.0
        self._trial_in_flight = False
        self._change(CLOSED, now)

    def record_failure(self, now: float) -> None:
        """A connection-level failure: open (or reopen with a longer window)."""
        self._failures += 1
        self._failed_since_change += 1
        if self._state == OPEN:
            return  # a call that was already in flight when the circuit opened
        self._window_s = min(self.max_window_s, self._window_s * 2 if self._window_s else self.base_window_s)
        self._open_until = now + self._window_s
        self._trial_in_flight = False
        self._change(OPEN, now)

    def release_trial(self) -> None:
        """A trial ended without telling anything about the backend (e.g. it was cancelled)."""
        if self._trial_in_flight:
            self._trial_in_flight = False
            self._state = OPEN  # still open; the next caller after the window gets the trial

    def drain(self) -> list[BreakerTransition]:
        """The transitions since the last call, oldest first (and forget them)."""
        pending, self._pending = self._pending, []
        return pending

    def _change(self, state: BreakerState, now: float | None) -> None:
        previous = self._state
        since_s = 0.0 if now is None or self._since is None else max(0.0, now - self._since)
        self._pending.append(
            BreakerTransition(
                state=state,
                previous=previous,
                failures=self._failed_since_change,
                rejected=self._rejected_since_change,
                consecutive_failures=self._failures,
                window_s=self._window_s if state == OPEN else 0.0,
                since_s=since_s,
            )
        )
        if len(self._pending) > 64:  # nobody drains: keep the newest only
            del self._pending[:-64]
        self._state = state
        self._since = now
        self._failed_since_change = 0
        self._rejected_since_change = 0
