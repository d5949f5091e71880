"""The SSE response's send timeout (one watchdog per response, no timer per send) and pre-encoded events."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sse_starlette.sse import SendTimeoutError

from voxcore.core.domain.live_events import LiveEvent, event_from_fields
from voxcore.entrypoints.web import _EventStream


async def _nothing() -> Any:
    if False:  # pragma: no cover - an empty async generator
        yield b""


def _stream(timeout: float | None) -> _EventStream:
    return _EventStream(_nothing(), label="test", send_timeout=timeout)


async def test_a_send_blocked_past_the_timeout_raises_send_timeout_error() -> None:
    stream = _stream(0.05)

    async def blocked(message: Any) -> None:
        await asyncio.Event().wait()

    started = time.monotonic()
    with pytest.raises(SendTimeoutError):
        await stream._send_with_timeout(blocked, {"type": "http.response.body", "body": b"x"})
    assert time.monotonic() - started < 1.0  # cut within about 1.25 x the timeout, not hanging
    assert not stream._inflight and not stream._expired
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    assert stream._watchdog is not None
    stream._watchdog.cancel()


async def test_fast_sends_pass_and_an_outside_cancellation_stays_a_cancellation() -> None:
    stream = _stream(0.05)
    sent: list[Any] = []

    async def fast(message: Any) -> None:
        sent.append(message["body"])

    for i in range(100):
        await stream._send_with_timeout(fast, {"type": "http.response.body", "body": bytes([i])})
    assert len(sent) == 100 and not stream._inflight

    async def slow(message: Any) -> None:
        await asyncio.sleep(10)

    task = asyncio.ensure_future(stream._send_with_timeout(slow, {"type": "http.response.body", "body": b""}))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream._watchdog is not None
    stream._watchdog.cancel()


async def test_without_a_timeout_no_watchdog_runs() -> None:
    stream = _stream(None)

    async def fast(message: Any) -> None:
        return None

    await stream._send_with_timeout(fast, {"type": "http.response.body", "body": b""})
    assert stream._watchdog is None


def test_an_event_is_encoded_once_and_shared() -> None:
    event = event_from_fields("5-1", "user_text", 7, '{"text":"привет"}')
    first = event.sse
    assert first is event.sse  # the same bytes object for every client
    assert first == (
        'id: 5-1\nevent: user_text\ndata: {"id":"5-1","type":"user_text","ts":7,"data":{"text":"привет"}}\n\n'
    ).encode()
    assert event.key == (5, 1)
    # A raw text with line breaks (another publisher's pretty JSON) stays one SSE message.
    multi = LiveEvent("6-0", "user_text", 8, {}, '{\n"a": 1\n}')
    assert multi.sse == b'id: 6-0\nevent: user_text\ndata: {\ndata: "a": 1\ndata: }\n\n'
