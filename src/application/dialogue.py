"""Writes a call's completed turns to the dialogue store in the background, and restores them on resume."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from voxcore.core.domain.dialogue import ContextMark, CorruptDialogueError, DialogueSnapshot, StoredMessage
from voxcore.core.domain.keys import session_hash
from voxcore.core.domain.models import ConversationMessage
from voxcore.core.ports.dialogue import DialogueStore
from voxcore.core.ports.errors import BackendError
from voxcore.events import emit

logger = logging.getLogger("voxcore.dialogue")

Figures = Mapping[str, float | int | bool | str | None]


@dataclass(frozen=True, slots=True)
class RestoredDialogue:
    """What :func:`restore_dialogue` found: the active context's summary and history.

    Attributes:
        summary: The summary the active context starts from (``None``: none).
        history: The active context's messages, oldest first, exactly as stored.
        last_seq: ``seq`` of the newest stored message (the next one gets ``last_seq + 1``).
    """

    summary: str | None
    history: tuple[ConversationMessage, ...]
    last_seq: int


async def restore_dialogue(store: DialogueStore, session_id: str) -> RestoredDialogue | None:
    """Load a session's dialogue for a resumed call; ``None`` means "start fresh".

    A corrupt or foreign-version record, or a store that cannot be read, is refused with one log
    line (``dialogue_restore_refused`` with the reason) and the call starts fresh: a resumed call
    never fails because of its cache.
    """
    h = session_hash(session_id)
    try:
        snapshot = await store.load(session_id)
    except CorruptDialogueError as exc:
        emit(logger, "dialogue_restore_refused", logging.WARNING, session=h, reason="corrupt", error=str(exc))
        return None
    except BackendError as exc:
        emit(
            logger,
            "dialogue_restore_refused",
            logging.WARNING,
            session=h,
            reason="unavailable",
            error=str(exc),
        )
        return None
    if snapshot is None:
        emit(logger, "dialogue_restore_empty", session=h)
        return None
    return _restored(snapshot, h)


def _restored(snapshot: DialogueSnapshot, h: str) -> RestoredDialogue:
    history = snapshot.active_history()
    if snapshot.missing_messages:
        emit(
            logger,
            "dialogue_restore_truncated",
            logging.WARNING,
            session=h,
            missing_messages=snapshot.missing_messages,
        )
    summary = snapshot.mark.summary if snapshot.mark is not None else None
    emit(
        logger,
        "dialogue_restored",
        session=h,
        messages=len(history),
        stored_messages=len(snapshot.messages),
        summary=summary is not None,
        last_seq=snapshot.last_seq,
    )
    return RestoredDialogue(
        summary=summary, history=tuple(m.message for m in history), last_seq=snapshot.last_seq
    )


class DialogueRecorder:
    """One call's writer to the dialogue store: never on a turn's critical path, nothing lost to an outage.

    :meth:`record` is synchronous and cheap (a list append and an event set); one background task
    writes what is pending as one store call (one MULTI), retrying with backoff while the store is
    down. Pending messages are bounded by ``max_pending``: past it the oldest pending ones are
    dropped and the next write replaces the stored list with what is left. That loses nothing the
    store would have kept, since the store keeps only its newest ``max_messages`` anyway (set
    ``max_pending`` to that). :meth:`aclose` drains what is pending, up to ``drain_timeout_s``.

    Log events: ``dialogue_write_failed`` (the first failure of an outage), ``dialogue_write_recovered``,
    ``dialogue_pending_trimmed``, ``dialogue_write_lost`` (pending messages abandoned at close).

    Args:
        store: The dialogue store.
        session_id: The call's id.
        first_seq: ``seq`` the next recorded message gets (``last_seq + 1`` of a restored dialogue).
        replace: The first write drops what the store holds for the session (a fresh conversation).
        max_pending: Messages kept in memory while the store is unavailable.
        drain_timeout_s: How long :meth:`aclose` waits for pending writes.
        wall_clock: Seconds since the epoch (message timestamps).
        retry_delays_s: Backoff between failed writes (the last value repeats).
    """

    def __init__(
        self,
        *,
        store: DialogueStore,
        session_id: str,
        first_seq: int = 1,
        replace: bool = True,
        max_pending: int = 500,
        drain_timeout_s: float = 2.0,
        wall_clock: Callable[[], float] = time.time,
        retry_delays_s: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0),
    ) -> None:
        if first_seq < 1 or max_pending < 1 or drain_timeout_s < 0 or not retry_delays_s:
            raise ValueError("need first_seq >= 1, max_pending >= 1, drain_timeout_s >= 0 and retry delays")
        self._store = store
        self._session_id = session_id
        self._hash = session_hash(session_id)
        self._next_seq = first_seq
        self._replace = replace
        self._max_pending = max_pending
        self._drain_timeout = drain_timeout_s
        self._wall_clock = wall_clock
        self._delays = retry_delays_s
        self._pending: list[StoredMessage] = []
        self._mark: ContextMark | None = None
        self._dirty = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False
        self.written = 0  # messages written so far
        self.failures = 0  # failed write attempts

    @property
    def next_seq(self) -> int:
        """``seq`` the next recorded message gets."""
        return self._next_seq

    @property
    def pending(self) -> int:
        """Messages not written yet."""
        return len(self._pending)

    def record(
        self,
        messages: tuple[ConversationMessage, ...],
        *,
        history_length: int,
        summary: str | None,
        figures: Figures | None = None,
    ) -> None:
        """Queue the messages a turn added to the active context, and where that context now stands.

        Args:
            messages: The messages added (the user's, then the answer), oldest first.
            history_length: Messages in the active context's history after them.
            summary: The active context's summary.
            figures: The turn's figures, stored on the last message.
        """
        if self._closed:
            emit(
                logger,
                "dialogue_write_lost",
                logging.WARNING,
                session=self._hash,
                messages=len(messages),
                reason="closed",
            )
            return
        now = self._wall_clock()
        for index, message in enumerate(messages):
            last = index == len(messages) - 1
            self._pending.append(
                StoredMessage(
                    seq=self._next_seq,
                    role=message["role"],
                    content=message["content"],
                    ts=now,
                    figures=dict(figures) if last and figures else {},
                )
            )
            self._next_seq += 1
        first_seq = max(self._next_seq - history_length, 1)
        self._mark = ContextMark(summary=summary, first_seq=first_seq, ts=now)
        self._dirty = True
        if len(self._pending) > self._max_pending:
            dropped = len(self._pending) - self._max_pending
            del self._pending[:dropped]
            self._replace = True  # the stored run would have a hole: rewrite it from what is kept
            emit(logger, "dialogue_pending_trimmed", logging.WARNING, session=self._hash, dropped=dropped)
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"dialogue-writer-{self._hash}"
            )

    async def flush(self, within_s: float | None = None) -> bool:
        """Wait until everything recorded so far is written (False: ``within_s`` passed first)."""
        if self._task is None:
            return True
        try:
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Write what is pending (up to ``drain_timeout_s``), then stop; later records are logged as lost."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is None:
            return
        drained = False
        try:
            async with asyncio.timeout(self._drain_timeout):
                await self._idle.wait()
                drained = True
        except TimeoutError:
            pass
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not drained and (self._pending or self._dirty):
            emit(
                logger,
                "dialogue_write_lost",
                logging.ERROR,
                session=self._hash,
                messages=len(self._pending),
                reason="store unavailable at close",
            )

    async def _run(self) -> None:
        attempt = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                batch, mark, replace = list(self._pending), self._mark, self._replace
                assert mark is not None
                self._dirty = self._replace = False
                try:
                    await self._store.append(self._session_id, batch, mark, replace=replace)
                except Exception as exc:  # any failure: keep the batch, back off, retry
                    self._dirty = True
                    self._replace = self._replace or replace
                    self.failures += 1
                    if not self._failing:
                        self._failing = True
                        emit(
                            logger,
                            "dialogue_write_failed",
                            logging.WARNING,
                            session=self._hash,
                            error=f"{type(exc).__name__}: {exc}",
                            pending=len(self._pending),
                        )
                    await asyncio.sleep(self._delays[min(attempt, len(self._delays) - 1)])
                    attempt += 1
                    continue
                # Records made while the write was in flight stay pending for the next round.
                done = {m.seq for m in batch}
                self._pending = [m for m in self._pending if m.seq not in done]
                self.written += len(batch)
                if self._failing:
                    self._failing = False
                    emit(logger, "dialogue_write_recovered", session=self._hash, attempts=attempt)
                attempt = 0
            self._idle.set()
