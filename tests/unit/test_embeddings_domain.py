"""Embedding vectors: normalization, content-addressed keys, the checked codec; the FAQ manifest rules."""

from __future__ import annotations

import math
import pickle
import struct

import pytest

from voxcore.core.domain.embeddings import (
    EMBEDDING_KEY_PREFIX,
    HEADER_SIZE,
    Embedding,
    EmbeddingFormatError,
    decode_embedding,
    embedding_key,
    encode_embedding,
    normalize_text,
)
from voxcore.core.domain.faq import FaqError, check_threshold, parse_faq
from voxcore.core.domain.playlist import PauseItem, StaticItem, TTSItem


def vec(model: str = "m", values: tuple[float, ...] = (0.5, -1.0, 2.25)) -> Embedding:
    return Embedding.from_floats(model, values)


def test_normalize_text_folds_case_spaces_unicode_and_yo() -> None:
    assert normalize_text("  Ещё   РАЗ\tпривет ") == "еще раз привет"
    assert normalize_text("ﬁle") == "file"  # NFKC
    assert normalize_text("   ") == ""


def test_key_is_sha256_of_model_and_text_and_prefixed() -> None:
    a = embedding_key("m1", "когда вы работаете")
    assert a.startswith(EMBEDDING_KEY_PREFIX) and len(a) == len(EMBEDDING_KEY_PREFIX) + 64
    assert a == embedding_key("m1", "когда вы работаете")
    assert a != embedding_key("m2", "когда вы работаете")
    assert a != embedding_key("m1", "когда вы работаете?")
    # model and text are separated: ("ab", "c") and ("a", "bc") differ
    assert embedding_key("ab", "c") != embedding_key("a", "bc")
    assert embedding_key("m1", "x", prefix="t:").startswith("t:" + EMBEDDING_KEY_PREFIX)
    assert "{" not in a  # a single key per command: no hash tag needed


def test_round_trip_is_exact_float32() -> None:
    v = vec(values=(0.1, -3.5, 1e-7))
    raw = encode_embedding(v)
    assert len(raw) == HEADER_SIZE + 1 + 12
    back = decode_embedding(raw, model="m", dimension=3)
    assert back == v
    assert list(back.floats()) == pytest.approx([0.1, -3.5, 1e-7], rel=1e-6)


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda raw: b"XXXX" + raw[4:], "magic"),
        (lambda raw: raw[:4] + bytes([2]) + raw[5:], "version"),
        (lambda raw: raw[:5] + bytes([9]) + raw[6:], "dtype"),
        (lambda raw: raw[:-1], "vector bytes"),
        (lambda raw: raw + b"\0\0\0\0", "vector bytes"),
        (lambda raw: raw[:10], "shorter than"),
        (lambda raw: pickle.dumps([0.5, -1.0, 2.25]), "magic"),
    ],
)
def test_a_header_mismatch_is_refused(mutate, why) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EmbeddingFormatError, match=why):
        decode_embedding(mutate(encode_embedding(vec())), model="m")


def test_wrong_model_or_dimension_is_refused() -> None:
    raw = encode_embedding(vec("model-a"))
    with pytest.raises(EmbeddingFormatError, match="model 'model-a'"):
        decode_embedding(raw, model="model-b")
    with pytest.raises(EmbeddingFormatError, match="dimension 3"):
        decode_embedding(raw, model="model-a", dimension=4)


def test_header_layout_is_documented_one() -> None:
    raw = encode_embedding(vec("ab"))
    assert struct.unpack_from("<4sBBHI", raw) == (b"VXEM", 1, 1, 2, 3)
    assert raw[12:14] == b"ab"


def test_embedding_validation() -> None:
    with pytest.raises(EmbeddingFormatError):
        Embedding(model="m", dimension=2, data=b"\0" * 7)
    with pytest.raises(EmbeddingFormatError):
        Embedding(model="", dimension=1, data=b"\0" * 4)
    with pytest.raises(EmbeddingFormatError, match="NaN"):
        Embedding.from_floats("m", [1.0, math.nan])


MANIFEST = {
    "faq": [
        {
            "id": "hours",
            "questions": ["Когда вы работаете?", "  Какой у вас   график? "],
            "text": "С девяти до девяти.",
        },
        {
            "id": "price",
            "questions": ["Сколько стоит?"],
            "text": "Триста рублей.",
            "reply": [{"static": "price_intro"}, {"tts": "300"}, {"pause_ms": 100}],
        },
    ]
}


def test_parse_faq_builds_playlists() -> None:
    hours, price = parse_faq(MANIFEST)
    assert hours.questions == ("Когда вы работаете?", "Какой у вас график?")
    assert hours.reply.items == (TTSItem("С девяти до девяти."),)
    assert price.reply.items == (StaticItem("static:price_intro"), TTSItem("300"), PauseItem(100))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"faq": []}, "non-empty"),
        ({"faq": [{"id": "Bad Id", "questions": ["q"], "text": "t"}]}, "'id'"),
        ({"faq": [{"id": "a", "questions": [], "text": "t"}]}, "questions"),
        ({"faq": [{"id": "a", "questions": ["q"]}]}, "'text'"),
        ({"faq": [{"id": "a", "questions": ["q"], "text": "t", "extra": 1}]}, "unknown fields"),
        ({"faq": [{"id": "a", "questions": ["q"], "text": "t", "reply": [{"video": "x"}]}]}, "invalid reply"),
        ({"faq": [{"id": "a", "questions": ["q"], "text": "t", "reply": [{"pause_ms": 0}]}]}, "pause"),
        (
            {
                "faq": [
                    {"id": "a", "questions": ["Q"], "text": "t"},
                    {"id": "a", "questions": ["r"], "text": "t"},
                ]
            },
            "used twice",
        ),
        (
            {
                "faq": [
                    {"id": "a", "questions": ["Q x"], "text": "t"},
                    {"id": "b", "questions": ["q  X"], "text": "t"},
                ]
            },
            "also belongs",
        ),
    ],
)
def test_parse_faq_names_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(FaqError, match=message):
        parse_faq(data)


def test_threshold_range() -> None:
    assert check_threshold(0.9) == 0.9
    for bad in (0.0, 1.5, math.nan, -0.1):
        with pytest.raises(FaqError):
            check_threshold(bad)
