"""The FAQ matcher in a host's call: container settings ``faq.*``, a spoken conversation answering known
questions from recordings (no LLM request) and the rest through the LLM, over Redis and the simulator."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from tests.conftest import RedisTarget
from voxcore.application.spoken import SpokenConversation
from voxcore.core.domain.keys import events_stream_key
from voxcore.core.ports.errors import ConfigurationError
from voxcore.entrypoints.container import Container
from voxcore.events import FIELDS_ATTR
from voxcore.simulator import CHAT_COMPLETIONS_PATH, EMBEDDINGS_PATH, OpenAISimulator

FAQ = """
faq:
  - id: opening_hours
    questions: ["Когда вы работаете?", "Какой у вас график работы?"]
    text: "Мы работаем ежедневно с девяти утра до девяти вечера."
  - id: delivery_cost
    questions: ["Сколько стоит доставка?"]
    text: "Доставка стоит триста рублей."
    reply: [{tts: "Доставка стоит"}, {pause_ms: 100}, {tts: "триста рублей"}]
"""


def write_config(
    tmp_path: Path, redis_url: str, key_prefix: str, sim: OpenAISimulator, faq: str = ""
) -> Path:
    (tmp_path / "faq.yml").write_text(FAQ, encoding="utf-8")
    config = tmp_path / "voxcore.yml"
    config.write_text(
        f"redis: {{url: '{redis_url}'}}\ncache: {{key_prefix: '{key_prefix}'}}\n"
        "logging: {configure: false}\n"
        f"llm: {{base_url: '{sim.base_url}', api_key: '{sim.api_key}'}}\n"
        "voice:\n  default_agent: {engine: openai, voice: alloy, audio_format: {sample_rate: 24000}}\n"
        "embeddings: {model: sim-embed}\n" + faq,
        encoding="utf-8",
    )
    return config


def fields(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS_ATTR, {}) for r in caplog.records if r.getMessage() == name]


async def speak(conversation: SpokenConversation, text: str) -> bytes:
    return b"".join([chunk async for chunk in conversation.respond(text)])


async def test_known_questions_are_answered_from_recordings_without_the_llm(
    redis_target: RedisTarget, key_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with OpenAISimulator() as sim:
        faq = "faq: {enabled: true, manifest_path: faq.yml, threshold: 0.9}\n"
        container = Container(config_path=str(write_config(tmp_path, redis_target.url, key_prefix, sim, faq)))
        await container.init_resources()
        try:
            assert sim.request_count(EMBEDDINGS_PATH) == 1  # every known phrasing, once, at start
            call = await container.open_spoken_conversation("call-faq-1")
            with caplog.at_level(logging.DEBUG, logger="voxcore"):
                audio = await speak(call, "когда вы  работаете")
                metrics = call.last_turn_metrics
                assert metrics is not None and metrics.faq_hit and metrics.faq_id == "opening_hours"
                assert metrics.llm is None and metrics.time_to_first_audio_ms is not None
                assert metrics.faq_score is not None and metrics.faq_score > 0.99
                assert audio and metrics.chunks == len(audio) // 960 + (1 if len(audio) % 960 else 0)
                assert sim.request_count(CHAT_COMPLETIONS_PATH) == 0  # no LLM call
                hits = fields(caplog, "faq_hit")
                assert hits and hits[0]["faq_id"] == "opening_hours"
                turns = fields(caplog, "spoken_turn")
                assert turns[-1]["faq_hit"] is True and "time_to_first_audio_ms" in turns[-1]

                history = call.conversation.active_context.get_history_for_summary()
                assert [m["role"] for m in history[-2:]] == ["user", "assistant"]
                assert history[-1]["content"] == "Мы работаем ежедневно с девяти утра до девяти вечера."

                # a playlist reply with pauses; the turn's embedding is asked once, then it is an L1 hit
                await speak(call, "Сколько стоит доставка?")
                await call.responder.drain()  # the syntheses are stored in the background
                embeds = sim.request_count(EMBEDDINGS_PATH)
                again = await speak(call, "Сколько стоит доставка?")
                assert sim.request_count(EMBEDDINGS_PATH) == embeds and again
                second = call.last_turn_metrics
                assert second is not None and second.faq_id == "delivery_cost"
                assert second.hybrid is not None and second.hybrid.misses == 0  # cached syntheses

                # any other turn goes to the LLM, which sees the FAQ turns in its prompt
                other = await speak(call, "Расскажите, пожалуйста, про ваши тарифы")
                metrics = call.last_turn_metrics
                assert other and metrics is not None and not metrics.faq_hit and metrics.llm is not None
                assert metrics.faq_score is not None and metrics.faq_score < 0.9
                assert sim.request_count(CHAT_COMPLETIONS_PATH) == 1
                prompt = next(
                    r for r in reversed(sim.requests) if r.path == CHAT_COMPLETIONS_PATH
                ).body.decode()
                assert "Мы работаем ежедневно" in prompt
            await call.shutdown()
            cache = await container.embedding_cache()
            assert cache.stats().l1_hits >= 1
        finally:
            await container.shutdown_resources()


async def test_faq_is_off_by_default_and_every_turn_goes_to_the_llm(
    redis_target: RedisTarget, key_prefix: str, tmp_path: Path
) -> None:
    async with OpenAISimulator() as sim:
        container = Container(config_path=str(write_config(tmp_path, redis_target.url, key_prefix, sim)))
        await container.init_resources()
        try:
            assert await container.faq_matcher() is None
            call = await container.open_spoken_conversation("call-faq-2")
            assert await speak(call, "Когда вы работаете?")
            metrics = call.last_turn_metrics
            assert metrics is not None and not metrics.faq_hit and metrics.faq_score is None
            assert sim.request_count(CHAT_COMPLETIONS_PATH) == 1
            assert sim.request_count(EMBEDDINGS_PATH) == 0
            await call.shutdown()
        finally:
            await container.shutdown_resources()


async def test_an_embedding_outage_sends_turns_to_the_llm(
    redis_target: RedisTarget, key_prefix: str, tmp_path: Path
) -> None:
    from voxcore.simulator import Fault, RequestPlan

    async with OpenAISimulator() as sim:
        faq = "faq: {enabled: true, manifest_path: faq.yml, threshold: 0.9}\n"
        container = Container(config_path=str(write_config(tmp_path, redis_target.url, key_prefix, sim, faq)))
        await container.init_resources()
        try:
            call = await container.open_spoken_conversation("call-faq-3")
            sim.plan_next(RequestPlan(fault=Fault.SERVER_ERROR, path=EMBEDDINGS_PATH))
            assert await speak(call, "Во сколько закрываетесь сегодня?")
            metrics = call.last_turn_metrics
            assert metrics is not None and not metrics.faq_hit and metrics.llm is not None
            await call.shutdown()
        finally:
            await container.shutdown_resources()


def test_faq_settings_are_validated(tmp_path: Path) -> None:
    from voxcore.entrypoints.settings import load_settings

    with pytest.raises(ConfigurationError, match="manifest_path"):
        load_settings(env={"VOXCORE_FAQ__ENABLED": "true"})
    with pytest.raises(ConfigurationError, match="threshold"):
        load_settings(env={"VOXCORE_FAQ__THRESHOLD": "1.5"})


async def test_a_broken_manifest_fails_start_up(
    redis_target: RedisTarget, key_prefix: str, tmp_path: Path
) -> None:
    async with OpenAISimulator() as sim:
        config = write_config(
            tmp_path, redis_target.url, key_prefix, sim, "faq: {enabled: true, manifest_path: faq.yml}\n"
        )
        (tmp_path / "faq.yml").write_text("faq:\n  - {id: x, questions: []}\n", encoding="utf-8")
        container = Container(config_path=str(config))
        with pytest.raises(ConfigurationError, match="invalid FAQ manifest"):
            await container.init_resources()
        shutdown = container.shutdown_resources()
        if shutdown is not None:
            await shutdown


@pytest.mark.parametrize("opener", ["open_conversation", "open_spoken_conversation"])
async def test_cancelling_an_open_leaves_no_connection_behind(
    redis_target: RedisTarget, key_prefix: str, tmp_path: Path, opener: str
) -> None:
    """A caller hanging up while its call is connecting: no connection, no warm-up loop survives it."""
    import asyncio

    from voxcore.simulator import RequestPlan

    async with OpenAISimulator() as sim:
        container = Container(config_path=str(write_config(tmp_path, redis_target.url, key_prefix, sim)))
        await container.init_resources()
        try:
            sim.plan_next(RequestPlan(path="/v1/models", first_token_delay_ms=300))  # a slow handshake
            opening = asyncio.ensure_future(getattr(container, opener)("call-hung-up"))
            await sim.wait_for_requests(1, path="/v1/models")
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            await asyncio.sleep(0.5)  # past the handshake: nothing may finish it and start warming up
            assert sim.open_connections == 0
            assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("voxcore-llm")]
        finally:
            await container.shutdown_resources()


async def test_each_played_item_is_published_as_a_hybrid_item_event(
    redis_target: RedisTarget, key_prefix: str, tmp_path: Path
) -> None:
    async with OpenAISimulator() as sim:
        faq = "faq: {enabled: true, manifest_path: faq.yml, threshold: 0.9}\n"
        container = Container(config_path=str(write_config(tmp_path, redis_target.url, key_prefix, sim, faq)))
        await container.init_resources()
        raw = redis.Redis.from_url(redis_target.url)
        try:
            call = await container.open_spoken_conversation("call-faq-items")
            assert await speak(call, "Сколько стоит доставка?")  # tts, pause, tts: two syntheses
            await call.responder.drain()
            assert await speak(call, "Сколько стоит доставка?")  # now both from the cache
            await call.shutdown()
            publisher = await container.event_publisher()
            assert publisher is not None and await publisher.flush(5)
            entries = await raw.xrange(key_prefix + events_stream_key("call-faq-items"))
            items = [json.loads(f[b"d"]) for _, f in entries if f[b"t"] == b"hybrid_item"]
            assert [(i["index"], i["item_kind"], i["kind"]) for i in items] == [
                (0, "tts", "miss"),
                (1, "pause", "silence"),
                (2, "tts", "miss"),
                (0, "tts", "hit"),
                (1, "pause", "silence"),
                (2, "tts", "hit"),
            ]
            assert items[0]["key"].startswith("tts:") and items[0]["key"] == items[3]["key"]
            assert all(i["chunks"] > 0 for i in items)
        finally:
            await raw.aclose()
            await container.shutdown_resources()
