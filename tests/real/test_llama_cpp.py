"""voxcore against llama.cpp's OpenAI-compatible server and a real (tiny) model.

Every assertion is about the protocol (chunks, modes, connections, recovery, reports), never about what
the model says: a 270M model's wording is not a contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from tests.real.conftest import MODEL, LlamaServer
from voxcore.adapters.openai import OpenAIConfig, OpenAIConnectionManager, OpenAILLMClient
from voxcore.adapters.openai.structured_output import learned_variants
from voxcore.core.domain.models import LLMStreamChunk, LLMStructuredResponse
from voxcore.core.ports.errors import LLMError
from voxcore.entrypoints.container import Container
from voxcore.entrypoints.settings import load_settings
from voxcore.testing import RedisTarget
from voxcore.testing.plugin import delete_keys

WAIT_S = 180.0


class ShortAnswer(LLMStructuredResponse):
    """The default answer with bounded strings: llama.cpp's grammar then keeps a tiny model's turns short."""

    answer: str = Field(max_length=60, description="The reply to speak to the user.")
    internal_thought: str | None = Field(default=None, max_length=20, description="Never spoken.")

PROMPT = [
    {"role": "system", "content": "Ты голосовой ассистент. Отвечай одним коротким предложением."},
    {"role": "user", "content": "Привет! Как дела?"},
]


def config(llama: LlamaServer, **overrides: Any) -> OpenAIConfig:
    options: dict[str, Any] = {
        "base_url": llama.base_url,
        "api_key": None,
        "http2": False,
        "read_timeout_s": 60.0,
        "first_token_timeout_s": 60.0,
        "turn_timeout_s": 120.0,
        "max_output_tokens": 200,
        "max_concurrent_requests": 1,
        "warmup_model": MODEL,
        **overrides,
    }
    return OpenAIConfig(**options)


@contextlib.asynccontextmanager
async def connected(cfg: OpenAIConfig) -> AsyncIterator[tuple[OpenAIConnectionManager, OpenAILLMClient]]:
    manager = OpenAIConnectionManager(cfg)
    try:
        await asyncio.wait_for(manager.start(), WAIT_S)
        yield manager, OpenAILLMClient(cfg)
    finally:
        await manager.shutdown()


async def turn(manager: OpenAIConnectionManager, llm: OpenAILLMClient) -> list[LLMStreamChunk]:
    http = await manager.get_client()
    async with asyncio.timeout(WAIT_S):
        return [c async for c in llm.stream_structured_generate(http, PROMPT, MODEL, ShortAnswer)]


def check_protocol(chunks: list[LLMStreamChunk]) -> None:
    assert chunks and chunks[-1].is_final_chunk
    first = chunks[0]
    assert first.text_chunk == "" and first.is_safe is not None and first.aggression_score is not None
    assert all(c.is_safe is None for c in chunks[1:])


async def test_auto_settles_on_a_mode_the_server_accepts(llama: LlamaServer) -> None:
    async with connected(config(llama)) as (manager, llm):
        chunks = await turn(manager, llm)
        check_protocol(chunks)
        variant = learned_variants()[(llama.base_url, "auto")]
        assert variant != "json_schema"  # llama.cpp refuses it with a 500 naming response_format
        assert llm.last_result is not None and llm.last_result.text == "".join(c.text_chunk for c in chunks)
        chunks = await turn(manager, llm)  # no second refusal: the mode is remembered
        check_protocol(chunks)


async def test_a_turn_longer_than_the_warmup_interval_is_never_cut(llama: LlamaServer) -> None:
    async with connected(config(llama, warmup_interval_s=0.3)) as (manager, llm):
        await turn(manager, llm)
        pings = manager.pings
        chunks = await turn(manager, llm)
        check_protocol(chunks)
        assert llm.last_result is not None and llm.last_result.total_ms > 300
        assert manager.pings == pings or manager.in_flight == 0  # pings only between turns
        await asyncio.sleep(0.8)
        assert manager.pings > pings


async def test_a_cancelled_turn_leaves_the_connection_usable(llama: LlamaServer) -> None:
    async with connected(config(llama)) as (manager, llm):
        http = await manager.get_client()
        stream = llm.stream_structured_generate(http, PROMPT, MODEL, ShortAnswer)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                if chunk.text_chunk:
                    break
        task = asyncio.ensure_future(turn(manager, llm))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        check_protocol(await turn(manager, llm))


async def test_the_same_manager_recovers_after_the_server_is_killed_mid_stream(llama: LlamaServer) -> None:
    async with connected(config(llama)) as (manager, llm):
        await turn(manager, llm)
        http = await manager.get_client()
        with pytest.raises(LLMError):
            async with asyncio.timeout(WAIT_S):
                async for chunk in llm.stream_structured_generate(http, PROMPT, MODEL, ShortAnswer):
                    if chunk.text_chunk:
                        llama.kill()
        llama.start()
        check_protocol(await turn(manager, llm))


async def test_a_turn_after_6_s_idle_reuses_its_connection(llama: LlamaServer) -> None:
    # uvicorn closes idle keep-alive connections after 5 s and announces nothing: the first idle gap
    # teaches the manager, which then pings often enough to keep the connection open.
    async with connected(config(llama, warmup_interval_s=20.0)) as (manager, llm):
        await turn(manager, llm)
        await asyncio.sleep(6.0)
        await turn(manager, llm)
        assert manager.connections_found_closed == 1 and manager.warmup_interval_s < 5.0
        await asyncio.sleep(6.0)
        await turn(manager, llm)
        assert llm.last_result is not None and llm.last_result.connection_reused is True


@pytest.fixture
async def container(llama: LlamaServer, voxcore_redis: RedisTarget) -> AsyncIterator[Container]:
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    env = {
        "REDIS_URL": voxcore_redis.url,
        "OPENAI_BASE_URL": llama.base_url,
        "VOXCORE_CACHE__KEY_PREFIX": prefix,
        "VOXCORE_LOGGING__CONFIGURE": "false",
        "VOXCORE_LLM__MODELS__MAIN": MODEL,
        "VOXCORE_LLM__MODELS__SUMMARY": MODEL,
        "VOXCORE_LLM__HTTP2": "false",
        "VOXCORE_LLM__MAX_CONCURRENT_REQUESTS": "1",
        "VOXCORE_LLM__MAX_OUTPUT_TOKENS": "160",
        "VOXCORE_LLM__CONTEXT_WINDOW_TOKENS": "700",
        "VOXCORE_LLM__TIMEOUTS__FIRST_TOKEN_S": "60",
        "VOXCORE_LLM__TIMEOUTS__READ_S": "60",
        "VOXCORE_LLM__TIMEOUTS__TURN_S": "120",
        "VOXCORE_DUAL_CONTEXT__RECENT_MESSAGES": "2",
        "VOXCORE_SUMMARY__MAX_OUTPUT_TOKENS": "48",
    }
    c = Container(settings=load_settings(env=env))
    c.conversation_manager.add_kwargs(response_model=ShortAnswer)
    started: Any = c.init_resources()
    if started is not None:
        await started
    try:
        yield c
    finally:
        shutdown: Any = c.shutdown_resources()
        if shutdown is not None:
            await shutdown
        await delete_keys(voxcore_redis.url, prefix)


async def test_ten_turns_with_a_handover_on_a_small_context_window(container: Container) -> None:
    manager = await container.open_conversation(f"real-{uuid.uuid4().hex[:8]}")
    try:
        for i in range(10):
            async with asyncio.timeout(WAIT_S):
                chunks = [
                    c async for c in manager.process_user_turn(f"Расскажи что-нибудь про номер {i + 1}.")
                ]
            # The manager's first chunk carries the metadata (and, for a message the model flags
            # unsafe, the configured unsafe reply); the last one ends the turn.
            assert chunks and chunks[0].is_safe is not None and chunks[-1].is_final_chunk
            metrics = manager.last_turn_metrics
            assert metrics is not None and metrics.outcome == "ok"
            assert metrics.time_to_first_token_ms is not None
            await manager.dual_context.wait_warmup()  # the summary runs between turns on this server
        assert manager.dual_context.handovers >= 1
    finally:
        await manager.shutdown()


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, list[dict[str, Any]], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxcore.entrypoints.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, [json.loads(line) for line in out.decode().splitlines()], err.decode()


@pytest.mark.parametrize("command", ["probe-llm", "probe-agent"])
async def test_probes_write_their_reports(llama: LlamaServer, tmp_path: Path, command: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "VOXCORE_", "OPENAI_"))}
    env.update(
        OPENAI_BASE_URL=llama.base_url,
        VOXCORE_LLM__MODELS__MAIN=MODEL,
        VOXCORE_LLM__MODELS__SUMMARY=MODEL,
        VOXCORE_LLM__HTTP2="false",
        VOXCORE_LLM__MAX_CONCURRENT_REQUESTS="1",
        VOXCORE_LLM__MAX_OUTPUT_TOKENS="160",
        VOXCORE_LLM__TIMEOUTS__FIRST_TOKEN_S="60",
        VOXCORE_LLM__TIMEOUTS__READ_S="60",
    )
    extra = ["--repeats", "3"] if command == "probe-llm" else ["--repeats", "2"]
    code, lines, err = await run_cli(
        command, "--embedded-redis", *extra, "--report-dir", str(tmp_path), env=env
    )
    saved = [line for line in lines if line["event"] == "report_saved"]
    assert saved, err[-2000:]
    assert all(Path(s["path"]).exists() for s in saved)
    markdown = next(Path(s["path"]) for s in saved if s["path"].endswith(".md")).read_text()
    assert "time_to_first_text_ms" in markdown
    assert code in (0, 1)  # 1 only when some turn failed, and then the report lists it
    if code == 1:
        assert "failed turns" in markdown
