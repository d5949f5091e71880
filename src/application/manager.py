"""Conversation manager: one call's user turns in, streamed structured answers out, summaries cache-first."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Link, Status, StatusCode
from pydantic import BaseModel

from voxcore.application.context import LLMContext
from voxcore.application.dialogue import DialogueRecorder
from voxcore.application.dual_context import DualContextController
from voxcore.application.live_events import CallEvents
from voxcore.core.domain.keys import session_hash, summary_key
from voxcore.core.domain.models import (
    ConversationHistory,
    ConversationMessage,
    LLMStreamChunk,
    LLMStructuredResponse,
    make_message,
)
from voxcore.core.domain.summary import (
    SummaryRecord,
    decode_records,
    encode_records,
    find_covering,
    history_digest,
    remember,
)
from voxcore.core.ports.cache import AbstractCache
from voxcore.core.ports.errors import LLMError, LLMProtocolError
from voxcore.core.ports.llm import (
    AbstractConversationManager,
    AbstractLLMClient,
    GenerationResult,
    LLMConnectionManager,
)
from voxcore.events import emit

logger = logging.getLogger("voxcore.llm.manager")

_tracer = trace.get_tracer("voxcore.conversation")
_meter = metrics.get_meter("voxcore.conversation")

TurnOutcome = Literal["ok", "failed", "closed"]

#: Span attributes that carry user or model text (recorded only with ``record_text``). Each span
#: that has them lists them in :data:`REDACTABLE_ATTRIBUTE`, so a collector can drop them by name.
TEXT_ATTRIBUTES = ("gen_ai.input.messages", "gen_ai.output.messages")
REDACTABLE_ATTRIBUTE = "voxcore.redactable_attributes"


def start_call_span(
    tracer: trace.Tracer, session_hash_: str, attributes: dict[str, Any] | None = None
) -> trace.Span:
    """The ``voxcore.call`` span of one call: a child of the span current now (a host's), if any."""
    return tracer.start_span(
        "voxcore.call",
        kind=trace.SpanKind.INTERNAL,
        attributes={
            "gen_ai.conversation.id": session_hash_,
            "voxcore.session.hash": session_hash_,
            **(attributes or {}),
        },
    )


@dataclass(frozen=True, slots=True)
class TurnMetrics:
    """The numbers of one turn (for probes and reports).

    Attributes:
        turn: 1-based index of the turn in this conversation.
        outcome: ``ok``; ``failed`` (an error ended it); ``closed`` (the consumer stopped early or
            the task was cancelled).
        time_to_first_token_ms: Request sent -> first streamed token, as the client measured it (also
            for a turn that failed or was closed after it; ``None`` when no token came, or the client
            does not know).
        client_ttft_ms: The same value as ``time_to_first_token_ms`` (the name it had before).
        time_to_first_text_ms: Turn start -> first speakable answer character handed to the consumer
            (the unsafe reply counts; ``None`` when none was).
        server_deltas: Content deltas the server streamed (``None`` when the turn did not complete).
        stream_total_ms: Request sent -> end of the stream, as the client measured it (``None`` likewise).
        response_total_ms: Turn start -> end of the stream (or of the turn, when it did not finish).
        context_ratio_before: Active context's usage ratio when the turn started.
        context_ratio_after: Active context's usage ratio when the turn ended.
        prompt_ratio: Usage ratio of the prompt that was sent.
        handover_ms: Duration of a handover performed during the turn, if any.
        chunks: Chunks yielded to the consumer (the final one included).
        connection_reused: Whether the client reused an open connection, when it knows.
        unsafe: The model flagged the user's message as unsafe (the unsafe reply was spoken).
        rolled_back: The turn's user message was removed from the history again.
        error_type: Class name of the error that ended the turn, if any.
    """

    turn: int
    outcome: TurnOutcome
    time_to_first_token_ms: float | None
    client_ttft_ms: float | None
    response_total_ms: float
    context_ratio_before: float
    context_ratio_after: float
    prompt_ratio: float
    handover_ms: float | None
    chunks: int
    connection_reused: bool | None
    unsafe: bool
    rolled_back: bool
    error_type: str | None = None
    time_to_first_text_ms: float | None = None
    server_deltas: int | None = None
    stream_total_ms: float | None = None


@dataclass(slots=True)
class _Turn:
    """Mutable bookkeeping of the turn in progress."""

    index: int
    started: float
    ratio_before: float = 0.0
    prompt_ratio: float = 0.0
    handovers_before: int = 0
    ttft_ms: float | None = None  # request sent -> first token (the client's measure)
    first_text_ms: float | None = None  # turn start -> first speakable character
    server_deltas: int | None = None
    stream_total_ms: float | None = None
    streamed: bool = False  # the client's stream of this turn was created
    connection_reused: bool | None = None
    total_ms: float | None = None
    chunks: int = 0
    parts: list[str] = field(default_factory=list)
    spoken: bool = False  # answer text has reached the consumer
    unsafe: bool = False
    user_message: ConversationMessage | None = None
    previous_result: GenerationResult | None = None


@functools.lru_cache(maxsize=16)
def _usage_histogram(meter: metrics.Meter) -> metrics.Histogram:
    # One instrument per meter: a proxy meter keeps every instrument it ever made.
    return meter.create_histogram(
        "voxcore.llm.context.usage_ratio", unit="1", description="Context usage ratio of each turn's prompt."
    )


class ConversationManager(AbstractConversationManager):
    """One call's conversation: connection -> client -> dual context -> context (SPEC-LLM-1 §4.5).

    Each :meth:`process_user_turn` adds the user's text, streams the structured answer and adds the
    full reply to the context that is active when the answer has ended. Warm-ups of the standby
    context run in the background through :meth:`summarize`, which reads the session's summary
    cache first and asks the summary model only on a miss.

    A turn never leaves half of itself in the history. If it ends early (an ``LLMError``, another
    error, the consumer closing the generator, cancellation), no assistant message is added, and
    the user message is removed again when no answer text had reached the consumer yet, so the
    caller may simply retry the turn. Once answer text was forwarded the user message stays: the
    caller heard part of an answer to it.

    Args:
        connection_manager: Hands out the call's warm HTTP client.
        llm_client: Streams answers and writes summaries.
        dual_context: The call's dual-context controller; its summarizer is bound to
            :meth:`summarize` unless it already has one.
        session_id: The call's id (only its hash appears in keys, logs and spans).
        main_model: Model that answers turns.
        summary_model: Model that writes summaries.
        cache: Summary cache, or ``None`` to always ask the model.
        summary_ttl_seconds: Lifetime of a cached summary.
        summary_max_tokens: Output budget of a summary.
        unsafe_reply: Spoken instead of the model's answer when it flags the user's message unsafe.
        response_model: Shape of the structured answer.
        clock: Monotonic seconds, for the durations in events.
        tracer: OpenTelemetry tracer (default: the ``voxcore.conversation`` one).
        meter: OpenTelemetry meter (default: the ``voxcore.conversation`` one).
        call_span: The call's ``voxcore.call`` span (the container starts it before the
            handshake); by default the manager starts one, a child of the span current now.
            Every turn and summary of the call is in its trace; :meth:`shutdown` ends it.
        record_text: Put the user's and the model's text on turn spans (attributes listed in
            :data:`TEXT_ATTRIBUTES`, marked droppable); off by default.
        dialogue: Writes completed turns to the dialogue cache in the background (``None``: not kept).
        events: Publishes the call's live events (``None``: none).

    Raises:
        ValueError: an empty model name or unsafe reply, or a non-positive TTL or token budget.
        InvalidKeyError: ``session_id`` is empty.
    """

    def __init__(
        self,
        *,
        connection_manager: LLMConnectionManager[Any],
        llm_client: AbstractLLMClient[Any],
        dual_context: DualContextController,
        session_id: str,
        main_model: str,
        summary_model: str,
        cache: AbstractCache | None,
        summary_ttl_seconds: int,
        summary_max_tokens: int,
        unsafe_reply: str,
        response_model: type[BaseModel] = LLMStructuredResponse,
        clock: Callable[[], float] = time.perf_counter,
        tracer: trace.Tracer | None = None,
        meter: metrics.Meter | None = None,
        call_span: trace.Span | None = None,
        record_text: bool = False,
        dialogue: DialogueRecorder | None = None,
        events: CallEvents | None = None,
    ) -> None:
        for name, value in (("main_model", main_model), ("summary_model", summary_model)):
            if not value:
                raise ValueError(f"{name} must not be empty")
        if not unsafe_reply.strip():
            raise ValueError("unsafe_reply must not be empty")
        if summary_ttl_seconds <= 0 or summary_max_tokens <= 0:
            raise ValueError("summary_ttl_seconds and summary_max_tokens must be positive")
        self._connection_manager = connection_manager
        self._llm_client = llm_client
        self._dual = dual_context
        self._session_hash = session_hash(session_id)
        self._summary_key = summary_key(session_id)
        self._main_model = main_model
        self._summary_model = summary_model
        self._cache = cache
        self._summary_ttl = summary_ttl_seconds
        self._summary_max_tokens = summary_max_tokens
        self._unsafe_reply = unsafe_reply
        self._response_model = response_model
        self._clock = clock
        self._tracer = tracer if tracer is not None else _tracer
        self._usage_ratio = _usage_histogram(meter if meter is not None else _meter)
        self._turns = 0
        self._open_turn_index: int | None = None  # the turn whose generator is still open
        self._closed = False
        self._last_metrics: TurnMetrics | None = None
        self._record_text = record_text
        self._call_span = (
            call_span if call_span is not None else start_call_span(self._tracer, self._session_hash)
        )
        self._call_context = trace.set_span_in_context(self._call_span)
        self._dialogue = dialogue
        self._events = events
        if dual_context.summarizer is None:
            dual_context.bind_summarizer(self.summarize)

    # -- probes ----------------------------------------------------------------------------------------

    @property
    def active_context(self) -> LLMContext:
        """The context the next turn is answered from."""
        return self._dual.active_context

    @property
    def standby_context(self) -> LLMContext | None:
        """The ready standby context, if any."""
        return self._dual.standby_context

    @property
    def dual_context(self) -> DualContextController:
        """The dual-context controller."""
        return self._dual

    @property
    def turns(self) -> int:
        """Turns started so far."""
        return self._turns

    @property
    def last_turn_metrics(self) -> TurnMetrics | None:
        """The numbers of the most recent turn that has ended."""
        return self._last_metrics

    @property
    def session_hash(self) -> str:
        """The 16-hex hash of the session id (what logs and spans show)."""
        return self._session_hash

    @property
    def call_span(self) -> trace.Span:
        """The call's ``voxcore.call`` span: pass it as the parent of work done for this call
        (e.g. ``responder.play(playlist, parent=manager.call_span)``)."""
        return self._call_span

    @property
    def trace_id(self) -> str | None:
        """The call's trace id (32 hex), or ``None`` when no tracing SDK is installed."""
        context = self._call_span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None
    def dialogue(self) -> DialogueRecorder | None:
        """The writer of this call's turns to the dialogue cache, if kept."""
        return self._dialogue

    @property
    def events(self) -> CallEvents | None:
        """This call's live events (a host adds its own, e.g. ``audio_started``), if published."""
        return self._events

    # -- turns -----------------------------------------------------------------------------------------

    async def process_user_turn(self, final_user_text: str) -> AsyncGenerator[LLMStreamChunk, None]:
        """Add the user's text, stream the answer, and end with a chunk marked ``is_final_chunk``.

        The first chunk carries ``is_safe``/``aggression_score``. When the model flags the message
        unsafe, its answer is never forwarded: the configured unsafe reply is yielded (and stored)
        instead. Close the generator (``aclose``, or ``contextlib.aclosing``) to stop early.

        Args:
            final_user_text: What the user said (the final transcript).

        Yields:
            Answer chunks, then ``LLMStreamChunk(text_chunk="", is_final_chunk=True)``.

        Raises:
            LLMError: the provider failed; the turn is rolled back as the class docstring says.
            ValueError: ``final_user_text`` is not a string.
            RuntimeError: the manager is shut down, or another turn is still open.
        """
        if self._closed:
            raise RuntimeError("the conversation manager is shut down")
        if self._open_turn_index is not None:
            raise RuntimeError("a turn is still open: close its generator (aclose) before starting the next")
        user_message = make_message("user", final_user_text)
        self._turns += 1
        self._open_turn_index = self._turns
        turn = _Turn(index=self._turns, started=self._clock())
        # The turn belongs to the call's trace; a host span current now (an HTTP request's) is linked.
        links = self._links_to_current()
        span = self._tracer.start_span(
            "voxcore.turn",
            context=self._call_context,
            links=links,
            attributes={
                "gen_ai.conversation.id": self._session_hash,
                "voxcore.session.hash": self._session_hash,
                "voxcore.turn.index": turn.index,
            },
        )
        if self._record_text and span.is_recording():
            span.set_attribute("gen_ai.input.messages", final_user_text)
            span.set_attribute(REDACTABLE_ATTRIBUTE, list(TEXT_ATTRIBUTES))
        stream: AsyncIterator[LLMStreamChunk] | None = None
        committed = False
        try:
            # The span is made current only around code that awaits the client, never across a
            # yield: a context attached across a yield would leak into the consumer's code.
            with self._current(span):
                stream = await self._open_turn(turn, user_message)
                chunk = await _next_chunk(stream)
            first = True
            while chunk is not None:
                out: LLMStreamChunk | None = None
                if first:
                    first = False
                    if chunk.is_safe is False:
                        # Close the model's stream before anything is spoken: not one character of
                        # the answer to an unsafe message may reach the caller.
                        turn.unsafe = True
                        with self._current(span):
                            await _close_stream(stream)
                        stream = None
                        turn.parts = [self._unsafe_reply]
                        turn.spoken = True
                        self._first_text(turn, span)
                        turn.chunks += 1
                        if self._events is not None:
                            self._events.answer_delta(self._unsafe_reply)
                        yield LLMStreamChunk(
                            text_chunk=self._unsafe_reply,
                            is_safe=False,
                            aggression_score=chunk.aggression_score,
                        )
                        break
                    out = LLMStreamChunk(
                        text_chunk=chunk.text_chunk,
                        is_safe=chunk.is_safe,
                        aggression_score=chunk.aggression_score,
                    )
                elif chunk.text_chunk:
                    out = LLMStreamChunk(text_chunk=chunk.text_chunk)
                if out is not None:
                    text = out.text_chunk
                    if text:
                        turn.parts.append(text)
                        turn.spoken = True
                        if turn.first_text_ms is None and not text.isspace():
                            self._first_text(turn, span)
                        if self._events is not None:
                            self._events.answer_delta(text)
                    turn.chunks += 1
                    yield out
                with self._current(span):
                    chunk = await _next_chunk(stream)
            stream = None
            turn.total_ms = self._ms_since(turn.started)
            with self._current(span):
                self._commit(turn)
                committed = True
                self._last_metrics = self._finish(turn, span)
            # The turn is over before its final chunk goes out: a consumer that stops at that chunk
            # without closing the generator neither holds the span open nor blocks the next turn.
            self._release(turn, span)
            yield LLMStreamChunk(text_chunk="", is_final_chunk=True)
        except BaseException as exc:
            if not committed:
                with self._current(span):
                    self._abandon(turn, span, exc)
            raise
        finally:
            if stream is not None:
                await _close_stream(stream)
            self._release(turn, span)

    def _first_text(self, turn: _Turn, span: trace.Span) -> None:
        turn.first_text_ms = self._ms_since(turn.started)
        span.set_attribute("voxcore.turn.time_to_first_text_ms", turn.first_text_ms)
        with self._current(span):
            emit(logger, "time_to_first_text_ms", logging.DEBUG, turn=turn.index, ms=turn.first_text_ms)

    def record_answered_turn(self, final_user_text: str, answer_text: str, *, source: str) -> None:
        """Add a turn answered without the LLM (e.g. a FAQ recording) to the history.

        The next LLM turn then sees what the caller asked and heard, as if the model had answered.

        Args:
            final_user_text: What the user said.
            answer_text: What the caller heard.
            source: Who answered (logged as ``source``, e.g. ``faq``).

        Raises:
            RuntimeError: the manager is shut down, or a turn is still open.
            ValueError: a text is not a string.
        """
        if self._closed:
            raise RuntimeError("the conversation manager is shut down")
        if self._open_turn_index is not None:
            raise RuntimeError("a turn is still open: close its generator (aclose) before recording another")
        user_message = make_message("user", final_user_text)
        answer = make_message("assistant", answer_text)
        self._turns += 1
        dual = self._dual
        dual.begin_turn()
        stored_user = dual.active_context.append(user_message)
        dual.after_message()
        stored_answer = dual.active_context.append(answer)
        dual.after_message()
        emit(logger, "user_turn_answered", turn=self._turns, source=source, chars=len(answer_text))
        if self._dialogue is not None:
            self._record((stored_user, stored_answer), {"turn": self._turns, "source": source})
        if self._events is not None:
            self._events.turn_started(self._turns, user_message["content"])
            self._events.answer_delta(answer_text)
            self._events.turn_finished({"turn": self._turns, "outcome": "ok", "source": source})

    def _release(self, turn: _Turn, span: trace.Span) -> None:
        if span.is_recording():
            span.end()
        if self._open_turn_index == turn.index:
            self._open_turn_index = None

    async def _open_turn(
        self, turn: _Turn, user_message: ConversationMessage
    ) -> AsyncIterator[LLMStreamChunk]:
        """Boundary work, the user message, the prompt and the request; returns the client's stream."""
        dual = self._dual
        turn.ratio_before = dual.active_context.estimate_usage_ratio()
        turn.handovers_before = dual.handovers
        emit(logger, "user_turn_start", logging.DEBUG, turn=turn.index, ratio=turn.ratio_before)
        dual.begin_turn()
        turn.user_message = dual.active_context.append(user_message)
        if self._events is not None:
            self._events.turn_started(turn.index, user_message["content"])
            if dual.handovers != turn.handovers_before and dual.last_handover is not None:
                self._events.handover(**dataclasses.asdict(dual.last_handover))
        dual.after_message()  # may start a warm-up task; never awaited here
        context = dual.active_context
        prompt = context.build_prompt()
        turn.prompt_ratio = context.estimate_usage_ratio()
        self._usage_ratio.record(turn.prompt_ratio)
        http_client = await self._connection_manager.get_client()
        turn.previous_result = self._llm_client.last_result
        stream = self._llm_client.stream_structured_generate(
            http_client, prompt, self._main_model, self._response_model
        )
        turn.streamed = True
        return stream

    def _commit(self, turn: _Turn) -> None:
        """Add the full reply to the context active now (a handover may have happened meanwhile)."""
        result = self._llm_client.last_result
        if result is not None and result is not turn.previous_result:
            turn.ttft_ms = result.ttft_ms
            turn.connection_reused = result.connection_reused
            turn.server_deltas = result.chunks
            turn.stream_total_ms = result.total_ms
        elif turn.streamed:  # closed early (an unsafe answer): the first token still came
            turn.ttft_ms = self._llm_client.last_ttft_ms
        answer = self._dual.active_context.append(make_message("assistant", "".join(turn.parts)))
        self._dual.after_message()
        if self._dialogue is not None and turn.user_message is not None:
            self._record(
                (turn.user_message, answer),
                {
                    "turn": turn.index,
                    "time_to_first_token_ms": turn.ttft_ms,
                    "response_total_ms": turn.total_ms,
                    "unsafe": turn.unsafe,
                },
            )

    def _finish(self, turn: _Turn, span: trace.Span) -> TurnMetrics:
        ratio_after = self._dual.active_context.estimate_usage_ratio()
        handover_ms = self._handover_ms(turn)
        total_ms = turn.total_ms if turn.total_ms is not None else self._ms_since(turn.started)
        turn.chunks += 1  # the final chunk, yielded right after this
        emit(logger, "response_total_ms", logging.DEBUG, turn=turn.index, ms=total_ms)
        emit(
            logger,
            "context_usage",
            logging.DEBUG,
            turn=turn.index,
            before=turn.ratio_before,
            after=ratio_after,
        )
        # The turn's one INFO line: every figure of the turn (the per-step events above are DEBUG).
        emit(
            logger,
            "user_turn_finish",
            turn=turn.index,
            outcome="ok",
            session_hash=self._session_hash,
            time_to_first_token_ms=turn.ttft_ms,
            time_to_first_text_ms=turn.first_text_ms,
            client_ttft_ms=turn.ttft_ms,
            response_total_ms=total_ms,
            context_ratio_before=turn.ratio_before,
            context_ratio_after=ratio_after,
            prompt_ratio=turn.prompt_ratio,
            handover_ms_if_any=handover_ms,
            chunks=turn.chunks,
            answer_chars=sum(len(part) for part in turn.parts),
            connection_reused=turn.connection_reused,
            unsafe=turn.unsafe,
        )
        if self._record_text and span.is_recording():
            span.set_attribute("gen_ai.output.messages", "".join(turn.parts))
        span.set_attribute("voxcore.context.ratio_before", turn.ratio_before)
        span.set_attribute("voxcore.context.ratio_after", ratio_after)
        span.set_attribute("voxcore.turn.handover", handover_ms is not None)
        span.set_attribute("voxcore.turn.unsafe", turn.unsafe)
        if turn.ttft_ms is not None:
            span.set_attribute("voxcore.turn.time_to_first_token_ms", turn.ttft_ms)
            emit(logger, "time_to_first_token_ms", logging.DEBUG, turn=turn.index, ms=turn.ttft_ms)
        metrics = self._metrics(turn, "ok", ratio_after, total_ms, handover_ms, rolled_back=False)
        if self._events is not None:
            self._events.turn_finished(dataclasses.asdict(metrics))
        return metrics

    def _abandon(self, turn: _Turn, span: trace.Span, exc: BaseException) -> None:
        """End a turn that did not complete: roll it back as documented, log and record why."""
        rolled_back = False
        if turn.streamed and turn.ttft_ms is None:  # a stream that failed after its first token
            turn.ttft_ms = self._llm_client.last_ttft_ms
        if turn.user_message is not None and not turn.spoken:
            rolled_back = self._dual.retract(turn.user_message)
        ratio_after = self._dual.active_context.estimate_usage_ratio()
        handover_ms = self._handover_ms(turn)
        span.set_attribute("voxcore.context.ratio_before", turn.ratio_before)
        span.set_attribute("voxcore.context.ratio_after", ratio_after)
        span.set_attribute("voxcore.turn.handover", handover_ms is not None)
        outcome: TurnOutcome
        error_type: str | None
        if isinstance(exc, GeneratorExit | asyncio.CancelledError):
            outcome, error_type = "closed", None
            emit(
                logger,
                "user_turn_closed",
                turn=turn.index,
                reason="cancelled" if isinstance(exc, asyncio.CancelledError) else "consumer_closed",
                chunks=turn.chunks,
                rolled_back=rolled_back,
            )
        else:
            outcome, error_type = "failed", type(exc).__name__
            emit(
                logger,
                "user_turn_failed",
                logging.WARNING,
                turn=turn.index,
                error_type=error_type,
                message=str(exc),
                transient=exc.transient if isinstance(exc, LLMError) else False,
                retry_after=getattr(exc, "retry_after", None) if isinstance(exc, LLMError) else None,
                rolled_back=rolled_back,
                chunks=turn.chunks,
            )
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{error_type}: {exc}"))
        self._last_metrics = self._metrics(
            turn, outcome, ratio_after, self._ms_since(turn.started), handover_ms, rolled_back, error_type
        )
        if turn.user_message is not None and not rolled_back and self._dialogue is not None:
            # The user message stays in the context (the caller heard part of an answer): keep it.
            self._record((turn.user_message,), {"turn": turn.index, "outcome": outcome})
        if self._events is not None:
            if error_type is not None:
                self._events.error(error_type, str(exc))
            self._events.turn_finished(dataclasses.asdict(self._last_metrics))

    def _record(self, messages: tuple[ConversationMessage, ...], figures: dict[str, Any]) -> None:
        """Hand the messages the active context kept to the dialogue cache's background writer."""
        assert self._dialogue is not None
        context = self._dual.active_context
        self._dialogue.record(
            messages, history_length=context.message_count, summary=context.summary, figures=figures
        )

    def _metrics(
        self,
        turn: _Turn,
        outcome: TurnOutcome,
        ratio_after: float,
        total_ms: float,
        handover_ms: float | None,
        rolled_back: bool,
        error_type: str | None = None,
    ) -> TurnMetrics:
        return TurnMetrics(
            turn=turn.index,
            outcome=outcome,
            time_to_first_token_ms=turn.ttft_ms,
            time_to_first_text_ms=turn.first_text_ms,
            client_ttft_ms=turn.ttft_ms,
            response_total_ms=total_ms,
            context_ratio_before=turn.ratio_before,
            context_ratio_after=ratio_after,
            prompt_ratio=turn.prompt_ratio,
            handover_ms=handover_ms,
            chunks=turn.chunks,
            connection_reused=turn.connection_reused,
            unsafe=turn.unsafe,
            rolled_back=rolled_back,
            error_type=error_type,
            server_deltas=turn.server_deltas,
            stream_total_ms=turn.stream_total_ms,
        )

    def _handover_ms(self, turn: _Turn) -> float | None:
        report = self._dual.last_handover
        if self._dual.handovers == turn.handovers_before or report is None:
            return None
        return report.handover_ms

    # -- summaries -------------------------------------------------------------------------------------

    async def summarize(self, history: Sequence[ConversationMessage]) -> str:
        """A summary of ``history``: from the session's cache when a record covers exactly it, else the LLM.

        What is summarized (and digested for the cache) is the whole summary request of the active
        context: the summarization prompt, the summary that context started from, and ``history``.
        A cached record is used only when its digest and message count match, so a summary is
        never reused for a history it does not cover.

        Raises:
            LLMError: the summary model failed or returned no text.
        """
        snapshot: ConversationHistory = list(history)
        # A background summary belongs to the call's trace, linked to the turn that set it off.
        links = self._links_to_current()
        with self._tracer.start_as_current_span(
            "voxcore.summary", context=self._call_context, links=links
        ) as span:
            request = self._dual.active_context.build_summary_prompt(snapshot)
            digest = history_digest(request)
            span.set_attribute("voxcore.summary.messages", len(snapshot))
            records: tuple[SummaryRecord, ...] = ()
            if self._cache is not None:
                records, cached = await self._cache_check(digest, len(snapshot))
                span.set_attribute("voxcore.summary.cache_hit", cached is not None)
                if cached is not None:
                    return cached.summary
            start = self._clock()
            http_client = await self._connection_manager.get_client()
            text = await self._llm_client.generate_text(
                http_client, request, self._summary_model, max_tokens=self._summary_max_tokens
            )
            summary = text.strip()
            if not summary:
                raise LLMProtocolError(f"the summary model {self._summary_model!r} returned no text")
            emit(
                logger,
                "summary_generated",
                model=self._summary_model,
                ms=self._ms_since(start),
                chars=len(summary),
                messages=len(snapshot),
            )
            if self._cache is not None:
                record = SummaryRecord(
                    summary=summary, covers_messages=len(snapshot), digest=digest, model=self._summary_model
                )
                await self._cache_save(remember(records, record))
            return summary

    async def _cache_check(
        self, digest: str, messages: int
    ) -> tuple[tuple[SummaryRecord, ...], SummaryRecord | None]:
        assert self._cache is not None
        with self._tracer.start_as_current_span("voxcore.summary_cache.check") as span:
            start = self._clock()
            text = await self._cache.get_text(self._summary_key)
            records = decode_records(text) if text is not None else ()
            cached = find_covering(records, digest=digest, messages=messages)
            span.set_attribute("voxcore.summary_cache.hit", cached is not None)
            if self._events is not None:
                self._events.summary_cache(hit=cached is not None, messages=messages)
            emit(
                logger,
                "summary_cache_check",
                logging.DEBUG,
                key=self._summary_key,
                hit=cached is not None,
                latency_ms=self._ms_since(start),
                stored_records=len(records),
            )
            return records, cached

    async def _cache_save(self, records: tuple[SummaryRecord, ...]) -> None:
        assert self._cache is not None
        with self._tracer.start_as_current_span("voxcore.summary_cache.save") as span:
            value = encode_records(records)
            size = len(value.encode("utf-8"))
            start = self._clock()
            ok = await self._cache.set_text(self._summary_key, value, self._summary_ttl)
            span.set_attribute("voxcore.summary_cache.bytes", size)
            span.set_attribute("voxcore.summary_cache.ok", ok)
            emit(
                logger,
                "summary_cache_save",
                logging.DEBUG,
                key=self._summary_key,
                bytes=size,
                latency_ms=self._ms_since(start),
                ok=ok,
            )

    # -- lifecycle -------------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Cancel the warm-up in flight and close the call's connections; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        token = otel_context.attach(self._call_context)
        try:
            await self._dual.shutdown()
        finally:
            try:
                try:
                    await self._connection_manager.shutdown()
                finally:
                    if self._dialogue is not None:
                        await self._dialogue.aclose()  # pending turns are written first (bounded wait)
                    if self._events is not None:
                        self._events.call_ended(turns=self._turns)
                emit(logger, "manager_shutdown", turns=self._turns)
            finally:
                otel_context.detach(token)
                self._call_span.set_attribute("voxcore.call.turns", self._turns)
                self._call_span.end()

    # -- helpers ---------------------------------------------------------------------------------------

    def _links_to_current(self) -> list[Link] | None:
        """A link to the span current now, unless it is the call's own (or there is none)."""
        current = trace.get_current_span().get_span_context()
        if current.is_valid and current != self._call_span.get_span_context():
            return [Link(current)]
        return None

    def _current(self, span: trace.Span) -> AbstractContextManager[trace.Span]:
        # Errors are recorded by _abandon, once, with the turn's own status message.
        return trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)

    def _ms_since(self, start: float) -> float:
        return (self._clock() - start) * 1000.0


async def _next_chunk(stream: AsyncIterator[LLMStreamChunk]) -> LLMStreamChunk | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def _close_stream(stream: AsyncIterator[LLMStreamChunk]) -> None:
    """Close the client's stream (an async generator, usually) so its connection is released."""
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception as exc:  # closing is best effort: the turn's outcome is already decided
        emit(logger, "stream_close_failed", logging.WARNING, error=repr(exc))
