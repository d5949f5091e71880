"""HybridResponder for real: Redis cache, soxr conversion, the simulator's speech endpoint and espeak-ng."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import wave
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as redis

from voxcore.adapters.audio import SoxrAudioConverter, convert_pcm
from voxcore.adapters.espeak import EspeakTTSEngine
from voxcore.adapters.openai.tts import OpenAITTSEngine
from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.application.hybrid import HybridResponder
from voxcore.core.domain.audio import AudioFormat, plan_chunks, split_pcm
from voxcore.core.domain.playlist import PauseItem, Playlist, StaticItem, TTSItem, silence
from voxcore.core.domain.tts_text import tts_cache_key
from voxcore.core.ports.tts import TTSEngine
from voxcore.events import FIELDS_ATTR
from voxcore.simulator.openai_server import AUDIO_SPEECH_PATH, Fault, OpenAISimulator, synthetic_speech

PCM24 = AudioFormat(24_000, 1, 2)
PCM16 = AudioFormat(16_000, 1, 2)
CHUNK24 = plan_chunks(PCM24, 20).bytes_per_chunk
VOICE = "alloy"
KEY = "sk-simulator"


TWELVE_500 = "двенадцать тысяч пятьсот"  # what a TTS engine is asked to say for "12 500"


def amount_playlist(amount: str) -> Playlist:
    """Intro fragment + the amount synthesized + "рублей" (the pre-pack shape of a price reply)."""
    return Playlist.of(StaticItem("static:intro"), TTSItem(amount), StaticItem("static:currency_rub_many"))


def tone(fmt: AudioFormat, ms: int, hz: float) -> bytes:
    """A sine tone in ``fmt`` (s16 mono)."""
    n = fmt.sample_rate * ms // 1000
    t = np.arange(n) / fmt.sample_rate
    return (np.sin(2 * np.pi * hz * t) * 9000).astype("<i2").tobytes()


def write_wav(path: Path, pcm: bytes, fmt: AudioFormat) -> str:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(fmt.channels)
        out.setsampwidth(fmt.sample_width)
        out.setframerate(fmt.sample_rate)
        out.writeframes(pcm)
    return str(path)


async def store(cache: RedisCacheManager, key: str, pcm: bytes, fmt: AudioFormat = PCM24) -> None:
    assert await cache.set_audio_fragment(key, split_pcm(pcm, plan_chunks(fmt, 20)), fmt)


def key_of(text: str, *, voice: str = VOICE, engine: str = OpenAITTSEngine.name) -> str:
    return tts_cache_key(text, voice=voice, model="", engine=engine, audio_format=PCM24)


async def collect(stream: AsyncGenerator[bytes, None]) -> list[bytes]:
    async with contextlib.aclosing(stream) as chunks:
        return [chunk async for chunk in chunks]


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [
        getattr(r, FIELDS_ATTR, {})
        for r in caplog.records
        if r.name == "voxcore.hybrid" and r.getMessage() == name
    ]


@pytest.fixture
async def sim() -> AsyncIterator[OpenAISimulator]:
    async with OpenAISimulator() as simulator:
        yield simulator


@pytest.fixture
async def engine(sim: OpenAISimulator) -> AsyncIterator[OpenAITTSEngine]:
    tts = OpenAITTSEngine(base_url=sim.base_url, api_key=KEY, timeout_s=5.0)
    yield tts
    await tts.aclose()


def responder_for(
    cache: RedisCacheManager, engine: TTSEngine, transcripts: Mapping[str, str] | None = None, **kwargs: Any
) -> HybridResponder:
    return HybridResponder(
        cache=cache,
        tts=engine,
        converter=SoxrAudioConverter(),
        target_format=PCM24,
        voice=kwargs.pop("voice", VOICE),
        transcripts=transcripts or {},
        # Byte-exact checks: pieces joined as they are (test_speech_quality checks the joins).
        join_pause_ms=kwargs.pop("join_pause_ms", None),
        **kwargs,
    )


@pytest.fixture
async def responder(cache: RedisCacheManager, engine: OpenAITTSEngine) -> AsyncIterator[HybridResponder]:
    hybrid = responder_for(cache, engine, {"static:intro": "Ваша стоимость составляет"})
    yield hybrid
    await hybrid.shutdown()


def speech_requests(sim: OpenAISimulator) -> int:
    return sim.request_count(AUDIO_SPEECH_PATH)


# -- order, content, caching --------------------------------------------------------------------------


async def test_order_kept_when_hits_and_misses_interleave(
    cache: RedisCacheManager, sim: OpenAISimulator, responder: HybridResponder
) -> None:
    intro, rub, tail = tone(PCM24, 1500, 440), tone(PCM24, 410, 660), tone(PCM24, 250, 880)
    await store(cache, "static:intro", intro)
    await store(cache, "static:currency_rub_many", rub)
    await store(cache, "static:tail", tail)
    playlist = Playlist.of(
        StaticItem("static:intro"),
        TTSItem("12 500"),
        StaticItem("static:currency_rub_many"),
        PauseItem(120),
        TTSItem("Спасибо"),
        StaticItem("static:tail"),
    )

    chunks = await collect(responder.play(playlist))

    expected = (
        intro + synthetic_speech(TWELVE_500) + rub + silence(PCM24, 120) + synthetic_speech("Спасибо") + tail
    )
    assert b"".join(chunks) == expected
    assert all(len(c) == CHUNK24 for c in chunks[:-1])
    assert speech_requests(sim) == 2
    metrics = responder.last_metrics
    assert metrics is not None and (metrics.hits, metrics.misses, metrics.outcome) == (3, 2, "ok")
    assert metrics.tts_ttfb_ms is not None and metrics.time_to_first_audio_ms is not None


async def test_all_cached_playlist_is_byte_exact_against_the_loaded_fragments(
    cache: RedisCacheManager, responder: HybridResponder, sim: OpenAISimulator, tmp_path: Path
) -> None:
    parts = {
        "static:hello": tone(PCM24, 730, 300),
        "static:wait": tone(PCM24, 1210, 500),
        "static:bye": tone(PCM24, 95, 700),
    }
    for key, pcm in parts.items():
        result = await cache.load_audio_file(key, write_wav(tmp_path / f"{key[7:]}.wav", pcm, PCM24))
        assert result.ok, result.reason
    stored = {key: await cache.get_audio_chunks(key) for key in parts}
    playlist = Playlist.of(*(StaticItem(key) for key in parts), StaticItem("static:hello"))

    chunks = await collect(responder.play(playlist))

    expected = b"".join(b"".join(stored[k] or []) for k in (*parts, "static:hello"))
    assert b"".join(chunks) == expected == b"".join(parts.values()) + parts["static:hello"]
    assert speech_requests(sim) == 0


async def test_same_text_concurrent_misses_synthesize_once(
    cache: RedisCacheManager, sim: OpenAISimulator, responder: HybridResponder
) -> None:
    sim.first_token_delay_ms = 30
    playlist = Playlist.of(TTSItem("двенадцать тысяч пятьсот"), TTSItem("двенадцать тысяч пятьсот"))
    results = await asyncio.gather(*(collect(responder.play(playlist)) for _ in range(4)))
    audio = synthetic_speech("двенадцать тысяч пятьсот")
    assert all(b"".join(r) == audio + audio for r in results)
    assert speech_requests(sim) == 1
    await responder.drain()
    stored = await cache.get_audio_chunks(key_of("двенадцать тысяч пятьсот"))
    assert stored is not None and b"".join(stored) == audio


async def test_background_write_is_finished_when_shutdown_returns_and_replays_hit(
    cache: RedisCacheManager, engine: OpenAITTSEngine, sim: OpenAISimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    await store(cache, "static:intro", tone(PCM24, 300, 440))
    playlist = Playlist.of(StaticItem("static:intro"), TTSItem("сорок два"))
    first = responder_for(cache, engine)
    audio = b"".join(await collect(first.play(playlist)))
    await first.shutdown()  # no drain(): shutdown itself waits for the write
    key = key_of("сорок два")
    stored = await cache.get_audio_chunks(key)
    assert stored is not None and b"".join(stored) == synthetic_speech("сорок два")
    assert all(len(c) == CHUNK24 for c in stored[:-1])
    assert await cache.get_audio_format(key) == PCM24
    (fill,) = events(caplog, "tts_cache_fill")
    assert fill["ok"] is True and fill["key"] == key

    second = responder_for(cache, engine)
    again = b"".join(await collect(second.play(playlist)))
    await second.shutdown()
    assert again == audio
    assert speech_requests(sim) == 1  # the second play was all cache hits
    metrics = second.last_metrics
    assert metrics is not None and (metrics.hits, metrics.misses) == (2, 0)


async def test_tts_failure_mid_stream_plays_the_rest_and_caches_nothing(
    cache: RedisCacheManager,
    sim: OpenAISimulator,
    responder: HybridResponder,
    raw_redis: redis.Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    rub = tone(PCM24, 400, 660)
    await store(cache, "static:currency_rub_many", rub)
    sim.inject(Fault.TRUNCATED, path=AUDIO_SPEECH_PATH, after_chunks=2)
    text = "Эта фраза оборвётся на середине"

    chunks = await collect(responder.play(Playlist.of(TTSItem(text), StaticItem("static:currency_rub_many"))))

    audio = b"".join(chunks)
    full = synthetic_speech(text)
    assert audio.endswith(rub)
    heard = audio[: len(audio) - len(rub)]
    assert 0 < len(heard) < len(full) and full.startswith(heard)  # what came before the cut, then the rest
    await responder.drain()
    assert await raw_redis.exists(key_prefix + key_of(text)) == 0
    (failed,) = events(caplog, "hybrid_item_failed")
    assert failed["index"] == 0 and failed["error_type"] == "TTSError"
    assert events(caplog, "tts_cache_fill") == []


# -- formats ---------------------------------------------------------------------------------------------


async def test_fragment_stored_at_16k_is_converted_into_a_24k_target(
    cache: RedisCacheManager, responder: HybridResponder
) -> None:
    raw16 = tone(PCM16, 500, 440)
    await store(cache, "static:old", raw16, PCM16)
    after = tone(PCM24, 100, 880)
    await store(cache, "static:new", after)

    chunks = await collect(responder.play(Playlist.of(StaticItem("static:old"), StaticItem("static:new"))))

    out = b"".join(chunks)
    converted = out[: len(out) - len(after)]
    assert out.endswith(after)
    assert len(converted) == len(raw16) * 3 // 2  # 500 ms at 24 kHz
    assert converted != raw16[: len(converted)]
    assert converted == convert_pcm(raw16, PCM16, PCM24)  # soxr, streamed chunk by chunk
    spectrum = np.abs(np.fft.rfft(np.frombuffer(converted, "<i2").astype(np.float64)))
    assert abs(np.argmax(spectrum) * 24_000 / (len(converted) // 2) - 440) < 5  # still a 440 Hz tone
    metrics = responder.last_metrics
    assert metrics is not None and metrics.converted == 1


# -- missing static fragments ----------------------------------------------------------------------------


async def test_missing_static_with_transcript_falls_back_to_tts(
    cache: RedisCacheManager,
    sim: OpenAISimulator,
    responder: HybridResponder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    rub = tone(PCM24, 300, 660)
    await store(cache, "static:currency_rub_many", rub)

    chunks = await collect(responder.play(amount_playlist("12 500")))

    expected = synthetic_speech("Ваша стоимость составляет") + synthetic_speech(TWELVE_500) + rub
    assert b"".join(chunks) == expected
    assert events(caplog, "static_fragment_missing") == [{"key": "static:intro", "fallback": "tts"}]
    assert speech_requests(sim) == 2
    assert sorted(r.json()["input"] for r in sim.requests) == ["Ваша стоимость составляет", TWELVE_500]


async def test_missing_static_without_transcript_is_skipped_and_the_rest_plays(
    cache: RedisCacheManager, responder: HybridResponder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    intro = tone(PCM24, 300, 440)
    await store(cache, "static:intro", intro)

    chunks = await collect(responder.play(amount_playlist("7")))  # static:currency_rub_many is absent

    assert b"".join(chunks) == intro + synthetic_speech("семь")
    skipped = [r for r in caplog.records if r.getMessage() == "static_fragment_skipped"]
    assert len(skipped) == 1 and skipped[0].levelno == logging.ERROR
    assert getattr(skipped[0], FIELDS_ATTR)["key"] == "static:currency_rub_many"
    metrics = responder.last_metrics
    assert metrics is not None and metrics.skipped == 1 and metrics.outcome == "degraded"
    assert metrics.degraded_items == ("2:static:currency_rub_many:skipped",)


# -- free text --------------------------------------------------------------------------------------------


async def test_streamed_answer_text_is_spoken_sentence_by_sentence(
    sim: OpenAISimulator, responder: HybridResponder
) -> None:
    sim.first_token_delay_ms = 20
    finish = asyncio.Event()

    async def deltas() -> AsyncIterator[str]:
        for piece in ("Добрый день", "! Ваш заказ номер ", "сорок два уже в пути. Курьер"):
            yield piece
        await finish.wait()
        yield " позвонит заранее."

    async with contextlib.aclosing(responder.speak_text_stream(deltas())) as stream:
        first = await anext(stream)  # audio while the answer is still being written
        assert speech_requests(sim) >= 1
        finish.set()
        rest = [chunk async for chunk in stream]
    sentences = ["Добрый день!", "Ваш заказ номер сорок два уже в пути.", "Курьер позвонит заранее."]
    assert b"".join([first, *rest]) == b"".join(synthetic_speech(s) for s in sentences)
    assert [r.json()["input"] for r in sim.requests if r.path == AUDIO_SPEECH_PATH] == sentences


# -- espeak-ng ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
async def test_espeak_misses_are_cached_and_replayed_identically(cache: RedisCacheManager) -> None:
    espeak = EspeakTTSEngine()
    await store(cache, "static:intro", tone(PCM24, 200, 440))
    hybrid = responder_for(cache, espeak, voice="ru")
    playlist = Playlist.of(StaticItem("static:intro"), TTSItem("двенадцать тысяч пятьсот"))
    try:
        first = b"".join(await collect(hybrid.play(playlist)))
        await hybrid.drain()
        key = key_of("двенадцать тысяч пятьсот", voice="ru", engine=espeak.name)
        stored = await cache.get_audio_chunks(key)
        assert stored is not None and len(b"".join(stored)) > PCM24.sample_rate // 2  # > 0.25 s of speech
        second = b"".join(await collect(hybrid.play(playlist)))
        assert second == first
        metrics = hybrid.last_metrics
        assert metrics is not None and (metrics.hits, metrics.misses) == (2, 0)
    finally:
        await hybrid.shutdown()
        await espeak.aclose()


async def test_first_item_cached_by_another_process_cancels_the_speculative_request_once(
    cache: RedisCacheManager,
    sim: OpenAISimulator,
    engine: OpenAITTSEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    responder = responder_for(cache, engine, speculative_first_tts=True)
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    sim.first_token_delay_ms = 50
    cached = tone(PCM24, 400, 300)
    await store(cache, key_of("двенадцать"), cached)  # written by another worker
    playlist = Playlist.of(TTSItem("двенадцать"), PauseItem(20))

    first = b"".join(await collect(responder.play(playlist)))
    second = b"".join(await collect(responder.play(playlist)))

    assert first == second == cached + silence(PCM24, 20)
    assert [f["key"] for f in events(caplog, "tts_speculation_cancelled")] == [key_of("двенадцать")]
    await responder.drain()
    assert responder.syntheses_in_flight == 0
    assert await cache.get_audio_chunks(key_of("двенадцать")) == split_pcm(cached, plan_chunks(PCM24, 20))
    await responder.shutdown()
