"""Offline text-to-speech with the local ``espeak-ng`` binary, streamed from its WAV output as it is made.

``espeak-ng --stdout`` writes a RIFF/WAVE stream (22050 Hz mono s16le for its own voices). It cannot
seek back on a pipe, so the RIFF and ``data`` sizes it writes are placeholders (0x7ffff000-ish; other
writers use 0 or 0xFFFFFFFF): such a ``data`` chunk runs to the end of the stream.

The text reaches the process on stdin, never through a shell nor argv, so no text can be read as an
option; control characters are removed first and the length is capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import shutil
import struct
import time
import unicodedata
from collections.abc import AsyncGenerator
from typing import Final

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from voxcore.adapters.audio import PcmConverter
from voxcore.adapters.audio.traced import traced_speech
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.errors import InvalidAudioError
from voxcore.core.ports.errors import ConfigurationError, TTSError
from voxcore.core.ports.tts import SpeechRequest, TTSEngine

__all__ = ["DEFAULT_MAX_CHARS", "EspeakTTSEngine", "WavStreamReader", "clean_text"]

logger = logging.getLogger("voxcore.tts")
_tracer = trace.get_tracer("voxcore.tts")

#: Longest text (after cleaning) one request may speak.
DEFAULT_MAX_CHARS: Final = 1000
_BASE_WPM: Final = 175  # espeak-ng's default rate, what ``speed`` 1.0 maps to
_MIN_WPM: Final = 80
_MAX_WPM: Final = 450
_READ_BYTES: Final = 16_384
_STDERR_KEEP: Final = 2_000
# Voice names as espeak-ng spells them: "ru", "en-us", "en+f3", "mb-en1"; never starting with "-".
_VOICE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+\-]{0,63}")

_WAVE_FORMAT_PCM: Final = 0x0001
_WAVE_FORMAT_EXTENSIBLE: Final = 0xFFFE
_MAX_FMT_BYTES: Final = 1024
# A data size at or above this is a streaming placeholder, not a length (espeak-ng writes 0x7ffff000).
_UNKNOWN_SIZE_FLOOR: Final = 0x7FFF0000


def clean_text(text: str, *, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Text made safe to speak: control characters removed, whitespace runs collapsed to one space.

    Raises:
        TTSError: nothing speakable is left, or the text is longer than ``max_chars``.
    """
    kept: list[str] = []
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs"):  # controls and lone surrogates: breaks or whitespace become spaces
            if ch.isspace():
                kept.append(" ")
            continue
        kept.append(ch)
    cleaned = " ".join("".join(kept).split())
    if not cleaned:
        raise TTSError("nothing to say: the text is empty once control characters are removed")
    if len(cleaned) > max_chars:
        raise TTSError(f"text too long for espeak-ng: {len(cleaned)} > {max_chars} characters")
    return cleaned


class WavStreamReader:
    """Incremental RIFF/WAVE reader: parses the header chunks, then passes the ``data`` PCM through.

    Feed bytes as they arrive; :attr:`format` is set once the ``fmt `` chunk is read. A ``data`` size
    of 0 or a placeholder >= 0x7FFF0000 means "until the end of the stream".
    """

    __slots__ = ("_buf", "_header_done", "_remaining", "_riff_checked", "_skip", "format")

    def __init__(self) -> None:
        self.format: AudioFormat | None = None
        self._buf = bytearray()
        self._riff_checked = False
        self._header_done = False
        self._skip = 0
        self._remaining: int | None = None  # bytes of ``data`` still expected; None: until EOF

    @property
    def in_data(self) -> bool:
        """True once the ``data`` chunk has started."""
        return self._header_done

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return the PCM payload bytes it completed (possibly ``b""``).

        Raises:
            InvalidAudioError: not a WAV stream, not integer PCM, or ``data`` before ``fmt ``.
        """
        if self._header_done:
            return self._payload(data)
        self._buf += data
        while True:
            if not self._riff_checked:
                if len(self._buf) < 12:
                    return b""
                if self._buf[0:4] != b"RIFF" or self._buf[8:12] != b"WAVE":
                    raise InvalidAudioError("not a WAV stream (missing RIFF/WAVE header)")
                del self._buf[:12]
                self._riff_checked = True
            if self._skip:
                dropped = min(self._skip, len(self._buf))
                del self._buf[:dropped]
                self._skip -= dropped
                if self._skip:
                    return b""
            if len(self._buf) < 8:
                return b""
            chunk_id = bytes(self._buf[0:4])
            (size,) = struct.unpack_from("<I", self._buf, 4)
            if chunk_id == b"fmt ":
                if size < 16 or size > _MAX_FMT_BYTES:
                    raise InvalidAudioError(f"invalid WAV 'fmt ' chunk size {size}")
                padded = size + (size & 1)
                if len(self._buf) < 8 + padded:
                    return b""
                self.format = _parse_fmt(bytes(self._buf[8 : 8 + size]))
                del self._buf[: 8 + padded]
            elif chunk_id == b"data":
                if self.format is None:
                    raise InvalidAudioError("WAV 'data' chunk comes before its 'fmt ' chunk")
                del self._buf[:8]
                self._remaining = None if size == 0 or size >= _UNKNOWN_SIZE_FLOOR else size
                self._header_done = True
                rest = bytes(self._buf)
                self._buf.clear()
                return self._payload(rest)
            else:  # LIST, fact, ...: skipped, padded to even lengths
                del self._buf[:8]
                self._skip = size + (size & 1)

    def finish(self) -> None:
        """Check the stream ended properly.

        Raises:
            InvalidAudioError: no ``data`` chunk was reached, or a sized ``data`` chunk is incomplete.
        """
        if not self._header_done:
            raise InvalidAudioError("WAV stream ended before its 'data' chunk")
        if self._remaining:
            raise InvalidAudioError(f"WAV stream ended {self._remaining} bytes short of its 'data' chunk")

    def _payload(self, data: bytes) -> bytes:
        if self._remaining is None:
            return data
        out = data[: self._remaining]
        self._remaining -= len(out)
        return out


def _parse_fmt(body: bytes) -> AudioFormat:
    tag, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", body, 0)
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
        (tag,) = struct.unpack_from("<H", body, 24)
    if tag != _WAVE_FORMAT_PCM:
        raise InvalidAudioError(f"unsupported WAV encoding: format tag 0x{tag:04x} is not integer PCM")
    if bits % 8 or not 8 <= bits <= 32:
        raise InvalidAudioError(f"unsupported WAV sample size: {bits} bits")
    return AudioFormat(sample_rate=rate, channels=channels, sample_width=bits // 8)


class EspeakTTSEngine(TTSEngine):
    """Speaks with the local ``espeak-ng`` (Debian package ``espeak-ng``; voices such as ``ru``, ``en``).

    One process per request; its stdout is read as it is written, so the first audio arrives after a
    few milliseconds, long before the phrase is synthesized. A process is killed when its stream is
    closed early or cancelled, and by :meth:`aclose`.

    Args:
        binary: The executable name or path.
        timeout_s: Longest wait for the next bytes from the process before it is killed.
        max_chars: Longest text accepted (after removing control characters).
        tracer: OpenTelemetry tracer (default: the ``voxcore.tts`` one).
    """

    name = "espeak-ng"

    def __init__(
        self,
        *,
        binary: str = "espeak-ng",
        timeout_s: float = 10.0,
        max_chars: int = DEFAULT_MAX_CHARS,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._binary = binary
        self._timeout_s = timeout_s
        self._max_chars = max_chars
        self._tracer = tracer if tracer is not None else _tracer
        self._procs: set[asyncio.subprocess.Process] = set()
        self._closed = False

    @property
    def processes(self) -> frozenset[asyncio.subprocess.Process]:
        """The ``espeak-ng`` processes running now (one per open stream)."""
        return frozenset(self._procs)

    async def check(self) -> None:
        """Verify that the binary is on PATH and runs.

        Raises:
            ConfigurationError: ``espeak-ng`` is missing or does not start.
        """
        path = shutil.which(self._binary)
        if path is None:
            raise ConfigurationError(f"{self._binary} not found on PATH: apt-get install espeak-ng")
        try:
            proc = await asyncio.create_subprocess_exec(
                path,
                "--version",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise ConfigurationError(f"{path} cannot be started: {exc}") from exc
        try:
            async with asyncio.timeout(self._timeout_s):
                out, _ = await proc.communicate()
        except TimeoutError:
            raise ConfigurationError(f"{path} --version did not answer in {self._timeout_s}s") from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise ConfigurationError(
                f"{path} --version failed with exit code {proc.returncode}: {out.decode(errors='replace')}"
            )

    async def aclose(self) -> None:
        """Kill the running processes and refuse new requests; safe to call twice."""
        self._closed = True
        procs = list(self._procs)
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        for proc in procs:
            await proc.wait()

    async def stream_speech(self, request: SpeechRequest) -> AsyncGenerator[bytes, None]:
        """Yield PCM in ``request.audio_format`` while espeak-ng synthesizes.

        ``request.model`` is ignored. Close the iterator (``contextlib.aclosing``) when stopping
        early: that kills the process.

        Raises:
            TTSError: bad text/voice/speed, the binary is missing, it failed, or its output was broken.
        """
        started = time.perf_counter()
        span = self._tracer.start_span(
            "tts.synthesize",
            kind=SpanKind.INTERNAL,
            attributes={
                "voxcore.tts.engine": self.name,
                "voxcore.tts.voice": request.voice,
                "voxcore.tts.chars": len(request.text),
            },
        )
        traced = traced_speech(
            self._synthesize(request), span=span, engine=self.name, started=started, request=request
        )
        async with contextlib.aclosing(traced):  # closing early reaches the engine at once
            async for chunk in traced:
                yield chunk

    def _argv(self, request: SpeechRequest) -> list[str]:
        if not _VOICE_RE.fullmatch(request.voice):
            raise TTSError(f"invalid espeak-ng voice name {request.voice!r} (e.g. 'ru', 'en', 'en-us')")
        if not (math.isfinite(request.speed) and request.speed > 0):
            raise TTSError(f"speed must be a positive number, got {request.speed}")
        wpm = min(_MAX_WPM, max(_MIN_WPM, round(_BASE_WPM * request.speed)))
        # -b 1: the text is UTF-8; --stdin: read it all from stdin; --stdout: WAV to stdout.
        return [self._binary, "-v", request.voice, "-s", str(wpm), "-b", "1", "--stdin", "--stdout"]

    async def _synthesize(self, request: SpeechRequest) -> AsyncGenerator[bytes, None]:
        if self._closed:
            raise TTSError("espeak-ng engine is closed")
        text = clean_text(request.text, max_chars=self._max_chars)
        argv = self._argv(request)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as exc:
            raise TTSError(f"{self._binary} not found on PATH: apt-get install espeak-ng") from exc
        except OSError as exc:
            raise TTSError(f"cannot start {self._binary}: {exc}", transient=True) from exc
        self._procs.add(proc)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stderr_task = asyncio.create_task(_tail(proc.stderr))
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(text.encode("utf-8"))
                await proc.stdin.drain()
            proc.stdin.close()

            reader = WavStreamReader()
            converter: PcmConverter | None = None
            while True:
                try:
                    async with asyncio.timeout(self._timeout_s):
                        data = await proc.stdout.read(_READ_BYTES)
                except TimeoutError:
                    raise TTSError(
                        f"{self._binary} sent nothing for {self._timeout_s}s", transient=True
                    ) from None
                if not data:
                    break
                pcm = reader.feed(data)
                if converter is None and reader.format is not None:
                    converter = PcmConverter(reader.format, request.audio_format)
                if pcm and converter is not None:
                    out = converter.feed(pcm)
                    if out:
                        yield out

            async with asyncio.timeout(self._timeout_s):
                code = await proc.wait()
                stderr = await stderr_task
            if code != 0:
                why = (
                    "it was stopped (engine closed)" if self._closed and code < 0 else stderr or "no message"
                )
                raise TTSError(f"{self._binary} -v {request.voice} failed with exit code {code}: {why}")
            reader.finish()
            if converter is not None:
                tail = converter.flush()
                if tail:
                    yield tail
        except InvalidAudioError as exc:
            raise TTSError(f"{self._binary} produced unusable audio: {exc}") from exc
        except TimeoutError:
            raise TTSError(f"{self._binary} did not exit within {self._timeout_s}s", transient=True) from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            self._procs.discard(proc)
            if not stderr_task.done():
                stderr_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stderr_task


async def _tail(stream: asyncio.StreamReader) -> str:
    """Everything the process writes to ``stream``, keeping only the last characters."""
    kept = b""
    while chunk := await stream.read(4096):
        kept = (kept + chunk)[-_STDERR_KEEP:]
    return " ".join(kept.decode("utf-8", "replace").split())
