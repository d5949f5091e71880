"""``RedisAudioStream``: a streaming read of one fragment that never mixes versions or ends early silently."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable
from typing import Final, Protocol

from voxcore.core.ports.cache import AudioChunkStream
from voxcore.core.ports.errors import AudioStreamIncompleteError
from voxcore.events import emit

log = logging.getLogger("voxcore.adapters.redis.cache")

# The rest of a streamed list, atomically, from whichever version starts with the chunks already
# yielded (ARGV): the current list (KEYS[1]) or the one it replaced (KEYS[2]).
READ_REST_LUA: Final = """
local n = #ARGV
local function starts_with_head(key)
  local head = redis.call('LRANGE', key, 0, n - 1)
  if #head ~= n then return false end
  for i = 1, n do
    if head[i] ~= ARGV[i] then return false end
  end
  return true
end
if starts_with_head(KEYS[1]) then return {1, redis.call('LRANGE', KEYS[1], n, -1)} end
if starts_with_head(KEYS[2]) then return {2, redis.call('LRANGE', KEYS[2], n, -1)} end
return {0, {}}
"""
READ_REST_SHA: Final = hashlib.sha1(READ_REST_LUA.encode()).hexdigest()

#: What ``read_rest`` answers: ``(1, tail)`` current list, ``(2, tail)`` previous version,
#: ``(0, [])`` neither starts with the head, or ``None`` when Redis failed.
RestResult = tuple[int, list[bytes]] | None


class _Owner(Protocol):
    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]: ...

    async def _read_rest(self, key: str, head: list[bytes]) -> RestResult: ...


class RedisAudioStream(AudioChunkStream):
    """A streaming read that never mixes two versions of a fragment, and never ends early silently.

    The head (first chunks) comes from the opening command. When the consumer takes the first
    chunk, the remainder is requested in the background (so it overlaps with playing the head and
    costs nothing before the first chunk): the tail of whichever version starts with that head -
    the current list, or the previous version a concurrent overwrite left for open streams.

    When the rest cannot be had, iteration ends with :class:`AudioStreamIncompleteError` after the
    head (``reason="unavailable"``: Redis failed; ``"version_lost"``: the fragment was overwritten
    twice during the read), never with a normal end: the consumer has a prefix of one version and
    knows it. :attr:`incomplete` says the same after the fact.
    """

    def __init__(
        self,
        owner: _Owner,
        key: str,
        head: list[bytes],
        *,
        complete: bool,
    ) -> None:
        self._owner = owner
        self._key = key
        self._head = head
        self._rest: asyncio.Task[None] | None = None
        self._fetched: RestResult = None
        self._buffer = head
        self._index = 0
        self._tail_pending = not complete
        self._closed = False
        self._failure: AudioStreamIncompleteError | None = None
        self._delivered = 0

    @property
    def key(self) -> str:
        """The fragment's key."""
        return self._key

    @property
    def incomplete(self) -> bool:
        """True when the stream ended (or will end) before the fragment's last chunk."""
        return self._failure is not None

    @property
    def delivered(self) -> int:
        """Chunks yielded so far."""
        return self._delivered

    async def __anext__(self) -> bytes:
        if self._closed:
            if self._failure is not None and self._index >= 0:
                self._index = -1  # raise it once; later calls just end
                raise self._failure
            raise StopAsyncIteration
        if self._index >= len(self._buffer):
            if not self._tail_pending:
                await self.aclose()
                raise StopAsyncIteration
            self._tail_pending = False
            self._buffer = await self._load_tail()
            self._index = 0
            if not self._buffer:
                failure = self._failure
                await self.aclose()
                if failure is not None:
                    self._index = -1
                    raise failure
                raise StopAsyncIteration
        elif self._index == 1 and self._tail_pending and self._rest is None:
            self._rest = self._owner._spawn(self._fetch_tail())
        chunk = self._buffer[self._index]
        self._index += 1
        self._delivered += 1
        return chunk

    async def _fetch_tail(self) -> None:
        # The result is kept on the stream, not as the task's result: a finished task can outlive
        # the stream for a loop iteration or two, and must not keep megabytes of chunks alive.
        self._fetched = await self._owner._read_rest(self._key, self._head)

    async def _load_tail(self) -> list[bytes]:
        if self._rest is None:  # the consumer skipped straight past the head
            self._rest = self._owner._spawn(self._fetch_tail())
        await self._rest
        result, self._fetched = self._fetched, None
        if result is None:  # Redis failed (already logged)
            self._fail("unavailable", "Redis failed while fetching the rest of the fragment")
            return []
        source, tail = result
        if source == 2:
            emit(log, "audio_stream_previous_version", key=self._key, chunks=len(tail))
        elif source == 0:
            emit(log, "audio_stream_version_lost", logging.WARNING, key=self._key, yielded=len(self._head))
            self._fail("version_lost", "the fragment was overwritten twice while it was being read")
            return []
        elif not tail:
            # The head was the whole list after all (it shrank to exactly the head): complete.
            return []
        return tail

    def _fail(self, reason: str, message: str) -> None:
        delivered = len(self._head)
        emit(
            log,
            "audio_stream_incomplete",
            logging.WARNING,
            key=self._key,
            reason=reason,
            delivered=delivered,
        )
        self._failure = AudioStreamIncompleteError(
            f"{self._key}: {message}; {delivered} chunks delivered",
            key=self._key,
            delivered=delivered,
            reason=reason,
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer = []
        if self._rest is not None and not self._rest.done():
            # The task is tracked by the cache (and cancelled again on close); nothing to wait for.
            self._rest.cancel()
