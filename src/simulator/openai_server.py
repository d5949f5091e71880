"""OpenAI-compatible HTTP/1.1 server SIMULATOR on 127.0.0.1 (stdlib asyncio streams only).

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or SSE), ``POST /v1/audio/speech``
(synthetic speech-like PCM streamed with chunked transfer) and ``POST /v1/embeddings`` (deterministic
vectors, or a real model; see ``voxcore.simulator.embeddings``).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import dataclasses
import enum
import functools
import inspect
import json
import logging
import math
import random
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self, TypeAlias
from urllib.parse import unquote, urlsplit

from voxcore.simulator.embeddings import (
    DEFAULT_EMBEDDING_MODELS,
    EMBEDDINGS_PATH,
    EmbeddingBackend,
    default_backend,
    embeddings_payload,
    validate_embeddings,
)

__all__ = [
    "AUDIO_SPEECH_PATH",
    "CHAT_COMPLETIONS_PATH",
    "DEFAULT_MODELS",
    "DEFAULT_SPEECH_MODELS",
    "EchoReply",
    "Fault",
    "OpenAISimulator",
    "RecordedRequest",
    "ReplyPolicy",
    "ReplyValue",
    "RequestPlan",
    "SPEECH_MS_PER_CHAR",
    "SPEECH_SAMPLE_RATE",
    "SPEECH_VOICES",
    "ScriptedReplies",
    "approx_tokens",
    "schema_example",
    "synthetic_speech",
]

log = logging.getLogger(__name__)

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
AUDIO_SPEECH_PATH = "/v1/audio/speech"
MODELS_PATH = "/v1/models"
ADMIN_PREFIX = "/_simulator/"
DEFAULT_MODELS: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "sim-small")
OWNED_BY = "voxcore-simulator"
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

_MAX_HEAD_BYTES = 1 << 20
_MAX_BODY_BYTES = 32 << 20
_MODEL_CREATED = 1_700_000_000
_SPEECH_MAX_INPUT_CHARS = 4096
_SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
_SPEECH_PRODUCED = ("pcm", "wav")
# Odd on purpose: like the real API, chunk boundaries do not fall on 2-byte frames.
_DEFAULT_SPEECH_CHUNK_BYTES = 4801

ReplyValue: TypeAlias = str | Mapping[str, Any]
"""What a reply policy returns: plain text, or a mapping serialized verbatim as the JSON content."""

ReplyPolicy: TypeAlias = Callable[[dict[str, Any]], ReplyValue | Awaitable[ReplyValue]]
"""A callable receiving the parsed chat request body and returning (or awaiting to) the reply."""


class Fault(enum.Enum):
    """Faults the simulator can inject into a request instead of (or into) a normal answer."""

    BAD_KEY = "bad_key"
    """401 ``invalid_api_key`` whatever key was sent."""
    UNKNOWN_MODEL = "unknown_model"
    """404 ``model_not_found`` whatever model was requested."""
    RATE_LIMIT = "rate_limit"
    """429 ``rate_limit_exceeded`` with ``Retry-After``, ``retry-after-ms`` and ``x-ratelimit-*`` headers."""
    SERVER_ERROR = "server_error"
    """500 ``server_error``."""
    SERVICE_UNAVAILABLE = "service_unavailable"
    """503 ``server_error`` (engine overloaded)."""
    TIMEOUT = "timeout"
    """Read the request, send nothing until the client gives up (or ``stall_s`` / ``stop()``)."""
    STALL = "stall"
    """Send the response headers (and, when streaming, the role chunk plus ``after_chunks`` content
    chunks; for speech ``after_chunks`` audio chunks), then nothing until the client gives up (or
    ``stall_s`` / ``stop()``)."""
    MALFORMED = "malformed"
    """Streaming: after ``after_chunks`` content chunks emit ``data: {"choices": [`` (not JSON), then go on.
    Non-streaming: a 200 body that is not JSON. Speech: one stray byte ends the audio, so the body is
    not a whole number of 2-byte frames."""
    TRUNCATED = "truncated"
    """Streaming: send ``after_chunks`` content chunks, then close the connection mid-body, with no
    finish chunk and no ``[DONE]`` (``graceful=True`` ends the chunked body cleanly before closing).
    Non-streaming: send half of the body announced by ``Content-Length``, then close. Speech: send
    ``after_chunks`` audio chunks (never all of them), then close mid-body."""
    INVALID_JSON = "invalid_json"
    """A well-formed response whose *content* (the structured answer) is not valid JSON."""


_STATUS_FAULTS = frozenset(
    {Fault.BAD_KEY, Fault.UNKNOWN_MODEL, Fault.RATE_LIMIT, Fault.SERVER_ERROR, Fault.SERVICE_UNAVAILABLE}
)
_DEFAULT_AFTER_CHUNKS = {Fault.MALFORMED: 1, Fault.TRUNCATED: 2, Fault.STALL: 0}
MALFORMED_SSE_DATA = '{"choices": ['


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """How the simulator answers one request: an optional fault plus per-request overrides.

    ``None`` fields fall back to the simulator's settings.

    Attributes:
        fault: The fault to inject, or ``None`` for a normal answer (e.g. a timing-only plan).
        path: Only requests to this path consume the plan (``None``: any path). Defaults to chat completions
            so that warm-up pings such as ``GET /v1/models`` do not eat faults meant for the chat call;
            ``AUDIO_SPEECH_PATH`` targets speech requests.
        retry_after: Seconds for ``Retry-After`` (RATE_LIMIT defaults to 1; SERVICE_UNAVAILABLE sends it only
            when set).
        after_chunks: Content chunks sent before a STALL / MALFORMED / TRUNCATED fault strikes.
        graceful: TRUNCATED only: end the HTTP body cleanly (no ``[DONE]``) instead of cutting it.
        stall_s: TIMEOUT / STALL: give up stalling after this many seconds and close (``None``: never).
        message: Overrides the error message of a status fault.
        first_token_delay_ms: Delay before the first byte of the answer.
        inter_chunk_delay_ms: Delay between streamed content chunks.
        chars_per_chunk: Characters per content delta, or an inclusive ``(min, max)`` range.
        reply: Overrides the reply policy for this request (text or a mapping serialized as JSON).
        speech_chunk_bytes: Bytes per chunk of a speech response body.
        trailing_text: Chat: text appended after the JSON content (a model that goes on after the object).
        fence: Chat: wrap the content in a markdown code fence (```json ... ```).
        raw_newlines: Chat: write the ``\\n`` escapes of the JSON content as raw newlines (what
            grammar-constrained servers emit).
    """

    fault: Fault | None = None
    path: str | None = CHAT_COMPLETIONS_PATH
    retry_after: float | None = None
    after_chunks: int | None = None
    graceful: bool = False
    stall_s: float | None = None
    message: str | None = None
    first_token_delay_ms: float | None = None
    inter_chunk_delay_ms: float | None = None
    chars_per_chunk: int | tuple[int, int] | None = None
    reply: ReplyValue | None = None
    speech_chunk_bytes: int | None = None
    trailing_text: str | None = None
    fence: bool = False
    raw_newlines: bool = False

    def matches(self, path: str) -> bool:
        """Return whether a request to ``path`` consumes this plan."""
        return self.path is None or self.path == path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestPlan:
        """Build a plan from JSON-like data (``fault`` given by its value, e.g. ``"rate_limit"``).

        Raises:
            ValueError: On unknown keys or an unknown fault name.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown plan fields: {sorted(unknown)}")
        kwargs = dict(data)
        raw_fault = kwargs.get("fault")
        kwargs["fault"] = Fault(raw_fault) if raw_fault else None
        cpc = kwargs.get("chars_per_chunk")
        if isinstance(cpc, list):
            kwargs["chars_per_chunk"] = (int(cpc[0]), int(cpc[1]))
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One HTTP request as the simulator received it.

    Attributes:
        method: HTTP method.
        path: Request path without the query string.
        query: Raw query string ("" when absent).
        headers: Header names lower-cased; repeated headers joined with ", ".
        body: Raw (de-chunked) body bytes.
        connection_id: 1-based number of the TCP connection that carried it.
        index_on_connection: 1-based position of the request on its connection (>1 means keep-alive reuse).
        received_at: ``time.monotonic()`` when the request head was parsed.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    connection_id: int
    index_on_connection: int
    received_at: float

    def json(self) -> Any:
        """Return the body parsed as JSON, or ``None`` when it is empty or not JSON."""
        return _json_or_none(self.body)


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def approx_tokens(text: str) -> int:
    """Approximate token count used by the simulator: ~4 characters per token (0 for empty text)."""
    return math.ceil(len(text) / 4) if text else 0


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


def _text_of(content: Any) -> str:
    """Extract the text of a chat message ``content`` (string or list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


class EchoReply:
    """Default reply policy: a deterministic echo of the last user message.

    Args:
        prefix: Text put before the echoed message.
        max_chars: The echoed message is cut at a word boundary to at most this many characters (plus "…").
        empty_reply: Reply used when the request has no user text.
    """

    def __init__(
        self, prefix: str = "Вы сказали: ", max_chars: int = 200, empty_reply: str = "Вы ничего не сказали."
    ) -> None:
        self.prefix = prefix
        self.max_chars = max_chars
        self.empty_reply = empty_reply

    def __call__(self, request: dict[str, Any]) -> str:
        """Return the echo reply for a parsed chat request."""
        messages = request.get("messages")
        text = ""
        if isinstance(messages, list):
            for message in reversed(messages):
                if isinstance(message, dict) and message.get("role") == "user":
                    text = " ".join(_text_of(message.get("content")).split())
                    break
        if not text:
            return self.empty_reply
        if len(text) > self.max_chars:
            cut = text[: self.max_chars]
            space = cut.rfind(" ")
            text = (cut[:space] if space > self.max_chars // 2 else cut).rstrip(" ,.;:") + "…"
        return self.prefix + text


class ScriptedReplies:
    """Reply policy consuming a list of scripted replies in order, then falling back.

    Args:
        replies: Texts and/or mappings (a mapping is serialized verbatim as the JSON content).
        fallback: Policy used once the script is exhausted (default: ``EchoReply()``).
    """

    def __init__(self, replies: Iterable[ReplyValue], *, fallback: ReplyPolicy | None = None) -> None:
        self._queue: collections.deque[ReplyValue] = collections.deque(replies)
        self.fallback: ReplyPolicy = fallback if fallback is not None else EchoReply()

    @property
    def remaining(self) -> int:
        """Number of scripted replies not consumed yet."""
        return len(self._queue)

    def extend(self, replies: Iterable[ReplyValue]) -> None:
        """Append more scripted replies."""
        self._queue.extend(replies)

    def __call__(self, request: dict[str, Any]) -> ReplyValue | Awaitable[ReplyValue]:
        """Return the next scripted reply (or the fallback's reply)."""
        if self._queue:
            return self._queue.popleft()
        return self.fallback(request)


def _as_policy(reply: ReplyPolicy | ReplyValue | Sequence[ReplyValue] | None) -> ReplyPolicy:
    if reply is None:
        return EchoReply()
    if isinstance(reply, str | Mapping):
        constant: ReplyValue = reply

        def _constant(_request: dict[str, Any]) -> ReplyValue:
            return constant

        return _constant
    if callable(reply):
        return reply
    return ScriptedReplies(reply)


# --------------------------------------------------------------------------------------------- schema


def _resolve_ref(node: Any, root: Mapping[str, Any]) -> Any:
    seen = 0
    while isinstance(node, Mapping) and isinstance(node.get("$ref"), str) and seen < 32:
        ref: str = node["$ref"]
        if not ref.startswith("#"):
            return {}
        target: Any = root
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, Mapping) else None
        node = target if target is not None else {}
        seen += 1
    return node


def _types_of(node: Mapping[str, Any], root: Mapping[str, Any]) -> list[str]:
    raw = node.get("type")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        return [t for t in raw if isinstance(t, str)]
    out: list[str] = []
    for option in node.get("anyOf") or node.get("oneOf") or []:
        opt = _resolve_ref(option, root)
        if isinstance(opt, Mapping):
            out.extend(_types_of(opt, root))
    if not out and "properties" in node:
        out.append("object")
    return out


def _example(node: Any, root: Mapping[str, Any], placeholder: str, depth: int) -> Any:
    node = _resolve_ref(node, root)
    if not isinstance(node, Mapping) or depth > 24:
        return None
    if "const" in node:
        return node["const"]
    enum_values = node.get("enum")
    if isinstance(enum_values, list) and enum_values:
        return enum_values[0]
    if "default" in node:
        return node["default"]
    types = _types_of(node, root)
    if "null" in types:
        return None
    options = node.get("anyOf") or node.get("oneOf") or node.get("allOf")
    if isinstance(options, list) and options and "type" not in node:
        return _example(options[0], root, placeholder, depth + 1)
    kind = types[0] if types else None
    if kind == "object":
        props = node.get("properties")
        if not isinstance(props, Mapping):
            return {}
        return {str(k): _example(v, root, placeholder, depth + 1) for k, v in props.items()}
    if kind == "array":
        n = node.get("minItems", 0)
        count = n if isinstance(n, int) and n > 0 else 0
        return [_example(node.get("items", {}), root, placeholder, depth + 1) for _ in range(count)]
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        lo = node.get("minimum", node.get("exclusiveMinimum"))
        value = int(math.ceil(lo)) if isinstance(lo, int | float) and lo > 0 else 0
        if "exclusiveMinimum" in node and value == node["exclusiveMinimum"]:
            value += 1
        return value
    if kind == "string":
        n = node.get("minLength", 0)
        return placeholder.ljust(n, "-") if isinstance(n, int) else placeholder
    return None


def schema_example(
    schema: Mapping[str, Any],
    *,
    answer: str | None = None,
    answer_field: str = "answer",
    overrides: Mapping[str, Any] | None = None,
    placeholder: str = "sim",
) -> Any:
    """Build a deterministic instance of a JSON schema, keys in the schema's property order.

    Booleans are ``true``, integers/numbers ``0`` (or their minimum), strings ``placeholder``, nullable
    values ``null``, arrays empty; ``const``/``enum``/``default`` win; local ``$ref`` are resolved.

    Args:
        schema: The JSON schema (the ``schema`` member of ``response_format.json_schema``).
        answer: Text put into ``answer_field`` (even when that field is nullable). When the schema has no
            such top-level property, it goes into the first plain string property instead.
        answer_field: Name of the top-level property receiving ``answer``.
        overrides: Top-level values replacing the generated ones (order stays the schema's; unknown keys
            are appended at the end).
        placeholder: Value used for ordinary strings.

    Returns:
        The example value (a ``dict`` for object schemas).
    """
    value = _example(schema, schema, placeholder, 0)
    if not isinstance(value, dict):
        return value
    root = _resolve_ref(schema, schema)
    props = root.get("properties") if isinstance(root, Mapping) else None
    if answer is not None and isinstance(props, Mapping):
        target: str | None = answer_field if answer_field in props else None
        if target is None:
            for key, sub in props.items():
                sub = _resolve_ref(sub, schema)
                if isinstance(sub, Mapping) and _types_of(sub, schema) == ["string"] and "enum" not in sub:
                    target = str(key)
                    break
        if target is not None:
            value[target] = answer
    if overrides:
        value.update(overrides)
    return value


# --------------------------------------------------------------------------------------------- HTTP


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes
    request_id: str
    keep_alive: bool


@dataclass(slots=True)
class _Connection:
    id: int
    writer: asyncio.StreamWriter
    task: asyncio.Task[Any]
    busy: bool = False
    requests: int = 0


@dataclass(slots=True)
class _Timing:
    first_token_delay_ms: float
    inter_chunk_delay_ms: float
    chars_per_chunk: int | tuple[int, int]


@dataclass(slots=True)
class _ChatCtx:
    id: str
    created: int
    model: str
    include_usage: bool
    usage: dict[str, Any] = field(default_factory=dict)


class _Body:
    """Writes a response body either chunked (HTTP/1.1) or close-delimited (HTTP/1.0)."""

    def __init__(self, writer: asyncio.StreamWriter, chunked: bool) -> None:
        self.writer = writer
        self.chunked = chunked

    def frame(self, data: bytes) -> bytes:
        if not self.chunked or not data:
            return data
        return b"%x\r\n%s\r\n" % (len(data), data)

    async def send(self, *parts: bytes) -> None:
        self.writer.write(b"".join(self.frame(p) for p in parts))
        await self.writer.drain()

    async def finish(self) -> None:
        if self.chunked:
            self.writer.write(b"0\r\n\r\n")
            await self.writer.drain()


def _sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else _dumps(payload)
    return f"data: {data}\n\n".encode()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _error_payload(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _mask_key(key: str) -> str:
    return key if len(key) <= 8 else f"{key[:3]}{'*' * 12}{key[-4:]}"


def _retry_after_headers(seconds: float) -> list[tuple[str, str]]:
    return [("Retry-After", str(max(0, math.ceil(seconds)))), ("retry-after-ms", str(int(seconds * 1000)))]


class OpenAISimulator:
    """A local SIMULATOR of the OpenAI HTTP API on 127.0.0.1.

    Routes: ``/v1/models``, ``/v1/chat/completions`` and ``/v1/audio/speech`` (``response_format`` ``pcm``
    or ``wav``: synthetic speech-like audio from ``synthetic_speech``, streamed in ``speech_chunk_bytes``
    chunks; ``first_token_delay_ms`` delays the first byte, ``inter_chunk_delay_ms`` separates chunks).

    It speaks real HTTP/1.1 (keep-alive, ``Content-Length`` or chunked bodies, SSE streaming, OpenAI error
    bodies and status codes) but answers from a reply policy, with tunable timing and injectable faults.

    Args:
        host: Interface to bind (loopback by default).
        port: Port to bind; 0 picks a free one (see ``port`` / ``base_url`` after ``start()``).
        api_key: Expected bearer key; ``None`` disables authentication.
        models: Model ids served by ``/v1/models`` and accepted by chat completions.
        reply: Reply policy: a callable ``(request_dict) -> str | Mapping`` (may be async), a constant text
            or mapping, or a sequence of scripted replies consumed in order (then echo).
            Default: ``EchoReply()``.
        first_token_delay_ms: Delay before the first byte of an answer (headers included unless
            ``early_headers``).
        inter_chunk_delay_ms: Delay between streamed content chunks.
        chars_per_chunk: Characters per content delta, or an inclusive ``(min, max)`` range drawn from a
            generator seeded with ``seed``.
        early_headers: Send streaming response headers at once; ``first_token_delay_ms`` then only delays the
            first SSE event.
        answer_field: Property of a ``json_schema`` answer that receives the reply text.
        idle_timeout_s: Close keep-alive connections idle for this long (``None``: never).
        history_limit: How many ``RecordedRequest`` to keep in ``requests``.
        seed: Seed for the chunk-size generator.
        speech_models: Model ids accepted by ``/v1/audio/speech`` (not listed by ``/v1/models``).
        speech_chunk_bytes: Bytes per chunk of a speech body (odd by default: chunks split frames).
        one_request_at_a_time: Serve model and chat requests one at a time, like llama.cpp's server: a
            request waits while another is in progress, and (with ``interrupt_streams``) a waiting
            request ends the running stream after its current chunk with ``[DONE]`` and no finish chunk.
            Combine with ``idle_timeout_s=5`` for a uvicorn-like server.
        interrupt_streams: See ``one_request_at_a_time`` (llama-cpp-python's ``interrupt_requests``).
        keep_alive_header: Announce ``idle_timeout_s`` in a ``Keep-Alive: timeout=N`` header (uvicorn, and
            so llama.cpp's Python server, announces nothing: set False to play them).
        response_formats: ``response_format`` types accepted (``None``: all); another one is refused as
            llama.cpp refuses ``json_schema``: HTTP 500 with a validation message naming response_format.
        embedding_models: Models accepted by ``/v1/embeddings`` -> their native dimension.
        embedding_backends: Model -> a backend computing its vectors (default for every model: the
            deterministic ``hashed_embedding``).
        embedding_delay_ms: Delay before an embeddings answer (a plan's ``first_token_delay_ms``
            overrides it per request).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = "sk-simulator",
        models: Sequence[str] = DEFAULT_MODELS,
        reply: ReplyPolicy | ReplyValue | Sequence[ReplyValue] | None = None,
        first_token_delay_ms: float = 0.0,
        inter_chunk_delay_ms: float = 0.0,
        chars_per_chunk: int | tuple[int, int] = 6,
        early_headers: bool = False,
        answer_field: str = "answer",
        idle_timeout_s: float | None = 75.0,
        history_limit: int = 1000,
        seed: int = 0,
        speech_models: Sequence[str] = DEFAULT_SPEECH_MODELS,
        speech_chunk_bytes: int = _DEFAULT_SPEECH_CHUNK_BYTES,
        one_request_at_a_time: bool = False,
        interrupt_streams: bool = True,
        response_formats: Sequence[str] | None = None,
        keep_alive_header: bool = True,
        embedding_models: Mapping[str, int] = DEFAULT_EMBEDDING_MODELS,
        embedding_backends: Mapping[str, EmbeddingBackend] | None = None,
        embedding_delay_ms: float = 0.0,
    ) -> None:
        if speech_chunk_bytes < 1:
            raise ValueError(f"speech_chunk_bytes must be positive, got {speech_chunk_bytes}")
        self.host = host
        self._requested_port = port
        self.api_key = api_key
        self.models: list[str] = list(models)
        self.reply_policy: ReplyPolicy = _as_policy(reply)
        self.first_token_delay_ms = first_token_delay_ms
        self.inter_chunk_delay_ms = inter_chunk_delay_ms
        self.chars_per_chunk = chars_per_chunk
        self.early_headers = early_headers
        self.answer_field = answer_field
        self.idle_timeout_s = idle_timeout_s
        self.speech_models: list[str] = list(speech_models)
        self.speech_chunk_bytes = speech_chunk_bytes
        self.embedding_models: dict[str, int] = dict(embedding_models)
        self.embedding_backends: dict[str, EmbeddingBackend] = dict(embedding_backends or {})
        self.embedding_delay_ms = embedding_delay_ms
        self.default_plan: RequestPlan | None = None
        self.one_request_at_a_time = one_request_at_a_time
        self.keep_alive_header = keep_alive_header
        self.interrupt_streams = interrupt_streams
        self.response_formats: tuple[str, ...] | None = (
            None if response_formats is None else tuple(response_formats)
        )
        #: Most model/chat requests that were being served at once.
        self.max_in_flight = 0
        #: Streams ended early because another request was waiting (``one_request_at_a_time``).
        self.streams_interrupted = 0
        self._in_flight = 0
        self._waiting = 0
        self._serial = asyncio.Lock()

        self.requests_by_path: collections.Counter[str] = collections.Counter()
        self.connections_accepted = 0
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=history_limit)

        self._plans: collections.deque[RequestPlan] = collections.deque()
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._connections: dict[int, _Connection] = {}
        self._closing = False
        self._port: int | None = None
        self._seq = 0
        self._request_event = asyncio.Event()

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind the listening socket and start serving.

        Raises:
            RuntimeError: If already started.
            OSError: If the port cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._closing = False
        # A listen backlog like production servers' (uvicorn: 2048): hundreds of calls connecting at
        # once must queue, not time out in SYN retries behind asyncio's default of 100.
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self._requested_port, limit=_MAX_HEAD_BYTES, backlog=2048
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.debug("openai simulator listening on %s", self.base_url)

    async def stop(self) -> None:
        """Stop listening and close every open connection (stalled ones included) promptly."""
        server, self._server = self._server, None
        self._closing = True
        if server is not None:
            server.close()
        await self._kill(list(self._connections.values()))
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (after ``start()``)."""
        if self._port is None:
            raise RuntimeError("simulator not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1`` — what to pass as an OpenAI client's ``base_url``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def open_connections(self) -> int:
        """Number of TCP connections currently open."""
        return len(self._connections)

    async def drop_connections(self, *, idle_only: bool = True) -> int:
        """Close connections from the server side (simulates a provider/LB dropping keep-alive sockets).

        Args:
            idle_only: Only close connections not in the middle of a request.

        Returns:
            How many connections were closed.
        """
        victims = [c for c in self._connections.values() if not (idle_only and c.busy)]
        await self._kill(victims)
        return len(victims)

    async def _kill(self, connections: list[_Connection]) -> None:
        for conn in connections:
            conn.writer.transport.abort()
            conn.task.cancel()
        current = asyncio.current_task()
        tasks = [c.task for c in connections if c.task is not current]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------------ plans/faults

    def plan_next(self, plan: RequestPlan, *, times: int = 1) -> None:
        """Queue ``plan`` for the next ``times`` requests matching ``plan.path`` (FIFO)."""
        self._plans.extend([plan] * times)

    def inject(
        self,
        fault: Fault,
        *,
        times: int = 1,
        retry_after: float | None = None,
        after_chunks: int | None = None,
        graceful: bool = False,
        stall_s: float | None = None,
        message: str | None = None,
        path: str | None = CHAT_COMPLETIONS_PATH,
        first_token_delay_ms: float | None = None,
        inter_chunk_delay_ms: float | None = None,
        chars_per_chunk: int | tuple[int, int] | None = None,
    ) -> RequestPlan:
        """Queue ``fault`` for the next ``times`` matching requests; see ``RequestPlan`` for the arguments.

        Returns:
            The queued plan.
        """
        plan = RequestPlan(
            fault=fault,
            path=path,
            retry_after=retry_after,
            after_chunks=after_chunks,
            graceful=graceful,
            stall_s=stall_s,
            message=message,
            first_token_delay_ms=first_token_delay_ms,
            inter_chunk_delay_ms=inter_chunk_delay_ms,
            chars_per_chunk=chars_per_chunk,
        )
        self.plan_next(plan, times=times)
        return plan

    def set_default_plan(self, plan: RequestPlan | None) -> None:
        """Apply ``plan`` to every matching request that has no queued plan (``None`` turns it off)."""
        self.default_plan = plan

    def set_default_fault(self, fault: Fault | None, **kwargs: Any) -> None:
        """Default-for-all mode: inject ``fault`` into every matching request until called with ``None``.

        Args:
            fault: The fault, or ``None`` to go back to normal answers.
            **kwargs: Other ``RequestPlan`` fields (``retry_after``, ``path``...).
        """
        self.default_plan = None if fault is None else RequestPlan(fault=fault, **kwargs)

    def clear_plans(self) -> None:
        """Drop queued plans and the default plan."""
        self._plans.clear()
        self.default_plan = None

    @property
    def pending_plans(self) -> int:
        """Number of queued (not yet consumed) plans."""
        return len(self._plans)

    def script(self, *replies: ReplyValue, fallback: ReplyPolicy | None = None) -> ScriptedReplies:
        """Replace the reply policy with scripted replies consumed in order (then ``fallback`` / echo)."""
        policy = ScriptedReplies(replies, fallback=fallback)
        self.reply_policy = policy
        return policy

    def _take_plan(self, path: str) -> RequestPlan | None:
        for i, plan in enumerate(self._plans):
            if plan.matches(path):
                del self._plans[i]
                return plan
        if self.default_plan is not None and self.default_plan.matches(path):
            return self.default_plan
        return None

    # ------------------------------------------------------------------------------------ counters

    @property
    def last_request(self) -> RecordedRequest | None:
        """The most recent request, or ``None``."""
        return self.requests[-1] if self.requests else None

    @property
    def last_request_json(self) -> Any:
        """The most recent request body parsed as JSON (``None`` if absent or not JSON)."""
        last = self.last_request
        return last.json() if last is not None else None

    @property
    def last_request_headers(self) -> dict[str, str]:
        """Headers (lower-case names) of the most recent request (empty when none)."""
        last = self.last_request
        return dict(last.headers) if last is not None else {}

    def request_count(self, path: str | None = None) -> int:
        """Requests received on ``path`` (all paths when ``None``)."""
        return sum(self.requests_by_path.values()) if path is None else self.requests_by_path[path]

    async def wait_for_requests(self, count: int = 1, *, path: str | None = None) -> None:
        """Wait until at least ``count`` requests were received on ``path`` (any path when ``None``).

        Bound the wait with ``asyncio.timeout(...)`` around the call.
        """
        while self.request_count(path) < count:
            self._request_event.clear()
            await self._request_event.wait()

    def reset_counters(self) -> None:
        """Zero the request/connection counters and forget the request history."""
        self.requests_by_path.clear()
        self.requests.clear()
        self.connections_accepted = 0

    def stats(self) -> dict[str, Any]:
        """JSON-friendly snapshot of the counters."""
        return {
            "connections_accepted": self.connections_accepted,
            "open_connections": self.open_connections,
            "requests_by_path": dict(self.requests_by_path),
            "pending_plans": self.pending_plans,
        }

    # ------------------------------------------------------------------------------------ connection

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing or task is None:
            writer.transport.abort()
            return
        self.connections_accepted += 1
        conn = _Connection(id=self.connections_accepted, writer=writer, task=task)
        self._connections[conn.id] = conn
        try:
            await self._serve_connection(conn, reader, writer)
        except asyncio.CancelledError:
            pass  # stop() / drop_connections(): the socket is already aborted
        except OSError:
            pass  # client went away mid-response
        except Exception:
            log.exception("openai simulator: connection %d failed", conn.id)
        finally:
            self._connections.pop(conn.id, None)
            writer.close()
            # stop() may cancel this task while it waits here; ending cancelled would make asyncio's
            # stream callback (task.exception()) log a spurious "Exception in callback" on 3.11.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_connection(
        self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while not self._closing:
            conn.busy = False
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    req = await self._read_request(reader, writer)
            except TimeoutError:
                return
            except _HttpError as err:
                payload = _error_payload(err.message, "invalid_request_error", None)
                await self._send_json(writer, None, err.status, payload, keep_alive=False)
                return
            if req is None:
                return
            conn.busy = True
            conn.requests += 1
            self.requests_by_path[req.path] += 1
            self.requests.append(
                RecordedRequest(
                    method=req.method,
                    path=req.path,
                    query=req.query,
                    headers=dict(req.headers),
                    body=req.body,
                    connection_id=conn.id,
                    index_on_connection=conn.requests,
                    received_at=time.monotonic(),
                )
            )
            self._request_event.set()
            if not await self._dispatch(req, reader, writer):
                return

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as err:
            if err.partial.strip():
                raise _HttpError(400, "Incomplete HTTP request head.") from None
            return None
        except asyncio.LimitOverrunError:
            raise _HttpError(431, "Request header fields too large.") from None
        lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) == 3 and parts[0] == "PRI" and parts[2] == "HTTP/2.0":
            return None  # h2 prior knowledge: not spoken here, just close
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _HttpError(400, f"Malformed request line: {lines[0][:100]!r}")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise _HttpError(400, f"Malformed header line: {line[:100]!r}")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = await self._read_body(reader, headers)
        split = urlsplit(target)
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
        self._seq += 1
        return _Request(
            method=method.upper(),
            path=unquote(split.path) or "/",
            query=split.query,
            version=version,
            headers=headers,
            body=body,
            request_id=f"req_sim{self._seq:012d}",
            keep_alive=keep_alive,
        )

    async def _read_body(self, reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
        try:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                chunks: list[bytes] = []
                total = 0
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0].strip(), 16)
                    if size == 0:
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":
                            pass  # trailers
                        return b"".join(chunks)
                    total += size
                    if total > _MAX_BODY_BYTES:
                        raise _HttpError(413, "Request body too large.")
                    chunks.append(await reader.readexactly(size))
                    await reader.readexactly(2)
            length = int(headers.get("content-length", "0") or "0")
        except ValueError:
            raise _HttpError(400, "Invalid chunk size or Content-Length.") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            raise _HttpError(400, "Incomplete request body.") from None
        if length < 0 or length > _MAX_BODY_BYTES:
            raise _HttpError(413, "Request body too large.")
        try:
            return await reader.readexactly(length) if length else b""
        except asyncio.IncompleteReadError:
            raise _HttpError(400, "Incomplete request body.") from None

    # ------------------------------------------------------------------------------------ writing

    def _head(
        self, req: _Request | None, status: int, headers: Sequence[tuple[str, str]], *, keep_alive: bool
    ) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            f"Date: {formatdate(usegmt=True)}",
            "Server: voxcore-simulator",
            "openai-version: 2020-10-01",
            f"openai-organization: {OWNED_BY}",
        ]
        if req is not None:
            lines.append(f"x-request-id: {req.request_id}")
        lines.extend(f"{k}: {v}" for k, v in headers)
        if keep_alive:
            lines.append("Connection: keep-alive")
            if self.idle_timeout_s is not None and self.keep_alive_header:
                lines.append(f"Keep-Alive: timeout={math.ceil(self.idle_timeout_s)}")
        else:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send_bytes(
        self,
        writer: asyncio.StreamWriter,
        req: _Request | None,
        status: int,
        body: bytes,
        *,
        keep_alive: bool,
        content_type: str = "application/json",
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra_headers]
        if req is not None and req.method == "HEAD":
            body = b""
        writer.write(self._head(req, status, headers, keep_alive=keep_alive) + body)
        await writer.drain()

    async def _send_json(
        self,
        writer: asyncio.StreamWriter,
        req: _Request | None,
        status: int,
        payload: Any,
        *,
        keep_alive: bool,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        body = _dumps(payload).encode()
        await self._send_bytes(writer, req, status, body, keep_alive=keep_alive, extra_headers=extra_headers)

    async def _send_error(
        self,
        writer: asyncio.StreamWriter,
        req: _Request,
        status: int,
        message: str,
        type_: str,
        code: str | None,
        param: str | None = None,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> bool:
        payload = _error_payload(message, type_, code, param)
        await self._send_json(
            writer, req, status, payload, keep_alive=req.keep_alive, extra_headers=extra_headers
        )
        return req.keep_alive

    async def _stall(self, reader: asyncio.StreamReader, seconds: float | None) -> None:
        """Wait until the client closes its side (or ``seconds`` pass), discarding anything it sends."""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(seconds):
                while await reader.read(65536):
                    pass

    async def _send_json_with_fault(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: _Request,
        payload: Any,
        plan: RequestPlan | None,
    ) -> bool:
        """Send a 200 JSON body, corrupted as the plan's body-level fault says. Returns keep-alive."""
        fault = plan.fault if plan is not None else None
        body = _dumps(payload).encode()
        if fault is Fault.MALFORMED or (fault is Fault.INVALID_JSON and "choices" not in payload):
            body = body[: max(1, len(body) // 3)]
            await self._send_bytes(writer, req, 200, body, keep_alive=req.keep_alive)
            return req.keep_alive
        if fault is Fault.TRUNCATED and plan is not None:
            half = body[: len(body) // 2]
            if plan.graceful:
                await self._send_bytes(writer, req, 200, half, keep_alive=req.keep_alive)
                return req.keep_alive
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            writer.write(self._head(req, 200, headers, keep_alive=False) + half)
            await writer.drain()
            return False
        if fault is Fault.STALL and plan is not None:
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            writer.write(self._head(req, 200, headers, keep_alive=False))
            await writer.drain()
            await self._stall(reader, plan.stall_s)
            return False
        await self._send_bytes(writer, req, 200, body, keep_alive=req.keep_alive)
        return req.keep_alive

    # ------------------------------------------------------------------------------------ routing

    def _authorized(self, req: _Request) -> tuple[bool, str]:
        if self.api_key is None:
            return True, ""
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token == self.api_key:
            return True, ""
        if not token:
            return False, (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). (voxcore simulator)"
            )
        return False, f"Incorrect API key provided: {_mask_key(token)}. (voxcore simulator)"

    async def _dispatch(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if req.path.startswith(ADMIN_PREFIX):
            return await self._admin(req, writer)
        ok, why = self._authorized(req)
        if not ok:
            return await self._send_error(writer, req, 401, why, "invalid_request_error", "invalid_api_key")
        path = req.path.rstrip("/") or "/"
        method = "GET" if req.method == "HEAD" else req.method
        model_id: str | None = None
        if method == "GET" and path == MODELS_PATH:
            route = "models"
        elif method == "GET" and path.startswith(MODELS_PATH + "/"):
            route, model_id = "model", path[len(MODELS_PATH) + 1 :]
        elif method == "POST" and path == CHAT_COMPLETIONS_PATH:
            route = "chat"
        elif method == "POST" and path == AUDIO_SPEECH_PATH:
            route = "speech"
        elif method == "POST" and path == EMBEDDINGS_PATH:
            route = "embeddings"
        else:
            message = f"Invalid URL ({req.method} {req.path})"
            return await self._send_error(writer, req, 404, message, "invalid_request_error", None)
        if route == "speech":
            return await self._route(route, model_id, path, req, reader, writer)
        if self.one_request_at_a_time:
            self._waiting += 1
            try:
                await self._serial.acquire()
            finally:
                self._waiting -= 1
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            return await self._route(route, model_id, path, req, reader, writer)
        finally:
            self._in_flight -= 1
            if self.one_request_at_a_time:
                self._serial.release()

    async def _route(
        self,
        route: str,
        model_id: str | None,
        path: str,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        plan = self._take_plan(path)
        fault = plan.fault if plan is not None else None
        if plan is not None and fault in _STATUS_FAULTS:
            return await self._send_status_fault(writer, req, plan)
        if fault is Fault.TIMEOUT and plan is not None:
            await self._stall(reader, plan.stall_s)
            return False

        if route == "models":
            data = [self._model_object(m) for m in self.models]
            listing = {"object": "list", "data": data}
            return await self._send_json_with_fault(reader, writer, req, listing, plan)
        if route == "model":
            assert model_id is not None
            if model_id not in self.models:
                return await self._send_error(
                    writer,
                    req,
                    404,
                    f"The model '{model_id}' does not exist",
                    "invalid_request_error",
                    "model_not_found",
                    "model",
                )
            return await self._send_json_with_fault(reader, writer, req, self._model_object(model_id), plan)
        if route == "speech":
            return await self._speech(req, reader, writer, plan)
        if route == "embeddings":
            return await self._embeddings(req, reader, writer, plan)
        return await self._chat(req, reader, writer, plan)

    def _model_object(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": _MODEL_CREATED, "owned_by": OWNED_BY}

    async def _send_status_fault(
        self, writer: asyncio.StreamWriter, req: _Request, plan: RequestPlan
    ) -> bool:
        fault = plan.fault
        model = "gpt-4o-mini"
        parsed = _json_or_none(req.body)
        if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
            model = parsed["model"]
        if fault is Fault.BAD_KEY:
            key = req.headers.get("authorization", "").partition(" ")[2].strip() or "<none>"
            message = plan.message or f"Incorrect API key provided: {_mask_key(key)}. (voxcore simulator)"
            kind, code = "invalid_request_error", "invalid_api_key"
            return await self._send_error(writer, req, 401, message, kind, code)
        if fault is Fault.UNKNOWN_MODEL:
            message = plan.message or f"The model `{model}` does not exist or you do not have access to it."
            kind, code = "invalid_request_error", "model_not_found"
            return await self._send_error(writer, req, 404, message, kind, code)
        if fault is Fault.RATE_LIMIT:
            retry = 1.0 if plan.retry_after is None else plan.retry_after
            message = plan.message or (
                f"Rate limit reached for {model} in organization {OWNED_BY} on requests per min (RPM): "
                f"Limit 500, Used 500, Requested 1. Please try again in {retry:g}s. (voxcore simulator)"
            )
            headers = [
                *_retry_after_headers(retry),
                ("x-ratelimit-limit-requests", "500"),
                ("x-ratelimit-limit-tokens", "200000"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-remaining-tokens", "199000"),
                ("x-ratelimit-reset-requests", f"{retry:g}s"),
                ("x-ratelimit-reset-tokens", "0s"),
            ]
            return await self._send_error(
                writer, req, 429, message, "requests", "rate_limit_exceeded", extra_headers=headers
            )
        if fault is Fault.SERVER_ERROR:
            message = plan.message or (
                "The server had an error while processing your request. Sorry about that! (voxcore simulator)"
            )
            return await self._send_error(writer, req, 500, message, "server_error", None)
        message = plan.message or (
            "The engine is currently overloaded, please try again later. (voxcore simulator)"
        )
        headers = _retry_after_headers(plan.retry_after) if plan.retry_after is not None else []
        return await self._send_error(writer, req, 503, message, "server_error", None, extra_headers=headers)

    async def _admin(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        """Tiny control API for out-of-process users of the standalone simulator."""
        action = req.path[len(ADMIN_PREFIX) :].strip("/")
        if req.method == "GET" and action == "stats":
            await self._send_json(writer, req, 200, self.stats(), keep_alive=req.keep_alive)
            return req.keep_alive
        if req.method == "POST" and action == "plan":
            try:
                data = json.loads(req.body or b"{}")
                if not isinstance(data, dict):
                    raise ValueError("plan must be a JSON object")
                times = int(data.pop("times", 1))
                default = bool(data.pop("default", False))
                plan = RequestPlan.from_dict(data)
            except (ValueError, TypeError) as err:
                return await self._send_error(writer, req, 400, str(err), "invalid_request_error", None)
            if default:
                self.set_default_plan(plan)
            else:
                self.plan_next(plan, times=times)
            payload = {"queued": times if not default else 0, "pending_plans": self.pending_plans}
            await self._send_json(writer, req, 200, payload, keep_alive=req.keep_alive)
            return req.keep_alive
        if req.method == "POST" and action == "reset":
            self.clear_plans()
            self.reset_counters()
            await self._send_json(writer, req, 200, {"reset": True}, keep_alive=req.keep_alive)
            return req.keep_alive
        message = f"Invalid URL ({req.method} {req.path})"
        return await self._send_error(writer, req, 404, message, "invalid_request_error", None)

    # ------------------------------------------------------------------------------------ chat

    def _timing(self, plan: RequestPlan | None) -> _Timing:
        timing = _Timing(self.first_token_delay_ms, self.inter_chunk_delay_ms, self.chars_per_chunk)
        if plan is not None:
            if plan.first_token_delay_ms is not None:
                timing.first_token_delay_ms = plan.first_token_delay_ms
            if plan.inter_chunk_delay_ms is not None:
                timing.inter_chunk_delay_ms = plan.inter_chunk_delay_ms
            if plan.chars_per_chunk is not None:
                timing.chars_per_chunk = plan.chars_per_chunk
        return timing

    def _split(self, text: str, chars_per_chunk: int | tuple[int, int]) -> list[str]:
        pieces: list[str] = []
        i = 0
        while i < len(text):
            n = chars_per_chunk if isinstance(chars_per_chunk, int) else self._rng.randint(*chars_per_chunk)
            n = max(1, n)
            pieces.append(text[i : i + n])
            i += n
        return pieces

    def _validate_chat(self, body: Any) -> tuple[int, str, str | None, str | None] | None:
        """Return ``(status, message, param, code)`` for an invalid chat request, else ``None``."""
        if not isinstance(body, dict):
            return 400, "Invalid type for request body: expected an object.", None, "invalid_type"
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return 400, "you must provide a model parameter", "model", None
        messages = body.get("messages")
        if messages is None:
            return 400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        if not isinstance(messages, list) or not messages:
            return 400, "Invalid 'messages': expected a non-empty array.", "messages", "invalid_value"
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            return 400, "Invalid 'messages': every message needs a 'role'.", "messages", "invalid_value"
        rf = body.get("response_format")
        if rf is not None:
            kind = rf.get("type") if isinstance(rf, dict) else None
            if kind not in ("text", "json_object", "json_schema"):
                return 400, "Invalid 'response_format.type'.", "response_format.type", "invalid_value"
            if self.response_formats is not None and kind not in self.response_formats:
                allowed = " or ".join(f"'{k}'" for k in self.response_formats)
                message = (
                    "1 validation error for CreateChatCompletionRequest: response_format.type: "
                    f"Input should be {allowed} [type=literal_error, input_value={kind!r}]"
                )
                return 500, message, "response_format.type", None
            if kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                    return (
                        400,
                        "Missing required parameter: 'response_format.json_schema'.",
                        "response_format.json_schema",
                        "missing_required_parameter",
                    )
        if model not in self.models:
            msg = f"The model `{model}` does not exist or you do not have access to it."
            return 404, msg, None, "model_not_found"
        return None

    def _render(self, reply: ReplyValue, body: dict[str, Any]) -> tuple[str, bool]:
        """Turn a reply into message content; returns ``(content, is_structured)``."""
        rf = body.get("response_format")
        kind = rf.get("type") if isinstance(rf, dict) else None
        if isinstance(reply, Mapping):
            return _dumps(dict(reply)), True
        if kind == "json_schema" and isinstance(rf, dict):
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            obj = schema_example(schema or {}, answer=reply, answer_field=self.answer_field)
            return _dumps(obj), True
        if kind == "json_object":
            schema = rf.get("schema") if isinstance(rf, dict) else None
            if isinstance(schema, dict):
                return _dumps(schema_example(schema, answer=reply, answer_field=self.answer_field)), True
            return _dumps({self.answer_field: reply}), True
        return reply, False

    async def _reply(self, body: dict[str, Any], plan: RequestPlan | None) -> ReplyValue:
        if plan is not None and plan.reply is not None:
            return plan.reply
        result = self.reply_policy(body)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, str | Mapping):
            raise TypeError(f"reply policy returned {type(result).__name__}, expected str or Mapping")
        return result

    @staticmethod
    def _usage(body: dict[str, Any], content: str) -> dict[str, Any]:
        prompt = 3
        for message in body.get("messages", []):
            prompt += 4 + approx_tokens(_text_of(message.get("content")))
        completion = approx_tokens(content)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    async def _bad_json(self, writer: asyncio.StreamWriter, req: _Request) -> bool:
        return await self._send_error(
            writer,
            req,
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
            "not valid JSON.)",
            "invalid_request_error",
            None,
        )

    async def _valid_body(
        self,
        req: _Request,
        writer: asyncio.StreamWriter,
        validate: Callable[[Any], tuple[int, str, str | None, str | None] | None],
    ) -> Any:
        """The request's parsed JSON body, or the keep-alive flag of the error response already sent."""
        try:
            body = json.loads(req.body)
        except ValueError:
            return await self._bad_json(writer, req)
        invalid = validate(body)
        if invalid is not None:
            status, message, param, code = invalid
            return await self._send_error(writer, req, status, message, "invalid_request_error", code, param)
        return body

    async def _chat(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        plan: RequestPlan | None,
    ) -> bool:
        body = await self._valid_body(req, writer, self._validate_chat)
        if isinstance(body, bool):
            return body
        try:
            reply = await self._reply(body, plan)
        except Exception as err:
            log.exception("openai simulator: reply policy failed")
            message = f"simulator reply policy failed: {type(err).__name__}: {err}"
            return await self._send_error(writer, req, 500, message, "server_error", None)

        content, structured = self._render(reply, body)
        fault = plan.fault if plan is not None else None
        if fault is Fault.INVALID_JSON:
            content = (content[:-1] if content.endswith("}") else content) + ",}"
        if plan is not None:
            if plan.raw_newlines:
                content = content.replace("\\n", "\n")
            if plan.fence:
                content = f"```json\n{content}\n```"
            if plan.trailing_text:
                content += plan.trailing_text
        finish_reason = "stop"
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(max_tokens, int) and max_tokens > 0 and approx_tokens(content) > max_tokens:
            content = content[: max_tokens * 4]
            finish_reason = "length"
        self._seq += 1
        stream_options = body.get("stream_options")
        ctx = _ChatCtx(
            id=f"chatcmpl-sim{self._seq:020d}",
            created=int(time.time()),
            model=body["model"],
            include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
            usage=self._usage(body, content),
        )
        timing = self._timing(plan)
        pieces = self._split(content, timing.chars_per_chunk)
        if body.get("stream") is True:
            return await self._stream(req, reader, writer, plan, ctx, pieces, finish_reason, timing)

        delay_ms = timing.first_token_delay_ms + timing.inter_chunk_delay_ms * max(0, len(pieces) - 1)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        payload = {
            "id": ctx.id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": ctx.usage,
            "service_tier": "default",
            "system_fingerprint": "fp_simulator",
        }
        return await self._send_json_with_fault(reader, writer, req, payload, plan)

    def _chunk(self, ctx: _ChatCtx, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        payload: dict[str, Any] = {
            "id": ctx.id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model,
            "service_tier": "default",
            "system_fingerprint": "fp_simulator",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if ctx.include_usage:
            payload["usage"] = None
        return _sse(payload)

    async def _stream(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        plan: RequestPlan | None,
        ctx: _ChatCtx,
        pieces: list[str],
        finish_reason: str,
        timing: _Timing,
    ) -> bool:
        fault = plan.fault if plan is not None else None
        chunked = req.version != "HTTP/1.0"
        keep_alive = req.keep_alive and chunked and fault is not Fault.TRUNCATED and fault is not Fault.STALL
        headers = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache")]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        head = self._head(req, 200, headers, keep_alive=keep_alive)
        out = _Body(writer, chunked)
        if self.early_headers:
            writer.write(head)
            await writer.drain()
            head = b""
        if timing.first_token_delay_ms > 0:
            await asyncio.sleep(timing.first_token_delay_ms / 1000)
        writer.write(head)
        await out.send(self._chunk(ctx, {"role": "assistant", "content": ""}, None))

        after = 0
        if plan is not None and fault in _DEFAULT_AFTER_CHUNKS:
            after = _DEFAULT_AFTER_CHUNKS[fault] if plan.after_chunks is None else max(0, plan.after_chunks)
        if fault is Fault.TRUNCATED:
            after = min(after, max(0, len(pieces) - 1))  # never deliver the whole content
        for i, piece in enumerate(pieces):
            if fault is not None and i == after:
                if fault is Fault.STALL:
                    await self._stall(reader, plan.stall_s if plan is not None else None)
                    return False
                if fault is Fault.TRUNCATED:
                    if plan is not None and plan.graceful:
                        await out.finish()
                    return False
                if fault is Fault.MALFORMED:
                    await out.send(_sse(MALFORMED_SSE_DATA))
            if i > 0 and timing.inter_chunk_delay_ms > 0:
                await asyncio.sleep(timing.inter_chunk_delay_ms / 1000)
            await out.send(self._chunk(ctx, {"content": piece}, None))
            if self.one_request_at_a_time and self.interrupt_streams and self._waiting:
                # llama-cpp-python: another request is waiting for the model, so this stream ends here.
                self.streams_interrupted += 1
                await out.send(b"data: [DONE]\n\n")
                await out.finish()
                return keep_alive
        if fault is Fault.STALL:  # content shorter than after_chunks
            await self._stall(reader, plan.stall_s if plan is not None else None)
            return False
        if fault is Fault.TRUNCATED:
            if plan is not None and plan.graceful:
                await out.finish()
            return False
        if fault is Fault.MALFORMED and after >= len(pieces):
            await out.send(_sse(MALFORMED_SSE_DATA))
        tail = [self._chunk(ctx, {}, finish_reason)]
        if ctx.include_usage:
            usage_chunk = {
                "id": ctx.id,
                "object": "chat.completion.chunk",
                "created": ctx.created,
                "model": ctx.model,
                "service_tier": "default",
                "system_fingerprint": "fp_simulator",
                "choices": [],
                "usage": ctx.usage,
            }
            tail.append(_sse(usage_chunk))
        tail.append(b"data: [DONE]\n\n")
        await out.send(*tail)
        await out.finish()
        return keep_alive

    # ------------------------------------------------------------------------------------ speech

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

        chunked = req.version != "HTTP/1.0"
        keep_alive = req.keep_alive and chunked and fault is not Fault.TRUNCATED and fault is not Fault.STALL
        headers = [("Content-Type", "audio/wav" if fmt == "wav" else "audio/pcm")]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        head = self._head(req, 200, headers, keep_alive=keep_alive)
        out = _Body(writer, chunked)
        if self.early_headers:
            writer.write(head)
            await writer.drain()
            head = b""
        if timing.first_token_delay_ms > 0:
            await asyncio.sleep(timing.first_token_delay_ms / 1000)
        writer.write(head)

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

    # ------------------------------------------------------------------------------------ embeddings

    async def _embeddings(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        plan: RequestPlan | None,
    ) -> bool:
        models = self.embedding_models
        body = await self._valid_body(req, writer, lambda b: validate_embeddings(b, models))
        if isinstance(body, bool):
            return body
        backend = self.embedding_backends.get(body["model"]) or default_backend()
        try:
            payload = embeddings_payload(body, models, backend)
        except Exception as err:
            log.exception("openai simulator: embedding backend failed")
            message = f"embedding backend failed: {err}"
            return await self._send_error(writer, req, 500, message, "server_error", None)
        delay = self.embedding_delay_ms
        if plan is not None and plan.first_token_delay_ms is not None:
            delay = plan.first_token_delay_ms
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        return await self._send_json_with_fault(reader, writer, req, payload, plan)
