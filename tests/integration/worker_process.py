"""A voxcore worker process for the many-workers tests: ``python -m tests.integration.worker_process``.

Each command builds its objects from the JSON given on the command line, waits for the test's "go"
(a ``BLPOP`` on a Redis list, so every worker starts at the same moment), does its work and prints one
JSON line with what it saw. Real processes, real Redis, real HTTP: nothing is shared but Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
from typing import Any

from voxcore.adapters.audio import SoxrAudioConverter
from voxcore.adapters.openai.tts import OpenAITTSEngine
from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.adapters.redis.lease import RedisKeyLeases
from voxcore.adapters.redis.rate_limit import RedisRateLimiter
from voxcore.application.hybrid import HybridResponder
from voxcore.application.shared_synthesis import SharedSynthesis
from voxcore.application.voice import VoiceService
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.playlist import Playlist, TTSItem
from voxcore.core.domain.voice import AgentVoiceSettings


def config_from(spec: dict[str, Any]) -> RedisConfig:
    return RedisConfig(
        mode=spec["mode"],
        url=spec.get("url"),
        nodes=tuple(spec.get("nodes", ())),
        sentinels=tuple(spec.get("sentinels", ())),
        sentinel_service=spec.get("service") or "mymaster",
    )


async def wait_for_go(client: Any, go_key: str) -> None:
    await client.rpush(go_key + ":ready", b"1")
    if await client.blpop([go_key], timeout=30) is None:
        raise SystemExit("no go within 30 s")


async def rate_limit(args: dict[str, Any]) -> dict[str, Any]:
    client = config_from(args["redis"]).build()
    limiter = RedisRateLimiter(client, limit=args["limit"], period_s=60, key_prefix=args["prefix"])
    try:
        await wait_for_go(client, args["go"])
        decisions = await asyncio.gather(*(limiter.acquire(args["subject"]) for _ in range(args["calls"])))
        return {"allowed": sum(d.allowed for d in decisions)}
    finally:
        await limiter.aclose()
        await client.aclose()


async def synthesize(args: dict[str, Any]) -> dict[str, Any]:
    config = config_from(args["redis"])
    client = config.build()
    cache = RedisCacheManager(config, key_prefix=args["prefix"])
    await cache.connect()
    engine = OpenAITTSEngine(base_url=args["tts_url"], api_key="sk-simulator", timeout_s=10.0)
    shared = SharedSynthesis(
        cache=cache,
        leases=RedisKeyLeases(client, key_prefix=args["prefix"]),
        wait_timeout_s=args["wait_s"],
        poll_interval_s=0.02,
    )
    responder = HybridResponder(
        cache=cache,
        tts=engine,
        converter=SoxrAudioConverter(),
        target_format=AudioFormat(24_000, 1, 2),
        voice="alloy",
        shared_synthesis=shared,
    )
    try:
        await wait_for_go(client, args["go"])
        async with contextlib.aclosing(responder.play(Playlist.of(TTSItem(args["text"])))) as stream:
            audio = b"".join([chunk async for chunk in stream])
        await responder.drain()
        return {"sha1": hashlib.sha1(audio).hexdigest(), "bytes": len(audio)}
    finally:
        await responder.shutdown()
        await engine.aclose()
        await cache.close()
        await client.aclose()


async def speak(args: dict[str, Any]) -> dict[str, Any]:
    """The voice service's path: ``synthesize_speech`` with the cache and the cross-worker lease."""
    config = config_from(args["redis"])
    client = config.build()
    cache = RedisCacheManager(config, key_prefix=args["prefix"])
    await cache.connect()
    engine = OpenAITTSEngine(base_url=args["tts_url"], api_key="sk-simulator", timeout_s=10.0)
    voice = VoiceService(
        agents={"sales": AgentVoiceSettings(tts_enabled=True, engine="openai", voice="alloy")},
        engines={"openai": engine},
        cache=cache,
        shared_synthesis=SharedSynthesis(
            cache=cache,
            leases=RedisKeyLeases(client, key_prefix=args["prefix"]),
            wait_timeout_s=args["wait_s"],
            poll_interval_s=0.02,
        ),
    )
    try:
        await wait_for_go(client, args["go"])
        result = await voice.synthesize_speech("sales", args["text"], user_id="+79990001122")
        audio = result.audio or b""
        return {"reason": result.reason, "sha1": hashlib.sha1(audio).hexdigest(), "bytes": len(audio)}
    finally:
        await voice.aclose()
        await engine.aclose()
        await cache.close()
        await client.aclose()


async def converse(args: dict[str, Any]) -> dict[str, Any]:
    """One worker's part of a call: open (or resume) it through the container, take some turns.

    With ``crash`` the process dies right after (no container shutdown), like a killed worker.
    """
    from voxcore.entrypoints.container import Container
    from voxcore.entrypoints.settings import load_settings

    settings = load_settings(env=args["env"])
    container = Container(settings=settings)
    await container.init_resources()
    redis_client = config_from(args["redis"]).build()
    await wait_for_go(redis_client, args["go"])
    await redis_client.aclose()
    manager = await container.open_conversation(args["session"], resume=args["resume"])
    restored = [dict(m) for m in manager.active_context.messages]
    replies = []
    for text in args["turns"]:
        chunks = [chunk async for chunk in manager.process_user_turn(text)]
        replies.append("".join(c.text_chunk for c in chunks))
    history = [dict(m) for m in manager.active_context.messages]
    await manager.shutdown()  # the recorded turns are written before this returns
    result = {"restored": restored, "history": history, "replies": replies}
    if args.get("crash"):
        print(json.dumps(result), flush=True)
        os._exit(0)  # no shutdown_resources: the worker is simply gone
    await container.shutdown_resources()
    return result


COMMANDS = {"rate_limit": rate_limit, "synthesize": synthesize, "speak": speak, "converse": converse}


def main() -> None:
    command, raw = sys.argv[1], sys.argv[2]
    result = asyncio.run(COMMANDS[command](json.loads(raw)))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
