"""Dual-context policy: when to prepare a standby context, hand over to it, or trim the active one."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.models import ConversationHistory, ConversationMessage, Role

#: Longest wait, in turns, before a failed warm-up is tried again.
MAX_WARMUP_RETRY_WAIT_TURNS = 8


class StandbyState(enum.Enum):
    """Where the standby context is."""

    NONE = "none"  # no standby and no warm-up in flight
    WARMING = "warming"  # a warm-up (summary) is in flight
    READY = "ready"  # a standby context waits for the handover


class DualContextAction(enum.Enum):
    """What the controller should do now."""

    NONE = "none"
    START_WARMUP = "start_warmup"  # snapshot the history and build a (new) standby in the background
    HANDOVER = "handover"  # make the standby the active context
    TRIM = "trim"  # drop the oldest turns of the active context


@dataclass(frozen=True, slots=True)
class DualContextPolicy:
    """Usage-ratio thresholds of the dual context (``DualContextSettings``) and the decisions they imply.

    Attributes:
        warmup_threshold_ratio: Start preparing the standby context at this usage ratio.
        handover_threshold_ratio: Hand over, at a turn boundary, once the active context is this full.
        hard_limit_ratio: Above this the active context must shrink now: by a handover when a standby
            is ready, else by dropping its oldest turns.
        trim_target_ratio: What trimming brings the ratio down to; defaults to halfway between the
            warm-up threshold and the hard limit, so one trim buys room for several turns.

    Raises:
        DomainError: unless ``0 < warmup < handover <= hard_limit <= 1`` and ``0 < trim_target < hard_limit``.
    """

    warmup_threshold_ratio: float = 0.6
    handover_threshold_ratio: float = 0.8
    hard_limit_ratio: float = 0.95
    trim_target_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("warmup_threshold_ratio", "handover_threshold_ratio", "hard_limit_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise DomainError(f"{name} must be a finite number, got {value!r}")
        warmup, handover = self.warmup_threshold_ratio, self.handover_threshold_ratio
        hard = self.hard_limit_ratio
        if not 0 < warmup < handover <= hard <= 1:
            raise DomainError(
                "dual-context thresholds need 0 < warmup_threshold_ratio < handover_threshold_ratio"
                f" <= hard_limit_ratio <= 1, got {warmup}, {handover}, {hard}"
            )
        target = self.trim_target_ratio
        if target is None:
            object.__setattr__(self, "trim_target_ratio", (warmup + hard) / 2)
        elif (
            isinstance(target, bool)
            or not isinstance(target, int | float)
            or not math.isfinite(target)
            or not 0 < target < hard
        ):
            raise DomainError(f"trim_target_ratio must be in (0, hard_limit_ratio), got {target!r}")

    @property
    def trim_target(self) -> float:
        """The resolved :attr:`trim_target_ratio`."""
        assert self.trim_target_ratio is not None  # resolved in __post_init__
        return self.trim_target_ratio

    def decide(
        self,
        ratio: float,
        standby: StandbyState,
        *,
        turn_boundary: bool,
        warmup_allowed: bool = True,
        standby_ratio: float | None = None,
    ) -> DualContextAction:
        """The one action to take now; call again after acting, until it answers ``NONE``.

        Rules, in order:

        1. A ready standby that is smaller than the active context takes over at a turn boundary
           once ``ratio >= handover_threshold_ratio``, or at once when ``ratio >= hard_limit_ratio``.
        2. Without a standby, a warm-up starts at ``ratio >= warmup_threshold_ratio`` (when allowed).
           This comes before trimming, so the snapshot a summary is made from still holds the
           turns a trim is about to drop. A ready standby that would *not* be smaller (the active
           context was trimmed meanwhile, dropping what the summary replaces) is stale: at a
           boundary past the handover threshold a new warm-up replaces it.
        3. Otherwise, at ``ratio >= hard_limit_ratio``, the oldest turns are dropped.

        Args:
            ratio: Usage ratio of the active context (prompt tokens / context window).
            standby: The standby's state.
            turn_boundary: True between turns (no answer is being generated from the active context).
            warmup_allowed: False while a failed warm-up waits for its retry turn.
            standby_ratio: Usage ratio the standby would have after taking over (``None``: unknown,
                assumed smaller).

        Raises:
            DomainError: ``ratio`` is negative or not finite.
        """
        if not math.isfinite(ratio) or ratio < 0:
            raise DomainError(f"usage ratio must be a finite number >= 0, got {ratio!r}")
        ready = standby is StandbyState.READY
        worth_it = ready and (standby_ratio is None or standby_ratio < ratio)
        at_handover = turn_boundary and ratio >= self.handover_threshold_ratio
        if worth_it and (at_handover or ratio >= self.hard_limit_ratio):
            return DualContextAction.HANDOVER
        stale = ready and not worth_it and at_handover
        if (
            (standby is StandbyState.NONE or stale)
            and warmup_allowed
            and ratio >= self.warmup_threshold_ratio
        ):
            return DualContextAction.START_WARMUP
        if ratio >= self.hard_limit_ratio:
            return DualContextAction.TRIM
        return DualContextAction.NONE


def warmup_retry_turn(failed_turn: int, consecutive_failures: int) -> int:
    """The first turn at which a failed warm-up may be tried again.

    The wait doubles with each consecutive failure (1, 2, 4… turns, at most
    :data:`MAX_WARMUP_RETRY_WAIT_TURNS`), so a provider outage costs one summary attempt per few
    turns rather than one per message.
    """
    if consecutive_failures < 1:
        return failed_turn
    wait = min(1 << min(consecutive_failures - 1, 16), MAX_WARMUP_RETRY_WAIT_TURNS)
    return failed_turn + wait


def select_recent(history: Sequence[ConversationMessage], n: int) -> ConversationHistory:
    """At most the last ``n`` messages, starting at a user message.

    A kept tail never opens with an assistant (or system) message whose question was cut off: the
    summary covers that message anyway, and an orphan reply confuses the model.

    Raises:
        DomainError: ``n`` is negative.
    """
    if n < 0:
        raise DomainError(f"number of recent messages must be >= 0, got {n}")
    if n == 0:
        return []
    tail = list(history[-n:])
    for index, message in enumerate(tail):
        if message["role"] == "user":
            return tail[index:]
    return []


def standby_history(
    snapshot: Sequence[ConversationMessage],
    *,
    recent: int,
    added_since_snapshot: Sequence[ConversationMessage] = (),
) -> ConversationHistory:
    """The history of a standby context: the recent tail of the snapshot, then what came after it.

    The summary of the snapshot is not part of the history: it goes into the standby's system
    message (see :func:`voxcore.core.domain.prompting.assemble_prompt`).

    Args:
        snapshot: The active history when the warm-up started (what the summary covers).
        recent: How many of the snapshot's last messages are kept verbatim.
        added_since_snapshot: Messages the active context received after the snapshot was taken;
            all of them are kept, so nothing said during the warm-up is lost at the handover.
    """
    history = select_recent(snapshot, recent)
    history.extend(added_since_snapshot)
    return history


def oldest_turns_to_drop(
    roles: Sequence[Role], token_counts: Sequence[int], excess_tokens: int, *, keep_last_turn: bool = True
) -> int:
    """How many of the oldest messages to drop to free at least ``excess_tokens`` (whole turns only).

    A turn is a user message and everything up to the next user message, so a question is never
    kept without its answer or the other way round. Leading non-user messages form a turn of their
    own. With ``keep_last_turn`` the most recent turn (usually the question being answered) is never
    dropped, even when that frees less than asked.

    Args:
        roles: Role of each message, oldest first.
        token_counts: Tokens of each message, same order.
        excess_tokens: Tokens to free; ``<= 0`` drops nothing.
        keep_last_turn: Never drop the newest turn.

    Returns:
        A count of messages to remove from the front.

    Raises:
        DomainError: ``roles`` and ``token_counts`` differ in length.
    """
    if len(roles) != len(token_counts):
        raise DomainError(f"{len(roles)} roles but {len(token_counts)} token counts")
    if excess_tokens <= 0 or not roles:
        return 0
    # Start of every turn after the first message: the droppable boundaries.
    boundaries = [index for index in range(1, len(roles)) if roles[index] == "user"]
    if not keep_last_turn:
        boundaries.append(len(roles))
    freed = 0
    start = 0
    for boundary in boundaries:
        freed += sum(token_counts[start:boundary])
        start = boundary
        if freed >= excess_tokens:
            break
    return start
