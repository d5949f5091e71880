"""Incremental sentence splitting of streamed answer text, so speech starts before the answer ends."""

from __future__ import annotations

import re
from typing import Final

from voxcore.core.domain.errors import DomainError

#: Marks that end a sentence when followed by a space (``.``, ``!``, ``?`` and the ellipsis character).
SENTENCE_MARKS: Final = frozenset(".!?…")
#: Marks that also end a piece with ``split_on_clauses=True``.
CLAUSE_MARKS: Final = frozenset(";:")
#: Words that take a dot but never end a sentence (lower case, final dot removed, inner dots kept).
#: Abbreviations that often *do* end a sentence ("т.д.", "т.п.", "etc.") are deliberately absent: they
#: end one when the next word starts with a capital letter, like any other word.
NON_TERMINAL_ABBREVIATIONS: Final = frozenset(
    {
        # Russian
        "т.е",
        "т.к",
        "т.н",
        "т.ч",
        "т.о",
        "г",
        "гг",
        "руб",
        "коп",
        "тыс",
        "млн",
        "млрд",
        "трлн",
        "долл",
        "ул",
        "пр",
        "пер",
        "просп",
        "пл",
        "наб",
        "обл",
        "р-н",
        "пос",
        "д",
        "кв",
        "корп",
        "стр",
        "им",
        "св",
        "ст",
        "проф",
        "акад",
        "доц",
        "зам",
        "рис",
        "табл",
        "см",
        "ср",
        "напр",
        "тел",
        "ок",
        "вкл",
        "искл",
        "англ",
        "рус",
        "лат",
        # English
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "st",
        "jr",
        "sr",
        "vs",
        "e.g",
        "i.e",
        "approx",
        "dept",
        "fig",
        "mt",
    }
)

# A comma, semicolon, colon or dash followed by a space is where a too long sentence is best cut.
_SOFT: Final = frozenset(",;:—–-")
# Closing quotes and brackets after the final mark still belong to the sentence.
_CLOSERS: Final = frozenset("\"'»”’)]}")
# Opening quotes and brackets before an abbreviation are not part of it.
_OPENERS: Final = "\"'«„“‘([{"
_WHITESPACE: Final = re.compile(r"\s+")

# Scanner states: plain text; inside a run of final marks; inside closers after the marks; after
# "<marks><closers> " waiting for the next character, which decides whether the sentence ended.
_NORMAL, _RUN, _CLOSE, _CANDIDATE = range(4)


class SentenceSplitterError(DomainError):
    """Splitter settings that cannot work (lengths out of range)."""


class SentenceSplitter:
    """Cuts text that arrives in pieces (LLM deltas) into sentences for speech synthesis.

    A sentence ends after a run of ``.``, ``!``, ``?`` or ``…`` (optionally followed by closing
    quotes or brackets) that is followed by a space, unless:

    * the next character is a lower-case letter (``"Ну... то есть"``, ``"т.е. это"``: the sentence
      goes on);
    * the run is a single ``.`` after a word of :data:`NON_TERMINAL_ABBREVIATIONS` (``"г."``,
      ``"руб."``, ``"Mr."``, ``"т.е."``) or after a single letter (initials ``"А. С. Пушкин"``).

    A dot without a following space never ends anything (``"12.5"``, ``"example.com"``, ``"т.е.,"``).
    With ``split_on_clauses`` a ``;`` or ``:`` followed by a space ends a piece as well (whatever
    the case of the next word).

    Length policy: a sentence shorter than ``min_chars`` is not emitted on its own but merged with
    the next one; a sentence that would grow beyond ``max_chars`` is cut at the last comma (or
    semicolon, colon, dash) followed by a space in its second half, else at its last space in its
    second half, else hard at ``max_chars``. Every emitted piece but the one :meth:`flush` returns is
    at least ``min_chars`` long, and every piece is at most ``max_chars`` long.

    Whitespace is collapsed to single spaces and stripped from both ends of every piece, so joining
    the pieces gives the text back modulo whitespace. The result does not depend on how the text was
    cut into deltas: the decision at a possible end waits for the next character when it has not
    arrived yet. Work is linear in the text length (each character is examined a bounded number of
    times).

    Args:
        min_chars: Shortest piece emitted before the end of the text (``0 <= min_chars <= max_chars // 2``).
        max_chars: Longest piece (at least 2).
        split_on_clauses: Also end pieces at ``;`` and ``:``.
        abbreviations: Words whose dot never ends a sentence (lower case, without the final dot).

    Raises:
        SentenceSplitterError: the lengths are out of range.
    """

    __slots__ = (
        "_abbreviations",
        "_buf",
        "_cand_clause",
        "_cand_end",
        "_cand_ok",
        "_i",
        "_last_soft",
        "_last_space",
        "_marks",
        "_max",
        "_min",
        "_run_end",
        "_run_start",
        "_state",
        "_word_start",
    )

    def __init__(
        self,
        *,
        min_chars: int = 10,
        max_chars: int = 200,
        split_on_clauses: bool = False,
        abbreviations: frozenset[str] = NON_TERMINAL_ABBREVIATIONS,
    ) -> None:
        for name, value in (("min_chars", min_chars), ("max_chars", max_chars)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise SentenceSplitterError(f"{name} must be an int, got {value!r}")
        if max_chars < 2:
            raise SentenceSplitterError(f"max_chars must be at least 2, got {max_chars}")
        if not 0 <= min_chars <= max_chars // 2:
            raise SentenceSplitterError(
                f"min_chars must be within 0..max_chars // 2 ({max_chars // 2}), got {min_chars}"
            )
        self._min = min_chars
        self._max = max_chars
        self._marks = SENTENCE_MARKS | CLAUSE_MARKS if split_on_clauses else SENTENCE_MARKS
        self._abbreviations = frozenset(a.lower() for a in abbreviations)
        self._buf = ""
        self._reset_scan()

    @property
    def pending(self) -> str:
        """Text received but not emitted yet (whitespace collapsed)."""
        return self._buf

    def feed(self, text: str) -> list[str]:
        """Take the next delta; return the sentences it completes (possibly none), in order."""
        if not isinstance(text, str):
            raise TypeError(f"SentenceSplitter.feed needs str, got {type(text).__name__}")
        if not text:
            return []
        if not self._buf or self._buf[-1] == " ":
            text = text.lstrip()
            if not text:
                return []
        out: list[str] = []
        self._buf += _WHITESPACE.sub(" ", text)
        self._scan(out)
        return out

    def flush(self) -> str | None:
        """End of the text: the rest as the last piece (``None`` if nothing is left); resets the splitter."""
        rest = self._buf.strip()
        self._buf = ""
        self._reset_scan()
        return rest or None

    # -- scanner ---------------------------------------------------------------------------------------

    def _reset_scan(self) -> None:
        self._i = 0
        self._state = _NORMAL
        self._word_start = 0
        self._run_start = 0
        self._run_end = 0
        self._cand_end = 0
        self._cand_ok = False
        self._cand_clause = False
        self._last_space = -1
        self._last_soft = -1

    def _scan(self, out: list[str]) -> None:
        buf, i, state = self._buf, self._i, self._state
        limit, marks = self._max, self._marks
        while i < len(buf):
            c = buf[i]
            if (
                state != _CANDIDATE
                and i >= limit
                and not (state != _NORMAL and i == limit and c == " ")  # a sentence of exactly max_chars
            ):
                buf = self._force_cut(buf, out)
                i, state = 0, _NORMAL
                continue
            if state == _NORMAL:
                if c in marks:
                    self._run_start = i
                    state = _RUN
                elif c == " ":
                    self._space_at(buf, i)
                i += 1
            elif state == _RUN or state == _CLOSE:
                if state == _RUN and c in marks:
                    i += 1
                elif c in _CLOSERS:
                    if state == _RUN:
                        self._run_end = i
                        state = _CLOSE
                    i += 1
                elif c == " ":
                    if state == _RUN:
                        self._run_end = i
                    self._cand_end = i
                    self._cand_ok = not self._is_abbreviation(buf, closed=state == _CLOSE)
                    self._cand_clause = CLAUSE_MARKS.issuperset(buf[self._run_start : self._run_end])
                    self._space_at(buf, i)
                    state = _CANDIDATE
                    i += 1
                else:
                    state = _NORMAL  # "12.5", "т.е.,": not an end; look at this character again
            else:  # _CANDIDATE: ``c`` is the first character after "<marks> "
                if self._cand_ok and (self._cand_clause or not c.islower()):
                    end = self._cand_end
                    if end >= self._min:
                        out.append(buf[:end])
                        buf = buf[i:]
                        self._reset_scan()
                        i, state = 0, _NORMAL
                        continue
                state = _NORMAL  # too short (merged with the next sentence) or not an end
        self._buf, self._i, self._state = buf, i, state

    def _space_at(self, buf: str, i: int) -> None:
        self._word_start = i + 1
        if i <= self._max:
            self._last_space = i
            if i > 0 and buf[i - 1] in _SOFT:
                self._last_soft = i

    def _is_abbreviation(self, buf: str, *, closed: bool) -> bool:
        """True when the run just ended is an abbreviation's dot rather than the end of a sentence."""
        if closed or self._run_end - self._run_start != 1 or buf[self._run_start] != ".":
            return False
        token = buf[self._word_start : self._run_start].lstrip(_OPENERS)
        if not token:
            return False
        if len(token) == 1:
            return token.isalpha()  # initials, "г.", "д."
        return token.lower() in self._abbreviations

    def _force_cut(self, buf: str, out: list[str]) -> str:
        """Cut a sentence that reached ``max_chars``; return the rest (rescanned from its start)."""
        floor = max(1, self._max // 2)
        if self._last_soft >= floor:
            cut = self._last_soft
        elif self._last_space >= floor:
            cut = self._last_space
        else:
            cut = self._max
        piece = buf[:cut].strip()
        if piece:
            out.append(piece)
        self._reset_scan()
        return buf[cut:].lstrip()
