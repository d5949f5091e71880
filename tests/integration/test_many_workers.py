"""Several worker processes on one Redis: an exact shared rate limit, one synthesis per ``tts:*`` miss.

Each worker is a real ``python`` process (``tests/integration/worker_process.py``) that shares nothing
with the others but Redis; a Redis list is the starting gun, so they all start at the same moment.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from tests.conftest import RedisTarget
from voxcore.entrypoints.runtime import simulator_reply
from voxcore.simulator.openai_server import AUDIO_SPEECH_PATH, OpenAISimulator

pytestmark = pytest.mark.all_redis_modes

ROOT = Path(__file__).resolve().parents[2]


def spec(target: RedisTarget) -> dict[str, Any]:
    return {
        "mode": target.mode,
        "url": target.url,
        "nodes": list(target.nodes),
        "sentinels": list(target.sentinels),
        "service": target.service,
    }


async def run_workers(
    command: str, args: list[dict[str, Any]], raw_redis: redis.Redis, go_key: str
) -> list[dict[str, Any]]:
    """Start one process per ``args`` entry, release them together, return what each printed."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.worker_process",
            command,
            json.dumps({**a, "go": go_key}),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for a in args
    ]
    try:
        async with asyncio.timeout(90):
            while await raw_redis.llen(go_key + ":ready") < len(procs):
                for proc in procs:
                    if proc.returncode is not None:
                        _, err = await proc.communicate()
                        pytest.fail(f"worker exited early: {err.decode(errors='replace')[-2000:]}")
                await asyncio.sleep(0.05)
            await raw_redis.rpush(go_key, *[b"go"] * len(procs))
            outputs = [await proc.communicate() for proc in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    results = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results


async def test_rate_limit_is_exact_across_worker_processes(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    subject = f"caller-{uuid.uuid4().hex[:8]}"
    base = {"redis": spec(redis_target), "prefix": key_prefix, "subject": subject, "limit": 37, "calls": 40}
    results = await run_workers("rate_limit", [base] * 4, raw_redis, f"{key_prefix}go")
    assert sum(r["allowed"] for r in results) == 37  # 160 concurrent calls from 4 processes


async def test_two_workers_missing_one_tts_key_synthesize_it_once(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    # A slow first byte: the loser finds the lease taken and waits for the winner's cache write.
    async with OpenAISimulator(first_token_delay_ms=300) as sim:
        base = {
            "redis": spec(redis_target),
            "prefix": key_prefix,
            "tts_url": sim.base_url,
            "text": "Ваш номер заказа 4512",
            "wait_s": 10.0,
        }
        results = await run_workers("synthesize", [base, base], raw_redis, f"{key_prefix}go")
        assert sim.request_count(AUDIO_SPEECH_PATH) == 1
    assert results[0]["bytes"] > 0
    assert results[0]["sha1"] == results[1]["sha1"]  # the loser played the winner's audio


async def test_a_worker_that_waits_too_long_synthesizes_itself(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    async with OpenAISimulator(first_token_delay_ms=800) as sim:
        base = {
            "redis": spec(redis_target),
            "prefix": key_prefix,
            "tts_url": sim.base_url,
            "text": "Спасибо за ожидание",
            "wait_s": 0.05,
        }
        results = await run_workers("synthesize", [base, base], raw_redis, f"{key_prefix}go")
        assert sim.request_count(AUDIO_SPEECH_PATH) == 2  # a duplicate synthesis, never a silent caller
    assert all(r["bytes"] > 0 for r in results)
    assert results[0]["sha1"] == results[1]["sha1"]  # the simulator's speech is deterministic


async def test_two_workers_speaking_one_text_through_the_voice_service_synthesize_it_once(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    async with OpenAISimulator(first_token_delay_ms=300) as sim:
        base = {
            "redis": spec(redis_target),
            "prefix": key_prefix,
            "tts_url": sim.base_url,
            "text": "Добрый день, чем могу помочь?",
            "wait_s": 10.0,
        }
        results = await run_workers("speak", [base, base], raw_redis, f"{key_prefix}go")
        assert sim.request_count(AUDIO_SPEECH_PATH) == 1
    assert sorted(r["reason"] for r in results) == ["cache_hit", "ok"]  # the loser got the cached audio
    assert results[0]["bytes"] > 0 and results[0]["sha1"] == results[1]["sha1"]


async def test_a_call_resumes_on_another_worker_after_its_worker_died(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    async with OpenAISimulator(api_key="sk-workers", reply=simulator_reply) as sim:
        env = {
            **redis_target.env(),
            "OPENAI_BASE_URL": sim.base_url,
            "OPENAI_API_KEY": "sk-workers",
            "VOXCORE_CACHE__KEY_PREFIX": key_prefix,
            "VOXCORE_LOGGING__CONFIGURE": "false",
        }
        call = {"redis": spec(redis_target), "env": env, "session": f"call-{uuid.uuid4().hex[:8]}"}
        turns = ["Здравствуйте, хочу застраховать квартиру", "Площадь 54 метра", "А сколько стоит?"]
        dying = {**call, "resume": False, "turns": turns, "crash": True}
        (first,) = await run_workers("converse", [dying], raw_redis, f"{key_prefix}go1")
        (second,) = await run_workers(
            "converse", [{**call, "resume": True, "turns": ["Продолжим"]}], raw_redis, f"{key_prefix}go2"
        )
    assert first["replies"] == [f"Вы сказали: {t}" for t in turns]
    assert second["restored"] == first["history"]  # the context, bit for bit, in another process
    assert second["replies"] == ["Вы сказали: Продолжим"]
    assert second["history"][: len(first["history"])] == first["history"]
