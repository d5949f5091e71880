"""What the caller hears: amounts are the right words (checked against espeak-ng itself), spoken from
the shipped number pack with no TTS request, joined without holes or clicks, and honest outcomes."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import wave
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from voxcore.adapters.audio import SoxrAudioConverter
from voxcore.adapters.espeak import EspeakTTSEngine
from voxcore.adapters.openai.tts import OpenAITTSEngine
from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.application.hybrid import HybridResponder
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.fragments import FragmentSpec
from voxcore.core.domain.playlist import Playlist, StaticItem, TTSItem
from voxcore.core.domain.russian import NUMBER_PACK, hybrid_amount_playlist, money_words
from voxcore.core.domain.tts_text import normalize_tts_text
from voxcore.core.ports.tts import SpeechRequest, TTSEngine
from voxcore.entrypoints.cli import demo_manifest, numbers_manifest
from voxcore.entrypoints.manifest import read_manifest
from voxcore.simulator.openai_server import AUDIO_SPEECH_PATH, OpenAISimulator

PCM16 = AudioFormat(16_000, 1, 2)
INTRO = "Ваша стоимость составляет"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def shipped() -> list[FragmentSpec]:
    return read_manifest(demo_manifest()) + read_manifest(numbers_manifest())


def transcripts() -> dict[str, str]:
    return {spec.key: spec.transcript for spec in shipped() if spec.transcript}


def wav_pcm(path: str | Path) -> bytes:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16_000, 1, 2)
        return w.readframes(w.getnframes())


async def load_shipped(cache: RedisCacheManager, keys: set[str] | None = None) -> None:
    for spec in shipped():
        if keys is None or spec.key in keys:
            assert (await cache.load_audio_file(spec.key, str(spec.file))).ok, spec.key


async def collect(stream: AsyncGenerator[bytes, None]) -> bytes:
    return b"".join([chunk async for chunk in stream])


def phonemes(text: str) -> str:
    done = subprocess.run(
        ["espeak-ng", "-v", "ru", "-q", "-x"], input=text.encode(), capture_output=True, check=True
    )
    return " ".join(done.stdout.decode().split())


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.int32)


def longest_quiet_ms(pcm: bytes, threshold: int = 160) -> float:
    quiet = np.concatenate(([0], (np.abs(samples(pcm)) <= threshold).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(quiet))
    runs = edges[1::2] - edges[::2]
    return float(runs.max()) / 16 if runs.size else 0.0


def quiet_ms_around(pcm: bytes, index: int, threshold: int = 160) -> float:
    """Length of the silence that holds sample ``index`` (0 when that sample is not quiet)."""
    quiet = np.abs(samples(pcm)) <= threshold
    if not quiet[index]:
        return 0.0
    start, end = index, index
    while start > 0 and quiet[start - 1]:
        start -= 1
    while end < len(quiet) - 1 and quiet[end + 1]:
        end += 1
    return (end - start + 1) / 16


def script() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "scripts" / "make_speech_fragments.py"
    spec = importlib.util.spec_from_file_location("make_speech_fragments", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingEngine(TTSEngine):
    """An engine that records what it is asked to say, then lets a real engine say it."""

    def __init__(self, inner: TTSEngine) -> None:
        self.inner = inner
        self.texts: list[str] = []
        self.name = inner.name

    async def stream_speech(self, request: SpeechRequest) -> AsyncGenerator[bytes, None]:
        self.texts.append(request.text)
        async for piece in self.inner.stream_speech(request):
            yield piece

    async def check(self) -> None:
        await self.inner.check()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
async def sim() -> AsyncIterator[OpenAISimulator]:
    async with OpenAISimulator() as simulator:
        yield simulator


def responder(cache: RedisCacheManager, engine: TTSEngine, **kwargs: object) -> HybridResponder:
    return HybridResponder(
        cache=cache,
        tts=engine,
        converter=SoxrAudioConverter(),
        target_format=PCM16,
        voice=str(kwargs.pop("voice", "ru")),
        transcripts=transcripts(),
        **kwargs,  # type: ignore[arg-type]
    )


# -- the number pack ---------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [12_500, 21_001, 1, 2_000_002])
async def test_a_money_reply_with_the_pack_loaded_makes_no_tts_request(
    cache: RedisCacheManager, sim: OpenAISimulator, amount: int
) -> None:
    await load_shipped(cache)
    engine = OpenAITTSEngine(base_url=sim.base_url, api_key="sk-test", timeout_s=5.0)
    hybrid = responder(cache, engine, voice="alloy")
    try:
        playlist = hybrid_amount_playlist(amount)
        audio = await collect(hybrid.play(playlist))
    finally:
        await hybrid.shutdown()
        await engine.aclose()
    assert sim.request_count(AUDIO_SPEECH_PATH) == 0
    metrics = hybrid.last_metrics
    assert metrics is not None and metrics.outcome == "ok" and metrics.voices == ("static",)
    assert (metrics.hits, metrics.misses, metrics.degraded_items) == (len(playlist), 0, ())
    # What plays is the fragments of the reference words, in order (each starts ramped from the
    # previous one's last sample: the first 4 ms of each may differ, nothing else).
    by_key = {spec.key: spec for spec in shipped()}
    said = " ".join(by_key[key].transcript for key in playlist.static_keys)
    assert said == f"{INTRO} {money_words(amount)}"
    offset = 0
    for key in playlist.static_keys:
        fragment = wav_pcm(by_key[key].file)
        assert audio[offset + 128 : offset + len(fragment)] == fragment[128:], key
        offset += len(fragment)
    assert offset == len(audio)


@needs_espeak
def test_the_words_of_an_amount_are_what_espeak_says_for_the_reference_words() -> None:
    # The bug this fixes: espeak-ng reads the digit groups of "12 500" as two numbers.
    assert "t'ys;VtS;" not in phonemes("12 500")
    reference = f"{INTRO} двенадцать тысяч пятьсот рублей"
    assert normalize_tts_text(f"{INTRO} 12 500 рублей") == reference
    playlist = hybrid_amount_playlist(12_500)
    by_key = {spec.key: spec.transcript for spec in shipped()}
    # The phonemes of the fragments' transcripts, word by word, are those of the reference sentence.
    assert " ".join(phonemes(by_key[key]) for key in playlist.static_keys) == phonemes(reference)


def spectral_frames(pcm: bytes) -> np.ndarray:
    """Log energies in 24 log-spaced bands per 10 ms (25 ms Hann windows), mean-normalized."""
    x = samples(pcm).astype(np.float32) / 32768.0
    window = np.hanning(400)
    frames = np.array([x[i : i + 400] * window for i in range(0, len(x) - 400, 160)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    edges = np.geomspace(2, 200, 25).astype(int)
    bands = np.stack([power[:, edges[i] : edges[i + 1] + 1].sum(1) for i in range(24)], 1)
    features = np.log(bands + 1e-8)
    return features - features.mean(0)


def dtw_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Dynamic-time-warping distance of two feature sequences, per aligned frame."""
    cost = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    total = np.full((len(a) + 1, len(b) + 1), np.inf)
    total[0, 0] = 0.0
    for i in range(1, len(a) + 1):
        row, prev = total[i], total[i - 1]
        best = np.minimum(prev[1:], prev[:-1]) + cost[i - 1]
        for j in range(1, len(b) + 1):  # the left neighbour depends on this row: sequential
            row[j] = min(best[j - 1], row[j - 1] + cost[i - 1, j - 1])
    return float(total[-1, -1]) / (len(a) + len(b))


@needs_espeak
async def test_the_demo_amount_sounds_like_espeak_saying_the_reference_words(
    cache: RedisCacheManager, sim: OpenAISimulator
) -> None:
    await load_shipped(cache)
    engine = OpenAITTSEngine(base_url=sim.base_url, api_key="sk-test", timeout_s=5.0)
    hybrid = responder(cache, engine, voice="alloy")
    try:
        reply = await collect(hybrid.play(hybrid_amount_playlist(12_500)))  # as the demo call plays it
    finally:
        await hybrid.shutdown()
        await engine.aclose()
    maker = script()
    heard = spectral_frames(reply)
    distance = {
        text: dtw_distance(heard, spectral_frames(maker.speak("espeak-ng", text)))
        for text in (
            f"{INTRO} двенадцать тысяч пятьсот рублей",  # the reference words
            f"{INTRO} 12 500 рублей",  # espeak-ng reading the digit groups: "двенадцать пятьсот"
            f"{INTRO} двадцать одна тысяча один рубль",  # another amount
        )
    }
    reference, digits, other = distance.values()
    assert reference < 0.8 * digits and reference < 0.8 * other, distance


@needs_espeak
def test_every_shipped_fragment_is_espeaks_rendering_of_its_transcript() -> None:
    maker = script()
    header = demo_manifest().read_text(encoding="utf-8").splitlines()[1]
    same_version = maker.espeak_version("espeak-ng") in header
    for spec in shipped():
        recorded = wav_pcm(spec.file)
        fresh = maker.speak("espeak-ng", spec.transcript)
        if same_version:  # the script is reproducible: byte for byte
            assert recorded == fresh, spec.key
        else:  # another espeak-ng: at least the same speech length
            assert 0.8 < len(recorded) / len(fresh) < 1.25, spec.key
        # Speech with the pauses of speech (sentence breaks in the example), no padding, no tone.
        assert longest_quiet_ms(recorded) < 400, spec.key
        # Edge silence cut to 15 ms (a stop consonant's closure may add a few ms of its own).
        last = len(recorded) // 2 - 1
        assert quiet_ms_around(recorded, 0) <= 20 and quiet_ms_around(recorded, last) <= 20, spec.key


@needs_espeak
async def test_without_the_pack_each_word_is_synthesized_and_the_reply_is_degraded(
    cache: RedisCacheManager,
) -> None:
    await load_shipped(cache, {"static:intro"})
    engine = RecordingEngine(EspeakTTSEngine())
    hybrid = responder(cache, engine)
    try:
        audio = await collect(hybrid.play(hybrid_amount_playlist(12_500)))
    finally:
        await hybrid.shutdown()
    assert sorted(engine.texts) == sorted("двенадцать тысяч пятьсот рублей".split())
    metrics = hybrid.last_metrics
    assert metrics is not None and metrics.outcome == "degraded"
    assert metrics.degraded_items == (
        "1:static:num_12:substituted by tts",
        "2:static:num_thousand_many:substituted by tts",
        "3:static:num_500:substituted by tts",
        "4:static:currency_rub_many:substituted by tts",
    )
    assert metrics.voices == ("static", "espeak-ng/ru") and len(audio) > 16_000 * 2


async def test_missing_fragments_without_transcripts_are_named_in_a_degraded_outcome(
    cache: RedisCacheManager, sim: OpenAISimulator
) -> None:
    await load_shipped(cache, {"static:intro", "static:num_12"})
    engine = OpenAITTSEngine(base_url=sim.base_url, api_key="sk-test", timeout_s=5.0)
    hybrid = HybridResponder(
        cache=cache, tts=engine, converter=SoxrAudioConverter(), target_format=PCM16, voice="alloy"
    )
    try:
        audio = await collect(hybrid.play(hybrid_amount_playlist(12_500)))
    finally:
        await hybrid.shutdown()
        await engine.aclose()
    metrics = hybrid.last_metrics
    assert metrics is not None and metrics.outcome == "degraded" and metrics.skipped == 3
    assert metrics.degraded_items == (
        "2:static:num_thousand_many:skipped",
        "3:static:num_500:skipped",
        "4:static:currency_rub_many:skipped",
    )
    assert audio and sim.request_count(AUDIO_SPEECH_PATH) == 0


# -- joins -------------------------------------------------------------------------------------------


@needs_espeak
@pytest.mark.parametrize("pause_ms", [60, 30])
async def test_joins_have_no_hole_and_no_step(cache: RedisCacheManager, pause_ms: int) -> None:
    await load_shipped(cache, {"static:intro", "static:currency_rub_many"})
    by_key = {spec.key: spec for spec in shipped()}
    intro, rub = (wav_pcm(by_key[k].file) for k in ("static:intro", "static:currency_rub_many"))
    playlist = Playlist.of(
        StaticItem("static:intro"),
        TTSItem("двенадцать тысяч пятьсот"),
        StaticItem("static:currency_rub_many"),
    )
    engine = EspeakTTSEngine()
    hybrid = responder(cache, engine, join_pause_ms=pause_ms)
    raw = responder(cache, engine, join_pause_ms=None)
    try:
        audio = await collect(hybrid.play(playlist))
        untrimmed = await collect(raw.play(playlist))
    finally:
        await hybrid.shutdown()
        await raw.shutdown()
    # espeak-ng pads its speech with ~330 ms of silence: the reply without trimming has that hole.
    assert longest_quiet_ms(untrimmed) > 250
    a = samples(audio)
    joins = [len(intro) // 2, (len(audio) - len(rub)) // 2]
    for j in joins:
        # Trimmed: no silence at a join longer than the configured pause...
        assert quiet_ms_around(audio, j) <= pause_ms and quiet_ms_around(audio, j - 1) <= pause_ms
        # ... and no step: the samples before and after the join are close.
        assert abs(int(a[j]) - int(a[j - 1])) <= 600, j
    if pause_ms >= 60:  # with the default pause, no silence anywhere in the reply is longer
        assert longest_quiet_ms(audio) <= pause_ms
    # The synthesized words lost only their padding: still most of their speech.
    spoken = len(audio) - len(intro) - len(rub)
    assert 16_000 * 2 * 0.5 < spoken < len(untrimmed) - len(intro) - len(rub)


def test_the_shipped_manifests_list_every_fragment_with_its_exact_transcript() -> None:
    pack = {spec.key: spec.transcript for spec in read_manifest(numbers_manifest())}
    assert pack == {f"static:{name}": word for word, name in NUMBER_PACK.items()}
    for spec in shipped():
        assert Path(spec.file).is_file() and spec.transcript, spec.key
    shipped_wavs = {p.resolve() for p in demo_manifest().parent.rglob("*.wav")}
    assert shipped_wavs == {Path(spec.file).resolve() for spec in shipped()}  # nothing unlisted
