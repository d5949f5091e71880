"""Lease port: a short, expiring claim on a key shared by every worker (who synthesizes this ``tts:*``)."""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass


class LeaseState(enum.Enum):
    """What :meth:`KeyLeases.acquire` found."""

    ACQUIRED = "acquired"  # this caller holds the lease until it releases it or it expires
    HELD = "held"  # another holder has it
    UNAVAILABLE = "unavailable"  # the backend failed (logged): nobody can tell, act alone


@dataclass(frozen=True, slots=True)
class Lease:
    """The outcome of one acquisition.

    Attributes:
        key: The key the lease is about (e.g. ``tts:...``).
        state: See :class:`LeaseState`.
        token: The holder's secret when ``ACQUIRED`` (only it can release the lease), else ``None``.
    """

    key: str
    state: LeaseState
    token: str | None = None

    @property
    def acquired(self) -> bool:
        """True when this caller holds the lease."""
        return self.state is LeaseState.ACQUIRED


class KeyLeases(abc.ABC):
    """Short leases on keys, shared by every process that talks to the same backend.

    Implementations are *soft*: a backend failure never raises; :meth:`acquire` answers
    ``UNAVAILABLE`` and :meth:`release` gives up (the lease expires by itself).
    """

    @abc.abstractmethod
    async def acquire(self, key: str, ttl_ms: int) -> Lease:
        """Take the lease on ``key`` for ``ttl_ms`` unless someone holds it (one atomic step).

        Raises:
            ValueError: an empty key or a TTL < 1 ms.
        """

    @abc.abstractmethod
    async def release(self, lease: Lease) -> bool:
        """Give a lease back early; True when it was still ours and is now free.

        A lease that expired (and was perhaps taken by someone else) is left alone.
        """
