"""Chunking math and WAV parsing (pure domain), with hypothesis for the frame arithmetic."""

from __future__ import annotations

import io
import struct
import wave

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxcore.core.domain.audio import AudioFormat, parse_wav, plan_chunks, split_pcm
from voxcore.core.domain.errors import InvalidAudioError


def make_wav(rate: int, channels: int, width: int, nframes: int, seed: int = 0) -> tuple[bytes, bytes]:
    """A WAV file made by the stdlib ``wave`` module, and its PCM payload."""
    frame = channels * width
    pcm = bytes((seed + i * 7) % 256 for i in range(nframes * frame))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue(), pcm


def test_spec_c_frame_math_for_16k_mono_20ms() -> None:
    plan = plan_chunks(AudioFormat(16_000, 1, 2), 20)
    assert (plan.frames_per_chunk, plan.bytes_per_chunk) == (320, 640)


@pytest.mark.parametrize(
    ("rate", "channels", "width", "expected_bytes"),
    [
        (8_000, 1, 1, 160),
        (16_000, 2, 2, 1280),
        (48_000, 2, 3, 5760),
        (44_100, 1, 2, 1764),
        (22_050, 1, 4, 1764),
    ],
)
def test_bytes_per_chunk_holds_whole_frames(
    rate: int, channels: int, width: int, expected_bytes: int
) -> None:
    plan = plan_chunks(AudioFormat(rate, channels, width), 20)
    assert plan.bytes_per_chunk == expected_bytes
    assert plan.bytes_per_chunk % (channels * width) == 0


def test_tiny_rate_still_makes_one_frame_chunks() -> None:
    assert plan_chunks(AudioFormat(10, 1, 2), 20).frames_per_chunk == 1


@pytest.mark.parametrize("bad", [0, -20, 2.5, "20", True, None])
def test_chunk_ms_must_be_positive_int(bad: object) -> None:
    with pytest.raises(InvalidAudioError):
        plan_chunks(AudioFormat(16_000, 1, 2), bad)  # type: ignore[arg-type]


@given(
    rate=st.integers(1, 192_000),
    channels=st.integers(1, 8),
    width=st.sampled_from([1, 2, 3, 4]),
    chunk_ms=st.integers(1, 1000),
    nframes=st.integers(0, 5000),
)
def test_split_is_lossless_and_frame_aligned(
    rate: int, channels: int, width: int, chunk_ms: int, nframes: int
) -> None:
    fmt = AudioFormat(rate, channels, width)
    plan = plan_chunks(fmt, chunk_ms)
    assert plan.frames_per_chunk == max(1, int(rate * chunk_ms / 1000))
    pcm = bytes(i % 251 for i in range(nframes * fmt.frame_size))
    chunks = split_pcm(pcm, plan)
    assert b"".join(chunks) == pcm
    assert len(chunks) == plan.chunk_count(len(pcm)) == -(-nframes // plan.frames_per_chunk)
    assert all(len(c) == plan.bytes_per_chunk for c in chunks[:-1])
    assert all(len(c) % fmt.frame_size == 0 and c for c in chunks)


@pytest.mark.parametrize(("channels", "width"), [(1, 1), (1, 2), (2, 2), (1, 3), (2, 3), (1, 4)])
def test_parse_wav_roundtrip_odd_frame_counts(channels: int, width: int) -> None:
    data, pcm = make_wav(16_000, channels, width, nframes=1601)
    wav = parse_wav(data)
    assert bytes(wav.pcm) == pcm
    assert (wav.format.channels, wav.format.sample_width, wav.format.sample_rate) == (channels, width, 16_000)
    assert wav.nframes == 1601
    assert wav.format.encoding == {1: "pcm_u8", 2: "pcm_s16le", 3: "pcm_s24le", 4: "pcm_s32le"}[width]
    chunks = split_pcm(wav.pcm, plan_chunks(wav.format, 20))
    assert len(chunks) == 6 and len(chunks[-1]) == channels * width  # 1601 = 5 * 320 + 1


def test_parse_wav_extensible_pcm() -> None:
    _, pcm = make_wav(48_000, 2, 3, 10)
    guid = b"\x01\x00" + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    fmt = struct.pack("<HHIIHH", 0xFFFE, 2, 48_000, 48_000 * 6, 6, 24) + struct.pack("<HHI", 22, 24, 3) + guid
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    wav = parse_wav(b"RIFF" + struct.pack("<I", len(body)) + body)
    assert wav.format == AudioFormat(48_000, 2, 3) and bytes(wav.pcm) == pcm


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: b"", "not a WAV"),
        (lambda d: b"OggS" + d[4:], "not a WAV"),
        (lambda d: d[:30], "truncated"),
        (lambda d: d[:-10], "truncated"),
        (lambda d: d[:20] + struct.pack("<H", 3) + d[22:], "not integer PCM"),  # IEEE float
        (lambda d: d[:20] + struct.pack("<H", 6) + d[22:], "not integer PCM"),  # A-law
        (lambda d: d[:34] + struct.pack("<H", 12) + d[36:], "sample size"),
        (lambda d: d[:22] + struct.pack("<H", 0) + d[24:], "channels"),
    ],
)
def test_parse_wav_rejects_bad_files(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    data, _ = make_wav(16_000, 1, 2, 100)
    with pytest.raises(InvalidAudioError, match=reason):
        parse_wav(mutate(data))


def test_parse_wav_rejects_empty_audio() -> None:
    data, _ = make_wav(16_000, 1, 2, 0)
    with pytest.raises(InvalidAudioError, match="no audio frames"):
        parse_wav(data)


def test_format_fields_roundtrip_and_validation() -> None:
    fmt = AudioFormat(24_000, 1, 2)
    assert AudioFormat.from_fields(fmt.to_fields()) == fmt
    assert fmt.duration_ms(48_000) == 1000.0
    with pytest.raises(InvalidAudioError):
        AudioFormat.from_fields({"sample_rate": "x"})
    with pytest.raises(InvalidAudioError):
        AudioFormat(16_000, 1, 5)
