"""LLM conversation and response types: messages, stream chunks, the structured answer and its schema."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypedDict, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role: TypeAlias = Literal["user", "assistant", "system"]
#: Every valid :data:`Role`, in declaration order.
ROLES: tuple[Role, ...] = get_args(Role)

#: Bounds of :attr:`LLMStructuredResponse.aggression_score`.
MIN_AGGRESSION = 0
MAX_AGGRESSION = 10

_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _drop_description(schema: dict[str, Any]) -> None:
    schema.pop("description", None)


class ConversationMessage(TypedDict):
    """One chat message in the OpenAI ``messages`` shape."""

    role: Role
    content: str


ConversationHistory: TypeAlias = list[ConversationMessage]


@dataclass(slots=True)
class LLMStreamChunk:
    """A piece of a streamed LLM answer.

    Attributes:
        text_chunk: Newly generated answer text (may be empty, e.g. on the final chunk).
        is_final_chunk: True on the last chunk of the answer.
        is_safe: Safety verdict; set on the first chunk only, ``None`` elsewhere or when unknown.
        aggression_score: Aggression 0..10; set on the first chunk only, ``None`` elsewhere or when unknown.
    """

    text_chunk: str
    is_final_chunk: bool = False
    is_safe: bool | None = None
    aggression_score: int | None = None


class LLMStructuredResponse(BaseModel):
    """The structured answer the LLM is asked to produce.

    Field order matters: the safety metadata comes first, so a streaming provider emits it before the
    answer and the caller can act on it before speaking; the answer comes right after it, so the first
    speakable word never waits for a thought (a model writes the fields in schema order).

    Attributes:
        is_safe: False when the user's message is unsafe to answer normally.
        aggression_score: Aggression of the user's message, 0..10; out-of-range integers are clamped.
        answer: The text to speak.
        internal_thought: Optional reasoning that is never spoken (after the answer).
    """

    # The class docstring is for developers; keep it out of the JSON schema the LLM reads.
    model_config = ConfigDict(json_schema_extra=_drop_description)

    is_safe: bool = Field(default=True, description="Whether the user's message is safe to answer normally.")
    aggression_score: int = Field(default=0, description="Aggression of the user's message, 0 (calm) to 10.")
    answer: str = Field(description="The reply to speak to the user.")
    internal_thought: str | None = Field(default=None, description="Private reasoning, never spoken.")

    @field_validator("aggression_score")
    @classmethod
    def _clamp_aggression(cls, value: int) -> int:
        return min(max(value, MIN_AGGRESSION), MAX_AGGRESSION)


def make_message(role: str, content: str) -> ConversationMessage:
    """Build a :class:`ConversationMessage` after checking its parts.

    Args:
        role: One of :data:`ROLES`.
        content: The message text (may be empty).

    Returns:
        The message dict.

    Raises:
        ValueError: ``role`` is not a known role or ``content`` is not a ``str``.
    """
    return _message(role, content)


def check_history(value: object) -> ConversationHistory:
    """Return ``value`` as a :data:`ConversationHistory` after checking every message.

    Useful for a history that was deserialized from JSON. Returns new message dicts holding only
    ``role`` and ``content``.

    Raises:
        ValueError: ``value`` is not a list, or an item is not a dict with a valid role and str content.
    """
    if not isinstance(value, list):
        raise ValueError(f"conversation history must be a list, got {type(value).__name__}")
    history: ConversationHistory = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"history message {index} must be a dict, got {type(item).__name__}")
        try:
            history.append(_message(item.get("role"), item.get("content")))
        except ValueError as exc:
            raise ValueError(f"history message {index}: {exc}") from None
    return history


def _message(role: object, content: object) -> ConversationMessage:
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"message role must be one of {', '.join(ROLES)}; got {role!r}")
    if not isinstance(content, str):
        raise ValueError(f"message content must be str, got {type(content).__name__}")
    return ConversationMessage(role=role, content=content)


def json_schema_for(model: type[BaseModel], *, name: str | None = None) -> dict[str, Any]:
    """OpenAI ``response_format`` for structured output in strict mode.

    Every object schema (including nested models in ``$defs``) lists its ``properties`` in field order,
    marks all of them ``required`` and sets ``additionalProperties: false``, as strict mode demands.
    Optional fields stay nullable (``anyOf`` with ``{"type": "null"}``); defaults are dropped because
    they are meaningless when every field is required.

    Args:
        model: The pydantic model the answer must match.
        name: Schema name (``[A-Za-z0-9_-]{1,64}``); defaults to the model's class name.

    Returns:
        ``{"type": "json_schema", "json_schema": {"name": ..., "schema": ..., "strict": True}}``.

    Raises:
        ValueError: the name does not match the pattern OpenAI accepts.
    """
    schema_name = model.__name__ if name is None else name
    if not _SCHEMA_NAME.fullmatch(schema_name):
        raise ValueError(f"schema name must match [A-Za-z0-9_-]{{1,64}}, got {schema_name!r}")
    schema = _strict(model.model_json_schema(mode="validation"))
    return {
        "type": "json_schema",
        "json_schema": {"name": schema_name, "schema": schema, "strict": True},
    }


def _strict(node: dict[str, Any]) -> dict[str, Any]:
    """Copy of the schema ``node`` with strict-mode object rules applied recursively."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "default":
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {sub: _strict(child) for sub, child in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strict(value)
        elif key in ("anyOf", "allOf", "oneOf", "prefixItems") and isinstance(value, list):
            out[key] = [_strict(child) if isinstance(child, dict) else child for child in value]
        else:
            out[key] = value
    properties = out.get("properties")
    if isinstance(properties, dict):
        out["required"] = list(properties)
        out["additionalProperties"] = False
    return out
