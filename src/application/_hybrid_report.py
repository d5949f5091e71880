"""Reporting of a hybrid reply: per-item counts and ``hybrid_item`` lines, the turn's metrics and spans.

Private to :mod:`voxcore.application.hybrid`.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from voxcore.application._hybrid_state import Feed, Slot, Turn
from voxcore.core.domain.hybrid import HybridTurnMetrics, TurnOutcome
from voxcore.core.ports.playback import PlayedItem
from voxcore.events import emit

logger = logging.getLogger("voxcore.hybrid")

#: Prefix of the item spans' attributes.
ITEM_ATTRIBUTE_PREFIX: Final = "voxcore.hybrid.item."
_ITEM: Final = ITEM_ATTRIBUTE_PREFIX


def item_failed(turn: Turn, slot: Slot, feed: Feed, error: BaseException, *, chunks: int) -> None:
    """An item ended early: counted, named in the degraded items, logged and marked on its span."""
    turn.failed += 1
    what = f"{slot.index}:{feed.key or feed.kind}:failed ({type(error).__name__})"
    turn.degraded.setdefault(slot.index, what)
    emit(
        logger,
        "hybrid_item_failed",
        logging.WARNING,
        index=slot.index,
        kind=feed.kind,
        key=feed.key,
        source=feed.source,
        error=str(error) or type(error).__name__,
        error_type=type(error).__name__,
        chunks=chunks,
    )
    slot.span.record_exception(error)
    slot.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def item_done(turn: Turn, slot: Slot, feed: Feed, *, chunks: int, converted: bool, speaker: str) -> None:
    """An item has played (or was skipped): its counts, who spoke it, its ``hybrid_item`` line, its span."""
    synthesis = feed.synthesis
    first_byte_ms: float | None = None
    if feed.source == "silence":
        first_byte_ms = 0.0
    elif feed.answered_at is not None:
        first_byte_ms = (feed.answered_at - slot.started) * 1000.0
    elif synthesis is not None and synthesis.first_byte_at is not None:
        first_byte_ms = max(0.0, synthesis.first_byte_at - slot.started) * 1000.0
        if turn.tts_ttfb_ms is None:
            turn.tts_ttfb_ms = (synthesis.first_byte_at - synthesis.started_at) * 1000.0
    if feed.source == "skipped":
        turn.skipped += 1
        turn.degraded.setdefault(slot.index, f"{slot.index}:{feed.key or feed.kind}:skipped")
    elif feed.stream is not None:
        turn.hits += 1
    elif synthesis is not None:
        turn.misses += 1
    if feed.kind == "static" and feed.source == "tts":
        turn.degraded.setdefault(slot.index, f"{slot.index}:{feed.key}:substituted by tts")
    if feed.source not in ("skipped", "silence") and chunks:
        spoken_by = "static" if feed.kind == "static" and feed.source == "hit" else speaker
        turn.voices.setdefault(spoken_by, None)
    turn.converted += converted
    fields: dict[str, Any] = {
        "index": slot.index,
        "kind": feed.kind,
        "key": feed.key,
        "source": feed.source,
        "first_byte_ms": first_byte_ms,
        "chunks": chunks,
        "converted": converted,
    }
    with trace.use_span(slot.span, end_on_exit=False):  # DEBUG: the reply's INFO line is hybrid_turn
        emit(logger, "hybrid_item", logging.DEBUG, **fields)
    slot.span.set_attributes({_ITEM + name: value for name, value in fields.items() if value is not None})
    slot.span.end()
    slot.reported = True
    if turn.observer is not None:
        played = PlayedItem(slot.index, feed.kind, feed.key or None, feed.source, chunks, first_byte_ms)
        try:
            turn.observer(played)
        except Exception as exc:  # an observer's failure never touches the reply
            emit(logger, "hybrid_item_observer_failed", logging.WARNING, key=feed.key, error=repr(exc))


def end_turn(turn: Turn, outcome: TurnOutcome, *, total_ms: float) -> HybridTurnMetrics:
    """The reply's metrics: ``degraded`` when it played to its end with items not played as asked.

    Logs the ``hybrid_turn`` line and ends the playlist span with the same fields.
    """
    if outcome == "ok" and turn.degraded:
        outcome = "degraded"
    result = HybridTurnMetrics(
        items=len(turn.slots),
        time_to_first_audio_ms=turn.first_audio_ms,
        playlist_first_audio_ms=turn.playlist_first_audio_ms,
        total_ms=total_ms,
        hits=turn.hits,
        misses=turn.misses,
        tts_ttfb_ms=turn.tts_ttfb_ms,
        converted=turn.converted,
        skipped=turn.skipped,
        failed=turn.failed,
        chunks=turn.chunks,
        outcome=outcome,
        degraded_items=tuple(turn.degraded[index] for index in sorted(turn.degraded)),
        voices=tuple(turn.voices),
    )
    level = logging.WARNING if outcome in ("failed", "degraded") else logging.INFO
    with trace.use_span(turn.span, end_on_exit=False):  # the line carries the reply's trace id
        emit(logger, "hybrid_turn", level, **result.fields())
    turn.span.set_attributes(result.span_attributes())
    if outcome == "failed":
        turn.span.set_status(Status(StatusCode.ERROR, "the reply failed"))
    turn.span.end()
    return result
