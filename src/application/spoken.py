"""A spoken call: user turns in, 20 ms audio out - from a FAQ recording when the turn is a known question,
else the LLM's answer spoken sentence by sentence through the hybrid responder."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Literal

from voxcore.application.faq import FaqMatcher
from voxcore.application.hybrid import HybridResponder
from voxcore.application.manager import ConversationManager, TurnMetrics
from voxcore.core.domain.faq import FaqMatch
from voxcore.core.domain.hybrid import HybridTurnMetrics
from voxcore.events import emit

__all__ = ["SpokenConversation", "SpokenTurnMetrics"]

logger = logging.getLogger("voxcore.spoken")

SpokenOutcome = Literal["ok", "failed", "closed"]


@dataclass(frozen=True, slots=True)
class SpokenTurnMetrics:
    """The numbers of one spoken turn (one ``spoken_turn`` log line).

    Attributes:
        turn: 1-based index among this call's spoken turns.
        outcome: ``ok``; ``failed`` (an error ended it); ``closed`` (the consumer stopped early).
        faq_hit: The turn was answered from a FAQ recording (no LLM call).
        faq_id: The FAQ entry that answered it (or was closest, when the matcher ran).
        faq_score: Cosine of the turn and the closest known question (``None``: no FAQ match ran).
        match_ms: Time spent embedding and matching the turn (``None``: no FAQ).
        time_to_first_audio_ms: Turn start (the user's final text) -> first audio chunk handed out.
        chunks: Audio chunks handed out.
        llm: The LLM turn's metrics (``None`` for a FAQ hit).
        hybrid: The played reply's metrics.
    """

    turn: int
    outcome: SpokenOutcome
    faq_hit: bool
    faq_id: str | None
    faq_score: float | None
    match_ms: float | None
    time_to_first_audio_ms: float | None
    chunks: int
    llm: TurnMetrics | None
    hybrid: HybridTurnMetrics | None

    def fields(self) -> dict[str, object]:
        """The flat log fields (nested metrics left out, unknown values dropped)."""
        data = asdict(self)
        data.pop("llm")
        data.pop("hybrid")
        return {k: v for k, v in data.items() if v is not None}


class SpokenConversation:
    """One call's spoken turns: FAQ recording or LLM answer, played as one audio stream.

    Args:
        conversation: The call's conversation manager (its history also receives FAQ turns).
        responder: Plays playlists and speaks streamed text.
        faq: The started FAQ matcher, or ``None`` (every turn goes to the LLM).
        owns_responder: :meth:`shutdown` also shuts the responder down.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        *,
        conversation: ConversationManager,
        responder: HybridResponder,
        faq: FaqMatcher | None = None,
        owns_responder: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._conversation = conversation
        self._responder = responder
        self._faq = faq
        self._owns_responder = owns_responder
        self._clock = clock
        self._turns = 0
        self._last: SpokenTurnMetrics | None = None
        self._closed = False

    @property
    def conversation(self) -> ConversationManager:
        """The call's conversation manager."""
        return self._conversation

    @property
    def responder(self) -> HybridResponder:
        """The hybrid responder."""
        return self._responder

    @property
    def last_turn_metrics(self) -> SpokenTurnMetrics | None:
        """The numbers of the most recent turn that has ended."""
        return self._last

    async def respond(self, final_user_text: str) -> AsyncGenerator[bytes, None]:
        """Answer one user turn with audio chunks (``chunk_ms`` of the responder's target format).

        A known question (cosine >= the FAQ threshold) is answered from its recording with no LLM
        call (``faq_hit`` is logged and reported) and recorded in the conversation history; any other
        turn is streamed from the LLM and spoken sentence by sentence. Close the generator to stop
        early (barge-in).

        Raises:
            LLMError: the LLM failed (after the sentences completed before the failure have played).
            RuntimeError: the conversation is shut down.
        """
        if self._closed:
            raise RuntimeError("the spoken conversation is shut down")
        self._turns += 1
        turn = self._turns
        started = self._clock()
        match: FaqMatch | None = None
        match_ms: float | None = None
        if self._faq is not None:
            match = await self._faq.match(final_user_text)
            match_ms = (self._clock() - started) * 1000
        hit = match is not None and match.hit
        events = self._conversation.events
        observer = events.played_item if events is not None else None  # one hybrid_item event per item
        if match is not None and hit:
            emit(
                logger,
                "faq_hit",
                turn=turn,
                faq_id=match.entry.id,
                score=round(match.score, 4),
                question=match.question,
                match_ms=match_ms,
            )
            self._conversation.record_answered_turn(final_user_text, match.entry.text, source="faq")
            stream = self._responder.play(
                match.entry.reply, parent=self._conversation.call_span, observer=observer
            )
        else:
            if match is not None:
                emit(
                    logger,
                    "faq_miss",
                    logging.DEBUG,
                    turn=turn,
                    closest=match.entry.id,
                    score=round(match.score, 4),
                )
            stream = self._responder.speak_text_stream(
                self._llm_text(final_user_text), parent=self._conversation.call_span, observer=observer
            )
        first_audio_ms: float | None = None
        chunks = 0
        outcome: SpokenOutcome = "closed"
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    if first_audio_ms is None:
                        first_audio_ms = (self._clock() - started) * 1000
                    chunks += 1
                    yield chunk
            outcome = "ok"
        except Exception:
            outcome = "failed"
            raise
        finally:
            metrics = SpokenTurnMetrics(
                turn=turn,
                outcome=outcome,
                faq_hit=hit,
                faq_id=match.entry.id if match is not None else None,
                faq_score=round(match.score, 4) if match is not None else None,
                match_ms=match_ms,
                time_to_first_audio_ms=first_audio_ms,
                chunks=chunks,
                llm=None if hit else self._conversation.last_turn_metrics,
                hybrid=self._responder.last_metrics,
            )
            self._last = metrics
            emit(
                logger,
                "spoken_turn",
                logging.INFO if outcome != "failed" else logging.WARNING,
                **metrics.fields(),
            )

    async def _llm_text(self, text: str) -> AsyncIterator[str]:
        async with contextlib.aclosing(self._conversation.process_user_turn(text)) as chunks:
            async for chunk in chunks:
                if chunk.text_chunk:
                    yield chunk.text_chunk

    async def shutdown(self) -> None:
        """Shut the conversation down (and the responder when owned); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._conversation.shutdown()
        finally:
            if self._owns_responder:
                await self._responder.shutdown()
