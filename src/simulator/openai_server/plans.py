"""Request plans (faults and per-request overrides), recorded requests, and the routes' paths."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"

AUDIO_SPEECH_PATH = "/v1/audio/speech"

MODELS_PATH = "/v1/models"

ADMIN_PREFIX = "/_simulator/"

DEFAULT_MODELS: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "sim-small")

OWNED_BY = "voxcore-simulator"

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
