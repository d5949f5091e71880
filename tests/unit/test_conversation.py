"""Conversation use cases with port fakes: turns, dual context, summary cache, rollback, telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.fakes import (
    FakeCache,
    FakeConnectionManager,
    FakeLLMClient,
    FakeTokenizer,
    ScriptedReply,
    reply,
    texts,
)
from voxcore.application.context import LLMContext
from voxcore.application.dual_context import DualContextController
from voxcore.application.manager import ConversationManager
from voxcore.core.domain.dual_context import DualContextAction, DualContextPolicy, StandbyState
from voxcore.core.domain.keys import session_hash, summary_key
from voxcore.core.domain.models import ConversationMessage, LLMStreamChunk, LLMStructuredResponse, Role
from voxcore.core.domain.prompting import SUMMARY_HEADING, Prompts
from voxcore.core.domain.summary import SummaryRecord, decode_records, history_digest
from voxcore.core.ports.errors import (
    LLMProtocolError,
    LLMRateLimitedError,
    LLMServerError,
    LLMTimeoutError,
)
from voxcore.events import FIELDS_ATTR

PROMPTS = Prompts(system_prompt="sys", response_format_instruction="fmt", summarization_prompt="sum")
# With the word-counting fake tokenizer, the empty context costs 13 tokens (sys 1+4, fmt 1+4, priming
# 3) and every line() message 20 (16 words + 4). In a 200-token window: one turn adds 0.2.
POLICY = DualContextPolicy(warmup_threshold_ratio=0.45, handover_threshold_ratio=0.6, hard_limit_ratio=0.95)
SESSION = "call-1"
UNSAFE = "Извините, я не могу ответить на это."
SUMMARY = "Клиент спрашивал о полисе."


def line(tag: str, words: int = 16) -> str:
    """A message of exactly ``words`` words, recognisable by its first word."""
    return " ".join([tag] + ["слово"] * (words - 1))


def msg(role: Role, content: str) -> ConversationMessage:
    return ConversationMessage(role=role, content=content)


def state_of(rig: Rig) -> StandbyState:
    return rig.controller.state


def contents(context: LLMContext) -> list[str]:
    return [message["content"].split(" ")[0] for message in context.messages]


# -- fixtures ----------------------------------------------------------------------------------------------


@dataclass
class Otel:
    """A private tracer and meter with in-memory export (the global providers are never touched)."""

    tracer: trace.Tracer
    meter: Any
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def points(self, metric: str) -> list[HistogramDataPoint]:
        data = self.reader.get_metrics_data()
        found: list[HistogramDataPoint] = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        found.extend(p for p in item.data.data_points if isinstance(p, HistogramDataPoint))
        return found

    def unit(self, metric: str) -> str | None:
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        return item.unit
        return None


@pytest.fixture
def otel() -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Otel(tracer_provider.get_tracer("test"), meter_provider.get_meter("test"), exporter, reader)
    tracer_provider.shutdown()
    meter_provider.shutdown()


Events = Callable[[str], list[dict[str, Any]]]


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Events:
    """``events(name)``: the fields of every logged event with that name, in order."""
    caplog.set_level(logging.DEBUG, logger="voxcore")

    def find(name: str) -> list[dict[str, Any]]:
        return [getattr(r, FIELDS_ATTR) for r in caplog.records if r.getMessage() == name]

    return find


@pytest.fixture
def event_names(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    caplog.set_level(logging.DEBUG, logger="voxcore")
    return lambda: [r.getMessage() for r in caplog.records if hasattr(r, FIELDS_ATTR)]


@dataclass
class Rig:
    manager: ConversationManager
    controller: DualContextController
    client: FakeLLMClient
    connection: FakeConnectionManager
    cache: FakeCache | None
    tokenizer: FakeTokenizer
    managers: list[ConversationManager] = field(default_factory=list)


_NO_CACHE = object()


@pytest.fixture
async def make_rig(otel: Otel) -> Any:
    """Build a manager on fakes; every manager built is shut down after the test."""
    built: list[ConversationManager] = []

    def make(
        *,
        window: int = 200,
        policy: DualContextPolicy = POLICY,
        recent: int = 2,
        replies: Sequence[ScriptedReply] = (),
        summaries: Sequence[str | BaseException] = (),
        summary_gate: asyncio.Event | None = None,
        cache: Any = None,
        session: str = SESSION,
        history: Sequence[ConversationMessage] = (),
        summary: str | None = None,
        connection_error: BaseException | None = None,
    ) -> Rig:
        tokenizer = FakeTokenizer()
        active = LLMContext(
            prompts=PROMPTS,
            tokenizer=tokenizer,
            context_window_tokens=window,
            history=history,
            summary=summary,
        )
        controller = DualContextController(
            active=active, policy=policy, recent_messages=recent, tracer=otel.tracer, meter=otel.meter
        )
        client = FakeLLMClient(
            replies=replies,
            summaries=summaries,
            default_reply=line("ответ"),
            default_summary=SUMMARY,
            summary_gate=summary_gate,
            tracer=otel.tracer,
        )
        connection = FakeConnectionManager(error=connection_error)
        the_cache = None if cache is _NO_CACHE else (cache if cache is not None else FakeCache())
        manager = ConversationManager(
            connection_manager=connection,
            llm_client=client,
            dual_context=controller,
            session_id=session,
            main_model="main-model",
            summary_model="summary-model",
            cache=the_cache,
            summary_ttl_seconds=600,
            summary_max_tokens=120,
            unsafe_reply=UNSAFE,
            tracer=otel.tracer,
            meter=otel.meter,
        )
        built.append(manager)
        return Rig(manager, controller, client, connection, the_cache, tokenizer)

    yield make
    for manager in built:
        await manager.shutdown()


async def run(manager: ConversationManager, text: str) -> list[LLMStreamChunk]:
    return [chunk async for chunk in manager.process_user_turn(text)]


async def run_turns(manager: ConversationManager, *tags: str) -> None:
    for tag in tags:
        await run(manager, line(tag))


# -- LLMContext --------------------------------------------------------------------------------------------


def test_context_counts_each_message_once_and_ratio_is_o1(events: Events) -> None:
    tokenizer = FakeTokenizer()
    context = LLMContext(prompts=PROMPTS, tokenizer=tokenizer, context_window_tokens=200, name="ctx")
    assert tokenizer.calls == 2 and context.tokens == 13  # system + format, counted at construction
    for index in range(5):
        context.add_message(msg("user" if index % 2 == 0 else "assistant", line(f"m{index}")))
    assert tokenizer.calls == 7
    for _ in range(3):
        context.estimate_usage_ratio()
        context.build_prompt()
    assert tokenizer.calls == 7  # no re-counting, ever
    assert context.tokens == 13 + 5 * 20
    assert context.estimate_usage_ratio() == pytest.approx(113 / 200)
    logged = events("usage_ratio")
    assert len(logged) == 5
    assert logged[-1] == {"context": "ctx", "ratio": pytest.approx(113 / 200), "tokens": 113, "messages": 5}


def test_context_validates_and_copies_messages() -> None:
    context = LLMContext(prompts=PROMPTS, tokenizer=FakeTokenizer(), context_window_tokens=100)
    original = msg("user", "привет")
    context.add_message(original)
    original["content"] = "изменено"
    assert context.messages[0]["content"] == "привет"
    for bad in (
        {"role": "bot", "content": "x"},
        {"role": "user", "content": 5},
        ["user", "x"],
        {"role": "user"},
    ):
        with pytest.raises(ValueError):
            context.add_message(bad)  # type: ignore[arg-type]
    assert context.message_count == 1
    copy = context.get_history_for_summary()
    copy[0]["content"] = "другое"
    assert context.messages[0]["content"] == "привет"
    with pytest.raises(ValueError):
        LLMContext(prompts=PROMPTS, tokenizer=FakeTokenizer(), context_window_tokens=0)


def test_context_prompt_summary_and_summary_request() -> None:
    context = LLMContext(
        prompts=PROMPTS,
        tokenizer=FakeTokenizer(),
        context_window_tokens=500,
        history=[msg("user", "u"), msg("assistant", "a")],
        summary="Иван, полис 42",
    )
    prompt = context.build_prompt()
    assert prompt[0] == msg("system", f"sys\n\n{SUMMARY_HEADING}Иван, полис 42")
    assert prompt[1:] == [msg("user", "u"), msg("assistant", "a"), msg("system", "fmt")]
    assert context.tokens == (1 + 5 + 3 + 4) + (1 + 4) + 3 + (1 + 4) * 2
    request = context.build_summary_prompt(context.get_history_for_summary())
    assert request[0] == msg("system", "sum")
    assert request[1]["content"].startswith(f"{SUMMARY_HEADING}Иван, полис 42\n\nКлиент: u")


def test_context_drop_oldest_keeps_whole_turns_and_the_newest(events: Events) -> None:
    context = LLMContext(prompts=PROMPTS, tokenizer=FakeTokenizer(), context_window_tokens=200)
    for tag in ("u1", "a1", "u2", "a2", "u3"):
        context.add_message(msg("user" if tag[0] == "u" else "assistant", line(tag)))
    assert context.estimate_usage_ratio() == pytest.approx(113 / 200)
    assert context.drop_oldest(target_ratio=0.4) == 2
    assert contents(context) == ["u2", "a2", "u3"]
    assert context.estimate_usage_ratio() <= 0.4
    assert context.drop_oldest(target_ratio=0.01) == 2  # never the newest turn
    assert contents(context) == ["u3"]
    assert context.tokens == 13 + 20
    trimmed = events("context_trimmed")
    assert trimmed[0]["dropped_messages"] == 2
    assert trimmed[0]["ratio_before"] == pytest.approx(113 / 200) and trimmed[0]["ratio_after"] <= 0.4


def test_context_remove_last_and_extend_from() -> None:
    tokenizer = FakeTokenizer()
    old = LLMContext(prompts=PROMPTS, tokenizer=tokenizer, context_window_tokens=200)
    stored = old.append(msg("user", line("u1")))
    assert not old.remove_last(msg("user", line("u1")))  # an equal message is not the stored one
    assert old.remove_last(stored) and old.message_count == 0 and old.appended == 0
    old.append(msg("user", line("u1")))
    mark = old.appended
    old.append(msg("assistant", line("a1")))
    old.append(msg("user", line("u2")))
    new = old.derive(history=[], summary="итог", name="standby")
    calls = tokenizer.calls
    assert new.extend_from(old, since=mark) == 2
    assert tokenizer.calls == calls  # counts reused, nothing re-counted
    assert contents(new) == ["a1", "u2"]
    assert new.tokens == new.derive(history=new.messages, summary="итог", name="x").tokens


# -- turns -------------------------------------------------------------------------------------------------


async def test_turn_streams_the_answer_and_logs_its_metrics(make_rig: Any, events: Events) -> None:
    rig = make_rig(replies=[reply("Добрый день, чем могу помочь?", aggression_score=2)])
    chunks = await run(rig.manager, "Привет")

    assert chunks[0] == LLMStreamChunk(text_chunk="", is_safe=True, aggression_score=2)
    assert all(c.is_safe is None and c.aggression_score is None for c in chunks[1:])
    assert texts(chunks) == "Добрый день, чем могу помочь?"
    assert chunks[-1] == LLMStreamChunk(text_chunk="", is_final_chunk=True)
    assert [c.is_final_chunk for c in chunks].count(True) == 1

    call = rig.client.calls[0]
    assert call.model == "main-model" and call.response_model is LLMStructuredResponse
    assert call.prompt == [msg("system", "sys"), msg("user", "Привет"), msg("system", "fmt")]
    assert list(rig.manager.active_context.messages) == [
        msg("user", "Привет"),
        msg("assistant", "Добрый день, чем могу помочь?"),
    ]

    (start,) = events("user_turn_start")
    assert start == {"turn": 1, "ratio": pytest.approx(13 / 200)}
    (ttft,) = events("time_to_first_token_ms")
    assert ttft["turn"] == 1 and ttft["ms"] >= 0
    assert events("response_total_ms")[0]["ms"] >= ttft["ms"]
    (usage,) = events("context_usage")
    assert usage["before"] == pytest.approx(13 / 200) and usage["after"] > usage["before"]
    (finish,) = events("user_turn_finish")
    assert finish["turn"] == 1
    assert finish["time_to_first_token_ms"] == ttft["ms"]
    assert finish["client_ttft_ms"] is not None
    assert (
        finish["context_ratio_before"] == usage["before"] and finish["context_ratio_after"] == usage["after"]
    )
    assert finish["handover_ms_if_any"] is None
    assert finish["chunks"] == len(chunks)
    assert finish["connection_reused"] is True
    assert finish["unsafe"] is False

    metrics = rig.manager.last_turn_metrics
    assert metrics is not None and metrics.outcome == "ok" and metrics.turn == 1 == rig.manager.turns
    assert metrics.chunks == len(chunks) and not metrics.rolled_back


async def test_first_chunk_text_is_forwarded_with_its_metadata(make_rig: Any) -> None:
    rig = make_rig(replies=[reply("Да, конечно", metadata_text=True, pieces=2)])
    chunks = await run(rig.manager, "Можно?")
    assert chunks[0] == LLMStreamChunk(text_chunk="Да, ", is_safe=True, aggression_score=0)
    assert texts(chunks) == "Да, конечно"


async def test_unsafe_answer_is_never_forwarded(make_rig: Any, events: Events) -> None:
    rig = make_rig(
        replies=[reply("Грубый ответ модели целиком", is_safe=False, aggression_score=9, metadata_text=True)]
    )
    chunks = await run(rig.manager, "Оскорбление")
    assert chunks == [
        LLMStreamChunk(text_chunk=UNSAFE, is_safe=False, aggression_score=9),
        LLMStreamChunk(text_chunk="", is_final_chunk=True),
    ]
    assert rig.client.closed_streams == 1  # the model's stream was closed, not read
    assert rig.manager.active_context.messages[-1] == msg("assistant", UNSAFE)
    assert events("user_turn_finish")[0]["unsafe"] is True
    assert rig.manager.last_turn_metrics is not None and rig.manager.last_turn_metrics.unsafe


async def test_a_second_turn_cannot_start_while_one_is_open(make_rig: Any) -> None:
    rig = make_rig()
    first = rig.manager.process_user_turn("раз")
    await anext(first)
    with pytest.raises(RuntimeError, match="still open"):
        await anext(rig.manager.process_user_turn("два"))
    await first.aclose()
    assert texts(await run(rig.manager, "два"))


async def test_stopping_at_the_final_chunk_ends_the_turn(make_rig: Any, otel: Otel) -> None:
    rig = make_rig()
    first = rig.manager.process_user_turn("раз")
    async for chunk in first:
        if chunk.is_final_chunk:
            break  # no aclose: the generator stays suspended at its final yield
    assert len(otel.spans("voxcore.turn")) == 1  # already ended
    assert texts(await run(rig.manager, "два"))  # the next turn is not blocked
    third = rig.manager.process_user_turn("три")
    await anext(third)
    await first.aclose()  # finalizing the old turn late must not release the open one
    with pytest.raises(RuntimeError, match="still open"):
        await anext(rig.manager.process_user_turn("четыре"))
    await third.aclose()
    assert [m["content"] for m in rig.manager.active_context.messages][::2] == ["раз", "два"]


# -- dual context ------------------------------------------------------------------------------------------


async def test_warmup_starts_at_the_threshold_without_delaying_turns(make_rig: Any, events: Events) -> None:
    gate = asyncio.Event()
    rig = make_rig(summary_gate=gate)
    await run_turns(rig.manager, "u1")
    assert state_of(rig) is StandbyState.NONE and not events("warmup_start")
    # Turn 2's reply takes the ratio to 0.465 >= 0.45: the warm-up starts in the background.
    await asyncio.wait_for(run_turns(rig.manager, "u2"), timeout=2)
    (start,) = events("warmup_start")
    assert start["ratio"] == pytest.approx(93 / 200) and start["messages"] == 4
    assert state_of(rig) is StandbyState.WARMING
    await asyncio.wait_for(rig.client.summary_started.wait(), timeout=2)
    # The summary is blocked, yet the next turn runs to its end.
    chunks = await asyncio.wait_for(run(rig.manager, line("u3")), timeout=2)
    assert chunks[-1].is_final_chunk
    assert rig.controller.warmup_task is not None and not rig.controller.warmup_task.done()

    gate.set()
    await rig.controller.wait_warmup()
    assert state_of(rig) is StandbyState.READY
    (ready,) = events("warmup_ready")
    assert ready["ms"] >= 0 and ready["summary_chars"] == len(SUMMARY)
    standby = rig.controller.standby_context
    assert standby is not None and ready["standby_ratio"] == pytest.approx(standby.estimate_usage_ratio())
    assert standby.summary == SUMMARY and contents(standby) == ["u2", "ответ"]  # the recent 2 of the snapshot
    assert rig.client.text_calls[0].model == "summary-model" and rig.client.text_calls[0].max_tokens == 120


async def test_messages_added_after_the_snapshot_reach_the_standby(make_rig: Any, events: Events) -> None:
    gate = asyncio.Event()
    rig = make_rig(summary_gate=gate)
    await run_turns(rig.manager, "u1", "u2")  # snapshot: u1 a1 u2 a2
    await run_turns(rig.manager, "u3")  # added while the summary is in flight
    gate.set()
    await rig.controller.wait_warmup()
    old = rig.manager.active_context
    await run_turns(rig.manager, "u4")  # boundary: ratio 0.665 >= 0.6 -> handover first
    new = rig.manager.active_context
    assert new is not old and old.name == "retired" and new.name == "active"
    assert contents(new) == ["u2", "ответ", "u3", "ответ", "u4", "ответ"]
    assert new.summary == SUMMARY
    (handover,) = events("handover_perform")
    assert handover["delta_messages"] == 2


async def test_handover_happens_at_the_turn_boundary(make_rig: Any, events: Events, otel: Otel) -> None:
    rig = make_rig()
    await run_turns(rig.manager, "u1", "u2")
    await rig.controller.wait_warmup()
    assert state_of(rig) is StandbyState.READY
    await run_turns(rig.manager, "u3")  # 0.665 at its end, but mid-turn: no handover yet
    assert rig.controller.handovers == 0 and state_of(rig) is StandbyState.READY
    await run_turns(rig.manager, "u4")
    assert rig.controller.handovers == 1
    (handover,) = events("handover_perform")
    assert set(handover) >= {"ms_since_ready", "handover_ms", "ratio_before", "ratio_after"}
    assert handover["ratio_before"] == pytest.approx(133 / 200)
    assert handover["ratio_after"] < handover["ratio_before"] and handover["handover_ms"] >= 0
    assert handover["ms_since_ready"] >= 0
    finish = events("user_turn_finish")[-1]
    assert finish["handover_ms_if_any"] == handover["handover_ms"]
    assert finish["context_ratio_before"] == pytest.approx(133 / 200)  # measured before the swap
    # The turn's prompt is built from the new context: summary in the system message, no u1.
    prompt = rig.client.calls[-1].prompt
    assert prompt[0]["content"] == f"sys\n\n{SUMMARY_HEADING}{SUMMARY}"
    assert [m["content"].split(" ")[0] for m in prompt[1:-1]] == ["u2", "ответ", "u3", "ответ", "u4"]
    (point,) = otel.points("voxcore.dual_context.handover.duration")
    assert point.count == 1 and otel.unit("voxcore.dual_context.handover.duration") == "s"


async def test_reply_lands_in_the_context_active_after_the_turn(make_rig: Any) -> None:
    paused = reply(line("a3"), pause_after=1)
    rig = make_rig(replies=[reply(line("a1")), reply(line("a2")), paused])
    await run_turns(rig.manager, "u1", "u2")
    await rig.controller.wait_warmup()
    old = rig.manager.active_context

    turn = rig.manager.process_user_turn(line("u3", 30))  # 0.635 once added: over the handover mark
    first = await anext(turn)
    assert first.is_safe is True
    pending = asyncio.ensure_future(anext(turn))
    await asyncio.wait_for(paused.paused.wait(), timeout=2)
    report = rig.controller.maybe_handover()  # something swaps contexts while the answer streams
    assert report is not None and report.delta_messages == 1
    paused.resume.set()
    rest = [await pending] + [chunk async for chunk in turn]
    assert rest[-1].is_final_chunk

    new = rig.manager.active_context
    assert new is not old
    assert contents(new) == ["u2", "a2", "u3", "a3"]
    assert contents(old) == ["u1", "a1", "u2", "a2", "u3"]  # the retired context gets no reply


async def test_active_context_is_trimmed_when_it_overflows_before_standby_is_ready(
    make_rig: Any, events: Events
) -> None:
    gate = asyncio.Event()
    rig = make_rig(summary_gate=gate)
    await run_turns(rig.manager, "u1", "u2", "u3", "u4")  # warm-up in flight since turn 2; 0.865 now
    assert not events("context_trimmed")
    chunks = await asyncio.wait_for(run(rig.manager, line("u5")), timeout=2)  # u5 -> 0.965 >= 0.95
    assert chunks[-1].is_final_chunk  # the turn still succeeds
    (trimmed,) = events("context_trimmed")
    assert trimmed["dropped_messages"] == 4
    assert trimmed["ratio_before"] == pytest.approx(193 / 200)
    assert trimmed["ratio_after"] <= POLICY.trim_target
    prompt = [m["content"].split(" ")[0] for m in rig.client.calls[-1].prompt[1:-1]]
    assert prompt == ["u3", "ответ", "u4", "ответ", "u5"]
    assert state_of(rig) is StandbyState.WARMING
    # The trim dropped what the summary replaces, so this standby would no longer shrink the
    # context: at the next boundary a new warm-up replaces it instead of a useless handover.
    gate.set()
    await rig.controller.wait_warmup()
    assert state_of(rig) is StandbyState.READY
    await run_turns(rig.manager, "u6")
    assert rig.controller.handovers == 0
    assert events("warmup_cancelled")[-1]["reason"] == "stale"
    assert len(events("warmup_start")) == 2
    await rig.controller.wait_warmup()
    await run_turns(rig.manager, "u7")
    assert rig.controller.handovers == 1
    assert contents(rig.manager.active_context)[-4:] == ["u6", "ответ", "u7", "ответ"]


async def test_failed_warmup_is_logged_and_retried_at_a_later_turn(make_rig: Any, events: Events) -> None:
    rig = make_rig(summaries=[LLMServerError("summary backend down", status=503)])
    await run_turns(rig.manager, "u1", "u2")
    await rig.controller.wait_warmup()
    (failed,) = events("warmup_failed")
    assert "summary backend down" in failed["error"] and failed["error_type"] == "LLMServerError"
    assert state_of(rig) is StandbyState.NONE and rig.controller.standby_context is None
    # Not in a hot loop: more messages in the same turn do not retry.
    assert rig.controller.after_message() == ()
    assert len(rig.client.text_calls) == 1
    await run_turns(rig.manager, "u3")  # a later turn: retried at its boundary
    await rig.controller.wait_warmup()
    assert len(rig.client.text_calls) == 2
    assert state_of(rig) is StandbyState.READY
    assert len(events("warmup_start")) == 2


async def test_consecutive_warmup_failures_back_off(make_rig: Any) -> None:
    error = LLMTimeoutError("slow")
    rig = make_rig(window=400, summaries=[error, error], policy=DualContextPolicy(0.2, 0.8, 0.95))
    await run_turns(rig.manager, "u1", "u2")  # 93/400 >= 0.2 after turn 2's reply
    await rig.controller.wait_warmup()
    await run_turns(rig.manager, "u3")  # retry 1 (fails again): next retry waits 2 turns
    await rig.controller.wait_warmup()
    assert len(rig.client.text_calls) == 2
    await run_turns(rig.manager, "u4")
    assert len(rig.client.text_calls) == 2
    await run_turns(rig.manager, "u5")
    await rig.controller.wait_warmup()
    assert len(rig.client.text_calls) == 3 and state_of(rig) is StandbyState.READY


async def test_controller_cancel_and_shutdown(make_rig: Any, events: Events) -> None:
    gate = asyncio.Event()
    rig = make_rig(summary_gate=gate)
    await run_turns(rig.manager, "u1", "u2")
    task = rig.controller.warmup_task
    assert task is not None
    await rig.controller.cancel()
    assert task.cancelled() and state_of(rig) is StandbyState.NONE
    assert events("warmup_cancelled")[0]["reason"] == "cancelled"
    assert rig.controller.after_message() == (DualContextAction.START_WARMUP,)


async def test_shutdown_cancels_the_warmup_and_closes_connections(make_rig: Any, events: Events) -> None:
    gate = asyncio.Event()
    rig = make_rig(summary_gate=gate)
    await run_turns(rig.manager, "u1", "u2")
    await asyncio.wait_for(rig.client.summary_started.wait(), timeout=2)
    task = rig.controller.warmup_task
    assert task is not None
    await rig.manager.shutdown()
    assert task.cancelled()
    (cancelled,) = events("warmup_cancelled")
    assert cancelled["reason"] == "shutdown" and cancelled["state"] == "warming"
    assert rig.connection.shutdowns == 1
    await rig.manager.shutdown()
    assert rig.connection.shutdowns == 1  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        await run(rig.manager, "ещё")
    assert state_of(rig) is StandbyState.NONE


# -- errors and early close --------------------------------------------------------------------------------


async def test_error_before_any_text_rolls_the_turn_back(make_rig: Any, events: Events) -> None:
    error = LLMRateLimitedError("slow down", retry_after=2.0)
    rig = make_rig(replies=[reply("никогда", error=error, error_after=0)])
    received: list[LLMStreamChunk] = []
    with pytest.raises(LLMRateLimitedError) as caught:
        async for chunk in rig.manager.process_user_turn("Вопрос"):
            received.append(chunk)
    assert caught.value is error and received == []
    assert rig.manager.active_context.message_count == 0  # nothing half-added: the user message is gone too
    (failed,) = events("user_turn_failed")
    assert failed["error_type"] == "LLMRateLimitedError" and failed["message"] == "slow down"
    assert failed["transient"] is True and failed["retry_after"] == 2.0 and failed["rolled_back"] is True
    metrics = rig.manager.last_turn_metrics
    assert metrics is not None and metrics.outcome == "failed" and metrics.error_type == "LLMRateLimitedError"
    # The caller may simply retry the same text.
    await run(rig.manager, "Вопрос")
    assert [m["role"] for m in rig.manager.active_context.messages] == ["user", "assistant"]


async def test_error_from_the_connection_manager_rolls_back(make_rig: Any, events: Events) -> None:
    rig = make_rig(connection_error=LLMTimeoutError("connect timeout"))
    with pytest.raises(LLMTimeoutError):
        await run(rig.manager, "Алло")
    assert rig.manager.active_context.message_count == 0
    assert events("user_turn_failed")[0]["rolled_back"] is True


async def test_error_mid_stream_keeps_the_question_and_adds_no_half_reply(
    make_rig: Any, events: Events
) -> None:
    rig = make_rig(replies=[reply("раз два три", pieces=3, error=LLMProtocolError("cut"), error_after=2)])
    received: list[LLMStreamChunk] = []
    with pytest.raises(LLMProtocolError):
        async for chunk in rig.manager.process_user_turn("Вопрос"):
            received.append(chunk)
    assert texts(received) == "раз "  # the caller already heard this much
    assert list(rig.manager.active_context.messages) == [msg("user", "Вопрос")]
    (failed,) = events("user_turn_failed")
    assert failed["rolled_back"] is False and failed["transient"] is True and failed["retry_after"] is None


async def test_error_after_metadata_only_still_rolls_back(make_rig: Any) -> None:
    rig = make_rig(replies=[reply("раз два", error=LLMServerError("boom", status=502), error_after=1)])
    with pytest.raises(LLMServerError):
        await run(rig.manager, "Вопрос")
    assert rig.manager.active_context.message_count == 0


async def test_early_close_after_text_leaves_no_half_reply(make_rig: Any, events: Events) -> None:
    rig = make_rig(replies=[reply("один два три четыре", pieces=4)])
    turn = rig.manager.process_user_turn("Вопрос")
    assert (await anext(turn)).is_safe is True
    assert (await anext(turn)).text_chunk == "один "
    await turn.aclose()
    assert list(rig.manager.active_context.messages) == [msg("user", "Вопрос")]
    assert rig.client.closed_streams == 1
    (closed,) = events("user_turn_closed")
    assert closed == {"turn": 1, "reason": "consumer_closed", "chunks": 2, "rolled_back": False}
    assert not events("user_turn_finish")
    await run(rig.manager, "Снова")  # the next turn is not blocked
    assert rig.manager.active_context.message_count == 3


async def test_early_close_before_text_rolls_back(make_rig: Any) -> None:
    rig = make_rig()
    async with contextlib.aclosing(rig.manager.process_user_turn("Вопрос")) as turn:
        async for chunk in turn:
            assert chunk.text_chunk == ""
            break
    assert rig.manager.active_context.message_count == 0
    assert rig.manager.last_turn_metrics is not None and rig.manager.last_turn_metrics.rolled_back


async def test_cancelling_the_consumer_rolls_back(make_rig: Any, events: Events) -> None:
    paused = reply("долгий ответ", pause_after=1)
    rig = make_rig(replies=[paused])

    async def consume() -> None:
        await run(rig.manager, "Вопрос")

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(paused.paused.wait(), timeout=2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.manager.active_context.message_count == 0
    assert events("user_turn_closed")[0]["reason"] == "cancelled"


async def test_rollback_discards_a_warmup_whose_snapshot_holds_the_message(
    make_rig: Any, events: Events
) -> None:
    gate = asyncio.Event()
    rig = make_rig(summary_gate=gate, replies=[reply(line("a1")), reply("x", error=LLMTimeoutError("t"))])
    await run_turns(rig.manager, "u1")
    with pytest.raises(LLMTimeoutError):
        await run(rig.manager, line("u2", 40))  # 0.485 once added: the warm-up snapshot includes it
    assert events("warmup_start")[0]["messages"] == 3
    (cancelled,) = events("warmup_cancelled")
    assert cancelled["reason"] == "rollback"
    assert contents(rig.manager.active_context) == ["u1", "a1"]
    assert state_of(rig) is StandbyState.NONE


# -- summaries and their cache -----------------------------------------------------------------------------


HISTORY = [msg("user", "Мой полис 42"), msg("assistant", "Нашёл его"), msg("user", "Продлите")]


async def test_summary_cache_miss_then_hit(make_rig: Any, events: Events) -> None:
    cache = FakeCache()
    first = make_rig(cache=cache)
    assert await first.manager.summarize(HISTORY) == SUMMARY
    assert len(first.client.text_calls) == 1
    key = summary_key(SESSION)
    (check,) = events("summary_cache_check")
    assert check["key"] == key and check["hit"] is False and check["latency_ms"] >= 0
    (save,) = events("summary_cache_save")
    assert save["key"] == key and save["bytes"] == len(cache.texts[key]) and save["latency_ms"] >= 0
    assert cache.ttls[key] == 600
    (stored,) = decode_records(cache.texts[key])
    assert stored.summary == SUMMARY and stored.covers_messages == 3 and stored.model == "summary-model"

    second = make_rig(cache=cache)  # the same session, replayed
    assert await second.manager.summarize(HISTORY) == SUMMARY
    assert second.client.text_calls == []
    assert events("summary_cache_check")[-1]["hit"] is True


async def test_cached_summary_is_never_used_for_a_history_it_does_not_cover(
    make_rig: Any, events: Events
) -> None:
    cache = FakeCache()
    rig = make_rig(cache=cache, summaries=["s1", "s2", "s3", "s4"])
    assert await rig.manager.summarize(HISTORY) == "s1"
    assert await rig.manager.summarize([*HISTORY, msg("assistant", "Готово")]) == "s2"  # longer
    assert await rig.manager.summarize([*HISTORY[:2], msg("user", "Отмените")]) == "s3"  # same length
    assert await rig.manager.summarize(HISTORY) == "s1"  # still there, still exact
    assert [e["hit"] for e in events("summary_cache_check")] == [False, False, False, True]
    assert len(decode_records(cache.texts[summary_key(SESSION)])) == 3

    # A record whose digest matches but which says it covers another number of messages is refused.
    request = rig.manager.active_context.build_summary_prompt(HISTORY)
    forged = SummaryRecord(summary="чужое", covers_messages=99, digest=history_digest(request), model="m")
    cache.texts[summary_key("other-call")] = forged.encode()
    other = make_rig(cache=cache, session="other-call")
    assert await other.manager.summarize(HISTORY) == SUMMARY

    # The same messages in a context that started from another summary are another history.
    resumed = make_rig(cache=cache, summary="Ранее: клиент Пётр.")
    assert await resumed.manager.summarize(HISTORY) == SUMMARY
    assert len(resumed.client.text_calls) == 1


async def test_malformed_or_unavailable_cache_falls_back_to_the_model(make_rig: Any) -> None:
    cache = FakeCache()
    cache.texts[summary_key(SESSION)] = "{not json"
    rig = make_rig(cache=cache)
    assert await rig.manager.summarize(HISTORY) == SUMMARY
    assert len(decode_records(cache.texts[summary_key(SESSION)])) == 1  # overwritten with a valid value
    broken = FakeCache()
    broken.fail = True
    assert await make_rig(cache=broken).manager.summarize(HISTORY) == SUMMARY
    assert await make_rig(cache=_NO_CACHE).manager.summarize(HISTORY) == SUMMARY


async def test_empty_summary_is_a_failed_warmup(make_rig: Any, events: Events) -> None:
    rig = make_rig(summaries=["   "])
    with pytest.raises(LLMProtocolError):
        await rig.manager.summarize(HISTORY)


async def test_replaying_the_same_dialogue_hits_the_summary_cache(make_rig: Any, events: Events) -> None:
    cache = FakeCache()
    first = make_rig(cache=cache)
    await run_turns(first.manager, "u1", "u2")
    await first.controller.wait_warmup()
    assert len(first.client.text_calls) == 1

    replay = make_rig(cache=cache)
    await run_turns(replay.manager, "u1", "u2")
    await replay.controller.wait_warmup()
    assert replay.client.text_calls == []
    assert state_of(replay) is StandbyState.READY
    assert replay.controller.standby_context is not None
    assert replay.controller.standby_context.summary == SUMMARY
    assert [e["hit"] for e in events("summary_cache_check")] == [False, True]


# -- telemetry ---------------------------------------------------------------------------------------------


async def test_span_tree_and_metrics(make_rig: Any, otel: Otel) -> None:
    rig = make_rig()
    await run_turns(rig.manager, "u1", "u2")  # turn 2 starts the warm-up
    await rig.controller.wait_warmup()
    await run_turns(rig.manager, "u3", "u4")  # turn 4 begins with the handover
    await rig.manager.shutdown()  # ends the call span

    def attr(span: ReadableSpan, name: str) -> Any:
        return dict(span.attributes or {})[name]

    def parent(span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None
        by_id = {s.context.span_id: s for s in otel.spans() if s.context is not None}
        return by_id[span.parent.span_id]

    (call,) = otel.spans("voxcore.call")  # one call, one trace
    assert call.parent is None and attr(call, "gen_ai.conversation.id") == session_hash(SESSION)
    assert {s.context.trace_id for s in otel.spans() if s.context} == {call.context.trace_id}  # type: ignore[union-attr]
    turns = sorted(otel.spans("voxcore.turn"), key=lambda s: int(attr(s, "voxcore.turn.index")))
    assert [attr(s, "voxcore.turn.index") for s in turns] == [1, 2, 3, 4]
    assert all(parent(t) is call for t in turns)

    chats = otel.spans("chat main-model")
    assert len(chats) == 4 and all(parent(c) in turns for c in chats)
    assert sorted(attr(parent(c), "voxcore.turn.index") for c in chats) == [1, 2, 3, 4]

    (summary,) = otel.spans("voxcore.summary")
    assert parent(summary) is call  # a background summary: in the call's trace, linked to its turn
    assert [link.context.span_id for link in summary.links] == [turns[1].context.span_id]  # type: ignore[union-attr]
    for child in ("voxcore.summary_cache.check", "voxcore.summary_cache.save", "chat summary-model"):
        (span,) = otel.spans(child)
        assert parent(span) is summary, child
    (check,) = otel.spans("voxcore.summary_cache.check")
    assert check.attributes is not None and check.attributes["voxcore.summary_cache.hit"] is False

    (handover,) = otel.spans("voxcore.handover")
    assert parent(handover) is turns[3]

    for span in turns:
        attributes = dict(span.attributes or {})
        assert attributes["voxcore.session.hash"] == session_hash(SESSION)
        assert SESSION not in attributes.values()
        assert {"voxcore.context.ratio_before", "voxcore.context.ratio_after"} <= set(attributes)
        assert float(attributes["voxcore.turn.time_to_first_token_ms"]) >= 0  # type: ignore[arg-type]
    assert [dict(s.attributes or {})["voxcore.turn.handover"] for s in turns] == [False, False, False, True]

    (usage,) = otel.points("voxcore.llm.context.usage_ratio")
    assert usage.count == 4 and otel.unit("voxcore.llm.context.usage_ratio") == "1"


async def test_failed_turn_span_records_the_error(make_rig: Any, otel: Otel) -> None:
    rig = make_rig(replies=[reply("x", error=LLMServerError("boom", status=500))])
    with pytest.raises(LLMServerError):
        await run(rig.manager, "Вопрос")
    (span,) = otel.spans("voxcore.turn")
    assert span.status.status_code is trace.StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


async def test_turn_span_is_current_only_inside_the_manager(make_rig: Any, otel: Otel) -> None:
    rig = make_rig()
    async for _chunk in rig.manager.process_user_turn("Привет"):
        # The consumer's own code must not run inside the turn span.
        assert not trace.get_current_span().get_span_context().is_valid
    (chat,) = otel.spans("chat main-model")
    assert chat.parent is not None
