"""Seamless joins: edge silence trimmed to a pause, fades, no sample step where pieces meet."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.joins import EdgeTrimmer, JoinError, fade, last_sample, ramp_from, trim_silence

FMT = AudioFormat(16_000, 1, 2)
MS = 16  # samples per millisecond at 16 kHz


def pcm(samples: list[int]) -> bytes:
    return array("h", samples).tobytes()


def samples_of(data: bytes) -> list[int]:
    out = array("h")
    out.frombytes(data)
    return list(out)


def tone(ms: int, amplitude: int = 8000) -> list[int]:
    """A square wave: loud from its first sample to its last (its edges are the piece's edges)."""
    return [amplitude if (i // 27) % 2 else -amplitude for i in range(ms * MS)]


def quiet(ms: int, level: int = 0) -> list[int]:
    return [level] * (ms * MS)


def test_edge_silence_is_cut_to_keep_ms_and_the_middle_is_untouched() -> None:
    body = tone(100) + quiet(200) + tone(100)  # a pause inside the piece stays as it is
    out = samples_of(trim_silence(pcm(quiet(300) + body + quiet(330)), FMT, keep_ms=30, fade_ms=4))
    assert len(out) == (30 + 400 + 30) * MS
    assert out[30 * MS + 4 * MS : 30 * MS + 396 * MS] == body[4 * MS : 396 * MS]
    assert out[0] == 0 and out[-1] == 0  # starts from and fades out to zero


def test_low_noise_counts_as_silence_and_a_piece_of_silence_says_nothing() -> None:
    out = trim_silence(pcm(quiet(100, 90) + tone(50) + quiet(100, -120)), FMT, keep_ms=10)
    assert len(out) == (10 + 50 + 10) * MS * 2
    assert trim_silence(pcm(quiet(500, 100)), FMT) == b""


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4000), min_size=1, max_size=8))
def test_streaming_gives_the_same_bytes_however_the_piece_is_cut(cuts: list[int]) -> None:
    whole = pcm(quiet(120) + tone(80) + quiet(50) + tone(60) + quiet(200))
    trimmer = EdgeTrimmer(FMT, keep_ms=25)
    out, start = b"", 0
    for size in cuts:
        out += trimmer.feed(whole[start : start + size])  # odd sizes: partial samples held back
        start += size
    out += trimmer.feed(whole[start:]) + trimmer.flush()
    assert out == trim_silence(whole, FMT, keep_ms=25)


def test_other_encodings_pass_through() -> None:
    mulaw = AudioFormat(8_000, 1, 1, "pcm_mulaw")
    data = bytes([0xFF]) * 800 + bytes(range(256))
    assert trim_silence(data, mulaw) == data
    assert ramp_from(1000, data, mulaw) == data and last_sample(data, mulaw) is None


def test_ramp_removes_the_step_and_leaves_the_rest() -> None:
    piece = [5000] * (20 * MS)
    out = samples_of(ramp_from(-3000, pcm(piece), FMT, ramp_ms=4))
    assert out[0] == -3000 and out[4 * MS :] == piece[4 * MS :]
    assert max(abs(b - a) for a, b in zip(out, out[1:], strict=False)) <= 8000 // (4 * MS) + 1
    assert ramp_from(5000, pcm(piece), FMT) == pcm(piece)  # no step: unchanged


def test_fade_and_last_sample() -> None:
    out = samples_of(fade(pcm([1000] * 320), FMT, fade_in_ms=5, fade_out_ms=5))
    assert out[0] == 0 and out[40] == 500 and out[80:240] == [1000] * 160 and out[-1] == 0
    assert last_sample(pcm([1, 2, -7]), FMT) == -7


@pytest.mark.parametrize("kwargs", [{"keep_ms": -1}, {"threshold": 40_000}, {"fade_ms": 1.5}])
def test_bad_parameters_are_a_clear_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(JoinError):
        EdgeTrimmer(FMT, **kwargs)  # type: ignore[arg-type]
