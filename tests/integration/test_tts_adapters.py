"""TTS engines for real: OpenAITTSEngine against the local simulator, EspeakTTSEngine with espeak-ng."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from voxcore.adapters.audio import convert_pcm
from voxcore.adapters.espeak import EspeakTTSEngine, WavStreamReader, clean_text
from voxcore.adapters.openai.tts import OPENAI_PCM_FORMAT, OpenAITTSEngine
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.errors import InvalidAudioError
from voxcore.core.ports.errors import ConfigurationError, TTSError
from voxcore.core.ports.tts import SpeechRequest
from voxcore.events import FIELDS_ATTR
from voxcore.simulator.openai_server import (
    AUDIO_SPEECH_PATH,
    SPEECH_MS_PER_CHAR,
    Fault,
    OpenAISimulator,
    RequestPlan,
    synthetic_speech,
)

KEY = "sk-simulator"
TEXT = "Ваш заказ номер двенадцать тысяч пятьсот готов к выдаче."  # 56 characters
PCM16K = AudioFormat(16_000, 1, 2)
FRAMES_PER_CHAR_24K = round(24_000 * SPEECH_MS_PER_CHAR / 1000)


@pytest.fixture
async def sim() -> AsyncIterator[OpenAISimulator]:
    async with OpenAISimulator() as simulator:
        yield simulator


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def engine(sim: OpenAISimulator, spans: InMemorySpanExporter) -> AsyncIterator[OpenAITTSEngine]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tts = OpenAITTSEngine(
        base_url=sim.base_url, api_key=KEY, timeout_s=5.0, tracer=provider.get_tracer("test")
    )
    yield tts
    await tts.aclose()


async def collect(engine: OpenAITTSEngine | EspeakTTSEngine, request: SpeechRequest) -> list[bytes]:
    async with contextlib.aclosing(engine.stream_speech(request)) as stream:
        return [chunk async for chunk in stream]


def rms(pcm: bytes, fmt: AudioFormat) -> float:
    """RMS of the audio on an s16 scale, whatever its format."""
    mono16 = convert_pcm(pcm, fmt, AudioFormat(fmt.sample_rate, 1, 2))
    samples = np.frombuffer(mono16, "<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


def events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    return [(r.getMessage(), getattr(r, FIELDS_ATTR, {})) for r in caplog.records if r.name == "voxcore.tts"]


# ------------------------------------------------------------------------------------ OpenAI: happy path


async def test_streams_first_bytes_before_the_body_ends(
    sim: OpenAISimulator, engine: OpenAITTSEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.tts")
    sim.plan_next(RequestPlan(path=AUDIO_SPEECH_PATH, inter_chunk_delay_ms=25, speech_chunk_bytes=9_601))
    started = time.monotonic()
    arrivals: list[float] = []
    chunks: list[bytes] = []
    async with contextlib.aclosing(engine.stream_speech(SpeechRequest(TEXT, "alloy"))) as stream:
        async for chunk in stream:
            arrivals.append(time.monotonic() - started)
            chunks.append(chunk)
    total = time.monotonic() - started
    assert len(chunks) >= 8  # 56 chars * 2880 bytes / 9601-byte chunks = 17 network chunks
    assert arrivals[0] < total / 3  # the first audio came while the rest was still being sent
    assert all(len(c) % 2 == 0 for c in chunks)  # whole frames although network chunks are odd-sized
    assert b"".join(chunks) == synthetic_speech(TEXT)  # same format: bytes passed through untouched

    names = [name for name, _ in events(caplog)]
    assert names == ["tts_request", "tts_first_byte", "tts_done"]
    fields = dict(events(caplog))
    assert fields["tts_request"] == {"engine": "openai", "chars": len(TEXT), "voice": "alloy"}
    assert fields["tts_done"]["bytes"] == sum(map(len, chunks))
    assert 0 < fields["tts_first_byte"]["ms"] <= fields["tts_done"]["ms"]
    body = sim.last_request_json
    assert body == {
        "model": "gpt-4o-mini-tts",
        "input": TEXT,
        "voice": "alloy",
        "response_format": "pcm",
        "speed": 1.0,
    }
    assert sim.last_request_headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    "fmt",
    [PCM16K, AudioFormat(8_000, 1, 2), AudioFormat(48_000, 2, 2), AudioFormat(16_000, 1, 1)],
    ids=["16k-mono-s16", "8k-mono-s16", "48k-stereo-s16", "16k-mono-u8"],
)
async def test_converts_to_the_requested_format(engine: OpenAITTSEngine, fmt: AudioFormat) -> None:
    chunks = await collect(engine, SpeechRequest(TEXT, "nova", model="tts-1", audio_format=fmt))
    pcm = b"".join(chunks)
    assert all(len(c) % fmt.frame_size == 0 for c in chunks)
    expected_frames = len(TEXT) * FRAMES_PER_CHAR_24K * fmt.sample_rate / OPENAI_PCM_FORMAT.sample_rate
    assert abs(len(pcm) // fmt.frame_size - expected_frames) <= 1
    assert rms(pcm, fmt) > 1000


async def test_speed_and_keep_alive_reuse(sim: OpenAISimulator, engine: OpenAITTSEngine) -> None:
    normal = b"".join(await collect(engine, SpeechRequest("раз два", "alloy", audio_format=PCM16K)))
    fast = b"".join(await collect(engine, SpeechRequest("раз два", "alloy", audio_format=PCM16K, speed=2.0)))
    assert abs(len(fast) * 2 - len(normal)) <= 4
    assert sim.connections_accepted == 1
    assert [r.index_on_connection for r in sim.requests] == [1, 2]
    assert sim.requests_by_path[AUDIO_SPEECH_PATH] == 2


async def test_span_records_engine_voice_chars_and_ttfb(
    engine: OpenAITTSEngine, spans: InMemorySpanExporter
) -> None:
    await collect(engine, SpeechRequest("один", "echo"))
    (span,) = spans.get_finished_spans()
    assert span.name == "tts.synthesize"
    attrs = dict(span.attributes or {})
    assert attrs["voxcore.tts.engine"] == "openai"
    assert attrs["voxcore.tts.voice"] == "echo"
    assert attrs["voxcore.tts.chars"] == 4
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini-tts"
    ttfb = attrs["voxcore.tts.time_to_first_byte_ms"]
    assert isinstance(ttfb, float) and ttfb > 0
    assert span.status.status_code is StatusCode.UNSET


async def test_closing_early_releases_the_stream(sim: OpenAISimulator, engine: OpenAITTSEngine) -> None:
    sim.plan_next(RequestPlan(path=AUDIO_SPEECH_PATH, inter_chunk_delay_ms=50))
    async with contextlib.aclosing(engine.stream_speech(SpeechRequest(TEXT * 4, "alloy"))) as stream:
        first = await anext(stream)
    assert first
    # The abandoned response is not reused; the next call still works.
    assert len(b"".join(await collect(engine, SpeechRequest("да", "alloy")))) == 2 * 2 * FRAMES_PER_CHAR_24K


# ------------------------------------------------------------------------------------ OpenAI: failures


async def test_bad_key_is_not_transient(sim: OpenAISimulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.tts")
    tts = OpenAITTSEngine(base_url=sim.base_url, api_key="sk-wrong-key-123456")
    try:
        with pytest.raises(TTSError, match="401.*Incorrect API key") as info:
            await collect(tts, SpeechRequest("привет", "alloy"))
        assert info.value.transient is False
    finally:
        await tts.aclose()
    errors = [fields for name, fields in events(caplog) if name == "tts_error"]
    assert len(errors) == 1 and "401" in errors[0]["error"]


@pytest.mark.parametrize(
    ("fault", "status"),
    [(Fault.RATE_LIMIT, 429), (Fault.SERVER_ERROR, 500), (Fault.SERVICE_UNAVAILABLE, 503)],
)
async def test_rate_limit_and_server_errors_are_transient(
    sim: OpenAISimulator, engine: OpenAITTSEngine, spans: InMemorySpanExporter, fault: Fault, status: int
) -> None:
    sim.inject(fault, path=AUDIO_SPEECH_PATH, retry_after=2)
    with pytest.raises(TTSError, match=f"{status}.*voxcore simulator") as info:
        await collect(engine, SpeechRequest("привет", "alloy"))
    assert info.value.transient is True
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert sim.pending_plans == 0


async def test_refused_request_is_not_transient(sim: OpenAISimulator, engine: OpenAITTSEngine) -> None:
    with pytest.raises(TTSError, match="400.*'voice'") as info:
        await collect(engine, SpeechRequest("привет", "robot"))
    assert info.value.transient is False
    with pytest.raises(TTSError, match="404.*does not exist"):
        await collect(engine, SpeechRequest("привет", "alloy", model="tts-9"))
    requests_before = sim.request_count()
    with pytest.raises(TTSError, match="empty"):
        await collect(engine, SpeechRequest("  ", "alloy"))
    with pytest.raises(TTSError, match="speed"):
        await collect(engine, SpeechRequest("да", "alloy", speed=9.0))
    assert sim.request_count() == requests_before  # refused locally, nothing sent


async def test_truncated_body_raises_after_some_audio(sim: OpenAISimulator, engine: OpenAITTSEngine) -> None:
    sim.inject(Fault.TRUNCATED, path=AUDIO_SPEECH_PATH, after_chunks=3)
    received: list[bytes] = []
    with pytest.raises(TTSError, match="cut short") as info:
        async with contextlib.aclosing(engine.stream_speech(SpeechRequest(TEXT, "alloy"))) as stream:
            async for chunk in stream:
                received.append(chunk)
    assert info.value.transient is True
    assert 0 < sum(map(len, received)) < len(synthetic_speech(TEXT))


@pytest.mark.parametrize(
    "plan",
    [
        RequestPlan(fault=Fault.TRUNCATED, path=AUDIO_SPEECH_PATH, after_chunks=3, graceful=True),
        RequestPlan(fault=Fault.MALFORMED, path=AUDIO_SPEECH_PATH),
    ],
    ids=["clean-end-mid-frame", "stray-byte"],
)
async def test_body_ending_inside_a_frame_is_an_error(
    sim: OpenAISimulator, engine: OpenAITTSEngine, plan: RequestPlan
) -> None:
    sim.plan_next(plan)
    with pytest.raises(TTSError, match="inside a frame"):
        await collect(engine, SpeechRequest(TEXT, "alloy", audio_format=PCM16K))


async def test_timeout_is_transient(sim: OpenAISimulator) -> None:
    sim.inject(Fault.TIMEOUT, path=AUDIO_SPEECH_PATH)
    tts = OpenAITTSEngine(base_url=sim.base_url, api_key=KEY, timeout_s=0.3, http2=False)
    try:
        with pytest.raises(TTSError, match="timed out") as info:
            await collect(tts, SpeechRequest("привет", "alloy"))
        assert info.value.transient is True
    finally:
        await tts.aclose()


async def test_stall_mid_stream_is_a_transient_timeout(sim: OpenAISimulator) -> None:
    sim.inject(Fault.STALL, path=AUDIO_SPEECH_PATH, after_chunks=2)
    tts = OpenAITTSEngine(base_url=sim.base_url, api_key=KEY, timeout_s=0.3)
    received: list[bytes] = []
    try:
        with pytest.raises(TTSError, match="timed out") as info:
            async with contextlib.aclosing(tts.stream_speech(SpeechRequest(TEXT, "alloy"))) as stream:
                async for chunk in stream:
                    received.append(chunk)
        assert info.value.transient is True
        assert sum(map(len, received)) == 2 * 4801  # the two chunks sent before the stall
    finally:
        await tts.aclose()


async def test_unreachable_server_is_transient() -> None:
    tts = OpenAITTSEngine(base_url="http://127.0.0.1:9/v1", api_key=KEY, timeout_s=1.0)
    try:
        with pytest.raises(TTSError, match="cannot connect") as info:
            await collect(tts, SpeechRequest("привет", "alloy"))
        assert info.value.transient is True
    finally:
        await tts.aclose()


# ------------------------------------------------------------------------------------ OpenAI: lifecycle


async def test_check_requires_a_key_for_remote_servers() -> None:
    remote = OpenAITTSEngine(base_url="https://api.openai.com/v1", api_key=None)
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        await remote.check()
    await remote.aclose()
    for url in ("http://127.0.0.1:8089/v1", "http://localhost:8089/v1", "http://[::1]:8089/v1"):
        local = OpenAITTSEngine(base_url=url, api_key=None)
        await local.check()
        await local.aclose()
    bad = OpenAITTSEngine(base_url="api.openai.com/v1", api_key="sk-x")
    with pytest.raises(ConfigurationError, match="http"):
        await bad.check()
    await bad.aclose()


async def test_injected_client_is_used_and_left_open(sim: OpenAISimulator) -> None:
    async with httpx.AsyncClient() as http:
        tts = OpenAITTSEngine(base_url=sim.base_url, api_key=KEY, http_client=http)
        assert await collect(tts, SpeechRequest("да", "alloy"))
        await tts.aclose()
        await tts.aclose()  # twice is fine
        assert not http.is_closed
        with pytest.raises(TTSError, match="closed"):
            await collect(tts, SpeechRequest("да", "alloy"))


# ------------------------------------------------------------------------------------ simulator route


async def test_simulator_speech_validation_and_wav(sim: OpenAISimulator) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=sim.base_url, headers=auth) as http:
        base = {"model": "tts-1", "input": "привет", "voice": "alloy", "response_format": "pcm"}
        cases: list[tuple[dict[str, Any], int, str | None]] = [
            ({k: v for k, v in base.items() if k != "input"}, 400, "input"),
            ({**base, "input": ""}, 400, "input"),
            ({**base, "input": "x" * 4097}, 400, "input"),
            ({**base, "voice": "robot"}, 400, "voice"),
            ({**base, "response_format": "mp3"}, 400, "response_format"),
            ({**base, "speed": 5}, 400, "speed"),
            ({**base, "model": "tts-9"}, 404, None),
        ]
        for body, status, param in cases:
            r = await http.post("/audio/speech", json=body)
            assert r.status_code == status, body
            assert r.json()["error"]["param"] == param
        unauth = await http.post("/audio/speech", json=base, headers={"Authorization": "Bearer nope"})
        assert unauth.status_code == 401 and unauth.json()["error"]["code"] == "invalid_api_key"

        wav = await http.post("/audio/speech", json={**base, "response_format": "wav"})
        assert wav.headers["content-type"] == "audio/wav"
        assert wav.headers["transfer-encoding"] == "chunked"
        riff, size, wave = struct.unpack_from("<4sI4s", wav.content)
        assert (riff, wave, size) == (b"RIFF", b"WAVE", len(wav.content) - 8)
        assert wav.content[44:] == synthetic_speech("привет")
    assert sim.requests_by_path[AUDIO_SPEECH_PATH] == len(cases) + 2


async def test_simulator_speech_duration_and_first_byte_delay() -> None:
    assert len(synthetic_speech("a" * 10)) == 2 * len(synthetic_speech("a" * 5))
    assert len(synthetic_speech("ab cd", speed=2.0)) * 2 == len(synthetic_speech("ab cd"))
    async with OpenAISimulator(first_token_delay_ms=200) as sim:
        tts = OpenAITTSEngine(base_url=sim.base_url, api_key=KEY)
        try:
            started = time.monotonic()
            async with contextlib.aclosing(tts.stream_speech(SpeechRequest("да", "alloy"))) as stream:
                await anext(stream)
            assert time.monotonic() - started >= 0.8 * 0.2
        finally:
            await tts.aclose()


# ------------------------------------------------------------------------------------ espeak-ng

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)


@pytest.fixture
async def espeak(spans: InMemorySpanExporter) -> AsyncIterator[EspeakTTSEngine]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tts = EspeakTTSEngine(tracer=provider.get_tracer("test"))
    yield tts
    await tts.aclose()


@needs_espeak
@pytest.mark.parametrize(
    ("text", "voice", "fmt"),
    [
        ("двенадцать тысяч пятьсот", "ru", PCM16K),
        ("двенадцать тысяч пятьсот", "ru", AudioFormat(48_000, 2, 3)),
        ("Your order number is twelve thousand five hundred.", "en", AudioFormat(8_000, 1, 1)),
        ("Your order number is twelve thousand five hundred.", "en", AudioFormat(22_050, 1, 2)),
    ],
    ids=["ru-16k-s16", "ru-48k-stereo-s24", "en-8k-u8", "en-native"],
)
async def test_espeak_speaks_in_the_requested_format(
    espeak: EspeakTTSEngine, text: str, voice: str, fmt: AudioFormat, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.tts")
    await espeak.check()
    chunks = await collect(espeak, SpeechRequest(text, voice, audio_format=fmt))
    pcm = b"".join(chunks)
    assert all(len(c) % fmt.frame_size == 0 for c in chunks)
    seconds = len(pcm) / fmt.frame_size / fmt.sample_rate
    assert 0.8 < seconds < 6.0
    assert rms(pcm, fmt) > 500
    names = [name for name, _ in events(caplog)]
    assert names == ["tts_request", "tts_first_byte", "tts_done"]
    assert dict(events(caplog))["tts_request"] == {"engine": "espeak-ng", "chars": len(text), "voice": voice}
    assert not espeak.processes


@needs_espeak
async def test_espeak_stereo_copies_the_mono_voice(espeak: EspeakTTSEngine) -> None:
    fmt = AudioFormat(16_000, 2, 2)
    pcm = b"".join(await collect(espeak, SpeechRequest("раз", "ru", audio_format=fmt)))
    pairs = np.frombuffer(pcm, "<i2").reshape(-1, 2)
    assert np.array_equal(pairs[:, 0], pairs[:, 1]) and np.abs(pairs).max() > 1000


@needs_espeak
async def test_espeak_closing_early_kills_the_process(
    espeak: EspeakTTSEngine, spans: InMemorySpanExporter
) -> None:
    stream = espeak.stream_speech(SpeechRequest("раз два три " * 80, "ru"))
    assert await anext(stream)
    (proc,) = espeak.processes
    assert proc.returncode is None  # blocked writing into a full pipe: far from done
    await stream.aclose()
    assert proc.returncode is not None
    assert not espeak.processes
    (span,) = spans.get_finished_spans()
    assert dict(span.attributes or {})["voxcore.tts.cancelled"] is True


@needs_espeak
async def test_espeak_cancellation_kills_the_process(espeak: EspeakTTSEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(espeak.stream_speech(SpeechRequest("one two three " * 60, "en"))) as s:
            async for _ in s:
                started.set()
                await asyncio.sleep(10)

    task = asyncio.create_task(consume())
    async with asyncio.timeout(5):
        await started.wait()
    (proc,) = espeak.processes
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert proc.returncode is not None
    assert not espeak.processes


@needs_espeak
async def test_espeak_engine_aclose_stops_running_streams(espeak: EspeakTTSEngine) -> None:
    stream = espeak.stream_speech(SpeechRequest("раз два три " * 80, "ru"))
    assert await anext(stream)
    (proc,) = espeak.processes
    await espeak.aclose()
    assert proc.returncode is not None
    with pytest.raises(TTSError, match="engine closed"):
        async for _ in stream:
            pass
    await stream.aclose()
    with pytest.raises(TTSError, match="closed"):
        await collect(espeak, SpeechRequest("да", "ru"))


@needs_espeak
async def test_espeak_rejects_bad_text_and_voices(espeak: EspeakTTSEngine) -> None:
    for text in ("", " \n\t", "\x00\x07\x1b"):
        with pytest.raises(TTSError, match="empty"):
            await collect(espeak, SpeechRequest(text, "ru"))
    with pytest.raises(TTSError, match="too long"):
        await collect(espeak, SpeechRequest("а" * 1001, "ru"))
    for voice in ("-w /tmp/owned.wav", "ru; rm -rf /", ""):
        with pytest.raises(TTSError, match="invalid espeak-ng voice"):
            await collect(espeak, SpeechRequest("привет", voice))
    with pytest.raises(TTSError, match="exit code 1.*voice does not exist") as info:
        await collect(espeak, SpeechRequest("привет", "zz-nope"))
    assert info.value.transient is False
    # Control characters are stripped, the rest is spoken; text looking like options is just text.
    assert await collect(espeak, SpeechRequest("при\x00вет\x1b[31m", "ru"))
    assert await collect(espeak, SpeechRequest("-w /tmp/owned.wav --stdout", "en"))
    assert not espeak.processes


async def test_espeak_check_names_the_missing_binary() -> None:
    tts = EspeakTTSEngine(binary="espeak-ng-does-not-exist")
    with pytest.raises(ConfigurationError, match="not found on PATH: apt-get install espeak-ng"):
        await tts.check()
    with pytest.raises(TTSError, match="not found") as info:
        await collect(tts, SpeechRequest("привет", "ru"))
    assert info.value.transient is False


# ------------------------------------------------------------------------------------ WAV stream reader


def wav_stream(pcm: bytes, *, data_size: int, extra_chunk: bytes = b"", tail: bytes = b"") -> bytes:
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 22_050, 44_100, 2, 16)
    return (
        struct.pack("<4sI4s", b"RIFF", 0x7FFFF024, b"WAVE")
        + fmt
        + extra_chunk
        + struct.pack("<4sI", b"data", data_size)
        + pcm
        + tail
    )


def feed_bytewise(reader: WavStreamReader, data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield reader.feed(data[i : i + 1])


@pytest.mark.parametrize("data_size", [0x7FFFF000, 0xFFFFFFFF, 0])
def test_wav_reader_streams_placeholder_sized_data_to_the_end(data_size: int) -> None:
    pcm = bytes(range(200)) * 3
    reader = WavStreamReader()
    out = b"".join(
        feed_bytewise(
            reader, wav_stream(pcm, data_size=data_size, extra_chunk=b"LIST\x03\x00\x00\x00abc\x00")
        )
    )
    assert out == pcm
    assert reader.format == AudioFormat(22_050, 1, 2)
    reader.finish()


def test_wav_reader_honours_a_real_data_size() -> None:
    reader = WavStreamReader()
    assert reader.feed(wav_stream(b"\x01\x02\x03\x04", data_size=4, tail=b"LIST....")) == b"\x01\x02\x03\x04"
    reader.finish()
    short = WavStreamReader()
    short.feed(wav_stream(b"\x01\x02", data_size=4))
    with pytest.raises(InvalidAudioError, match="2 bytes short"):
        short.finish()


def test_wav_reader_refuses_non_wav_and_clean_text_rules() -> None:
    with pytest.raises(InvalidAudioError, match="RIFF"):
        WavStreamReader().feed(b"ID3\x04" + bytes(20))
    empty = WavStreamReader()
    empty.feed(b"RIFF")
    with pytest.raises(InvalidAudioError, match="before its 'data'"):
        empty.finish()
    assert clean_text("  два\tслова\r\n\x00три\u200b ") == "два слова три\u200b"
    with pytest.raises(TTSError, match="too long"):
        clean_text("abc", max_chars=2)
