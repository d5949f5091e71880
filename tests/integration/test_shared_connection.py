"""Opt-in ``llm.shared_connection``: every call of the process uses one warm client per provider."""

from __future__ import annotations

import asyncio

from tests.conftest import RedisTarget
from voxcore.adapters.openai.config import OpenAIConfig
from voxcore.adapters.openai.shared import SharedConnections
from voxcore.entrypoints.container import Container
from voxcore.entrypoints.settings import load_settings
from voxcore.simulator import OpenAISimulator

MODELS_PATH = "/v1/models"


def container_for(
    sim: OpenAISimulator, redis_target: RedisTarget, key_prefix: str, shared: bool
) -> Container:
    env = {
        "REDIS_URL": redis_target.url,
        "VOXCORE_CACHE__KEY_PREFIX": key_prefix,
        "VOXCORE_LOGGING__CONFIGURE": "false",
        "OPENAI_BASE_URL": sim.base_url,
        "OPENAI_API_KEY": sim.api_key or "",
        "VOXCORE_LLM__SHARED_CONNECTION": "true" if shared else "false",
    }
    return Container(settings=load_settings(env=env))


async def answer(manager: object, text: str) -> str:
    parts = [c.text_chunk async for c in manager.process_user_turn(text)]  # type: ignore[attr-defined]
    return "".join(parts)


async def test_calls_share_one_handshake_and_connection(redis_target: RedisTarget, key_prefix: str) -> None:
    async with OpenAISimulator() as sim:
        container = container_for(sim, redis_target, key_prefix, shared=True)
        await container.init_resources()
        try:
            calls = [await container.open_conversation(f"shared-{i}") for i in range(20)]
            assert sim.request_count(MODELS_PATH) == 1  # one handshake for the process
            for call in calls[:5]:
                assert "Вы сказали" in await answer(call, "Здравствуйте")
            assert sim.connections_accepted == 1  # sequential turns reuse the one keep-alive connection
            await calls[0].shutdown()  # one call leaving does not close the others' connection
            results = await asyncio.gather(*(answer(c, "Ещё вопрос") for c in calls[1:]))
            assert all("Вы сказали" in r for r in results)
            assert calls[1].last_turn_metrics is not None
            for call in calls[1:]:
                await call.shutdown()
            later = await container.open_conversation("shared-late")
            assert sim.request_count(MODELS_PATH) == 1  # still warm: no new handshake
            await later.shutdown()
        finally:
            await container.shutdown_resources()
        for _ in range(100):  # the server sees the client's close shortly after
            if sim.open_connections == 0:
                break
            await asyncio.sleep(0.02)
        assert sim.open_connections == 0  # closed with the container


async def test_default_is_one_connection_per_call(redis_target: RedisTarget, key_prefix: str) -> None:
    async with OpenAISimulator() as sim:
        container = container_for(sim, redis_target, key_prefix, shared=False)
        await container.init_resources()
        try:
            calls = [await container.open_conversation(f"own-{i}") for i in range(3)]
            assert sim.request_count(MODELS_PATH) == 3 and sim.connections_accepted == 3
            for call in calls:
                await call.shutdown()
        finally:
            await container.shutdown_resources()


async def test_shared_connections_close_and_refuse() -> None:
    shared = SharedConnections(max_connections=4)
    config = OpenAIConfig(base_url="http://127.0.0.1:9/v1", api_key=None)
    handle = shared.handle(config)
    assert shared.handle(config).shared_manager is handle.shared_manager and shared.providers == 1
    await handle.shutdown()
    await shared.aclose()
    await shared.aclose()
    try:
        shared.handle(config)
    except RuntimeError as exc:
        assert "closed" in str(exc)
    else:
        raise AssertionError("a closed SharedConnections handed out a handle")
