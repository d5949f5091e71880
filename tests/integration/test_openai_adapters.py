"""OpenAI adapters over real HTTP against the local simulator: warm connection, structured stream, errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.fakes import EventLog, captured_events
from voxcore.adapters.openai import (
    OpenAIConfig,
    OpenAIConnectionManager,
    OpenAILLMClient,
    connection_reused,
)
from voxcore.adapters.openai._errors import error_for_status, provider_message, retry_after_seconds
from voxcore.core.domain.models import (
    ConversationMessage,
    LLMStreamChunk,
    LLMStructuredResponse,
    json_schema_for,
)
from voxcore.core.ports.errors import (
    LLMAuthError,
    LLMBadRequestError,
    LLMError,
    LLMModelNotFoundError,
    LLMProtocolError,
    LLMRateLimitedError,
    LLMServerError,
    LLMTimeoutError,
)
from voxcore.simulator import Fault, OpenAISimulator, RequestPlan

KEY = "sk-simulator"
MODEL = "gpt-4o-mini"
MODELS_PATH = "/v1/models"
CHAT_PATH = "/v1/chat/completions"
WAIT_S = 5.0  # no test may hang: every await on the network is bounded by this


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def events() -> Iterator[EventLog]:
    with captured_events("voxcore.llm") as handler:
        yield handler


@pytest.fixture(scope="module")
def tracer_provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A private provider: the global one can be set only once per process, so it is left alone."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def span_exporter(tracer_provider: tuple[TracerProvider, InMemorySpanExporter]) -> InMemorySpanExporter:
    exporter = tracer_provider[1]
    exporter.clear()
    return exporter


@pytest.fixture
def tracer(
    tracer_provider: tuple[TracerProvider, InMemorySpanExporter], span_exporter: InMemorySpanExporter
) -> trace.Tracer:
    return tracer_provider[0].get_tracer("voxcore.llm")


@pytest.fixture
def metric_reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(metric_reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[metric_reader], shutdown_on_exit=False)
    yield provider
    provider.shutdown()


@pytest.fixture
async def sim() -> AsyncIterator[OpenAISimulator]:
    async with OpenAISimulator(chars_per_chunk=5) as simulator:
        yield simulator
        # Let the server finish closing the connections the clients closed: stop() cancels whatever is
        # still closing, and Python 3.11's asyncio logs a spurious error for such a cancelled handler.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                while simulator.open_connections:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
        for _ in range(3):
            await asyncio.sleep(0)


def make_config(sim: OpenAISimulator, **overrides: Any) -> OpenAIConfig:
    options: dict[str, Any] = {
        "base_url": sim.base_url,
        "api_key": KEY,
        "connect_timeout_s": 1.0,
        "read_timeout_s": 1.0,
        "first_token_timeout_s": 3.0,
        "warmup_interval_s": 30.0,  # no pings unless a test asks for them
        "keepalive_expiry_s": 60.0,
        **overrides,
    }
    return OpenAIConfig(**options)


@pytest.fixture
def config(sim: OpenAISimulator) -> OpenAIConfig:
    return make_config(sim)


@pytest.fixture
async def manager(config: OpenAIConfig, tracer: trace.Tracer) -> AsyncIterator[OpenAIConnectionManager]:
    mgr = OpenAIConnectionManager(config, tracer=tracer)
    try:
        async with asyncio.timeout(WAIT_S):
            await mgr.start()
        yield mgr
    finally:
        await mgr.shutdown()


@pytest.fixture
async def http(manager: OpenAIConnectionManager) -> httpx.AsyncClient:
    return await manager.get_client()


@pytest.fixture
def llm(config: OpenAIConfig, tracer: trace.Tracer, meter_provider: MeterProvider) -> OpenAILLMClient:
    return OpenAILLMClient(config, tracer=tracer, meter=meter_provider.get_meter("voxcore.llm"))


async def collect(
    llm: OpenAILLMClient,
    http: httpx.AsyncClient,
    prompt: str | list[ConversationMessage] = "привет, как дела?",
    model: str = MODEL,
) -> list[LLMStreamChunk]:
    async with asyncio.timeout(WAIT_S):
        return [c async for c in llm.stream_structured_generate(http, prompt, model, LLMStructuredResponse)]


def check_chunk_order(chunks: list[LLMStreamChunk]) -> None:
    """Metadata first (and only there), no text before it, one final chunk at the end."""
    assert chunks, "no chunks"
    first = chunks[0]
    assert first.text_chunk == "" and first.is_safe is not None and first.aggression_score is not None
    assert not first.is_final_chunk
    for chunk in chunks[1:]:
        assert chunk.is_safe is None and chunk.aggression_score is None
    assert all(not c.is_final_chunk for c in chunks[:-1])


def text_of(chunks: list[LLMStreamChunk]) -> str:
    return "".join(c.text_chunk for c in chunks)


def spans_named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def wait_until(condition: Any) -> None:
    """Poll a counter of the simulator or the manager (they offer no event to wait on)."""
    async with asyncio.timeout(WAIT_S):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# -- connection manager --------------------------------------------------------------------------------


async def test_handshake_events_span_and_reuse(
    sim: OpenAISimulator,
    config: OpenAIConfig,
    tracer: trace.Tracer,
    span_exporter: InMemorySpanExporter,
    events: EventLog,
    llm: OpenAILLMClient,
) -> None:
    async with OpenAIConnectionManager(config, tracer=tracer) as manager:
        start = events.named("conn_handshake_start")
        finish = events.named("conn_handshake_finish")
        assert start == [{"base_url": sim.base_url}]
        assert len(finish) == 1 and finish[0]["ok"] is True and finish[0]["status"] == 200
        assert finish[0]["ms"] > 0 and manager.handshake_ms == finish[0]["ms"]
        assert sim.request_count(MODELS_PATH) == 1
        assert sim.last_request_headers["authorization"] == f"Bearer {KEY}"
        assert manager.is_started and manager.connections_opened == 1

        (span,) = spans_named(span_exporter, "llm.handshake")
        assert span.kind is trace.SpanKind.CLIENT
        assert span.attributes is not None
        assert span.attributes["server.address"] == "127.0.0.1"
        assert span.attributes["server.port"] == sim.port
        assert span.attributes["http.response.status_code"] == 200

        # The first real request rides on the handshake's TCP connection.
        http = await manager.get_client()
        chunks = await collect(llm, http)
        check_chunk_order(chunks)
        assert llm.last_result is not None and llm.last_result.connection_reused is True
        assert sim.connections_accepted == 1
        assert manager.connections_opened == 1

        # A connection the server dropped is replaced, and the next result says so.
        await sim.drop_connections()
        await collect(llm, http)
        assert llm.last_result.connection_reused is False
        assert sim.connections_accepted == 2 and manager.connections_opened == 2
    assert not manager.is_started


async def test_connection_reused_is_none_for_foreign_clients(sim: OpenAISimulator) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url, headers={"Authorization": f"Bearer {KEY}"}) as plain:
        response = await plain.get("/models")
    assert connection_reused(response) is None


async def test_no_authorization_header_without_key(events: EventLog) -> None:
    async with OpenAISimulator(api_key=None) as sim:
        config = make_config(sim, api_key=None)
        async with OpenAIConnectionManager(config) as manager:
            assert manager.is_started
            assert "authorization" not in sim.last_request_headers


async def test_warmup_loop_pings_and_survives_a_failed_ping(sim: OpenAISimulator, events: EventLog) -> None:
    config = make_config(sim, warmup_interval_s=0.05, keepalive_expiry_s=5.0)
    sim.inject(Fault.SERVER_ERROR, path=MODELS_PATH)
    manager = OpenAIConnectionManager(config)
    # The handshake consumes the first fault and fails; the manager is left clean.
    with pytest.raises(LLMServerError) as caught:
        await manager.start()
    assert caught.value.status == 500 and "server had an error" in str(caught.value)
    assert not manager.is_started
    try:
        async with asyncio.timeout(WAIT_S):
            await manager.start()  # the second handshake succeeds
            sim.inject(Fault.SERVER_ERROR, path=MODELS_PATH)  # for the first ping
            opened = manager.connections_opened
            # 1 failed + 1 ok handshake, then the pings: the first one fails, later ones succeed.
            await sim.wait_for_requests(6, path=MODELS_PATH)
            await wait_until(lambda: len(events.named("keep_alive_ping_finish")) >= 4)
        assert manager.pings >= 4 and manager.ping_failures == 1
        failed = events.named("keep_alive_ping_failed")
        assert len(failed) == 1 and failed[0]["status"] == 500
        finished = events.named("keep_alive_ping_finish")
        assert finished[0]["ok"] is False and finished[0]["status"] == 500
        assert all(f["ok"] is True and f["status"] == 200 and f["ms"] >= 0 for f in finished[1:])
        assert "keep_alive_ping_start" in events.names()
        assert "keep_alive_loop_failed" not in events.names()
        # Pings keep the one connection warm: no new TCP connection after the handshake.
        assert manager.connections_opened == opened
    finally:
        await manager.shutdown()


async def test_warmup_completion(sim: OpenAISimulator, events: EventLog) -> None:
    config = make_config(sim, warmup_interval_s=0.05, keepalive_expiry_s=5.0, warmup_completion=True)
    async with OpenAIConnectionManager(config):
        async with asyncio.timeout(WAIT_S):
            await sim.wait_for_requests(1, path=CHAT_PATH)
            await wait_until(lambda: events.named("keep_alive_completion"))
    body = next(r.json() for r in sim.requests if r.path == CHAT_PATH)
    assert body["model"] == "gpt-4o-mini" and body["max_tokens"] == 1 and body["stream"] is False
    completion = events.named("keep_alive_completion")[0]
    assert completion["ok"] is True and completion["ms"] >= 0


async def test_get_client_concurrent_callers_start_once(
    sim: OpenAISimulator, config: OpenAIConfig, events: EventLog
) -> None:
    sim.plan_next(RequestPlan(path=MODELS_PATH, first_token_delay_ms=50))  # a slow handshake
    manager = OpenAIConnectionManager(config)
    try:
        async with asyncio.timeout(WAIT_S):
            clients = await asyncio.gather(*(manager.get_client() for _ in range(5)))
        assert all(c is clients[0] for c in clients)
        assert sim.request_count(MODELS_PATH) == 1
        assert len(events.named("conn_handshake_start")) == 1
    finally:
        await manager.shutdown()


async def test_shutdown_is_idempotent_and_cancels_the_loop(sim: OpenAISimulator) -> None:
    config = make_config(sim, warmup_interval_s=0.05, keepalive_expiry_s=5.0)
    manager = OpenAIConnectionManager(config)
    await manager.start()
    loop_task = manager._warmup_task
    assert loop_task is not None and not loop_task.done()
    await manager.shutdown()
    assert loop_task.cancelled()
    assert not manager.is_started
    await manager.shutdown()  # twice is fine
    await wait_until(lambda: sim.open_connections == 0)
    pings = sim.request_count(MODELS_PATH)
    await asyncio.sleep(0.15)
    assert sim.request_count(MODELS_PATH) == pings  # nothing pings any more


async def test_shutdown_while_the_handshake_hangs(sim: OpenAISimulator) -> None:
    sim.inject(Fault.TIMEOUT, path=MODELS_PATH)
    manager = OpenAIConnectionManager(make_config(sim, read_timeout_s=30.0))
    waiter = asyncio.create_task(manager.get_client())
    await sim.wait_for_requests(1, path=MODELS_PATH)
    async with asyncio.timeout(WAIT_S):
        await manager.shutdown()
        with pytest.raises(LLMTimeoutError, match="shut down"):
            await waiter
    assert not manager.is_started
    await wait_until(lambda: sim.open_connections == 0)


@pytest.mark.parametrize(
    ("fault", "error", "fragment"),
    [
        (Fault.BAD_KEY, LLMAuthError, "Incorrect API key"),
        (Fault.RATE_LIMIT, LLMRateLimitedError, "Rate limit reached"),
        (Fault.SERVICE_UNAVAILABLE, LLMServerError, "overloaded"),
        (Fault.TIMEOUT, LLMTimeoutError, "read timeout"),
    ],
)
async def test_failed_handshake_raises_typed_error_and_closes(
    sim: OpenAISimulator, events: EventLog, fault: Fault, error: type[LLMError], fragment: str
) -> None:
    sim.inject(fault, path=MODELS_PATH)
    manager = OpenAIConnectionManager(make_config(sim, read_timeout_s=0.3))
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(error, match=fragment):
            await manager.start()
    assert not manager.is_started and manager._warmup_task is None
    (finish,) = events.named("conn_handshake_finish")
    assert finish["ok"] is False and finish["error_type"] == error.__name__
    await wait_until(lambda: sim.open_connections == 0)  # what the handshake opened is closed
    await manager.shutdown()


async def test_handshake_404_is_a_bad_path_not_a_model(sim: OpenAISimulator) -> None:
    manager = OpenAIConnectionManager(make_config(sim, warmup_endpoint="/no-such-endpoint"))
    with pytest.raises(LLMBadRequestError, match="check base_url"):
        await manager.start()


async def test_handshake_connection_refused() -> None:
    config = OpenAIConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=1.0)
    manager = OpenAIConnectionManager(config)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(LLMTimeoutError, match="cannot connect"):
            await manager.get_client()
    assert not manager.is_started


# -- structured streaming ------------------------------------------------------------------------------


async def test_stream_structured_answer(
    sim: OpenAISimulator,
    http: httpx.AsyncClient,
    llm: OpenAILLMClient,
    events: EventLog,
    config: OpenAIConfig,
) -> None:
    chunks = await collect(llm, http, "привет, как дела?")
    check_chunk_order(chunks)
    assert chunks[0].is_safe is True and chunks[0].aggression_score == 0
    final = chunks[-1]
    assert final.is_final_chunk and final.text_chunk == ""
    answer = "Вы сказали: привет, как дела?"
    assert text_of(chunks) == answer
    assert len(chunks) > 4  # really streamed, one chunk per delta

    result = llm.last_result
    assert result is not None
    assert isinstance(result.response, LLMStructuredResponse) and result.response.answer == answer
    assert result.text == answer
    assert result.usage is not None and result.usage.input_tokens > 0 and result.usage.output_tokens > 0
    assert 0 < result.ttft_ms <= result.total_ms
    assert result.chunks > 0 and result.connection_reused is True

    body = sim.last_request_json
    assert body["model"] == MODEL and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "привет, как дела?"}]
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == config.max_output_tokens and body["temperature"] == config.temperature
    assert body["response_format"] == json_schema_for(LLMStructuredResponse)

    (send,) = events.named("request_send")
    assert send["model"] == MODEL and send["stream"] is True and send["messages"] == 1 and send["ts"]
    (first,) = events.named("first_token")
    assert first["ttft_ms"] == result.ttft_ms
    (end,) = events.named("stream_end")
    assert end["total_ms"] == result.total_ms and end["chunks"] == result.chunks
    assert end["ttft_ms"] == result.ttft_ms and end["finish_reason"] == "stop"
    assert end["input_tokens"] == result.usage.input_tokens
    assert end["output_tokens"] == result.usage.output_tokens and end["connection_reused"] is True
    chunk_events = events.named("chunk")
    assert len(chunk_events) == result.chunks and chunk_events[0] == {"seq": 1, "size": 5}
    assert "llm_error" not in events.names()


async def test_unsafe_answer_metadata_comes_first(
    sim: OpenAISimulator, http: httpx.AsyncClient, llm: OpenAILLMClient
) -> None:
    sim.script(
        {
            "is_safe": False,
            "aggression_score": 8,
            "internal_thought": "груб",
            "answer": "Давайте сменим тему.",
        }
    )
    chunks = await collect(llm, http)
    check_chunk_order(chunks)
    assert chunks[0].is_safe is False and chunks[0].aggression_score == 8
    assert text_of(chunks) == "Давайте сменим тему."
    assert llm.last_result is not None and llm.last_result.response.is_safe is False  # type: ignore[attr-defined]


async def test_metadata_after_the_answer_is_still_yielded_first(
    sim: OpenAISimulator, http: httpx.AsyncClient, llm: OpenAILLMClient
) -> None:
    sim.script({"answer": "Сначала текст, потом метаданные.", "is_safe": False, "aggression_score": 3})
    chunks = await collect(llm, http)
    check_chunk_order(chunks)
    assert chunks[0].is_safe is False and chunks[0].aggression_score == 3
    assert text_of(chunks) == "Сначала текст, потом метаданные."
    assert len(chunks) > 3  # the held-back deltas are still yielded one by one


async def test_missing_metadata_uses_defaults_and_scores_are_clamped(
    sim: OpenAISimulator, http: httpx.AsyncClient, llm: OpenAILLMClient
) -> None:
    sim.script({"answer": "Только ответ."}, {"aggression_score": 42, "answer": "Злой."})
    chunks = await collect(llm, http)
    check_chunk_order(chunks)
    assert (chunks[0].is_safe, chunks[0].aggression_score) == (True, 0)
    assert text_of(chunks) == "Только ответ."
    chunks = await collect(llm, http)
    assert (chunks[0].is_safe, chunks[0].aggression_score) == (True, 10)
    assert llm.last_result is not None and llm.last_result.response.aggression_score == 10  # type: ignore[attr-defined]


async def test_instructions_mode_and_message_lists(sim: OpenAISimulator, http: httpx.AsyncClient) -> None:
    config = make_config(sim, structured_output="instructions", stream_usage=False)
    llm = OpenAILLMClient(config)
    sim.script({"is_safe": True, "aggression_score": 1, "internal_thought": None, "answer": "Готово."})
    messages: list[ConversationMessage] = [
        {"role": "system", "content": "Отвечай JSON-объектом."},
        {"role": "user", "content": "Привет"},
    ]
    chunks = await collect(llm, http, messages)
    assert text_of(chunks) == "Готово." and chunks[0].aggression_score == 1
    body = sim.last_request_json
    assert "response_format" not in body and "stream_options" not in body
    assert body["messages"] == messages
    assert llm.last_result is not None and llm.last_result.usage is None


async def test_consumer_stopping_early_closes_the_response(
    sim: OpenAISimulator,
    http: httpx.AsyncClient,
    llm: OpenAILLMClient,
    span_exporter: InMemorySpanExporter,
) -> None:
    sim.script("Длинный ответ, который никто не дослушает до конца, потому что абонент перебил бота.")
    sim.plan_next(RequestPlan(inter_chunk_delay_ms=20))
    previous = llm.last_result
    async with asyncio.timeout(WAIT_S):
        stream = llm.stream_structured_generate(http, "привет", MODEL, LLMStructuredResponse)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                if chunk.text_chunk:
                    break
        await wait_until(lambda: sim.open_connections == 0)  # the half-read response was closed
        assert llm.last_result is previous
        (span,) = spans_named(span_exporter, "chat")
        assert span.attributes is not None and span.attributes["voxcore.cancelled"] is True

        # A plain ``break`` without aclose: the event loop finalizes the generator, then all is well.
        sim.plan_next(RequestPlan(inter_chunk_delay_ms=20))
        async for chunk in llm.stream_structured_generate(http, "ещё раз", MODEL, LLMStructuredResponse):
            if chunk.text_chunk:
                break
        chunks = await collect(llm, http)
    check_chunk_order(chunks)
    assert chunks[-1].is_final_chunk


# -- errors --------------------------------------------------------------------------------------------

FAULT_CASES = [
    pytest.param(RequestPlan(fault=Fault.BAD_KEY), LLMAuthError, "Incorrect API key", 401, id="401"),
    pytest.param(
        RequestPlan(fault=Fault.UNKNOWN_MODEL), LLMModelNotFoundError, "does not exist", 404, id="404"
    ),
    pytest.param(
        RequestPlan(fault=Fault.RATE_LIMIT, retry_after=2.5), LLMRateLimitedError, "Rate limit", 429, id="429"
    ),
    pytest.param(RequestPlan(fault=Fault.SERVER_ERROR), LLMServerError, "server had an error", 500, id="500"),
    pytest.param(RequestPlan(fault=Fault.SERVICE_UNAVAILABLE), LLMServerError, "overloaded", 503, id="503"),
    pytest.param(RequestPlan(fault=Fault.MALFORMED), LLMProtocolError, "malformed SSE", 200, id="malformed"),
    pytest.param(
        RequestPlan(fault=Fault.TRUNCATED), LLMProtocolError, "failed mid-response", 200, id="truncated"
    ),
    pytest.param(
        RequestPlan(fault=Fault.TRUNCATED, graceful=True),
        LLMProtocolError,
        "without \\[DONE\\]",
        200,
        id="truncated-graceful",
    ),
    pytest.param(
        RequestPlan(fault=Fault.INVALID_JSON),
        LLMProtocolError,
        "invalid structured answer",
        200,
        id="bad-json",
    ),
    pytest.param(
        RequestPlan(fault=Fault.TIMEOUT), LLMTimeoutError, "first_token_timeout_s", None, id="first-token"
    ),
    pytest.param(
        RequestPlan(fault=Fault.STALL, after_chunks=3), LLMTimeoutError, "read timeout", 200, id="stall"
    ),
]


@pytest.mark.parametrize(("plan", "error", "fragment", "status"), FAULT_CASES)
async def test_stream_faults_raise_typed_errors(
    sim: OpenAISimulator,
    http: httpx.AsyncClient,
    tracer: trace.Tracer,
    span_exporter: InMemorySpanExporter,
    events: EventLog,
    plan: RequestPlan,
    error: type[LLMError],
    fragment: str,
    status: int | None,
) -> None:
    # The first token may take 0.4 s at most here, a silence between chunks 1 s (the manager's client).
    llm = OpenAILLMClient(make_config(sim, first_token_timeout_s=0.4), tracer=tracer)
    await collect(llm, http)
    previous = llm.last_result
    assert previous is not None
    span_exporter.clear()
    events.clear()

    sim.plan_next(plan)
    received: list[LLMStreamChunk] = []
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(error, match=fragment) as caught:
            async for chunk in llm.stream_structured_generate(http, "привет", MODEL, LLMStructuredResponse):
                received.append(chunk)
    assert llm.last_result is previous
    assert not any(c.is_final_chunk for c in received)
    if received:  # text may have been streamed before the failure, but never before the metadata
        assert received[0].text_chunk == "" and received[0].is_safe is not None
    if isinstance(caught.value, LLMRateLimitedError):
        assert caught.value.retry_after == 2.5
    if isinstance(caught.value, LLMServerError):
        assert caught.value.status == status

    (logged,) = events.named("llm_error")
    assert logged["error_type"] == error.__name__ and logged["model"] == MODEL
    assert logged["status"] == status and logged["message"] == str(caught.value)
    (span,) = spans_named(span_exporter, "chat")
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == (str(status) if status and status >= 400 else error.__name__)

    # Nothing leaked or poisoned: the same client streams the next answer.
    chunks = await collect(llm, http)
    check_chunk_order(chunks)
    assert llm.last_result is not previous
    await wait_until(lambda: sim.open_connections <= 1)


async def test_a_stalled_tail_after_the_whole_answer_still_ends_the_turn(
    sim: OpenAISimulator, http: httpx.AsyncClient, llm: OpenAILLMClient, events: EventLog
) -> None:
    # The whole JSON answer arrives, then the server goes silent (no finish chunk, usage or [DONE]).
    sim.plan_next(RequestPlan(fault=Fault.STALL, after_chunks=10_000))
    async with asyncio.timeout(WAIT_S):
        chunks = await collect(llm, http)
    check_chunk_order(chunks)
    assert text_of(chunks) == "Вы сказали: привет, как дела?"
    assert llm.last_result is not None and llm.last_result.usage is None
    assert events.named("stream_tail_timeout") and not events.named("llm_error")
    await collect(llm, http)  # and the client goes on


async def test_stream_connection_refused_is_a_timeout_error(llm: OpenAILLMClient) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}/v1") as http:
        with pytest.raises(LLMTimeoutError, match="cannot connect"):
            await collect(llm, http)
    assert llm.last_result is None


# -- telemetry -----------------------------------------------------------------------------------------


async def test_chat_span_and_metrics(
    sim: OpenAISimulator,
    http: httpx.AsyncClient,
    llm: OpenAILLMClient,
    span_exporter: InMemorySpanExporter,
    metric_reader: InMemoryMetricReader,
) -> None:
    await collect(llm, http)
    result = llm.last_result
    assert result is not None and result.usage is not None
    (span,) = spans_named(span_exporter, "chat")
    assert span.name == f"chat {MODEL}" and span.kind is trace.SpanKind.CLIENT
    assert span.status.status_code is trace.StatusCode.UNSET
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.request.stream"] is True
    assert attributes["gen_ai.request.max_tokens"] == 512
    assert attributes["gen_ai.request.temperature"] == 0.3
    assert attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(result.ttft_ms / 1000, abs=1e-3)
    assert attributes["gen_ai.usage.input_tokens"] == result.usage.input_tokens
    assert attributes["gen_ai.usage.output_tokens"] == result.usage.output_tokens
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.response.model"] == MODEL
    assert attributes["server.address"] == "127.0.0.1" and attributes["server.port"] == sim.port
    assert attributes["voxcore.connection.reused"] is True

    sim.inject(Fault.RATE_LIMIT)
    with pytest.raises(LLMRateLimitedError):
        await collect(llm, http)

    data = metric_reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                assert metric.unit == ("{token}" if metric.name == "gen_ai.client.token.usage" else "s")
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    durations = points["gen_ai.client.operation.duration"]
    ok = [p for p in durations if "error.type" not in p.attributes]
    failed = [p for p in durations if p.attributes.get("error.type") == "429"]
    assert ok and ok[0].count == 1 and failed and failed[0].count == 1
    assert ok[0].attributes["gen_ai.request.model"] == MODEL
    assert ok[0].attributes["gen_ai.provider.name"] == "openai"
    assert ok[0].attributes["gen_ai.response.model"] == MODEL
    ttfc = points["gen_ai.client.operation.time_to_first_chunk"]
    assert sum(p.count for p in ttfc) == 1
    tokens = {p.attributes["gen_ai.token.type"]: p for p in points["gen_ai.client.token.usage"]}
    assert set(tokens) == {"input", "output"} and all(p.count == 1 and p.sum > 0 for p in tokens.values())
    assert all(p.attributes["gen_ai.response.model"] == MODEL for p in tokens.values())


async def test_handshake_duration_metric(sim: OpenAISimulator, config: OpenAIConfig) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    try:
        async with OpenAIConnectionManager(config, meter=provider.get_meter("voxcore.llm")):
            pass
        data = reader.get_metrics_data()
        assert data is not None
        names = [m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics]
        assert names == ["voxcore.llm.handshake.duration"]
    finally:
        provider.shutdown()


# -- plain completion ----------------------------------------------------------------------------------


async def test_generate_text(
    sim: OpenAISimulator,
    http: httpx.AsyncClient,
    llm: OpenAILLMClient,
    events: EventLog,
    span_exporter: InMemorySpanExporter,
) -> None:
    sim.script("  Краткое содержание разговора.  ")
    async with asyncio.timeout(WAIT_S):
        text = await llm.generate_text(http, "Сделай резюме", MODEL, max_tokens=100)
    assert text == "Краткое содержание разговора."
    body = sim.last_request_json
    assert body["stream"] is False and body["max_tokens"] == 100 and "response_format" not in body
    (done,) = events.named("completion_done")
    assert done["ms"] > 0 and done["input_tokens"] > 0 and done["output_tokens"] > 0
    (send,) = events.named("request_send")
    assert send["stream"] is False
    (span,) = spans_named(span_exporter, "chat")
    assert span.attributes is not None and span.attributes["gen_ai.request.stream"] is False
    assert span.attributes["gen_ai.request.max_tokens"] == 100
    assert llm.last_result is None  # only streams set it


@pytest.mark.parametrize(
    ("plan", "error"),
    [
        (RequestPlan(fault=Fault.UNKNOWN_MODEL), LLMModelNotFoundError),
        (RequestPlan(fault=Fault.RATE_LIMIT, retry_after=0.25), LLMRateLimitedError),
        (RequestPlan(fault=Fault.MALFORMED), LLMProtocolError),
        (RequestPlan(fault=Fault.TRUNCATED), LLMProtocolError),
        (RequestPlan(fault=Fault.TRUNCATED, graceful=True), LLMProtocolError),
        (RequestPlan(fault=Fault.TIMEOUT), LLMTimeoutError),
    ],
)
async def test_generate_text_errors(
    sim: OpenAISimulator,
    http: httpx.AsyncClient,
    llm: OpenAILLMClient,
    events: EventLog,
    plan: RequestPlan,
    error: type[LLMError],
) -> None:
    sim.plan_next(plan)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(error) as caught:
            await llm.generate_text(http, "Сделай резюме", MODEL)
        assert len(events.named("llm_error")) == 1
        if isinstance(caught.value, LLMRateLimitedError):
            assert caught.value.retry_after == 0.25
        assert await llm.generate_text(http, "снова", MODEL) == "Вы сказали: снова"


# -- error mapping helpers -----------------------------------------------------------------------------


def test_retry_after_parsing() -> None:
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert retry_after_seconds(httpx.Headers({"retry-after": "3"})) == 3.0
    assert (
        retry_after_seconds(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}), now=1445412470.0)
        == 10.0
    )
    assert retry_after_seconds(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "x", "retry-after": "-1"})) is None
    assert retry_after_seconds(httpx.Headers()) is None


def test_status_mapping_and_messages() -> None:
    body = b'{"error": {"message": "nope", "type": "x"}}'
    headers = httpx.Headers()
    assert isinstance(error_for_status(403, body, headers, what="GET /x"), LLMAuthError)
    assert isinstance(error_for_status(404, body, headers, what="POST /c", model="m"), LLMModelNotFoundError)
    assert isinstance(error_for_status(404, body, headers, what="GET /x"), LLMBadRequestError)
    assert isinstance(error_for_status(422, body, headers, what="POST /c", model="m"), LLMBadRequestError)
    server = error_for_status(502, b"<html>Bad gateway</html>", headers, what="POST /c", model="m")
    assert isinstance(server, LLMServerError) and server.status == 502 and "Bad gateway" in str(server)
    assert "nope" in str(error_for_status(400, body, headers, what="POST /c", model="m"))
    assert provider_message(b"") == "(empty body)"
    long_page = provider_message(b"word " * 1000)
    assert long_page.startswith("word word") and long_page.endswith("chars)") and len(long_page) < 230
    leaked = provider_message(b'{"error": {"message": "Incorrect API key: sk-proj-1234567890abcdef"}}')
    assert "sk-proj" not in leaked and "Incorrect API key" in leaked
