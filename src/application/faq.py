"""FAQ matcher: is a user turn one of the known questions? Cosine similarity over an in-memory matrix.

At :meth:`FaqMatcher.start` every phrasing of every entry is embedded (through the embedding cache,
so a restart costs one Redis round trip, not a provider call per question) into one L2-normalized
float32 matrix. A turn is embedded (the cache again: a repeated question is an L1 hit) and compared
with every phrasing in one matrix-vector product; the best phrasing is a hit when its cosine reaches
``threshold``.

Choosing the threshold is a false-match trade-off: a lower one answers more paraphrases from the
recording (faster, no LLM call) but also answers near-misses - a question that shares the words of a
known one but asks something else ("Когда вы работаете в субботу?" against "Когда вы работаете?") -
with a recording that is wrong for them. See docs/faq.md for measured figures.

numpy is imported when a matcher starts, not when this module is imported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from voxcore.core.domain.faq import FaqEntry, FaqError, FaqMatch, check_threshold
from voxcore.core.ports.embeddings import Embeddings
from voxcore.core.ports.errors import EmbeddingError
from voxcore.events import emit

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["FaqMatcher"]

logger = logging.getLogger("voxcore.faq")


class FaqMatcher:
    """Matches user turns against known questions.

    Args:
        embeddings: The embedding provider (usually the :class:`EmbeddingCache`).
        entries: The known questions and their replies.
        threshold: Cosine at or above which the best phrasing is a hit.
        timeout_s: Longest wait for a turn's embedding; past it the turn is not a hit (the LLM answers).
        clock: Monotonic seconds (durations in events).

    Raises:
        FaqError: no entries, or a threshold outside (0, 1].
    """

    def __init__(
        self,
        *,
        embeddings: Embeddings,
        entries: Sequence[FaqEntry],
        threshold: float,
        timeout_s: float = 0.25,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not entries:
            raise FaqError("a FAQ matcher needs at least one entry")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._embeddings = embeddings
        self._entries = tuple(entries)
        self._threshold = check_threshold(threshold)
        self._timeout_s = timeout_s
        self._clock = clock
        self._rows: list[tuple[FaqEntry, str]] = [(e, q) for e in self._entries for q in e.questions]
        self._matrix: npt.NDArray[np.float32] | None = None
        self._np: Any = None

    @property
    def threshold(self) -> float:
        """The cosine a hit needs."""
        return self._threshold

    @property
    def entries(self) -> tuple[FaqEntry, ...]:
        """The known questions."""
        return self._entries

    @property
    def started(self) -> bool:
        """The question matrix is built."""
        return self._matrix is not None

    async def start(self) -> None:
        """Embed every phrasing and build the matrix (idempotent).

        Raises:
            EmbeddingError: the provider failed (a FAQ that cannot start fails start-up loudly).
        """
        if self._matrix is not None:
            return
        import numpy as np  # lazily: importing the application must stay cheap

        started = self._clock()
        vectors = await self._embeddings.embed([q for _, q in self._rows])
        matrix = np.stack([np.frombuffer(v.data, dtype="<f4") for v in vectors]).astype(np.float32)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        self._np = np
        self._matrix = matrix / norms
        emit(
            logger,
            "faq_ready",
            entries=len(self._entries),
            questions=len(self._rows),
            dimension=int(matrix.shape[1]),
            threshold=self._threshold,
            ms=round((self._clock() - started) * 1000, 1),
        )

    async def match(self, text: str) -> FaqMatch | None:
        """The closest known question to ``text`` (``hit`` when it reaches the threshold).

        Never raises for a provider failure or a timeout: they are logged (``faq_match_failed``) and
        answered ``None``, so the turn goes to the LLM as if there were no FAQ.

        Raises:
            RuntimeError: :meth:`start` has not completed.
        """
        if self._matrix is None:
            raise RuntimeError("the FAQ matcher is not started: await start() first")
        if not isinstance(text, str) or not text.strip():
            return None
        started = self._clock()
        try:
            async with asyncio.timeout(self._timeout_s):
                (vector,) = await self._embeddings.embed([text])
        except (EmbeddingError, TimeoutError, ValueError) as exc:
            emit(
                logger,
                "faq_match_failed",
                logging.WARNING,
                error_type=type(exc).__name__,
                error=str(exc) or f"no embedding within {self._timeout_s * 1000:.0f} ms",
                ms=round((self._clock() - started) * 1000, 1),
            )
            return None
        return self.best(vector.data)

    def best(self, vector: bytes) -> FaqMatch:
        """The closest phrasing to an embedding given as float32 little-endian bytes."""
        if self._matrix is None:
            raise RuntimeError("the FAQ matcher is not started: await start() first")
        np = self._np
        query = np.frombuffer(vector, dtype="<f4")
        if query.shape[0] != self._matrix.shape[1]:
            raise EmbeddingError(
                f"turn embedding has dimension {query.shape[0]}, the FAQ matrix {self._matrix.shape[1]}"
            )
        norm = float(np.linalg.norm(query))
        scores = self._matrix @ (query / norm if norm else query)
        index = int(np.argmax(scores))
        score = float(scores[index])
        entry, question = self._rows[index]
        return FaqMatch(entry=entry, question=question, score=score, hit=score >= self._threshold)
