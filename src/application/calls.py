"""The per-call registry a host service needs: one conversation per call id, one turn at a time per call.

A web host receives each user turn as its own request; without help it must keep a dict of
conversations, make sure two requests for a new call do not open two, serialise the turns of one
call and close everything at shutdown. :class:`CallRegistry` does exactly that (the container
exposes one as ``container.calls``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any, Protocol

from voxcore.core.domain.models import LLMStreamChunk
from voxcore.events import emit

logger = logging.getLogger("voxcore.calls")


class Call(Protocol):
    """What the registry needs of a conversation (``ConversationManager`` is one)."""

    def process_user_turn(self, final_user_text: str) -> AsyncIterator[LLMStreamChunk]: ...

    async def shutdown(self) -> None: ...


class CallLimitError(RuntimeError):
    """The registry already holds ``max_calls`` calls."""


class _Entry:
    __slots__ = ("call", "lock")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.lock = asyncio.Lock()


class CallRegistry:
    """Open conversations by call id, with a turn lock per call.

    Args:
        opener: ``await opener(call_id, **options)`` -> a ready conversation (the container's
            ``open_conversation``).
        max_calls: Refuse to open more than this many calls at once (``None``: no limit).

    Example::

        calls = container.calls()
        async for chunk in calls.stream_turn("call-42", "Сколько стоит полис?"):
            send(chunk.text_chunk)
        await calls.close("call-42")   # when the phone call ends
    """

    def __init__(self, opener: Callable[..., Awaitable[Any]], *, max_calls: int | None = None) -> None:
        if max_calls is not None and max_calls < 1:
            raise ValueError("max_calls must be positive")
        self._opener = opener
        self._max_calls = max_calls
        self._entries: dict[str, _Entry] = {}
        self._opening: dict[str, asyncio.Future[_Entry]] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._entries

    @property
    def call_ids(self) -> list[str]:
        """Ids of the open calls."""
        return list(self._entries)

    def get(self, call_id: str) -> Any | None:
        """The open conversation of ``call_id``, or ``None``."""
        entry = self._entries.get(call_id)
        return entry.call if entry is not None else None

    async def open(self, call_id: str, **options: Any) -> Any:
        """The conversation of ``call_id``, opened (handshake included) if it is not open yet.

        Concurrent requests for a new call share one opening; ``options`` go to the opener the
        first time only.

        Raises:
            RuntimeError: the registry is closed.
            CallLimitError: ``max_calls`` calls are open already.
            LLMError: the provider refused the handshake (nothing is registered then).
        """
        return (await self._entry(call_id, options)).call

    async def _entry(self, call_id: str, options: dict[str, Any]) -> _Entry:
        if self._closed:
            raise RuntimeError("the call registry is closed")
        entry = self._entries.get(call_id)
        if entry is not None:
            return entry
        pending = self._opening.get(call_id)
        if pending is not None:
            return await asyncio.shield(pending)
        if self._max_calls is not None and len(self._entries) + len(self._opening) >= self._max_calls:
            raise CallLimitError(f"{self._max_calls} calls are open already")
        future: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
        self._opening[call_id] = future
        try:
            call = await self._opener(call_id, **options)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters (if any) get it, no "never retrieved" warning
            raise
        finally:
            del self._opening[call_id]
        entry = _Entry(call)
        if self._closed:  # closed while the handshake ran: do not leak the connection
            await call.shutdown()
            future.set_exception(RuntimeError("the call registry is closed"))
            future.exception()
            raise RuntimeError("the call registry is closed")
        self._entries[call_id] = entry
        future.set_result(entry)
        emit(logger, "call_registered", logging.DEBUG, calls=len(self._entries))
        return entry

    @asynccontextmanager
    async def turn(self, call_id: str, **options: Any) -> AsyncIterator[Any]:
        """Hold ``call_id``'s turn lock (opening the call if needed) and give its conversation.

        A second turn of the same call waits here until the first has ended, so turns never
        overlap (``process_user_turn`` refuses overlapping turns).
        """
        entry = await self._entry(call_id, options)
        async with entry.lock:
            if self._entries.get(call_id) is not entry:
                raise RuntimeError(f"call {call_id!r} was closed")
            yield entry.call

    async def stream_turn(self, call_id: str, text: str, **options: Any) -> AsyncIterator[LLMStreamChunk]:
        """One user turn of ``call_id`` under its turn lock: the answer's chunks as they stream.

        Closing this generator early closes the turn (it is then rolled back as
        ``process_user_turn`` documents).
        """
        async with self.turn(call_id, **options) as call, aclosing(call.process_user_turn(text)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def close(self, call_id: str) -> bool:
        """End ``call_id``: wait for its turn in progress, then shut its conversation down.

        Returns:
            ``False`` when no such call was open.
        """
        entry = self._entries.pop(call_id, None)
        if entry is None:
            return False
        async with entry.lock:
            await entry.call.shutdown()
        emit(logger, "call_closed", logging.DEBUG, calls=len(self._entries))
        return True

    async def aclose(self) -> None:
        """Close every call (turns in progress are waited for); later ``open`` calls are refused."""
        self._closed = True
        entries, self._entries = list(self._entries.values()), {}
        results = await asyncio.gather(*(self._shutdown(e) for e in entries), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                emit(logger, "call_shutdown_failed", logging.WARNING, error=repr(result))

    @staticmethod
    async def _shutdown(entry: _Entry) -> None:
        async with entry.lock:
            await entry.call.shutdown()
