"""The bookkeeping of a hybrid reply in flight: syntheses shared between listeners, feeds, slots, turns.

Private to :mod:`voxcore.application.hybrid` (and its synthesis pool).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace

from voxcore.application.shared_synthesis import SynthesisClaim
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.hybrid import ItemSource
from voxcore.core.domain.playlist import PlaylistItem, StaticItem, TTSItem
from voxcore.core.ports.cache import AudioChunkStream
from voxcore.core.ports.errors import TTSError
from voxcore.core.ports.playback import PlayedItemObserver
from voxcore.events import emit

logger = logging.getLogger("voxcore.hybrid")

#: Keys remembered per responder (TTS keys per text, keys seen in the cache).
MAX_REMEMBERED_KEYS: Final = 4096


class Synthesis:
    """One synthesis of one text, shared by every item that needs the same ``tts:*`` key meanwhile.

    The engine's pieces are kept as they arrive, so a consumer that joins late replays them and then
    follows the live ones. It stays registered (single flight) until its cache write has finished.
    """

    __slots__ = (
        "_changed",
        "claim",
        "consumers",
        "error",
        "finished",
        "first_byte_at",
        "key",
        "pieces",
        "settled",
        "started_at",
        "task",
        "text",
    )

    def __init__(self, key: str, text: str, started_at: float) -> None:
        self.key = key
        self.text = text
        self.started_at = started_at
        self.first_byte_at: float | None = None
        self.pieces: list[bytes] = []
        self.finished = False  # ended successfully: every piece is in ``pieces``
        self.error: BaseException | None = None
        self.settled = asyncio.Event()  # finished or failed
        self.consumers = 0
        self.claim: SynthesisClaim | None = None  # the cross-worker lease (SharedSynthesis)
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def add(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self._notify()

    def finish(self) -> None:
        if self.settled.is_set():
            return
        self.finished = True
        self.settled.set()
        self._notify()

    def fail(self, error: BaseException) -> None:
        if self.settled.is_set():
            return
        self.error = error
        self.settled.set()
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def replay(self) -> AsyncGenerator[bytes, None]:
        """Every piece, from the first, then the live ones; raises ``TTSError`` if the synthesis failed."""
        index = 0
        while True:
            if index < len(self.pieces):
                index += 1
                yield self.pieces[index - 1]
            elif self.finished:
                return
            elif self.error is not None:
                raise TTSError(f"speech synthesis failed: {self.error}") from self.error
            else:
                await self._changed.wait()


@dataclass(slots=True, eq=False)
class Feed:
    """Where one item's audio comes from, once its cache lookup has answered."""

    kind: str
    key: str
    source: ItemSource
    fmt: AudioFormat | None = None
    stream: AudioChunkStream | None = None
    synthesis: Synthesis | None = None
    pcm: bytes = b""
    head: bytes | None = None  # the stream's first chunk, already taken from it
    fmt_check: asyncio.Task[AudioFormat | None] | None = None  # verifies a remembered format
    answered_at: float | None = None
    released: bool = False

    def pieces(self) -> AsyncGenerator[bytes, None]:
        if self.stream is not None:
            return read_stream(self.stream, self.head)
        if self.synthesis is not None:
            return self.synthesis.replay()
        return once(self.pcm)


async def read_stream(stream: AudioChunkStream, head: bytes | None) -> AsyncGenerator[bytes, None]:
    try:
        if head is not None:
            yield head
        async for chunk in stream:
            yield chunk
    finally:
        await stream.aclose()


async def once(pcm: bytes) -> AsyncGenerator[bytes, None]:
    if pcm:
        yield pcm


@dataclass(slots=True, eq=False)
class Slot:
    """One playlist item in flight: its span, its producer task and the feed it resolves to."""

    index: int
    item: PlaylistItem
    started: float
    span: trace.Span
    feed: asyncio.Future[Feed]
    task: asyncio.Task[None] | None = None
    reported: bool = False


@dataclass(slots=True, eq=False)
class Turn:
    """Bookkeeping of one reply being played."""

    started: float
    span: trace.Span
    parent: otel_context.Context
    turn_started: float  # the caller's turn start (the user's turn), for time_to_first_audio_ms
    items: list[PlaylistItem] = field(default_factory=list)
    complete: bool = True  # no more items will be added
    slots: list[Slot] = field(default_factory=list)
    running: int = 0  # producers alive (lookups, syntheses held for prefetch)
    first_answered: bool = False  # the other items may start
    grace: asyncio.TimerHandle | None = None  # opens first_answered if item 0's synthesis is slow
    gate_scheduled: bool = False
    playing: int = 0
    closed: bool = False
    feeder: asyncio.Task[None] | None = None
    source_error: BaseException | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    first_audio_ms: float | None = None  # turn start -> first chunk
    playlist_first_audio_ms: float | None = None  # reply start -> first chunk
    tts_ttfb_ms: float | None = None
    last_sample: int = 0  # the last sample handed to the rechunker (joins start from it)
    degraded: dict[int, str] = field(default_factory=dict)  # item index -> what happened
    voices: dict[str, None] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    converted: int = 0
    skipped: int = 0
    failed: int = 0
    chunks: int = 0
    observer: PlayedItemObserver | None = None  # told of each item once it played

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


def remember_key(keys: dict[str, None], key: str) -> None:
    """Add ``key`` to a bounded insertion-ordered set, forgetting the oldest entry when full."""
    if key not in keys and len(keys) >= MAX_REMEMBERED_KEYS:
        del keys[next(iter(keys))]  # the oldest entry
    keys[key] = None


async def wait_settled(synthesis: Synthesis) -> None:
    await synthesis.settled.wait()


def delivered(future: asyncio.Future[Feed]) -> Feed | None:
    if not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result()


def kind_of(item: PlaylistItem) -> str:
    if isinstance(item, StaticItem):
        return "static"
    if isinstance(item, TTSItem):
        return "tts"
    return "pause"


def key_of(item: PlaylistItem) -> str:
    return item.key if isinstance(item, StaticItem) else ""


def log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        error = repr(task.exception())
        emit(logger, "background_task_failed", logging.ERROR, task=task.get_name(), error=error)


def describe(fmt: AudioFormat) -> str:
    return f"{fmt.sample_rate} Hz, {fmt.channels} ch, {fmt.encoding}"


async def aclose_stream(stream: AsyncIterator[bytes] | None) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
