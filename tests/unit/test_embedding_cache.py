"""EmbeddingCache with port fakes: levels, LRU bytes + TTL, single flight, invalid values, metrics."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from voxcore.application.embedding_cache import EmbeddingCache
from voxcore.core.domain.embeddings import Embedding, encode_embedding, normalize_text
from voxcore.core.ports.embeddings import Embeddings, EmbeddingStore
from voxcore.core.ports.errors import EmbeddingError
from voxcore.events import FIELDS_ATTR

DIM = 8


def vector_for(model: str, text: str) -> Embedding:
    digest = hashlib.sha256(text.encode()).digest()
    return Embedding.from_floats(model, [b / 255 for b in digest[:DIM]])


class FakeEmbeddings(Embeddings):
    def __init__(self, model: str = "fake-model") -> None:
        self.model = model
        self.calls: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None
        self.closed = False

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        self.calls.append(list(texts))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return [vector_for(self.model, t) for t in texts]

    async def aclose(self) -> None:
        self.closed = True


class FakeStore(EmbeddingStore):
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.gets: list[list[str]] = []
        self.sets: list[tuple[list[str], int]] = []
        self.down = False

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.gets.append(list(keys))
        if self.down:
            return [None] * len(keys)
        return [self.data.get(k) for k in keys]

    async def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl_seconds: int) -> bool:
        self.sets.append(([k for k, _ in items], ttl_seconds))
        if self.down:
            return False
        self.data.update(items)
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    provider: FakeEmbeddings | None = None, store: FakeStore | None = None, **kwargs: object
) -> tuple[EmbeddingCache, FakeEmbeddings, FakeStore]:
    provider = provider or FakeEmbeddings()
    store = store if store is not None else FakeStore()
    cache = EmbeddingCache(provider=provider, store=store, **kwargs)  # type: ignore[arg-type]
    return cache, provider, store


async def test_miss_then_l1_hit_then_l2_hit_in_another_process() -> None:
    cache, provider, store = make(ttl_seconds=60)
    first = await cache.embed(["Когда вы работаете?", "Сколько стоит доставка?"])
    assert provider.calls == [["когда вы работаете?", "сколько стоит доставка?"]]  # normalized, one request
    assert len(store.gets) == 1 and len(store.gets[0]) == 2  # one round trip for the batch
    assert len(store.sets) == 1 and store.sets[0][1] == 60  # one round trip, with the TTL
    again = await cache.embed(["  когда  ВЫ работаете? "])
    assert again == [first[0]] and len(provider.calls) == 1 and len(store.gets) == 1  # L1
    other, provider2, _ = make(store=store)  # another worker sharing the store
    assert await other.embed(["Сколько стоит доставка?"]) == [first[1]]
    assert provider2.calls == []
    stats = other.stats()
    assert (stats.l1_hits, stats.l1_misses, stats.l2_hits, stats.l2_misses) == (0, 1, 1, 0)
    assert stats.l2_hit_rate == 1.0


async def test_order_and_duplicates_are_kept() -> None:
    cache, provider, _ = make()
    a, b, a2 = await cache.embed(["a", "b", "A"])
    assert a == a2 and a != b
    assert provider.calls == [["a", "b"]]


async def test_single_flight_on_concurrent_misses() -> None:
    cache, provider, store = make()
    provider.gate = asyncio.Event()
    tasks = [asyncio.create_task(cache.embed(["Как отменить заказ?"])) for _ in range(100)]
    await asyncio.sleep(0.01)
    provider.gate.set()
    results = await asyncio.gather(*tasks)
    assert len(provider.calls) == 1
    assert len(store.gets) == 1
    assert all(r == results[0] for r in results)


async def test_a_caller_that_stops_waiting_does_not_cancel_the_others() -> None:
    cache, provider, _ = make()
    provider.gate = asyncio.Event()
    first = asyncio.create_task(cache.embed(["x"]))
    second = asyncio.create_task(cache.embed(["x"]))
    await asyncio.sleep(0.01)
    first.cancel()
    provider.gate.set()
    assert (await second)[0] == vector_for("fake-model", "x")
    with pytest.raises(asyncio.CancelledError):
        await first
    assert len(provider.calls) == 1
    assert cache.stats().l1_entries == 1  # the lookup completed and filled L1


async def test_provider_error_reaches_every_waiter_and_nothing_is_cached() -> None:
    cache, provider, store = make()
    provider.gate = asyncio.Event()
    provider.error = EmbeddingError("boom", transient=True, status=503)
    tasks = [asyncio.create_task(cache.embed(["x"])) for _ in range(3)]
    await asyncio.sleep(0.01)
    provider.gate.set()
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        assert isinstance(result, EmbeddingError) and result.status == 503
    assert store.data == {} and cache.stats().l1_entries == 0
    provider.error, provider.gate = None, None
    assert await cache.embed(["x"])  # the next call tries again
    assert len(provider.calls) == 2


async def test_invalid_stored_value_is_a_logged_miss_then_overwritten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache, provider, store = make()
    key = cache.key_for("x")
    store.data[key] = encode_embedding(vector_for("another-model", "x"))
    with caplog.at_level(logging.WARNING, logger="voxcore.embeddings.cache"):
        (vector,) = await cache.embed(["x"])
    assert vector.model == "fake-model" and provider.calls == [["x"]]
    events = [getattr(r, FIELDS_ATTR) for r in caplog.records if r.getMessage() == "embedding_cache_invalid"]
    assert events and events[0]["key"] == key and "another-model" in events[0]["reason"]
    assert store.data[key] == encode_embedding(vector)
    assert cache.stats().invalid == 1
    store.data[cache.key_for("y")] = b"\x80\x04garbage"  # e.g. a pickle: never unpickled
    assert (await cache.embed(["y"]))[0].model == "fake-model"


async def test_l1_is_bounded_in_bytes_lru_first() -> None:
    entry = 4 * DIM + 71 + 360  # vector + key + overhead
    cache, provider, store = make(l1_max_bytes=3 * entry)
    for text in ("a", "b", "c"):
        await cache.embed([text])
    await cache.embed(["a"])  # a is now the most recent
    await cache.embed(["d"])  # evicts b
    stats = cache.stats()
    assert stats.l1_entries == 3 and stats.l1_bytes <= 3 * entry
    store.down = True
    provider.calls.clear()
    await cache.embed(["a", "c", "d"])
    assert provider.calls == []  # all in L1
    await cache.embed(["b"])
    assert provider.calls == [["b"]]


async def test_l1_entries_expire() -> None:
    clock = Clock()
    cache, provider, store = make(l1_ttl_seconds=10, clock=clock)
    await cache.embed(["a"])
    clock.now += 11
    await cache.embed(["a"])
    assert len(store.gets) == 2 and len(provider.calls) == 1  # expired in L1, found in L2


async def test_l1_disabled_with_zero_bytes() -> None:
    cache, provider, store = make(l1_max_bytes=0)
    await cache.embed(["a"])
    await cache.embed(["a"])
    assert cache.stats().l1_entries == 0 and len(store.gets) == 2 and len(provider.calls) == 1


async def test_without_store_and_with_store_down() -> None:
    cache = EmbeddingCache(provider=FakeEmbeddings(), store=None)
    assert await cache.embed(["a"]) == await cache.embed(["a"])
    cache2, provider, store = make()
    store.down = True
    assert (await cache2.embed(["a"]))[0] == vector_for("fake-model", "a")
    assert cache2.stats().l2_misses == 1


async def test_get_many_and_set_many_direct() -> None:
    cache, provider, store = make()
    v = vector_for("fake-model", "q")
    assert await cache.get_many(["q", "r"]) == [None, None]
    assert await cache.set_many([("Q", v)]) is True
    assert len(store.sets) == 1
    assert await cache.get("  q ") == v
    fresh, _, _ = make(store=store)
    assert await fresh.get_many(["q", "r", "q"]) == [v, None, v]
    assert store.gets[-1] == [fresh.key_for("q"), fresh.key_for("r")]  # one round trip, deduplicated
    with pytest.raises(ValueError, match="model"):
        await cache.set("q", vector_for("other", "q"))
    assert provider.calls == []


async def test_bad_input_is_a_value_error() -> None:
    cache, _, _ = make()
    with pytest.raises(ValueError, match="empty"):
        await cache.embed(["   "])
    with pytest.raises(ValueError, match="string"):
        await cache.embed([3])  # type: ignore[list-item]


async def test_metrics_count_lookups_by_tier_and_result() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test-embedding-cache")
    cache, _, _ = make(meter=meter)
    await cache.embed(["a"])
    await cache.embed(["a", "b"])
    points: dict[tuple[str, str], int] = {}
    provider_texts = 0
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:  # type: ignore[union-attr]
                    if metric.name == "voxcore.embedding_cache.lookups":
                        attrs = point.attributes or {}
                        points[(str(attrs["tier"]), str(attrs["result"]))] = int(point.value)  # type: ignore[union-attr]
                    elif metric.name == "voxcore.embedding_cache.provider_texts":
                        provider_texts = int(point.value)  # type: ignore[union-attr]
    assert points == {("l1", "miss"): 2, ("l1", "hit"): 1, ("l2", "miss"): 2}
    assert provider_texts == 2


async def test_aclose_closes_the_provider_and_refuses_more() -> None:
    cache, provider, _ = make()
    await cache.aclose()
    await cache.aclose()
    assert provider.closed
    with pytest.raises(EmbeddingError, match="closed"):
        await cache.embed(["a"])


def test_normalized_text_is_what_is_embedded() -> None:
    assert normalize_text("Ёлка") == "елка"
