"""Audio formats, WAV parsing and the 20 ms chunking math (pure: bytes in, values out)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from voxcore.core.domain.errors import InvalidAudioError

#: The most chunks one fragment may hold (SPEC-C); a longer list is cut at this length.
MAX_CHUNKS = 20_000
#: Plausible WAV formats: anything outside is a corrupt or hostile header, refused with a reason
#: (a "1 Hz" file would otherwise be cut into millions of one-frame chunks).
MIN_WAV_SAMPLE_RATE = 4_000
MAX_WAV_SAMPLE_RATE = 384_000
MAX_WAV_CHANNELS = 16

_ENCODINGS = {1: "pcm_u8", 2: "pcm_s16le", 3: "pcm_s24le", 4: "pcm_s32le"}
_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# The KSDATAFORMAT_SUBTYPE_PCM GUID tail shared by every WAVE_FORMAT_EXTENSIBLE sub-format.
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """How the bytes of a PCM stream are laid out.

    Attributes:
        sample_rate: Frames per second (Hz).
        channels: Interleaved channels per frame.
        sample_width: Bytes per sample (1, 2, 3 or 4).
        encoding: ``pcm_u8`` (8-bit WAV is unsigned) or ``pcm_s16le``/``pcm_s24le``/``pcm_s32le``.
    """

    sample_rate: int
    channels: int
    sample_width: int
    encoding: str = ""

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise InvalidAudioError(f"sample rate must be positive, got {self.sample_rate}")
        if self.channels <= 0:
            raise InvalidAudioError(f"channel count must be positive, got {self.channels}")
        if self.sample_width not in _ENCODINGS:
            raise InvalidAudioError(f"sample width must be 1..4 bytes, got {self.sample_width}")
        if not self.encoding:
            object.__setattr__(self, "encoding", _ENCODINGS[self.sample_width])

    @property
    def frame_size(self) -> int:
        """Bytes per frame: one sample of every channel."""
        return self.channels * self.sample_width

    def duration_ms(self, nbytes: int) -> float:
        """Playing time of ``nbytes`` of audio in this format, in milliseconds."""
        return nbytes / self.frame_size / self.sample_rate * 1000.0

    def to_fields(self) -> dict[str, str]:
        """The format as flat string fields (how adapters store it beside a fragment)."""
        return {
            "sample_rate": str(self.sample_rate),
            "channels": str(self.channels),
            "sample_width": str(self.sample_width),
            "encoding": self.encoding,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> AudioFormat:
        """Inverse of :meth:`to_fields`; raises :class:`InvalidAudioError` on missing/bad fields."""
        try:
            return cls(
                sample_rate=int(fields["sample_rate"]),
                channels=int(fields["channels"]),
                sample_width=int(fields["sample_width"]),
                encoding=fields.get("encoding", ""),
            )
        except (KeyError, ValueError) as exc:
            raise InvalidAudioError(f"incomplete stored audio format: {fields!r}") from exc


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """How a PCM stream is cut into chunks (SPEC-C frame math)."""

    frames_per_chunk: int
    bytes_per_chunk: int

    def chunk_count(self, nbytes: int) -> int:
        """Number of chunks ``nbytes`` of whole frames make (the last one may be short)."""
        return -(-nbytes // self.bytes_per_chunk)


def plan_chunks(fmt: AudioFormat, chunk_ms: int) -> ChunkPlan:
    """Chunk geometry exactly as SPEC-C.

    ``frames_per_chunk = max(1, int(framerate * chunk_ms / 1000))`` and
    ``bytes_per_chunk = frames_per_chunk * nchannels * sampwidth``: chunks always hold whole frames.

    Raises:
        InvalidAudioError: ``chunk_ms`` is not a positive integer.
    """
    if isinstance(chunk_ms, bool) or not isinstance(chunk_ms, int) or chunk_ms <= 0:
        raise InvalidAudioError(f"chunk size must be a positive number of milliseconds, got {chunk_ms!r}")
    frames = max(1, int(fmt.sample_rate * chunk_ms / 1000))
    return ChunkPlan(frames_per_chunk=frames, bytes_per_chunk=frames * fmt.frame_size)


def split_pcm(pcm: bytes | memoryview, plan: ChunkPlan) -> list[bytes]:
    """Cut PCM bytes into chunks of ``plan.bytes_per_chunk``; the last chunk holds the remainder."""
    step = plan.bytes_per_chunk
    view = memoryview(pcm)
    return [bytes(view[i : i + step]) for i in range(0, len(view), step)]


@dataclass(frozen=True, slots=True)
class WavAudio:
    """A parsed WAV file: its format and its PCM payload (a view into the file bytes)."""

    format: AudioFormat
    pcm: memoryview

    @property
    def nframes(self) -> int:
        """Whole frames in the payload."""
        return len(self.pcm) // self.format.frame_size

    @property
    def duration_ms(self) -> float:
        """Playing time in milliseconds."""
        return self.format.duration_ms(len(self.pcm))


def parse_wav(data: bytes) -> WavAudio:
    """Parse a RIFF/WAVE file holding integer PCM (format 1, or EXTENSIBLE with the PCM sub-format).

    The parser is strict so that a bad file is refused with a reason rather than cached as noise:
    the RIFF header, the ``fmt `` chunk, the ``data`` chunk and its declared length are all checked.

    Raises:
        InvalidAudioError: the bytes are not a WAV file, not integer PCM, or are truncated.
    """
    parse_riff_header(data[:12])
    fmt: AudioFormat | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if chunk_id == b"fmt ":
            if fmt is not None:
                raise InvalidAudioError("invalid WAV: a second 'fmt ' chunk (which one describes the data?)")
            fmt = _parse_fmt(data[body : body + size], size)
        elif chunk_id == b"data":
            if fmt is None:
                raise InvalidAudioError("WAV 'data' chunk comes before its 'fmt ' chunk")
            data_layout(fmt, body, size, len(data))
            return WavAudio(format=fmt, pcm=memoryview(data)[body : body + size])
        pos = body + size + (size & 1)  # RIFF chunks are padded to even lengths
    if fmt is None:
        raise InvalidAudioError("truncated WAV: no 'fmt ' chunk")
    raise InvalidAudioError("truncated WAV: no 'data' chunk")


@dataclass(frozen=True, slots=True)
class WavLayout:
    """Where the audio of a WAV file is, from its header alone (for readers that seek).

    Attributes:
        format: The PCM format of the ``data`` chunk.
        data_offset: Byte offset of the first PCM byte in the file.
        data_size: Bytes of PCM the ``data`` chunk declares (whole frames, checked against the file size).
    """

    format: AudioFormat
    data_offset: int
    data_size: int


def parse_riff_header(head: bytes) -> None:
    """Check the 12-byte RIFF/WAVE header.

    Raises:
        InvalidAudioError: not a RIFF/WAVE file.
    """
    if len(head) < 12 or head[0:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise InvalidAudioError("not a WAV file (missing RIFF/WAVE header)")


def parse_chunk_header(header: bytes) -> tuple[bytes, int]:
    """``(chunk id, declared size)`` of an 8-byte RIFF chunk header."""
    if len(header) < 8:
        raise InvalidAudioError("truncated WAV: a chunk header is cut short")
    (size,) = struct.unpack_from("<I", header, 4)
    return bytes(header[0:4]), size


def parse_fmt_chunk(body: bytes) -> AudioFormat:
    """The format a ``fmt `` chunk body declares (integer PCM in a plausible range only).

    Raises:
        InvalidAudioError: not integer PCM, or an implausible/inconsistent header.
    """
    return _parse_fmt(body, len(body))


def data_layout(fmt: AudioFormat, data_offset: int, declared: int, file_size: int) -> WavLayout:
    """Check a ``data`` chunk's declared size against the format and the file size.

    Raises:
        InvalidAudioError: truncated, not whole frames, or empty.
    """
    available = file_size - data_offset
    if available < declared:
        raise InvalidAudioError(
            f"truncated WAV: data chunk declares {declared} bytes but only {available} are present"
        )
    if declared % fmt.frame_size:
        raise InvalidAudioError(
            f"WAV data length {declared} is not a whole number of {fmt.frame_size}-byte frames"
        )
    if declared == 0:
        raise InvalidAudioError("WAV file holds no audio frames")
    return WavLayout(format=fmt, data_offset=data_offset, data_size=declared)


def _parse_fmt(body: bytes, declared: int) -> AudioFormat:
    if declared < 16 or len(body) < 16:
        raise InvalidAudioError("truncated WAV: 'fmt ' chunk is shorter than 16 bytes")
    tag, channels, rate, byte_rate, align, bits = struct.unpack_from("<HHIIHH", body, 0)
    if tag == _WAVE_FORMAT_EXTENSIBLE:
        if len(body) < 40 or body[26:40] != _GUID_TAIL:
            raise InvalidAudioError("unsupported WAV encoding: EXTENSIBLE without a known sub-format")
        (tag,) = struct.unpack_from("<H", body, 24)
        if tag == _WAVE_FORMAT_PCM:
            (valid_bits,) = struct.unpack_from("<H", body, 18)
            if valid_bits not in (0, bits):
                raise InvalidAudioError(
                    f"unsupported WAV encoding: {valid_bits} valid bits in {bits}-bit containers"
                )
    if tag != _WAVE_FORMAT_PCM:
        raise InvalidAudioError(f"unsupported WAV encoding: format tag 0x{tag:04x} is not integer PCM")
    if bits % 8 or bits // 8 not in _ENCODINGS:
        raise InvalidAudioError(f"unsupported WAV sample size: {bits} bits")
    if channels == 0 or rate == 0:
        raise InvalidAudioError(f"invalid WAV header: {channels} channels at {rate} Hz")
    if not MIN_WAV_SAMPLE_RATE <= rate <= MAX_WAV_SAMPLE_RATE:
        raise InvalidAudioError(
            f"implausible WAV header: {rate} Hz is outside {MIN_WAV_SAMPLE_RATE}..{MAX_WAV_SAMPLE_RATE} Hz"
        )
    if channels > MAX_WAV_CHANNELS:
        raise InvalidAudioError(f"implausible WAV header: {channels} channels (at most {MAX_WAV_CHANNELS})")
    frame = channels * (bits // 8)
    if align != frame:
        raise InvalidAudioError(
            f"inconsistent WAV header: block align {align} != {channels} channels x {bits // 8} bytes"
        )
    if byte_rate != rate * frame:
        raise InvalidAudioError(
            f"inconsistent WAV header: byte rate {byte_rate} != {rate} Hz x {frame} bytes"
        )
    return AudioFormat(sample_rate=rate, channels=channels, sample_width=bits // 8)
