"""Sentence splitting of streamed text, the hybrid structured answer and its playlist, turn metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from voxcore.core.domain.hybrid import (
    TURN_ATTRIBUTE_PREFIX,
    HybridStructuredResponse,
    HybridTurnMetrics,
    StaticSegment,
    TTSSegment,
    playlist_from_response,
    segment_items,
    sentence_items,
    spoken_text,
    static_fragment_key,
)
from voxcore.core.domain.models import LLMStructuredResponse, json_schema_for
from voxcore.core.domain.playlist import PlaylistError, StaticItem, TTSItem
from voxcore.core.domain.sentences import SentenceSplitter, SentenceSplitterError
from voxcore.core.domain.structured import FieldValue, StructuredStreamParser, TextDelta

# -- helpers ---------------------------------------------------------------------------------------------


def split_all(pieces: Iterable[str], **kwargs: object) -> list[str]:
    splitter = SentenceSplitter(**kwargs)  # type: ignore[arg-type]
    out: list[str] = []
    for piece in pieces:
        out.extend(splitter.feed(piece))
    last = splitter.flush()
    return [*out, last] if last is not None else out


def cut(text: str, points: Iterable[int]) -> list[str]:
    marks = sorted({0, len(text), *(p % (len(text) + 1) for p in points)})
    return [text[a:b] for a, b in zip(marks, marks[1:], strict=False)]


def squash(text: str) -> str:
    return "".join(text.split())


# -- sentence boundaries ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Здравствуйте! Чем могу помочь? Ваш заказ готов.",
            ["Здравствуйте!", "Чем могу помочь?", "Ваш заказ готов."],
        ),
        (
            "Hello there. How are you today? Fine, thanks!",
            ["Hello there.", "How are you today?", "Fine, thanks!"],
        ),
        ("Хм… Подумаю над этим. Ладно!", ["Хм… Подумаю над этим.", "Ладно!"]),  # "Хм…" alone is too short
        ("Стоимость 12.5 тысяч. Оплатить можно картой.", ["Стоимость 12.5 тысяч.", "Оплатить можно картой."]),
        ("Это т.е. почти даром. Берите сейчас.", ["Это т.е. почти даром.", "Берите сейчас."]),
        ("Сумма 500 руб. Спасибо за звонок.", ["Сумма 500 руб. Спасибо за звонок."]),  # "руб." never ends
        ("Переезд в 1990 г. Москва изменилась.", ["Переезд в 1990 г. Москва изменилась."]),
        ("Ask Mr. Smith about it. He knows everything.", ["Ask Mr. Smith about it.", "He knows everything."]),
        ("Это написал А. С. Пушкин давно. Правда?", ["Это написал А. С. Пушкин давно.", "Правда?"]),
        ("Ну... то есть не совсем так. Зато быстро.", ["Ну... то есть не совсем так.", "Зато быстро."]),
        ("Подождите... Сейчас проверю ваш счёт.", ["Подождите...", "Сейчас проверю ваш счёт."]),
        (
            "Купите хлеб, молоко и т.д. Потом идите домой.",
            ["Купите хлеб, молоко и т.д.", "Потом идите домой."],
        ),
        ("Он сказал: «Всё готово!» Потом ушёл домой.", ["Он сказал: «Всё готово!»", "Потом ушёл домой."]),
        ("Сайт example.com работает. Заходите к нам!", ["Сайт example.com работает.", "Заходите к нам!"]),
        ("Что?! Не может быть такого. Правда.", ["Что?! Не может быть такого.", "Правда."]),
        (
            "  Пробелы\n\tвнутри   текста.  Второе  предложение.  ",
            ["Пробелы внутри текста.", "Второе предложение."],
        ),
        ("", []),
        ("   ", []),
        ("Без точки в конце", ["Без точки в конце"]),
    ],
)
def test_sentence_boundaries(text: str, expected: list[str]) -> None:
    assert split_all([text]) == expected
    assert split_all(text) == expected  # one character at a time


def test_short_sentences_are_merged_with_the_next() -> None:
    assert split_all(["Да. Нет. Хорошо, давайте ещё раз."]) == ["Да. Нет. Хорошо, давайте ещё раз."]
    assert split_all(["Да. Нет."], min_chars=0) == ["Да.", "Нет."]


def test_clause_marks_split_only_when_asked() -> None:
    text = "Варианты такие; первый дешевле. Второй: быстрее всех."
    assert split_all([text]) == ["Варианты такие; первый дешевле.", "Второй: быстрее всех."]
    assert split_all([text], split_on_clauses=True, min_chars=0) == [
        "Варианты такие;",
        "первый дешевле.",
        "Второй:",
        "быстрее всех.",
    ]


def test_long_sentences_are_cut_at_a_comma_then_a_space_then_hard() -> None:
    long = "Первая часть длинного предложения, " + "слово " * 20 + "конец."
    pieces = split_all([long], max_chars=60, min_chars=10)
    assert pieces[0] == "Первая часть длинного предложения,"
    assert all(len(p) <= 60 for p in pieces)
    assert squash(" ".join(pieces)) == squash(long)

    words = split_all(["слово " * 30], max_chars=40, min_chars=5)
    assert all(len(p) <= 40 and not p.endswith(" ") for p in words)
    assert all(set(p.split()) == {"слово"} for p in words)

    hard = split_all(["x" * 95], max_chars=40)
    assert hard == ["x" * 40, "x" * 40, "x" * 15]


def test_a_sentence_of_exactly_max_chars_ends_at_its_mark() -> None:
    sentence = "а" * 29 + "."
    assert split_all([sentence + " Дальше текст."], max_chars=30) == [sentence, "Дальше текст."]


def test_decisions_wait_for_the_next_character() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Это т.е") == []
    assert splitter.feed(". ") == []  # "т.е. " may be an abbreviation: decided by what follows
    assert splitter.feed("это") == []
    assert splitter.feed(" одно предложение. ") == []  # the next character is not there yet
    assert splitter.feed("Д") == ["Это т.е. это одно предложение."]
    assert splitter.pending == "Д"
    assert splitter.flush() == "Д"
    assert splitter.flush() is None


@pytest.mark.parametrize("kwargs", [{"max_chars": 1}, {"min_chars": 11, "max_chars": 20}, {"min_chars": -1}])
def test_bad_lengths_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(SentenceSplitterError):
        SentenceSplitter(**kwargs)  # type: ignore[arg-type]


def test_feed_refuses_non_text() -> None:
    with pytest.raises(TypeError):
        SentenceSplitter().feed(b"bytes")  # type: ignore[arg-type]


def test_splitting_is_linear() -> None:
    text = ("Сумма 12.5 тыс. руб., т.е. немного; Mr. Smith согласен... Да! " * 4000)[:200_000]
    started = time.perf_counter()
    whole = split_all([text])
    one_by_one = split_all(text)
    elapsed = time.perf_counter() - started
    assert whole == one_by_one
    assert elapsed < 5.0  # ~1 s on a slow machine; quadratic work would take minutes


_ALPHABET = st.sampled_from(
    list('абв Аб.,!?…;:—-"»«()12 \nт.ег') + ["т.е. ", "руб. ", "... ", "Mr. ", "12.5"]
)


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(_ALPHABET, max_size=120).map("".join),
    points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    min_chars=st.integers(min_value=0, max_value=8),
    max_chars=st.integers(min_value=16, max_value=60),
    clauses=st.booleans(),
)
def test_any_split_of_the_stream_gives_the_same_sentences(
    text: str, points: list[int], min_chars: int, max_chars: int, clauses: bool
) -> None:
    options = {"min_chars": min_chars, "max_chars": max_chars, "split_on_clauses": clauses}
    whole = split_all([text], **options)
    assert split_all(cut(text, points), **options) == whole
    assert split_all(text, **options) == whole
    # The text survives (modulo whitespace), pieces are trimmed, within bounds, and never empty.
    assert squash("".join(whole)) == squash(text)
    for piece in whole:
        assert piece and piece == piece.strip() and len(piece) <= max_chars
    for piece in whole[:-1]:
        assert len(piece) >= min_chars


# -- the structured answer -------------------------------------------------------------------------------


def test_schema_is_strict_and_keeps_the_field_order() -> None:
    schema = json_schema_for(HybridStructuredResponse)["json_schema"]["schema"]
    assert list(schema["properties"]) == [
        "is_safe",
        "aggression_score",
        "answer",
        "internal_thought",
        "segments",
    ]
    assert schema["required"] == list(schema["properties"]) and schema["additionalProperties"] is False
    items = schema["properties"]["segments"]["items"]["anyOf"]
    assert [ref["$ref"] for ref in items] == ["#/$defs/StaticSegment", "#/$defs/TTSSegment"]
    for name, prop in (("StaticSegment", "static"), ("TTSSegment", "tts")):
        definition = schema["$defs"][name]
        assert definition["required"] == [prop] and definition["additionalProperties"] is False
        assert "description" not in definition  # docstrings are for developers
    assert "default" not in json.dumps(schema)


def test_segments_validate_and_refuse_mixed_objects() -> None:
    answer = HybridStructuredResponse.model_validate_json(
        '{"is_safe": true, "aggression_score": 0, "internal_thought": null, "answer": "",'
        ' "segments": [{"static": "intro"}, {"tts": "12 500"}, {"static": "currency_rub_many"}]}'
    )
    assert answer.segments == [
        StaticSegment(static="intro"),
        TTSSegment(tts="12 500"),
        StaticSegment(static="currency_rub_many"),
    ]
    with pytest.raises(ValidationError):
        HybridStructuredResponse.model_validate({"answer": "", "segments": [{"static": "a", "tts": "b"}]})
    assert isinstance(answer, LLMStructuredResponse)


def test_playlist_from_segments_and_free_text() -> None:
    response = HybridStructuredResponse(
        answer="Секунду, проверяю. Нашла ваш заказ.",
        segments=[
            StaticSegment(static="intro"),
            TTSSegment(tts="12500"),
            StaticSegment(static="static:rub_many"),
        ],
    )
    built = playlist_from_response(response)
    assert built.rejected == ()
    assert built.playlist is not None
    assert list(built.playlist) == [
        TTSItem("Секунду, проверяю."),
        TTSItem("Нашла ваш заказ."),
        StaticItem("static:intro"),
        TTSItem("12 500"),
        StaticItem("static:rub_many"),
    ]


def test_playlist_rejects_unknown_or_invalid_segments() -> None:
    response = HybridStructuredResponse(
        answer="",
        segments=[
            StaticSegment(static="intro"),
            StaticSegment(static="made_up"),
            StaticSegment(static=" "),
            TTSSegment(tts="\u200b"),
            TTSSegment(tts="5"),
        ],
    )
    built = playlist_from_response(response, known_static={"static:intro"})
    assert built.playlist is not None and list(built.playlist) == [StaticItem("static:intro"), TTSItem("5")]
    assert [(r.index, r.segment) for r in built.rejected] == [
        (1, "static:made_up"),
        (2, "static: "),
        (3, "tts:\u200b"),
    ]
    assert all(r.reason for r in built.rejected)


def test_plain_answer_and_empty_answer() -> None:
    built = playlist_from_response(LLMStructuredResponse(answer="Хорошо. Сделаю прямо сейчас."))
    assert built.playlist is not None and built.playlist.tts_texts == ("Хорошо. Сделаю прямо сейчас.",)
    assert playlist_from_response(HybridStructuredResponse(answer="  ")).playlist is None


def test_segment_items_from_a_streaming_parser() -> None:
    parser = StructuredStreamParser("answer")
    events = parser.feed(
        '{"is_safe":true,"aggression_score":0,"internal_thought":null,"answer":"Итак.",'
        '"segments":[{"static":"intro"},{"tts":"7"},{"oops":1}]}'
    )
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Итак."]
    (segments,) = [e.value for e in events if isinstance(e, FieldValue) and e.name == "segments"]
    assert isinstance(segments, list)
    items, rejected = segment_items(segments)
    assert items == [StaticItem("static:intro"), TTSItem("7")]
    assert [r.index for r in rejected] == [2]


def test_helpers() -> None:
    assert static_fragment_key("intro") == "static:intro"
    assert static_fragment_key("static:intro") == "static:intro"
    with pytest.raises(PlaylistError):
        static_fragment_key("")
    assert [i.text for i in sentence_items("Раз два три. Четыре пять шесть.")] == [
        "Раз два три.",
        "Четыре пять шесть.",
    ]
    response = HybridStructuredResponse(
        answer="Итак.",
        segments=[StaticSegment(static="intro"), TTSSegment(tts="12 500"), StaticSegment(static="x")],
    )
    assert spoken_text(response, {"static:intro": "Ваша стоимость составляет"}) == (
        "Итак. Ваша стоимость составляет 12 500"
    )


def test_turn_metrics_fields_and_span_attributes_share_keys() -> None:
    metrics = HybridTurnMetrics(
        items=3,
        time_to_first_audio_ms=120.4,
        playlist_first_audio_ms=0.4,
        total_ms=12.0,
        hits=2,
        misses=1,
        tts_ttfb_ms=None,
        converted=0,
        skipped=0,
        failed=0,
        chunks=40,
        outcome="ok",
    )
    fields = metrics.fields()
    assert "tts_ttfb_ms" not in fields and fields["items"] == 3 and fields["outcome"] == "ok"
    assert metrics.span_attributes() == {TURN_ATTRIBUTE_PREFIX + k: v for k, v in fields.items()}
