"""Embedding ports: a provider of text embeddings, and the shared store cached vectors live in."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from voxcore.core.domain.embeddings import Embedding


class Embeddings(abc.ABC):
    """Turns texts into embedding vectors of one model.

    Attributes:
        model: The model every returned vector belongs to.
    """

    model: str = ""

    @abc.abstractmethod
    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        """One vector per text, in order (one provider request for the whole batch where possible).

        Raises:
            EmbeddingError: the provider failed or answered something that is not one vector per text.
            ValueError: a text is not a non-empty string.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections; safe to call twice."""


class EmbeddingStore(abc.ABC):
    """Shared byte storage of encoded vectors (the L2 of the embedding cache), with a TTL.

    Implementations are *soft* like the audio cache: a backend failure is logged and answered as
    misses (reads) or ``False`` (writes), never raised. Each batch is one round trip.
    """

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The stored value of each key (``None``: missing or unavailable), in order."""

    @abc.abstractmethod
    async def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl_seconds: int) -> bool:
        """Store every ``(key, value)`` with the TTL; True when the backend took them all."""
