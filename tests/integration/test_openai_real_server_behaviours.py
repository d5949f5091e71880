"""The OpenAI adapter against the behaviours of real OpenAI-compatible servers (llama.cpp and the like).

The simulator plays them: deadlines and ``Retry-After`` on 503, one request at a time, idle keep-alive
connections closed after a few seconds, ``json_schema`` refused like llama.cpp refuses it, and the
loose JSON grammar-constrained models emit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.fakes import EventLog, captured_events
from voxcore.adapters.openai import OpenAIConfig, OpenAIConnectionManager, OpenAILLMClient
from voxcore.adapters.openai.concurrency import ProviderGate
from voxcore.adapters.openai.connection import keep_alive_timeout
from voxcore.adapters.openai.structured_output import forget_learned, learned_variants
from voxcore.core.domain.models import LLMStreamChunk, LLMStructuredResponse
from voxcore.core.ports.errors import LLMServerError, LLMTimeoutError
from voxcore.simulator import Fault, OpenAISimulator, RequestPlan

KEY = "sk-simulator"
MODEL = "gpt-4o-mini"
WAIT_S = 10.0
CHAT_PATH = "/v1/chat/completions"


@pytest.fixture
def events() -> Iterator[EventLog]:
    with captured_events("voxcore.llm") as handler:
        yield handler


def text_of(chunks: list[LLMStreamChunk]) -> str:
    return "".join(c.text_chunk for c in chunks)


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
    llm = OpenAILLMClient(make_config(sim, turn_timeout_s=1.5))
    sim.plan_next(RequestPlan(inter_chunk_delay_ms=20, chars_per_chunk=60))
    slow_steps = 0
    with pytest.raises(LLMTimeoutError, match="turn_timeout_s"):
        async with asyncio.timeout(WAIT_S):
            async for _chunk in llm.stream_structured_generate(http, "привет", MODEL, LLMStructuredResponse):
                await asyncio.sleep(0.8)  # the consumer's own work is never cancelled by the deadline
                slow_steps += 1
    assert slow_steps >= 1


async def test_turn_deadline_holds_when_it_is_further_away_than_the_read_timeout(
    sim: OpenAISimulator, http: httpx.AsyncClient
) -> None:
    # Read timeout 0.3 s, turn 1.2 s: early chunks run with no timer armed, the last stretch with one.
    llm = OpenAILLMClient(make_config(sim, read_timeout_s=0.3, turn_timeout_s=1.2))
    sim.plan_next(RequestPlan(inter_chunk_delay_ms=60, chars_per_chunk=4))
    started = time.perf_counter()
    with pytest.raises(LLMTimeoutError, match="turn_timeout_s"):
        await stream(llm, http, "очень длинный вопрос " * 8)
    assert 1.1 < time.perf_counter() - started < 3.0


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


# -- structured output modes -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_memory() -> Iterator[None]:
    # What `auto` learned is process-wide per base URL, and ports are reused: leave nothing behind.
    forget_learned()
    yield
    forget_learned()


async def test_auto_falls_back_from_json_schema_like_on_llama_cpp_and_remembers_it(
    events: EventLog,
) -> None:
    async with OpenAISimulator(response_formats=("text", "json_object")) as sim:
        manager = OpenAIConnectionManager(make_config(sim))
        try:
            http = await manager.get_client()
            llm = OpenAILLMClient(make_config(sim))
            chunks = await stream(llm, http)
            assert chunks[-1].is_final_chunk and "Вы сказали" in text_of(chunks)
            # One refused request, then JSON mode with the schema in response_format and in the prompt.
            sent = [r.json() for r in sim.requests if r.path == CHAT_PATH]
            assert [b["response_format"]["type"] for b in sent] == ["json_schema", "json_object"]
            required = sent[1]["response_format"]["schema"]["required"]
            assert required[:3] == ["is_safe", "aggression_score", "answer"]
            assert "JSON schema" in sent[1]["messages"][-1]["content"]
            (fallback,) = events.named("structured_output_fallback")
            assert fallback["refused"] == "json_schema" and fallback["now"] == "json_object_schema"
            # Remembered for the base URL: a new client of the process goes straight to json_object.
            other = OpenAILLMClient(make_config(sim))
            await stream(other, http)
            assert sim.request_count(CHAT_PATH) == 3
            assert sim.last_request_json["response_format"]["type"] == "json_object"
            assert len(events.named("structured_output_fallback")) == 1
            assert learned_variants() == {(sim.base_url, "auto"): "json_object_schema"}
        finally:
            await manager.shutdown()


async def test_a_refusal_that_will_repeat_is_not_transient_and_names_the_setting() -> None:
    async with OpenAISimulator(response_formats=("text", "json_object")) as sim:
        manager = OpenAIConnectionManager(make_config(sim))
        try:
            http = await manager.get_client()
            llm = OpenAILLMClient(make_config(sim, structured_output="json_schema"))
            with pytest.raises(LLMServerError) as caught:
                await stream(llm, http)
            assert caught.value.status == 500 and not caught.value.transient
            assert "llm.structured_output" in str(caught.value) and "response_format" in str(caught.value)
            assert sim.request_count(CHAT_PATH) == 1
        finally:
            await manager.shutdown()


async def test_json_object_mode_drops_the_schema_for_servers_that_refuse_it() -> None:
    async with OpenAISimulator(response_formats=("text",)) as sim:
        manager = OpenAIConnectionManager(make_config(sim))
        try:
            http = await manager.get_client()
            llm = OpenAILLMClient(make_config(sim, structured_output="auto"))
            sim.default_plan = RequestPlan(reply={"is_safe": True, "aggression_score": 1, "answer": "да"})
            chunks = await stream(llm, http)
            assert text_of(chunks) == "да"
            sent = [r.json() for r in sim.requests if r.path == CHAT_PATH]
            assert [b.get("response_format", {}).get("type") for b in sent] == [
                "json_schema",
                "json_object",
                "json_object",
                None,
            ]
            assert learned_variants()[(sim.base_url, "auto")] == "instructions"
        finally:
            await manager.shutdown()


# -- tolerant parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(RequestPlan(trailing_text="\nНадеюсь, помог! {"), id="text-after-object"),
        pytest.param(RequestPlan(fence=True), id="markdown-fence"),
        pytest.param(RequestPlan(raw_newlines=True), id="raw-newlines"),
    ],
)
async def test_loose_json_of_real_models_is_accepted(
    sim: OpenAISimulator, http: httpx.AsyncClient, events: EventLog, plan: RequestPlan
) -> None:
    llm = OpenAILLMClient(make_config(sim))
    answer = "первая строка\nвторая"
    sim.plan_next(dataclasses.replace(plan, reply={"is_safe": True, "aggression_score": 0, "answer": answer}))
    chunks = await stream(llm, http)
    assert chunks[-1].is_final_chunk
    assert text_of(chunks) == answer
    assert llm.last_result is not None and llm.last_result.text == text_of(chunks)
    if plan.fence or plan.trailing_text:
        (ignored,) = events.named("structured_text_ignored")
        assert ignored["skipped_chars"] or ignored["trailing_chars"]


# -- warm-up -------------------------------------------------------------------------------------------


async def test_warmup_never_pings_while_a_turn_streams_and_counts_idle_from_its_end() -> None:
    async with OpenAISimulator(chars_per_chunk=4, one_request_at_a_time=True) as sim:
        config = make_config(sim, warmup_interval_s=0.15)
        manager = OpenAIConnectionManager(config)
        try:
            http = await manager.get_client()
            llm = OpenAILLMClient(config)
            sim.plan_next(RequestPlan(inter_chunk_delay_ms=30))  # a turn of ~0.6 s, 4 warm-up intervals
            pings_before = sim.request_count("/v1/models")
            chunks = await stream(llm, http)
            assert chunks[-1].is_final_chunk  # not cut: no ping interrupted it
            assert sim.streams_interrupted == 0 and sim.max_in_flight == 1
            assert sim.request_count("/v1/models") == pings_before
            await asyncio.sleep(0.4)
            assert sim.request_count("/v1/models") > pings_before  # idle again: pings resume
        finally:
            await manager.shutdown()


async def test_warmup_learns_a_server_that_closes_idle_connections_and_keeps_the_next_one_warm() -> None:
    # A uvicorn-like server closing idle keep-alive connections after 1 s; the configured interval is
    # far longer, so the first idle gap loses the connection and the manager learns from it.
    async with OpenAISimulator(
        idle_timeout_s=1.0, keep_alive_header=False, one_request_at_a_time=True
    ) as sim:
        config = make_config(sim, warmup_interval_s=20.0)
        manager = OpenAIConnectionManager(config)
        try:
            http = await manager.get_client()
            llm = OpenAILLMClient(config)
            await stream(llm, http)
            await asyncio.sleep(1.5)
            await stream(llm, http)
            assert llm.last_result is not None and llm.last_result.connection_reused is False
            assert manager.connections_found_closed == 1
            assert manager.warmup_interval_s < 1.0
            await asyncio.sleep(2.2)  # longer than the server's idle timeout: only the pings keep it open
            await stream(llm, http)
            assert llm.last_result.connection_reused is True
            assert manager.connections_found_closed == 1
        finally:
            await manager.shutdown()


def test_keep_alive_header_parsing() -> None:
    assert keep_alive_timeout(httpx.Headers({"Keep-Alive": "timeout=5, max=100"})) == 5.0
    assert keep_alive_timeout(httpx.Headers({"keep-alive": "max=10"})) is None
    assert keep_alive_timeout(httpx.Headers()) is None


# -- one request at a time -----------------------------------------------------------------------------


async def test_with_one_slot_a_summary_waits_for_the_turn_and_never_cuts_it() -> None:
    async with OpenAISimulator(chars_per_chunk=4, one_request_at_a_time=True) as sim:
        config = make_config(sim, max_concurrent_requests=1)
        manager = OpenAIConnectionManager(config)
        try:
            http = await manager.get_client()
            llm = OpenAILLMClient(config)
            sim.plan_next(RequestPlan(inter_chunk_delay_ms=20))
            turn = asyncio.ensure_future(stream(llm, http))
            await sim.wait_for_requests(1, path=CHAT_PATH)
            summary = asyncio.ensure_future(llm.generate_text(http, "кратко", MODEL))
            chunks = await turn
            assert chunks[-1].is_final_chunk and not summary.done()
            assert "кратко" in await asyncio.wait_for(summary, WAIT_S)
            assert sim.streams_interrupted == 0 and sim.max_in_flight == 1
        finally:
            await manager.shutdown()


async def test_a_turn_preempts_a_running_summary_which_is_asked_again_after_it(events: EventLog) -> None:
    async with OpenAISimulator(chars_per_chunk=3, one_request_at_a_time=True) as sim:
        config = make_config(sim, max_concurrent_requests=1)
        manager = OpenAIConnectionManager(config)
        try:
            http = await manager.get_client()
            llm = OpenAILLMClient(config)
            sim.plan_next(RequestPlan(inter_chunk_delay_ms=30))  # a slow summary
            summary = asyncio.ensure_future(llm.generate_text(http, "кратко о разговоре", MODEL))
            await sim.wait_for_requests(1, path=CHAT_PATH)
            await asyncio.sleep(0.1)
            started = time.perf_counter()
            chunks = await stream(llm, http)
            assert chunks[-1].is_final_chunk and time.perf_counter() - started < 1.0
            assert events.named("background_request_preempted")
            text = await asyncio.wait_for(summary, WAIT_S)
            assert text == "Вы сказали: кратко о разговоре"  # whole, never a cut-off piece
            assert sim.request_count(CHAT_PATH) == 3
        finally:
            await manager.shutdown()


async def test_provider_gate_order() -> None:
    gate = ProviderGate(1)
    background = await gate.acquire_background()
    turn = asyncio.ensure_future(gate.acquire_turn())
    await asyncio.sleep(0)
    assert background.preempted is not None and background.preempted.is_set()
    waiting_background = asyncio.ensure_future(gate.acquire_background())
    background.release()
    turn_slot = await turn
    await asyncio.sleep(0)
    assert not waiting_background.done()  # background waits while the turn holds the slot
    turn_slot.release()
    (await waiting_background).release()
    assert gate.in_flight == 0


async def test_a_bad_optional_field_after_the_heard_answer_does_not_take_it_back(
    sim: OpenAISimulator, http: httpx.AsyncClient, events: EventLog
) -> None:
    llm = OpenAILLMClient(make_config(sim))
    reply = {"is_safe": True, "aggression_score": 0, "answer": "да", "internal_thought": 5}
    sim.plan_next(RequestPlan(reply=reply))
    chunks = await stream(llm, http)
    assert text_of(chunks) == "да" and chunks[-1].is_final_chunk
    (dropped,) = events.named("structured_fields_dropped")
    assert dropped["fields"] == ["internal_thought"]
    assert llm.last_result is not None and llm.last_result.text == "да"
