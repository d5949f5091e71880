"""Speech synthesis for hybrid replies: one synthesis per ``tts:*`` key shared by every listener
(single flight), edge silence trimmed for seamless joins, and the result cached in the background.

Private to :mod:`voxcore.application.hybrid`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from voxcore.application._hybrid_state import (
    Synthesis,
    aclose_stream,
    log_failure,
    remember_key,
)
from voxcore.application.shared_synthesis import SharedSynthesis
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.joins import EdgeTrimmer
from voxcore.core.domain.playlist import Rechunker
from voxcore.core.ports.cache import AbstractAudioCache, AudioChunkStream
from voxcore.core.ports.errors import TTSError
from voxcore.core.ports.tts import SpeechRequest, TTSEngine
from voxcore.events import emit

logger = logging.getLogger("voxcore.hybrid")


class SynthesisPool:
    """The syntheses of one responder: started, shared, trimmed, abandoned, cached.

    A synthesis is registered under its ``tts:*`` key from its start until its cache write has
    finished, so concurrent misses of one key share it. Its pieces have their edge silence cut to
    ``keep_ms`` (``trim``) before anyone hears them and before they are cached. Once complete it is
    stored in ``chunk_ms`` chunks by a background task, at most ``max_writes`` at once
    (``tts_cache_fill_skipped`` beyond). ``present`` remembers keys lately found in or written
    to the cache (the responder speculates only on the others).

    Args:
        cache: Where syntheses are stored.
        tts: The engine.
        target_format: The format asked of the engine and stored.
        voice: Engine voice.
        model: Engine model.
        speed: Speaking rate.
        chunk_ms: Chunk length stored.
        max_writes: Background cache writes in flight at most.
        trim: Cut the edge silence of each synthesis.
        keep_ms: Longest edge silence kept when trimming.
        silence_threshold: Largest absolute sample value counted as silence.
        shared: Cross-worker single flight (a lease per key, see ``shared_synthesis``): a key another
            worker is synthesizing is taken from the cache once stored instead of synthesized again.
        clock: Monotonic seconds.
        tracer: OpenTelemetry tracer.
    """

    def __init__(
        self,
        *,
        cache: AbstractAudioCache,
        tts: TTSEngine,
        target_format: AudioFormat,
        voice: str,
        model: str,
        speed: float,
        chunk_ms: int,
        max_writes: int,
        trim: bool,
        keep_ms: int,
        silence_threshold: int,
        shared: SharedSynthesis | None = None,
        clock: Callable[[], float] = time.perf_counter,
        tracer: trace.Tracer,
    ) -> None:
        self._cache = cache
        self._tts = tts
        self._target = target_format
        self._voice = voice
        self._model = model
        self._speed = speed
        self._chunk_ms = chunk_ms
        self._max_writes = max_writes
        self._trim = trim
        self._keep_ms = keep_ms
        self._silence_threshold = silence_threshold
        self._shared = shared
        self._releases: set[asyncio.Task[None]] = set()
        self._clock = clock
        self._tracer = tracer
        self._inflight: dict[str, Synthesis] = {}
        self._syntheses: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Task[None]] = set()
        self._closed = False
        self.present: dict[str, None] = {}  # tts:* keys seen in the cache lately

    @property
    def pending_writes(self) -> int:
        """Background cache writes in flight."""
        return len(self._writes)

    @property
    def running(self) -> int:
        """Syntheses running now."""
        return len(self._syntheses)

    def get(self, key: str) -> Synthesis | None:
        """The synthesis in flight (or being cached) under ``key``."""
        return self._inflight.get(key)

    def start(self, key: str, text: str, parent: trace.Span) -> Synthesis:
        """Start synthesizing ``text`` under ``key`` (single flight); its span is a child of ``parent``."""
        synthesis = Synthesis(key, text, self._clock())
        self._inflight[key] = synthesis
        task = asyncio.create_task(self._synthesize(synthesis, parent), name="voxcore-hybrid-tts")
        synthesis.task = task
        self._syntheses.add(task)
        task.add_done_callback(self._synthesis_done)
        return synthesis

    async def _synthesize(self, synthesis: Synthesis, parent: trace.Span) -> None:
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
            EdgeTrimmer(self._target, keep_ms=self._keep_ms, threshold=self._silence_threshold)
            if self._trim
            else None
        )
        try:
            if self._shared is not None:
                # Another worker may be synthesizing this key right now: wait for its audio.
                synthesis.claim = await self._shared.claim(synthesis.key)
                if synthesis.claim.stream is not None:
                    await self._take_cached(synthesis, synthesis.claim.stream)
                    return
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
            if not synthesis.finished:
                if self._inflight.get(synthesis.key) is synthesis:
                    del self._inflight[synthesis.key]
                self._release_lease(synthesis)  # failed or abandoned: another worker may take over
            try:
                await aclose_stream(stream)
            finally:
                otel_context.detach(token)

    async def _take_cached(self, synthesis: Synthesis, stream: AudioChunkStream) -> None:
        """Feed the synthesis from another worker's cached audio (no engine call, no cache write)."""
        try:
            async for chunk in stream:
                synthesis.add(chunk)
                await asyncio.sleep(0)
        finally:
            await stream.aclose()
        if not synthesis.pieces:
            raise TTSError("the cached audio of another worker's synthesis was empty")
        remember_key(self.present, synthesis.key)
        synthesis.finish()
        if self._inflight.get(synthesis.key) is synthesis:
            del self._inflight[synthesis.key]

    def _release_lease(self, synthesis: Synthesis) -> None:
        """Free the synthesis's cross-worker lease in the background (once)."""
        claim, synthesis.claim = synthesis.claim, None
        if self._shared is None or claim is None or claim.lease is None or not claim.lease.acquired:
            return
        task = asyncio.create_task(self._shared.release(claim), name="voxcore-hybrid-lease-release")
        self._releases.add(task)
        task.add_done_callback(self._release_done)

    def _release_done(self, task: asyncio.Task[None]) -> None:
        self._releases.discard(task)
        log_failure(task)

    def _synthesis_done(self, task: asyncio.Task[None]) -> None:
        self._syntheses.discard(task)
        log_failure(task)

    def release(self, synthesis: Synthesis) -> asyncio.Task[None] | None:
        """One listener less; returns the synthesis task when it was abandoned (cancelled) now."""
        synthesis.consumers -= 1
        task = synthesis.task
        if synthesis.consumers > 0 or synthesis.settled.is_set() or task is None or task.done():
            return None
        # Nobody listens any more (barge-in): stop paying for audio nobody hears. Nothing is cached.
        emit(logger, "tts_synthesis_abandoned", key=synthesis.key, bytes=sum(map(len, synthesis.pieces)))
        self.abandon(synthesis)
        return task

    def abandon(self, synthesis: Synthesis) -> None:
        """Cancel a synthesis nobody listens to; it is out of the single-flight table at once."""
        synthesis.fail(TTSError("synthesis cancelled"))
        if self._inflight.get(synthesis.key) is synthesis:
            del self._inflight[synthesis.key]
        if synthesis.task is not None:
            synthesis.task.cancel()

    def _schedule_fill(self, synthesis: Synthesis, chunks: list[bytes], parent: trace.Span) -> None:
        reason = "shutdown" if self._closed else "busy" if len(self._writes) >= self._max_writes else ""
        if reason:
            emit(logger, "tts_cache_fill_skipped", logging.WARNING, key=synthesis.key, reason=reason)
            if self._inflight.get(synthesis.key) is synthesis:
                del self._inflight[synthesis.key]
            self._release_lease(synthesis)
            return
        task = asyncio.create_task(self._fill(synthesis, chunks, parent), name="voxcore-hybrid-cache-fill")
        self._writes.add(task)
        task.add_done_callback(self._write_done)

    async def _fill(self, synthesis: Synthesis, chunks: list[bytes], parent: trace.Span) -> None:
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
                remember_key(self.present, synthesis.key)
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
            self._release_lease(synthesis)  # the audio is in the cache (or will not be): let others go

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        log_failure(task)

    async def drain(self) -> None:
        """Wait until every synthesis in flight and every background cache write has finished."""
        while self._syntheses or self._writes or self._releases:
            await asyncio.wait({*self._syntheses, *self._writes, *self._releases})

    def cancel_all(self) -> list[asyncio.Task[None]]:
        """Refuse new cache writes and cancel every synthesis; returns their tasks (to await)."""
        self._closed = True
        syntheses = list(self._syntheses)
        for task in syntheses:
            task.cancel()
        return syntheses

    async def finish_writes(self, timeout_s: float) -> tuple[int, int]:
        """Let the pending cache writes finish, cancelling those still running after ``timeout_s``.

        Returns:
            (writes finished, writes cancelled).
        """
        writes = list(self._writes)
        pending: set[asyncio.Task[None]] = set()
        if writes:
            _, pending = await asyncio.wait(writes, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._releases:  # the leases those writes held (bounded by the client's timeouts)
            await asyncio.wait(set(self._releases))
        return len(writes) - len(pending), len(pending)
