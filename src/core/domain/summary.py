"""Cached conversation summaries that say exactly which history they cover (``summary:session:*`` values)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.models import ConversationMessage

#: Version tag written into every encoded record; other versions decode as ``None``.
RECORD_VERSION: Final = 1
#: How many records one session's cache value keeps (newest last).
RECORDS_KEPT: Final = 4

_DIGEST: Final = re.compile(r"[0-9a-f]{64}")


def history_digest(history: Sequence[ConversationMessage]) -> str:
    """SHA-256 (hex) of a canonical JSON of the messages' ``role`` and ``content``, in order.

    Canonical: sorted keys, no whitespace, ASCII escapes (so any ``str``, even a lone surrogate,
    encodes), extra message keys ignored. Equal histories give equal digests in every process.
    """
    canonical = json.dumps(
        [{"role": message["role"], "content": message["content"]} for message in history],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class SummaryRecord:
    """A summary together with what it summarizes.

    Attributes:
        summary: The summary text.
        covers_messages: How many messages the summarized history held.
        digest: :func:`history_digest` of what was summarized (the conversation manager digests its
            whole summary request: the summarization prompt, any earlier summary, the messages).
        model: The model that wrote the summary (informational).

    Raises:
        DomainError: a field has the wrong type, the summary is blank, the count is negative, or the
            digest is not 64 lowercase hex digits.
    """

    summary: str
    covers_messages: int
    digest: str
    model: str

    def __post_init__(self) -> None:
        if not isinstance(self.summary, str) or not self.summary.strip():
            raise DomainError("summary must be a non-empty string")
        if isinstance(self.covers_messages, bool) or not isinstance(self.covers_messages, int):
            raise DomainError(f"covers_messages must be an int, got {self.covers_messages!r}")
        if self.covers_messages < 0:
            raise DomainError(f"covers_messages must be >= 0, got {self.covers_messages}")
        if not isinstance(self.digest, str) or not _DIGEST.fullmatch(self.digest):
            raise DomainError(f"digest must be 64 lowercase hex digits, got {self.digest!r}")
        if not isinstance(self.model, str):
            raise DomainError(f"model must be a string, got {self.model!r}")

    def covers(self, *, digest: str, messages: int) -> bool:
        """True when this record summarizes exactly the history with ``digest`` and ``messages`` messages."""
        return self.digest == digest and self.covers_messages == messages

    def encode(self) -> str:
        """This record as one JSON object (the inverse of :meth:`decode`)."""
        return json.dumps(self._fields(), separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def decode(cls, text: object) -> SummaryRecord | None:
        """Parse what :meth:`encode` wrote; ``None`` for anything else (never raises)."""
        try:
            data = json.loads(text) if isinstance(text, str | bytes) else None
        except (ValueError, RecursionError):
            return None
        return cls._from_fields(data)

    def _fields(self) -> dict[str, Any]:
        return {
            "v": RECORD_VERSION,
            "summary": self.summary,
            "covers_messages": self.covers_messages,
            "digest": self.digest,
            "model": self.model,
        }

    @classmethod
    def _from_fields(cls, data: object) -> SummaryRecord | None:
        if not isinstance(data, dict) or data.get("v") != RECORD_VERSION:
            return None
        if set(data) != {"v", "summary", "covers_messages", "digest", "model"}:
            return None
        try:
            return cls(
                summary=data["summary"],
                covers_messages=data["covers_messages"],
                digest=data["digest"],
                model=data["model"],
            )
        except DomainError:
            return None


def encode_records(records: Sequence[SummaryRecord]) -> str:
    """A session's cached summaries as one JSON value ``{"v": 1, "records": [...]}`` (newest last).

    One session can need several summaries (one per warm-up); keeping the last few lets a replay of
    the same dialogue hit the cache at every warm-up, not only at the last one.
    """
    return json.dumps(
        {"v": RECORD_VERSION, "records": [record._fields() for record in records]},
        separators=(",", ":"),
        ensure_ascii=True,
    )


def decode_records(text: object) -> tuple[SummaryRecord, ...]:
    """The valid records of a cache value written by :func:`encode_records` or :meth:`SummaryRecord.encode`.

    Never raises: a malformed value yields ``()``, a malformed record inside a list is skipped.
    """
    try:
        data = json.loads(text) if isinstance(text, str | bytes) else None
    except (ValueError, RecursionError):
        return ()
    if not isinstance(data, dict) or data.get("v") != RECORD_VERSION:
        return ()
    if "records" not in data:
        single = SummaryRecord._from_fields(data)
        return () if single is None else (single,)
    items = data["records"]
    if not isinstance(items, list):
        return ()
    records = (SummaryRecord._from_fields(item) for item in items)
    return tuple(record for record in records if record is not None)


def find_covering(records: Sequence[SummaryRecord], *, digest: str, messages: int) -> SummaryRecord | None:
    """The newest record that covers exactly this history, or ``None``."""
    for record in reversed(records):
        if record.covers(digest=digest, messages=messages):
            return record
    return None


def remember(
    records: Sequence[SummaryRecord], record: SummaryRecord, *, keep: int = RECORDS_KEPT
) -> tuple[SummaryRecord, ...]:
    """``records`` with ``record`` appended as the newest, replacing one with the same coverage.

    At most ``keep`` records are returned; the oldest go first.

    Raises:
        DomainError: ``keep`` is less than 1.
    """
    if keep < 1:
        raise DomainError(f"keep must be >= 1, got {keep}")
    kept = [old for old in records if not old.covers(digest=record.digest, messages=record.covers_messages)]
    kept.append(record)
    return tuple(kept[-keep:])
