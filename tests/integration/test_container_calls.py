"""``container.calls``: the library's per-call registry on real adapters (simulator over HTTP, real Redis)."""

from __future__ import annotations

import asyncio

from voxcore import Container
from voxcore.simulator import OpenAISimulator


async def test_calls_open_once_serialise_turns_and_close_at_shutdown(
    voxcore_container: Container, voxcore_simulator: OpenAISimulator
) -> None:
    calls = await voxcore_container.calls()
    assert calls is await voxcore_container.calls()  # one registry per container

    async def turn(call_id: str, text: str) -> str:
        return "".join([c.text_chunk async for c in calls.stream_turn(call_id, text)])

    answers = await asyncio.gather(*(turn(f"call-{i % 4}", f"вопрос {i}") for i in range(12)))
    assert answers == [f"Вы сказали: вопрос {i}" for i in range(12)]
    assert sorted(calls.call_ids) == [f"call-{i}" for i in range(4)]
    assert voxcore_simulator.connections_accepted == 4  # one warm connection per call
    manager = calls.get("call-0")
    assert manager is not None and manager.turns == 3
    assert await calls.close("call-0") and "call-0" not in calls
    await voxcore_container.shutdown_resources()  # the fixture's second shutdown is harmless
    assert len(calls) == 0
