"""``RedisDialogueStore``: a session's messages in a Redis List, its context mark in a String, 30-day TTL.

Layout (``P`` is the optional key prefix; ``{h}`` the session's hash tag, so both keys share a slot)::

    P dialogue:{h}:messages   List of JSON messages, oldest first, at most ``max_messages``
    P dialogue:{h}:summary    String: JSON context mark (summary + first seq of the active history)

Every write is one ``MULTI``: ``[DEL]`` + ``RPUSH`` + ``LTRIM`` + ``SET ... EX`` + ``EXPIRE``, so
the time to live of both keys is refreshed by every write and a reader never sees half a turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import redis.asyncio as redis
from redis import exceptions as redis_exc

from voxcore.core.domain.dialogue import (
    ContextMark,
    DialogueSnapshot,
    StoredMessage,
    decode_snapshot,
    encode_mark,
    encode_message,
)
from voxcore.core.domain.keys import dialogue_messages_key, dialogue_summary_key
from voxcore.core.ports.dialogue import DialogueStore
from voxcore.core.ports.errors import BackendError, BackendUnavailableError

#: 30 days: how long a session's dialogue outlives its last write.
DEFAULT_TTL_SECONDS: Final = 30 * 24 * 3600
_UNAVAILABLE: Final = (redis_exc.ConnectionError, redis_exc.TimeoutError, OSError, TimeoutError)


class RedisDialogueStore(DialogueStore):
    """The dialogue cache in Redis.

    Args:
        client: A ``redis.asyncio`` client (stays the caller's: :meth:`aclose` does not close it).
        ttl_seconds: Lifetime of a session's keys after its last write (default 30 days).
        max_messages: Newest messages kept per session (``LTRIM``).
        key_prefix: Prepended to every key.

    Raises:
        ValueError: a non-positive TTL or bound.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        max_messages: int = 500,
        key_prefix: str = "",
    ) -> None:
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be a positive int, got {ttl_seconds!r}")
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages <= 0:
            raise ValueError(f"max_messages must be a positive int, got {max_messages!r}")
        self._client = client
        self._ttl = ttl_seconds
        self._max = max_messages
        self._prefix = key_prefix

    @property
    def ttl_seconds(self) -> int:
        """Lifetime of a session's keys after its last write."""
        return self._ttl

    @property
    def max_messages(self) -> int:
        """Newest messages kept per session."""
        return self._max

    def keys_for(self, session_id: str) -> tuple[str, str]:
        """The (messages, summary) keys of ``session_id``."""
        return self._prefix + dialogue_messages_key(session_id), self._prefix + dialogue_summary_key(
            session_id
        )

    async def append(
        self,
        session_id: str,
        messages: Sequence[StoredMessage],
        mark: ContextMark,
        *,
        replace: bool = False,
    ) -> None:
        """Append ``messages`` and set the mark in one MULTI (TTL refreshed on both keys).

        Raises:
            BackendUnavailableError: Redis cannot be reached.
            BackendError: Redis refused the transaction.
        """
        messages_key, summary_key = self.keys_for(session_id)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                if replace:
                    pipe.delete(messages_key)
                if messages:
                    pipe.rpush(messages_key, *(encode_message(m).encode("utf-8") for m in messages))
                    pipe.ltrim(messages_key, -self._max, -1)
                pipe.set(summary_key, encode_mark(mark).encode("utf-8"), ex=self._ttl)
                pipe.expire(messages_key, self._ttl)
                await pipe.execute()
        except _UNAVAILABLE as exc:
            raise BackendUnavailableError(f"dialogue store unreachable: {exc}") from exc
        except redis_exc.RedisError as exc:
            raise BackendError(f"dialogue store write failed: {exc}") from exc

    async def load(self, session_id: str) -> DialogueSnapshot | None:
        """The stored dialogue (one MULTI: LRANGE + GET), ``None`` when the session has none.

        Raises:
            CorruptDialogueError: a record is corrupt or of another version.
            BackendUnavailableError: Redis cannot be reached.
            BackendError: Redis failed otherwise.
        """
        messages_key, summary_key = self.keys_for(session_id)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.lrange(messages_key, 0, -1)
                pipe.get(summary_key)
                items, mark = await pipe.execute()
        except _UNAVAILABLE as exc:
            raise BackendUnavailableError(f"dialogue store unreachable: {exc}") from exc
        except redis_exc.RedisError as exc:
            raise BackendError(f"dialogue store read failed: {exc}") from exc
        return decode_snapshot(items, mark)

    async def delete(self, session_id: str) -> None:
        """Forget the session's dialogue.

        Raises:
            BackendUnavailableError: Redis cannot be reached.
            BackendError: Redis failed otherwise.
        """
        try:
            await self._client.delete(*self.keys_for(session_id))
        except _UNAVAILABLE as exc:
            raise BackendUnavailableError(f"dialogue store unreachable: {exc}") from exc
        except redis_exc.RedisError as exc:
            raise BackendError(f"dialogue store delete failed: {exc}") from exc
