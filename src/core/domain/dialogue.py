"""The dialogue cache's records: stored messages and the context mark, encoded as versioned JSON.

A session's dialogue is two things in the store:

* its messages, oldest first, each numbered (``seq``, 1-based, contiguous) and stamped with the
  wall-clock time it was added and, for an answer, the turn's figures;
* the **context mark**: the summary the active context starts from and the ``seq`` of the first
  message of its history. The active context is always that summary plus a contiguous run of the
  newest messages (a handover keeps a suffix, trimming drops a prefix), so the mark and the
  messages together restore it exactly.

Every record carries :data:`DIALOGUE_FORMAT_VERSION`; a record of another version, or one that does
not decode, raises :class:`CorruptDialogueError` and is never partly used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.models import ROLES, ConversationMessage, Role

#: Version of the stored JSON; records of any other version are refused.
DIALOGUE_FORMAT_VERSION: Final = 1

_FIGURE_TYPES = (int, float)


class CorruptDialogueError(DomainError):
    """A stored dialogue record is not valid JSON of :data:`DIALOGUE_FORMAT_VERSION`, or is inconsistent."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message of a stored dialogue.

    Attributes:
        seq: Position in the conversation, 1-based.
        role: ``user``, ``assistant`` or ``system``.
        content: The text, exactly as the context holds it.
        ts: Wall-clock seconds since the epoch when it was added.
        figures: The turn's numbers (on answers): ``time_to_first_token_ms``… (``None`` values kept).
    """

    seq: int
    role: Role
    content: str
    ts: float
    figures: Mapping[str, float | int | bool | str | None] = field(default_factory=dict)

    @property
    def message(self) -> ConversationMessage:
        """The message in the OpenAI shape (what the context holds)."""
        return ConversationMessage(role=self.role, content=self.content)


@dataclass(frozen=True, slots=True)
class ContextMark:
    """Where the active context stands: its summary and the first message of its history.

    Attributes:
        summary: The summary of everything before ``first_seq`` (``None``: no summary yet).
        first_seq: ``seq`` of the oldest message in the active context's history.
        ts: Wall-clock seconds when the mark was written.
    """

    summary: str | None
    first_seq: int
    ts: float = 0.0


@dataclass(frozen=True, slots=True)
class DialogueSnapshot:
    """What the store holds for a session.

    Attributes:
        messages: The stored messages, oldest first (a contiguous run of ``seq``).
        mark: The context mark, if one was written.
    """

    messages: tuple[StoredMessage, ...]
    mark: ContextMark | None

    @property
    def last_seq(self) -> int:
        """``seq`` of the newest stored message (0 when none)."""
        return self.messages[-1].seq if self.messages else 0

    def active_history(self) -> tuple[StoredMessage, ...]:
        """The messages of the active context: those from the mark's ``first_seq`` on (all without a mark)."""
        if self.mark is None:
            return self.messages
        return tuple(m for m in self.messages if m.seq >= self.mark.first_seq)

    @property
    def missing_messages(self) -> int:
        """Messages of the active context that the store no longer holds (trimmed by its bound)."""
        if self.mark is None or not self.messages:
            return 0
        return max(self.messages[0].seq - self.mark.first_seq, 0)


def encode_message(message: StoredMessage) -> str:
    """One stored message as compact JSON (non-ASCII kept as is)."""
    record: dict[str, Any] = {
        "v": DIALOGUE_FORMAT_VERSION,
        "seq": message.seq,
        "role": message.role,
        "content": message.content,
        "ts": message.ts,
    }
    if message.figures:
        record["figures"] = dict(message.figures)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode_mark(mark: ContextMark) -> str:
    """The context mark as compact JSON."""
    record = {
        "v": DIALOGUE_FORMAT_VERSION,
        "summary": mark.summary,
        "first_seq": mark.first_seq,
        "ts": mark.ts,
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def decode_message(raw: str | bytes) -> StoredMessage:
    """Parse one stored message.

    Raises:
        CorruptDialogueError: not JSON, another version, or a field of the wrong type.
    """
    record = _record(raw, "message")
    seq, role, content, ts = record.get("seq"), record.get("role"), record.get("content"), record.get("ts")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise CorruptDialogueError(f"stored message has an invalid seq: {seq!r}")
    if not isinstance(role, str) or role not in ROLES:
        raise CorruptDialogueError(f"stored message {seq} has an invalid role: {role!r}")
    if not isinstance(content, str):
        raise CorruptDialogueError(f"stored message {seq} has non-text content")
    if not isinstance(ts, int | float) or not _is_number(ts):
        raise CorruptDialogueError(f"stored message {seq} has an invalid timestamp: {ts!r}")
    figures = record.get("figures", {})
    if not isinstance(figures, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str | bool) or _is_number(v))
        for k, v in figures.items()
    ):
        raise CorruptDialogueError(f"stored message {seq} has invalid figures")
    return StoredMessage(seq=seq, role=role, content=content, ts=float(ts), figures=figures)


def decode_mark(raw: str | bytes) -> ContextMark:
    """Parse the context mark.

    Raises:
        CorruptDialogueError: not JSON, another version, or a field of the wrong type.
    """
    record = _record(raw, "context mark")
    summary, first_seq, ts = record.get("summary"), record.get("first_seq"), record.get("ts", 0.0)
    if summary is not None and not isinstance(summary, str):
        raise CorruptDialogueError("stored context mark has a non-text summary")
    if not isinstance(first_seq, int) or isinstance(first_seq, bool) or first_seq < 1:
        raise CorruptDialogueError(f"stored context mark has an invalid first_seq: {first_seq!r}")
    if not _is_number(ts):
        raise CorruptDialogueError(f"stored context mark has an invalid timestamp: {ts!r}")
    return ContextMark(summary=summary, first_seq=first_seq, ts=float(ts))


def decode_snapshot(messages: Sequence[str | bytes], mark: str | bytes | None) -> DialogueSnapshot | None:
    """Decode what the store returned for a session (``None`` when it holds nothing).

    Raises:
        CorruptDialogueError: a record does not decode, or the messages are not a contiguous run
            of ``seq`` numbers (a list edited by hand, or records of two conversations mixed).
    """
    if not messages and mark is None:
        return None
    decoded = tuple(decode_message(raw) for raw in messages)
    for before, after in zip(decoded, decoded[1:], strict=False):
        if after.seq != before.seq + 1:
            raise CorruptDialogueError(
                f"stored messages are not contiguous: seq {before.seq} then {after.seq}"
            )
    context_mark = decode_mark(mark) if mark is not None else None
    if context_mark is not None and decoded and context_mark.first_seq > decoded[-1].seq + 1:
        raise CorruptDialogueError(
            f"context mark starts at seq {context_mark.first_seq}, after the last message ({decoded[-1].seq})"
        )
    return DialogueSnapshot(messages=decoded, mark=context_mark)


def _record(raw: str | bytes, what: str) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptDialogueError(f"stored {what} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise CorruptDialogueError(f"stored {what} is not a JSON object")
    version = record.get("v")
    if version != DIALOGUE_FORMAT_VERSION:
        raise CorruptDialogueError(
            f"stored {what} has format version {version!r};"
            f" this voxcore reads version {DIALOGUE_FORMAT_VERSION}"
        )
    return record


def _is_number(value: object) -> bool:
    return isinstance(value, _FIGURE_TYPES) and not isinstance(value, bool) and math.isfinite(value)
