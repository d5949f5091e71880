"""Rate limiter port: may this subject (a caller, a phone number, a tenant) spend ``cost`` now?"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    """The answer to one :meth:`RateLimiter.acquire`.

    Attributes:
        allowed: True when the request may proceed (its cost has been consumed).
        remaining: Unit requests that would still be allowed right now, after this one.
        retry_after_s: When denied, seconds until the same request would be allowed; 0 when allowed.
        limit: The subject's capacity: how many unit requests may pass at once from idle.
        reset_after_s: Seconds until the subject is back at full capacity (0 when it already is).
        decided_by: ``redis`` (the backend's answer) or ``policy`` (the backend failed; the
            fail-open/fail-closed policy answered).
        outcome_known: False when the backend may have consumed the units even though its answer
            was lost (a late or cut reply): the request was not resent, so at most one charge.
    """

    allowed: bool
    remaining: int
    retry_after_s: float
    limit: int
    reset_after_s: float
    decided_by: Literal["redis", "policy"] = "redis"
    outcome_known: bool = True


class RateLimiter(abc.ABC):
    """Admission control shared by every process that talks to the same backend.

    Implementations are *soft*: a backend failure never raises out of :meth:`acquire`. It is logged
    and answered by the configured policy instead: fail-open (allow; availability first) or
    fail-closed (deny; protection first).
    """

    @abc.abstractmethod
    async def acquire(self, subject: str, *, cost: int = 1) -> RateLimitDecision:
        """Consume ``cost`` units of ``subject``'s allowance if it has them; a denial consumes nothing.

        Args:
            subject: Who is limited (a non-empty string; each subject has its own allowance).
            cost: Units this request takes (1 for a plain request, more for expensive ones).

        Returns:
            The decision; on a backend failure, the policy's decision.

        Raises:
            ValueError: ``subject`` is not a usable string, or ``cost`` is not an int in
                ``1..limit`` (a request larger than the capacity could never be allowed).
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop background work and release what the limiter owns; safe to call twice."""
