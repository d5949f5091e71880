"""Known questions answered from recordings: FAQ entries, their manifest format, match results.

A manifest (YAML/JSON, read by ``voxcore.entrypoints.faq``)::

    faq:
      - id: opening_hours                    # unique, [a-z0-9_.-]
        questions:                           # phrasings of the question (at least one)
          - "Когда вы работаете?"
          - "Какой у вас график работы?"
        text: "Мы работаем ежедневно с девяти утра до девяти вечера."   # what the reply says
        reply:                               # optional playlist; default: speak ``text`` (TTS, cached)
          - static: hours_reply              # a recorded fragment (static:hours_reply)
          - tts: "с девяти до девяти"         # synthesized once, then played from the tts:* cache
          - pause_ms: 200
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from voxcore.core.domain.errors import DomainError, InvalidKeyError
from voxcore.core.domain.keys import static_key
from voxcore.core.domain.playlist import PauseItem, Playlist, PlaylistError, PlaylistItem, StaticItem, TTSItem

_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
#: Longest question text kept (longer ones are refused: a question is a sentence, not a document).
MAX_QUESTION_CHARS = 500


class FaqError(DomainError):
    """A FAQ manifest or entry that breaks the rules; the message names the entry and the field."""


@dataclass(frozen=True, slots=True)
class FaqEntry:
    """One known question and its recorded reply.

    Attributes:
        id: Unique name (reported with every hit).
        questions: Phrasings of the question; a user turn close enough to any of them is a hit.
        text: What the reply says: added to the conversation history as the assistant's answer.
        reply: What is played.
    """

    id: str
    questions: tuple[str, ...]
    text: str
    reply: Playlist


@dataclass(frozen=True, slots=True)
class FaqMatch:
    """The known question closest to a user turn.

    Attributes:
        entry: The entry it belongs to.
        question: The phrasing that matched best.
        score: Cosine similarity of the turn and that phrasing (-1..1).
        hit: ``score`` reached the threshold (the turn is answered from the recording).
    """

    entry: FaqEntry
    question: str
    score: float
    hit: bool


def check_threshold(threshold: float) -> float:
    """A cosine threshold must lie in (0, 1]."""
    if not (isinstance(threshold, int | float) and math.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise FaqError(f"the FAQ threshold must be a cosine within (0, 1], got {threshold!r}")
    return float(threshold)


def parse_faq(data: Any) -> list[FaqEntry]:
    """Validate a loaded manifest (``{"faq": [...]}`` or the list itself) into entries.

    Raises:
        FaqError: a missing/invalid field or a repeated id or question; the message names the entry.
    """
    items = data.get("faq") if isinstance(data, Mapping) else data
    if not isinstance(items, list) or not items:
        raise FaqError("the manifest needs a non-empty 'faq' list")
    entries: list[FaqEntry] = []
    ids: set[str] = set()
    seen: dict[str, str] = {}
    for position, item in enumerate(items):
        entry = _entry(item, position)
        if entry.id in ids:
            raise FaqError(f"faq[{position}]: id {entry.id!r} is used twice")
        ids.add(entry.id)
        for question in entry.questions:
            folded = " ".join(question.casefold().split())
            if folded in seen and seen[folded] != entry.id:
                raise FaqError(
                    f"faq[{position}] ({entry.id}): question {question!r} also belongs to {seen[folded]!r}"
                )
            seen[folded] = entry.id
        entries.append(entry)
    return entries


def _entry(item: Any, position: int) -> FaqEntry:
    where = f"faq[{position}]"
    if not isinstance(item, Mapping):
        raise FaqError(f"{where}: an entry must be a mapping")
    unknown = set(item) - {"id", "questions", "text", "reply"}
    if unknown:
        raise FaqError(f"{where}: unknown fields {sorted(unknown)}")
    entry_id = item.get("id")
    if not isinstance(entry_id, str) or not _ID.match(entry_id):
        raise FaqError(f"{where}: 'id' must match {_ID.pattern}, got {entry_id!r}")
    where = f"{where} ({entry_id})"
    questions = item.get("questions")
    if not isinstance(questions, list) or not questions:
        raise FaqError(f"{where}: 'questions' must be a non-empty list")
    cleaned: list[str] = []
    for q in questions:
        if not isinstance(q, str) or not q.strip():
            raise FaqError(f"{where}: every question must be a non-empty string, got {q!r}")
        if len(q) > MAX_QUESTION_CHARS:
            raise FaqError(f"{where}: a question is longer than {MAX_QUESTION_CHARS} characters")
        cleaned.append(" ".join(q.split()))
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise FaqError(f"{where}: 'text' (what the reply says) must be a non-empty string")
    text = " ".join(text.split())
    raw_reply = item.get("reply")
    try:
        if raw_reply is None:
            reply = Playlist.of(TTSItem(text))
        elif isinstance(raw_reply, list) and raw_reply:
            reply = Playlist(tuple(_item(part, where) for part in raw_reply))
        else:
            raise FaqError(f"{where}: 'reply' must be a non-empty list of playlist items")
    except (PlaylistError, InvalidKeyError) as exc:
        raise FaqError(f"{where}: {exc}") from exc
    return FaqEntry(id=entry_id, questions=tuple(dict.fromkeys(cleaned)), text=text, reply=reply)


def _item(part: Any, where: str) -> PlaylistItem:
    if not isinstance(part, Mapping) or len(part) != 1:
        raise FaqError(f"{where}: a reply item is one of {{static: name}}, {{tts: text}}, {{pause_ms: n}}")
    ((kind, value),) = part.items()
    if kind == "static" and isinstance(value, str) and value.strip():
        name = value.strip()
        return StaticItem(name if name.startswith("static:") else static_key(name))
    if kind == "tts" and isinstance(value, str):
        return TTSItem(value)
    if kind == "pause_ms" and isinstance(value, int) and not isinstance(value, bool):
        return PauseItem(value)
    raise FaqError(f"{where}: invalid reply item {dict(part)!r}")
