"""CallRegistry: one conversation per call id under concurrency, serialised turns, clean shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from voxcore.application.calls import CallLimitError, CallRegistry
from voxcore.core.domain.models import LLMStreamChunk


class FakeCall:
    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self.active = 0
        self.max_active = 0
        self.shut = 0

    async def process_user_turn(self, text: str) -> AsyncIterator[LLMStreamChunk]:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            for word in text.split():
                await asyncio.sleep(0.001)
                yield LLMStreamChunk(text_chunk=word)
            yield LLMStreamChunk(text_chunk="", is_final_chunk=True)
        finally:
            self.active -= 1

    async def shutdown(self) -> None:
        self.shut += 1


class Opener:
    def __init__(self, fail: bool = False) -> None:
        self.opened: list[str] = []
        self.fail = fail

    async def __call__(self, call_id: str, **options: Any) -> FakeCall:
        await asyncio.sleep(0.01)  # a handshake
        if self.fail:
            raise RuntimeError("handshake refused")
        self.opened.append(call_id)
        return FakeCall(call_id)


async def test_concurrent_requests_for_a_new_call_open_it_once() -> None:
    opener = Opener()
    calls = CallRegistry(opener)
    got = await asyncio.gather(*(calls.open("a") for _ in range(20)))
    assert opener.opened == ["a"] and all(c is got[0] for c in got)
    assert "a" in calls and len(calls) == 1 and calls.get("a") is got[0]


async def test_turns_of_one_call_never_overlap_and_other_calls_run_alongside() -> None:
    calls = CallRegistry(Opener())

    async def turn(call_id: str) -> str:
        return "".join([c.text_chunk async for c in calls.stream_turn(call_id, "раз два три")])

    results = await asyncio.gather(*(turn(f"c{i % 5}") for i in range(50)))
    assert set(results) == {"раздватри"}
    assert {calls.get(f"c{i}").max_active for i in range(5)} == {1}  # type: ignore[union-attr]


async def test_a_failed_handshake_registers_nothing_and_reaches_every_waiter() -> None:
    calls = CallRegistry(Opener(fail=True))
    results = await asyncio.gather(*(calls.open("x") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert len(calls) == 0


async def test_close_waits_for_the_turn_and_shuts_the_call_down() -> None:
    calls = CallRegistry(Opener())
    call = await calls.open("a")
    async with calls.turn("a"):
        closing = asyncio.create_task(calls.close("a"))
        await asyncio.sleep(0.01)
        assert not closing.done() and call.shut == 0
    assert await closing is True and call.shut == 1
    assert await calls.close("a") is False


async def test_aclose_closes_everything_and_refuses_new_calls() -> None:
    calls = CallRegistry(Opener())
    opened = [await calls.open(f"c{i}") for i in range(3)]
    await calls.aclose()
    assert [c.shut for c in opened] == [1, 1, 1] and len(calls) == 0
    with pytest.raises(RuntimeError, match="closed"):
        await calls.open("late")


async def test_max_calls_is_enforced() -> None:
    calls = CallRegistry(Opener(), max_calls=1)
    await calls.open("a")
    with pytest.raises(CallLimitError):
        await calls.open("b")
    assert (await calls.open("a")) is calls.get("a")
