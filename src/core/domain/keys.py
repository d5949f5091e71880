"""Cache key naming: ``static:<name>``, ``tts:<...>`` and ``summary:session:<hash>``."""

from __future__ import annotations

import hashlib

from voxcore.core.domain.errors import InvalidKeyError

STATIC_PREFIX = "static:"
TTS_PREFIX = "tts:"
SUMMARY_PREFIX = "summary:session:"
#: Longest accepted key (Redis allows 512 MB; anything this long is a bug upstream).
MAX_KEY_LENGTH = 1024


def static_key(name: str) -> str:
    """Key of a pre-recorded fragment, e.g. ``static_key("welcome") == "static:welcome"``."""
    return STATIC_PREFIX + _non_empty(name, "fragment name")


def tts_key(text_or_digest: str) -> str:
    """Key of a TTS result, e.g. ``tts:12500`` or ``tts:<digest>``."""
    return TTS_PREFIX + _non_empty(text_or_digest, "TTS key part")


def session_hash(session_id: str) -> str:
    """First 16 hex digits of ``sha1(session_id)`` (SPEC-LLM-3 §7)."""
    return hashlib.sha1(_non_empty(session_id, "session id").encode("utf-8")).hexdigest()[:16]


def summary_key(session_id: str) -> str:
    """Key of a session's LLM summary: ``summary:session:<sha1(session_id)[:16]>``."""
    return SUMMARY_PREFIX + session_hash(session_id)


def is_static(key: str) -> bool:
    """True for a pre-recorded fragment key (these never expire)."""
    return key.startswith(STATIC_PREFIX)


def is_tts(key: str) -> bool:
    """True for a TTS result key (these expire after the configured TTL)."""
    return key.startswith(TTS_PREFIX)


def is_summary(key: str) -> bool:
    """True for an LLM summary key (text with a TTL)."""
    return key.startswith(SUMMARY_PREFIX)


def check_key(key: object) -> str:
    """Return ``key`` when it is a usable cache key.

    Raises:
        InvalidKeyError: not a string, empty, or longer than :data:`MAX_KEY_LENGTH`.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"cache key must be str, got {type(key).__name__}")
    if not key:
        raise InvalidKeyError("cache key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"cache key is {len(key)} characters long (max {MAX_KEY_LENGTH})")
    return key


def _non_empty(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidKeyError(f"{what} must be a non-empty string, got {value!r}")
    return value


# -- per-session keys of the dialogue cache and the live events ------------------------------------
# One hash tag per session (``{<session hash>}``): every key of a session lands in one Redis Cluster
# slot, so a session's MULTI and its Lua script stay on one shard.

DIALOGUE_PREFIX = "dialogue:"
EVENTS_PREFIX = "events:"
#: The stream listing calls as they start and end (one per deployment, not per session). The hash
#: tag keeps it in the slot of its channel: in Redis Cluster one script writes both (SPUBLISH).
EVENTS_INDEX_KEY = "events:{index}"
#: The pub/sub channel announcing entries of :data:`EVENTS_INDEX_KEY`.
EVENTS_INDEX_CHANNEL = "events:{index}:live"


def session_tag(session_id: str) -> str:
    """``{<session hash>}``: the Redis Cluster hash tag shared by all keys of one session."""
    return "{" + session_hash(session_id) + "}"


def dialogue_messages_key(session_id: str) -> str:
    """Key of a session's stored messages: ``dialogue:{<hash>}:messages`` (a Redis List)."""
    return f"{DIALOGUE_PREFIX}{session_tag(session_id)}:messages"


def dialogue_summary_key(session_id: str) -> str:
    """Key of a session's context mark (summary + where its history starts): ``dialogue:{<hash>}:summary``."""
    return f"{DIALOGUE_PREFIX}{session_tag(session_id)}:summary"


def events_stream_key(session_id: str) -> str:
    """Key of a session's event stream: ``events:{<hash>}:stream`` (a Redis Stream)."""
    return f"{EVENTS_PREFIX}{session_tag(session_id)}:stream"


def events_channel(session_id: str) -> str:
    """Pub/sub channel of a session's live events: ``events:{<hash>}:live``."""
    return f"{EVENTS_PREFIX}{session_tag(session_id)}:live"
