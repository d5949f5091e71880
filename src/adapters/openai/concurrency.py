"""``ProviderGate``: at most ``llm.max_concurrent_requests`` requests in flight per provider base URL.

Servers such as llama.cpp's OpenAI-compatible server compute one request at a time: a second request
either waits behind the first or, worse, interrupts its stream. The gate keeps the process's requests
to one base URL within the limit and gives turns priority over background work (summaries):

* a turn takes a free slot at once; when none is free and background work holds one, that work is
  *preempted* (told to give its slot back; the summary is asked again later), so a turn never waits
  behind a summary for more than the summary needs to stop;
* background work takes a slot only when one is free and no turn is waiting for one;
* freed slots go to waiting turns first, in arrival order.

Gates live per event loop (asyncio primitives belong to one loop) and per ``(base_url, limit)``.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from typing import Final


class Slot:
    """One request's place in a :class:`ProviderGate`; :meth:`release` it exactly once (idempotent)."""

    __slots__ = ("_gate", "background", "preempted", "_released")

    def __init__(self, gate: ProviderGate, *, background: bool) -> None:
        self._gate = gate
        self.background = background
        #: Set when a turn needs this (background) slot: the holder should stop and release it.
        self.preempted = asyncio.Event() if background else None
        self._released = False

    def release(self) -> None:
        """Give the slot back (a second call does nothing)."""
        if not self._released:
            self._released = True
            self._gate._release(self)


class ProviderGate:
    """A priority semaphore of ``limit`` slots: turns first, preemptible background work second.

    Args:
        limit: Requests allowed in flight at once (>= 1).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit
        self._held: set[Slot] = set()
        self._turns: collections.deque[asyncio.Future[Slot]] = collections.deque()
        self._background: collections.deque[asyncio.Future[Slot]] = collections.deque()

    @property
    def limit(self) -> int:
        """Slots of the gate."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Slots held now."""
        return len(self._held)

    @property
    def turns_waiting(self) -> int:
        """Turns waiting for a slot."""
        return sum(1 for f in self._turns if not f.done())

    async def acquire_turn(self) -> Slot:
        """A slot for a turn; preempts background work when every slot is taken."""
        if len(self._held) < self._limit and not self._turns:
            slot = Slot(self, background=False)
            self._held.add(slot)
            return slot
        future: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._turns.append(future)
        for held in self._held:
            if held.preempted is not None:
                held.preempted.set()
        return await self._wait(future)

    async def acquire_background(self) -> Slot:
        """A preemptible slot for background work; waits while turns hold or want the slots."""
        if len(self._held) < self._limit and not self._turns and not self._background:
            slot = Slot(self, background=True)
            self._held.add(slot)
            return slot
        future: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._background.append(future)
        return await self._wait(future)

    async def _wait(self, future: asyncio.Future[Slot]) -> Slot:
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.result().release()  # granted just as the waiter was cancelled: hand it on
            raise

    def _release(self, slot: Slot) -> None:
        self._held.discard(slot)
        self._grant()

    def _grant(self) -> None:
        while len(self._held) < self._limit:
            queue = self._turns if self._turns else self._background
            if not queue:
                return
            future = queue.popleft()
            if future.done():  # its waiter was cancelled
                continue
            slot = Slot(self, background=queue is self._background)
            self._held.add(slot)
            future.set_result(slot)


_lock: Final = threading.Lock()
_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int], ProviderGate]] = (
    weakref.WeakKeyDictionary()
)


def gate_for(base_url: str, limit: int | None) -> ProviderGate | None:
    """The running loop's gate of ``base_url`` (``None`` when ``limit`` is ``None``: unlimited)."""
    if limit is None:
        return None
    loop = asyncio.get_running_loop()
    with _lock:
        gates = _gates.get(loop)
        if gates is None:
            gates = _gates[loop] = {}
        gate = gates.get((base_url, limit))
        if gate is None:
            gate = gates[(base_url, limit)] = ProviderGate(limit)
        return gate
