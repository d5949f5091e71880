"""Cache key naming: ``static:<name>``, ``tts:<...>`` and ``summary:session:<hash>``; key prefixes.

Every key a caller passes to the cache lives in a *namespace*: its first ``:``-separated segment
(``static``, ``tts``, ``summary`` and whatever a host registers). ``voxcore`` is reserved for the
cache's own bookkeeping keys. A key prefix (for a Redis shared by several applications or tenants)
is one or more segments, each ending with ``:``, none of them a namespace name. Together these two
rules make prefixed keys collision-free: if tenant ``t:`` could write ``b:static:x`` it would hit
tenant ``t:b:``'s ``static:x``, but ``b`` is not a namespace, so that key is refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from voxcore.core.domain.errors import InvalidKeyError

STATIC_PREFIX = "static:"
TTS_PREFIX = "tts:"
SUMMARY_PREFIX = "summary:session:"
#: Longest accepted key (Redis allows 512 MB; anything this long is a bug upstream).
MAX_KEY_LENGTH = 1024
#: Namespace of voxcore's own keys (stored formats, previous versions): never writable by callers.
INTERNAL_NAMESPACE = "voxcore"
#: Namespaces of the cache's public keys.
NAMESPACES: tuple[str, ...] = ("static", "tts", "summary")
#: Longest accepted key prefix.
MAX_PREFIX_LENGTH = 128
#: The rate limiter's default namespace (its keys share the prefix with the cache's).
RATE_LIMIT_NAMESPACE = "ratelimit"
_SEGMENT = re.compile(r"[A-Za-z0-9_.\-]+")
# A prefix segment may also hold braces: a Redis Cluster hash tag (``{tenant}:``), checked by the adapter.
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9_.\-{}]+")


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
        InvalidKeyError: not a string, empty, longer than :data:`MAX_KEY_LENGTH`, or not valid
            Unicode text (a lone surrogate cannot be stored as UTF-8).
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"cache key must be str, got {type(key).__name__}")
    if not key:
        raise InvalidKeyError("cache key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"cache key is {len(key)} characters long (max {MAX_KEY_LENGTH})")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidKeyError(
                f"cache key holds an unpaired surrogate at position {exc.start}: not valid Unicode text"
            ) from None
    return key


def namespace_of(key: str) -> str:
    """The first ``:``-separated segment of ``key`` (``""`` when it has no ``:``)."""
    head, sep, _ = key.partition(":")
    return head if sep else ""


def check_public_key(key: object, namespaces: Iterable[str] = NAMESPACES) -> str:
    """:func:`check_key`, and the key must be in one of ``namespaces`` (never ``voxcore:``).

    Raises:
        InvalidKeyError: the key is unusable, internal, or outside the known namespaces.
    """
    checked = check_key(key)
    namespace = namespace_of(checked)
    if namespace == INTERNAL_NAMESPACE:
        raise InvalidKeyError(f"keys under '{INTERNAL_NAMESPACE}:' are reserved for voxcore's own data")
    allowed = tuple(namespaces)
    if namespace not in allowed:
        names = ", ".join(f"{n}:*" for n in allowed)
        raise InvalidKeyError(f"cache key {checked[:40]!r} is outside the known namespaces ({names})")
    return checked


def check_namespaces(names: Iterable[str]) -> tuple[str, ...]:
    """Validate extra namespace names (one segment each, not ``voxcore``); returns all namespaces.

    Raises:
        InvalidKeyError: a name is empty, holds a character other than ``A-Za-z0-9_.-``, or is reserved.
    """
    result = list(NAMESPACES)
    for name in names:
        if not isinstance(name, str) or not _SEGMENT.fullmatch(name):
            raise InvalidKeyError(f"namespace must be one segment of A-Za-z0-9_.- characters, got {name!r}")
        if name == INTERNAL_NAMESPACE:
            raise InvalidKeyError(f"namespace {INTERNAL_NAMESPACE!r} is reserved for voxcore's own data")
        if name not in result:
            result.append(name)
    return tuple(result)


def check_key_prefix(prefix: object, namespaces: Iterable[str] = NAMESPACES) -> str:
    """Return ``prefix`` when it is a usable key prefix: ``""`` or segments each ending with ``:``.

    Each segment is ``A-Za-z0-9_.-`` characters (braces too, for a Redis Cluster hash tag such as
    ``{tenant}:``) and is not a namespace name (nor ``voxcore``), so a prefixed key can always be
    split back into prefix and key (see the module docstring).

    Raises:
        InvalidKeyError: the prefix breaks one of these rules; the message says which.
    """
    if not isinstance(prefix, str):
        raise InvalidKeyError(f"key prefix must be str, got {type(prefix).__name__}")
    if not prefix:
        return prefix
    if len(prefix) > MAX_PREFIX_LENGTH:
        raise InvalidKeyError(f"key prefix is {len(prefix)} characters long (max {MAX_PREFIX_LENGTH})")
    if not prefix.endswith(":"):
        raise InvalidKeyError(f"key prefix {prefix!r} must end with ':' (e.g. 'tenant1:')")
    reserved = {INTERNAL_NAMESPACE, RATE_LIMIT_NAMESPACE, *namespaces}
    for segment in prefix[:-1].split(":"):
        if not _PREFIX_SEGMENT.fullmatch(segment):
            raise InvalidKeyError(
                f"key prefix {prefix!r}: segment {segment!r} must be 1+ characters of A-Za-z0-9_.-"
            )
        if segment in reserved:
            raise InvalidKeyError(
                f"key prefix {prefix!r}: segment {segment!r} is a key namespace, "
                "so prefixed keys could collide"
            )
    return prefix


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
