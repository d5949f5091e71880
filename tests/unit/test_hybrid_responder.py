"""HybridResponder with hand-written port fakes: order, concurrency, single flight, failures, telemetry."""

from __future__ import annotations

import array
import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from voxcore.application.hybrid import HybridResponder
from voxcore.core.domain.audio import AudioFormat, plan_chunks, split_pcm
from voxcore.core.domain.errors import InvalidAudioError
from voxcore.core.domain.hybrid import TURN_ATTRIBUTE_PREFIX
from voxcore.core.domain.playlist import PauseItem, Playlist, StaticItem, TTSItem, silence
from voxcore.core.domain.tts_text import tts_cache_key
from voxcore.core.ports.audio import AudioConverter, StreamConverter
from voxcore.core.ports.cache import AbstractAudioCache, AudioChunkStream, AudioLoadResult
from voxcore.core.ports.errors import TTSError
from voxcore.core.ports.tts import SpeechRequest, TTSEngine
from voxcore.events import FIELDS_ATTR

PCM24 = AudioFormat(24_000, 1, 2)
PCM16 = AudioFormat(16_000, 1, 2)
CHUNK = plan_chunks(PCM24, 20).bytes_per_chunk  # 960
VOICE = "alloy"


# -- fakes ----------------------------------------------------------------------------------------------


def pcm_for(text: str, nbytes: int) -> bytes:
    """Deterministic, text-specific PCM (whole s16 frames)."""
    seed = hashlib.sha256(text.encode()).digest()
    data = (seed * (nbytes // len(seed) + 1))[:nbytes]
    return data[: len(data) - len(data) % 2]


def fragment(tag: int, ms: int, fmt: AudioFormat = PCM24) -> list[bytes]:
    """A recorded fragment stored as 20 ms chunks, every byte telling which fragment it is."""
    frames = fmt.sample_rate * ms // 1000
    pcm = bytes([tag]) * (frames * fmt.frame_size)
    return split_pcm(pcm, plan_chunks(fmt, 20))


class FakeStream(AudioChunkStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = list(chunks)
        self._index = 0
        self.closed = False

    async def __anext__(self) -> bytes:
        if self.closed or self._index >= len(self._chunks):
            raise StopAsyncIteration
        self._index += 1
        return self._chunks[self._index - 1]

    async def aclose(self) -> None:
        self.closed = True


class FakeAudioCache(AbstractAudioCache):
    """Fragments in memory with their formats; per-key lookup delays; records every call in order."""

    def __init__(self) -> None:
        self.audio: dict[str, list[bytes]] = {}
        self.formats: dict[str, AudioFormat] = {}
        self.open_delays: dict[str, float] = {}
        self.write_gate: asyncio.Event | None = None
        self.opens: list[str] = []
        self.format_calls: list[str] = []
        self.writes: list[tuple[str, list[bytes], AudioFormat]] = []
        self.streams: list[FakeStream] = []

    def put(self, key: str, chunks: list[bytes], fmt: AudioFormat | None = PCM24) -> None:
        self.audio[key] = chunks
        if fmt is not None:
            self.formats[key] = fmt

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def load_and_set_audio(self, key: str, wav_filepath: str, chunk_size_ms: int = 20) -> bool:
        return False

    async def set_audio_chunks(self, key: str, audio_chunks: list[bytes]) -> bool:
        self.audio[key] = list(audio_chunks)
        self.formats.pop(key, None)
        return True

    async def get_audio_chunks(self, key: str) -> list[bytes] | None:
        return self.audio.get(key)

    async def set_text(self, key: str, text: str, ttl_seconds: int) -> bool:
        return False

    async def get_text(self, key: str) -> str | None:
        return None

    async def open_audio_stream(self, key: str) -> AudioChunkStream | None:
        self.opens.append(key)
        await asyncio.sleep(self.open_delays.get(key, 0))
        chunks = self.audio.get(key)
        if not chunks:
            return None
        stream = FakeStream(chunks)
        self.streams.append(stream)
        return stream

    async def set_audio_fragment(
        self, key: str, audio_chunks: list[bytes], audio_format: AudioFormat
    ) -> bool:
        if self.write_gate is not None:
            await self.write_gate.wait()
        self.writes.append((key, list(audio_chunks), audio_format))
        self.put(key, list(audio_chunks), audio_format)
        return True

    async def load_audio_file(self, key: str, wav_filepath: str, chunk_size_ms: int = 20) -> AudioLoadResult:
        return AudioLoadResult(key, False, "not supported")

    async def get_audio_format(self, key: str) -> AudioFormat | None:
        self.format_calls.append(key)
        await asyncio.sleep(self.open_delays.get(key, 0))
        return self.formats.get(key)


class FakeTTS(TTSEngine):
    """Deterministic PCM per text in ``piece_bytes`` pieces, with a first-byte delay, gates and faults."""

    name = "fake"

    def __init__(
        self,
        *,
        ms_per_char: int = 10,
        piece_bytes: int = 1000,
        first_byte_delay_s: float = 0.0,
        piece_delay_s: float = 0.0,
    ) -> None:
        self.ms_per_char = ms_per_char
        self.piece_bytes = piece_bytes
        self.first_byte_delay_s = first_byte_delay_s
        self.piece_delay_s = piece_delay_s
        self.delays: dict[str, float] = {}
        self.fail_after: dict[str, int] = {}  # text -> bytes delivered before TTSError
        self.gates: dict[str, asyncio.Event] = {}
        self.calls: list[str] = []
        self.requests: list[SpeechRequest] = []
        self.running = 0
        self.max_running = 0
        self.cancelled: list[str] = []

    def audio(self, text: str, fmt: AudioFormat = PCM24) -> bytes:
        frames = fmt.sample_rate * self.ms_per_char * len(text) // 1000
        return pcm_for(text, frames * fmt.frame_size)

    async def stream_speech(self, request: SpeechRequest) -> AsyncGenerator[bytes, None]:
        self.calls.append(request.text)
        self.requests.append(request)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(self.delays.get(request.text, self.first_byte_delay_s))
            gate = self.gates.get(request.text)
            if gate is not None:
                await gate.wait()
            pcm = self.audio(request.text, request.audio_format)
            limit = self.fail_after.get(request.text)
            for start in range(0, len(pcm), self.piece_bytes):
                if limit is not None and start >= limit:
                    raise TTSError("fake engine: stream cut short", transient=True)
                if start and self.piece_delay_s:
                    await asyncio.sleep(self.piece_delay_s)
                yield pcm[start : start + self.piece_bytes]
            if limit is not None:
                raise TTSError("fake engine: stream cut short", transient=True)
        except asyncio.CancelledError:
            self.cancelled.append(request.text)
            raise
        finally:
            self.running -= 1

    async def check(self) -> None: ...

    async def aclose(self) -> None: ...


class _NearestStream(StreamConverter):
    """s16 mono nearest-neighbour resampler (a stand-in for soxr in unit tests)."""

    def __init__(self, src: AudioFormat, dst: AudioFormat) -> None:
        self.src, self.dst = src, dst
        self.consumed = 0  # source frames seen
        self.produced = 0  # output frames made

    def feed(self, data: bytes) -> bytes:
        samples = array.array("h", data)
        self.consumed += len(samples)
        total = self.consumed * self.dst.sample_rate // self.src.sample_rate
        first = self.consumed - len(samples)
        out = array.array("h")
        for j in range(self.produced, total):
            out.append(samples[j * self.src.sample_rate // self.dst.sample_rate - first])
        self.produced = total
        return out.tobytes()

    def flush(self) -> bytes:
        return b""


class FakeConverter(AudioConverter):
    def __init__(self) -> None:
        self.streams: list[tuple[AudioFormat, AudioFormat]] = []

    def convert(self, data: bytes, src: AudioFormat, dst: AudioFormat) -> bytes:
        stream = self.stream(src, dst)
        return stream.feed(data) + stream.flush()

    def stream(self, src: AudioFormat, dst: AudioFormat) -> StreamConverter:
        if src.channels != 1 or src.sample_width != 2 or dst.channels != 1 or dst.sample_width != 2:
            raise InvalidAudioError("fake converter: s16 mono only")
        self.streams.append((src, dst))
        return _NearestStream(src, dst)


# -- helpers --------------------------------------------------------------------------------------------


def make(
    cache: FakeAudioCache,
    tts: FakeTTS,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    **kwargs: Any,
) -> HybridResponder:
    return HybridResponder(
        cache=cache,
        tts=tts,
        converter=kwargs.pop("converter", FakeConverter()),
        target_format=PCM24,
        voice=VOICE,
        tracer=tracer_provider.get_tracer("test") if tracer_provider else None,
        meter=meter_provider.get_meter("test") if meter_provider else None,
        # Byte-exact checks of the scheduling: pieces joined as they are (joins: tests of their own).
        join_pause_ms=kwargs.pop("join_pause_ms", None),
        **kwargs,
    )


def key_of(text: str, tts: TTSEngine) -> str:
    return tts_cache_key(text, voice=VOICE, model="", engine=tts.name, audio_format=PCM24)


async def collect(stream: AsyncGenerator[bytes, None]) -> list[bytes]:
    async with contextlib.aclosing(stream) as chunks:
        return [chunk async for chunk in chunks]


def events(caplog: pytest.LogCaptureFixture, name: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    found = [
        (r.getMessage(), getattr(r, FIELDS_ATTR, {})) for r in caplog.records if r.name == "voxcore.hybrid"
    ]
    return [e for e in found if name is None or e[0] == name]


def assert_chunked(chunks: Sequence[bytes]) -> None:
    assert chunks, "no audio"
    assert all(len(c) == CHUNK for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= CHUNK and len(chunks[-1]) % 2 == 0


@pytest.fixture
def cache() -> FakeAudioCache:
    return FakeAudioCache()


@pytest.fixture
def tts() -> FakeTTS:
    return FakeTTS()


# -- order and content ------------------------------------------------------------------------------------


async def test_all_cached_playlist_is_byte_exact_in_20ms_chunks(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="voxcore.hybrid")
    cache.put("static:intro", fragment(1, 1010))
    cache.put(key_of("12 500", tts), split_pcm(tts.audio("12 500"), plan_chunks(PCM24, 20)))
    cache.put("static:rub", fragment(3, 330))
    responder = make(cache, tts)
    playlist = Playlist.of(StaticItem("static:intro"), TTSItem("12500"), StaticItem("static:rub"))

    chunks = await collect(responder.play(playlist))

    expected = (
        b"".join(cache.audio["static:intro"]) + tts.audio("12 500") + b"".join(cache.audio["static:rub"])
    )
    assert b"".join(chunks) == expected
    assert_chunked(chunks)
    assert tts.calls == []
    assert cache.format_calls == ["static:intro", "static:rub"]  # a tts: key implies its format
    metrics = responder.last_metrics
    assert metrics is not None
    assert (metrics.items, metrics.hits, metrics.misses, metrics.skipped, metrics.outcome) == (
        3,
        3,
        0,
        0,
        "ok",
    )
    assert metrics.chunks == len(chunks) and metrics.tts_ttfb_ms is None
    items = [fields for _, fields in events(caplog, "hybrid_item")]
    assert [(f["index"], f["kind"], f["source"], f["converted"]) for f in items] == [
        (0, "static", "hit", False),
        (1, "tts", "hit", False),
        (2, "static", "hit", False),
    ]
    assert items[1]["key"] == key_of("12 500", tts)
    assert all(stream.closed for stream in cache.streams)


async def test_order_is_kept_when_hits_and_misses_interleave(cache: FakeAudioCache, tts: FakeTTS) -> None:
    cache.put("static:a", fragment(1, 90))
    cache.put("static:b", fragment(2, 50))
    cache.put("static:c", fragment(3, 70))
    cache.open_delays["static:c"] = 0.03  # the last hit answers last
    tts.delays = {"слово один": 0.05, "слово два": 0.0}  # the first miss is the slowest
    tts.piece_bytes = 701 * 2
    responder = make(cache, tts)
    playlist = Playlist.of(
        StaticItem("static:a"),
        TTSItem("слово один"),
        StaticItem("static:b"),
        TTSItem("слово два"),
        PauseItem(30),
        StaticItem("static:c"),
    )

    chunks = await collect(responder.play(playlist))

    expected = b"".join(
        [
            *cache.audio["static:a"],
            tts.audio("слово один"),
            *cache.audio["static:b"],
            tts.audio("слово два"),
            silence(PCM24, 30),
            *cache.audio["static:c"],
        ]
    )
    assert b"".join(chunks) == expected
    assert_chunked(chunks)
    metrics = responder.last_metrics
    assert metrics is not None and (metrics.hits, metrics.misses) == (3, 2)
    await responder.shutdown()


async def test_first_item_goes_alone_then_every_lookup_and_tts_starts_at_once(
    cache: FakeAudioCache, tts: FakeTTS
) -> None:
    cache.put("static:a", fragment(1, 200))
    cache.put("static:c", fragment(3, 60))
    gate = asyncio.Event()
    tts.gates["третье слово"] = gate
    responder = make(cache, tts, prefetch=8)
    playlist = Playlist.of(
        StaticItem("static:a"), StaticItem("static:c"), TTSItem("второе слово"), TTSItem("третье слово")
    )

    async with contextlib.aclosing(responder.play(playlist)) as stream:
        first = await anext(stream)
        assert cache.opens == ["static:a"]  # nothing else shared the loop with the first lookup
        await asyncio.sleep(0.01)
        # Item 0 is still playing, yet every other lookup ran and both misses are synthesizing.
        assert cache.opens[1:] == ["static:c", key_of("второе слово", tts), key_of("третье слово", tts)]
        assert sorted(tts.calls) == sorted(["второе слово", "третье слово"])
        gate.set()
        rest = [chunk async for chunk in stream]
    assert first == cache.audio["static:a"][0]
    assert b"".join([first, *rest]).startswith(b"".join(cache.audio["static:a"]))
    await responder.shutdown()


async def test_first_chunk_does_not_wait_for_slow_later_items(cache: FakeAudioCache, tts: FakeTTS) -> None:
    cache.put("static:a", fragment(1, 100))
    cache.put("static:slow", fragment(2, 100))
    cache.open_delays["static:slow"] = 0.2
    tts.first_byte_delay_s = 0.2
    responder = make(cache, tts)
    loop = asyncio.get_running_loop()
    async with contextlib.aclosing(
        responder.play(Playlist.of(StaticItem("static:a"), StaticItem("static:slow"), TTSItem("потом")))
    ) as stream:
        started = loop.time()
        await anext(stream)
        assert loop.time() - started < 0.05


async def test_prefetch_bounds_concurrent_syntheses(cache: FakeAudioCache, tts: FakeTTS) -> None:
    tts.first_byte_delay_s = 0.01
    responder = make(cache, tts, prefetch=2)
    texts = [f"фраза номер {word}" for word in ("ноль", "один", "два", "три", "четыре", "пять")]
    chunks = await collect(responder.play(Playlist(tuple(TTSItem(t) for t in texts))))
    assert b"".join(chunks) == b"".join(tts.audio(t) for t in texts)
    assert tts.max_running == 2
    assert tts.calls == texts  # started in playlist order
    await responder.shutdown()


# -- TTS misses: streaming, single flight, cache fill ----------------------------------------------------


async def test_a_miss_streams_then_is_stored_in_20ms_chunks(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    tts.piece_bytes = 333 * 2
    responder = make(cache, tts)
    chunks = await collect(responder.play(Playlist.of(TTSItem("двенадцать тысяч"))))
    assert b"".join(chunks) == tts.audio("двенадцать тысяч")
    await responder.drain()
    key, stored, fmt = cache.writes[0]
    assert key == key_of("двенадцать тысяч", tts) and fmt == PCM24
    assert b"".join(stored) == tts.audio("двенадцать тысяч")
    assert all(len(c) == CHUNK for c in stored[:-1])
    assert [f["ok"] for _, f in events(caplog, "tts_cache_fill")] == [True]
    fill = events(caplog, "tts_cache_fill")[0][1]
    assert fill["key"] == key and fill["chunks"] == len(stored) and fill["latency_ms"] >= 0
    assert tts.requests[0] == SpeechRequest("двенадцать тысяч", VOICE, "", PCM24, 1.0)

    # The second play of the same playlist is a cache hit: no synthesis.
    again = await collect(responder.play(Playlist.of(TTSItem("двенадцать тысяч"))))
    assert b"".join(again) == tts.audio("двенадцать тысяч") and tts.calls == ["двенадцать тысяч"]
    metrics = responder.last_metrics
    assert metrics is not None and (metrics.hits, metrics.misses) == (1, 0)
    await responder.shutdown()


async def test_first_miss_chunk_is_handed_out_before_the_synthesis_ends(
    cache: FakeAudioCache, tts: FakeTTS
) -> None:
    tts.piece_bytes = CHUNK
    tts.piece_delay_s = 0.01
    responder = make(cache, tts)
    async with contextlib.aclosing(responder.play(Playlist.of(TTSItem("довольно длинная фраза")))) as stream:
        await anext(stream)
        assert tts.running == 1  # still synthesizing
        rest = [chunk async for chunk in stream]
    assert len(rest) > 5
    await responder.shutdown()


async def test_same_text_concurrent_misses_synthesize_once(cache: FakeAudioCache, tts: FakeTTS) -> None:
    tts.first_byte_delay_s = 0.02
    tts.piece_delay_s = 0.002
    tts.piece_bytes = 500
    responder = make(cache, tts)
    playlist = Playlist.of(TTSItem("одна и та же фраза"), PauseItem(20), TTSItem("одна и та же фраза"))

    async def late_listener() -> list[bytes]:
        await asyncio.sleep(0.03)  # joins while the synthesis is half done
        return await collect(responder.play(Playlist.of(TTSItem("одна и та же фраза"))))

    results = await asyncio.gather(
        collect(responder.play(playlist)),
        collect(responder.play(playlist)),
        late_listener(),
    )
    audio = tts.audio("одна и та же фраза")
    assert tts.calls == ["одна и та же фраза"]
    assert b"".join(results[0]) == b"".join(results[1]) == audio + silence(PCM24, 20) + audio
    assert b"".join(results[2]) == audio
    await responder.drain()
    assert len(cache.writes) == 1
    await responder.shutdown()


async def test_failure_midway_plays_what_came_and_the_rest_and_caches_nothing(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    cache.put("static:after", fragment(7, 100))
    tts.piece_bytes = 1000
    tts.fail_after["сломается посередине"] = 3000
    responder = make(cache, tts)
    playlist = Playlist.of(TTSItem("сломается посередине"), StaticItem("static:after"), TTSItem("целая"))

    chunks = await collect(responder.play(playlist))

    broken = tts.audio("сломается посередине")[:3000]
    assert b"".join(chunks) == broken + b"".join(cache.audio["static:after"]) + tts.audio("целая")
    await responder.drain()
    assert [w[0] for w in cache.writes] == [key_of("целая", tts)]  # the broken one is not cached
    failed = events(caplog, "hybrid_item_failed")
    assert len(failed) == 1
    assert failed[0][1]["index"] == 0 and failed[0][1]["error_type"] == "TTSError"
    metrics = responder.last_metrics
    assert metrics is not None and (metrics.failed, metrics.outcome) == (1, "degraded")
    assert len(metrics.degraded_items) == 1 and metrics.degraded_items[0].startswith("0:tts:")
    # Nothing is remembered for the key: the next request synthesizes again.
    tts.fail_after.clear()
    again = await collect(responder.play(Playlist.of(TTSItem("сломается посередине"))))
    assert b"".join(again) == tts.audio("сломается посередине")
    assert tts.calls.count("сломается посередине") == 2
    await responder.shutdown()


async def test_failure_before_the_first_byte_skips_the_item(cache: FakeAudioCache, tts: FakeTTS) -> None:
    cache.put("static:after", fragment(7, 40))
    tts.fail_after["ничего"] = 0
    responder = make(cache, tts)
    chunks = await collect(responder.play(Playlist.of(TTSItem("ничего"), StaticItem("static:after"))))
    assert b"".join(chunks) == b"".join(cache.audio["static:after"])
    await responder.shutdown()


async def test_barge_in_abandons_unheard_synthesis_and_caches_nothing(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    cache.put("static:a", fragment(1, 100))
    tts.gates["не успеет"] = asyncio.Event()
    responder = make(cache, tts)
    async with contextlib.aclosing(
        responder.play(Playlist.of(StaticItem("static:a"), TTSItem("не успеет")))
    ) as s:
        await anext(s)
        await asyncio.sleep(0.01)
        assert tts.calls == ["не успеет"]
    assert tts.cancelled == ["не успеет"]
    assert responder.syntheses_in_flight == 0 and responder.pending_writes == 0
    assert cache.writes == []
    assert [n for n, _ in events(caplog, "tts_synthesis_abandoned")] == ["tts_synthesis_abandoned"]
    metrics = responder.last_metrics
    assert metrics is not None and metrics.outcome == "closed"
    await responder.shutdown()


# -- missing static fragments ------------------------------------------------------------------------------


async def test_missing_static_is_spoken_from_its_transcript(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="voxcore.hybrid")
    cache.put("static:rub", fragment(3, 60))
    responder = make(cache, tts, transcripts={"intro": "Ваша стоимость составляет"})
    chunks = await collect(responder.play(Playlist.of(StaticItem("static:intro"), StaticItem("static:rub"))))
    assert b"".join(chunks) == tts.audio("Ваша стоимость составляет") + b"".join(cache.audio["static:rub"])
    assert events(caplog, "static_fragment_missing") == [
        ("static_fragment_missing", {"key": "static:intro", "fallback": "tts"})
    ]
    item = events(caplog, "hybrid_item")[0][1]
    assert (item["kind"], item["key"], item["source"]) == ("static", "static:intro", "tts")
    await responder.drain()
    assert [w[0] for w in cache.writes] == [key_of("Ваша стоимость составляет", tts)]
    await responder.shutdown()


async def test_missing_static_without_transcript_is_skipped_and_the_rest_plays(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    cache.put("static:b", fragment(2, 40))
    responder = make(cache, tts)
    chunks = await collect(
        responder.play(Playlist.of(StaticItem("static:gone"), StaticItem("static:b"), TTSItem("конец")))
    )
    assert b"".join(chunks) == b"".join(cache.audio["static:b"]) + tts.audio("конец")
    skipped = [r for r in caplog.records if r.getMessage() == "static_fragment_skipped"]
    assert len(skipped) == 1 and skipped[0].levelno == logging.ERROR
    metrics = responder.last_metrics
    assert metrics is not None and (metrics.skipped, metrics.hits, metrics.misses) == (1, 1, 1)
    await responder.shutdown()


# -- formats --------------------------------------------------------------------------------------------


async def test_fragment_in_another_format_goes_through_the_converter(
    cache: FakeAudioCache, tts: FakeTTS
) -> None:
    frames16 = array.array("h", range(-1600, 1600)).tobytes()  # 200 ms at 16 kHz
    cache.put("static:old", split_pcm(frames16, plan_chunks(PCM16, 20)), PCM16)
    converter = FakeConverter()
    responder = make(cache, tts, converter=converter)
    chunks = await collect(responder.play(Playlist.of(StaticItem("static:old"))))
    out = b"".join(chunks)
    assert converter.streams == [(PCM16, PCM24)]
    assert len(out) == len(frames16) * 3 // 2
    assert out == converter.convert(frames16, PCM16, PCM24)
    assert_chunked(chunks)
    metrics = responder.last_metrics
    assert metrics is not None and metrics.converted == 1


async def test_fragment_without_a_conversion_is_skipped(cache: FakeAudioCache, tts: FakeTTS) -> None:
    stereo = AudioFormat(24_000, 2, 2)
    cache.put("static:stereo", [b"\x01" * 3840], stereo)
    cache.put("static:ok", fragment(2, 40))
    responder = make(cache, tts)
    chunks = await collect(responder.play(Playlist.of(StaticItem("static:stereo"), StaticItem("static:ok"))))
    assert b"".join(chunks) == b"".join(cache.audio["static:ok"])
    metrics = responder.last_metrics
    assert metrics is not None and (metrics.skipped, metrics.failed) == (1, 1)


async def test_fragment_without_a_stored_format_is_assumed_in_the_target_format(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    cache.put("static:legacy", fragment(5, 60), fmt=None)
    responder = make(cache, tts)
    chunks = await collect(responder.play(Playlist.of(StaticItem("static:legacy"))))
    assert b"".join(chunks) == b"".join(cache.audio["static:legacy"])
    assert [n for n, _ in events(caplog, "hybrid_format_unknown")] == ["hybrid_format_unknown"]


# -- free text --------------------------------------------------------------------------------------------


async def test_speak_text_stream_starts_tts_before_the_answer_ends(
    cache: FakeAudioCache, tts: FakeTTS
) -> None:
    more = asyncio.Event()

    async def deltas() -> AsyncIterator[str]:
        for piece in ("Здравствуйте", "! Ваш заказ ", "готов к выдаче. Забрать его"):
            yield piece
        await more.wait()  # the model is still writing
        yield " можно до вечера."

    responder = make(cache, tts)
    async with contextlib.aclosing(responder.speak_text_stream(deltas())) as stream:
        first = await anext(stream)  # the answer has not ended yet
        await asyncio.sleep(0.01)
        assert tts.calls == ["Здравствуйте!", "Ваш заказ готов к выдаче."]
        more.set()
        rest = [chunk async for chunk in stream]
    sentences = ["Здравствуйте!", "Ваш заказ готов к выдаче.", "Забрать его можно до вечера."]
    assert b"".join([first, *rest]) == b"".join(tts.audio(s) for s in sentences)
    assert tts.calls == sentences
    await responder.shutdown()


async def test_speak_text_stream_reraises_the_source_error_after_the_finished_sentences(
    cache: FakeAudioCache, tts: FakeTTS
) -> None:
    async def deltas() -> AsyncIterator[str]:
        yield "Первое предложение готово. Второе обрыва"
        raise ConnectionError("LLM stream cut")

    responder = make(cache, tts)
    got: list[bytes] = []
    with pytest.raises(ConnectionError):
        async with contextlib.aclosing(responder.speak_text_stream(deltas())) as stream:
            async for chunk in stream:
                got.append(chunk)
    assert b"".join(got) == tts.audio("Первое предложение готово.")
    metrics = responder.last_metrics
    assert metrics is not None and metrics.outcome == "failed"
    await responder.shutdown()


async def test_speak_text_stream_of_nothing_yields_nothing(cache: FakeAudioCache, tts: FakeTTS) -> None:
    async def deltas() -> AsyncIterator[str]:
        yield "   "

    responder = make(cache, tts)
    assert await collect(responder.speak_text_stream(deltas())) == []
    metrics = responder.last_metrics
    assert metrics is not None
    assert (metrics.items, metrics.time_to_first_audio_ms, metrics.outcome) == (0, None, "ok")


# -- background writes and shutdown --------------------------------------------------------------------


async def test_shutdown_returns_after_pending_writes_finished(cache: FakeAudioCache, tts: FakeTTS) -> None:
    cache.write_gate = asyncio.Event()
    responder = make(cache, tts)
    await collect(responder.play(Playlist.of(TTSItem("запомни меня"))))
    assert responder.pending_writes == 1 and cache.writes == []
    asyncio.get_running_loop().call_later(0.02, cache.write_gate.set)
    await responder.shutdown()
    assert [w[0] for w in cache.writes] == [key_of("запомни меня", tts)]
    assert responder.pending_writes == 0
    with pytest.raises(RuntimeError, match="shut down"):
        await collect(responder.play(Playlist.of(TTSItem("ещё"))))


async def test_shutdown_cancels_writes_that_outlast_the_timeout_with_a_logged_event(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    cache.write_gate = asyncio.Event()  # never opens
    responder = make(cache, tts)
    await collect(responder.play(Playlist.of(TTSItem("не успеет записаться"))))
    await responder.shutdown(timeout_s=0.01)
    assert responder.pending_writes == 0 and cache.writes == []
    cancelled = events(caplog, "tts_cache_fill_cancelled")
    assert [f["key"] for _, f in cancelled] == [key_of("не успеет записаться", tts)]
    assert events(caplog, "hybrid_shutdown")[0][1]["writes_cancelled"] == 1


async def test_writes_beyond_the_bound_are_skipped(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    cache.write_gate = asyncio.Event()
    responder = make(cache, tts, max_background_writes=1)
    await collect(responder.play(Playlist.of(TTSItem("первая"), TTSItem("вторая"))))
    assert responder.pending_writes == 1
    assert [f["reason"] for _, f in events(caplog, "tts_cache_fill_skipped")] == ["busy"]
    cache.write_gate.set()
    await responder.shutdown()
    assert len(cache.writes) == 1


# -- telemetry -------------------------------------------------------------------------------------------


async def test_turn_log_line_and_span_share_keys_and_items_get_child_spans(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    cache.put("static:intro", fragment(1, 60))
    responder = make(cache, tts, tracer_provider=provider, meter_provider=meters)

    await collect(responder.play(Playlist.of(StaticItem("static:intro"), TTSItem("12500"))))
    await responder.shutdown()

    spans = {span.name: span for span in exporter.get_finished_spans()}
    playlist = spans["voxcore.hybrid.playlist"]
    turn_fields = events(caplog, "hybrid_turn")[0][1]
    attributes = dict(playlist.attributes or {})
    assert set(attributes) == {TURN_ATTRIBUTE_PREFIX + key for key in turn_fields}
    assert {key: attributes[TURN_ATTRIBUTE_PREFIX + key] for key in turn_fields} == turn_fields
    assert {
        "items",
        "time_to_first_audio_ms",
        "playlist_first_audio_ms",
        "voices",
        "total_ms",
        "hits",
        "misses",
        "tts_ttfb_ms",
        "converted",
        "skipped",
    } <= set(turn_fields)
    items = [s for s in exporter.get_finished_spans() if s.name == "voxcore.hybrid.item"]
    assert len(items) == 2
    assert all(s.parent is not None and s.parent.span_id == playlist.context.span_id for s in items)
    sources = sorted(str((s.attributes or {})["voxcore.hybrid.item.source"]) for s in items)
    assert sources == ["hit", "miss"]
    fill = spans["voxcore.hybrid.cache_fill"]
    assert fill.attributes is not None and fill.attributes["voxcore.hybrid.fill.ok"] is True

    data = reader.get_metrics_data()
    assert data is not None
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert "voxcore.hybrid.time_to_first_audio" in names


def test_constructor_validates() -> None:
    cache, tts = FakeAudioCache(), FakeTTS()
    with pytest.raises(ValueError):
        make(cache, tts, prefetch=0)
    with pytest.raises(ValueError):
        make(cache, tts, max_background_writes=0)
    with pytest.raises(ValueError):
        HybridResponder(cache=cache, tts=tts, converter=FakeConverter(), target_format=PCM24, voice="")
    with pytest.raises(InvalidAudioError):
        make(cache, tts, chunk_ms=0)
    with pytest.raises(TypeError):
        make(cache, tts).play([StaticItem("static:a")])  # type: ignore[arg-type]


async def test_cancelling_the_listener_while_it_waits_cleans_everything_up(
    cache: FakeAudioCache, tts: FakeTTS
) -> None:
    cache.put("static:slow", fragment(1, 100))
    cache.open_delays["static:slow"] = 0.05
    tts.first_byte_delay_s = 0.05
    responder = make(cache, tts)

    async def listen(playlist: Playlist) -> list[bytes]:
        return await collect(responder.play(playlist))

    for playlist in (
        Playlist.of(StaticItem("static:slow")),
        Playlist.of(TTSItem("долго ждать"), PauseItem(10)),
    ):
        task = asyncio.create_task(listen(playlist))
        await asyncio.sleep(0.01)  # waiting for the lookup / the first byte
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.08)  # the lookup that was in flight has answered meanwhile
        metrics = responder.last_metrics
        assert metrics is not None and metrics.outcome == "closed"
    assert responder.syntheses_in_flight == 0 and responder.pending_writes == 0
    assert cache.writes == [] and all(stream.closed for stream in cache.streams)
    await responder.shutdown()


# -- first-item latency: speculative TTS, remembered static formats -----------------------------------


async def test_first_item_tts_request_goes_out_with_its_lookup(cache: FakeAudioCache, tts: FakeTTS) -> None:
    key = key_of("новый текст", tts)
    cache.open_delays[key] = 0.05
    responder = make(cache, tts, speculative_first_tts=True)
    async with contextlib.aclosing(responder.play(Playlist.of(TTSItem("новый текст")))) as stream:
        task = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)
        assert cache.opens == [key] and tts.calls == ["новый текст"]  # not waiting for the lookup
        first = await task
        rest = [chunk async for chunk in stream]
    assert b"".join([first, *rest]) == tts.audio("новый текст")
    await responder.shutdown()


async def test_speculation_is_cancelled_on_a_hit_and_not_repeated(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    key = key_of("уже в кэше", tts)
    cached = split_pcm(pcm_for("other process", 9600), plan_chunks(PCM24, 20))
    cache.put(key, cached)  # stored by another process: this responder has never seen it
    tts.first_byte_delay_s = 0.05
    responder = make(cache, tts, speculative_first_tts=True)

    first = await collect(responder.play(Playlist.of(TTSItem("уже в кэше"))))
    second = await collect(responder.play(Playlist.of(TTSItem("уже в кэше"))))

    assert b"".join(first) == b"".join(second) == b"".join(cached)
    assert tts.calls == ["уже в кэше"] and tts.cancelled == ["уже в кэше"]  # once, then remembered
    assert [f["key"] for _, f in events(caplog, "tts_speculation_cancelled")] == [key]
    await responder.drain()
    assert cache.writes == [] and responder.syntheses_in_flight == 0
    await responder.shutdown()


async def test_without_speculation_a_cached_first_item_never_reaches_the_engine(
    cache: FakeAudioCache, tts: FakeTTS
) -> None:
    key = key_of("уже в кэше", tts)
    cache.put(key, fragment(4, 60))
    responder = make(cache, tts, speculative_first_tts=False)
    chunks = await collect(responder.play(Playlist.of(TTSItem("уже в кэше"))))
    assert b"".join(chunks) == b"".join(cache.audio[key]) and tts.calls == []


async def test_remembered_static_format_skips_the_format_read_before_the_first_chunk(
    cache: FakeAudioCache, tts: FakeTTS
) -> None:
    cache.put("static:intro", fragment(1, 100))
    responder = make(cache, tts)
    await collect(responder.play(Playlist.of(StaticItem("static:intro"))))
    assert cache.format_calls == ["static:intro"]
    cache.open_delays["static:intro"] = 0.0

    async with contextlib.aclosing(responder.play(Playlist.of(StaticItem("static:intro")))) as stream:
        await anext(stream)
        assert cache.format_calls == ["static:intro"]  # the first chunk did not wait for it
        rest = [chunk async for chunk in stream]
    assert cache.format_calls == ["static:intro", "static:intro"]  # checked before the second chunk
    assert len(rest) == 4


async def test_fragment_rewritten_with_the_same_first_bytes_in_another_format_is_switched(
    cache: FakeAudioCache, tts: FakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxcore.hybrid")
    silent24 = [bytes(CHUNK)] * 5  # 100 ms of silence at 24 kHz
    cache.put("static:intro", silent24)
    converter = FakeConverter()
    responder = make(cache, tts, converter=converter)
    await collect(responder.play(Playlist.of(StaticItem("static:intro"))))

    # Re-stored at 48 kHz: the first chunk (960 zero bytes = 10 ms at 48 kHz) looks the same.
    pcm48 = bytes(CHUNK) + array.array("h", [1000] * (48_000 * 90 // 1000)).tobytes()
    pcm48_fmt = AudioFormat(48_000, 1, 2)
    cache.put("static:intro", split_pcm(pcm48, plan_chunks(PCM24, 20)), pcm48_fmt)
    out = b"".join(await collect(responder.play(Playlist.of(StaticItem("static:intro")))))

    changed = events(caplog, "hybrid_format_changed")
    assert [f["key"] for _, f in changed] == ["static:intro"]
    assert converter.streams == [(pcm48_fmt, PCM24)]
    # The first chunk went out as remembered (silence either way); the rest was converted 48k -> 24k.
    assert out[:CHUNK] == bytes(CHUNK)
    assert len(out) == CHUNK + (len(pcm48) - CHUNK) // 2
    third = b"".join(await collect(responder.play(Playlist.of(StaticItem("static:intro")))))
    assert len(third) == len(pcm48) // 2  # now known: converted from the first chunk on


async def test_pauses_alone_and_first(cache: FakeAudioCache, tts: FakeTTS) -> None:
    cache.put("static:b", fragment(2, 40))
    responder = make(cache, tts)
    playlist = Playlist.of(PauseItem(30), PauseItem(15), StaticItem("static:b"), PauseItem(5))
    chunks = await collect(responder.play(playlist))
    expected = silence(PCM24, 30) + silence(PCM24, 15) + b"".join(cache.audio["static:b"]) + silence(PCM24, 5)
    assert b"".join(chunks) == expected
    assert_chunked(chunks)
    assert b"".join(await collect(responder.play(Playlist.of(PauseItem(7))))) == silence(PCM24, 7)
