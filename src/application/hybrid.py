"""Hybrid responder: playlists of cached fragments and synthesized speech played as one 20 ms audio stream."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Coroutine, Mapping
from typing import Any, Final

from opentelemetry import metrics, trace

from voxcore.application._hybrid_report import end_turn, item_done, item_failed
from voxcore.application._hybrid_resolve import FeedResolver
from voxcore.application._hybrid_state import (
    Feed,
    Slot,
    Turn,
    delivered,
    describe,
    key_of,
    kind_of,
    log_failure,
    wait_settled,
)
from voxcore.application._hybrid_synthesis import SynthesisPool
from voxcore.application.shared_synthesis import SharedSynthesis
from voxcore.core.domain.audio import AudioFormat
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
    TTSItem,
    can_join,
    silence,
)
from voxcore.core.domain.sentences import SentenceSplitter
from voxcore.core.ports.audio import AudioConverter, StreamConverter
from voxcore.core.ports.cache import AbstractAudioCache
from voxcore.core.ports.playback import PlayedItemObserver
from voxcore.core.ports.tts import TTSEngine
from voxcore.events import emit

__all__ = ["HybridResponder"]

logger = logging.getLogger("voxcore.hybrid")

_tracer = trace.get_tracer("voxcore.hybrid")
_meter = metrics.get_meter("voxcore.hybrid")

_ITEM: Final = "voxcore.hybrid.item."
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
        shared_synthesis: Cross-worker single flight of TTS misses: a worker that finds another
            one synthesizing the same key (a short Redis lease) plays that audio from the cache
            once stored instead of synthesizing it again (see ``SharedSynthesis``). ``None``: every
            process synthesizes its own misses.
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
        shared_synthesis: SharedSynthesis | None = None,
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
        self._tts = tts
        self._converter = converter
        self._target = target_format
        self._voice = voice
        self._transcripts = {
            static_fragment_key(key): text.strip()
            for key, text in (transcripts or {}).items()
            if text and text.strip()
        }
        self._chunk_ms = chunk_ms
        self._prefetch = prefetch
        self._sentence_min = sentence_min_chars
        self._sentence_max = sentence_max_chars
        if join_pause_ms is not None and (
            isinstance(join_pause_ms, bool) or not isinstance(join_pause_ms, int) or join_pause_ms < 0
        ):
            raise ValueError(f"join_pause_ms must be a non-negative int or None, got {join_pause_ms!r}")
        # Joins are processed in signed 16-bit PCM only (every voxcore reply format); else as is.
        self._joins = join_pause_ms is not None and is_s16(target_format)
        self._edge_keep_ms = (join_pause_ms or 0) // 2
        EdgeTrimmer(target_format, keep_ms=self._edge_keep_ms, threshold=silence_threshold)  # validates
        # Trimmed audio is stored under keys of its own: never mixed with the engine's raw audio
        # (which the voice service caches under the plain key) nor with another trim.
        self._variant = f"trim{self._edge_keep_ms}/{silence_threshold}" if self._joins else ""
        self._clock = clock
        self._tracer = tracer if tracer is not None else _tracer
        self._first_audio = _first_audio_histogram(meter if meter is not None else _meter)
        self._pool = SynthesisPool(
            cache=cache,
            tts=tts,
            target_format=target_format,
            voice=voice,
            model=tts_model,
            speed=speed,
            chunk_ms=chunk_ms,
            max_writes=max_background_writes,
            trim=self._joins,
            keep_ms=self._edge_keep_ms,
            silence_threshold=silence_threshold,
            shared=shared_synthesis,
            clock=clock,
            tracer=self._tracer,
        )
        self._resolver = FeedResolver(
            cache=cache,
            pool=self._pool,
            target_format=target_format,
            voice=voice,
            model=tts_model,
            engine=tts.name,
            speed=speed,
            variant=self._variant,
            transcripts=self._transcripts,
            speculative_first_tts=speculative_first_tts,
            clock=clock,
        )
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

    def tts_cache_key(self, text: str) -> str:
        """The ``tts:*`` key this responder stores and looks up the synthesis of ``text`` under.

        It covers the voice, model, engine, target format, speed and the join trimming (trimmed
        audio has keys of its own), so a host that pre-fills the cache must use this key.

        Raises:
            DomainError: the text is empty once normalized.
        """
        return self._resolver.tts_key(text)

    @property
    def pending_writes(self) -> int:
        """Background cache writes in flight."""
        return self._pool.pending_writes

    @property
    def syntheses_in_flight(self) -> int:
        """Syntheses running now."""
        return self._pool.running

    # -- replies ---------------------------------------------------------------------------------------

    def play(
        self,
        playlist: Playlist,
        *,
        turn_started_at: float | None = None,
        parent: trace.Span | None = None,
        observer: PlayedItemObserver | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Play ``playlist``: chunks of ``target_format`` in playlist order.

        ``turn_started_at`` (a reading of the responder's clock, :func:`time.perf_counter` by
        default) is when the caller's turn began, e.g. when the user stopped speaking and the LLM
        was asked: ``time_to_first_audio_ms`` is measured from it. Without it the turn starts now,
        and ``time_to_first_audio_ms`` equals ``playlist_first_audio_ms``.

        Close the generator (``aclose``, or ``contextlib.aclosing``) to stop early (barge-in): the
        lookups still in flight are cancelled and syntheses nobody else listens to are abandoned.
        ``parent`` (e.g. ``manager.call_span``) puts the reply's span in that call's trace.
        ``observer`` is called with a :class:`PlayedItem` once each item has played (after its
        last chunk, never before the first chunk leaves; e.g. ``manager.events.played_item``).

        Yields:
            ``chunk_ms`` chunks (the last one of the reply may be shorter).

        Raises:
            TypeError: ``playlist`` is not a :class:`Playlist`.
            RuntimeError: the responder is shut down (raised on the first iteration).
        """
        if not isinstance(playlist, Playlist):
            raise TypeError(f"play needs a Playlist, got {type(playlist).__name__}")
        return self._run(list(playlist.items), None, turn_started_at, parent, observer)

    def speak_text_stream(
        self,
        deltas: AsyncIterable[str],
        *,
        turn_started_at: float | None = None,
        parent: trace.Span | None = None,
        observer: PlayedItemObserver | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Speak free answer text while it streams in (``parent``, ``observer``: see :meth:`play`).

        The text is cut into sentences as it arrives (:class:`SentenceSplitter`); each sentence is
        a TTS item (cache first, synthesized on a miss, cached afterwards), so the first sentence is
        being synthesized while the model is still writing the next ones. An error raised by
        ``deltas`` is re-raised after the sentences completed before it have played (the unfinished
        sentence is not spoken). ``turn_started_at``: as in :meth:`play` (by default the turn
        starts now, so ``time_to_first_audio_ms`` includes the LLM writing the first sentence).

        Yields:
            ``chunk_ms`` chunks of ``target_format``.
        """
        return self._run([], deltas, turn_started_at, parent, observer)

    async def _run(
        self,
        items: list[PlaylistItem],
        deltas: AsyncIterable[str] | None,
        turn_started_at: float | None,
        parent: trace.Span | None = None,
        observer: PlayedItemObserver | None = None,
    ) -> AsyncGenerator[bytes, None]:
        if self._closed:
            raise RuntimeError("the hybrid responder is shut down")
        in_call = trace.set_span_in_context(parent) if parent is not None else None
        span = self._tracer.start_span("voxcore.hybrid.playlist", context=in_call)
        started = self._clock()
        turn = Turn(
            started=started,
            span=span,
            parent=trace.set_span_in_context(span),
            turn_started=started if turn_started_at is None else min(turn_started_at, started),
            observer=observer,
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
                    feed = Feed(kind=kind_of(slot.item), key=key_of(slot.item), source="skipped")
                    item_failed(turn, slot, feed, exc, chunks=0)
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
                self._last_metrics = end_turn(turn, outcome, total_ms=(self._clock() - turn.started) * 1000.0)

    async def _play_item(
        self, turn: Turn, slot: Slot, feed: Feed, rechunker: Rechunker
    ) -> AsyncGenerator[bytes, None]:
        # Not a separate task: the chunks are yielded straight from the caller's iteration.
        converter: StreamConverter | None = None
        error: BaseException | None = None
        received = 0
        if feed.source != "skipped" and feed.fmt is not None and not can_join(feed.fmt, self._target):
            try:
                converter = self._converter.stream(feed.fmt, self._target)
            except Exception as exc:  # no conversion exists: the fragment cannot be played
                item_failed(turn, slot, feed, exc, chunks=0)
                feed.source = "skipped"
                item_done(turn, slot, feed, chunks=0, converted=False, speaker=self._speaker)
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
            item_failed(turn, slot, feed, error, chunks=received)
        item_done(turn, slot, feed, chunks=received, converted=converter is not None, speaker=self._speaker)

    def _recheck_format(
        self, feed: Feed, stored: AudioFormat | None, converter: StreamConverter | None
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
            assumed=describe(feed.fmt),
            stored=describe(actual),
        )
        feed.fmt = actual
        return None if can_join(actual, self._target) else self._converter.stream(actual, self._target)

    def _count_chunk(self, turn: Turn, *, slot_source: ItemSource | None) -> None:
        turn.chunks += 1
        if turn.first_audio_ms is None:
            now = self._clock()
            elapsed = now - turn.turn_started
            turn.first_audio_ms = elapsed * 1000.0
            turn.playlist_first_audio_ms = (now - turn.started) * 1000.0
            self._first_audio.record(elapsed, {"voxcore.hybrid.first_source": slot_source or "mixed"})

    # -- scheduling ------------------------------------------------------------------------------------

    def _launch(self, turn: Turn) -> None:
        """Start producers in playlist order: item 0 alone, then up to ``prefetch`` at once."""
        while not turn.closed and len(turn.slots) < len(turn.items):
            index = len(turn.slots)
            if index > 0 and not turn.first_answered:
                return
            if index > turn.playing and turn.running >= self._prefetch:
                return
            self._start_slot(turn, index)

    async def _next_slot(self, turn: Turn, index: int) -> Slot | None:
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

    def _start_slot(self, turn: Turn, index: int) -> None:
        item = turn.items[index]
        kind = kind_of(item)
        span = self._tracer.start_span(
            "voxcore.hybrid.item",
            context=turn.parent,
            attributes={_ITEM + "index": index, _ITEM + "kind": kind, _ITEM + "key": key_of(item)},
        )
        loop = asyncio.get_running_loop()
        slot = Slot(index=index, item=item, started=self._clock(), span=span, feed=loop.create_future())
        turn.slots.append(slot)
        turn.notify()
        if isinstance(item, PauseItem):  # no I/O at all
            slot.feed.set_result(
                Feed(kind=kind, key="", source="silence", pcm=silence(self._target, item.ms))
            )
            self._answered(turn, slot)
            return
        turn.running += 1
        if index == 0:
            return  # resolved by the listener itself (_produce_inline): no task switch before the first chunk
        self._watch(turn, slot, self._produce(turn, slot))

    def _watch(self, turn: Turn, slot: Slot, work: Coroutine[Any, Any, None]) -> None:
        slot.task = asyncio.create_task(work, name=f"voxcore-hybrid-item-{slot.index}")
        slot.task.add_done_callback(functools.partial(self._producer_done, turn, slot))

    def _answered(self, turn: Turn, slot: Slot, feed: Feed | None = None) -> None:
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

    def _open_gate(self, turn: Turn) -> None:
        if turn.closed:
            return
        if turn.grace is not None:
            turn.grace.cancel()
            turn.grace = None
        if not turn.first_answered:
            turn.first_answered = True
            self._launch(turn)

    def _producer_done(self, turn: Turn, slot: Slot, task: asyncio.Task[None]) -> None:
        turn.running -= 1
        if not slot.feed.done():
            error: BaseException = (
                RuntimeError("lookup cancelled") if task.cancelled() else task.exception() or RuntimeError()
            )
            slot.feed.set_exception(error)
            slot.feed.exception()  # retrieved: the consumer may be gone already
        log_failure(task)
        if slot.index == 0:
            self._open_gate(turn)
        self._launch(turn)
        turn.notify()

    async def _produce(self, turn: Turn, slot: Slot) -> None:
        """Resolve one item to its feed (cache hit, synthesis or skip); hold the slot while it synthesizes."""
        feed = await self._resolve(turn, slot)
        if self._deliver(turn, slot, feed) and feed.synthesis is not None:
            # Keep counting against ``prefetch`` until the audio is complete: bounds TTS concurrency.
            await feed.synthesis.settled.wait()

    async def _produce_inline(self, turn: Turn, slot: Slot) -> None:
        """:meth:`_produce` for the first item, run by the listener: one task switch less."""
        try:
            feed = await self._resolve(turn, slot)
        except Exception as exc:
            slot.feed.set_exception(exc)
            turn.running -= 1
            self._open_gate(turn)
            return
        if self._deliver(turn, slot, feed) and feed.synthesis is not None:
            self._watch(turn, slot, wait_settled(feed.synthesis))
            if feed.synthesis.first_byte_at is None:
                await asyncio.sleep(0)  # the TTS request goes out before the listener sets up playback
        else:
            turn.running -= 1
            self._launch(turn)

    async def _resolve(self, turn: Turn, slot: Slot) -> Feed:
        return await self._resolver.resolve(slot, functools.partial(self._answered, turn, slot))

    def _deliver(self, turn: Turn, slot: Slot, feed: Feed) -> bool:
        """Hand the feed to the listener; False (and the feed released) when nobody waits for it."""
        if slot.feed.done():  # cancelled with the listener that awaited it
            feed.released = True
            if feed.synthesis is not None:
                feed.synthesis.consumers += 1
                self._pool.release(feed.synthesis)
            if feed.stream is not None:
                self._close_later(feed)
            return False
        if feed.synthesis is not None:
            feed.synthesis.consumers += 1  # released when the reply ends (see _close_turn)
        slot.feed.set_result(feed)
        self._answered(turn, slot, feed)
        return True

    def _close_later(self, feed: Feed) -> None:
        """Close the stream (and its format check) of a feed nobody will play."""
        if feed.fmt_check is not None:
            feed.fmt_check.cancel()
        if feed.stream is not None:
            task = asyncio.create_task(feed.stream.aclose(), name="voxcore-hybrid-close")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- free text -------------------------------------------------------------------------------------

    async def _feed_text(self, turn: Turn, deltas: AsyncIterable[str]) -> None:
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

    def _append(self, turn: Turn, sentence: str) -> None:
        try:
            item = TTSItem(sentence)
        except PlaylistError:
            return  # nothing to say once normalized
        turn.items.append(item)
        self._launch(turn)
        turn.notify()

    # -- reporting -------------------------------------------------------------------------------------

    async def _close_turn(self, turn: Turn) -> None:
        """Cancel what still runs for the reply, release its feeds and end the spans of unplayed items."""
        turn.closed = True
        if turn.grace is not None:
            turn.grace.cancel()
            turn.grace = None
        tasks: list[asyncio.Future[Any]] = [
            task for task in (turn.feeder, *(s.task for s in turn.slots)) if task is not None
        ]
        for slot in turn.slots:
            feed = delivered(slot.feed)
            if feed is not None and feed.fmt_check is not None:
                tasks.append(feed.fmt_check)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        abandoned: list[asyncio.Task[None]] = []
        for slot in turn.slots:
            feed = delivered(slot.feed)
            if feed is not None and not feed.released:
                feed.released = True
                if feed.synthesis is not None:
                    stopped = self._pool.release(feed.synthesis)
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

    # -- lifecycle -------------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until every synthesis in flight and every background cache write has finished."""
        await self._pool.drain()

    async def shutdown(self, *, timeout_s: float = 5.0) -> None:
        """Refuse new replies, cancel syntheses, and let pending cache writes finish.

        Returns once every write has finished, or, after ``timeout_s``, has been cancelled
        (``tts_cache_fill_cancelled`` per write). Safe to call twice.
        """
        self._closed = True
        syntheses = self._pool.cancel_all()
        if syntheses or self._closing:
            await asyncio.wait({*syntheses, *self._closing})
        finished, cancelled = await self._pool.finish_writes(timeout_s)
        emit(
            logger,
            "hybrid_shutdown",
            syntheses_cancelled=len(syntheses),
            writes_finished=finished,
            writes_cancelled=cancelled,
        )
