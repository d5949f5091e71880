"""Circuit breaker state machine for fast failure while a backend is down (pure: ``now`` passed in)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CircuitBreaker:
    """Open after a connection failure; let one trial call through when the window ends.

    While open, :meth:`allow` answers False at once, so callers fail in microseconds instead of
    waiting for a socket timeout on every call. After ``base_window_s`` one *trial* call is allowed
    (half-open); its success closes the circuit, its failure reopens it with a doubled window (capped
    at ``max_window_s``). Only connection-level failures should be recorded: a bad command is not an
    outage.

    Attributes:
        base_window_s: First fast-fail window after a failure.
        max_window_s: Cap of the exponentially growing window.
    """

    base_window_s: float = 0.25
    max_window_s: float = 2.0
    _open_until: float = field(default=0.0, init=False)
    _window_s: float = field(default=0.0, init=False)
    _trial_in_flight: bool = field(default=False, init=False)
    _failures: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.base_window_s <= 0 or self.max_window_s < self.base_window_s:
            raise ValueError("breaker windows must satisfy 0 < base_window_s <= max_window_s")

    @property
    def is_closed(self) -> bool:
        """True while no failure is being remembered."""
        return self._failures == 0

    @property
    def consecutive_failures(self) -> int:
        """Failures recorded since the last success."""
        return self._failures

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
        return True

    def record_success(self) -> None:
        """A call reached the backend: close the circuit."""
        self._failures = 0
        self._window_s = 0.0
        self._open_until = 0.0
        self._trial_in_flight = False

    def record_failure(self, now: float) -> None:
        """A connection-level failure: open (or reopen with a longer window)."""
        self._failures += 1
        self._window_s = min(self.max_window_s, self._window_s * 2 if self._window_s else self.base_window_s)
        self._open_until = now + self._window_s
        self._trial_in_flight = False

    def release_trial(self) -> None:
        """A trial ended without telling anything about the backend (e.g. it was cancelled)."""
        self._trial_in_flight = False
