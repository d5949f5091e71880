"""Incremental structured-answer parser: tricky splits, invalid input, and split-invariance properties."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st

from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.models import LLMStructuredResponse
from voxcore.core.domain.structured import (
    MAX_PREAMBLE_CHARS,
    FieldValue,
    ObjectComplete,
    StreamEvent,
    StructuredStreamError,
    StructuredStreamParser,
    TextComplete,
    TextDelta,
    parse_structured,
)

# -- helpers -------------------------------------------------------------------------------------------


def feed_all(
    fragments: Iterable[str], stream_field: str = "answer"
) -> tuple[list[StreamEvent], dict[str, object]]:
    parser = StructuredStreamParser(stream_field)
    events: list[StreamEvent] = []
    for fragment in fragments:
        events.extend(parser.feed(fragment))
    return events, parser.close()


def split_at(text: str, cuts: Iterable[int]) -> list[str]:
    points = sorted({0, len(text), *cuts})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False)]


def coalesce(events: Sequence[StreamEvent]) -> list[StreamEvent]:
    """Merge consecutive TextDelta events (the only split-dependent part of the event stream)."""
    merged: list[StreamEvent] = []
    for event in events:
        if isinstance(event, TextDelta) and merged and isinstance(merged[-1], TextDelta):
            merged[-1] = TextDelta(merged[-1].text + event.text)
        else:
            merged.append(event)
    return merged


def deltas(events: Sequence[StreamEvent]) -> list[str]:
    return [event.text for event in events if isinstance(event, TextDelta)]


def every_split_in_two(text: str) -> Iterable[list[str]]:
    for cut in range(len(text) + 1):
        yield [text[:cut], text[cut:]]


def assert_all_splits_agree(text: str) -> list[StreamEvent]:
    """Events for ``text`` fed whole; check every 2-way split and the 1-char split give the same events."""
    expected, value = feed_all([text])
    assert value == json.loads(text)
    for fragments in [*every_split_in_two(text), list(text)]:
        events, got = feed_all(fragments)
        assert coalesce(events) == expected, fragments
        assert got == value
    return expected


def raises_while_feeding(fragments: Iterable[str]) -> StructuredStreamError:
    """Feed until the parser raises; fail if it only complains in ``close`` (or not at all)."""
    parser = StructuredStreamParser()
    with pytest.raises(StructuredStreamError) as info:
        for fragment in fragments:
            parser.feed(fragment)
    return info.value


# -- basic behaviour ---------------------------------------------------------------------------------

SPEC_EXAMPLE = (
    '{"is_safe": true, "aggression_score": 1, "internal_thought": null, '
    '"answer": "Здравствуйте! Чем помочь?"}'
)


def test_whole_object_events() -> None:
    events, value = parse_structured(SPEC_EXAMPLE)
    answer = "Здравствуйте! Чем помочь?"
    expected: dict[str, object] = {
        "is_safe": True,
        "aggression_score": 1,
        "internal_thought": None,
        "answer": answer,
    }
    assert events == [
        FieldValue("is_safe", True),
        FieldValue("aggression_score", 1),
        FieldValue("internal_thought", None),
        TextDelta(answer),
        TextComplete(answer),
        ObjectComplete(expected),
    ]
    assert value == expected


def test_validate_into_model() -> None:
    parser = StructuredStreamParser()
    parser.feed(SPEC_EXAMPLE)
    response = parser.validate(LLMStructuredResponse)
    assert response == LLMStructuredResponse(aggression_score=1, answer="Здравствуйте! Чем помочь?")


def test_validate_reports_model_mismatch_as_stream_error() -> None:
    parser = StructuredStreamParser()
    parser.feed('{"is_safe": "maybe?", "text": "no answer field"}')
    with pytest.raises(StructuredStreamError, match="does not match LLMStructuredResponse"):
        parser.validate(LLMStructuredResponse)


def test_error_is_a_domain_value_error() -> None:
    assert issubclass(StructuredStreamError, DomainError)
    assert issubclass(StructuredStreamError, ValueError)


def test_text_is_emitted_before_the_closing_quote() -> None:
    parser = StructuredStreamParser()
    assert parser.feed('{"is_safe": true, "answer": "Hel') == [FieldValue("is_safe", True), TextDelta("Hel")]
    assert parser.feed("lo, ") == [TextDelta("lo, ")]
    assert parser.feed("") == []
    assert parser.feed("world") == [TextDelta("world")]
    assert parser.feed('"') == [TextComplete("Hello, world")]
    assert not parser.is_complete
    assert parser.feed(" }") == [ObjectComplete({"is_safe": True, "answer": "Hello, world"})]
    assert parser.is_complete
    assert parser.feed(" \n\t\r ") == []
    assert parser.close() == {"is_safe": True, "answer": "Hello, world"}


def test_field_values_are_emitted_the_moment_they_complete() -> None:
    parser = StructuredStreamParser()
    assert parser.feed('{"is_safe": tru') == []
    assert parser.feed("e") == [FieldValue("is_safe", True)]
    # A number is complete only when something that cannot continue it arrives.
    assert parser.feed(', "aggression_score": 1') == []
    assert parser.feed("0") == []
    assert parser.feed(" ") == [FieldValue("aggression_score", 10)]
    assert parser.feed(', "internal_thought": "a') == []
    assert parser.feed('b"') == [FieldValue("internal_thought", "ab")]
    assert parser.feed(', "meta": {"k": [1, 2') == []
    assert parser.feed("]") == []
    assert parser.feed("}") == [FieldValue("meta", {"k": [1, 2]})]


def test_empty_object_and_empty_containers() -> None:
    assert parse_structured("{}") == ([ObjectComplete({})], {})
    assert parse_structured(" \n{ } ")[1] == {}
    events = assert_all_splits_agree('{"a": {}, "b": [], "c": [[], {}], "answer": ""}')
    assert events == [
        FieldValue("a", {}),
        FieldValue("b", []),
        FieldValue("c", [[], {}]),
        TextComplete(""),
        ObjectComplete({"a": {}, "b": [], "c": [[], {}], "answer": ""}),
    ]


def test_fields_after_the_stream_field() -> None:
    events = assert_all_splits_agree('{"answer": "Да.", "is_safe": false, "aggression_score": 9}')
    assert events == [
        TextDelta("Да."),
        TextComplete("Да."),
        FieldValue("is_safe", False),
        FieldValue("aggression_score", 9),
        ObjectComplete({"answer": "Да.", "is_safe": False, "aggression_score": 9}),
    ]


def test_nested_values_are_parsed() -> None:
    text = (
        '{"tools": [{"name": "weather", "args": {"city": "Москва", "days": [1, 2.5, -3e2, 0, -0.0]}},'
        ' null, true, false, "s", [[[]]]], "deep": {"a": {"b": {"c": {"answer": 5}}}},'
        ' "answer": "ok", "after": {"x": [{"y": null}]}}'
    )
    events = assert_all_splits_agree(text)
    value = json.loads(text)
    assert [e for e in events if isinstance(e, FieldValue)] == [
        FieldValue("tools", value["tools"]),
        FieldValue("deep", value["deep"]),
        FieldValue("after", value["after"]),
    ]
    assert events[-1] == ObjectComplete(value)


def test_missing_stream_field_is_left_to_validation() -> None:
    events, value = parse_structured('{"is_safe": true}')
    assert events == [FieldValue("is_safe", True), ObjectComplete({"is_safe": True})]
    parser = StructuredStreamParser()
    parser.feed('{"is_safe": true}')
    with pytest.raises(StructuredStreamError, match="does not match"):
        parser.validate(LLMStructuredResponse)


def test_custom_stream_field() -> None:
    parser = StructuredStreamParser(stream_field="reply")
    assert parser.stream_field == "reply"
    events = parser.feed('{"answer": "not streamed", "reply": "streamed"}')
    assert events == [
        FieldValue("answer", "not streamed"),
        TextDelta("streamed"),
        TextComplete("streamed"),
        ObjectComplete({"answer": "not streamed", "reply": "streamed"}),
    ]


def test_a_nested_field_with_the_stream_name_is_an_ordinary_value() -> None:
    events, value = parse_structured('{"meta": {"answer": 5}, "answer": "x"}')
    assert events[0] == FieldValue("meta", {"answer": 5})
    assert value == {"meta": {"answer": 5}, "answer": "x"}


def test_events_are_frozen_slotted_dataclasses() -> None:
    for event in (FieldValue("a", 1), TextDelta("x"), TextComplete("x"), ObjectComplete({})):
        assert dataclasses.is_dataclass(event)
        assert not hasattr(event, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, dataclasses.fields(event)[0].name, "y")


# -- tricky splits -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "escaped",
    [
        r"\n",
        r"\"",
        r"\\",
        r"\/",
        r"\b\f\r\t",
        r"\u0416",
        r"\u00e9\u00E9",
        r"\ud83d\ude00",
        r"\uD83D\uDE00",
        r"a\\u0416",  # an escaped backslash followed by the letters u0416
        r"\\\"",
        r"\u005c\u0022",  # \ and " written as \u escapes
        r"\u2028\u0000\u001f",
    ],
)
def test_every_split_of_an_escape_decodes_the_same(escaped: str) -> None:
    text = '{"internal_thought": "' + escaped + '", "answer": "<' + escaped + '>"}'
    events = assert_all_splits_agree(text)
    decoded = json.loads('"' + escaped + '"')
    assert deltas(events) == ["<" + decoded + ">"]
    assert events[0] == FieldValue("internal_thought", decoded)


def test_a_surrogate_pair_is_never_split() -> None:
    text = r'{"answer": "a\ud83d\ude00b\uD83D\uDE4F"}'
    for fragments in [*every_split_in_two(text), list(text)]:
        events, _ = feed_all(fragments)
        for piece in deltas(events):
            assert piece.encode("utf-8", "strict")  # no lone surrogate was emitted
        assert "".join(deltas(events)) == "a\U0001f600b\U0001f64f"


def test_single_characters_decode_one_at_a_time() -> None:
    events, _ = feed_all(list(r'{"answer": "a\u0416\n\ud83d\ude00\"b"}'))
    assert deltas(events) == ["a", "Ж", "\n", "\U0001f600", '"', "b"]


def test_a_pending_escape_is_not_emitted() -> None:
    parser = StructuredStreamParser()
    assert parser.feed('{"answer": "x\\') == [TextDelta("x")]
    assert parser.feed("u04") == []
    assert parser.feed("16") == [TextDelta("Ж")]
    assert parser.feed("\\ud83d") == []  # could still be the first half of a pair
    assert parser.feed("\\") == []
    assert parser.feed("ude00") == [TextDelta("\U0001f600")]


@pytest.mark.parametrize(
    "escaped",
    [
        r"\ud83dx",  # high surrogate then a plain character
        r"\ud83d",  # high surrogate then the closing quote
        r"\ud83d\n",  # high surrogate then another escape
        r"\ud83d\u0041",  # high surrogate then a non-surrogate \u escape
        r"\ud83d\ud83d\ude00",  # two highs: the first is lone, the second pairs
        r"\ude00",  # lone low surrogate
        r"\ude00\ud83d",  # low then high: both lone
        r"\udbff\udfff",  # highest pair
        r"\ud800\udc00",  # lowest pair
    ],
)
def test_lone_surrogates_decode_like_json_loads(escaped: str) -> None:
    text = '{"answer": "' + escaped + '"}'
    events = assert_all_splits_agree(text)
    assert deltas(events) == [json.loads('"' + escaped + '"')]


def test_a_lone_high_surrogate_waits_for_the_next_character() -> None:
    parser = StructuredStreamParser()
    assert parser.feed('{"answer": "\\ud83d') == []
    assert parser.feed("x") == [TextDelta("\ud83dx")]


@pytest.mark.parametrize(
    "text",
    [
        '{"is_safe": true, "aggression_score": 10, "x": false, "y": null, "answer": "a"}',
        '{"n": [0, -0, 12, -12, 1.5, -1.25e-3, 2E+10, 3e5, 0.0e0, 1e400, -1e400]}',
        '{"big": 123456789012345678901234567890, "answer": "x"}',
        '{"nums":[1,2,3],"lits":[true,false,null],"answer":"x"}',
    ],
)
def test_every_split_inside_numbers_and_literals(text: str) -> None:
    assert_all_splits_agree(text)


def test_whitespace_anywhere() -> None:
    text = ' \n\t{ \r\n"is_safe" \t:\n true ,\n "n" : [ 1 , { "a" : 2 } ] ,  "answer"\n:\n"x y"\n}\n\t '
    events = assert_all_splits_agree(text)
    assert deltas(events) == ["x y"]


def test_split_inside_a_key() -> None:
    parser = StructuredStreamParser()
    assert parser.feed('{"ans') == []
    assert parser.feed('wer": "') == []
    assert parser.feed("ok") == [TextDelta("ok")]
    assert_all_splits_agree('{"is_\\u0073afe": true, "\\u0061nswer": "via escaped key"}')


def test_huge_integer_is_rejected_like_json_loads() -> None:
    text = '{"n": ' + "9" * 5000 + "}"
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(StructuredStreamError, match="invalid number"):
        parse_structured(text)


def test_infinite_float_literal_matches_json_loads() -> None:
    _, value = parse_structured('{"f": 1e999, "g": -1e999}')
    assert value == {"f": math.inf, "g": -math.inf}


# -- invalid input -------------------------------------------------------------------------------------

INVALID = [
    ("", "ended"),
    ("   ", "ended"),
    ("[1, 2]", "ended"),
    ('"answer"', "ended"),
    ("42", "ended"),
    ("null", "ended"),
    ("{'answer': 'x'}", "expected a field name or '}'"),
    ('{answer: "x"}', "expected a field name"),
    ('{"a" 1}', "expected ':'"),
    ('{"a": }', "expected a value"),
    ('{"a": 1,}', "expected a field name"),
    ("{,}", "expected a field name or '}'"),
    ('{"a": 1 "b": 2}', "expected ',' or '}'"),
    ('{"a": [1 2]}', "expected ',' or ']'"),
    ('{"a": [1,]}', "expected a value"),
    ('{"a": [,1]}', "expected a value or ']'"),
    ('{"a": {"b": 1]}', "expected ',' or '}'"),
    ('{"a": [1}', "expected ',' or ']'"),
    ('{"a": tru}', "invalid literal"),
    ('{"a": trUe}', "invalid literal"),
    ('{"a": truex}', "expected ',' or '}'"),
    ('{"a": nul}', "invalid literal"),
    ('{"a": falsy}', "invalid literal"),
    ('{"a": NaN}', "expected a value"),
    ('{"a": Infinity}', "expected a value"),
    ('{"a": -Infinity}', "invalid number"),
    ('{"a": 01}', "invalid number"),
    ('{"a": -01}', "invalid number"),
    ('{"a": 1.}', "invalid number"),
    ('{"a": 1.e5}', "invalid number"),
    ('{"a": .5}', "expected a value"),
    ('{"a": -}', "invalid number"),
    ('{"a": --1}', "invalid number"),
    ('{"a": +1}', "expected a value"),
    ('{"a": 1e}', "invalid number"),
    ('{"a": 1e+}', "invalid number"),
    ('{"a": 1-2}', "invalid number"),
    ('{"a": 0x10}', "expected ',' or '}'"),
    ('{"a": "x\\q"}', "invalid escape"),
    ('{"a": "x\\U0416"}', "invalid escape"),
    ('{"a": "x\\u04g6"}', "not a hex digit"),
    ('{"a": "x\\u04"}', "not a hex digit"),
    ('{"a": 1, "a": 2}', "duplicate top-level field 'a'"),
    ('{"answer": "x", "answer": "y"}', "duplicate top-level field 'answer'"),
    ('{"answer": 5}', "must be a JSON string"),
    ('{"answer": null}', "must be a JSON string"),
    ('{"answer": true}', "must be a JSON string"),
    ('{"answer": ["x"]}', "must be a JSON string"),
    ('{"answer": {"text": "x"}}', "must be a JSON string"),
    ('{"answer": -1}', "must be a JSON string"),
    ('{"a": 1', "ended"),
    ("x" * 201 + '{"a": 1}', "within 200 characters"),
    ('{"answer": "unterminated', "ended"),
    ('{"answer": "x\\', "ended"),
    ('{"answer": "x\\u00', "ended"),
    ('{"answer": "x\\ud83d', "ended"),
    ('{"answer": "x"', "ended"),
    ('{"a": [1, {"b": ', "ended"),
    ('{"a": 12', "ended"),
    ('{"a": fals', "ended"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_text_raises(text: str, message: str) -> None:
    parser = StructuredStreamParser()
    with pytest.raises(StructuredStreamError, match=message):
        parser.feed(text)
        parser.close()


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_text_raises_for_any_split(text: str, message: str) -> None:
    for fragments in [*every_split_in_two(text), list(text)]:
        parser = StructuredStreamParser()
        with pytest.raises(StructuredStreamError, match=message):
            for fragment in fragments:
                parser.feed(fragment)
            parser.close()


@pytest.mark.parametrize(("text", "message"), [(t, m) for t, m in INVALID if m != "ended"])
def test_invalid_text_raises_during_feed_not_only_at_close(text: str, message: str) -> None:
    error = raises_while_feeding(list(text))
    assert message in str(error)


@pytest.mark.parametrize(
    ("text", "message"), [(t, m) for t, m in INVALID if "duplicate" not in m and "JSON string" not in m]
)
def test_invalid_cases_are_invalid_json_or_not_an_object(text: str, message: str) -> None:
    """Sanity check of the table: json.loads rejects these too (apart from NaN/Infinity, which it allows)."""
    try:
        value = json.loads(text)
    except ValueError:
        return
    assert not isinstance(value, dict) or any(word in text for word in ("NaN", "Infinity"))


def test_error_message_names_the_position() -> None:
    parser = StructuredStreamParser()
    parser.feed('{"a": ')
    expected = r"invalid JSON at character 8: expected a value, got '\]'"
    with pytest.raises(StructuredStreamError, match=expected):
        parser.feed("  ]")


def test_errors_are_sticky() -> None:
    parser = StructuredStreamParser()
    with pytest.raises(StructuredStreamError, match="expected ':'") as first:
        parser.feed('{"a" 1}')
    for call in (lambda: parser.feed(""), lambda: parser.feed(": 1}"), parser.close):
        with pytest.raises(StructuredStreamError) as again:
            call()
        assert str(again.value) == str(first.value)


def test_close_before_the_object_ends() -> None:
    parser = StructuredStreamParser()
    parser.feed('{"is_safe": true, "answer": "Hello')
    with pytest.raises(
        StructuredStreamError,
        match=r"stream ended after 34 characters before the JSON object was complete in field 'answer'",
    ):
        parser.close()


def test_close_raises_for_every_proper_prefix() -> None:
    text = '{"is_safe": true, "n": [1, {"b": null}], "answer": "a\\u0416\\ud83d\\ude00"}'
    for cut in range(len(text)):
        parser = StructuredStreamParser()
        parser.feed(text[:cut])
        with pytest.raises(StructuredStreamError, match="ended"):
            parser.close()


# -- property tests ------------------------------------------------------------------------------------

# Characters that stress the string scanner: quotes, backslashes, control characters, escapes-lookalikes,
# non-BMP characters (surrogate pairs under ensure_ascii) and line separators.
_TRICKY = '"\\/\x00\x01\x08\x0c\n\r\t\x1f\x7f\u2028\u2029\ufeffuЖжé😀🙏𝄞\U0010ffff'
_TEXT = st.text(st.one_of(st.characters(), st.sampled_from(_TRICKY)), max_size=40)
_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _TEXT
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=12,
)


@st.composite
def structured_texts(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    """(JSON text, stream field's value, other fields) with random field order and formatting."""
    answer = draw(_TEXT)
    others = draw(st.dictionaries(_TEXT.filter(lambda key: key != "answer"), _VALUES, max_size=5))
    items = draw(st.permutations([("answer", answer), *others.items()]))
    text = json.dumps(
        dict(items),
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 0, 2, "\t"])),
        separators=draw(st.sampled_from([None, (",", ":"), (" , ", " : ")])),
    )
    text = draw(st.sampled_from(["", " ", "\n"])) + text + draw(st.sampled_from(["", " ", "\r\n\t "]))
    return text, answer, others


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=structured_texts(), data=st.data())
def test_any_split_gives_the_same_events(case: tuple[str, str, dict[str, Any]], data: st.DataObject) -> None:
    text, answer, others = case
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=max(1, len(text))), label="cuts")
    fragments = split_at(text, cuts)

    events, value = feed_all(fragments)
    whole_events, whole_value = feed_all([text])

    # (a) the streamed text is exactly the field's value, and TextComplete carries it whole
    assert "".join(deltas(events)) == answer
    assert all(piece for piece in deltas(events))
    assert [e for e in events if isinstance(e, TextComplete)] == [TextComplete(answer)]
    # (b) every other field arrives once, as its own FieldValue, in text order
    field_values = [e for e in events if isinstance(e, FieldValue)]
    assert {e.name: e.value for e in field_values} == others
    assert len(field_values) == len(others)
    # (c) the final object is what json.loads returns
    assert value == json.loads(text) == whole_value
    assert events[-1] == ObjectComplete(value)
    assert sum(isinstance(e, ObjectComplete) for e in events) == 1
    # (d) the events do not depend on how the text was split
    assert coalesce(events) == coalesce(whole_events)


@settings(max_examples=150, deadline=None)
@given(case=structured_texts())
def test_one_character_fragments_emit_each_character_once(case: tuple[str, str, dict[str, Any]]) -> None:
    text, answer, _ = case
    events, _ = feed_all(list(text))
    pieces = deltas(events)
    assert "".join(pieces) == answer
    # With 1-char fragments a delta can only hold what one input character completed: one decoded
    # character, or two when a lone high surrogate is flushed by the character after it.
    assert all(1 <= len(piece) <= 2 for piece in pieces)


@settings(max_examples=150, deadline=None)
@given(case=structured_texts(), data=st.data())
def test_close_raises_on_any_truncation(case: tuple[str, str, dict[str, Any]], data: st.DataObject) -> None:
    text = case[0]
    end = text.rstrip().rindex("}")
    cut = data.draw(st.integers(0, end), label="cut")  # drops at least the closing brace
    parser = StructuredStreamParser()
    for fragment in split_at(text[:cut], data.draw(st.lists(st.integers(0, cut)), label="cuts")):
        parser.feed(fragment)
    with pytest.raises(StructuredStreamError, match="ended"):
        parser.close()


def _reference(text: str) -> dict[str, object] | None:
    """What the parser must return for ``text``, by json.loads, or None if the parser must reject it."""
    top_pairs: list[list[tuple[str, Any]]] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        top_pairs.append(pairs)  # the top-level object is the last one to finish
        return dict(pairs)

    def no_constants(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    # The parser's tolerance: raw control characters in strings, a short preamble before the first '{',
    # anything after the object.
    start = text.find("{")
    if start < 0 or len("".join(text[:start].split())) > MAX_PREAMBLE_CHARS:
        return None
    decoder = json.JSONDecoder(object_pairs_hook=pairs_hook, parse_constant=no_constants, strict=False)
    try:
        value, _end = decoder.raw_decode(text, start)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    keys = [key for key, _ in top_pairs[-1]]
    if len(set(keys)) != len(keys):
        return None
    if "answer" in value and not isinstance(value["answer"], str):
        return None
    return value


_NOISE = st.sampled_from(
    [*'{}[]:,"\\ u0123456789-+.eEtrufalsn\x00\x1f\x7f\n', "\\u", "\\ud83d", "true", "null"]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=structured_texts(), data=st.data())
def test_mutated_text_is_accepted_exactly_when_a_lenient_json_decoder_accepts_it(
    case: tuple[str, str, dict[str, Any]], data: st.DataObject
) -> None:
    text = case[0]
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        start = data.draw(st.integers(0, len(text)), label="at")
        stop = data.draw(st.integers(start, min(len(text), start + 3)), label="to")
        text = text[:start] + data.draw(st.one_of(st.just(""), _NOISE), label="insert") + text[stop:]
    fragments = split_at(text, data.draw(st.lists(st.integers(0, len(text)), max_size=8), label="cuts"))

    expected = _reference(text)
    parser = StructuredStreamParser()
    try:
        events: list[StreamEvent] = []
        for fragment in fragments:
            events.extend(parser.feed(fragment))
        value = parser.close()
    except StructuredStreamError:
        hypothesis_event("rejected")
        assert expected is None, text
    else:
        hypothesis_event("accepted")
        assert expected is not None, text
        assert value == expected
        assert events[-1] == ObjectComplete(expected)
        if "answer" in expected:
            assert "".join(deltas(events)) == expected["answer"]


# -- cost -----------------------------------------------------------------------------------------------


def test_a_200_kb_answer_in_one_character_fragments_is_linear() -> None:
    """A parser that re-read its buffer per fragment would need ~2*10^10 steps here; ours needs ~2*10^5.

    The bound is deliberately loose (machines vary); the test exists to catch quadratic behaviour.
    """
    answer = ('Привет, "мир"! \\ 😀\n' * 10_000)[:200_000]
    text = json.dumps({"is_safe": True, "aggression_score": 0, "answer": answer}, ensure_ascii=False)
    assert len(text) > 200_000
    parser = StructuredStreamParser()
    received: list[str] = []
    started = time.perf_counter()
    for char in text:
        for event in parser.feed(char):
            if isinstance(event, TextDelta):
                received.append(event.text)
    elapsed = time.perf_counter() - started
    assert "".join(received) == answer
    assert parser.close()["answer"] == answer
    assert elapsed < 20.0, f"feeding {len(text)} one-character fragments took {elapsed:.1f} s"


# -- tolerance of what real models emit ---------------------------------------------------------------------

TOLERATED = [
    # raw control characters inside strings (grammar-constrained servers emit them)
    ('{"is_safe": true, "answer": "строка\nвторая\tтаб"}', "строка\nвторая\tтаб", 0, 0),
    ('{"a\x00": 1, "answer": "x\x1fy"}', "x\x1fy", 0, 0),
    # a markdown fence or a short preamble before the object, text after it
    ('```json\n{"answer": "да"}\n```', "да", 7, 4),
    ('Ответ: {"answer": "да"} Надеюсь, помог.', "да", 6, 16),
    ('\ufeff{"answer": "да"}', "да", 1, 0),
    ('{"answer": "да"}}{}', "да", 0, 3),
]


@pytest.mark.parametrize(("text", "answer", "skipped", "trailing"), TOLERATED)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_tolerated_text(text: str, answer: str, skipped: int, trailing: int, step: int) -> None:
    parser = StructuredStreamParser()
    deltas: list[str] = []
    for start in range(0, len(text), step):
        for event in parser.feed(text[start : start + step]):
            if isinstance(event, TextDelta):
                deltas.append(event.text)
    assert parser.is_complete
    assert "".join(deltas) == answer and parser.close()["answer"] == answer
    assert parser.skipped_chars == skipped and parser.trailing_chars == trailing
