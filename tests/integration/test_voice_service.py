"""VoiceService for real: Redis rate limiter and cache, OpenAITTSEngine on the simulator, espeak-ng."""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from voxcore.adapters.espeak import EspeakTTSEngine
from voxcore.adapters.openai.tts import OpenAITTSEngine
from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.rate_limit import RedisRateLimiter
from voxcore.application.voice import VoiceService
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.tts_text import tts_cache_key
from voxcore.core.domain.voice import AgentVoiceSettings
from voxcore.core.ports.errors import ConfigurationError
from voxcore.core.ports.tts import TTSEngine
from voxcore.events import FIELDS_ATTR
from voxcore.simulator import AUDIO_SPEECH_PATH, Fault, OpenAISimulator, RequestPlan, synthetic_speech

KEY = "sk-simulator"
PCM24K = AudioFormat(24_000, 1, 2)
PCM16K = AudioFormat(16_000, 1, 2)
SALES = AgentVoiceSettings(tts_enabled=True, engine="openai", voice="alloy", audio_format=PCM24K)
TEXT_ONLY = AgentVoiceSettings(tts_enabled=False, engine="openai", voice="alloy")
AGENTS = {"sales": SALES, "bot": TEXT_ONLY}


@pytest.fixture
async def sim() -> AsyncIterator[OpenAISimulator]:
    async with OpenAISimulator() as simulator:
        yield simulator


@pytest.fixture
async def openai(sim: OpenAISimulator) -> AsyncIterator[OpenAITTSEngine]:
    engine = OpenAITTSEngine(base_url=sim.base_url, api_key=KEY, timeout_s=5.0)
    yield engine
    await engine.aclose()


@pytest.fixture
async def limiter(raw_redis: redis.Redis, key_prefix: str) -> AsyncIterator[RedisRateLimiter]:
    rate_limiter = RedisRateLimiter(raw_redis, limit=3, period_s=60, key_prefix=key_prefix)
    yield rate_limiter
    await rate_limiter.aclose()


@pytest.fixture
async def voice(
    openai: OpenAITTSEngine, limiter: RedisRateLimiter, cache: RedisCacheManager
) -> AsyncIterator[VoiceService]:
    service = VoiceService(agents=AGENTS, engines={"openai": openai}, rate_limiter=limiter, cache=cache)
    await service.start()
    yield service
    await service.aclose()


def speech_requests(sim: OpenAISimulator) -> int:
    return sim.request_count(AUDIO_SPEECH_PATH)


async def test_synthesis_then_cache_hit_without_the_provider(
    voice: VoiceService, sim: OpenAISimulator, cache: RedisCacheManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.voice")
    first = await voice.synthesize_speech("sales", "Ваш заказ  номер 12500 готов.", "u1")
    assert first.success and first.reason == "ok" and first.audio_format == PCM24K
    # The provider was asked for the normalized text, and its audio came back untouched.
    spoken = "Ваш заказ номер двенадцать тысяч пятьсот готов."
    assert sim.last_request_json["input"] == spoken
    assert first.audio == synthetic_speech(spoken)
    assert speech_requests(sim) == 1

    second = await voice.synthesize_speech("sales", "Ваш заказ номер 12\u00a0500 готов.", "u2")
    assert second.reason == "cache_hit" and second.from_cache and second.audio == first.audio
    assert speech_requests(sim) == 1  # unchanged: served by Redis

    key = tts_cache_key(
        "Ваш заказ номер 12 500 готов.", voice="alloy", model="", engine="openai", audio_format=PCM24K
    )
    assert await cache.get_audio_format(key) == PCM24K
    chunks = await cache.get_audio_chunks(key)
    assert chunks is not None and b"".join(chunks) == first.audio
    assert {len(c) for c in chunks[:-1]} == {960}  # 20 ms of 24 kHz s16 mono
    events = [r for r in caplog.records if r.getMessage() == "tts_synthesized"]
    assert [getattr(r, FIELDS_ATTR)["from_cache"] for r in events] == [False, True]


async def test_disabled_agent_makes_no_noise_and_spends_nothing(
    voice: VoiceService,
    sim: OpenAISimulator,
    raw_redis: redis.Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        result = await voice.synthesize_speech("bot", "Здравствуйте! Чем могу помочь?", "u1")
        assert result.reason == "disabled" and not result.success and result.audio is None
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    assert speech_requests(sim) == 0
    assert [k async for k in raw_redis.scan_iter(match=f"{key_prefix}*")] == []  # no limiter, no cache


async def test_rate_limit_is_exact_per_user(
    voice: VoiceService, sim: OpenAISimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    results = [await voice.synthesize_speech("sales", f"Фраза номер {i}", "u1") for i in range(4)]
    assert [r.reason for r in results] == ["ok", "ok", "ok", "rate_limited"]
    limited = results[3]
    assert limited.retry_after_s is not None and 19 < limited.retry_after_s <= 20  # one unit per 20 s
    assert speech_requests(sim) == 3
    # Cached or not, a request counts: the limit is on what the user asks for.
    again = await voice.synthesize_speech("sales", "Фраза номер 0", "u1")
    assert again.reason == "rate_limited"
    assert (await voice.synthesize_speech("sales", "Фраза номер 0", "u2")).reason == "cache_hit"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_engine_failure_is_a_result_and_nothing_is_cached(
    voice: VoiceService, sim: OpenAISimulator, cache: RedisCacheManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    text = "Ошибка провайдера"
    key = tts_cache_key(text, voice="alloy", model="", engine="openai", audio_format=PCM24K)

    sim.inject(Fault.SERVER_ERROR, path=AUDIO_SPEECH_PATH)
    failed = await voice.synthesize_speech("sales", text, "u1")
    assert failed.reason == "engine_error" and failed.transient and failed.audio is None
    assert "500" in (failed.error or "")
    failures = [r for r in caplog.records if r.getMessage() == "tts_failed"]
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING
    assert getattr(failures[0], FIELDS_ATTR)["agent"] == "sales"

    sim.inject(Fault.TRUNCATED, path=AUDIO_SPEECH_PATH, after_chunks=1)
    cut = await voice.synthesize_speech("sales", text, "u1")
    assert cut.reason == "engine_error" and cut.transient
    assert await cache.get_audio_chunks(key) is None  # a partial stream is never cached

    recovered = await voice.synthesize_speech("sales", text, "u1")
    assert recovered.reason == "ok" and recovered.audio == synthetic_speech(text)
    assert speech_requests(sim) == 3


async def test_stream_speech_then_cached_stream(
    openai: OpenAITTSEngine, sim: OpenAISimulator, cache: RedisCacheManager
) -> None:
    agents = {"ivr": AgentVoiceSettings(tts_enabled=True, engine="openai", voice="nova", audio_format=PCM16K)}
    voice = VoiceService(agents=agents, engines={"openai": openai}, cache=cache)
    text = "Соединяю с оператором, оставайтесь на линии."
    sim.plan_next(RequestPlan(path=AUDIO_SPEECH_PATH, inter_chunk_delay_ms=5, speech_chunk_bytes=4_801))
    async with await voice.stream_speech("ivr", text, "caller-7") as stream:
        chunks = [chunk async for chunk in stream]
    assert stream.result.reason == "ok" and len(chunks) > 3
    assert all(len(c) % 2 == 0 for c in chunks)
    audio = b"".join(chunks)

    async with await voice.stream_speech("ivr", text, "caller-8") as cached:
        again = b"".join([chunk async for chunk in cached])
    assert cached.result.reason == "cache_hit" and again == audio
    assert speech_requests(sim) == 1
    whole = await voice.synthesize_speech("ivr", text, "caller-9")
    assert whole.reason == "cache_hit" and whole.audio == audio
    await voice.aclose()


async def test_start_names_the_missing_key_and_the_agents() -> None:
    remote = OpenAITTSEngine(base_url="https://api.openai.com/v1", api_key=None, http2=False)
    agents = {
        "sales": AgentVoiceSettings(tts_enabled=True, engine="openai", voice="alloy"),
        "support": AgentVoiceSettings(tts_enabled=True, engine="openai", voice="nova"),
        "bot": TEXT_ONLY,
        "robot": AgentVoiceSettings(tts_enabled=True, engine="piper", voice="ru"),
    }
    voice = VoiceService(agents=agents, engines={"openai": remote})
    try:
        with pytest.raises(ConfigurationError) as info:
            await voice.start()
    finally:
        await remote.aclose()
    message = str(info.value)
    assert "TTS engine 'openai' for agents sales, support: OPENAI_API_KEY is not set" in message
    assert "TTS engine 'piper' for agent robot: not configured (configured: openai)" in message
    assert "bot" not in message.replace("robot", "")


async def test_a_local_server_needs_no_key(sim: OpenAISimulator) -> None:
    local = OpenAITTSEngine(base_url=sim.base_url, api_key=None, http2=False)
    try:
        await VoiceService(agents=AGENTS, engines={"openai": local}).start()
    finally:
        await local.aclose()


async def test_unknown_agent(voice: VoiceService, sim: OpenAISimulator) -> None:
    result = await voice.synthesize_speech("nobody", "Привет", "u1")
    assert result.reason == "unknown_agent" and "nobody" in (result.error or "")
    assert speech_requests(sim) == 0


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
async def test_espeak_agent_with_redis_cache(
    openai: OpenAITTSEngine, cache: RedisCacheManager, limiter: RedisRateLimiter
) -> None:
    espeak = EspeakTTSEngine(timeout_s=10.0)
    engines: dict[str, TTSEngine] = {"espeak-ng": espeak, "openai": openai}
    agents = {
        "ru": AgentVoiceSettings(tts_enabled=True, engine="espeak-ng", voice="ru", audio_format=PCM16K),
        "sales": SALES,
    }
    voice = VoiceService(agents=agents, engines=engines, rate_limiter=limiter, cache=cache)
    try:
        await voice.start()
        first = await voice.synthesize_speech("ru", "Добрый день, 12500 рублей.", "u1")
        assert first.reason == "ok" and first.audio_format == PCM16K
        assert first.audio is not None and len(first.audio) > 16_000  # over half a second of speech
        assert len(first.audio) % PCM16K.frame_size == 0
        second = await voice.synthesize_speech("ru", "Добрый день, 12 500 рублей.", "u1")
        assert second.reason == "cache_hit" and second.audio == first.audio
        assert espeak.processes == frozenset()
    finally:
        await voice.aclose()
        await espeak.aclose()
