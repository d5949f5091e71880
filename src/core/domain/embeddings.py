"""Embedding vectors: text normalization, content-addressed cache keys, and the checked binary codec.

A cached vector is stored as float32 little-endian bytes behind a header that says what they are, so
a reader never trusts bytes it did not expect (never pickle: unpickling cache content is a known
remote-code-execution class)::

    offset  size  field
    0       4     magic b"VXEM"
    4       1     format version (1)
    5       1     dtype code (1 = float32 little-endian)
    6       2     model name length M (uint16 LE)
    8       4     dimension D (uint32 LE)
    12      M     model name, UTF-8
    12+M    4*D   the vector

Keys are ``emb:v1:<sha256(model NUL normalized text)>``: one key per vector, so every Redis command
touches a single key (cluster-safe with no hash tag; batches are pipelines of single-key commands).
"""

from __future__ import annotations

import array
import hashlib
import math
import re
import struct
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from voxcore.core.domain.errors import DomainError

#: Prefix of every embedding key (before the optional deployment prefix).
EMBEDDING_KEY_PREFIX: Final = "emb:v1:"
MAGIC: Final = b"VXEM"
FORMAT_VERSION: Final = 1
DTYPE_FLOAT32: Final = 1
_HEADER: Final = struct.Struct("<4sBBHI")
HEADER_SIZE: Final = _HEADER.size
#: Longest model name a header can carry.
MAX_MODEL_CHARS: Final = 256
#: Largest dimension accepted (the largest public models have 4 096; this leaves room).
MAX_DIMENSION: Final = 65_536

_SPACES = re.compile(r"\s+")
_LITTLE = sys.byteorder == "little"


class EmbeddingFormatError(DomainError):
    """Stored bytes are not a vector of the expected model/dimension/dtype; the message says why."""


@dataclass(frozen=True, slots=True)
class Embedding:
    """One embedding vector of a model.

    Attributes:
        model: The model that produced it.
        dimension: Number of components.
        data: The components as float32 little-endian bytes (``4 * dimension`` bytes).
    """

    model: str
    dimension: int
    data: bytes

    def __post_init__(self) -> None:
        if not self.model:
            raise EmbeddingFormatError("an embedding needs a model name")
        if not 0 < self.dimension <= MAX_DIMENSION:
            raise EmbeddingFormatError(f"dimension must be within 1..{MAX_DIMENSION}, got {self.dimension}")
        if len(self.data) != 4 * self.dimension:
            raise EmbeddingFormatError(
                f"{len(self.data)} bytes do not hold {self.dimension} float32 values "
                f"({4 * self.dimension} bytes)"
            )

    @classmethod
    def from_floats(cls, model: str, values: Iterable[float]) -> Embedding:
        """Build from Python floats (stored as float32); non-finite values are refused."""
        vector = array.array("f", values)
        if not all(math.isfinite(v) for v in vector):
            raise EmbeddingFormatError(f"embedding of {model!r} holds a NaN or an infinity")
        if not _LITTLE:
            vector.byteswap()
        return cls(model=model, dimension=len(vector), data=vector.tobytes())

    def floats(self) -> array.array[float]:
        """The components as an ``array('f')`` in native byte order."""
        vector = array.array("f")
        vector.frombytes(self.data)
        if not _LITTLE:
            vector.byteswap()
        return vector

    @property
    def nbytes(self) -> int:
        """Bytes of the vector itself."""
        return len(self.data)


def normalize_text(text: str) -> str:
    """The canonical form embedded and hashed: NFKC, case-folded, ``ё`` -> ``е``, spaces collapsed.

    Two utterances that differ only in case, spacing, Unicode form or the optional Russian ``ё`` get
    the same key (and the same vector: the normalized text is what is sent to the model).
    """
    folded = unicodedata.normalize("NFKC", text).casefold().replace("ё", "е")
    return _SPACES.sub(" ", folded).strip()


def embedding_key(model: str, normalized_text: str, *, prefix: str = "") -> str:
    """The content-addressed key of ``normalized_text`` embedded by ``model``.

    Args:
        model: The embedding model name.
        normalized_text: Text already passed through :func:`normalize_text`.
        prefix: Deployment key prefix (``cache.key_prefix``), prepended as is.
    """
    digest = hashlib.sha256(model.encode("utf-8") + b"\x00" + normalized_text.encode("utf-8")).hexdigest()
    return f"{prefix}{EMBEDDING_KEY_PREFIX}{digest}"


def encode_embedding(embedding: Embedding) -> bytes:
    """Header + float32 bytes (see the module docstring)."""
    model = embedding.model.encode("utf-8")
    if len(model) > MAX_MODEL_CHARS:
        raise EmbeddingFormatError(
            f"model name longer than {MAX_MODEL_CHARS} bytes: {embedding.model[:40]!r}…"
        )
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, DTYPE_FLOAT32, len(model), embedding.dimension)
    return header + model + embedding.data


def decode_embedding(raw: bytes, *, model: str, dimension: int | None = None) -> Embedding:
    """Check the header of stored bytes against what the reader expects and return the vector.

    Args:
        raw: The stored value.
        model: The model the reader asked for (the header must name exactly it).
        dimension: The dimension the reader expects, when it knows (``None``: any).

    Raises:
        EmbeddingFormatError: wrong magic, version, dtype, model or dimension, or a truncated value.
    """
    if len(raw) < HEADER_SIZE:
        raise EmbeddingFormatError(f"value of {len(raw)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, dtype, model_len, dim = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise EmbeddingFormatError(f"not an embedding record (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise EmbeddingFormatError(f"format version {version} (this reader knows {FORMAT_VERSION})")
    if dtype != DTYPE_FLOAT32:
        raise EmbeddingFormatError(f"dtype code {dtype} (expected {DTYPE_FLOAT32}: float32)")
    end = HEADER_SIZE + model_len
    stored_model = bytes(raw[HEADER_SIZE:end]).decode("utf-8", "replace")
    if stored_model != model:
        raise EmbeddingFormatError(f"model {stored_model!r} (expected {model!r})")
    if dimension is not None and dim != dimension:
        raise EmbeddingFormatError(f"dimension {dim} (expected {dimension})")
    if len(raw) != end + 4 * dim:
        raise EmbeddingFormatError(f"{len(raw) - end} vector bytes for dimension {dim} (expected {4 * dim})")
    return Embedding(model=model, dimension=dim, data=bytes(raw[end:]))


def dedupe(texts: Sequence[str]) -> list[str]:
    """``texts`` without repeats, first occurrence order kept."""
    return list(dict.fromkeys(texts))
