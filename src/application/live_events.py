"""Live call events: one call's emitter (what happens in a call -> events) and the canonical consumer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from voxcore.core.domain import live_events as ev
from voxcore.core.domain.keys import session_hash
from voxcore.core.domain.live_events import LiveEvent, parse_event_id
from voxcore.core.ports.live_events import LiveEventPublisher, LiveEventSource, StreamGap
from voxcore.core.ports.playback import PlayedItem
from voxcore.events import emit

logger = logging.getLogger("voxcore.live_events")

#: Events read per ``XRANGE`` while replaying.
REPLAY_BATCH = 500


class CallEvents:
    """Turns what happens in one call into live events (``publish`` never blocks, never raises).

    Answer text arrives as many small deltas; they are coalesced: one ``answer_text`` event per
    ``coalesce_ms`` at most, plus one when the turn ends, so a 300-token answer costs a handful of
    events. The emitter also measures ``time_to_first_text_ms`` (turn start -> first answer text)
    for turn figures that do not carry it.

    Args:
        publisher: Where events go.
        session_id: The call's id.
        coalesce_ms: Longest time answer text waits before it is published.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        *,
        publisher: LiveEventPublisher,
        session_id: str,
        coalesce_ms: float = 50.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._publisher = publisher
        self._session_id = session_id
        self._coalesce_s = max(coalesce_ms, 0.0) / 1000.0
        self._clock = clock
        self._turn = 0
        self._turn_started = 0.0
        self._first_text_ms: float | None = None
        self._buffer: list[str] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._started = False
        self._ended = False

    @property
    def session_id(self) -> str:
        """The call's id."""
        return self._session_id

    def publish(self, event_type: str, **data: Any) -> bool:
        """Publish one event of this call (``False``: dropped)."""
        return self._publisher.publish(self._session_id, event_type, data)

    def call_started(self, **data: Any) -> None:
        """The call began (goes to the index of calls too); published once."""
        if not self._started:
            self._started = True
            self.publish(ev.CALL_STARTED, session_hash=session_hash(self._session_id), **data)

    def call_ended(self, **data: Any) -> None:
        """The call ended (goes to the index of calls too); published once, after pending answer text."""
        if self._ended:
            return
        self._ended = True
        self._flush_text()
        self.publish(ev.CALL_ENDED, session_hash=session_hash(self._session_id), **data)

    def turn_started(self, turn: int, user_text: str) -> None:
        """A user turn began: publishes ``user_text``."""
        self._flush_text()
        self._turn = turn
        self._turn_started = self._clock()
        self._first_text_ms = None
        self.publish(ev.USER_TEXT, turn=turn, text=user_text)

    def answer_delta(self, text: str) -> None:
        """A piece of the answer reached the caller (coalesced into ``answer_text`` events)."""
        if not text:
            return
        if self._first_text_ms is None:
            self._first_text_ms = (self._clock() - self._turn_started) * 1000.0
        self._buffer.append(text)
        if self._flush_handle is None:
            if self._coalesce_s <= 0:
                self._flush_text()
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): publish right away
                self._flush_text()
                return
            self._flush_handle = loop.call_later(self._coalesce_s, self._flush_text)

    def turn_finished(self, figures: Mapping[str, Any]) -> None:
        """The turn ended: flush the answer text, publish the ``turn`` figures."""
        self._flush_text()
        data = dict(figures)
        data.setdefault("turn", self._turn)
        if data.get("time_to_first_text_ms") is None:
            data["time_to_first_text_ms"] = self._first_text_ms
        self.publish(ev.TURN, **data)

    def handover(self, **data: Any) -> None:
        """The dual context handed over to its standby."""
        self.publish(ev.HANDOVER, turn=self._turn, **data)

    def summary_cache(self, *, hit: bool, **data: Any) -> None:
        """A summary was looked up in the cache."""
        self.publish(ev.SUMMARY_CACHE, hit=hit, **data)

    def hybrid_item(self, *, kind: str, **data: Any) -> None:
        """A hybrid reply played an item: ``kind`` is ``hit`` (cached audio), ``miss`` or ``tts``."""
        self.publish(ev.HYBRID_ITEM, kind=kind, turn=self._turn, **data)

    def played_item(self, item: PlayedItem) -> None:
        """A hybrid reply played one item (a :data:`PlayedItemObserver` for ``HybridResponder.play``).

        Published as ``hybrid_item`` with ``kind`` = where its audio came from (``hit``, ``miss``,
        ``tts``, ``skipped``, ``silence``), ``item_kind`` (``static``, ``tts``, ``pause``), ``key``,
        ``index``, ``chunks`` and ``first_byte_ms``.
        """
        self.publish(
            ev.HYBRID_ITEM,
            kind=item.source,
            item_kind=item.kind,
            key=item.key,
            index=item.index,
            chunks=item.chunks,
            first_byte_ms=None if item.first_byte_ms is None else round(item.first_byte_ms, 2),
            turn=self._turn,
        )

    def audio_started(self, time_to_first_audio_ms: float, **data: Any) -> None:
        """The current turn's first audio left: a ``turn`` event with ``time_to_first_audio_ms``."""
        self.publish(ev.TURN, turn=self._turn, time_to_first_audio_ms=time_to_first_audio_ms, **data)

    def error(self, error_type: str, message: str, **data: Any) -> None:
        """Something failed in the call."""
        self._flush_text()
        self.publish(ev.ERROR, turn=self._turn, error_type=error_type, message=message[:500], **data)

    def _flush_text(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._buffer:
            text = "".join(self._buffer)
            self._buffer.clear()
            self.publish(ev.ANSWER_TEXT, turn=self._turn, text=text)


@dataclass(frozen=True, slots=True)
class Reset:
    """The position a consumer resumed from is gone (trimmed or expired); replay restarts at ``oldest_id``."""

    oldest_id: str


async def follow_events(
    source: LiveEventSource,
    session_id: str | None,
    *,
    last_id: str | None = None,
    queue_size: int = 1000,
) -> AsyncIterator[LiveEvent | Reset]:
    """The canonical consumer: every event after ``last_id`` exactly once, in order, then live.

    Subscribes first, then replays the stored events after ``last_id`` (``XRANGE``), then follows
    the live channel, skipping ids already delivered; after a live interruption it replays again
    from the last delivered id. So nothing falls between replay and live, and nothing repeats.

    Args:
        source: The event store.
        session_id: The call (``None``: the index of calls).
        last_id: The last event the consumer has (``None``: from the oldest stored event).
        queue_size: Live events buffered for this consumer before it is cut.

    Yields:
        Events, and a :class:`Reset` first when events after ``last_id`` are no longer stored.

    Raises:
        InvalidEventIdError: ``last_id`` is not an event id.
        StreamUnavailable: the store or the live channel cannot be reached.
        SubscriberOverflow: the consumer fell behind the live channel.
    """
    cursor = parse_event_id(last_id) if last_id is not None else (0, 0)
    async with source.subscribe(session_id, queue_size=queue_size) as live:
        after = last_id
        if last_id is not None:
            oldest = await source.trimmed_after(session_id, last_id)
            if oldest is not None:
                emit(
                    logger,
                    "event_resume_reset",
                    session=_label(session_id),
                    last_id=last_id,
                    oldest_id=oldest,
                )
                yield Reset(oldest)
                after, cursor = None, (0, 0)
        while True:  # replay what is stored after the cursor, then go live
            while True:
                batch = await source.read_after(session_id, after, REPLAY_BATCH)
                for event in batch:
                    key = event.key
                    if key > cursor:
                        cursor = key
                        after = event.id
                        yield event
                if len(batch) < REPLAY_BATCH:
                    break
            gap = False
            async for item in live:
                if isinstance(item, StreamGap):
                    gap = True
                    break
                key = item.key
                if key > cursor:
                    cursor = key
                    after = item.id
                    yield item
            if not gap:
                return


def _label(session_id: str | None) -> str:
    return session_hash(session_id) if session_id is not None else "index"
