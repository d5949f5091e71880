"""Reply policies (echo, scripted) and examples of a JSON schema filled with the reply text."""

from __future__ import annotations

import collections
import math
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Any

from voxcore.simulator.openai_server.plans import ReplyPolicy, ReplyValue


def approx_tokens(text: str) -> int:
    """Approximate token count used by the simulator: ~4 characters per token (0 for empty text)."""
    return math.ceil(len(text) / 4) if text else 0


def _text_of(content: Any) -> str:
    """Extract the text of a chat message ``content`` (string or list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


class EchoReply:
    """Default reply policy: a deterministic echo of the last user message.

    Args:
        prefix: Text put before the echoed message.
        max_chars: The echoed message is cut at a word boundary to at most this many characters (plus "…").
        empty_reply: Reply used when the request has no user text.
    """

    def __init__(
        self, prefix: str = "Вы сказали: ", max_chars: int = 200, empty_reply: str = "Вы ничего не сказали."
    ) -> None:
        self.prefix = prefix
        self.max_chars = max_chars
        self.empty_reply = empty_reply

    def __call__(self, request: dict[str, Any]) -> str:
        """Return the echo reply for a parsed chat request."""
        messages = request.get("messages")
        text = ""
        if isinstance(messages, list):
            for message in reversed(messages):
                if isinstance(message, dict) and message.get("role") == "user":
                    text = " ".join(_text_of(message.get("content")).split())
                    break
        if not text:
            return self.empty_reply
        if len(text) > self.max_chars:
            cut = text[: self.max_chars]
            space = cut.rfind(" ")
            text = (cut[:space] if space > self.max_chars // 2 else cut).rstrip(" ,.;:") + "…"
        return self.prefix + text


class ScriptedReplies:
    """Reply policy consuming a list of scripted replies in order, then falling back.

    Args:
        replies: Texts and/or mappings (a mapping is serialized verbatim as the JSON content).
        fallback: Policy used once the script is exhausted (default: ``EchoReply()``).
    """

    def __init__(self, replies: Iterable[ReplyValue], *, fallback: ReplyPolicy | None = None) -> None:
        self._queue: collections.deque[ReplyValue] = collections.deque(replies)
        self.fallback: ReplyPolicy = fallback if fallback is not None else EchoReply()

    @property
    def remaining(self) -> int:
        """Number of scripted replies not consumed yet."""
        return len(self._queue)

    def extend(self, replies: Iterable[ReplyValue]) -> None:
        """Append more scripted replies."""
        self._queue.extend(replies)

    def __call__(self, request: dict[str, Any]) -> ReplyValue | Awaitable[ReplyValue]:
        """Return the next scripted reply (or the fallback's reply)."""
        if self._queue:
            return self._queue.popleft()
        return self.fallback(request)


def _as_policy(reply: ReplyPolicy | ReplyValue | Sequence[ReplyValue] | None) -> ReplyPolicy:
    if reply is None:
        return EchoReply()
    if isinstance(reply, str | Mapping):
        constant: ReplyValue = reply

        def _constant(_request: dict[str, Any]) -> ReplyValue:
            return constant

        return _constant
    if callable(reply):
        return reply
    return ScriptedReplies(reply)


def _resolve_ref(node: Any, root: Mapping[str, Any]) -> Any:
    seen = 0
    while isinstance(node, Mapping) and isinstance(node.get("$ref"), str) and seen < 32:
        ref: str = node["$ref"]
        if not ref.startswith("#"):
            return {}
        target: Any = root
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, Mapping) else None
        node = target if target is not None else {}
        seen += 1
    return node


def _types_of(node: Mapping[str, Any], root: Mapping[str, Any]) -> list[str]:
    raw = node.get("type")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        return [t for t in raw if isinstance(t, str)]
    out: list[str] = []
    for option in node.get("anyOf") or node.get("oneOf") or []:
        opt = _resolve_ref(option, root)
        if isinstance(opt, Mapping):
            out.extend(_types_of(opt, root))
    if not out and "properties" in node:
        out.append("object")
    return out


def _example(node: Any, root: Mapping[str, Any], placeholder: str, depth: int) -> Any:
    node = _resolve_ref(node, root)
    if not isinstance(node, Mapping) or depth > 24:
        return None
    if "const" in node:
        return node["const"]
    enum_values = node.get("enum")
    if isinstance(enum_values, list) and enum_values:
        return enum_values[0]
    if "default" in node:
        return node["default"]
    types = _types_of(node, root)
    if "null" in types:
        return None
    options = node.get("anyOf") or node.get("oneOf") or node.get("allOf")
    if isinstance(options, list) and options and "type" not in node:
        return _example(options[0], root, placeholder, depth + 1)
    kind = types[0] if types else None
    if kind == "object":
        props = node.get("properties")
        if not isinstance(props, Mapping):
            return {}
        return {str(k): _example(v, root, placeholder, depth + 1) for k, v in props.items()}
    if kind == "array":
        n = node.get("minItems", 0)
        count = n if isinstance(n, int) and n > 0 else 0
        return [_example(node.get("items", {}), root, placeholder, depth + 1) for _ in range(count)]
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        lo = node.get("minimum", node.get("exclusiveMinimum"))
        value = int(math.ceil(lo)) if isinstance(lo, int | float) and lo > 0 else 0
        if "exclusiveMinimum" in node and value == node["exclusiveMinimum"]:
            value += 1
        return value
    if kind == "string":
        n = node.get("minLength", 0)
        return placeholder.ljust(n, "-") if isinstance(n, int) else placeholder
    return None


def schema_example(
    schema: Mapping[str, Any],
    *,
    answer: str | None = None,
    answer_field: str = "answer",
    overrides: Mapping[str, Any] | None = None,
    placeholder: str = "sim",
) -> Any:
    """Build a deterministic instance of a JSON schema, keys in the schema's property order.

    Booleans are ``true``, integers/numbers ``0`` (or their minimum), strings ``placeholder``, nullable
    values ``null``, arrays empty; ``const``/``enum``/``default`` win; local ``$ref`` are resolved.

    Args:
        schema: The JSON schema (the ``schema`` member of ``response_format.json_schema``).
        answer: Text put into ``answer_field`` (even when that field is nullable). When the schema has no
            such top-level property, it goes into the first plain string property instead.
        answer_field: Name of the top-level property receiving ``answer``.
        overrides: Top-level values replacing the generated ones (order stays the schema's; unknown keys
            are appended at the end).
        placeholder: Value used for ordinary strings.

    Returns:
        The example value (a ``dict`` for object schemas).
    """
    value = _example(schema, schema, placeholder, 0)
    if not isinstance(value, dict):
        return value
    root = _resolve_ref(schema, schema)
    props = root.get("properties") if isinstance(root, Mapping) else None
    if answer is not None and isinstance(props, Mapping):
        target: str | None = answer_field if answer_field in props else None
        if target is None:
            for key, sub in props.items():
                sub = _resolve_ref(sub, schema)
                if isinstance(sub, Mapping) and _types_of(sub, schema) == ["string"] and "enum" not in sub:
                    target = str(key)
                    break
        if target is not None:
            value[target] = answer
    if overrides:
        value.update(overrides)
    return value
