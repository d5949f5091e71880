"""Dual context: a standby context is summarized in the background and takes over at a turn boundary."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import metrics, trace

from voxcore.application.context import LLMContext
from voxcore.core.domain.dual_context import (
    DualContextAction,
    DualContextPolicy,
    StandbyState,
    standby_history,
    warmup_retry_turn,
)
from voxcore.core.domain.models import ConversationHistory, ConversationMessage
from voxcore.events import emit

logger = logging.getLogger("voxcore.llm.dual")

_tracer = trace.get_tracer("voxcore.conversation")
_meter = metrics.get_meter("voxcore.conversation")

#: Makes a summary of a history snapshot (the conversation manager's cache-first summarizer).
Summarizer = Callable[[ConversationHistory], Awaitable[str]]

# Decisions taken per reaction at most: e.g. START_WARMUP then TRIM, or HANDOVER then START_WARMUP.
_MAX_ACTIONS = 4


class ContextFactory(Protocol):
    """Builds a context like the active one with other contents (default: :meth:`LLMContext.derive`)."""

    def __call__(
        self, *, history: Sequence[ConversationMessage], summary: str | None, name: str
    ) -> LLMContext: ...


@dataclass(frozen=True, slots=True)
class HandoverReport:
    """What one handover did.

    Attributes:
        handover_ms: Time the swap took (what it added to its turn).
        ms_since_ready: Time the standby waited between ``warmup_ready`` and the handover.
        ratio_before: Usage ratio of the context handed over from.
        ratio_after: Usage ratio of the new active context.
        delta_messages: Messages added after the snapshot and carried over.
    """

    handover_ms: float
    ms_since_ready: float
    ratio_before: float
    ratio_after: float
    delta_messages: int


@functools.lru_cache(maxsize=16)
def _handover_histogram(meter: metrics.Meter) -> metrics.Histogram:
    # One instrument per meter: a proxy meter keeps every instrument it ever made.
    return meter.create_histogram(
        "voxcore.dual_context.handover.duration", unit="s", description="Time a handover added to its turn."
    )


class DualContextController:
    """Keeps the active context small without ever making a turn wait for a summary.

    After each message the manager calls :meth:`after_message`. Once the active context's usage
    ratio reaches the warm-up threshold, one background task snapshots the history, summarizes it
    and builds the standby context (system prompt + summary + the snapshot's recent messages). At a
    turn boundary (:meth:`begin_turn`) a ready standby takes over once the active context reaches the
    handover threshold; the messages added since the snapshot are carried over, so nothing is lost.
    If the active context reaches the hard limit before a standby is ready, its oldest turns are
    dropped so the turn can still go ahead.

    A failed summary is logged (``warmup_failed``) and tried again at a later turn, waiting 1, 2,
    4… turns after consecutive failures.

    Args:
        active: The context the conversation starts in.
        policy: Thresholds and decisions.
        recent_messages: Messages of the snapshot kept verbatim in the standby.
        summarize: Summarizes a snapshot; may be bound later with :meth:`bind_summarizer` (the
            conversation manager binds its own). Without one, no warm-up starts.
        make_context: Builds the standby context (default: derive it from the active context).
        clock: Monotonic seconds, for the durations in events.
        max_background_tasks: Background tasks alive at once (a cancelled warm-up still counts
            until it has finished).
        tracer: OpenTelemetry tracer (default: the ``voxcore.conversation`` one).
        meter: OpenTelemetry meter (default: the ``voxcore.conversation`` one).

    Raises:
        ValueError: ``recent_messages`` is negative or ``max_background_tasks`` is below 1.
    """

    def __init__(
        self,
        *,
        active: LLMContext,
        policy: DualContextPolicy,
        recent_messages: int,
        summarize: Summarizer | None = None,
        make_context: ContextFactory | None = None,
        clock: Callable[[], float] = time.perf_counter,
        max_background_tasks: int = 1,
        tracer: trace.Tracer | None = None,
        meter: metrics.Meter | None = None,
    ) -> None:
        if recent_messages < 0:
            raise ValueError(f"recent_messages must be >= 0, got {recent_messages}")
        if max_background_tasks < 1:
            raise ValueError(f"max_background_tasks must be >= 1, got {max_background_tasks}")
        self._active = active
        self._policy = policy
        self._recent = recent_messages
        self._summarize = summarize
        self._make_context = make_context
        self._clock = clock
        self._max_tasks = max_background_tasks
        self._tracer = tracer if tracer is not None else _tracer
        self._handover_duration = _handover_histogram(meter if meter is not None else _meter)

        self._standby: LLMContext | None = None
        self._warmup_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._attempt = 0  # bumped to orphan a warm-up that was cancelled or discarded
        self._snapshot_mark = 0  # active.appended when the current standby's snapshot was taken
        self._warmup_started_at = 0.0
        self._ready_at = 0.0
        self._turn = 0
        self._failures = 0
        self._next_warmup_turn = 0
        self._handovers = 0
        self._last_handover: HandoverReport | None = None
        self._closed = False

    # -- state ---------------------------------------------------------------------------------------

    @property
    def active_context(self) -> LLMContext:
        """The context turns are answered from."""
        return self._active

    @property
    def standby_context(self) -> LLMContext | None:
        """The ready standby context, if any (without the messages it will take over)."""
        return self._standby

    @property
    def warmup_task(self) -> asyncio.Task[None] | None:
        """The warm-up in flight, if any."""
        return self._warmup_task

    @property
    def state(self) -> StandbyState:
        """Whether a standby is absent, being prepared, or ready."""
        if self._standby is not None:
            return StandbyState.READY
        if self._warmup_task is not None:
            return StandbyState.WARMING
        return StandbyState.NONE

    @property
    def policy(self) -> DualContextPolicy:
        """The thresholds in force."""
        return self._policy

    @property
    def handovers(self) -> int:
        """Handovers performed so far."""
        return self._handovers

    @property
    def last_handover(self) -> HandoverReport | None:
        """The most recent handover, if any."""
        return self._last_handover

    @property
    def summarizer(self) -> Summarizer | None:
        """The function warm-ups summarize with."""
        return self._summarize

    def bind_summarizer(self, summarize: Summarizer) -> None:
        """Set the summarizer (the conversation manager binds its cache-first one)."""
        self._summarize = summarize

    # -- reactions -------------------------------------------------------------------------------------

    def begin_turn(self) -> HandoverReport | None:
        """Mark a turn boundary: count the turn, hand over if due, start a due warm-up.

        Call before the turn's user message is added.

        Returns:
            The handover performed now, if any.
        """
        self._turn += 1
        before = self._handovers
        self._react(turn_boundary=True)
        return self._last_handover if self._handovers != before else None

    def after_message(self) -> tuple[DualContextAction, ...]:
        """React to a message just added to the active context; never waits for anything.

        May start a warm-up, hand over (only at the hard limit, the prompt not being built yet) or
        drop the oldest turns.

        Returns:
            The actions taken, in order.
        """
        return self._react(turn_boundary=False)

    def maybe_handover(self) -> HandoverReport | None:
        """Hand over now if a standby is ready and the active context is full enough.

        Call only between turns, or while no prompt is being built from the active context.
        """
        if self._standby is None:
            return None
        action = self._policy.decide(
            self._active.estimate_usage_ratio(),
            StandbyState.READY,
            turn_boundary=True,
            standby_ratio=self._projected_standby_ratio(),
        )
        return self._handover() if action is DualContextAction.HANDOVER else None

    def retract(self, message: ConversationMessage) -> bool:
        """Roll back ``message`` if it is the newest one of the active context.

        A warm-up whose snapshot contains the message is discarded (its summary and recent
        messages would hold it); a new one starts at a later message.

        Returns:
            True when the message was removed.
        """
        if not self._active.remove_last(message):
            return False
        if self.state is not StandbyState.NONE and self._snapshot_mark > self._active.appended:
            self._discard("rollback")
        return True

    async def wait_warmup(self) -> None:
        """Wait until the warm-up in flight (if any) has finished, whatever its outcome."""
        task = self._warmup_task
        if task is not None:
            await asyncio.wait({task})

    async def cancel(self) -> None:
        """Cancel the warm-up in flight (``warmup_cancelled``) and wait for it to finish."""
        self._discard("cancelled", keep_standby=True)
        await self._drain()

    async def shutdown(self) -> None:
        """Cancel background work, drop the standby and refuse new warm-ups; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._discard("shutdown")
        await self._drain()

    # -- internals -------------------------------------------------------------------------------------

    def _react(self, *, turn_boundary: bool) -> tuple[DualContextAction, ...]:
        taken: list[DualContextAction] = []
        for _ in range(_MAX_ACTIONS):
            action = self._policy.decide(
                self._active.estimate_usage_ratio(),
                self.state,
                turn_boundary=turn_boundary,
                warmup_allowed=self._warmup_allowed(),
                standby_ratio=self._projected_standby_ratio(),
            )
            if action is DualContextAction.NONE or action in taken:
                break
            taken.append(action)
            if action is DualContextAction.HANDOVER:
                self._handover()
            elif action is DualContextAction.START_WARMUP:
                self._start_warmup()
            elif not self._active.drop_oldest(target_ratio=self._policy.trim_target):
                break  # only the newest turn is left: the turn goes ahead as it is
        return tuple(taken)

    def _warmup_allowed(self) -> bool:
        return (
            not self._closed
            and self._summarize is not None
            and self._turn >= self._next_warmup_turn
            and len(self._tasks) < self._max_tasks
        )

    def _projected_standby_ratio(self) -> float | None:
        standby = self._standby
        if standby is None:
            return None
        carried = self._active.tokens_since(self._snapshot_mark)
        return (standby.tokens + carried) / standby.context_window_tokens

    def _start_warmup(self) -> None:
        summarize = self._summarize
        assert summarize is not None  # checked by _warmup_allowed
        if self._standby is not None:
            self._discard("stale")  # it would not shrink the context any more: summarize anew
        source = self._active
        snapshot = list(source.messages)
        self._attempt += 1
        self._snapshot_mark = source.appended
        self._warmup_started_at = self._clock()
        emit(
            logger,
            "warmup_start",
            logging.DEBUG,
            ratio=source.estimate_usage_ratio(),
            messages=len(snapshot),
            turn=self._turn,
        )
        # Created in the caller's context, so the summary's spans are children of the current turn.
        task = asyncio.create_task(
            self._warm_up(self._attempt, source, snapshot, summarize), name=f"voxcore-warmup-{self._attempt}"
        )
        self._warmup_task = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _warm_up(
        self, attempt: int, source: LLMContext, snapshot: ConversationHistory, summarize: Summarizer
    ) -> None:
        try:
            summary = (await summarize(snapshot)).strip()
            if not summary:
                raise ValueError("the summarizer returned an empty summary")
            history = standby_history(snapshot, recent=self._recent)
            factory = self._make_context if self._make_context is not None else source.derive
            standby = factory(history=history, summary=summary, name="standby")
        except Exception as exc:
            if attempt == self._attempt:
                self._warmup_task = None
                self._failures += 1
                self._next_warmup_turn = warmup_retry_turn(self._turn, self._failures)
                emit(
                    logger,
                    "warmup_failed",
                    logging.WARNING,
                    error=str(exc) or type(exc).__name__,
                    error_type=type(exc).__name__,
                    ms=self._ms_since(self._warmup_started_at),
                    failures=self._failures,
                    retry_turn=self._next_warmup_turn,
                )
            return
        if attempt != self._attempt or source is not self._active:
            return  # discarded while the summary was on its way
        self._warmup_task = None
        self._standby = standby
        self._failures = 0
        self._ready_at = self._clock()
        emit(
            logger,
            "warmup_ready",
            ms=(self._ready_at - self._warmup_started_at) * 1000.0,
            summary_chars=len(summary),
            standby_ratio=standby.estimate_usage_ratio(),
            standby_messages=standby.message_count,
        )

    def _handover(self) -> HandoverReport:
        old, new = self._active, self._standby
        assert new is not None  # the policy hands over only to a ready standby
        start = self._clock()
        ratio_before = old.estimate_usage_ratio()
        with self._tracer.start_as_current_span("voxcore.handover") as span:
            delta = new.extend_from(old, since=self._snapshot_mark)
            self._active, self._standby = new, None
            new.name, old.name = "active", "retired"
            ratio_after = new.estimate_usage_ratio()
            handover_ms = (self._clock() - start) * 1000.0
            span.set_attribute("voxcore.context.ratio_before", ratio_before)
            span.set_attribute("voxcore.context.ratio_after", ratio_after)
            span.set_attribute("voxcore.handover.delta_messages", delta)
        report = HandoverReport(
            handover_ms=handover_ms,
            ms_since_ready=(start - self._ready_at) * 1000.0,
            ratio_before=ratio_before,
            ratio_after=ratio_after,
            delta_messages=delta,
        )
        self._handovers += 1
        self._last_handover = report
        self._handover_duration.record(handover_ms / 1000.0)
        emit(
            logger,
            "handover_perform",
            ms_since_ready=report.ms_since_ready,
            handover_ms=handover_ms,
            ratio_before=ratio_before,
            ratio_after=ratio_after,
            delta_messages=delta,
        )
        return report

    def _discard(self, reason: str, *, keep_standby: bool = False) -> None:
        task = self._warmup_task
        if task is not None:
            self._warmup_task = None
            self._attempt += 1
            task.cancel()
            emit(
                logger,
                "warmup_cancelled",
                reason=reason,
                state=StandbyState.WARMING.value,
                ms=self._ms_since(self._warmup_started_at),
            )
        if self._standby is not None and not keep_standby:
            self._standby = None
            emit(
                logger,
                "warmup_cancelled",
                reason=reason,
                state=StandbyState.READY.value,
                ms=self._ms_since(self._warmup_started_at),
            )

    async def _drain(self) -> None:
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task is self._warmup_task:  # ended without settling: cancelled from outside, or a bug
            self._warmup_task = None
            self._attempt += 1
            if task.cancelled():
                emit(
                    logger,
                    "warmup_cancelled",
                    reason="external",
                    state=StandbyState.WARMING.value,
                    ms=self._ms_since(self._warmup_started_at),
                )
        if not task.cancelled() and task.exception() is not None:
            emit(
                logger,
                "background_task_failed",
                logging.ERROR,
                task=task.get_name(),
                error=repr(task.exception()),
            )

    def _ms_since(self, start: float) -> float:
        return (self._clock() - start) * 1000.0
