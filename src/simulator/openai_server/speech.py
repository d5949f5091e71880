"""Synthetic speech of the simulator (speech-like PCM) and its ``POST /v1/audio/speech`` route."""

from __future__ import annotations

import array
import asyncio
import functools
import math
import struct
import sys
from typing import Any

from voxcore.simulator.openai_server.plans import _DEFAULT_AFTER_CHUNKS, Fault, RequestPlan
from voxcore.simulator.openai_server.wire import _HttpServer, _Request

DEFAULT_SPEECH_MODELS: tuple[str, ...] = ("gpt-4o-mini-tts", "tts-1", "tts-1-hd")

SPEECH_VOICES: tuple[str, ...] = (
    "alloy",
    "ash",
    "ballad",
    "cedar",
    "coral",
    "echo",
    "fable",
    "marin",
    "nova",
    "onyx",
    "sage",
    "shimmer",
    "verse",
)

SPEECH_SAMPLE_RATE = 24_000
"""Speech audio is 24 kHz mono s16le, like OpenAI's ``pcm`` response format."""

SPEECH_MS_PER_CHAR = 60.0
"""Synthetic speech lasts this many milliseconds per input character (at ``speed`` 1.0)."""

_SPEECH_MAX_INPUT_CHARS = 4096

_SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")

_SPEECH_PRODUCED = ("pcm", "wav")

_DEFAULT_SPEECH_CHUNK_BYTES = 4801


@functools.lru_cache(maxsize=16)
def _syllables(frames: int) -> tuple[bytes, ...]:
    """Four voiced syllables of ``frames`` samples (24 kHz s16le) at different pitches, built once per length.

    Each is a falling-pitch tone with five harmonics under an attack/release envelope, so that a run of
    syllables has the rhythm and spectrum of speech and no clicks at the joins.
    """
    attack = max(1, min(frames // 4, SPEECH_SAMPLE_RATE * 8 // 1000))
    release = max(1, min(frames // 3, SPEECH_SAMPLE_RATE * 20 // 1000))
    harmonics = ((1, 1.0), (2, 0.55), (3, 0.35), (4, 0.2), (5, 0.1))
    norm = sum(amp for _, amp in harmonics)
    out: list[bytes] = []
    for f0 in (118.0, 131.0, 147.0, 165.0):
        samples = array.array("h", bytes(2 * frames))
        phase = 0.0
        for n in range(frames):
            # Pitch glides down by 10% over the syllable, as in a declarative intonation.
            phase += 2.0 * math.pi * f0 * (1.0 - 0.1 * n / frames) / SPEECH_SAMPLE_RATE
            if n < attack:
                env = math.sin(0.5 * math.pi * n / attack) ** 2
            elif n >= frames - release:
                env = math.sin(0.5 * math.pi * (frames - 1 - n) / release) ** 2
            else:
                env = 1.0
            value = sum(amp * math.sin(k * phase) for k, amp in harmonics) / norm
            samples[n] = round(10_000 * env * value)
        if sys.byteorder == "big":
            samples.byteswap()
        out.append(samples.tobytes())
    return tuple(out)


def synthetic_speech(text: str, *, speed: float = 1.0) -> bytes:
    """Deterministic speech-like PCM for ``text``: 24 kHz mono s16le, ``SPEECH_MS_PER_CHAR`` per character.

    Letters and digits are voiced syllables (pitch chosen by the character), everything else is silence,
    so the duration is exactly ``len(text) * round(24000 * 0.060 / speed)`` frames.
    """
    frames = max(1, round(SPEECH_SAMPLE_RATE * SPEECH_MS_PER_CHAR / 1000.0 / speed))
    voiced = _syllables(frames)
    silence = bytes(2 * frames)
    return b"".join(voiced[ord(ch) % len(voiced)] if ch.isalnum() else silence for ch in text)


def _wav_header(nbytes: int) -> bytes:
    """A 44-byte RIFF/WAVE header for ``nbytes`` of 24 kHz mono s16le PCM."""
    rate, channels, width = SPEECH_SAMPLE_RATE, 1, 2
    return (
        struct.pack("<4sI4s", b"RIFF", 36 + nbytes, b"WAVE")
        + struct.pack(
            "<4sIHHIIHH", b"fmt ", 16, 1, channels, rate, rate * channels * width, channels * width, 16
        )
        + struct.pack("<4sI", b"data", nbytes)
    )


class _SpeechRoutes(_HttpServer):
    """``POST /v1/audio/speech`` of :class:`OpenAISimulator`: synthetic PCM or WAV, streamed in chunks."""

    # Set up by OpenAISimulator.__init__.
    speech_models: list[str]
    speech_chunk_bytes: int
    early_headers: bool

    def _validate_speech(self, body: Any) -> tuple[int, str, str | None, str | None] | None:
        """Return ``(status, message, param, code)`` for an invalid speech request, else ``None``."""
        if not isinstance(body, dict):
            return 400, "Invalid type for request body: expected an object.", None, "invalid_type"
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return 400, "you must provide a model parameter", "model", None
        text = body.get("input")
        if text is None:
            return 400, "Missing required parameter: 'input'.", "input", "missing_required_parameter"
        if not isinstance(text, str):
            return 400, "Invalid type for 'input': expected a string.", "input", "invalid_type"
        if not text:
            msg = (
                "Invalid 'input': string too short. Expected a string with minimum length 1, "
                "but got an empty string instead."
            )
            return 400, msg, "input", "string_below_min_length"
        if len(text) > _SPEECH_MAX_INPUT_CHARS:
            msg = (
                f"Invalid 'input': string too long. Expected a string with maximum length "
                f"{_SPEECH_MAX_INPUT_CHARS}, but got a string with length {len(text)} instead."
            )
            return 400, msg, "input", "string_above_max_length"
        voice = body.get("voice")
        if voice is None:
            return 400, "Missing required parameter: 'voice'.", "voice", "missing_required_parameter"
        if voice not in SPEECH_VOICES:
            supported = ", ".join(f"'{v}'" for v in SPEECH_VOICES)
            msg = f"Invalid value for 'voice' = {voice!r}. Supported values are: {supported}."
            return 400, msg, "voice", "invalid_value"
        fmt = body.get("response_format", "mp3")
        if fmt not in _SPEECH_FORMATS:
            supported = ", ".join(f"'{f}'" for f in _SPEECH_FORMATS)
            msg = f"Invalid value for 'response_format' = {fmt!r}. Supported values are: {supported}."
            return 400, msg, "response_format", "invalid_value"
        if fmt not in _SPEECH_PRODUCED:
            msg = f"response_format {fmt!r} is not produced by the voxcore simulator: use 'pcm' or 'wav'."
            return 400, msg, "response_format", "unsupported_value"
        stream_format = body.get("stream_format", "audio")
        if stream_format != "audio":
            msg = f"stream_format {stream_format!r} is not produced by the voxcore simulator: use 'audio'."
            return 400, msg, "stream_format", "unsupported_value"
        speed = body.get("speed", 1.0)
        if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
            msg = f"Invalid 'speed': expected a number between 0.25 and 4.0, got {speed!r}."
            return 400, msg, "speed", "invalid_value"
        if model not in self.speech_models:
            msg = f"The model `{model}` does not exist or you do not have access to it."
            return 404, msg, None, "model_not_found"
        return None

    async def _speech(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        plan: RequestPlan | None,
    ) -> bool:
        body = await self._valid_body(req, writer, self._validate_speech)
        if isinstance(body, bool):
            return body
        fmt = body.get("response_format")
        pcm = synthetic_speech(body["input"], speed=float(body.get("speed", 1.0)))
        audio = _wav_header(len(pcm)) + pcm if fmt == "wav" else pcm
        fault = plan.fault if plan is not None else None
        if fault is Fault.MALFORMED:
            audio += b"\x00"
        size = self.speech_chunk_bytes
        if plan is not None and plan.speech_chunk_bytes is not None:
            size = max(1, plan.speech_chunk_bytes)
        pieces = [audio[i : i + size] for i in range(0, len(audio), size)]
        timing = self._timing(plan)

        out, keep_alive = await self._open_stream(
            writer,
            req,
            [("Content-Type", "audio/wav" if fmt == "wav" else "audio/pcm")],
            fault=fault,
            first_byte_delay_ms=timing.first_token_delay_ms,
        )

        after = len(pieces)
        if plan is not None and fault in (Fault.STALL, Fault.TRUNCATED):
            after = _DEFAULT_AFTER_CHUNKS[fault] if plan.after_chunks is None else max(0, plan.after_chunks)
        if fault is Fault.TRUNCATED:
            after = min(after, max(0, len(pieces) - 1))  # never deliver the whole audio
        for i, piece in enumerate(pieces):
            if i == after:
                break
            if i > 0 and timing.inter_chunk_delay_ms > 0:
                await asyncio.sleep(timing.inter_chunk_delay_ms / 1000)
            await out.send(piece)
        if fault is Fault.STALL:
            await writer.drain()
            await self._stall(reader, plan.stall_s if plan is not None else None)
            return False
        if fault is Fault.TRUNCATED:
            if plan is not None and plan.graceful:
                await out.finish()
            else:
                await writer.drain()
            return False
        await out.finish()
        return keep_alive
