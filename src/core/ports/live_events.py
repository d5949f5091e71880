"""Live call events: the publishing port (never blocks a turn) and the reading port (replay + live)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from voxcore.core.domain.live_events import LiveEvent


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """Counters of a publisher since it started.

    Attributes:
        published: Events written to the store.
        dropped: Events dropped because the in-process queue was full (each drop is logged).
        failed_writes: Write attempts that failed (the events stayed queued and were retried).
        queued: Events waiting to be written right now.
    """

    published: int
    dropped: int
    failed_writes: int
    queued: int


class LiveEventPublisher(ABC):
    """Publishes a call's events. :meth:`publish` returns at once: writes happen in the background."""

    @abstractmethod
    def publish(self, session_id: str, event_type: str, data: Mapping[str, Any]) -> bool:
        """Queue one event of ``session_id``; never blocks, never raises for a backend failure.

        Returns:
            False when the event was dropped (queue full, or the publisher is closed).

        Raises:
            ValueError: ``event_type`` is not a known event type.
        """

    @property
    @abstractmethod
    def stats(self) -> PublisherStats:
        """The publisher's counters."""

    @abstractmethod
    async def flush(self, within_s: float | None = None) -> bool:
        """Wait until everything queued so far is written (``False``: ``within_s`` passed first)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Write what is queued (bounded by the drain timeout), then stop; later events are dropped."""


@dataclass(frozen=True, slots=True)
class StreamGap:
    """Live delivery was interrupted (the connection dropped and came back): replay from the last id."""


class StreamUnavailable(Exception):
    """The event store cannot be read right now; clients should retry after ``retry_ms``."""

    def __init__(self, message: str, *, retry_ms: int) -> None:
        super().__init__(message)
        self.retry_ms = retry_ms


class SubscriberOverflow(Exception):
    """A subscriber did not keep up: its bounded queue overflowed and it was cut."""


class LiveSubscription(ABC):
    """A live feed of one stream's events (pub/sub), open from the moment it is returned."""

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[LiveEvent | StreamGap]:
        """Events in publication order, and :class:`StreamGap` after an interruption.

        Raises:
            SubscriberOverflow: the subscriber fell behind by more than its queue holds.
            StreamUnavailable: the live feed is down and not coming back soon.
        """


class LiveEventSource(ABC):
    """Reads events: replays a stream, follows its live channel. ``session_id=None``: the index of calls."""

    @abstractmethod
    def subscribe(
        self, session_id: str | None, *, queue_size: int
    ) -> AbstractAsyncContextManager[LiveSubscription]:
        """Subscribe to the live channel; the subscription is active when the context is entered.

        Raises:
            StreamUnavailable: the live feed cannot be reached.
        """

    @abstractmethod
    async def read_after(
        self, session_id: str | None, after_id: str | None, count: int
    ) -> Sequence[LiveEvent]:
        """Up to ``count`` stored events with ids after ``after_id`` (``None``: from the oldest).

        Raises:
            StreamUnavailable: the store cannot be read.
        """

    @abstractmethod
    async def trimmed_after(self, session_id: str | None, after_id: str) -> str | None:
        """The oldest stored id when events after ``after_id`` were trimmed away or expired.

        Returns:
            ``None`` when every event after ``after_id`` is still stored; otherwise the oldest
            available id (``"0-0"`` when the stream holds nothing any more).

        Raises:
            StreamUnavailable: the store cannot be read.
        """
