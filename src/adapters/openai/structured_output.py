"""Structured-output modes of a chat request, and the fallback ``auto`` learns once per base URL.

::

    llm.structured_output   variants tried, in order        what the request carries
    json_schema             json_schema                     response_format json_schema (strict)
    json_object             json_object+schema, json_object response_format json_object (+ its schema,
                                                            for servers that take one); the schema in
                                                            the prompt
    instructions            instructions                    nothing: the prompt asks for JSON
    auto                    all of the above                the first variant the server accepts

A server that refuses a variant answers 400/422/500 with a body naming ``response_format`` (llama.cpp:
``500 ... Input should be 'text' or 'json_object'``). The next variant of the configured mode is then
tried at once, and the one that works is remembered for the base URL for the life of the process, so
the refusal costs one round trip per process, never one per turn. A refusal with no variant left will
repeat on every turn: it is raised as a non-transient error whose message names the setting to change.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any, Final, Literal

from pydantic import BaseModel

from voxcore.core.domain.models import ConversationMessage, json_schema_for

StructuredOutput = Literal["auto", "json_schema", "json_object", "instructions"]
STRUCTURED_OUTPUTS: Final[tuple[StructuredOutput, ...]] = (
    "auto",
    "json_schema",
    "json_object",
    "instructions",
)
#: What a request may carry; ``json_object_schema`` is JSON mode with the schema in ``response_format``.
Variant = Literal["json_schema", "json_object_schema", "json_object", "instructions"]
_CHAINS: Final[dict[str, tuple[Variant, ...]]] = {
    "auto": ("json_schema", "json_object_schema", "json_object", "instructions"),
    "json_schema": ("json_schema",),
    "json_object": ("json_object_schema", "json_object"),
    "instructions": ("instructions",),
}
#: Statuses with which servers refuse a ``response_format`` they do not support.
REFUSAL_STATUSES: Final = frozenset({400, 422, 500})

_lock = threading.Lock()
_learned: dict[tuple[str, str], Variant] = {}


def mode_of(variant: Variant) -> str:
    """The ``llm.structured_output`` value a variant belongs to."""
    return "json_object" if variant == "json_object_schema" else variant


def first_variant(base_url: str, mode: str) -> Variant:
    """The variant to send to ``base_url`` in ``mode``: the learned one, else the first of the chain."""
    learned = _learned.get((base_url, mode))
    return learned if learned is not None else _CHAINS[mode][0]


def next_variant(mode: str, variant: Variant) -> Variant | None:
    """The variant to try after ``variant`` was refused, or ``None`` when ``mode`` has none left."""
    chain = _CHAINS[mode]
    index = chain.index(variant) if variant in chain else len(chain)
    return chain[index + 1] if index + 1 < len(chain) else None


def remember(base_url: str, mode: str, variant: Variant) -> None:
    """Use ``variant`` for ``base_url`` in ``mode`` from now on (for the life of the process)."""
    with _lock:
        _learned[(base_url, mode)] = variant


def learned_variants() -> dict[tuple[str, str], Variant]:
    """A copy of what was learned so far: ``{(base_url, mode): variant}``."""
    with _lock:
        return dict(_learned)


def forget_learned() -> None:
    """Forget every learned variant (tests; a host that points at a changed server)."""
    with _lock:
        _learned.clear()


def refuses_response_format(status: int, body: bytes) -> bool:
    """Whether an error answer says the server does not support the ``response_format`` sent."""
    return status in REFUSAL_STATUSES and b"response_format" in body


def apply_variant(
    body: dict[str, Any],
    messages: list[ConversationMessage],
    variant: Variant,
    response_model: type[BaseModel],
) -> None:
    """Set ``body["response_format"]`` and ``body["messages"]`` for ``variant`` (in place)."""
    if variant == "json_schema":
        body["response_format"] = _json_schema_format(response_model)
        body["messages"] = messages
    elif variant == "instructions":
        body.pop("response_format", None)
        body["messages"] = messages
    else:
        if variant == "json_object_schema":
            body["response_format"] = _json_object_format(response_model)
        else:
            body["response_format"] = _JSON_OBJECT
        body["messages"] = [*messages, _schema_message(response_model)]


_JSON_OBJECT: Final = {"type": "json_object"}


@functools.lru_cache(maxsize=64)
def _json_schema_format(response_model: type[BaseModel]) -> dict[str, Any]:
    """``response_format`` of a model, built once per model (it is never mutated)."""
    return json_schema_for(response_model)


@functools.lru_cache(maxsize=64)
def _json_object_format(response_model: type[BaseModel]) -> dict[str, Any]:
    schema = _json_schema_format(response_model)["json_schema"]["schema"]
    return {"type": "json_object", "schema": schema}


@functools.lru_cache(maxsize=64)
def _schema_message(response_model: type[BaseModel]) -> ConversationMessage:
    schema = _json_schema_format(response_model)["json_schema"]["schema"]
    text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    return ConversationMessage(
        role="system",
        content=f"JSON schema of the answer (one object, fields in this order, nothing else): {text}",
    )


def refusal_hint(mode: str, variant: Variant) -> str:
    """What to change when ``variant`` is refused and ``mode`` has nothing left to try."""
    if mode == "auto":
        return "the provider refuses every structured-output mode; check the model and the server"
    if mode == "instructions":
        return "check the model and the server"
    return f"set llm.structured_output to auto (or json_object / instructions); it is {mode}"
