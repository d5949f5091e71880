"""Voice policy with port fakes: settings, results, refusals, rate limit, cache, failures, streams."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterator
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from voxcore.application.voice import SpeechStream, VoiceService
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.keys import MAX_KEY_LENGTH
from voxcore.core.domain.tts_text import tts_cache_key
from voxcore.core.domain.voice import (
    DEFAULT_VOICE_FORMAT,
    AgentVoiceSettings,
    InvalidSpeechRequestError,
    InvalidVoiceSettingsError,
    SpeechResult,
    prepare_speech_text,
    tts_rate_subject,
)
from voxcore.core.ports.cache import AbstractAudioCache, AudioChunkStream, AudioLoadResult
from voxcore.core.ports.errors import ConfigurationError, TTSError
from voxcore.core.ports.rate_limit import RateLimitDecision, RateLimiter
from voxcore.core.ports.tts import SpeechRequest, TTSEngine
from voxcore.events import FIELDS_ATTR

PCM16K = AudioFormat(16_000, 1, 2)
CHUNK = b"\x01\x00" * 160  # 10 ms at 16 kHz mono s16
SALES = AgentVoiceSettings(tts_enabled=True, engine="fake", voice="alloy", model="m1", audio_format=PCM16K)
TEXT_ONLY = AgentVoiceSettings(tts_enabled=False)


# ------------------------------------------------------------------------------------------ fakes


class FakeTTSEngine(TTSEngine):
    """Yields ``chunks`` for every request; can fail before or after some chunks, or wait on a gate.

    Records the requests, and how many streams were completed, failed or closed early.
    """

    def __init__(
        self,
        *,
        name: str = "fake",
        chunks: list[bytes] | None = None,
        error: BaseException | None = None,
        error_after: int = 0,
        check_error: BaseException | None = None,
        check_delay_s: float = 0.0,
        gate_after: int | None = None,
        tracer: Any = None,
    ) -> None:
        self.name = name
        self.chunks = [CHUNK, CHUNK, CHUNK] if chunks is None else chunks
        self.error = error
        self.error_after = error_after
        self.check_error = check_error
        self.check_delay_s = check_delay_s
        self.gate_after = gate_after
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()
        self.tracer = tracer
        self.requests: list[SpeechRequest] = []
        self.checks = 0
        self.completed = 0
        self.closed_early = 0
        self.closed = False

    async def check(self) -> None:
        self.checks += 1
        if self.check_delay_s:
            await asyncio.sleep(self.check_delay_s)
        if self.check_error is not None:
            raise self.check_error

    async def aclose(self) -> None:
        self.closed = True

    async def stream_speech(self, request: SpeechRequest) -> AsyncGenerator[bytes, None]:
        self.requests.append(request)
        span = self.tracer.start_span("fake.synthesize") if self.tracer is not None else None
        sent = 0
        settled = False
        try:
            for chunk in self.chunks:
                if self.error is not None and sent == self.error_after:
                    settled = True
                    raise self.error
                if self.gate_after is not None and sent == self.gate_after:
                    self.waiting.set()
                    await self.gate.wait()
                yield chunk
                sent += 1
            settled = True
            if self.error is not None and sent == self.error_after:
                raise self.error
            self.completed += 1
        finally:
            if not settled:
                self.closed_early += 1
            if span is not None:
                span.end()


class FakeRateLimiter(RateLimiter):
    """Allows ``limit`` requests per subject, then denies with ``retry_after_s``; records subjects."""

    def __init__(self, *, limit: int = 1000, retry_after_s: float = 7.5, error: Exception | None = None):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.error = error
        self.used: dict[str, int] = {}
        self.subjects: list[str] = []

    async def acquire(self, subject: str, *, cost: int = 1) -> RateLimitDecision:
        self.subjects.append(subject)
        if self.error is not None:
            raise self.error
        used = self.used.get(subject, 0)
        if used + cost > self.limit:
            return RateLimitDecision(False, self.limit - used, self.retry_after_s, self.limit, 60.0)
        self.used[subject] = used + cost
        return RateLimitDecision(True, self.limit - used - cost, 0.0, self.limit, 60.0)

    async def aclose(self) -> None:
        pass


class _ListStream(AudioChunkStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = list(chunks)
        self.closed = False

    async def __anext__(self) -> bytes:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    async def aclose(self) -> None:
        self.closed = True


class FakeAudioCache(AbstractAudioCache):
    """``AbstractAudioCache`` in memory; ``error`` makes every call raise (breaking the soft contract)."""

    def __init__(self) -> None:
        self.audio: dict[str, list[bytes]] = {}
        self.formats: dict[str, AudioFormat] = {}
        self.error: Exception | None = None
        self.reads: list[str] = []
        self.writes: list[str] = []

    def _maybe_fail(self) -> None:
        if self.error is not None:
            raise self.error

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def load_and_set_audio(self, key: str, wav_filepath: str, chunk_size_ms: int = 20) -> bool:
        return False

    async def load_audio_file(self, key: str, wav_filepath: str, chunk_size_ms: int = 20) -> AudioLoadResult:
        return AudioLoadResult(key=key, ok=False, reason="not supported by the fake")

    async def set_audio_chunks(self, key: str, audio_chunks: list[bytes]) -> bool:
        self._maybe_fail()
        self.writes.append(key)
        self.audio[key] = list(audio_chunks)
        self.formats.pop(key, None)
        return True

    async def set_audio_fragment(
        self, key: str, audio_chunks: list[bytes], audio_format: AudioFormat
    ) -> bool:
        await self.set_audio_chunks(key, audio_chunks)
        self.formats[key] = audio_format
        return True

    async def get_audio_chunks(self, key: str) -> list[bytes] | None:
        self._maybe_fail()
        self.reads.append(key)
        chunks = self.audio.get(key)
        return list(chunks) if chunks else None

    async def open_audio_stream(self, key: str) -> AudioChunkStream | None:
        self._maybe_fail()
        self.reads.append(key)
        chunks = self.audio.get(key)
        return _ListStream(chunks) if chunks else None

    async def get_audio_format(self, key: str) -> AudioFormat | None:
        return self.formats.get(key)

    async def set_text(self, key: str, text: str, ttl_seconds: int) -> bool:
        return False

    async def get_text(self, key: str) -> str | None:
        return None


# ------------------------------------------------------------------------------------------ helpers


def make(
    *,
    engine: FakeTTSEngine | None = None,
    agents: dict[str, AgentVoiceSettings] | None = None,
    engines: dict[str, TTSEngine] | None = None,
    **kwargs: Any,
) -> VoiceService:
    engine = engine or FakeTTSEngine()
    return VoiceService(
        agents={"sales": SALES, "bot": TEXT_ONLY} if agents is None else agents,
        engines={"fake": engine} if engines is None else engines,
        **kwargs,
    )


def _fields(settings: AgentVoiceSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in AgentVoiceSettings.__dataclass_fields__}


def records(caplog: pytest.LogCaptureFixture, name: str | None = None) -> list[logging.LogRecord]:
    return [r for r in caplog.records if name is None or r.getMessage() == name]


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, FIELDS_ATTR))


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="voxcore")
    yield caplog


# ------------------------------------------------------------------------------------------ domain


def test_settings_defaults_and_text_only_agents_need_no_engine() -> None:
    assert TEXT_ONLY.engine == "" and TEXT_ONLY.audio_format == DEFAULT_VOICE_FORMAT
    assert SALES.speed == 1.0 and SALES.max_chars == 1000
    with pytest.raises(FrozenInstanceError):
        SALES.voice = "nova"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tts_enabled": 1}, "tts_enabled"),
        ({"tts_enabled": True, "engine": "", "voice": "alloy"}, "engine and a voice"),
        ({"tts_enabled": True, "engine": "openai", "voice": ""}, "engine and a voice"),
        ({"tts_enabled": True, "engine": " openai", "voice": "alloy"}, "surrounding spaces"),
        ({"tts_enabled": False, "voice": 3}, "voice must be a string"),
        ({"tts_enabled": False, "audio_format": (16000, 1, 2)}, "AudioFormat"),
        ({"tts_enabled": False, "speed": 0}, "speed"),
        ({"tts_enabled": False, "speed": float("nan")}, "speed"),
        ({"tts_enabled": False, "speed": True}, "speed"),
        ({"tts_enabled": False, "max_chars": 0}, "max_chars"),
        ({"tts_enabled": False, "max_chars": 10.0}, "max_chars"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidVoiceSettingsError, match=match):
        AgentVoiceSettings(**kwargs)


def test_results_from_class_methods_are_consistent() -> None:
    ok = SpeechResult.ok(b"ab", PCM16K)
    assert (ok.success, ok.reason, ok.from_cache, ok.error, ok.refused, ok.failed) == (
        True,
        "ok",
        False,
        None,
        False,
        False,
    )
    hit = SpeechResult.ok(b"ab", PCM16K, from_cache=True)
    assert hit.reason == "cache_hit" and hit.from_cache
    assert SpeechResult.ok(None, PCM16K).audio is None  # a streamed success
    off = SpeechResult.disabled("bot")
    assert (off.success, off.reason, off.refused, off.failed) == (False, "disabled", True, False)
    assert "disabled" in (off.error or "") and "bot" in (off.error or "")
    limited = SpeechResult.rate_limited(2.5)
    assert limited.retry_after_s == 2.5 and limited.refused
    failed = SpeechResult.engine_error("boom", transient=True)
    assert failed.failed and failed.transient and failed.audio is None
    assert SpeechResult.unavailable("closed").failed
    assert SpeechResult.unknown_agent("x").reason == "unknown_agent"
    assert SpeechResult.invalid_request("empty").reason == "invalid_request"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"success": True, "audio": b"a", "audio_format": PCM16K, "error": None, "reason": "disabled"},
        {"success": True, "audio": b"", "audio_format": PCM16K, "error": None, "reason": "ok"},
        {"success": True, "audio": b"a", "audio_format": None, "error": None, "reason": "ok"},
        {"success": False, "audio": b"a", "audio_format": None, "error": "x", "reason": "engine_error"},
        {"success": False, "audio": None, "audio_format": None, "error": None, "reason": "engine_error"},
        {"success": True, "audio": b"a", "audio_format": PCM16K, "error": None, "reason": "cache_hit"},
        {"success": False, "audio": None, "audio_format": None, "error": "x", "reason": "rate_limited"},
        {
            "success": False,
            "audio": None,
            "audio_format": None,
            "error": "x",
            "reason": "disabled",
            "transient": True,
        },
    ],
)
def test_contradictory_results_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SpeechResult(**kwargs)


def test_speech_text_is_normalized_and_bounded() -> None:
    spoken = "Итого: двенадцать тысяч пятьсот рублей."
    assert prepare_speech_text("  Итого:\u00a012500\u2009руб. ", max_chars=100) == spoken
    assert prepare_speech_text("a" * 10, max_chars=10) == "a" * 10
    with pytest.raises(InvalidSpeechRequestError, match="too long: 11 > 10"):
        prepare_speech_text("a" * 11, max_chars=10)
    with pytest.raises(InvalidSpeechRequestError, match="empty"):
        prepare_speech_text(" \u200b\n ", max_chars=10)
    with pytest.raises(InvalidSpeechRequestError, match="must be a string"):
        prepare_speech_text(b"bytes", max_chars=10)


def test_rate_subject() -> None:
    assert tts_rate_subject("u-1") == "tts:u-1"
    for bad in ("", None, 42, "x" * MAX_KEY_LENGTH):
        with pytest.raises(InvalidSpeechRequestError):
            tts_rate_subject(bad)


# ------------------------------------------------------------------------------------------ service


async def test_synthesizes_normalized_text_with_the_agents_settings(
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    engine = FakeTTSEngine()
    agents = {"sales": AgentVoiceSettings(**{**_fields(SALES), "speed": 1.25})}
    voice = make(engine=engine, agents=agents)
    result = await voice.synthesize_speech("sales", "Сумма:  12500\u00a0рублей", "u1")

    assert result.success and result.reason == "ok" and not result.from_cache
    assert result.audio == CHUNK * 3 and result.audio_format == PCM16K and result.error is None
    (request,) = engine.requests
    assert request == SpeechRequest(
        "Сумма: двенадцать тысяч пятьсот рублей", "alloy", model="m1", audio_format=PCM16K, speed=1.25
    )
    assert engine.completed == 1
    (event,) = records(debug_logs, "tts_synthesized")
    assert event.levelno == logging.INFO
    got = fields(event)
    assert {k: got[k] for k in ("agent", "engine", "chars", "from_cache", "bytes", "cached")} == {
        "agent": "sales",
        "engine": "fake",
        "chars": len("Сумма: двенадцать тысяч пятьсот рублей"),
        "from_cache": False,
        "bytes": len(CHUNK) * 3,
        "cached": False,
    }
    assert got["ms"] >= got["first_byte_ms"] >= 0
    assert not [r for r in debug_logs.records if r.levelno >= logging.WARNING]


async def test_disabled_agent_is_quiet(debug_logs: pytest.LogCaptureFixture) -> None:
    engine, limiter, cache = FakeTTSEngine(), FakeRateLimiter(), FakeAudioCache()
    voice = make(engine=engine, rate_limiter=limiter, cache=cache)
    result = await voice.synthesize_speech("bot", "Привет", "u1")
    stream = await voice.stream_speech("bot", "Привет", "u1")

    assert result == SpeechResult.disabled("bot") and stream.result == result
    assert [chunk async for chunk in stream] == []
    assert engine.requests == [] and limiter.subjects == [] and cache.reads == []
    # At most a DEBUG event: nothing an operator would see at INFO and above.
    assert [(r.getMessage(), r.levelno) for r in debug_logs.records] == [
        ("tts_skipped_disabled", logging.DEBUG)
    ] * 2
    assert not voice.tts_enabled("bot") and voice.tts_enabled("sales")


async def test_unknown_agent_and_default_settings(debug_logs: pytest.LogCaptureFixture) -> None:
    engine = FakeTTSEngine()
    voice = make(engine=engine)
    first = await voice.synthesize_speech("ghost", "Привет", "u1")
    second = await voice.synthesize_speech("ghost", "Привет", "u1")
    assert first.reason == second.reason == "unknown_agent" and "ghost" in (first.error or "")
    levels = [r.levelno for r in records(debug_logs, "tts_unknown_agent")]
    assert levels == [logging.INFO, logging.DEBUG]  # reported once, then quiet
    assert voice.settings_for("ghost") is None and engine.requests == []

    with_default = make(engine=engine, default_agent=SALES)
    result = await with_default.synthesize_speech("ghost", "Привет", "u1")
    assert result.success and with_default.settings_for("ghost") is SALES
    off_default = make(engine=engine, default_agent=TEXT_ONLY)
    assert (await off_default.synthesize_speech("ghost", "Привет", "u1")).reason == "disabled"


@pytest.mark.parametrize(
    ("text", "user", "match"),
    [
        ("", "u1", "empty"),
        (" \u200b\t", "u1", "empty"),
        ("слово " * 300, "u1", "too long"),
        (None, "u1", "must be a string"),
        ("Привет", "", "user_id"),
        ("Привет", None, "user_id"),
    ],
)
async def test_invalid_requests_are_results(
    text: Any, user: Any, match: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    engine, limiter = FakeTTSEngine(), FakeRateLimiter()
    voice = make(engine=engine, rate_limiter=limiter)
    result = await voice.synthesize_speech("sales", text, user)
    assert result.reason == "invalid_request" and not result.success
    assert match in (result.error or "")
    assert engine.requests == [] and limiter.subjects == []  # nothing spent on a request never served
    assert not [r for r in debug_logs.records if r.levelno >= logging.INFO]


async def test_rate_limited_per_user(debug_logs: pytest.LogCaptureFixture) -> None:
    engine, limiter = FakeTTSEngine(), FakeRateLimiter(limit=2, retry_after_s=12.5)
    voice = make(engine=engine, rate_limiter=limiter)
    results = [await voice.synthesize_speech("sales", f"Фраза {i}", "u1") for i in range(3)]
    other = await voice.synthesize_speech("sales", "Фраза", "u2")

    assert [r.reason for r in results] == ["ok", "ok", "rate_limited"]
    assert results[2].retry_after_s == 12.5 and "retry" in (results[2].error or "")
    assert other.success
    assert limiter.subjects == ["tts:u1", "tts:u1", "tts:u1", "tts:u2"]
    assert len(engine.requests) == 3
    assert not [r for r in debug_logs.records if r.levelno >= logging.WARNING]
    (refused,) = records(debug_logs, "tts_refused")
    assert fields(refused)["reason"] == "rate_limited"


async def test_cache_miss_stores_and_hit_skips_the_engine(debug_logs: pytest.LogCaptureFixture) -> None:
    engine, cache = FakeTTSEngine(chunks=[CHUNK * 3, CHUNK]), FakeAudioCache()  # 30 ms + 10 ms
    voice = make(engine=engine, cache=cache)
    first = await voice.synthesize_speech("sales", "Ваш заказ 12500", "u1")
    # Written differently, read alike: same normalized text, same key.
    second = await voice.synthesize_speech("sales", "Ваш  заказ 12\u00a0500", "u2")

    key = tts_cache_key("Ваш заказ 12 500", voice="alloy", model="m1", engine="fake", audio_format=PCM16K)
    assert first.reason == "ok" and second.reason == "cache_hit" and second.from_cache
    assert first.audio == second.audio == CHUNK * 4 and second.audio_format == PCM16K
    assert len(engine.requests) == 1
    # Stored in 20 ms chunks, like static audio, with the format beside it.
    assert cache.audio[key] == [CHUNK * 2, CHUNK * 2] and cache.formats[key] == PCM16K
    assert cache.writes == [key]
    assert [fields(r)["from_cache"] for r in records(debug_logs, "tts_synthesized")] == [False, True]
    assert fields(records(debug_logs, "tts_synthesized")[0])["cached"] is True


async def test_other_voice_or_format_is_another_cache_entry() -> None:
    engine, cache = FakeTTSEngine(), FakeAudioCache()
    agents = {
        "a": SALES,
        "b": AgentVoiceSettings(**{**_fields(SALES), "voice": "nova"}),
        "c": AgentVoiceSettings(**{**_fields(SALES), "audio_format": AudioFormat(8_000, 1, 2)}),
    }
    voice = make(engine=engine, cache=cache, agents=agents)
    reasons = [
        (await voice.synthesize_speech(agent, "Привет", "u1")).reason for agent in ("a", "b", "c", "a")
    ]
    assert reasons == ["ok", "ok", "ok", "cache_hit"]
    assert len(cache.audio) == 3


@pytest.mark.parametrize(
    ("error", "error_after", "transient", "message"),
    [
        (TTSError("provider answered 503", transient=True), 0, True, "provider answered 503"),
        (TTSError("bad voice"), 0, False, "bad voice"),
        (RuntimeError("socket exploded"), 0, False, "fake failed: RuntimeError: socket exploded"),
        (TTSError("stream cut short", transient=True), 2, True, "stream cut short"),
    ],
    ids=["transient-before-audio", "permanent", "unexpected-exception", "mid-stream"],
)
async def test_engine_failure_is_a_result_logged_once(
    error: Exception,
    error_after: int,
    transient: bool,
    message: str,
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    engine, cache = FakeTTSEngine(error=error, error_after=error_after), FakeAudioCache()
    voice = make(engine=engine, cache=cache)
    result = await voice.synthesize_speech("sales", "Привет", "u1")

    assert result.reason == "engine_error" and not result.success and result.audio is None
    assert result.transient is transient and result.error == message
    assert cache.writes == []  # a failed or partial synthesis is never cached
    warnings = [r for r in debug_logs.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["tts_failed"]
    assert fields(warnings[0]) == {
        "agent": "sales",
        "engine": "fake",
        "error": message,
        "transient": transient,
    }
    assert records(debug_logs, "tts_synthesized") == []


async def test_engine_without_audio_is_an_engine_error() -> None:
    voice = make(engine=FakeTTSEngine(chunks=[b"", b""]))
    result = await voice.synthesize_speech("sales", "Привет", "u1")
    assert result.reason == "engine_error" and "no audio" in (result.error or "")


async def test_unconfigured_engine_is_unavailable(debug_logs: pytest.LogCaptureFixture) -> None:
    agents = {"sales": AgentVoiceSettings(tts_enabled=True, engine="piper", voice="ru")}
    limiter = FakeRateLimiter()
    voice = make(agents=agents, rate_limiter=limiter)
    result = await voice.synthesize_speech("sales", "Привет", "u1")
    assert result.reason == "unavailable" and "'piper' is not configured (configured: fake)" in (
        result.error or ""
    )
    assert limiter.subjects == []  # the user's allowance is not spent on what cannot be served
    assert [r.getMessage() for r in debug_logs.records if r.levelno >= logging.WARNING] == ["tts_failed"]


async def test_ports_that_raise_do_not_break_requests(debug_logs: pytest.LogCaptureFixture) -> None:
    cache = FakeAudioCache()
    cache.error = ConnectionError("cache down")
    limiter = FakeRateLimiter(error=RuntimeError("limiter bug"))
    engine = FakeTTSEngine()
    voice = make(engine=engine, rate_limiter=limiter, cache=cache)
    result = await voice.synthesize_speech("sales", "Привет", "u1")
    assert result.success and result.reason == "ok"  # fail-open, cache miss, store failure: still spoken
    warnings = [
        (r.getMessage(), fields(r)["error"]) for r in debug_logs.records if r.levelno >= logging.WARNING
    ]
    assert warnings == [
        ("tts_rate_limit_error", "RuntimeError: limiter bug"),
        ("tts_cache_error", "ConnectionError: cache down"),
        ("tts_cache_error", "ConnectionError: cache down"),
    ]
    assert fields(records(debug_logs, "tts_synthesized")[0])["cached"] is False


async def test_limiter_refusing_the_subject_is_an_invalid_request() -> None:
    voice = make(rate_limiter=FakeRateLimiter(error=ValueError("subject too long")))
    result = await voice.synthesize_speech("sales", "Привет", "u1")
    assert result.reason == "invalid_request" and "subject too long" in (result.error or "")


# ------------------------------------------------------------------------------------------ streaming


async def test_stream_returns_at_the_first_chunk_and_caches_at_the_end() -> None:
    engine, cache = FakeTTSEngine(chunks=[CHUNK, CHUNK, CHUNK], gate_after=1), FakeAudioCache()
    voice = make(engine=engine, cache=cache)
    async with asyncio.timeout(5):
        stream = await voice.stream_speech("sales", "Привет", "u1")
    assert not stream.done
    assert stream.result.success and stream.result.audio is None and stream.result.audio_format == PCM16K
    got = [await anext(stream)]
    second = asyncio.create_task(anext(stream))
    async with asyncio.timeout(5):
        await engine.waiting.wait()
    # The first chunk was delivered while the engine is still held before its second one.
    assert got == [CHUNK] and not second.done()
    engine.gate.set()
    got.append(await second)
    async with stream:
        got += [chunk async for chunk in stream]
    assert got == [CHUNK] * 3 and stream.done and stream.result.reason == "ok"
    assert list(cache.audio.values()) == [[CHUNK * 2, CHUNK]]

    cached = await voice.stream_speech("sales", "Привет", "u1")
    async with cached:
        assert b"".join([chunk async for chunk in cached]) == CHUNK * 3
    assert cached.result.reason == "cache_hit" and len(engine.requests) == 1


async def test_stream_failure_mid_way_stops_quietly_with_the_reason() -> None:
    engine, cache = FakeTTSEngine(error=TTSError("cut", transient=True), error_after=2), FakeAudioCache()
    voice = make(engine=engine, cache=cache)
    stream = await voice.stream_speech("sales", "Привет", "u1")
    async with stream:
        got = [chunk async for chunk in stream]  # no exception
    assert got == [CHUNK, CHUNK]
    assert stream.result.reason == "engine_error" and stream.result.transient
    assert cache.writes == []


async def test_stream_failure_before_audio_is_known_at_once() -> None:
    voice = make(engine=FakeTTSEngine(error=TTSError("401 bad key")))
    stream = await voice.stream_speech("sales", "Привет", "u1")
    assert stream.done and stream.result.reason == "engine_error" and stream.result.error == "401 bad key"
    assert [chunk async for chunk in stream] == []


async def test_closing_a_stream_early_closes_the_engine_and_caches_nothing() -> None:
    engine, cache = FakeTTSEngine(chunks=[CHUNK] * 5), FakeAudioCache()
    voice = make(engine=engine, cache=cache)
    async with await voice.stream_speech("sales", "Привет", "u1") as stream:
        async for _chunk in stream:
            break
    assert engine.closed_early == 1 and engine.completed == 0
    assert stream.done and stream.result.reason == "ok"  # the caller chose to stop: nothing failed
    assert cache.writes == []
    await stream.aclose()  # twice is fine


async def test_cancelled_request_closes_the_engine_stream() -> None:
    engine = FakeTTSEngine(gate_after=1)
    voice = make(engine=engine)
    task = asyncio.create_task(voice.synthesize_speech("sales", "Привет", "u1"))
    async with asyncio.timeout(5):
        await engine.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.closed_early == 1 and voice._streams == set()


async def test_aclose_ends_open_streams_and_refuses_new_requests() -> None:
    engine = FakeTTSEngine(chunks=[CHUNK] * 5)
    voice = make(engine=engine)
    stream = await voice.stream_speech("sales", "Привет", "u1")
    await voice.aclose()
    assert stream.done and stream.result.reason == "unavailable"
    assert [chunk async for chunk in stream] == []
    assert engine.closed_early == 1 and not engine.closed  # the engine belongs to its builder
    after = await voice.synthesize_speech("sales", "Привет", "u1")
    assert after.reason == "unavailable" and "closed" in (after.error or "")
    await voice.aclose()


async def test_aclose_stops_a_stream_that_is_waiting_for_its_engine() -> None:
    engine = FakeTTSEngine(chunks=[CHUNK] * 4, gate_after=2)
    voice = make(engine=engine)
    stream = await voice.stream_speech("sales", "Привет", "u1")
    got = [await anext(stream), await anext(stream)]
    pending = asyncio.create_task(anext(stream))
    async with asyncio.timeout(5):
        await engine.waiting.wait()
    await voice.aclose()  # the stream is inside the engine right now: it stops after this chunk
    engine.gate.set()
    got.append(await pending)
    got += [chunk async for chunk in stream]
    assert got == [CHUNK] * 3 and stream.result.reason == "unavailable"
    assert engine.closed_early == 1


# ------------------------------------------------------------------------------------------ start


async def test_start_reports_every_problem_with_the_agents_affected() -> None:
    openai = FakeTTSEngine(name="openai", check_error=ConfigurationError("OPENAI_API_KEY is not set"))
    espeak = FakeTTSEngine(name="espeak-ng", check_error=ConfigurationError("espeak-ng not found on PATH"))
    unused = FakeTTSEngine(name="unused", check_error=ConfigurationError("never checked"))
    agents = {
        "support": AgentVoiceSettings(tts_enabled=True, engine="openai", voice="alloy"),
        "sales": AgentVoiceSettings(tts_enabled=True, engine="openai", voice="nova"),
        "ru": AgentVoiceSettings(tts_enabled=True, engine="espeak-ng", voice="ru"),
        "piper-bot": AgentVoiceSettings(tts_enabled=True, engine="piper", voice="ru"),
        "quiet": AgentVoiceSettings(tts_enabled=False, engine="unused", voice="x"),
    }
    voice = VoiceService(
        agents=agents,
        engines={"openai": openai, "espeak-ng": espeak, "unused": unused},
        default_agent=AgentVoiceSettings(tts_enabled=True, engine="openai", voice="alloy"),
    )
    with pytest.raises(ConfigurationError) as info:
        await voice.start()
    message = str(info.value)
    assert message.startswith("TTS is not ready (3 problems): ")
    assert "TTS engine 'openai' for agents <default>, sales, support: OPENAI_API_KEY is not set" in message
    assert "TTS engine 'espeak-ng' for agent ru: espeak-ng not found on PATH" in message
    assert (
        "TTS engine 'piper' for agent piper-bot: not configured (configured: espeak-ng, openai, unused)"
        in (message)
    )
    assert "never checked" not in message and unused.checks == 0
    assert openai.checks == espeak.checks == 1  # once per engine, however many agents use it


async def test_start_reports_failing_and_hanging_checks() -> None:
    broken = FakeTTSEngine(name="a", check_error=OSError("permission denied"))
    slow = FakeTTSEngine(name="b", check_delay_s=5)
    voice = VoiceService(
        agents={
            "x": AgentVoiceSettings(tts_enabled=True, engine="a", voice="v"),
            "y": AgentVoiceSettings(tts_enabled=True, engine="b", voice="v"),
        },
        engines={"a": broken, "b": slow},
        check_timeout_s=0.05,
    )
    with pytest.raises(ConfigurationError) as info:
        await voice.start()
    assert "TTS engine 'a' for agent x: its check failed: OSError: permission denied" in str(info.value)
    assert "TTS engine 'b' for agent y: its check did not answer within 0.05 s" in str(info.value)


async def test_start_passes_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.voice")
    engine = FakeTTSEngine()
    await make(engine=engine).start()
    (ready,) = records(caplog, "voice_service_ready")
    assert fields(ready) == {"agents": 2, "tts_agents": 1, "engines": ["fake"]}
    assert engine.checks == 1
    # No agent with TTS on: nothing to check, nothing to complain about.
    await make(engine=engine, agents={"bot": TEXT_ONLY}, engines={}).start()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"agents": {"": SALES}},
        {"agents": {"sales": {"tts_enabled": True}}},
        {"default_agent": "alloy"},
        {"engines": {"fake": object()}},
        {"check_timeout_s": 0},
        {"cache_chunk_ms": 0},
    ],
)
def test_bad_wiring_is_a_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        make(**kwargs)


# ------------------------------------------------------------------------------------------ telemetry


async def test_span_wraps_the_engine_span_and_records_the_outcome() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    engine = FakeTTSEngine(tracer=tracer)
    voice = make(engine=engine, tracer=tracer, cache=FakeAudioCache(), rate_limiter=FakeRateLimiter(limit=2))
    await voice.synthesize_speech("sales", "Привет", "u1")
    await voice.synthesize_speech("sales", "Привет", "u1")
    await voice.synthesize_speech("sales", "Привет", "u1")
    await voice.synthesize_speech("bot", "Привет", "u1")  # disabled: no span at all

    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["fake.synthesize", "tts.speak", "tts.speak", "tts.speak"]
    inner, first, hit, limited = spans
    assert inner.parent is not None and inner.parent.span_id == first.context.span_id
    attrs = dict(first.attributes or {})
    assert attrs["voxcore.tts.agent"] == "sales" and attrs["voxcore.tts.engine"] == "fake"
    assert attrs["voxcore.tts.reason"] == "ok" and attrs["voxcore.tts.from_cache"] is False
    assert attrs["voxcore.tts.bytes"] == len(CHUNK) * 3
    assert dict(hit.attributes or {})["voxcore.tts.reason"] == "cache_hit"
    assert dict(limited.attributes or {})["voxcore.tts.reason"] == "rate_limited"
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)

    failing = make(engine=FakeTTSEngine(error=TTSError("boom")), tracer=tracer)
    await failing.synthesize_speech("sales", "Привет", "u1")
    assert exporter.get_finished_spans()[-1].status.status_code is StatusCode.ERROR


async def test_stream_of_a_refusal_is_empty_and_closable() -> None:
    stream = SpeechStream(SpeechResult.disabled("bot"))
    assert stream.done
    async with stream:
        assert [chunk async for chunk in stream] == []
    assert stream.result.reason == "disabled"
