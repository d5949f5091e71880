"""Voice service: per-agent TTS policy (on/off, per-user rate limit, TTS cache) in front of the engines."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from voxcore.application.shared_synthesis import SharedSynthesis, SynthesisClaim
from voxcore.core.domain.audio import plan_chunks, split_pcm
from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.tts_text import tts_cache_key
from voxcore.core.domain.voice import (
    DEFAULT_VOICE_FORMAT,
    AgentVoiceSettings,
    InvalidSpeechRequestError,
    SpeechResult,
    prepare_speech_text,
    tts_rate_subject,
)
from voxcore.core.ports.cache import AbstractAudioCache
from voxcore.core.ports.errors import ConfigurationError, TTSError
from voxcore.core.ports.rate_limit import RateLimiter
from voxcore.core.ports.tts import SpeechRequest, TTSEngine
from voxcore.events import emit

__all__ = ["DEFAULT_AGENT_LABEL", "SpeechStream", "VoiceService"]

logger = logging.getLogger("voxcore.voice")
_tracer = trace.get_tracer("voxcore.voice")

#: How the default agent settings are named in messages (no agent id can collide with it).
DEFAULT_AGENT_LABEL: Final = "<default>"
_CLOSED: Final = "the voice service is closed"
# Unknown agent ids reported at INFO (once each); past this many, only at DEBUG (ids come from callers).
_MAX_REPORTED_UNKNOWN: Final = 256


@dataclass(slots=True)
class _Job:
    """What one accepted request needs until its stream ends."""

    agent_id: str
    settings: AgentVoiceSettings
    engine: str
    chars: int
    key: str | None
    from_cache: bool
    span: trace.Span
    clock: Callable[[], float]
    started: float
    first_byte_ms: float | None = None
    bytes: int = 0
    claim: SynthesisClaim | None = None  # the cross-worker lease while this job synthesizes

    def elapsed_ms(self) -> float:
        return round((self.clock() - self.started) * 1000.0, 3)


class _Failed:
    """What ``SpeechStream._pull`` returns when the engine failed (the result is already ended)."""

    __slots__ = ()


_FAILED: Final = _Failed()


class SpeechStream:
    """The audio of one streamed request: an async iterator of PCM chunks that never raises.

    :attr:`result` is known when the stream is returned: a refusal or failure (the stream is then
    empty), or a success (``audio`` is ``None``: the audio comes through the stream, whose first
    chunk is already fetched). If the engine fails part-way, iteration simply stops and
    :attr:`result` becomes ``engine_error``: check it after the loop before treating the audio as
    complete. A stream that ran to its end is stored in the TTS cache; one closed early is not
    (and keeps its result).

    Use it as ``async with``, so that stopping early (or being cancelled) closes the engine's
    request or process at once::

        async with await voice.stream_speech(agent_id, text, user_id) as stream:
            async for chunk in stream:
                play(chunk)
        if not stream.result.success: ...
    """

    __slots__ = ("_busy", "_job", "_parts", "_pending", "_result", "_service", "_source", "_stop")

    def __init__(
        self,
        result: SpeechResult,
        *,
        service: VoiceService | None = None,
        source: AsyncIterator[bytes] | None = None,
        job: _Job | None = None,
    ) -> None:
        self._result = result
        self._service = service
        self._source = source
        self._job = job
        self._pending: bytes | None = None
        # The chunks, kept for the cache; None when this stream will not be stored.
        self._parts: list[bytes] | None = (
            [] if job is not None and job.key is not None and not job.from_cache else None
        )
        self._busy = False
        self._stop: str | None = None

    @property
    def result(self) -> SpeechResult:
        """The outcome so far (final once iteration has ended)."""
        return self._result

    @property
    def done(self) -> bool:
        """True once the stream has nothing more to give (ended, failed, refused or closed)."""
        return self._source is None and self._pending is None

    def __aiter__(self) -> SpeechStream:
        return self

    async def __anext__(self) -> bytes:
        pending = self._pending
        if pending is not None:
            self._pending = None
            return pending
        source, job = self._source, self._job
        if source is None or job is None:
            raise StopAsyncIteration
        if self._stop is not None:
            await self._end(SpeechResult.unavailable(self._stop), event="tts_stream_closed")
            raise StopAsyncIteration
        chunk = await self._pull(source, job)
        if isinstance(chunk, _Failed):
            raise StopAsyncIteration
        if chunk is None:
            await self._complete(job)
            raise StopAsyncIteration
        self._take(chunk, job)
        return chunk

    async def aclose(self) -> None:
        """Stop early: close the engine's request/process (or the cache read); safe to call twice."""
        self._pending = None
        if self._source is not None:
            await self._end(self._result, event="tts_stream_closed")

    async def __aenter__(self) -> SpeechStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- internals -----------------------------------------------------------------------------

    def _take(self, chunk: bytes, job: _Job) -> None:
        if job.first_byte_ms is None:
            job.first_byte_ms = job.elapsed_ms()
            job.span.set_attribute("voxcore.tts.time_to_first_byte_ms", job.first_byte_ms)
        if self._parts is not None:
            self._parts.append(chunk)
        job.bytes += len(chunk)

    async def _prime(self) -> None:
        """Fetch the first chunk, so that a failure before any audio is a result, not a stream."""
        source, job = self._source, self._job
        assert source is not None and job is not None
        chunk = await self._pull(source, job)
        if isinstance(chunk, _Failed):
            return
        if chunk is None:
            await self._end(SpeechResult.engine_error("the engine produced no audio"), event="tts_failed")
            return
        if self._stop is not None:
            await self._end(SpeechResult.unavailable(self._stop), event="tts_stream_closed")
            return
        self._take(chunk, job)
        self._pending = chunk

    async def _pull(self, source: AsyncIterator[bytes], job: _Job) -> bytes | None | _Failed:
        """The engine's next chunk inside the request's span; ``None`` at the end; ``_FAILED`` (the
        result already ended as a failure) when the engine raised."""
        self._busy = True
        try:
            with trace.use_span(
                job.span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                return await _next_chunk(source)
        except Exception as exc:
            await self._end(_failure(exc, job), event="tts_failed")
            return _FAILED
        finally:
            self._busy = False

    async def _complete(self, job: _Job) -> None:
        stored = False
        service = self._service
        if self._parts is not None and job.key is not None and service is not None:
            stored = await service._store(job, self._parts)
        self._parts = None
        await self._end(self._result, event="tts_synthesized", stored=stored)

    async def _end(self, result: SpeechResult, *, event: str, stored: bool = False) -> None:
        """Finish: close the source, log once, end the span, leave the service's open set."""
        source, self._source = self._source, None
        self._pending = None
        self._parts = None
        self._result = result
        job = self._job
        if source is not None:
            await _close_quietly(source)
        if self._service is not None:
            self._service._streams.discard(self)
            if job is not None and job.claim is not None:
                await self._service._release_claim(job)  # after the cache write (or the failure)
        if job is None:
            return
        ms = job.elapsed_ms()
        span = job.span
        span.set_attribute("voxcore.tts.reason", result.reason)
        span.set_attribute("voxcore.tts.bytes", job.bytes)
        if event == "tts_synthesized":
            emit(
                logger,
                "tts_synthesized",
                logging.INFO,
                agent=job.agent_id,
                engine=job.engine,
                chars=job.chars,
                ms=ms,
                from_cache=job.from_cache,
                first_byte_ms=job.first_byte_ms,
                bytes=job.bytes,
                cached=stored,
            )
        elif event == "tts_failed":
            _report_failure(job, result, span)
        else:
            emit(
                logger,
                "tts_stream_closed",
                logging.DEBUG,
                agent=job.agent_id,
                engine=job.engine,
                reason=result.reason,
                ms=ms,
            )
        span.end()


class VoiceService:
    """Speaks agents' replies by their voice settings: the policy in front of the TTS engines.

    Each request goes through, in order: the agent's settings (``unknown_agent``, ``disabled``),
    the text and user id (``invalid_request``), the agent's engine (``unavailable``), the user's
    rate limit (``rate_limited``; every request that gets this far counts, cached or not), the TTS
    cache (``cache_hit``), and the engine (``ok`` or ``engine_error``). The engine speaks the
    normalized text, so every text sharing a cache key sounds exactly like its cached audio. A
    complete synthesis is stored in the cache (in ``cache_chunk_ms`` chunks, like static audio); a
    failed or interrupted one never is.

    Nothing raises out of a request (cancellation aside), and only real failures make noise: a
    text-only agent is a normal outcome (``tts_skipped_disabled`` at DEBUG), an engine failure is
    one ``tts_failed`` WARNING. Callers branch on ``result.reason`` and need not log themselves.

    Events (logger ``voxcore.voice``):

    * ``voice_service_ready`` INFO ``{agents, tts_agents, engines}`` - :meth:`start` passed.
    * ``tts_synthesized`` INFO ``{agent, engine, chars, ms, from_cache, first_byte_ms, bytes, cached}``.
    * ``tts_failed`` WARNING ``{agent, engine, error, transient}`` - the engine failed.
    * ``tts_unknown_agent`` INFO ``{agent}`` - once per agent id (later ones at DEBUG).
    * ``tts_skipped_disabled`` DEBUG ``{agent}``; ``tts_refused`` DEBUG ``{agent, reason, error}``.
    * ``tts_rate_limit_error`` / ``tts_cache_error`` WARNING ``{agent, error}`` - a port raised
      although ports are soft: the request goes on without it (fail-open, cache miss).
    * ``tts_stream_closed`` DEBUG ``{agent, engine, reason, ms}`` - a stream closed before its end.

    Args:
        agents: Voice settings by agent id.
        engines: Engines by the name agents use in ``AgentVoiceSettings.engine``. They belong to
            whoever built them: :meth:`aclose` does not close them (nor the cache or the limiter).
        default_agent: Settings for agents not in ``agents``; ``None`` answers ``unknown_agent``.
        rate_limiter: Per-user limit (subject ``tts:<user_id>``); ``None`` for no limit.
        cache: TTS cache (``tts:*`` keys from ``tts_cache_key``); ``None`` for no caching.
        shared_synthesis: Cross-worker single flight of cache misses (a short lease per key, see
            ``SharedSynthesis``): a request that finds another worker synthesizing the same key
            plays that audio from the cache once stored (``cache_hit``) instead of synthesizing it
            again. ``None``: every process synthesizes its own misses.
        clock: Monotonic seconds, for durations.
        tracer: OpenTelemetry tracer (default: the ``voxcore.voice`` one).
        check_timeout_s: Longest wait for one engine's ``check()`` in :meth:`start`.
        cache_chunk_ms: Chunk length of the audio stored in the cache.

    Raises:
        ConfigurationError: an argument has the wrong type (e.g. settings that are not
            ``AgentVoiceSettings``).
    """

    def __init__(
        self,
        *,
        agents: Mapping[str, AgentVoiceSettings],
        engines: Mapping[str, TTSEngine],
        default_agent: AgentVoiceSettings | None = None,
        rate_limiter: RateLimiter | None = None,
        cache: AbstractAudioCache | None = None,
        shared_synthesis: SharedSynthesis | None = None,
        clock: Callable[[], float] = time.perf_counter,
        tracer: trace.Tracer | None = None,
        check_timeout_s: float = 10.0,
        cache_chunk_ms: int = 20,
    ) -> None:
        for agent_id, settings in agents.items():
            if not isinstance(agent_id, str) or not agent_id:
                raise ConfigurationError(
                    f"voice agents: agent ids must be non-empty strings, got {agent_id!r}"
                )
            if not isinstance(settings, AgentVoiceSettings):
                raise ConfigurationError(
                    f"voice agents: settings of {agent_id!r} must be AgentVoiceSettings, "
                    f"got {type(settings).__name__}"
                )
        if default_agent is not None and not isinstance(default_agent, AgentVoiceSettings):
            raise ConfigurationError(
                f"default_agent must be AgentVoiceSettings or None, got {type(default_agent).__name__}"
            )
        for name, engine in engines.items():
            if not isinstance(engine, TTSEngine):
                raise ConfigurationError(
                    f"TTS engine {name!r} must be a TTSEngine, got {type(engine).__name__}"
                )
        if not check_timeout_s > 0:
            raise ConfigurationError(f"check_timeout_s must be positive, got {check_timeout_s!r}")
        try:
            plan_chunks(DEFAULT_VOICE_FORMAT, cache_chunk_ms)
        except DomainError as exc:
            raise ConfigurationError(f"cache_chunk_ms: {exc}") from exc
        self._agents: dict[str, AgentVoiceSettings] = dict(agents)
        self._default = default_agent
        self._engines: dict[str, TTSEngine] = dict(engines)
        self._limiter = rate_limiter
        self._cache = cache
        self._shared = shared_synthesis if cache is not None else None
        self._clock = clock
        self._tracer = tracer if tracer is not None else _tracer
        self._check_timeout_s = check_timeout_s
        self._cache_chunk_ms = cache_chunk_ms
        self._streams: set[SpeechStream] = set()
        self._reported_unknown: set[str] = set()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check every engine an agent with TTS on relies on, and report all problems at once.

        Engines no enabled agent uses are not checked. Checks run concurrently.

        Raises:
            ConfigurationError: one message naming each problem and the agents it affects, e.g.
                ``TTS engine 'openai' for agents sales, support: OPENAI_API_KEY is not set: ...``;
                an agent whose engine is not configured is reported the same way.
        """
        users = self._engine_users()
        missing = [name for name in users if name not in self._engines]
        present = [name for name in users if name in self._engines]
        outcomes = await asyncio.gather(*(self._check(name) for name in present))
        problems = {name: f"not configured ({_configured(self._engines)})" for name in missing}
        problems.update((name, why) for name, why in zip(present, outcomes, strict=True) if why is not None)
        if problems:
            lines = [
                f"TTS engine {name!r} for {_agents_phrase(users[name])}: {problems[name]}"
                for name in sorted(problems)
            ]
            head = "TTS is not ready" if len(lines) == 1 else f"TTS is not ready ({len(lines)} problems)"
            raise ConfigurationError(f"{head}: " + "; ".join(lines))
        emit(
            logger,
            "voice_service_ready",
            agents=len(self._agents),
            tts_agents=sum(len(agents) for agents in users.values()),
            engines=sorted(users),
        )

    async def aclose(self) -> None:
        """Refuse new requests (``unavailable``) and close the open streams; safe to call twice.

        A stream waiting for its engine right now stops as soon as that chunk arrives. The engines,
        the cache and the rate limiter are left open: they belong to whoever passed them in.
        """
        self._closed = True
        for stream in list(self._streams):
            if stream._busy:
                stream._stop = _CLOSED
            else:
                await stream._end(SpeechResult.unavailable(_CLOSED), event="tts_stream_closed")

    # -- queries ---------------------------------------------------------------------------------

    def settings_for(self, agent_id: str) -> AgentVoiceSettings | None:
        """The settings requests for ``agent_id`` use (its own, else the default), or ``None``."""
        return self._agents.get(agent_id, self._default) if isinstance(agent_id, str) else None

    def tts_enabled(self, agent_id: str) -> bool:
        """True when requests for ``agent_id`` would be spoken (so a caller can skip the text work)."""
        settings = self.settings_for(agent_id)
        return settings is not None and settings.tts_enabled

    # -- requests --------------------------------------------------------------------------------

    async def synthesize_speech(self, agent_id: str, text: str, user_id: str) -> SpeechResult:
        """Speak ``text`` as ``agent_id`` for ``user_id`` and return the whole utterance.

        Args:
            agent_id: The agent whose voice settings apply.
            text: What to say (normalized before synthesis; at most the agent's ``max_chars``).
            user_id: Whose rate limit the request counts against.

        Returns:
            ``ok``/``cache_hit`` with ``audio`` in the agent's format, or why there is none
            (``disabled``, ``unknown_agent``, ``invalid_request``, ``rate_limited`` with
            ``retry_after_s``, ``engine_error``, ``unavailable``). Never raises (cancellation aside).
        """
        stream = await self._open(agent_id, text, user_id, whole=True)
        if stream.done:
            return stream.result
        async with stream:
            audio = b"".join([chunk async for chunk in stream])
        result = stream.result
        if not result.success or result.audio_format is None:
            return result
        return SpeechResult.ok(audio, result.audio_format, from_cache=result.from_cache)

    async def stream_speech(self, agent_id: str, text: str, user_id: str) -> SpeechStream:
        """Like :meth:`synthesize_speech`, for low latency: the audio as it is produced.

        The same checks run first; the stream is returned once its first chunk has arrived (so a
        failure before any audio is already in ``stream.result``). See :class:`SpeechStream`.

        Returns:
            The stream; empty, with the reason in ``stream.result``, when there is no audio.
            Never raises (cancellation aside).
        """
        return await self._open(agent_id, text, user_id, whole=False)

    # -- internals -------------------------------------------------------------------------------

    async def _open(self, agent_id: str, text: str, user_id: str, *, whole: bool) -> SpeechStream:
        if self._closed:
            return SpeechStream(SpeechResult.unavailable(_CLOSED))
        settings = self.settings_for(agent_id)
        if settings is None:
            self._report_unknown(agent_id)
            return SpeechStream(SpeechResult.unknown_agent(agent_id))
        if not settings.tts_enabled:
            # A text-only agent is configuration working as intended: no warning, no span.
            emit(logger, "tts_skipped_disabled", logging.DEBUG, agent=agent_id)
            return SpeechStream(SpeechResult.disabled(agent_id))
        try:
            spoken = prepare_speech_text(text, max_chars=settings.max_chars)
            subject = tts_rate_subject(user_id)
        except InvalidSpeechRequestError as exc:
            return self._refuse(agent_id, SpeechResult.invalid_request(str(exc)))
        engine = self._engines.get(settings.engine)
        if engine is None:
            error = f"TTS engine {settings.engine!r} is not configured ({_configured(self._engines)})"
            emit(
                logger,
                "tts_failed",
                logging.WARNING,
                agent=agent_id,
                engine=settings.engine,
                error=error,
                transient=False,
            )
            return SpeechStream(SpeechResult.unavailable(error))

        span = self._tracer.start_span(
            "tts.speak",
            attributes={
                "voxcore.tts.agent": agent_id,
                "voxcore.tts.engine": engine.name,
                "voxcore.tts.voice": settings.voice,
                "voxcore.tts.chars": len(spoken),
            },
        )
        job = _Job(
            agent_id, settings, engine.name, len(spoken), None, False, span, self._clock, self._clock()
        )
        admitted: SpeechResult | AsyncIterator[bytes]
        try:
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                admitted = await self._admit(job, engine, spoken, subject, whole=whole)
        except Exception as exc:  # a bug: the ports' own failures are handled in _admit
            span.record_exception(exc)
            admitted = SpeechResult.engine_error(f"speech request failed: {_describe(exc)}")
        except BaseException:
            span.end()
            raise
        if isinstance(admitted, SpeechResult):
            if job.claim is not None:  # a lease taken for a synthesis that will not happen
                await self._release_claim(job)
            return self._end_early(job, admitted)
        span.set_attribute("voxcore.tts.from_cache", job.from_cache)
        stream = SpeechStream(
            SpeechResult.ok(None, settings.audio_format, from_cache=job.from_cache),
            service=self,
            source=admitted,
            job=job,
        )
        self._streams.add(stream)
        try:
            await stream._prime()
        except BaseException:  # cancelled while waiting for the first chunk
            await stream._end(
                SpeechResult.unavailable("the request was cancelled"), event="tts_stream_closed"
            )
            raise
        return stream

    async def _admit(
        self, job: _Job, engine: TTSEngine, spoken: str, subject: str, *, whole: bool
    ) -> SpeechResult | AsyncIterator[bytes]:
        """Rate limit, cache, engine: the audio source, or why there is none (span current)."""
        refused = await self._rate_limit(job, subject)
        if refused is not None:
            return refused
        settings = job.settings
        job.key = self._cache_key(job, spoken)
        source = await self._cached(job, whole=whole)
        if source is None:
            source = await self._claim(job, whole=whole)
        if self._closed:  # closed while the limiter or the cache were answering
            if source is not None:
                await _close_quietly(source)
            return SpeechResult.unavailable(_CLOSED)
        if source is not None:
            job.from_cache = True
            return source
        request = SpeechRequest(
            text=spoken,
            voice=settings.voice,
            model=settings.model,
            audio_format=settings.audio_format,
            speed=float(settings.speed),
        )
        try:
            return engine.stream_speech(request)
        except Exception as exc:  # an engine that fails before returning its stream
            return _failure(exc, job)

    def _end_early(self, job: _Job, result: SpeechResult) -> SpeechStream:
        """A request that ends before any audio source was opened."""
        job.span.set_attribute("voxcore.tts.reason", result.reason)
        if result.reason == "engine_error":
            _report_failure(job, result, job.span)
            job.span.end()
            return SpeechStream(result)
        job.span.end()
        return self._refuse(job.agent_id, result)

    async def _rate_limit(self, job: _Job, subject: str) -> SpeechResult | None:
        limiter = self._limiter
        if limiter is None:
            return None
        try:
            decision = await limiter.acquire(subject)
        except ValueError as exc:
            return SpeechResult.invalid_request(f"user_id cannot be rate limited: {exc}")
        except Exception as exc:
            # The port is soft by contract; one that raises anyway does not get to block speech.
            emit(logger, "tts_rate_limit_error", logging.WARNING, agent=job.agent_id, error=_describe(exc))
            return None
        if decision.allowed:
            return None
        return SpeechResult.rate_limited(decision.retry_after_s)

    def _cache_key(self, job: _Job, spoken: str) -> str | None:
        if self._cache is None:
            return None
        settings = job.settings
        try:
            return tts_cache_key(
                spoken,
                voice=settings.voice,
                model=settings.model,
                engine=job.engine,
                audio_format=settings.audio_format,
                speed=settings.speed,
            )
        except DomainError as exc:  # e.g. an engine whose ``name`` is not a usable string
            emit(logger, "tts_cache_error", logging.WARNING, agent=job.agent_id, error=_describe(exc))
            return None

    async def _cached(self, job: _Job, *, whole: bool) -> AsyncIterator[bytes] | None:
        """The cached audio for ``job.key`` as a chunk source, or ``None`` on a miss."""
        cache, key = self._cache, job.key
        if cache is None or key is None:
            return None
        try:
            if whole:
                chunks = await cache.get_audio_chunks(key)
                return _iterate(chunks) if chunks else None
            return await cache.open_audio_stream(key)
        except Exception as exc:  # the port is soft by contract: treat a raising cache as a miss
            emit(logger, "tts_cache_error", logging.WARNING, agent=job.agent_id, error=_describe(exc))
            return None

    async def _claim(self, job: _Job, *, whole: bool) -> AsyncIterator[bytes] | None:
        """After a miss: take the key's lease (synthesize), or another worker's audio once stored."""
        shared, key = self._shared, job.key
        if shared is None or key is None:
            return None
        try:
            claim = await shared.claim(key)
        except Exception as exc:  # the ports are soft; one that raises must not block speech
            emit(logger, "tts_cache_error", logging.WARNING, agent=job.agent_id, error=_describe(exc))
            return None
        if claim.stream is None:
            job.claim = claim  # released when the stream ends, after its cache write
            return None
        if not whole:
            return claim.stream
        try:
            chunks = [chunk async for chunk in claim.stream]
        finally:
            await claim.stream.aclose()
        return _iterate(chunks) if chunks else None

    async def _release_claim(self, job: _Job) -> None:
        claim, job.claim = job.claim, None
        if self._shared is not None and claim is not None:
            try:
                await self._shared.release(claim)
            except Exception as exc:  # soft, like every port here
                emit(logger, "tts_cache_error", logging.WARNING, agent=job.agent_id, error=_describe(exc))

    async def _store(self, job: _Job, parts: list[bytes]) -> bool:
        """Put a complete synthesis into the cache, in ``cache_chunk_ms`` chunks."""
        cache, key = self._cache, job.key
        if cache is None or key is None:
            return False
        fmt = job.settings.audio_format
        chunks = split_pcm(b"".join(parts), plan_chunks(fmt, self._cache_chunk_ms))
        try:
            return await cache.set_audio_fragment(key, chunks, fmt)
        except Exception as exc:
            emit(logger, "tts_cache_error", logging.WARNING, agent=job.agent_id, error=_describe(exc))
            return False

    async def _check(self, name: str) -> str | None:
        """What is wrong with engine ``name`` (its ``check()``), or ``None``."""
        try:
            async with asyncio.timeout(self._check_timeout_s):
                await self._engines[name].check()
        except ConfigurationError as exc:
            return str(exc) or type(exc).__name__
        except TimeoutError:
            return f"its check did not answer within {self._check_timeout_s} s"
        except Exception as exc:
            return f"its check failed: {_describe(exc)}"
        return None

    def _engine_users(self) -> dict[str, list[str]]:
        """Agents with TTS on, by the engine they use (the default settings as ``<default>``)."""
        users: dict[str, list[str]] = {}
        entries: Iterable[tuple[str, AgentVoiceSettings]] = self._agents.items()
        if self._default is not None:
            entries = [*entries, (DEFAULT_AGENT_LABEL, self._default)]
        for agent_id, settings in entries:
            if settings.tts_enabled:
                users.setdefault(settings.engine, []).append(agent_id)
        return users

    def _refuse(self, agent_id: str, result: SpeechResult) -> SpeechStream:
        emit(logger, "tts_refused", logging.DEBUG, agent=agent_id, reason=result.reason, error=result.error)
        return SpeechStream(result)

    def _report_unknown(self, agent_id: object) -> None:
        key = agent_id if isinstance(agent_id, str) else repr(agent_id)
        if key in self._reported_unknown or len(self._reported_unknown) >= _MAX_REPORTED_UNKNOWN:
            emit(logger, "tts_unknown_agent", logging.DEBUG, agent=key)
            return
        self._reported_unknown.add(key)
        emit(logger, "tts_unknown_agent", logging.INFO, agent=key)


def _report_failure(job: _Job, result: SpeechResult, span: trace.Span) -> None:
    """One ``tts_failed`` WARNING and an error status on the request's span."""
    emit(
        logger,
        "tts_failed",
        logging.WARNING,
        agent=job.agent_id,
        engine=job.engine,
        error=result.error,
        transient=result.transient,
    )
    span.set_status(Status(StatusCode.ERROR, result.error or "speech synthesis failed"))


async def _next_chunk(source: AsyncIterator[bytes]) -> bytes | None:
    """The next non-empty chunk, or ``None`` at the end."""
    while True:
        chunk = await anext(source, None)
        if chunk is None or chunk:
            return chunk


async def _close_quietly(source: AsyncIterator[bytes]) -> None:
    """Close an engine stream or a cache read; a broken one must not break the caller's cleanup."""
    closer = getattr(source, "aclose", None)
    if closer is None:
        return
    try:
        await closer()
    except Exception as exc:
        emit(logger, "tts_source_close_failed", logging.DEBUG, error=_describe(exc))


async def _iterate(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _failure(exc: Exception, job: _Job) -> SpeechResult:
    if job.from_cache:
        return SpeechResult.engine_error(f"cached audio could not be read: {_describe(exc)}", transient=True)
    if isinstance(exc, TTSError):
        return SpeechResult.engine_error(str(exc) or type(exc).__name__, transient=exc.transient)
    return SpeechResult.engine_error(f"{job.engine} failed: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _configured(engines: Mapping[str, Any]) -> str:
    return "configured: " + ", ".join(sorted(engines)) if engines else "no TTS engine is configured"


def _agents_phrase(agents: list[str]) -> str:
    names = sorted(agents)
    return ("agent " if len(names) == 1 else "agents ") + ", ".join(names)
