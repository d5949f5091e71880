"""Reading a WAV file for the cache, safely: regular files only, plausible headers, bounded memory.

Runs in a worker thread. A FIFO, a device or a socket is refused *before* any read can block (the
file is opened with ``O_NONBLOCK`` and checked with ``fstat``), so a hostile path cannot leave an
uncancellable thread behind. Only the PCM that will be stored is read: at most ``MAX_CHUNKS``
chunks, read straight into the chunk objects, so memory stays at about the stored size.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from voxcore.core.domain.audio import (
    MAX_CHUNKS,
    AudioFormat,
    data_layout,
    parse_chunk_header,
    parse_fmt_chunk,
    parse_riff_header,
    plan_chunks,
)
from voxcore.core.domain.errors import InvalidAudioError

#: Largest WAV file accepted (MAX_CHUNKS of 20 ms stereo 48 kHz 32-bit is ~150 MB).
MAX_WAV_BYTES: Final = 256 * 1024 * 1024
#: Largest ``fmt `` chunk read (an EXTENSIBLE one is 40 bytes).
_MAX_FMT_BYTES: Final = 1024
#: Most chunks walked before ``data`` (LIST, fact, bext... a real file has a handful).
_MAX_CHUNKS_BEFORE_DATA: Final = 64
_OPEN_FLAGS: Final = (
    os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
)


@dataclass(frozen=True, slots=True)
class WavFile:
    """A WAV file cut into chunks.

    Attributes:
        format: Its PCM format.
        chunks: The chunks to store (at most ``MAX_CHUNKS``).
        nframes: Frames in the whole file.
        total_chunks: Chunks the whole file makes (more than ``len(chunks)`` when it was cut).
    """

    format: AudioFormat
    chunks: list[bytes]
    nframes: int
    total_chunks: int

    @property
    def duration_ms(self) -> float:
        """Playing time of the whole file."""
        return self.nframes / self.format.sample_rate * 1000.0


class WavPathError(InvalidAudioError):
    """The path cannot name a readable regular file (NUL byte, invalid text, FIFO, device...)."""


def check_path(path: object) -> str:
    """``path`` as a ``str`` the OS accepts, or a clear error.

    Raises:
        TypeError: not a ``str`` or ``os.PathLike``.
        WavPathError: the path holds a NUL byte or text the file system cannot encode.
    """
    if not isinstance(path, str | Path):
        raise TypeError(f"wav_filepath must be a path, got {type(path).__name__}")
    text = os.fspath(path)
    if not text:
        raise WavPathError("empty path")
    if "\x00" in text:
        raise WavPathError("path contains a NUL byte")
    try:
        os.fsencode(text)  # surrogateescape'd bytes from os.listdir pass; lone surrogates do not
    except UnicodeEncodeError:
        raise WavPathError("path is not valid text (it holds an unpaired surrogate)") from None
    return text


def read_wav_file(path: object, chunk_ms: int) -> WavFile:
    """Open, check and cut a WAV file (blocking: call it in a worker thread).

    Raises:
        TypeError: ``path`` is not a path.
        OSError: the file cannot be opened or read (missing, permissions...).
        InvalidAudioError: not a regular file, too big, not integer PCM, implausible or truncated.
    """
    text = check_path(path)
    fd = os.open(text, _OPEN_FLAGS)
    with io.FileIO(fd, "rb", closefd=True) as file:
        info = os.fstat(file.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(21, "Is a directory", text)
        if not stat.S_ISREG(info.st_mode):
            raise WavPathError(f"not a regular file ({_kind(info.st_mode)}): {text}")
        size = info.st_size
        if size > MAX_WAV_BYTES:
            raise InvalidAudioError(f"WAV file is {size} bytes, more than the {MAX_WAV_BYTES} bytes accepted")
        parse_riff_header(file.read(12) or b"")
        fmt: AudioFormat | None = None
        pos = 12
        for _ in range(_MAX_CHUNKS_BEFORE_DATA):
            if pos + 8 > size:
                break
            chunk_id, declared = parse_chunk_header(_read_exactly(file, 8))
            body = pos + 8
            if chunk_id == b"fmt ":
                if fmt is not None:
                    raise InvalidAudioError(
                        "invalid WAV: a second 'fmt ' chunk (which one describes the data?)"
                    )
                if declared > _MAX_FMT_BYTES:
                    raise InvalidAudioError(f"invalid WAV: 'fmt ' chunk of {declared} bytes")
                fmt = parse_fmt_chunk(_read_exactly(file, declared))
            elif chunk_id == b"data":
                if fmt is None:
                    raise InvalidAudioError("WAV 'data' chunk comes before its 'fmt ' chunk")
                layout = data_layout(fmt, body, declared, size)
                return _cut(file, layout.format, layout.data_size, chunk_ms)
            pos = body + declared + (declared & 1)  # RIFF chunks are padded to even lengths
            file.seek(pos)
        else:
            raise InvalidAudioError(f"invalid WAV: more than {_MAX_CHUNKS_BEFORE_DATA} chunks before 'data'")
    if fmt is None:
        raise InvalidAudioError("truncated WAV: no 'fmt ' chunk")
    raise InvalidAudioError("truncated WAV: no 'data' chunk")


def _cut(file: io.FileIO, fmt: AudioFormat, data_size: int, chunk_ms: int) -> WavFile:
    plan = plan_chunks(fmt, chunk_ms)
    step = plan.bytes_per_chunk
    total_chunks = plan.chunk_count(data_size)
    kept = min(total_chunks, MAX_CHUNKS)
    remaining = min(data_size, kept * step)
    read = file.read
    chunks: list[bytes] = []
    while remaining > 0:
        piece = read(min(step, remaining))
        if not piece:
            raise InvalidAudioError("truncated WAV: the file ended while reading its audio")
        if len(piece) < min(step, remaining):  # unbuffered reads may return short
            piece += _read_exactly(file, min(step, remaining) - len(piece))
        chunks.append(piece)
        remaining -= len(piece)
    return WavFile(format=fmt, chunks=chunks, nframes=data_size // fmt.frame_size, total_chunks=total_chunks)


def _read_exactly(file: io.FileIO, n: int) -> bytes:
    read = file.read
    parts: list[bytes] = []
    missing = n
    while missing > 0:
        piece = read(missing)
        if not piece:
            raise InvalidAudioError("truncated WAV: the file ends inside its header")
        parts.append(piece)
        missing -= len(piece)
    return b"".join(parts)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a plain file"
