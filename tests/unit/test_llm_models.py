"""LLM domain models: messages, stream chunks, the structured answer and its strict JSON schema."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, get_args

import pytest
from pydantic import BaseModel, ValidationError

from voxcore.core.domain.models import (
    MAX_AGGRESSION,
    MIN_AGGRESSION,
    ROLES,
    ConversationHistory,
    ConversationMessage,
    LLMStreamChunk,
    LLMStructuredResponse,
    Role,
    check_history,
    json_schema_for,
    make_message,
)

# -- messages -------------------------------------------------------------------------------------------


def test_roles_are_the_literal_values() -> None:
    assert ROLES == ("user", "assistant", "system")
    assert get_args(Role) == ROLES


@pytest.mark.parametrize("role", ["user", "assistant", "system"])
def test_make_message_builds_the_openai_shape(role: str) -> None:
    message = make_message(role, "Привет")
    assert message == {"role": role, "content": "Привет"}
    assert list(message) == ["role", "content"]


def test_make_message_accepts_empty_content() -> None:
    assert make_message("assistant", "") == {"role": "assistant", "content": ""}


@pytest.mark.parametrize("role", ["", "User", "tool", "function", " user", None, 1])
def test_make_message_rejects_unknown_role(role: Any) -> None:
    with pytest.raises(ValueError, match="role must be one of user, assistant, system"):
        make_message(role, "hi")


@pytest.mark.parametrize("content", [None, 1, b"hi", ["hi"]])
def test_make_message_rejects_non_str_content(content: Any) -> None:
    with pytest.raises(ValueError, match="content must be str"):
        make_message("user", content)


def test_conversation_history_is_a_list_of_messages() -> None:
    history: ConversationHistory = [
        ConversationMessage(role="system", content="Be brief."),
        make_message("user", "Hi"),
    ]
    assert history[0] == {"role": "system", "content": "Be brief."}


def test_check_history_returns_clean_copies() -> None:
    raw = json.loads(
        '[{"role": "user", "content": "hi", "extra": 1}, {"role": "assistant", "content": "yo"}]'
    )
    history = check_history(raw)
    assert history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert history[0] is not raw[0]
    assert check_history([]) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"role": "user", "content": "x"}, "must be a list"),
        ("[]", "must be a list"),
        (["hi"], "message 0 must be a dict"),
        ([{"role": "user", "content": "ok"}, {"role": "bot", "content": "x"}], "message 1: message role"),
        ([{"role": "user"}], "message 0: message content must be str"),
        ([{"content": "x"}], "message 0: message role"),
    ],
)
def test_check_history_rejects_bad_input(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_history(value)


# -- stream chunk -------------------------------------------------------------------------------------


def test_stream_chunk_defaults() -> None:
    chunk = LLMStreamChunk("Hel")
    assert chunk == LLMStreamChunk(
        text_chunk="Hel", is_final_chunk=False, is_safe=None, aggression_score=None
    )


def test_stream_chunk_first_chunk_metadata_and_slots() -> None:
    chunk = LLMStreamChunk("", is_final_chunk=True, is_safe=False, aggression_score=7)
    assert (chunk.is_safe, chunk.aggression_score, chunk.is_final_chunk) == (False, 7, True)
    assert not hasattr(chunk, "__dict__")
    assert [f.name for f in dataclasses.fields(LLMStreamChunk)] == [
        "text_chunk",
        "is_final_chunk",
        "is_safe",
        "aggression_score",
    ]


# -- structured response -----------------------------------------------------------------------------


def test_structured_response_field_order_puts_safety_first_then_the_answer() -> None:
    assert list(LLMStructuredResponse.model_fields) == [
        "is_safe",
        "aggression_score",
        "answer",
        "internal_thought",
    ]


def test_structured_response_defaults_and_required_answer() -> None:
    response = LLMStructuredResponse(answer="Здравствуйте!")
    assert (response.is_safe, response.aggression_score, response.internal_thought) == (True, 0, None)
    with pytest.raises(ValidationError):
        LLMStructuredResponse.model_validate({"is_safe": True})


def test_structured_response_from_llm_json() -> None:
    text = '{"is_safe": false, "aggression_score": 8, "internal_thought": "rude", "answer": "Спокойно."}'
    response = LLMStructuredResponse.model_validate_json(text)
    assert response == LLMStructuredResponse(
        is_safe=False, aggression_score=8, internal_thought="rude", answer="Спокойно."
    )
    assert list(json.loads(response.model_dump_json())) == list(LLMStructuredResponse.model_fields)


@pytest.mark.parametrize(("given", "kept"), [(-3, 0), (0, 0), (5, 5), (10, 10), (11, 10), (10**9, 10)])
def test_aggression_score_is_clamped_to_range(given: int, kept: int) -> None:
    assert (MIN_AGGRESSION, MAX_AGGRESSION) == (0, 10)
    assert LLMStructuredResponse(answer="x", aggression_score=given).aggression_score == kept


def test_structured_response_rejects_wrong_types() -> None:
    with pytest.raises(ValidationError):
        LLMStructuredResponse.model_validate({"answer": 5})
    with pytest.raises(ValidationError):
        LLMStructuredResponse.model_validate({"answer": "x", "aggression_score": "very"})


# -- json schema ---------------------------------------------------------------------------------------


def _walk(node: object) -> list[dict[str, Any]]:
    """Every dict inside a JSON-like value (including itself)."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        found.append(node)
        for child in node.values():
            found.extend(_walk(child))
    elif isinstance(node, list):
        for child in node:
            found.extend(_walk(child))
    return found


def test_json_schema_for_structured_response() -> None:
    response_format = json_schema_for(LLMStructuredResponse)
    assert response_format["type"] == "json_schema"
    spec = response_format["json_schema"]
    assert spec["name"] == "LLMStructuredResponse"
    assert spec["strict"] is True
    schema = spec["schema"]
    assert schema["type"] == "object"
    assert list(schema["properties"]) == ["is_safe", "aggression_score", "answer", "internal_thought"]
    assert schema["required"] == ["is_safe", "aggression_score", "answer", "internal_thought"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["is_safe"]["type"] == "boolean"
    assert schema["properties"]["aggression_score"]["type"] == "integer"
    assert schema["properties"]["answer"]["type"] == "string"
    thought = schema["properties"]["internal_thought"]
    assert {"type": "null"} in thought["anyOf"]
    assert {"type": "string"} in thought["anyOf"]
    # Defaults mean nothing when every field is required; the developer docstring is not sent.
    assert not any("default" in node for node in _walk(schema))
    assert "description" not in schema
    json.dumps(response_format)  # plain JSON


def test_json_schema_for_is_a_fresh_copy() -> None:
    first = json_schema_for(LLMStructuredResponse)
    first["json_schema"]["schema"]["required"].clear()
    assert json_schema_for(LLMStructuredResponse)["json_schema"]["schema"]["required"]


class _Source(BaseModel):
    url: str
    note: str | None = None


class _Cited(BaseModel):
    title: str = "untitled"
    sources: list[_Source] = []
    main: _Source | None = None
    tags: dict[str, int] = {}


def test_json_schema_for_applies_strict_rules_to_nested_models() -> None:
    schema = json_schema_for(_Cited, name="cited_answer")["json_schema"]["schema"]
    assert json_schema_for(_Cited, name="cited_answer")["json_schema"]["name"] == "cited_answer"
    assert list(schema["properties"]) == ["title", "sources", "main", "tags"]
    assert schema["required"] == ["title", "sources", "main", "tags"]
    source = schema["$defs"]["_Source"]
    assert list(source["properties"]) == ["url", "note"]
    assert source["required"] == ["url", "note"]
    assert source["additionalProperties"] is False
    assert {"type": "null"} in source["properties"]["note"]["anyOf"]
    # Every object with properties is closed and fully required; a free-form map keeps its value schema.
    for node in _walk(schema):
        if "properties" in node and isinstance(node["properties"], dict) and "type" in node:
            assert node["required"] == list(node["properties"])
            assert node["additionalProperties"] is False
    assert schema["properties"]["tags"]["additionalProperties"] == {"type": "integer"}
    assert not any("default" in node for node in _walk(schema))


class _HasFieldNamedDefault(BaseModel):
    default: int = 1
    properties: str = "x"


def test_json_schema_for_does_not_confuse_field_names_with_keywords() -> None:
    schema = json_schema_for(_HasFieldNamedDefault)["json_schema"]["schema"]
    assert list(schema["properties"]) == ["default", "properties"]
    assert schema["required"] == ["default", "properties"]


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "ümlaut", "a.b"])
def test_json_schema_for_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="schema name"):
        json_schema_for(LLMStructuredResponse, name=name)
