"""Hybrid responder: playlists of cached fragments and synthesized speech played as one 20 ms audio stream."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Status, StatusCode

from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.hybrid import (
    HybridTurnMetrics,
    ItemSource,
    TurnOutcome,
    static_fragment_key,
)
from voxcore.core.domain.joins import (
    DEFAULT_JOIN_PAUSE_MS,
    DEFAULT_SILENCE_THRESHOLD,
    EdgeTrimmer,
    is_s16,
    last_sample,
    ramp_from,
)
from voxcore.core.domain.playlist import (
    PauseItem,
    Playlist,
    PlaylistError,
    PlaylistItem,
    Rechunker,
    StaticItem,
    TTSItem,
    can_join,
    silence,
)
from voxcore.core.domain.sentences import SentenceSplitter
from voxcore.core.domain.tts_text import tts_cache_key
from voxcore.core.ports.audio import AudioConverter, StreamConverter
from voxcore.core.ports.cache import AbstractAudioCache, AudioChunkStream
from voxcore.core.ports.errors import TTSError
from voxcore.core.ports.tts import SpeechRequest, TTSEngine
from voxcore.events import emit

__all__ = ["HybridResponder"]

logger = logging.getLogger("voxcore.hybrid")

_tracer = trace.get_tracer("voxcore.hybrid")
_meter = metrics.get_meter("voxcore.hybrid")

_ITEM: Final = "voxcore.hybrid.item."
# Remembered static formats (a few hundred fragments is a large manifest) and TTS keys per text.
_MAX_REMEMBERED_FORMATS: Final = 4096
_MAX_REMEMBERED_KEYS: Final = 4096
# Longest wait for the first item's synthesis to deliver audio before the other items start anyway.
_FIRST_REQUEST_GRACE_S: Final = 0.005


@functools.lru_cache(maxsize=16)
def _first_audio_histogram(meter: metrics.Meter) -> metrics.Histogram:
    # One instrument per meter: a proxy meter keeps every instrument it ever made.
    return meter.create_histogram(
        "voxcore.hybrid.time_to_first_audio",
        unit="s",
        description="Start of a hybrid reply -> its first audio chunk.",
    )


class _Synthesis:
    """One synthesis of one text, shared by every item that needs the same ``tts:*`` key meanwhile.

    The engine's pieces are kept as they arrive, so a consumer that joins late replays them and then
    follows the live ones. It stays registered (single flight) until its cache write has finished.
    """

    __slots__ = (
        "_changed",
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
class _Feed:
    """Where one item's audio comes from, once its cache lookup has answered."""

    kind: str
    key: str
    source: ItemSource
    fmt: AudioFormat | None = None
    stream: AudioChunkStream | None = None
    synthesis: _Synthesis | None = None
    pcm: bytes = b""
    head: bytes | None = None  # the stream's first chunk, already taken from it
    fmt_check: asyncio.Task[AudioFormat | None] | None = None  # verifies a remembered format
    answered_at: float | None = None
    released: bool = False

    def pieces(self) -> AsyncGenerator[bytes, None]:
        if self.stream is not None:
            return _read_stream(self.stream, self.head)
        if self.synthesis is not None:
            return self.synthesis.replay()
        return _once(self.pcm)


async def _read_stream(stream: AudioChunkStream, head: bytes | None) -> AsyncGenerator[bytes, None]:
    try:
        if head is not None:
            yield head
        async for chunk in stream:
            yield chunk
    finally:
        await stream.aclose()


async def _once(pcm: bytes) -> AsyncGenerator[bytes, None]:
    if pcm:
        yield pcm


@dataclass(slots=True, eq=False)
class _Slot:
    """One playlist item in flight: its span, its producer task and the feed it resolves to."""

    index: int
    item: PlaylistItem
    started: float
    span: trace.Span
    feed: asyncio.Future[_Feed]
    task: asyncio.Task[None] | None = None
    reported: bool = False


@dataclass(slots=True, eq=False)
class _Turn:
    """Bookkeeping of one reply being played."""

    started: float
    span: trace.Span
    parent: otel_context.Context
    turn_started: float  # the caller's turn start (the user's turn), for time_to_first_audio_ms
    items: list[PlaylistItem] = field(default_factory=list)
    complete: bool = True  # no more items will be added
    slots: list[_Slot] = field(default_factory=list)
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

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class HybridResponder:
    """Plays hybrid replies: recorded fragments and cached syntheses from the cache, the rest via TTS.

    Every item's cache lookup is started early and every TTS miss is synthesized as soon as its
    lookup misses, not when its turn to play comes; items are then played strictly in order, as
    one stream of ``chunk_ms`` chunks of ``target_format``: every chunk but the last of the reply
    has exactly ``chunk_ms`` of audio (items are joined seamlessly, a chunk may span two items).

    * The first item's lookup goes out alone; the moment it answers, the lookups of the following
      items start, at most ``prefetch`` items fetching or synthesizing at once. So the first chunk
      leaves as soon as the first item's first chunk exists (the cache's streaming read), without
      sharing the event loop with the other items' lookups.
    * A ``tts:*`` miss streams the engine's audio to the listener while it is collected; once the
      synthesis has completed, a background task stores it cut into ``chunk_ms`` chunks. Concurrent
      misses of one key (in one reply or across replies) share one synthesis. A synthesis that
      fails midway ends its item early (``hybrid_item_failed``), the rest of the reply plays, and
      nothing is cached. A synthesis nobody listens to any more is cancelled.
    * A ``tts:*`` key identifies its format (the format is part of the key), so a cached synthesis
      is played without asking for its stored format.
    * A static fragment missing from the cache is spoken from its manifest transcript
      (``static_fragment_missing``), or skipped with ``static_fragment_skipped`` (ERROR) when it
      has none; the rest plays either way.
    * A fragment stored in another format is converted through ``converter``; a fragment stored
      without a format is assumed to be in the target format (``hybrid_format_unknown``).

    Events (logger ``voxcore.hybrid``): ``hybrid_item`` per item, ``hybrid_item_failed``,
    ``static_fragment_missing``, ``static_fragment_skipped``, ``tts_cache_fill``,
    ``tts_cache_fill_skipped``, ``tts_cache_fill_cancelled``, ``tts_synthesis_abandoned`` and one
    ``hybrid_turn`` per reply whose fields are the attributes of its ``voxcore.hybrid.playlist`` span.

    Args:
        cache: The audio cache (streaming reads, stored formats, fragment writes).
        tts: The speech engine.
        converter: Converts fragments stored in another format.
        target_format: The format of every chunk handed out (and of syntheses).
        voice: TTS voice.
        tts_model: TTS model (``""``: the engine's default).
        transcripts: ``static:*`` key (or bare fragment name) -> transcript, from the fragment
            manifest, for fragments missing from the cache.
        chunk_ms: Chunk length handed out and stored.
        max_background_writes: Cache writes in flight at most; a synthesis completed beyond it is not
            cached (``tts_cache_fill_skipped``).
        prefetch: Items fetched or synthesized at once (the one playing included).
        speed: TTS speaking rate (part of the cache key).
        sentence_min_chars: Shortest sentence synthesized on its own in :meth:`speak_text_stream`.
        sentence_max_chars: Longest piece of free text synthesized at once.
        speculative_first_tts: When the first item is synthesized text whose ``tts:*`` key this
            responder has not seen in the cache lately, its TTS request goes out together with the
            cache lookup instead of after it, and is cancelled if the lookup finds the audio
            (``tts_speculation_cancelled``). That saves a Redis round trip on the first audio of a
            miss - the common case for the first sentence of free LLM text, which is rarely cached.
            The price is a cancelled (possibly billed) request, at most once per text that another
            process cached, since a key found once is remembered. Set False where cancelled
            requests are billed and the round trip does not matter.
        join_pause_ms: Longest silence where a synthesized piece joins the next one: each synthesis
            has its leading and trailing silence cut to half of it (engines add ~300 ms), with a
            few-ms fade at its edges; and every item's start is ramped from the previous item's last
            sample, so no join clicks. Longer pauses come only from the playlist's
            :class:`PauseItem`. ``None`` joins the pieces exactly as they are. (Signed 16-bit PCM
            targets only; other encodings are joined as they are.)
        silence_threshold: Largest absolute sample value (of 32767) that counts as silence when
            trimming.
        clock: Monotonic seconds.
        tracer: OpenTelemetry tracer (default: the ``voxcore.hybrid`` one).
        meter: OpenTelemetry meter (default: the ``voxcore.hybrid`` one).

    Raises:
        ValueError: an empty voice, or a count below 1.
        DomainError: ``chunk_ms`` or the sentence lengths are invalid, or a transcript key is.
    """

    def __init__(
        self,
        *,
        cache: AbstractAudioCache,
        tts: TTSEngine,
        converter: AudioConverter,
        target_format: AudioFormat,
        voice: str,
        tts_model: str = "",
        transcripts: Mapping[str, str] | None = None,
        chunk_ms: int = 20,
        max_background_writes: int = 8,
        prefetch: int = 4,
        speed: float = 1.0,
        sentence_min_chars: int = 10,
        sentence_max_chars: int = 200,
        speculative_first_tts: bool = True,
        join_pause_ms: int | None = DEFAULT_JOIN_PAUSE_MS,
        silence_threshold: int = DEFAULT_SILENCE_THRESHOLD,
        clock: Callable[[], float] = time.perf_counter,
        tracer: trace.Tracer | None = None,
        meter: metrics.Meter | None = None,
    ) -> None:
        if not voice:
            raise ValueError("voice must not be empty")
        if max_background_writes < 1 or prefetch < 1:
            raise ValueError(
                f"max_background_writes and prefetch must be >= 1, got {max_background_writes}, {prefetch}"
            )
        Rechunker(target_format, chunk_ms)  # validates chunk_ms
        SentenceSplitter(min_chars=sentence_min_chars, max_chars=sentence_max_chars)  # validates lengths
        self._cache = cache
        self._tts = tts
        self._converter = converter
        self._target = target_format
        self._voice = voice
        self._model = tts_model
        self._transcripts = {
            static_fragment_key(key): text.strip()
            for key, text in (transcripts or {}).items()
            if text and text.strip()
        }
        self._chunk_ms = chunk_ms
        self._max_writes = max_background_writes
        self._prefetch = prefetch
        self._speed = speed
        self._sentence_min = sentence_min_chars
        self._sentence_max = sentence_max_chars
        self._speculative = speculative_first_tts
        if join_pause_ms is not None and (
            isinstance(join_pause_ms, bool) or not isinstance(join_pause_ms, int) or join_pause_ms < 0
        ):
            raise ValueError(f"join_pause_ms must be a non-negative int or None, got {join_pause_ms!r}")
        # Joins are processed in signed 16-bit PCM only (every voxcore reply format); else as is.
        self._joins = join_pause_ms is not None and is_s16(target_format)
        self._edge_keep_ms = (join_pause_ms or 0) // 2
        self._silence_threshold = silence_threshold
        EdgeTrimmer(target_format, keep_ms=self._edge_keep_ms, threshold=silence_threshold)  # validates
        self._clock = clock
        self._tracer = tracer if tracer is not None else _tracer
        self._first_audio = _first_audio_histogram(meter if meter is not None else _meter)
        self._inflight: dict[str, _Synthesis] = {}
        # static key -> (first chunk, stored format) of the version seen last (see _resolve_static)
        self._formats: dict[str, tuple[bytes, AudioFormat]] = {}
        self._keys: dict[str, str] = {}  # text -> tts:* key (hashing costs more than a lookup here)
        self._present: dict[str, None] = {}  # tts:* keys seen in the cache lately (no speculation)
        self._syntheses: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._last_metrics: HybridTurnMetrics | None = None
        self._closed = False

    # -- probes ----------------------------------------------------------------------------------------

    @property
    def target_format(self) -> AudioFormat:
        """The format of every chunk handed out."""
        return self._target

    @property
    def _speaker(self) -> str:
        return f"{self._tts.name}/{self._voice}"

    @property
    def last_metrics(self) -> HybridTurnMetrics | None:
        """The numbers of the most recent reply that has ended (``None`` before the first)."""
        return self._last_metrics

    @property
    def pending_writes(self) -> int:
        """Background cache writes in flight."""
        return len(self._writes)

    @property
    def syntheses_in_flight(self) -> int:
        """Syntheses running now."""
        return len(self._syntheses)

    # -- replies ---------------------------------------------------------------------------------------

    def play(
        self, playlist: Playlist, *, turn_started_at: float | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Play ``playlist``: chunks of ``target_format`` in playlist order.

        ``turn_started_at`` (a reading of the responder's clock, :func:`time.perf_counter` by
        default) is when the caller's turn began, e.g. when the user stopped speaking and the LLM
        was asked: ``time_to_first_audio_ms`` is measured from it. Without it the turn starts now,
        and ``time_to_first_audio_ms`` equals ``playlist_first_audio_ms``.

        Close the generator (``aclose``, or ``contextlib.aclosing``) to stop early (barge-in): the
        lookups still in flight are cancelled and syntheses nobody else listens to are abandoned.

        Yields:
            ``chunk_ms`` chunks (the last one of the reply may be shorter).

        Raises:
            TypeError: ``playlist`` is not a :class:`Playlist`.
            RuntimeError: the responder is shut down (raised on the first iteration).
        """
        if not isinstance(playlist, Playlist):
            raise TypeError(f"play needs a Playlist, got {type(playlist).__name__}")
        return self._run(list(playlist.items), None, turn_started_at)

    def speak_text_stream(
        self, deltas: AsyncIterable[str], *, turn_started_at: float | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Speak free answer text while it is still streaming in.

        The text is cut into sentences as it arrives (:class:`SentenceSplitter`); each sentence is
        a TTS item (cache first, synthesized on a miss, cached afterwards), so the first sentence is
        being synthesized while the model is still writing the next ones. An error raised by
        ``deltas`` is re-raised after the sentences completed before it have played (the unfinished
        sentence is not spoken). ``turn_started_at``: as in :meth:`play` (by default the turn
        starts now, so ``time_to_first_audio_ms`` includes the LLM writing the first sentence).

        Yields:
            ``chunk_ms`` chunks of ``target_format``.
        """
        return self._run([], deltas, turn_started_at)

    async def _run(
        self, items: list[PlaylistItem], deltas: AsyncIterable[str] | None, turn_started_at: float | None
    ) -> AsyncGenerator[bytes, None]:
        if self._closed:
            raise RuntimeError("the hybrid responder is shut down")
        span = self._tracer.start_span("voxcore.hybrid.playlist")
        started = self._clock()
        turn = _Turn(
            started=started,
            span=span,
            parent=trace.set_span_in_context(span),
            turn_started=started if turn_started_at is None else min(turn_started_at, started),
        )
        turn.items.extend(items)
        if deltas is not None:
            turn.complete = False
            turn.feeder = asyncio.create_task(self._feed_text(turn, deltas), name="voxcore-hybrid-text")
        rechunker = Rechunker(self._target, self._chunk_ms)
        outcome: TurnOutcome = "closed"
        try:
            self._launch(turn)
            index = 0
            while True:
                slot = await self._next_slot(turn, index)
                if slot is None:
                    break
                if slot.task is None and not slot.feed.done():
                    await self._produce_inline(turn, slot)
                try:
                    feed = await slot.feed
                except Exception as exc:  # a producer bug: the item is lost, the reply goes on
                    feed = _Feed(kind=_kind(slot.item), key=_key(slot.item), source="skipped")
                    self._item_failed(turn, slot, feed, exc, chunks=0)
                async with contextlib.aclosing(self._play_item(turn, slot, feed, rechunker)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                index += 1
            last = rechunker.flush()
            if last is not None:
                self._count_chunk(turn, slot_source=None)
                yield last
            if turn.source_error is not None:
                outcome = "failed"
                raise turn.source_error
            outcome = "ok"
        except Exception:
            outcome = "failed"
            raise
        finally:
            try:
                await self._close_turn(turn)
            finally:
                self._end_turn(turn, outcome)

    async def _play_item(
        self, turn: _Turn, slot: _Slot, feed: _Feed, rechunker: Rechunker
    ) -> AsyncGenerator[bytes, None]:
        # Not a separate task: the chunks are yielded straight from the caller's iteration.
        converter: StreamConverter | None = None
        error: BaseException | None = None
        received = 0
        if feed.source != "skipped" and feed.fmt is not None and not can_join(feed.fmt, self._target):
            try:
                converter = self._converter.stream(feed.fmt, self._target)
            except Exception as exc:  # no conversion exists: the fragment cannot be played
                self._item_failed(turn, slot, feed, exc, chunks=0)
                feed.source = "skipped"
                self._item_done(turn, slot, feed, chunks=0, converted=False)
                return
        pieces = feed.pieces()
        try:
            while True:
                if received == 1 and feed.fmt_check is not None:
                    try:
                        converter = self._recheck_format(feed, await feed.fmt_check, converter)
                    except Exception as exc:
                        error = exc
                        break
                try:
                    piece = await anext(pieces)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    error = exc
                    break
                received += 1
                if not turn.first_answered and not turn.gate_scheduled:
                    # Item 0's first audio: the other items start right after its first chunk.
                    turn.gate_scheduled = True
                    asyncio.get_running_loop().call_soon(self._open_gate, turn)
                if converter is not None:
                    try:
                        piece = converter.feed(piece)
                    except Exception as exc:
                        error = exc
                        break
                if self._joins and piece:
                    if received == 1:  # the join: no step from the previous item's last sample
                        piece = ramp_from(turn.last_sample, piece, self._target)
                    turn.last_sample = last_sample(piece, self._target) or 0
                for chunk in rechunker.feed(piece):
                    self._count_chunk(turn, slot_source=feed.source)
                    yield chunk
            if converter is not None:
                try:
                    tail = converter.flush()
                except Exception as exc:  # ended inside a frame: the partial frame is dropped
                    tail = b""
                    error = error or exc
                for chunk in rechunker.feed(tail):
                    self._count_chunk(turn, slot_source=feed.source)
                    yield chunk
        finally:
            await pieces.aclose()
        if error is not None:
            self._item_failed(turn, slot, feed, error, chunks=received)
        self._item_done(turn, slot, feed, chunks=received, converted=converter is not None)

    def _recheck_format(
        self, feed: _Feed, stored: AudioFormat | None, converter: StreamConverter | None
    ) -> StreamConverter | None:
        """The converter for the rest of a fragment once its remembered format is confirmed or not."""
        actual = stored or self._target
        if feed.fmt is None or actual == feed.fmt:
            return converter
        emit(
            logger,
            "hybrid_format_changed",
            logging.WARNING,
            key=feed.key,
            assumed=_describe(feed.fmt),
            stored=_describe(actual),
        )
        feed.fmt = actual
        return None if can_join(actual, self._target) else self._converter.stream(actual, self._target)

    def _count_chunk(self, turn: _Turn, *, slot_source: ItemSource | None) -> None:
        turn.chunks += 1
        if turn.first_audio_ms is None:
            now = self._clock()
            elapsed = now - turn.turn_started
            turn.first_audio_ms = elapsed * 1000.0
            turn.playlist_first_audio_ms = (now - turn.started) * 1000.0
            self._first_audio.record(elapsed, {"voxcore.hybrid.first_source": slot_source or "mixed"})

    # -- scheduling ------------------------------------------------------------------------------------

    def _launch(self, turn: _Turn) -> None:
        """Start producers in playlist order: item 0 alone, then up to ``prefetch`` at once."""
        while not turn.closed and len(turn.slots) < len(turn.items):
            index = len(turn.slots)
            if index > 0 and not turn.first_answered:
                return
            if index > turn.playing and turn.running >= self._prefetch:
                return
            self._start_slot(turn, index)

    async def _next_slot(self, turn: _Turn, index: int) -> _Slot | None:
        turn.playing = index
        if index > 0:
            self._open_gate(turn)  # item 0 has played: nothing to hold back any more
        while True:
            if index < len(turn.slots):
                return turn.slots[index]
            if index < len(turn.items):
                self._launch(turn)  # the item to play now is started whatever the prefetch bound
                if index < len(turn.slots):
                    continue
            elif turn.complete:
                return None
            await turn.changed.wait()

    def _start_slot(self, turn: _Turn, index: int) -> None:
        item = turn.items[index]
        kind = _kind(item)
        span = self._tracer.start_span(
            "voxcore.hybrid.item",
            context=turn.parent,
            attributes={_ITEM + "index": index, _ITEM + "kind": kind, _ITEM + "key": _key(item)},
        )
        loop = asyncio.get_running_loop()
        slot = _Slot(index=index, item=item, started=self._clock(), span=span, feed=loop.create_future())
        turn.slots.append(slot)
        turn.notify()
        if isinstance(item, PauseItem):  # no I/O at all
            slot.feed.set_result(
                _Feed(kind=kind, key="", source="silence", pcm=silence(self._target, item.ms))
            )
            self._answered(turn, slot)
            return
        turn.running += 1
        if index == 0:
            return  # resolved by the listener itself (_produce_inline): no task switch before the first chunk
        self._watch(turn, slot, self._produce(turn, slot))

    def _watch(self, turn: _Turn, slot: _Slot, work: Coroutine[Any, Any, None]) -> None:
        slot.task = asyncio.create_task(work, name=f"voxcore-hybrid-item-{slot.index}")
        slot.task.add_done_callback(functools.partial(self._producer_done, turn, slot))

    def _answered(self, turn: _Turn, slot: _Slot, feed: _Feed | None = None) -> None:
        """The item's cache lookup has answered: for the first item, the other items may start.

        When the first item is synthesized, they start with its first audio (or after a short grace,
        whichever comes first): its TTS request is then on its way before their lookups take the
        event loop, and they are not needed before the first item has played anyway.
        """
        if slot.index != 0 or turn.first_answered:
            return
        synthesis = feed.synthesis if feed is not None else None
        loop = asyncio.get_running_loop()
        if synthesis is not None and synthesis.first_byte_at is None:
            if turn.grace is None:
                turn.grace = loop.call_later(_FIRST_REQUEST_GRACE_S, self._open_gate, turn)
            return
        # Soon, not now: the listener hands out the first chunk before the new lookups are created.
        if not turn.gate_scheduled:
            turn.gate_scheduled = True
            loop.call_soon(self._open_gate, turn)

    def _open_gate(self, turn: _Turn) -> None:
        if turn.closed:
            return
        if turn.grace is not None:
            turn.grace.cancel()
            turn.grace = None
        if not turn.first_answered:
            turn.first_answered = True
            self._launch(turn)

    def _producer_done(self, turn: _Turn, slot: _Slot, task: asyncio.Task[None]) -> None:
        turn.running -= 1
        if not slot.feed.done():
            error: BaseException = (
                RuntimeError("lookup cancelled") if task.cancelled() else task.exception() or RuntimeError()
            )
            slot.feed.set_exception(error)
            slot.feed.exception()  # retrieved: the consumer may be gone already
        _log_failure(task)
        if slot.index == 0:
            self._open_gate(turn)
        self._launch(turn)
        turn.notify()

    async def _produce(self, turn: _Turn, slot: _Slot) -> None:
        """Resolve one item to its feed (cache hit, synthesis or skip); hold the slot while it synthesizes."""
        feed = await self._resolve(turn, slot)
        if self._deliver(turn, slot, feed) and feed.synthesis is not None:
            # Keep counting against ``prefetch`` until the audio is complete: bounds TTS concurrency.
            await feed.synthesis.settled.wait()

    async def _produce_inline(self, turn: _Turn, slot: _Slot) -> None:
        """:meth:`_produce` for the first item, run by the listener: one task switch less."""
        try:
            feed = await self._resolve(turn, slot)
        except Exception as exc:
            slot.feed.set_exception(exc)
            turn.running -= 1
            self._open_gate(turn)
            return
        if self._deliver(turn, slot, feed) and feed.synthesis is not None:
            self._watch(turn, slot, _wait_settled(feed.synthesis))
            if feed.synthesis.first_byte_at is None:
                await asyncio.sleep(0)  # the TTS request goes out before the listener sets up playback
        else:
            turn.running -= 1
            self._launch(turn)

    async def _resolve(self, turn: _Turn, slot: _Slot) -> _Feed:
        item = slot.item
        if isinstance(item, StaticItem):
            return await self._resolve_static(turn, slot, item.key)
        assert isinstance(item, TTSItem)
        return await self._resolve_tts(turn, slot, item.text, kind="tts", source="miss")

    def _deliver(self, turn: _Turn, slot: _Slot, feed: _Feed) -> bool:
        """Hand the feed to the listener; False (and the feed released) when nobody waits for it."""
        if slot.feed.done():  # cancelled with the listener that awaited it
            feed.released = True
            if feed.synthesis is not None:
                feed.synthesis.consumers += 1
                self._release(feed.synthesis)
            if feed.stream is not None:
                self._close_later(feed)
            return False
        if feed.synthesis is not None:
            feed.synthesis.consumers += 1  # released when the reply ends (see _close_turn)
        slot.feed.set_result(feed)
        self._answered(turn, slot, feed)
        return True

    async def _resolve_static(self, turn: _Turn, slot: _Slot, key: str) -> _Feed:
        """Open the fragment and learn its stored format.

        The format comes from a second command. When the fragment was played before, its format is
        remembered together with its first chunk: if the first chunk is byte for byte the same, the
        remembered format is used at once and checked in the background before the second chunk
        (a fragment rewritten with the same first bytes in another format is switched over there,
        ``hybrid_format_changed``). Otherwise both commands go out together and both are awaited.
        """
        remembered = self._formats.get(key)
        fmt_task: asyncio.Future[AudioFormat | None] | None = None
        if remembered is None:
            fmt_task = asyncio.ensure_future(self._cache.get_audio_format(key))
        try:
            stream = await self._cache.open_audio_stream(key)
            if stream is None:
                return await self._static_missing(turn, slot, key)
            head = await anext(stream, None)
            answered_at = self._clock()
            if remembered is not None and head is not None and head == remembered[0]:
                check = asyncio.ensure_future(self._check_format(key, head))
                return _Feed(
                    kind="static",
                    key=key,
                    source="hit",
                    fmt=remembered[1],
                    stream=stream,
                    head=head,
                    fmt_check=check,
                    answered_at=answered_at,
                )
            if fmt_task is None:  # the fragment changed since it was last played
                fmt_task = asyncio.ensure_future(self._cache.get_audio_format(key))
            stored = await fmt_task
        finally:
            if fmt_task is not None and not fmt_task.done():
                fmt_task.cancel()
        self._remember(key, head, stored)
        if stored is None:
            emit(logger, "hybrid_format_unknown", logging.WARNING, key=key, assumed=_describe(self._target))
        return _Feed(
            kind="static",
            key=key,
            source="hit",
            fmt=stored or self._target,
            stream=stream,
            head=head,
            answered_at=answered_at,
        )

    def _tts_key(self, text: str) -> str:
        """``tts_cache_key`` of ``text`` for this voice/model/engine/format, remembered per text."""
        key = self._keys.get(text)
        if key is None:
            key = tts_cache_key(
                text,
                voice=self._voice,
                model=self._model,
                engine=self._tts.name,
                audio_format=self._target,
                speed=self._speed,
            )
            if len(self._keys) >= _MAX_REMEMBERED_KEYS:
                del self._keys[next(iter(self._keys))]  # the oldest entry
            self._keys[text] = key
        return key

    async def _check_format(self, key: str, head: bytes) -> AudioFormat | None:
        stored = await self._cache.get_audio_format(key)
        self._remember(key, head, stored)
        return stored

    def _remember(self, key: str, head: bytes | None, stored: AudioFormat | None) -> None:
        if head is None or stored is None:
            self._formats.pop(key, None)
            return
        if key not in self._formats and len(self._formats) >= _MAX_REMEMBERED_FORMATS:
            del self._formats[next(iter(self._formats))]  # the oldest entry
        self._formats[key] = (head, stored)

    async def _static_missing(self, turn: _Turn, slot: _Slot, key: str) -> _Feed:
        self._formats.pop(key, None)
        transcript = self._transcripts.get(key)
        if transcript is None:
            emit(
                logger,
                "static_fragment_skipped",
                logging.ERROR,
                key=key,
                reason="missing from the cache and no transcript in the manifest",
            )
            return _Feed(kind="static", key=key, source="skipped")
        emit(logger, "static_fragment_missing", logging.WARNING, key=key, fallback="tts")
        self._answered(turn, slot)  # the other items need not wait for the fallback's lookup
        return await self._resolve_tts(turn, slot, transcript, kind="static", source="tts", shown_key=key)

    async def _resolve_tts(
        self,
        turn: _Turn,
        slot: _Slot,
        text: str,
        *,
        kind: str,
        source: ItemSource,
        shown_key: str | None = None,
    ) -> _Feed:
        try:
            key = self._tts_key(text)
        except DomainError as exc:
            emit(logger, "hybrid_item_unusable", logging.ERROR, key=shown_key or "", error=str(exc))
            return _Feed(kind=kind, key=shown_key or "", source="skipped")
        shown = shown_key or key
        synthesis = self._inflight.get(key)
        if synthesis is None:
            speculative: _Synthesis | None = None
            if self._speculative and slot.index == 0 and key not in self._present:
                # The first item's request goes out while its lookup runs (the lookup's command is
                # sent first, when it is awaited below), and is cancelled if the lookup finds the audio.
                speculative = self._start_synthesis(key, text, slot.span)
            stream = await self._cache.open_audio_stream(key)
            if stream is not None:
                _remember_key(self._present, key)
                if speculative is not None and speculative.consumers == 0:
                    emit(logger, "tts_speculation_cancelled", key=key)
                    self._abandon(speculative)
                # The key covers the format (tts_cache_key): no need to ask for it.
                return _Feed(
                    kind=kind,
                    key=shown,
                    source="hit" if source == "miss" else source,
                    fmt=self._target,
                    stream=stream,
                    answered_at=self._clock(),
                )
            self._present.pop(key, None)  # expired, or never there
            synthesis = speculative or self._inflight.get(key)  # another item may have started it
            if synthesis is None:
                synthesis = self._start_synthesis(key, text, slot.span)
        return _Feed(kind=kind, key=shown, source=source, fmt=self._target, synthesis=synthesis)

    # -- synthesis and cache fill ----------------------------------------------------------------------

    def _start_synthesis(self, key: str, text: str, parent: trace.Span) -> _Synthesis:
        synthesis = _Synthesis(key, text, self._clock())
        self._inflight[key] = synthesis
        task = asyncio.create_task(self._synthesize(synthesis, parent), name="voxcore-hybrid-tts")
        synthesis.task = task
        self._syntheses.add(task)
        task.add_done_callback(self._synthesis_done)
        return synthesis

    async def _synthesize(self, synthesis: _Synthesis, parent: trace.Span) -> None:
        request = SpeechRequest(
            text=synthesis.text,
            voice=self._voice,
            model=self._model,
            audio_format=self._target,
            speed=self._speed,
        )
        # The engine's span becomes a child of the item that started the synthesis. Attached in
        # this task's own context, so nothing leaks to other tasks.
        token = otel_context.attach(trace.set_span_in_context(parent))
        stream: AsyncIterator[bytes] | None = None
        trimmer = (
            EdgeTrimmer(self._target, keep_ms=self._edge_keep_ms, threshold=self._silence_threshold)
            if self._joins
            else None
        )
        try:
            stream = self._tts.stream_speech(request)
            async for piece in stream:
                if not piece:
                    continue
                if synthesis.first_byte_at is None:
                    synthesis.first_byte_at = self._clock()
                if trimmer is not None:
                    piece = trimmer.feed(piece)  # leading silence dropped, trailing held back
                    if not piece:
                        continue
                synthesis.add(piece)
                # Let the listeners take the piece now: an engine with more data already buffered
                # would otherwise go on reading (and converting) before anyone hears the first one.
                await asyncio.sleep(0)
            tail = trimmer.flush() if trimmer is not None else b""
            if tail:
                synthesis.add(tail)
            if not synthesis.pieces:
                raise TTSError("the engine returned no audio")
        except asyncio.CancelledError:
            synthesis.fail(TTSError("synthesis cancelled"))
            raise
        except Exception as exc:
            synthesis.fail(exc)
            emit(
                logger,
                "tts_synthesis_failed",
                logging.WARNING,
                key=synthesis.key,
                error=str(exc) or type(exc).__name__,
                error_type=type(exc).__name__,
                bytes=sum(map(len, synthesis.pieces)),
            )
        else:
            if synthesis.settled.is_set():  # abandoned meanwhile: not to be cached
                return
            # Scheduled before the consumers see the end, so drain()/shutdown() always find it.
            chunks = list(Rechunker(self._target, self._chunk_ms).rechunk(synthesis.pieces))
            self._schedule_fill(synthesis, chunks, parent)
            synthesis.finish()
        finally:
            if not synthesis.finished and self._inflight.get(synthesis.key) is synthesis:
                del self._inflight[synthesis.key]
            try:
                await _aclose(stream)
            finally:
                otel_context.detach(token)

    def _synthesis_done(self, task: asyncio.Task[None]) -> None:
        self._syntheses.discard(task)
        _log_failure(task)

    def _close_later(self, feed: _Feed) -> None:
        """Close the stream (and its format check) of a feed nobody will play."""
        if feed.fmt_check is not None:
            feed.fmt_check.cancel()
        if feed.stream is not None:
            task = asyncio.create_task(feed.stream.aclose(), name="voxcore-hybrid-close")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _release(self, synthesis: _Synthesis) -> asyncio.Task[None] | None:
        """One listener less; returns the synthesis task when it was abandoned (cancelled) now."""
        synthesis.consumers -= 1
        task = synthesis.task
        if synthesis.consumers > 0 or synthesis.settled.is_set() or task is None or task.done():
            return None
        # Nobody listens any more (barge-in): stop paying for audio nobody hears. Nothing is cached.
        emit(logger, "tts_synthesis_abandoned", key=synthesis.key, bytes=sum(map(len, synthesis.pieces)))
        self._abandon(synthesis)
        return task

    def _abandon(self, synthesis: _Synthesis) -> None:
        """Cancel a synthesis nobody listens to; it is out of the single-flight table at once."""
        synthesis.fail(TTSError("synthesis cancelled"))
        if self._inflight.get(synthesis.key) is synthesis:
            del self._inflight[synthesis.key]
        if synthesis.task is not None:
            synthesis.task.cancel()

    def _schedule_fill(self, synthesis: _Synthesis, chunks: list[bytes], parent: trace.Span) -> None:
        reason = "shutdown" if self._closed else "busy" if len(self._writes) >= self._max_writes else ""
        if reason:
            emit(logger, "tts_cache_fill_skipped", logging.WARNING, key=synthesis.key, reason=reason)
            if self._inflight.get(synthesis.key) is synthesis:
                del self._inflight[synthesis.key]
            return
        task = asyncio.create_task(self._fill(synthesis, chunks, parent), name="voxcore-hybrid-cache-fill")
        self._writes.add(task)
        task.add_done_callback(self._write_done)

    async def _fill(self, synthesis: _Synthesis, chunks: list[bytes], parent: trace.Span) -> None:
        started = self._clock()
        span = self._tracer.start_span(
            "voxcore.hybrid.cache_fill",
            context=trace.set_span_in_context(parent),
            attributes={"voxcore.hybrid.fill.key": synthesis.key, "voxcore.hybrid.fill.chunks": len(chunks)},
        )
        ok = False
        error = ""
        try:
            ok = bool(await self._cache.set_audio_fragment(synthesis.key, chunks, self._target))
        except asyncio.CancelledError:
            emit(logger, "tts_cache_fill_cancelled", logging.WARNING, key=synthesis.key, chunks=len(chunks))
            span.set_attribute("voxcore.hybrid.fill.cancelled", True)
            raise
        except Exception as exc:  # the port is soft; a failing implementation must not break playback
            error = f"{type(exc).__name__}: {exc}"
        else:
            latency_ms = (self._clock() - started) * 1000.0
            fields: dict[str, Any] = {
                "key": synthesis.key,
                "chunks": len(chunks),
                "latency_ms": latency_ms,
                "ok": ok,
            }
            emit(logger, "tts_cache_fill", logging.INFO if ok else logging.WARNING, **fields)
            if ok:
                _remember_key(self._present, synthesis.key)
            span.set_attribute("voxcore.hybrid.fill.latency_ms", latency_ms)
            span.set_attribute("voxcore.hybrid.fill.ok", ok)
        finally:
            if error:
                latency_ms = (self._clock() - started) * 1000.0
                emit(
                    logger,
                    "tts_cache_fill",
                    logging.WARNING,
                    key=synthesis.key,
                    chunks=len(chunks),
                    latency_ms=latency_ms,
                    ok=False,
                    error=error,
                )
                span.set_status(Status(StatusCode.ERROR, error))
            span.end()
            if self._inflight.get(synthesis.key) is synthesis:
                del self._inflight[synthesis.key]

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        _log_failure(task)

    # -- free text -------------------------------------------------------------------------------------

    async def _feed_text(self, turn: _Turn, deltas: AsyncIterable[str]) -> None:
        splitter = SentenceSplitter(min_chars=self._sentence_min, max_chars=self._sentence_max)
        try:
            async for delta in deltas:
                for sentence in splitter.feed(delta):
                    self._append(turn, sentence)
            last = splitter.flush()
            if last is not None:
                self._append(turn, last)
        except Exception as exc:
            turn.source_error = exc
            emit(
                logger,
                "hybrid_text_failed",
                logging.WARNING,
                error=str(exc) or type(exc).__name__,
                error_type=type(exc).__name__,
                sentences=len(turn.items),
            )
        finally:
            turn.complete = True
            turn.notify()

    def _append(self, turn: _Turn, sentence: str) -> None:
        try:
            item = TTSItem(sentence)
        except PlaylistError:
            return  # nothing to say once normalized
        turn.items.append(item)
        self._launch(turn)
        turn.notify()

    # -- reporting -------------------------------------------------------------------------------------

    def _item_failed(
        self, turn: _Turn, slot: _Slot, feed: _Feed, error: BaseException, *, chunks: int
    ) -> None:
        turn.failed += 1
        what = f"{slot.index}:{feed.key or feed.kind}:failed ({type(error).__name__})"
        turn.degraded.setdefault(slot.index, what)
        emit(
            logger,
            "hybrid_item_failed",
            logging.WARNING,
            index=slot.index,
            kind=feed.kind,
            key=feed.key,
            source=feed.source,
            error=str(error) or type(error).__name__,
            error_type=type(error).__name__,
            chunks=chunks,
        )
        slot.span.record_exception(error)
        slot.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))

    def _item_done(self, turn: _Turn, slot: _Slot, feed: _Feed, *, chunks: int, converted: bool) -> None:
        synthesis = feed.synthesis
        first_byte_ms: float | None = None
        if feed.source == "silence":
            first_byte_ms = 0.0
        elif feed.answered_at is not None:
            first_byte_ms = (feed.answered_at - slot.started) * 1000.0
        elif synthesis is not None and synthesis.first_byte_at is not None:
            first_byte_ms = max(0.0, synthesis.first_byte_at - slot.started) * 1000.0
            if turn.tts_ttfb_ms is None:
                turn.tts_ttfb_ms = (synthesis.first_byte_at - synthesis.started_at) * 1000.0
        if feed.source == "skipped":
            turn.skipped += 1
            turn.degraded.setdefault(slot.index, f"{slot.index}:{feed.key or feed.kind}:skipped")
        elif feed.stream is not None:
            turn.hits += 1
        elif synthesis is not None:
            turn.misses += 1
        if feed.kind == "static" and feed.source == "tts":
            turn.degraded.setdefault(slot.index, f"{slot.index}:{feed.key}:substituted by tts")
        if feed.source not in ("skipped", "silence") and chunks:
            spoken_by = "static" if feed.kind == "static" and feed.source == "hit" else self._speaker
            turn.voices.setdefault(spoken_by, None)
        turn.converted += converted
        fields: dict[str, Any] = {
            "index": slot.index,
            "kind": feed.kind,
            "key": feed.key,
            "source": feed.source,
            "first_byte_ms": first_byte_ms,
            "chunks": chunks,
            "converted": converted,
        }
        emit(logger, "hybrid_item", **fields)
        slot.span.set_attributes({_ITEM + name: value for name, value in fields.items() if value is not None})
        slot.span.end()
        slot.reported = True

    async def _close_turn(self, turn: _Turn) -> None:
        """Cancel what still runs for the reply, release its feeds and end the spans of unplayed items."""
        turn.closed = True
        if turn.grace is not None:
            turn.grace.cancel()
            turn.grace = None
        tasks: list[asyncio.Future[Any]] = [
            task for task in (turn.feeder, *(s.task for s in turn.slots)) if task is not None
        ]
        for slot in turn.slots:
            feed = _delivered(slot.feed)
            if feed is not None and feed.fmt_check is not None:
                tasks.append(feed.fmt_check)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        abandoned: list[asyncio.Task[None]] = []
        for slot in turn.slots:
            feed = _delivered(slot.feed)
            if feed is not None and not feed.released:
                feed.released = True
                if feed.synthesis is not None:
                    stopped = self._release(feed.synthesis)
                    if stopped is not None:
                        abandoned.append(stopped)
                if feed.stream is not None:
                    await feed.stream.aclose()
            if not slot.reported:
                slot.span.set_attribute(_ITEM + "played", False)
                slot.span.end()
                slot.reported = True
        if abandoned:  # so that the engine has let go of its request when the reply is closed
            await asyncio.wait(abandoned)

    def _end_turn(self, turn: _Turn, outcome: TurnOutcome) -> None:
        if outcome == "ok" and turn.degraded:
            outcome = "degraded"
        result = HybridTurnMetrics(
            items=len(turn.slots),
            time_to_first_audio_ms=turn.first_audio_ms,
            playlist_first_audio_ms=turn.playlist_first_audio_ms,
            total_ms=(self._clock() - turn.started) * 1000.0,
            hits=turn.hits,
            misses=turn.misses,
            tts_ttfb_ms=turn.tts_ttfb_ms,
            converted=turn.converted,
            skipped=turn.skipped,
            failed=turn.failed,
            chunks=turn.chunks,
            outcome=outcome,
            degraded_items=tuple(turn.degraded[index] for index in sorted(turn.degraded)),
            voices=tuple(turn.voices),
        )
        self._last_metrics = result
        level = logging.WARNING if outcome in ("failed", "degraded") else logging.INFO
        emit(logger, "hybrid_turn", level, **result.fields())
        turn.span.set_attributes(result.span_attributes())
        if outcome == "failed":
            turn.span.set_status(Status(StatusCode.ERROR, "the reply failed"))
        turn.span.end()

    # -- lifecycle -------------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until every synthesis in flight and every background cache write has finished."""
        while self._syntheses or self._writes:
            await asyncio.wait({*self._syntheses, *self._writes})

    async def shutdown(self, *, timeout_s: float = 5.0) -> None:
        """Refuse new replies, cancel syntheses, and let pending cache writes finish.

        Returns once every write has finished, or, after ``timeout_s``, has been cancelled
        (``tts_cache_fill_cancelled`` per write). Safe to call twice.
        """
        self._closed = True
        syntheses = list(self._syntheses)
        for task in syntheses:
            task.cancel()
        if syntheses or self._closing:
            await asyncio.wait({*syntheses, *self._closing})
        writes = list(self._writes)
        cancelled = 0
        if writes:
            _, pending = await asyncio.wait(writes, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            cancelled = len(pending)
        emit(
            logger,
            "hybrid_shutdown",
            syntheses_cancelled=len(syntheses),
            writes_finished=len(writes) - cancelled,
            writes_cancelled=cancelled,
        )


def _remember_key(keys: dict[str, None], key: str) -> None:
    if key not in keys and len(keys) >= _MAX_REMEMBERED_KEYS:
        del keys[next(iter(keys))]  # the oldest entry
    keys[key] = None


async def _wait_settled(synthesis: _Synthesis) -> None:
    await synthesis.settled.wait()


def _delivered(future: asyncio.Future[_Feed]) -> _Feed | None:
    if not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result()


def _kind(item: PlaylistItem) -> str:
    if isinstance(item, StaticItem):
        return "static"
    if isinstance(item, TTSItem):
        return "tts"
    return "pause"


def _key(item: PlaylistItem) -> str:
    return item.key if isinstance(item, StaticItem) else ""


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        error = repr(task.exception())
        emit(logger, "background_task_failed", logging.ERROR, task=task.get_name(), error=error)


def _describe(fmt: AudioFormat) -> str:
    return f"{fmt.sample_rate} Hz, {fmt.channels} ch, {fmt.encoding}"


async def _aclose(stream: AsyncIterator[bytes] | None) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
