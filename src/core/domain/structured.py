"""Incremental parser for a streamed JSON object whose text field is spoken while it still arrives."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeVar

from pydantic import BaseModel, ValidationError

from voxcore.core.domain.errors import DomainError

ModelT = TypeVar("ModelT", bound=BaseModel)


class StructuredStreamError(DomainError):
    """The streamed text is not one valid JSON object of the expected shape, or it ended too early."""


@dataclass(frozen=True, slots=True)
class FieldValue:
    """A top-level field other than the stream field, emitted as soon as its value is complete.

    Attributes:
        name: The field name.
        value: The parsed value (``dict``/``list``/``str``/``int``/``float``/``bool``/``None``).
    """

    name: str
    value: object


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Newly decoded characters of the stream field's string (never empty, never half an escape)."""

    text: str


@dataclass(frozen=True, slots=True)
class TextComplete:
    """The stream field's string has closed; ``text`` is its whole value (all deltas joined)."""

    text: str


@dataclass(frozen=True, slots=True)
class ObjectComplete:
    """The top-level object has closed; ``value`` is what ``json.loads`` would return for it."""

    value: dict[str, object]


StreamEvent: TypeAlias = FieldValue | TextDelta | TextComplete | ObjectComplete

# JSON whitespace (RFC 8259): exactly these four characters.
_WS: Final = re.compile(r"[ \t\n\r]*")
_WS_ONLY: Final = re.compile(r"[ \t\n\r]")
# The longest prefix of string content that can be decoded now: plain characters and complete escapes.
# A high surrogate escape only counts together with its low half, so a pair is never split and a lone
# high surrogate is left to the character-level state machine (which decides once the next char is known).
_STRING_RUN: Final = re.compile(
    r'(?:[^"\\]++'
    r"|\\(?:[\"\\/bfnrt]"
    r"|u(?![dD][89abAB])[0-9a-fA-F]{4}"
    r"|u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}))*+"
)
_HEX_RUN: Final = re.compile(r"[0-9a-fA-F]*")
_NUMBER_RUN: Final = re.compile(r"[-+.eE0-9]*")
#: Characters before the object that are skipped (a markdown fence, "Ответ:"); more is an error.
MAX_PREAMBLE_CHARS: Final = 200
# Grammar-constrained servers emit raw newlines and tabs inside strings: decode them as themselves.
_LENIENT: Final = json.JSONDecoder(strict=False)
_ESCAPES: Final = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_LITERALS: Final[dict[str, str]] = {"t": "true", "f": "false", "n": "null"}
_LITERAL_VALUES: Final[dict[str, object]] = {"true": True, "false": False, "null": None}

# Parser states. Structural states come first (they skip whitespace), then the in-token states.
_TOP, _KEY_OR_END, _KEY, _COLON, _VALUE, _VALUE_OR_END, _COMMA_OR_END, _DONE = range(8)
_STRING, _ESCAPE, _HEX, _AFTER_HIGH, _NUMBER, _LITERAL = range(8, 14)
_EXPECTING: Final = (
    "a JSON object starting with '{'",
    "a field name or '}'",
    "a field name",
    "':'",
    "a value",
    "a value or ']'",
    "',' or a closing bracket",
    "nothing",
    "the rest of a string",
    "the rest of a string",
    "the rest of a string",
    "the rest of a string",
    "the rest of a number",
    "the rest of a literal",
)

# What the string being read is: a field name, an ordinary value, or the streamed text field.
_ROLE_KEY, _ROLE_VALUE, _ROLE_TEXT = range(3)

# Number automaton: -? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?
_N_START, _N_MINUS, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_E, _N_ESIGN, _N_EXP = range(9)
_EXP_TO: Final = {"e": _N_E, "E": _N_E}
_NUMBER_NEXT: Final[tuple[dict[str, int], ...]] = (
    {"-": _N_MINUS, "0": _N_ZERO, **dict.fromkeys("123456789", _N_INT)},
    {"0": _N_ZERO, **dict.fromkeys("123456789", _N_INT)},
    {".": _N_DOT, **_EXP_TO},
    {**dict.fromkeys("0123456789", _N_INT), ".": _N_DOT, **_EXP_TO},
    dict.fromkeys("0123456789", _N_FRAC),
    {**dict.fromkeys("0123456789", _N_FRAC), **_EXP_TO},
    {"+": _N_ESIGN, "-": _N_ESIGN, **dict.fromkeys("0123456789", _N_EXP)},
    dict.fromkeys("0123456789", _N_EXP),
    dict.fromkeys("0123456789", _N_EXP),
)
_NUMBER_DONE: Final = frozenset({_N_ZERO, _N_INT, _N_FRAC, _N_EXP})


class StructuredStreamParser:
    """Incremental parser for the text of one JSON object that arrives in arbitrary fragments.

    Each call to :meth:`feed` consumes only the new fragment (total cost is linear in the input) and
    returns the events it completed:

    * :class:`FieldValue` for each top-level field other than ``stream_field``, once its value is complete;
    * :class:`TextDelta` with the characters of ``stream_field``'s string decoded so far (escapes and
      surrogate pairs are decoded whole, never split);
    * :class:`TextComplete` when that string closes;
    * :class:`ObjectComplete` once, when the top-level object closes.

    Values decode exactly as ``json.loads`` decodes them, except that ``NaN``/``Infinity`` are rejected
    (they are not JSON) and a repeated top-level field name is an error (its event was already sent).

    Where it is safe, the parser is tolerant of what real models emit: raw control characters (a newline,
    a tab) inside strings are kept as they are; up to :data:`MAX_PREAMBLE_CHARS` characters (whitespace
    aside) before the
    first ``{`` (a markdown fence, a short preamble) are skipped (:attr:`skipped_chars`); whatever
    follows the complete object (a closing fence, a remark) is ignored (:attr:`trailing_chars`).

    The first error is raised from :meth:`feed` as soon as it is detectable (the events of that
    fragment are lost) and again from every later call.

    Example::

        parser = StructuredStreamParser()
        for fragment in fragments:
            for event in parser.feed(fragment):
                ...
        answer = parser.validate(LLMStructuredResponse)
    """

    __slots__ = (
        "_field",
        "_state",
        "_offset",
        "_error",
        "_root",
        "_stack",
        "_keys",
        "_role",
        "_parts",
        "_sent",
        "_hex",
        "_high",
        "_num_state",
        "_num_parts",
        "_literal",
        "_literal_len",
        "_skipped",
        "_trailing",
        "_trailing_text",
    )

    def __init__(self, stream_field: str = "answer") -> None:
        """Create a parser.

        Args:
            stream_field: Top-level field whose string value is streamed as :class:`TextDelta` events.
        """
        self._field = stream_field
        self._state = _TOP
        self._offset = 0
        self._error: str | None = None
        self._root: dict[str, object] = {}
        self._stack: list[dict[str, object] | list[object]] = []
        self._keys: list[str] = []
        self._role = _ROLE_KEY
        self._parts: list[str] = []
        self._sent = 0
        self._hex = ""
        self._high = -1
        self._num_state = _N_START
        self._num_parts: list[str] = []
        self._literal = ""
        self._literal_len = 0
        self._skipped = 0
        self._trailing = 0
        self._trailing_text = False

    @property
    def skipped_chars(self) -> int:
        """Characters other than whitespace skipped before the object started (a fence, a preamble)."""
        return self._skipped

    @property
    def trailing_chars(self) -> int:
        """Characters received after the object closed (ignored), whitespace included."""
        return self._trailing

    @property
    def has_trailing_text(self) -> bool:
        """Whether anything but whitespace came after the object (it was ignored)."""
        return self._trailing_text

    @property
    def stream_field(self) -> str:
        """Name of the top-level field whose text is streamed."""
        return self._field

    @property
    def is_complete(self) -> bool:
        """True once the top-level object has closed without error."""
        return self._state == _DONE and self._error is None

    def feed(self, fragment: str) -> list[StreamEvent]:
        """Consume the next fragment of the JSON text.

        Args:
            fragment: Any piece of the text, split anywhere (may be empty).

        Returns:
            The events this fragment completed, in order.

        Raises:
            StructuredStreamError: the text so far cannot be the start of a valid object.
        """
        if self._error is not None:
            raise StructuredStreamError(self._error)
        events: list[StreamEvent] = []
        try:
            self._consume(fragment, events)
        except StructuredStreamError as exc:
            self._error = str(exc)
            raise
        self._offset += len(fragment)
        if self._role == _ROLE_TEXT and len(self._parts) > self._sent:
            self._flush_text(events)
        return events

    def close(self) -> dict[str, object]:
        """Finish the stream.

        Returns:
            The complete top-level object (what ``json.loads`` returns for the whole text).

        Raises:
            StructuredStreamError: the text was invalid, or it ended before the object was complete.
        """
        if self._error is not None:
            raise StructuredStreamError(self._error)
        if self._state != _DONE:
            where = f" in field {self._keys[0]!r}" if self._keys and self._keys[0] else ""
            raise StructuredStreamError(
                f"stream ended after {self._offset} characters before the JSON object was complete"
                f"{where}: expected {_EXPECTING[self._state]}"
            )
        return self._root

    def validate(self, model: type[ModelT]) -> ModelT:
        """Finish the stream and validate the object into ``model``.

        Raises:
            StructuredStreamError: as :meth:`close`, or the object does not match ``model``.
        """
        value = self.close()
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            raise StructuredStreamError(f"structured answer does not match {model.__name__}: {exc}") from exc

    # -- internals ------------------------------------------------------------------------------------

    def _fail(self, index: int, message: str) -> StructuredStreamError:
        """Error for a problem at ``index`` of the current fragment (callers ``raise`` it)."""
        return StructuredStreamError(f"invalid JSON at character {self._offset + index}: {message}")

    def _consume(self, s: str, events: list[StreamEvent]) -> None:
        """Run the state machine over ``s``; every character is examined a bounded number of times."""
        i = 0
        n = len(s)
        while i < n:
            state = self._state
            if state == _STRING:
                end = _STRING_RUN.match(s, i).end()  # type: ignore[union-attr]  # always matches
                if end > i:
                    segment = s[i:end]
                    if "\\" in segment:
                        segment = _decode_escapes(segment)
                    self._parts.append(segment)
                    if end == n:
                        return
                    i = end
                if s[i] == '"':
                    self._end_string(i, events)
                else:  # a backslash: the run stops only at a quote or an escape
                    self._state = _ESCAPE
                i += 1
            elif state > _DONE:
                i = self._in_token(s, i, state, events)
            elif state == _DONE:  # after the object: ignored (a closing fence, a remark)
                rest = s[i:]
                self._trailing += len(rest)
                if not self._trailing_text and rest.strip(" \t\n\r"):
                    self._trailing_text = True
                return
            else:
                i = _WS.match(s, i).end()  # type: ignore[union-attr]  # always matches
                if i == n:
                    return
                c = s[i]
                if state == _COMMA_OR_END:
                    top = self._stack[-1]
                    closer = "}" if isinstance(top, dict) else "]"
                    if c == ",":
                        self._state = _KEY if isinstance(top, dict) else _VALUE
                    elif c == closer:
                        self._close_container(events)
                    else:
                        raise self._fail(i, f"expected ',' or {closer!r}, got {c!r}")
                    i += 1
                elif state == _VALUE or state == _VALUE_OR_END:
                    i = self._start_value(s, i, state, events)
                elif state == _COLON:
                    if c != ":":
                        raise self._fail(i, f"expected ':', got {c!r}")
                    self._state = _VALUE
                    i += 1
                elif state == _KEY or state == _KEY_OR_END:
                    if c == '"':
                        self._begin_string(_ROLE_KEY)
                    elif c == "}" and state == _KEY_OR_END:
                        self._close_container(events)
                    else:
                        raise self._fail(i, f"expected {_EXPECTING[state]}, got {c!r}")
                    i += 1
                elif state == _TOP:
                    if c != "{":
                        start = s.find("{", i)
                        preamble = s[i : n if start < 0 else start]
                        self._skipped += len(preamble) - len(_WS_ONLY.findall(preamble))
                        if self._skipped > MAX_PREAMBLE_CHARS:
                            raise self._fail(
                                i,
                                f"expected a JSON object starting with '{{', got {c!r} (and no '{{' within "
                                f"{MAX_PREAMBLE_CHARS} characters)",
                            )
                        if start < 0:
                            return
                        i = start
                    self._stack.append(self._root)
                    self._keys.append("")
                    self._state = _KEY_OR_END
                    i += 1
                else:
                    raise AssertionError(f"unknown parser state {state}")  # pragma: no cover

    def _in_token(self, s: str, i: int, state: int, events: list[StreamEvent]) -> int:
        """Advance inside an escape, number or literal; return the next index to read."""
        n = len(s)
        if state == _ESCAPE:
            c = s[i]
            if c == "u":
                self._hex = ""
                self._state = _HEX
                return i + 1
            decoded = _ESCAPES.get(c)
            if decoded is None:
                raise self._fail(i, f"invalid escape '\\{c}' in a string")
            self._flush_high()
            self._parts.append(decoded)
            self._state = _STRING
            return i + 1
        if state == _HEX:
            stop = min(n, i + 4 - len(self._hex))
            end = _HEX_RUN.match(s, i, stop).end()  # type: ignore[union-attr]  # always matches
            if end < stop:
                raise self._fail(end, f"invalid \\u escape: {s[end]!r} is not a hex digit")
            self._hex += s[i:end]
            if len(self._hex) == 4:
                self._code_point(int(self._hex, 16))
            return end
        if state == _AFTER_HIGH:
            if s[i] == "\\":
                self._state = _ESCAPE
                return i + 1
            self._flush_high()
            self._state = _STRING
            return i
        if state == _NUMBER:
            end = _NUMBER_RUN.match(s, i).end()  # type: ignore[union-attr]  # always matches
            number_state = self._num_state
            for k in range(i, end):
                following = _NUMBER_NEXT[number_state].get(s[k])
                if following is None:
                    raise self._fail(k, f"invalid number: unexpected {s[k]!r}")
                number_state = following
            self._num_state = number_state
            if end > i:
                self._num_parts.append(s[i:end])
            if end < n:  # the number ends here; s[end] belongs to what follows
                if number_state not in _NUMBER_DONE:
                    raise self._fail(end, f"invalid number: unexpected {s[end]!r}")
                text = "".join(self._num_parts)
                try:
                    number: object = float(text) if number_state >= _N_DOT else int(text)
                except ValueError as exc:  # e.g. more digits than int() accepts
                    raise self._fail(end, f"invalid number: {exc}") from None
                self._value_done(number, events)
            return end
        # _LITERAL
        word = self._literal
        done = self._literal_len
        chunk = s[i : i + len(word) - done]
        if not word.startswith(chunk, done):
            raise self._fail(i, f"invalid literal: expected {word!r}")
        done += len(chunk)
        if done == len(word):
            self._value_done(_LITERAL_VALUES[word], events)
        else:
            self._literal_len = done
        return i + len(chunk)

    def _start_value(self, s: str, i: int, state: int, events: list[StreamEvent]) -> int:
        """Begin the value whose first character is ``s[i]``; return the next index to read."""
        c = s[i]
        if len(self._stack) == 1 and self._keys[0] == self._field:
            if c != '"':
                raise self._fail(i, f"field {self._field!r} must be a JSON string, got {c!r}")
            self._begin_string(_ROLE_TEXT)
            return i + 1
        if c == '"':
            self._begin_string(_ROLE_VALUE)
        elif c == "{":
            self._stack.append({})
            self._keys.append("")
            self._state = _KEY_OR_END
        elif c == "[":
            self._stack.append([])
            self._keys.append("")
            self._state = _VALUE_OR_END
        elif c == "-" or "0" <= c <= "9":
            self._num_state = _N_START
            self._num_parts = []
            self._state = _NUMBER
            return i  # the number automaton reads this character
        elif c in _LITERALS:
            self._literal = _LITERALS[c]
            self._literal_len = 0
            self._state = _LITERAL
            return i
        elif c == "]" and state == _VALUE_OR_END:
            self._close_container(events)
        else:
            raise self._fail(i, f"expected {_EXPECTING[state]}, got {c!r}")
        return i + 1

    def _begin_string(self, role: int) -> None:
        self._role = role
        self._parts = []
        self._sent = 0
        self._state = _STRING

    def _end_string(self, i: int, events: list[StreamEvent]) -> None:
        role = self._role
        parts = self._parts
        if role == _ROLE_TEXT and len(parts) > self._sent:
            self._flush_text(events)
        text = parts[0] if len(parts) == 1 else "".join(parts)
        self._parts = []
        self._sent = 0
        self._role = _ROLE_KEY
        if role == _ROLE_KEY:
            if len(self._stack) == 1 and text in self._root:
                raise self._fail(i, f"duplicate top-level field {text!r}")
            self._keys[-1] = text
            self._state = _COLON
        else:
            self._value_done(text, events)

    def _flush_text(self, events: list[StreamEvent]) -> None:
        parts = self._parts
        sent = self._sent
        events.append(TextDelta(parts[sent] if len(parts) == sent + 1 else "".join(parts[sent:])))
        self._sent = len(parts)

    def _code_point(self, code: int) -> None:
        """Handle the code unit of a complete ``\\uXXXX`` escape (pairing UTF-16 surrogates)."""
        high = self._high
        if high >= 0:
            self._high = -1
            if 0xDC00 <= code <= 0xDFFF:
                self._parts.append(chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)))
                self._state = _STRING
                return
            self._parts.append(chr(high))
        if 0xD800 <= code <= 0xDBFF:
            self._high = code
            self._state = _AFTER_HIGH
        else:
            self._parts.append(chr(code))
            self._state = _STRING

    def _flush_high(self) -> None:
        """A pending high surrogate turned out to be unpaired: keep it as is (as ``json.loads`` does)."""
        if self._high >= 0:
            self._parts.append(chr(self._high))
            self._high = -1

    def _value_done(self, value: object, events: list[StreamEvent]) -> None:
        top = self._stack[-1]
        if isinstance(top, list):
            top.append(value)
        else:
            key = self._keys[-1]
            top[key] = value
            if len(self._stack) == 1:
                if key == self._field and isinstance(value, str):
                    events.append(TextComplete(value))
                else:
                    events.append(FieldValue(key, value))
        self._state = _COMMA_OR_END

    def _close_container(self, events: list[StreamEvent]) -> None:
        container = self._stack.pop()
        self._keys.pop()
        if self._stack:
            self._value_done(container, events)
        else:
            self._state = _DONE
            events.append(ObjectComplete(self._root))


def _decode_escapes(segment: str) -> str:
    """Decode a run of string content made of plain characters and complete escapes (C speed)."""
    decoded: str = _LENIENT.decode(f'"{segment}"')
    return decoded


def parse_structured(text: str, stream_field: str = "answer") -> tuple[list[StreamEvent], dict[str, object]]:
    """Parse a whole JSON text at once: the events a single :meth:`StructuredStreamParser.feed` yields.

    Returns:
        ``(events, object)``.

    Raises:
        StructuredStreamError: the text is not one complete, valid JSON object.
    """
    parser = StructuredStreamParser(stream_field)
    events = parser.feed(text)
    return events, parser.close()
