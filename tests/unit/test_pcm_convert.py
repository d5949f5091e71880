"""PCM conversion: sample-width scaling, channel mixing, soxr resampling, streaming == one-shot."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxcore.adapters.audio import SUPPORTED_ENCODINGS, PcmConverter, convert_pcm
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.errors import InvalidAudioError

U8 = AudioFormat(16_000, 1, 1)
S16 = AudioFormat(16_000, 1, 2)
S24 = AudioFormat(16_000, 1, 3)
S32 = AudioFormat(16_000, 1, 4)
S16_STEREO = AudioFormat(16_000, 2, 2)

s16_values = st.lists(st.integers(-32768, 32767), min_size=1, max_size=64)


def s16(values: list[int] | np.ndarray) -> bytes:
    return np.asarray(values, dtype="<i2").tobytes()


def ints(data: bytes, fmt: AudioFormat) -> np.ndarray:
    """Decode PCM to plain integers (u8 stays unsigned) for comparisons."""
    if fmt.sample_width == 1:
        return np.frombuffer(data, np.uint8).astype(np.int64)
    if fmt.sample_width == 3:
        raw = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int64)
        value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        return np.where(value >= 1 << 23, value - (1 << 24), value)
    return np.frombuffer(data, f"<i{fmt.sample_width}").astype(np.int64)


def sine(rate: int, seconds: float, hz: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * hz * t)


# ------------------------------------------------------------------------------------ sample width


@given(s16_values)
def test_widening_s16_is_exact_and_round_trips(values: list[int]) -> None:
    data = s16(values)
    as24 = convert_pcm(data, S16, S24)
    as32 = convert_pcm(data, S16, S32)
    assert ints(as24, S24).tolist() == [v * 256 for v in values]
    assert ints(as32, S32).tolist() == [v * 65536 for v in values]
    assert convert_pcm(as24, S24, S16) == data
    assert convert_pcm(as32, S32, S16) == data
    assert convert_pcm(as24, S24, S32) == as32


@given(st.lists(st.integers(0, 255), min_size=1, max_size=64))
def test_u8_is_offset_binary_and_round_trips(values: list[int]) -> None:
    data = bytes(values)
    wide = convert_pcm(data, U8, S16)
    assert ints(wide, S16).tolist() == [(v - 128) * 256 for v in values]
    assert convert_pcm(wide, S16, U8) == data
    assert convert_pcm(convert_pcm(data, U8, S32), S32, U8) == data


@given(s16_values)
def test_narrowing_rounds_to_nearest_and_clips(values: list[int]) -> None:
    narrowed = ints(convert_pcm(s16(values), S16, U8), U8)
    expected = np.clip(np.rint(np.asarray(values) / 256), -128, 127) + 128
    assert narrowed.tolist() == expected.astype(int).tolist()


@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=64))
def test_s32_to_s16_and_s24_rounding(values: list[int]) -> None:
    data = np.asarray(values, dtype="<i4").tobytes()
    to16 = ints(convert_pcm(data, S32, S16), S16)
    to24 = ints(convert_pcm(data, S32, S24), S24)
    exact = np.asarray(values, dtype=np.float64)
    assert to16.tolist() == np.clip(np.rint(exact / 65536), -32768, 32767).astype(int).tolist()
    assert to24.tolist() == np.clip(np.rint(exact / 256), -(2**23), 2**23 - 1).astype(int).tolist()


def test_s24_byte_layout_and_u8_silence() -> None:
    assert convert_pcm(s16([-1, 0x1234]), S16, S24) == b"\x00\xff\xff" + b"\x00\x34\x12"
    assert convert_pcm(s16([0, 0]), S16, U8) == b"\x80\x80"
    assert convert_pcm(b"\x80", U8, S16) == b"\x00\x00"


# ------------------------------------------------------------------------------------ channels


@given(s16_values)
def test_mono_up_mix_duplicates_and_down_mix_recovers(values: list[int]) -> None:
    stereo = convert_pcm(s16(values), S16, S16_STEREO)
    pairs = ints(stereo, S16_STEREO).reshape(-1, 2)
    assert pairs[:, 0].tolist() == values and pairs[:, 1].tolist() == values
    assert convert_pcm(stereo, S16_STEREO, S16) == s16(values)


@given(st.lists(st.tuples(st.integers(-32768, 32767), st.integers(-32768, 32767)), min_size=1, max_size=32))
def test_stereo_down_mix_is_the_rounded_mean(frames: list[tuple[int, int]]) -> None:
    data = s16([v for pair in frames for v in pair])
    mono = ints(convert_pcm(data, S16_STEREO, S16), S16)
    assert mono.tolist() == [int(np.rint((a + b) / 2)) for a, b in frames]


def test_down_mix_then_resample_and_up_mix_after_resample() -> None:
    stereo48 = AudioFormat(48_000, 2, 2)
    left = sine(48_000, 0.1)
    data = np.stack([left, -left * 0], axis=1)  # right channel silent
    pcm = np.rint(data * 32767).astype("<i2").tobytes()
    mono16 = convert_pcm(pcm, stereo48, S16)
    assert len(mono16) == 1600 * 2
    peak = np.abs(ints(mono16, S16)[200:-200]).max()
    assert 0.24 * 32767 < peak < 0.26 * 32767  # half of the 0.5 sine: averaged with silence

    up = convert_pcm(s16(np.rint(sine(16_000, 0.05) * 32767)), S16, AudioFormat(24_000, 2, 2))
    pairs = ints(up, S16_STEREO).reshape(-1, 2)
    assert len(pairs) == 1200 and np.array_equal(pairs[:, 0], pairs[:, 1])


# ------------------------------------------------------------------------------------ resampling


@pytest.mark.parametrize(("src_rate", "dst_rate"), [(24_000, 16_000), (22_050, 16_000), (8_000, 48_000)])
@pytest.mark.parametrize("frames", [1, 7, 441, 24_000])
def test_resampled_length(src_rate: int, dst_rate: int, frames: int) -> None:
    src = AudioFormat(src_rate, 1, 2)
    dst = AudioFormat(dst_rate, 1, 2)
    out = convert_pcm(bytes(2 * frames), src, dst)
    assert len(out) % 2 == 0
    assert abs(len(out) // 2 - frames * dst_rate / src_rate) <= 1


def test_resampling_keeps_the_waveform() -> None:
    src = AudioFormat(24_000, 1, 2)
    pcm = np.rint(sine(24_000, 0.5) * 32767).astype("<i2").tobytes()
    out = ints(convert_pcm(pcm, src, S16), S16) / 32767
    expected = sine(16_000, 0.5)
    assert len(out) == len(expected)
    middle = slice(100, -100)  # away from the filter's edges
    assert np.abs(out[middle] - expected[middle]).max() < 0.005


def test_resampling_overshoot_clips_instead_of_wrapping() -> None:
    period = 48  # a full-scale 500 Hz square wave at 24 kHz rings above full scale once filtered
    square = np.where((np.arange(24_000) // (period // 2)) % 2 == 0, 32767, -32768).astype("<i2")
    out = ints(convert_pcm(square.tobytes(), AudioFormat(24_000, 1, 2), S16), S16)
    assert out.max() == 32767 and out.min() == -32768
    # Mid-plateau samples keep their sign: a wrap-around would flip them.
    highs = out[8:-100:32]
    lows = out[24:-100:32]
    assert (highs > 20_000).all() and (lows < -20_000).all()


# ------------------------------------------------------------------------------------ streaming


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 9_600), max_size=12),
    dst=st.sampled_from(
        [
            AudioFormat(16_000, 1, 2),
            AudioFormat(8_000, 2, 1),
            AudioFormat(48_000, 1, 3),
            AudioFormat(24_000, 2, 4),
        ]
    ),
)
def test_streaming_equals_one_shot(cuts: list[int], dst: AudioFormat) -> None:
    src = AudioFormat(24_000, 1, 2)
    pcm = np.rint(sine(24_000, 0.2, hz=300) * 30_000).astype("<i2").tobytes()
    bounds = [0, *sorted(cuts), len(pcm)]
    converter = PcmConverter(src, dst)
    parts = [converter.feed(pcm[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    parts.append(converter.flush())
    assert all(len(p) % dst.frame_size == 0 for p in parts)
    streamed = b"".join(parts)
    whole = convert_pcm(pcm, src, dst)
    assert len(streamed) == len(whole)
    assert np.abs(ints(streamed, dst) - ints(whole, dst)).max() <= 1


def test_partial_frames_are_carried_across_feeds() -> None:
    src = AudioFormat(24_000, 2, 3)  # 6-byte frames
    converter = PcmConverter(src, src)
    assert converter.passthrough
    assert converter.feed(b"\x01\x02\x03\x04") == b""
    assert converter.pending == 4
    assert converter.feed(b"\x05\x06\x07") == b"\x01\x02\x03\x04\x05\x06"
    assert converter.pending == 1
    with pytest.raises(InvalidAudioError, match="inside a frame"):
        converter.flush()
    assert converter.pending == 0
    assert converter.flush() == b""


def test_converter_resets_after_flush_for_a_new_stream() -> None:
    converter = PcmConverter(AudioFormat(24_000, 1, 2), S16)
    pcm = np.rint(sine(24_000, 0.1) * 20_000).astype("<i2").tobytes()
    first = converter.feed(pcm) + converter.flush()
    second = converter.feed(pcm) + converter.flush()
    assert first == second == convert_pcm(pcm, AudioFormat(24_000, 1, 2), S16)


# ------------------------------------------------------------------------------------ refusals


def test_identical_formats_pass_through() -> None:
    data = s16([1, -2, 3])
    assert convert_pcm(data, S16, S16) == data
    assert convert_pcm(memoryview(data), S16, S16) == data


def test_refuses_impossible_input() -> None:
    with pytest.raises(InvalidAudioError, match="whole number"):
        convert_pcm(b"\x00\x00\x00", S16, S24)
    with pytest.raises(InvalidAudioError, match="channel mapping"):
        convert_pcm(bytes(12), AudioFormat(16_000, 2, 2), AudioFormat(16_000, 3, 2))
    with pytest.raises(InvalidAudioError, match="unsupported source encoding"):
        PcmConverter(AudioFormat(16_000, 1, 4, "pcm_f32le"), S16)
    with pytest.raises(InvalidAudioError, match="2-byte samples"):
        convert_pcm(bytes(4), S16, AudioFormat(16_000, 1, 4, "pcm_s16le"))
    assert set(SUPPORTED_ENCODINGS) == {"pcm_u8", "pcm_s16le", "pcm_s24le", "pcm_s32le"}
