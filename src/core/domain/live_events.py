"""Live call events: their types, their ids (Redis Stream ids), their wire form, and access tokens.

An event is ``{"id": "<ms>-<seq>", "type": "...", "ts": <ms>, "data": {...}}``. The id is the one
the session's stream gave it, so ids are ordered, unique per session, and what a client sends back
as ``Last-Event-ID`` to resume exactly after it.

Access to a session's events takes that session's token: an HMAC-SHA256 of the session id under
the deployment's secret (domain-separated, so a session token never equals the operator token).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from voxcore.core.domain.errors import DomainError

# -- event types -----------------------------------------------------------------------------------

CALL_STARTED: Final = "call_started"
CALL_ENDED: Final = "call_ended"
USER_TEXT: Final = "user_text"
ANSWER_TEXT: Final = "answer_text"
TURN: Final = "turn"
HANDOVER: Final = "handover"
SUMMARY_CACHE: Final = "summary_cache"
HYBRID_ITEM: Final = "hybrid_item"
ERROR: Final = "error"
#: Sent by the SSE endpoint (never stored): the id a client resumed from is gone.
RESET: Final = "reset"

#: Every type a call publishes.
EVENT_TYPES: Final = frozenset(
    {CALL_STARTED, CALL_ENDED, USER_TEXT, ANSWER_TEXT, TURN, HANDOVER, SUMMARY_CACHE, HYBRID_ITEM, ERROR}
)
#: Types that also go to the index of calls.
INDEX_TYPES: Final = frozenset({CALL_STARTED, CALL_ENDED})

_STREAM_ID = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})")
_U64 = 2**64


class InvalidEventIdError(DomainError):
    """An event id that is not a Redis Stream id (``<milliseconds>-<sequence>``)."""


def parse_event_id(value: str) -> tuple[int, int]:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``.

    Raises:
        InvalidEventIdError: anything else (the message quotes at most 40 characters of it).
    """
    match = _STREAM_ID.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidEventIdError(f"not an event id (<ms>-<seq>): {str(value)[:40]!r}")
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms >= _U64 or seq >= _U64:
        raise InvalidEventIdError(f"event id out of range: {value[:40]!r}")
    return ms, seq


def id_after(a: str, b: str) -> bool:
    """True when event id ``a`` comes after ``b`` (both valid ids)."""
    return parse_event_id(a) > parse_event_id(b)


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """One event of a call, as stored and as sent.

    Attributes:
        id: The stream id.
        type: One of :data:`EVENT_TYPES`.
        ts: Wall-clock milliseconds when it was published.
        data: The event's fields (JSON-compatible).
        raw: The event as one JSON text (what SSE clients receive as ``data``).
    """

    id: str
    type: str
    ts: int
    data: Mapping[str, Any]
    raw: str
    # Computed once per event, not once per subscriber: the hub hands the same object to every client.
    _key: tuple[int, int] = field(init=False, repr=False, compare=False)
    _sse: bytes | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_key", parse_event_id(self.id))

    @property
    def key(self) -> tuple[int, int]:
        """The id as a sortable pair."""
        return self._key

    @property
    def sse(self) -> bytes:
        """The event as one ready-to-send SSE message (``id``, ``event``, ``data`` lines), encoded once."""
        encoded = self._sse
        if encoded is None:
            data = "".join(f"data: {line}\n" for line in self.raw.splitlines() or [""])
            encoded = f"id: {self.id}\nevent: {self.type}\n{data}\n".encode()
            object.__setattr__(self, "_sse", encoded)
        return encoded


def encode_data(data: Mapping[str, Any]) -> str:
    """An event's fields as compact JSON (non-ASCII kept; NaN/inf become ``null``)."""
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(_finite(data), ensure_ascii=False, separators=(",", ":"), default=str)


def event_json(event_id: str, event_type: str, ts: int, data_json: str) -> str:
    """The wire JSON of an event, built from its already-encoded data (no re-encoding)."""
    return f'{{"id":"{event_id}","type":"{event_type}","ts":{ts},"data":{data_json}}}'


def event_from_fields(event_id: str, event_type: str, ts: int, data_json: str) -> LiveEvent:
    """Build a :class:`LiveEvent` from a stream entry's fields.

    Raises:
        InvalidEventIdError: the id is not a stream id.
        ValueError: the type is unknown or the data is not a JSON object.
    """
    parse_event_id(event_id)
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type[:40]!r}")
    data = json.loads(data_json)
    if not isinstance(data, dict):
        raise ValueError("event data must be a JSON object")
    return LiveEvent(event_id, event_type, ts, data, event_json(event_id, event_type, ts, data_json))


def event_from_json(raw: str) -> LiveEvent:
    """Parse the wire JSON of an event (what the pub/sub channel carries).

    Raises:
        ValueError: not an event (the id, type, ts or data is missing or invalid).
    """
    record = json.loads(raw)
    if not isinstance(record, dict):
        raise ValueError("an event must be a JSON object")
    event_id, event_type, ts, data = (
        record.get("id"),
        record.get("type"),
        record.get("ts"),
        record.get("data"),
    )
    if not isinstance(event_id, str) or not isinstance(event_type, str) or not isinstance(ts, int):
        raise ValueError("an event needs a string id and type and an integer ts")
    parse_event_id(event_id)
    if not isinstance(data, dict):
        raise ValueError("event data must be a JSON object")
    return LiveEvent(event_id, event_type, ts, data, raw)


def check_event_type(event_type: str) -> str:
    """Return ``event_type`` when calls may publish it.

    Raises:
        ValueError: an unknown type.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}; known: {', '.join(sorted(EVENT_TYPES))}")
    return event_type


# -- access tokens ---------------------------------------------------------------------------------

_SESSION_SCOPE: Final = b"voxcore-events/session\x00"
_OPERATOR_SCOPE: Final = b"voxcore-events/operator\x00"


def session_token(secret: str, session_id: str) -> str:
    """The token that opens ``session_id``'s events: hex HMAC-SHA256 of the session id.

    Raises:
        ValueError: an empty secret or session id.
    """
    if not secret or not session_id:
        raise ValueError("the events secret and the session id must not be empty")
    return hmac.new(
        secret.encode("utf-8"), _SESSION_SCOPE + session_id.encode("utf-8"), hashlib.sha256
    ).hexdigest()


def operator_token(secret: str) -> str:
    """The token that opens every session's events and the list of calls.

    Raises:
        ValueError: an empty secret.
    """
    if not secret:
        raise ValueError("the events secret must not be empty")
    return hmac.new(secret.encode("utf-8"), _OPERATOR_SCOPE, hashlib.sha256).hexdigest()


def token_grants(secret: str, token: str | None, session_id: str | None) -> bool:
    """True when ``token`` opens ``session_id`` (``None``: the list of calls, operator only).

    Compared in constant time.
    """
    if not token or not secret:
        return False
    given = token.encode("utf-8", "replace")  # compare_digest refuses non-ASCII str
    if hmac.compare_digest(given, operator_token(secret).encode()):
        return True
    return bool(session_id) and hmac.compare_digest(given, session_token(secret, session_id or "").encode())


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
