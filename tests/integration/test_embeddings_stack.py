"""Embeddings for real: the OpenAI-compatible adapter against the simulator's /v1/embeddings, and the
embedding cache over a real Redis (one round trip per batch, checked headers, TTLs, outages)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis

from voxcore.adapters.openai.embeddings import OpenAIEmbeddings
from voxcore.adapters.redis.config import RedisConfig
from voxcore.adapters.redis.embedding_store import RedisEmbeddingStore
from voxcore.application.embedding_cache import EmbeddingCache
from voxcore.core.domain.embeddings import Embedding, decode_embedding, encode_embedding
from voxcore.core.ports.errors import EmbeddingError
from voxcore.entrypoints.embedded_redis import EmbeddedRedis
from voxcore.events import FIELDS_ATTR
from voxcore.simulator import EMBEDDINGS_PATH, Fault, OpenAISimulator, RequestPlan, hashed_embedding

MODEL = "sim-embed"


@pytest.fixture
async def sim() -> AsyncIterator[OpenAISimulator]:
    async with OpenAISimulator() as simulator:
        yield simulator


def adapter(sim: OpenAISimulator, **kwargs: Any) -> OpenAIEmbeddings:
    options: dict[str, Any] = {"base_url": sim.base_url, "api_key": sim.api_key, "model": MODEL}
    options.update(kwargs)
    return OpenAIEmbeddings(**options)


def plan(fault: Fault | None = None, **kwargs: Any) -> RequestPlan:
    return RequestPlan(fault=fault, path=EMBEDDINGS_PATH, **kwargs)


# -- the adapter -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["base64", "float"])
async def test_vectors_are_the_servers_in_order(sim: OpenAISimulator, encoding: str) -> None:
    emb = adapter(sim, encoding_format=encoding)
    try:
        texts = ["когда вы работаете", "сколько стоит доставка", "когда вы работаете"]
        vectors = await emb.embed(texts)
    finally:
        await emb.aclose()
    assert [v.dimension for v in vectors] == [256] * 3
    for text, vector in zip(texts, vectors, strict=True):
        assert list(vector.floats()) == pytest.approx(hashed_embedding(text, 256), abs=1e-6)
    body = sim.last_request_json
    assert body["encoding_format"] == encoding and body["input"] == texts and body["model"] == MODEL


async def test_dimensions_and_batches(sim: OpenAISimulator) -> None:
    emb = adapter(sim, model="text-embedding-3-small", dimensions=64, max_batch=2)
    try:
        vectors = await emb.embed([f"вопрос {i}" for i in range(5)])
    finally:
        await emb.aclose()
    assert len(vectors) == 5 and {v.dimension for v in vectors} == {64}
    assert sim.request_count(EMBEDDINGS_PATH) == 3  # 2 + 2 + 1


@pytest.mark.parametrize(
    ("fault", "status", "transient"),
    [
        (Fault.BAD_KEY, 401, False),
        (Fault.UNKNOWN_MODEL, 404, False),
        (Fault.RATE_LIMIT, 429, True),
        (Fault.SERVER_ERROR, 500, True),
        (Fault.SERVICE_UNAVAILABLE, 503, True),
    ],
)
async def test_status_errors_are_typed(
    sim: OpenAISimulator, fault: Fault, status: int, transient: bool
) -> None:
    sim.plan_next(plan(fault, retry_after=2.0))
    emb = adapter(sim)
    try:
        with pytest.raises(EmbeddingError) as info:
            await emb.embed(["x"])
    finally:
        await emb.aclose()
    assert info.value.status == status and info.value.transient is transient
    if status in (429, 503):
        assert info.value.retry_after == pytest.approx(2.0)
    assert str(status) in str(info.value)


async def test_real_validation_errors_of_the_server(sim: OpenAISimulator) -> None:
    emb = adapter(sim, model="no-such-model")
    try:
        with pytest.raises(EmbeddingError, match="does not exist") as info:
            await emb.embed(["x"])
        assert info.value.status == 404
    finally:
        await emb.aclose()
    big = adapter(sim, dimensions=100_000)
    try:
        with pytest.raises(EmbeddingError, match="dimensions") as info:
            await big.embed(["x"])
        assert info.value.status == 400 and not info.value.transient
    finally:
        await big.aclose()


@pytest.mark.parametrize("fault", [Fault.MALFORMED, Fault.TRUNCATED])
async def test_broken_bodies_are_errors_not_vectors(sim: OpenAISimulator, fault: Fault) -> None:
    sim.plan_next(plan(fault, graceful=True))
    emb = adapter(sim)
    try:
        with pytest.raises(EmbeddingError):
            await emb.embed(["x"])
        assert len(await emb.embed(["x"])) == 1  # the client is still usable
    finally:
        await emb.aclose()


async def test_stall_and_delay_hit_the_timeout(sim: OpenAISimulator) -> None:
    sim.plan_next(plan(Fault.STALL, stall_s=2.0))
    emb = adapter(sim, timeout_s=0.2)
    try:
        with pytest.raises(EmbeddingError, match="timed out") as info:
            await emb.embed(["x"])
        assert info.value.transient
        sim.plan_next(plan(first_token_delay_ms=500))
        with pytest.raises(EmbeddingError, match="timed out"):
            await emb.embed(["x"])
    finally:
        await emb.aclose()


async def test_unreachable_server_is_transient() -> None:
    emb = OpenAIEmbeddings(base_url="http://127.0.0.1:9/v1", api_key=None, model=MODEL, timeout_s=0.5)
    try:
        with pytest.raises(EmbeddingError, match="cannot connect") as info:
            await emb.embed(["x"])
        assert info.value.transient
    finally:
        await emb.aclose()


async def test_bad_input_never_reaches_the_server(sim: OpenAISimulator) -> None:
    emb = adapter(sim)
    try:
        for bad in ([""], ["  "], ["x" * 40_000]):
            with pytest.raises(ValueError):
                await emb.embed(bad)
    finally:
        await emb.aclose()
    assert sim.request_count(EMBEDDINGS_PATH) == 0
    with pytest.raises(EmbeddingError, match="closed"):
        await emb.embed(["x"])


# -- the cache over Redis ----------------------------------------------------------------------------------


class CountingClient:
    """A real redis-py client that counts pipelines executed (round trips), passing everything through."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.round_trips = 0

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = self.client.pipeline(transaction=transaction)
        execute = pipe.execute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.round_trips += 1
            return await execute(*args, **kwargs)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


@pytest.mark.all_redis_modes  # also on a Redis Cluster and a Sentinel set (make test-cluster)
async def test_cache_over_redis_one_round_trip_per_batch(
    sim: OpenAISimulator, raw_redis: redis.Redis, key_prefix: str
) -> None:
    client = CountingClient(raw_redis)
    cache = EmbeddingCache(
        provider=adapter(sim), store=RedisEmbeddingStore(client), key_prefix=key_prefix, ttl_seconds=120
    )
    texts = [f"Вопрос номер {i}?" for i in range(50)]
    vectors = await cache.embed(texts)
    assert client.round_trips == 2  # one GET pipeline + one SET pipeline for 50 texts
    assert sim.request_count(EMBEDDINGS_PATH) == 1
    key = cache.key_for(texts[7])
    raw = await raw_redis.get(key)
    assert raw is not None and decode_embedding(raw, model=MODEL, dimension=256) == vectors[7]
    assert 100 < await raw_redis.ttl(key) <= 120
    # another worker: everything from Redis in one round trip, no provider call
    other_client = CountingClient(raw_redis)
    other = EmbeddingCache(
        provider=adapter(sim), store=RedisEmbeddingStore(other_client), key_prefix=key_prefix
    )
    assert await other.embed(texts) == vectors
    assert other_client.round_trips == 1 and sim.request_count(EMBEDDINGS_PATH) == 1
    assert other.stats().l2_hit_rate == 1.0
    assert await other.get_many(texts[:3] + ["не было"]) == vectors[:3] + [None]
    assert other_client.round_trips == 2  # L1 for three, one GET for the fourth
    await cache.aclose()
    await other.aclose()


@pytest.mark.all_redis_modes  # also on a Redis Cluster and a Sentinel set (make test-cluster)
async def test_foreign_values_are_misses_and_get_overwritten(
    sim: OpenAISimulator, raw_redis: redis.Redis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = EmbeddingCache(provider=adapter(sim), store=RedisEmbeddingStore(raw_redis), key_prefix=key_prefix)
    key = cache.key_for("Когда вы работаете?")
    await raw_redis.set(key, encode_embedding(Embedding.from_floats("other-model", [1.0, 2.0])))
    with caplog.at_level(logging.WARNING, logger="voxcore.embeddings.cache"):
        (vector,) = await cache.embed(["Когда вы работаете?"])
    assert any(r.getMessage() == "embedding_cache_invalid" for r in caplog.records)
    assert decode_embedding(await raw_redis.get(key), model=MODEL) == vector  # type: ignore[arg-type]
    await cache.aclose()


async def test_redis_outage_costs_nothing_but_the_l2(
    sim: OpenAISimulator, own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    client = RedisConfig(url=own_redis.url, socket_timeout=0.5).build()  # what the container builds
    cache = EmbeddingCache(provider=adapter(sim), store=RedisEmbeddingStore(client))
    try:
        await cache.embed(["один"])
        own_redis.stop()
        with caplog.at_level(logging.WARNING, logger="voxcore.embeddings.store"):
            (vector,) = await cache.embed(["два"])  # L2 down: the provider answers
        assert vector.dimension == 256
        errors = [getattr(r, FIELDS_ATTR) for r in caplog.records if r.getMessage() == "redis_error"]
        assert errors and errors[0]["op"] == "embeddings.get_many"
        # the breaker is open: the next misses do not wait for a socket timeout
        loop = asyncio.get_running_loop()
        start = loop.time()
        await cache.embed(["три", "четыре"])
        assert loop.time() - start < 0.4
        own_redis.start()
        await asyncio.sleep(2.2)  # past the breaker's longest window
        await cache.embed(["пять"])
        assert await client.exists(cache.key_for("пять")) == 1  # L2 writes resumed
    finally:
        await cache.aclose()
        await client.aclose()


# -- the simulator's endpoint speaks the real contract ---------------------------------------------------


async def test_official_openai_client_reads_the_simulator(sim: OpenAISimulator) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=sim.base_url, api_key=sim.api_key or "x", max_retries=0)
    try:
        single = await client.embeddings.create(model="text-embedding-3-small", input="привет")
        assert len(single.data) == 1 and len(single.data[0].embedding) == 1536
        short = await client.embeddings.create(model="text-embedding-3-small", input=["а", "б"], dimensions=8)
        assert [len(d.embedding) for d in short.data] == [8, 8] and short.usage.total_tokens >= 2
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": MODEL}, 400, "input"),
        ({"model": MODEL, "input": []}, 400, "non-empty"),
        ({"model": MODEL, "input": ["a", ""]}, 400, "input[1]"),
        ({"model": MODEL, "input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": MODEL, "input": "a", "dimensions": 0}, 400, "dimensions"),
        ({"input": "a"}, 400, "model"),
        ({"model": "nope", "input": "a"}, 404, "does not exist"),
    ],
)
async def test_simulator_refuses_bad_requests_like_the_provider(
    sim: OpenAISimulator, body: dict[str, Any], status: int, message: str
) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        response = await client.post(
            sim.base_url + "/embeddings", json=body, headers={"Authorization": f"Bearer {sim.api_key}"}
        )
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


def test_shipped_config_lists_the_embedding_and_faq_defaults() -> None:
    from pathlib import Path

    from voxcore.entrypoints.settings import EmbeddingsSettings, FaqSettings, load_settings

    shipped = load_settings(Path(__file__).resolve().parents[2] / "configs" / "config.yml", env={})
    assert shipped.embeddings == EmbeddingsSettings()
    assert shipped.faq == FaqSettings()
