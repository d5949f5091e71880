"""``voxcore demo`` against a configured provider that fails: one JSON error line, or the local voice."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from voxcore.simulator import AUDIO_SPEECH_PATH, Fault, OpenAISimulator, RequestPlan

VOXCORE = [sys.executable, "-m", "voxcore.entrypoints.cli"]


async def demo(tmp_path: Path, sim: OpenAISimulator, **env: str) -> tuple[int, list[dict[str, Any]], str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "VOXCORE_", "OPENAI_"))}
    proc = await asyncio.create_subprocess_exec(
        *VOXCORE,
        "demo",
        "--report-dir",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, "OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-simulator", **env},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, [json.loads(line) for line in out.decode().splitlines()], err.decode()


async def test_a_provider_error_is_one_json_error_line_and_exit_1(tmp_path: Path) -> None:
    async with OpenAISimulator() as sim:
        sim.set_default_fault(Fault.SERVER_ERROR)  # every chat request: 500
        code, lines, err = await demo(tmp_path, sim)
    assert code == 1
    errors = [line for line in lines if line["event"] == "error"]
    assert len(errors) == 1 and errors[0]["error_type"] == "LLMServerError"
    assert "Traceback" not in err
    assert not [line for line in lines if line["event"] == "demo_call_start"]


async def test_a_provider_without_speech_is_replaced_by_the_local_engine(tmp_path: Path) -> None:
    async with OpenAISimulator() as sim:
        sim.set_default_plan(RequestPlan(fault=Fault.UNKNOWN_MODEL, path=AUDIO_SPEECH_PATH))  # 404
        code, lines, err = await demo(tmp_path, sim, VOXCORE_VOICE__DEFAULT_AGENT__ENGINE="openai")
    assert code == 0, err[-3000:]
    (fallback,) = [line for line in lines if line["event"] == "demo_tts_fallback"]
    assert fallback["engine"] == "openai" and fallback["fallback"] == "espeak-ng"
    assert "404" in fallback["reason"]
    assert "failed its start-up check" in err and "espeak-ng" in err
    (start,) = [line for line in lines if line["event"] == "demo_call_start"]
    assert start["tts_engine"] == "espeak-ng"
