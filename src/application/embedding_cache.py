"""Hot embedding cache: an in-process LRU bounded in bytes (L1) in front of a shared store (L2, Redis).

``EmbeddingCache`` is itself an :class:`Embeddings` provider, so whatever embeds texts (the FAQ
matcher) takes it in place of the real one:

* keys are content addressed (SHA-256 of the model and the normalized text), and the normalized text
  is also what the provider embeds, so a key always names exactly the vector stored under it;
* a lookup tries L1, then L2 (one round trip for the whole batch), then the provider (one request
  for every text still missing); vectors found are copied into the levels above;
* concurrent misses of one text share one lookup (single flight), so a hundred calls asking the same
  question at once cost one provider request; a caller that stops waiting does not cancel it;
* L2 values are float32 bytes behind a checked header (never pickle); a value whose header does not
  match the model or dimension is a miss, logged as ``embedding_cache_invalid``, and overwritten.

Metrics (OpenTelemetry API): ``voxcore.embedding_cache.lookups`` counts lookups by ``tier`` (``l1``,
``l2``) and ``result`` (``hit``, ``miss``): the hit rate of a tier is hits / lookups.
``voxcore.embedding_cache.provider_texts`` counts texts sent to the provider.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from opentelemetry import metrics

from voxcore.core.domain.embeddings import (
    Embedding,
    EmbeddingFormatError,
    decode_embedding,
    embedding_key,
    encode_embedding,
    normalize_text,
)
from voxcore.core.ports.embeddings import Embeddings, EmbeddingStore
from voxcore.core.ports.errors import EmbeddingError
from voxcore.events import emit

__all__ = ["EmbeddingCache", "EmbeddingCacheStats"]

logger = logging.getLogger("voxcore.embeddings.cache")
_meter = metrics.get_meter("voxcore.embeddings")

# What an L1 entry costs beyond its vector bytes: the key string, the tuple, the dataclass, the
# OrderedDict node (measured ~330 bytes on CPython 3.11 for a 71-character key).
_ENTRY_OVERHEAD: Final = 360


@dataclass(frozen=True, slots=True)
class EmbeddingCacheStats:
    """Counters since the cache was made.

    Attributes:
        l1_hits: Lookups answered from the in-process LRU.
        l1_misses: Lookups the LRU could not answer.
        l2_hits: Lookups answered from the shared store.
        l2_misses: Lookups the store could not answer (missing, invalid or unavailable).
        invalid: Stored values refused for a header mismatch.
        provider_texts: Texts sent to the provider.
        provider_requests: Provider calls made.
        l1_entries: Vectors held in the LRU now.
        l1_bytes: Their estimated memory, counted against ``l1_max_bytes``.
    """

    l1_hits: int
    l1_misses: int
    l2_hits: int
    l2_misses: int
    invalid: int
    provider_texts: int
    provider_requests: int
    l1_entries: int
    l1_bytes: int

    @property
    def l1_hit_rate(self) -> float:
        """L1 hits / L1 lookups (0 before any lookup)."""
        total = self.l1_hits + self.l1_misses
        return self.l1_hits / total if total else 0.0

    @property
    def l2_hit_rate(self) -> float:
        """L2 hits / L2 lookups (0 before any)."""
        total = self.l2_hits + self.l2_misses
        return self.l2_hits / total if total else 0.0


@functools.lru_cache(maxsize=16)
def _instruments(meter: metrics.Meter) -> tuple[metrics.Counter, metrics.Counter]:
    # One instrument per meter: a proxy meter keeps every instrument it ever made.
    lookups = meter.create_counter(
        "voxcore.embedding_cache.lookups", unit="1", description="Embedding cache lookups by tier and result."
    )
    provider = meter.create_counter(
        "voxcore.embedding_cache.provider_texts",
        unit="1",
        description="Texts sent to the embedding provider.",
    )
    return lookups, provider


class EmbeddingCache(Embeddings):
    """L1 (in-process LRU, bytes + TTL) -> L2 (shared store, TTL) -> provider, with single flight.

    Args:
        provider: Computes vectors on a miss; :meth:`aclose` closes it.
        store: The shared L2 (``None``: L1 only).
        key_prefix: Deployment key prefix (``cache.key_prefix``).
        l1_max_bytes: Memory budget of the LRU (vectors + per-entry overhead); least recently used
            entries are evicted beyond it. 0 disables L1.
        l1_ttl_seconds: Lifetime of an L1 entry (so a vector replaced in L2 is picked up again).
        ttl_seconds: Lifetime of an L2 entry.
        clock: Monotonic seconds (L1 expiry).
        meter: OpenTelemetry meter (default: ``voxcore.embeddings``).

    Raises:
        ValueError: a negative budget or a non-positive TTL.
    """

    def __init__(
        self,
        *,
        provider: Embeddings,
        store: EmbeddingStore | None,
        key_prefix: str = "",
        l1_max_bytes: int = 16 * 1024 * 1024,
        l1_ttl_seconds: float = 3600.0,
        ttl_seconds: int = 30 * 24 * 3600,
        clock: Callable[[], float] = time.monotonic,
        meter: metrics.Meter | None = None,
    ) -> None:
        if l1_max_bytes < 0:
            raise ValueError(f"l1_max_bytes must be >= 0, got {l1_max_bytes}")
        if l1_ttl_seconds <= 0 or ttl_seconds <= 0:
            raise ValueError("l1_ttl_seconds and ttl_seconds must be positive")
        self._provider = provider
        self._store = store
        self._prefix = key_prefix
        self._l1_max = l1_max_bytes
        self._l1_ttl = l1_ttl_seconds
        self._ttl = ttl_seconds
        self._clock = clock
        self._lookups, self._provider_counter = _instruments(meter if meter is not None else _meter)
        self._l1: OrderedDict[str, tuple[Embedding, float, int]] = OrderedDict()
        self._l1_bytes = 0
        self._inflight: dict[str, asyncio.Future[Embedding]] = {}
        self._loads: set[asyncio.Task[None]] = set()
        self._dimension: int | None = None
        self._counts = dict.fromkeys(
            (
                "l1_hits",
                "l1_misses",
                "l2_hits",
                "l2_misses",
                "invalid",
                "provider_texts",
                "provider_requests",
            ),
            0,
        )
        self._closed = False

    @property
    def model(self) -> str:  # type: ignore[override]
        """The provider's model."""
        return self._provider.model

    def stats(self) -> EmbeddingCacheStats:
        """Counters and the LRU's size now."""
        return EmbeddingCacheStats(**self._counts, l1_entries=len(self._l1), l1_bytes=self._l1_bytes)

    def key_for(self, text: str) -> str:
        """The cache key of ``text`` (after normalization)."""
        return embedding_key(self.model, _normalized(text), prefix=self._prefix)

    # -- the Embeddings port ---------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        """One vector per text, from L1, L2 or the provider (see the module docstring).

        Raises:
            EmbeddingError: the provider failed for a text no level holds.
            ValueError: a text is not a string or is empty once normalized.
        """
        if self._closed:
            raise EmbeddingError("the embedding cache is closed")
        normalized = [_normalized(t) for t in texts]
        found: dict[str, Embedding] = {}
        waiting: dict[str, asyncio.Future[Embedding]] = {}
        owned: dict[str, str] = {}  # normalized text -> key, looked up by this call
        loop = asyncio.get_running_loop()
        for text in dict.fromkeys(normalized):
            key = embedding_key(self.model, text, prefix=self._prefix)
            hit = self._l1_get(key)
            if hit is not None:
                found[text] = hit
                continue
            future = self._inflight.get(key)
            if future is None:
                future = loop.create_future()
                future.add_done_callback(_retrieve)
                self._inflight[key] = future
                owned[text] = key
            waiting[text] = future
        if owned:
            # Its own task: a caller that stops waiting must not cancel what others wait for.
            task = asyncio.create_task(self._load(owned), name="voxcore-embedding-load")
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)
        for text, future in waiting.items():
            found[text] = await asyncio.shield(future)
        return [found[t] for t in normalized]

    async def aclose(self) -> None:
        """Wait for lookups in flight, then close the provider; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._loads:
            await asyncio.gather(*self._loads, return_exceptions=True)
        await self._provider.aclose()

    # -- direct access ---------------------------------------------------------------------------------

    async def get_many(self, texts: Sequence[str]) -> list[Embedding | None]:
        """Cached vectors only (L1, then L2 in one round trip); ``None`` where neither holds one."""
        normalized = [_normalized(t) for t in texts]
        keys = {t: embedding_key(self.model, t, prefix=self._prefix) for t in dict.fromkeys(normalized)}
        found: dict[str, Embedding] = {}
        missing: dict[str, str] = {}
        for text, key in keys.items():
            hit = self._l1_get(key)
            if hit is not None:
                found[text] = hit
            else:
                missing[text] = key
        if missing:
            found.update(await self._l2_get(missing))
        return [found.get(t) for t in normalized]

    async def set_many(self, items: Sequence[tuple[str, Embedding]]) -> bool:
        """Store vectors for texts in L1 and L2 (one round trip); True when L2 took them all.

        Raises:
            ValueError: a vector of another model, or an empty text.
        """
        entries: dict[str, tuple[str, Embedding]] = {}
        for text, vector in items:
            if vector.model != self.model:
                raise ValueError(f"vector of model {vector.model!r} given to the {self.model!r} cache")
            normalized = _normalized(text)
            entries[normalized] = (embedding_key(self.model, normalized, prefix=self._prefix), vector)
        for key, vector in entries.values():
            self._l1_put(key, vector)
        if self._store is None or not entries:
            return self._store is None
        return await self._store.set_many(
            [(key, encode_embedding(vector)) for key, vector in entries.values()], ttl_seconds=self._ttl
        )

    async def get(self, text: str) -> Embedding | None:
        """:meth:`get_many` of one text."""
        return (await self.get_many([text]))[0]

    async def set(self, text: str, vector: Embedding) -> bool:
        """:meth:`set_many` of one text."""
        return await self.set_many([(text, vector)])

    # -- internals -------------------------------------------------------------------------------------

    async def _load(self, owned: dict[str, str]) -> None:
        """Resolve the futures of ``owned`` from L2, then the provider; never raises."""
        try:
            found = await self._l2_get(owned)
            for text, vector in found.items():
                self._resolve(owned[text], vector)
            missing = [text for text in owned if text not in found]
            if not missing:
                return
            self._counts["provider_requests"] += 1
            self._counts["provider_texts"] += len(missing)
            self._provider_counter.add(len(missing))
            vectors = await self._provider.embed(missing)
            if len(vectors) != len(missing):
                raise EmbeddingError(f"the provider returned {len(vectors)} vectors for {len(missing)} texts")
            self._dimension = vectors[0].dimension
            for text, vector in zip(missing, vectors, strict=True):
                self._l1_put(owned[text], vector)
                self._resolve(owned[text], vector)
            if self._store is not None:
                payload = [(owned[t], encode_embedding(v)) for t, v in zip(missing, vectors, strict=True)]
                await self._store.set_many(payload, ttl_seconds=self._ttl)
        except BaseException as exc:
            error = (
                exc if isinstance(exc, Exception) else EmbeddingError("the embedding lookup was cancelled")
            )
            for key in owned.values():
                future = self._inflight.get(key)
                if future is not None and not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        finally:
            for key in owned.values():
                future = self._inflight.get(key)
                if future is not None and future.done():
                    del self._inflight[key]

    async def _l2_get(self, wanted: dict[str, str]) -> dict[str, Embedding]:
        if self._store is None:
            return {}
        raws = await self._store.get_many(list(wanted.values()))
        found: dict[str, Embedding] = {}
        for (text, key), raw in zip(wanted.items(), raws, strict=True):
            if raw is None:
                self._count("l2", hit=False)
                continue
            try:
                vector = decode_embedding(raw, model=self.model, dimension=self._dimension)
            except EmbeddingFormatError as exc:
                self._counts["invalid"] += 1
                self._count("l2", hit=False)
                emit(logger, "embedding_cache_invalid", logging.WARNING, key=key, reason=str(exc))
                continue
            self._count("l2", hit=True)
            self._l1_put(key, vector)
            found[text] = vector
        return found

    def _resolve(self, key: str, vector: Embedding) -> None:
        future = self._inflight.get(key)
        if future is not None and not future.done():
            future.set_result(vector)

    def _l1_get(self, key: str) -> Embedding | None:
        entry = self._l1.get(key)
        if entry is not None:
            vector, expires, size = entry
            if expires > self._clock():
                self._l1.move_to_end(key)
                self._count("l1", hit=True)
                return vector
            del self._l1[key]
            self._l1_bytes -= size
        self._count("l1", hit=False)
        return None

    def _l1_put(self, key: str, vector: Embedding) -> None:
        size = vector.nbytes + len(key) + _ENTRY_OVERHEAD
        if size > self._l1_max:
            return
        old = self._l1.pop(key, None)
        if old is not None:
            self._l1_bytes -= old[2]
        self._l1[key] = (vector, self._clock() + self._l1_ttl, size)
        self._l1_bytes += size
        while self._l1_bytes > self._l1_max:
            _, (_, _, evicted) = self._l1.popitem(last=False)
            self._l1_bytes -= evicted

    def _count(self, tier: str, *, hit: bool) -> None:
        self._counts[f"{tier}_{'hits' if hit else 'misses'}"] += 1
        self._lookups.add(1, {"tier": tier, "result": "hit" if hit else "miss"})


def _normalized(text: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"embedding input must be a string, got {type(text).__name__}")
    normalized = normalize_text(text)
    if not normalized:
        raise ValueError(f"embedding input is empty once normalized: {text!r}")
    return normalized


def _retrieve(future: asyncio.Future[Embedding]) -> None:
    # A lookup whose callers all stopped waiting must not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()
