"""Seamless joins of PCM pieces: edge silence trimmed to a pause, short fades, no sample steps.

Pure functions and small streaming helpers over signed 16-bit PCM (``pcm_s16le``, the format of
every voxcore reply); other encodings pass through unchanged.
"""

from __future__ import annotations

import sys
from array import array
from typing import Final

from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.errors import DomainError

#: Default pause kept where two pieces join (at most half of it at each side of the join).
DEFAULT_JOIN_PAUSE_MS: Final = 60
#: Amplitude (of 32767) at or under which a sample counts as silence: about -46 dBFS.
DEFAULT_SILENCE_THRESHOLD: Final = 160
#: Length of the fades at the edges of a trimmed piece and of the ramp that removes a step.
DEFAULT_FADE_MS: Final = 4

_S16: Final = "pcm_s16le"
_SWAP: Final = sys.byteorder != "little"


class JoinError(DomainError):
    """Join parameters out of range."""


def is_s16(fmt: AudioFormat) -> bool:
    """True when ``fmt`` is signed 16-bit little-endian PCM (the only encoding joins process)."""
    return fmt.encoding == _S16 and fmt.sample_width == 2


def _samples(pcm: bytes | bytearray | memoryview) -> array[int]:
    samples = array("h")
    samples.frombytes(bytes(pcm))
    if _SWAP:
        samples.byteswap()
    return samples


def _bytes(samples: array[int]) -> bytes:
    if _SWAP:
        samples = array("h", samples)
        samples.byteswap()
    return samples.tobytes()


def _check(ms: int, what: str) -> int:
    if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
        raise JoinError(f"{what} must be a non-negative int of milliseconds, got {ms!r}")
    return ms


def fade(pcm: bytes, fmt: AudioFormat, *, fade_in_ms: int = 0, fade_out_ms: int = 0) -> bytes:
    """``pcm`` with linear fades at its start and end (whole frames; s16 only)."""
    if not is_s16(fmt) or not pcm:
        return pcm
    samples = _samples(pcm)
    ch = fmt.channels
    frames = len(samples) // ch
    n_in = min(frames, fmt.sample_rate * _check(fade_in_ms, "fade_in_ms") // 1000)
    n_out = min(frames, fmt.sample_rate * _check(fade_out_ms, "fade_out_ms") // 1000)
    for i in range(n_in):
        for c in range(ch):
            samples[i * ch + c] = samples[i * ch + c] * i // n_in
    for i in range(n_out):
        frame = frames - 1 - i
        for c in range(ch):
            samples[frame * ch + c] = samples[frame * ch + c] * i // n_out
    return _bytes(samples)


def ramp_from(previous: int, pcm: bytes, fmt: AudioFormat, *, ramp_ms: int = DEFAULT_FADE_MS) -> bytes:
    """Remove the step between a previous last sample and the start of ``pcm`` (mono s16).

    The difference ``previous - first sample`` is added to the first ``ramp_ms`` of ``pcm``,
    decaying linearly to zero: the join is continuous and the rest of the piece is untouched.
    """
    if not is_s16(fmt) or fmt.channels != 1 or len(pcm) < 2:
        return pcm
    samples = _samples(pcm)
    offset = previous - samples[0]
    if offset == 0:
        return pcm
    n = max(1, min(len(samples), fmt.sample_rate * _check(ramp_ms, "ramp_ms") // 1000))
    for i in range(n):
        value = samples[i] + offset * (n - i) // n
        samples[i] = -32768 if value < -32768 else 32767 if value > 32767 else value
    return _bytes(samples)


def last_sample(pcm: bytes, fmt: AudioFormat) -> int | None:
    """The last sample of mono s16 ``pcm`` (``None`` for other formats or no whole sample)."""
    if not is_s16(fmt) or fmt.channels != 1 or len(pcm) < 2:
        return None
    end = len(pcm) - len(pcm) % 2
    return int.from_bytes(pcm[end - 2 : end], "little", signed=True)


def trim_silence(
    pcm: bytes,
    fmt: AudioFormat,
    *,
    keep_ms: int = DEFAULT_JOIN_PAUSE_MS // 2,
    threshold: int = DEFAULT_SILENCE_THRESHOLD,
    fade_ms: int = DEFAULT_FADE_MS,
) -> bytes:
    """``pcm`` with its leading and trailing silence cut to at most ``keep_ms`` each, faded in.

    The whole-buffer form of :class:`EdgeTrimmer` (same result). Other encodings are returned as is.
    """
    trimmer = EdgeTrimmer(fmt, keep_ms=keep_ms, threshold=threshold, fade_ms=fade_ms)
    return trimmer.feed(pcm) + trimmer.flush()


class EdgeTrimmer:
    """Streams a synthesized piece with its edge silence cut to a pause and a faded-in start.

    Leading frames under ``threshold`` are dropped except the last ``keep_ms`` before the sound.
    After the sound, quiet frames are let out at once up to ``keep_ms`` (they are kept in any
    case), and only the quiet beyond that is held back until it is known whether the piece goes
    on (then it is let out: silence *inside* the piece is never touched) or ends (then it is
    dropped). So trimming never delays audio that will be played. The first ``fade_ms`` are faded
    in. Pieces in another encoding pass through unchanged.

    Args:
        fmt: The PCM format.
        keep_ms: Longest silence kept at each edge.
        threshold: Largest absolute sample value that counts as silence.
        fade_ms: Fade-in length.
    """

    __slots__ = (
        "_active",
        "_fade",
        "_faded_in",
        "_fmt",
        "_frame",
        "_held",
        "_keep",
        "_quiet_out",
        "_started",
        "_threshold",
    )

    def __init__(
        self,
        fmt: AudioFormat,
        *,
        keep_ms: int = DEFAULT_JOIN_PAUSE_MS // 2,
        threshold: int = DEFAULT_SILENCE_THRESHOLD,
        fade_ms: int = DEFAULT_FADE_MS,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold < 32767:
            raise JoinError(f"threshold must be an int in 0..32766, got {threshold!r}")
        self._fmt = fmt
        self._active = is_s16(fmt)
        self._frame = fmt.frame_size
        self._keep = fmt.sample_rate * _check(keep_ms, "keep_ms") // 1000 * self._frame
        self._fade = _check(fade_ms, "fade_ms")
        self._threshold = threshold
        self._held = bytearray()  # quiet frames not let out yet, + a partial frame
        self._quiet_out = 0  # bytes of quiet let out since the last loud frame
        self._started = False  # the first loud frame has been seen
        self._faded_in = False

    def _last_loud(self, samples: array[int]) -> int:
        """Index of the frame after the last loud sample (0 when all are quiet)."""
        limit = self._threshold
        ch = self._fmt.channels
        for i in range(len(samples) - 1, -1, -1):
            if samples[i] > limit or samples[i] < -limit:
                return i // ch + 1
        return 0

    def _first_loud(self, samples: array[int]) -> int | None:
        limit = self._threshold
        ch = self._fmt.channels
        for i, value in enumerate(samples):
            if value > limit or value < -limit:
                return i // ch
        return None

    def feed(self, piece: bytes) -> bytes:
        """Take the next piece; return the audio that can be let out now."""
        if not self._active:
            return piece
        data = self._held + piece
        whole = len(data) - len(data) % self._frame
        partial = bytes(data[whole:])
        samples = _samples(data[:whole])
        if not self._started:
            first = self._first_loud(samples)
            if first is None:  # still leading silence: keep only what may be let out later
                self._held = bytearray(data[max(0, whole - self._keep) : whole]) + partial
                return b""
            self._started = True
            start = max(0, first * self._frame - self._keep)
            samples = _samples(data[start:whole])
        raw = _bytes(samples)
        end = self._last_loud(samples) * self._frame
        if end:
            self._quiet_out = 0
        allowance = max(0, self._keep - self._quiet_out)
        out = raw[: end + allowance]
        self._quiet_out += len(out) - end
        self._held = bytearray(raw[end + allowance :]) + partial
        if out and not self._faded_in:
            self._faded_in = True
            out = fade(out, self._fmt, fade_in_ms=self._fade)
        return out

    def flush(self) -> bytes:
        """End of the piece: the quiet held back beyond ``keep_ms`` is dropped; nothing is left."""
        self._held.clear()
        return b""
