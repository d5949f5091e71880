"""The OpenAI adapter against the behaviours of real OpenAI-compatible servers (llama.cpp and the like).

The simulator plays them: deadlines and ``Retry-After`` on 503, one request at a time, idle keep-alive
connections closed after a few seconds, ``json_schema`` refused like llama.cpp refuses it, and the
loose JSON grammar-constrained models emit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from voxcore.adapters.openai import OpenAIConfig, OpenAIConnectionManager, OpenAILLMClient
from voxcore.core.domain.models import LLMStreamChunk, LLMStructuredResponse
from voxcore.core.ports.errors import LLMServerError, LLMTimeoutError
from voxcore.simulator import Fault, OpenAISimulator, RequestPlan

KEY = "sk-simulator"
MODEL = "gpt-4o-mini"
WAIT_S = 10.0


def make_config(sim: OpenAISimulator, **overrides: Any) -> OpenAIConfig:
    options: dict[str, Any] = {
        "base_url": sim.base_url,
        "api_key": KEY,
        "connect_timeout_s": 1.0,
        "read_timeout_s": 1.0,
        "first_token_timeout_s": 3.0,
        "warmup_interval_s": 30.0,
        "keepalive_expiry_s": 60.0,
        **overrides,
    }
    return OpenAIConfig(**options)


@pytest.fixture
async def sim() -> AsyncIterator[OpenAISimulator]:
    async with OpenAISimulator(chars_per_chunk=5) as simulator:
        yield simulator


@pytest.fixture
async def http(sim: OpenAISimulator) -> AsyncIterator[httpx.AsyncClient]:
    manager = OpenAIConnectionManager(make_config(sim))
    try:
        yield await manager.get_client()
    finally:
        await manager.shutdown()


async def stream(
    llm: OpenAILLMClient, http: httpx.AsyncClient, prompt: str = "привет, как дела?"
) -> list[LLMStreamChunk]:
    async with asyncio.timeout(WAIT_S):
        return [c async for c in llm.stream_structured_generate(http, prompt, MODEL, LLMStructuredResponse)]


# -- deadlines and hints ---------------------------------------------------------------------------------


async def test_turn_deadline_ends_a_trickling_stream(sim: OpenAISimulator, http: httpx.AsyncClient) -> None:
    # Every chunk comes well within the read timeout (1 s), but the whole turn may take 0.6 s only.
    llm = OpenAILLMClient(make_config(sim, turn_timeout_s=0.6))
    sim.plan_next(RequestPlan(inter_chunk_delay_ms=100, chars_per_chunk=12))
    received: list[LLMStreamChunk] = []
    started = time.perf_counter()
    with pytest.raises(LLMTimeoutError, match="turn_s") as caught:
        async with asyncio.timeout(WAIT_S):
            async for chunk in llm.stream_structured_generate(http, "привет", MODEL, LLMStructuredResponse):
                received.append(chunk)
    assert time.perf_counter() - started < 3.0
    assert caught.value.transient
    assert received and not any(c.is_final_chunk for c in received)
    # The deadline never cancels the consumer between chunks, and the client goes on afterwards.
    chunks = await stream(llm, http)
    assert chunks[-1].is_final_chunk


async def test_turn_deadline_passing_while_the_consumer_works_ends_the_turn_at_the_next_wait(
    sim: OpenAISimulator, http: httpx.AsyncClient
) -> None:
    llm = OpenAILLMClient(make_config(sim, turn_timeout_s=0.3))
    sim.plan_next(RequestPlan(inter_chunk_delay_ms=20, chars_per_chunk=3))
    slow_steps = 0
    with pytest.raises(LLMTimeoutError, match="turn_timeout_s"):
        async with asyncio.timeout(WAIT_S):
            async for _chunk in llm.stream_structured_generate(http, "привет", MODEL, LLMStructuredResponse):
                await asyncio.sleep(0.2)  # the consumer's own work is never cancelled by the deadline
                slow_steps += 1
    assert slow_steps >= 1


async def test_503_exposes_retry_after(sim: OpenAISimulator, http: httpx.AsyncClient) -> None:
    llm = OpenAILLMClient(make_config(sim))
    sim.plan_next(RequestPlan(fault=Fault.SERVICE_UNAVAILABLE, retry_after=4))
    with pytest.raises(LLMServerError) as caught:
        await stream(llm, http)
    assert caught.value.status == 503 and caught.value.retry_after == 4.0 and caught.value.transient
    sim.plan_next(RequestPlan(fault=Fault.SERVER_ERROR))
    with pytest.raises(LLMServerError) as caught:
        await stream(llm, http)
    assert caught.value.retry_after is None
