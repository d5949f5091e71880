"""The LLM commands of the ``voxcore`` CLI, as subprocesses, on the local simulator and real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from voxcore.simulator import OpenAISimulator

VOXCORE = [sys.executable, "-m", "voxcore.entrypoints.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "VOXCORE_", "OPENAI_"))}
    return {**env, **extra}


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]], str]:
    proc = await asyncio.create_subprocess_exec(
        *VOXCORE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or clean_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    lines = [json.loads(line) for line in out.decode().splitlines()]  # stdout is JSON lines only
    assert proc.returncode is not None
    return proc.returncode, lines, err.decode()


def named(lines: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == event]


async def test_probe_llm_on_the_simulator_writes_a_report(tmp_path: Path) -> None:
    code, lines, err = await run(
        "probe-llm", "--embedded-redis", "--repeats", "6", "--report-dir", str(tmp_path), "--log-level=DEBUG"
    )
    assert code == 0, err
    assert named(lines, "llm_simulator_started")
    for event in (
        "conn_handshake_start",
        "conn_handshake_finish",
        "request_send",
        "first_token",
        "stream_end",
    ):
        assert named(lines, event), event
    assert named(lines, "warmup_start") and named(lines, "warmup_ready")
    (saved,) = named(lines, "report_saved")
    report = Path(saved["path"])
    assert report.parent == tmp_path and report.name.startswith("llm_probe_") and report.suffix == ".md"
    text = report.read_text()
    assert "local simulator" in text and "not a real model" in text
    for needle in (
        "TTFT (request sent -> first token)",
        "total response",
        "chunk rate",
        "handshake",
        "dual context",
    ):
        assert needle in text
    assert "TTFT p50:" in text


async def test_probe_agent_shows_summary_cache_miss_then_hit(tmp_path: Path) -> None:
    code, lines, err = await run(
        "probe-agent",
        "--embedded-redis",
        "--session-id",
        "demo-123",
        "--repeats",
        "3",
        "--report-dir",
        str(tmp_path),
        "--log-level",
        "DEBUG",
    )
    assert code == 0, err
    runs = named(lines, "summary_step")
    assert [r["hit"] for r in runs] == [False, True, True]
    assert named(lines, "summary_cache_check") and named(lines, "summary_cache_save")
    paths = sorted(Path(p["path"]) for p in named(lines, "report_saved"))
    assert [p.suffix for p in paths] == [".json", ".md"]
    assert all(p.name.startswith("llm_agent_") for p in paths)
    data = json.loads(paths[0].read_text())
    assert data["simulator"] is True and len(data["turns"]) == 5
    assert data["dual_context"]["warmups_started"] >= 1 and data["dual_context"]["handovers"] >= 1
    assert data["session_key"].startswith("summary:session:") and len(data["session_key"]) == 32
    assert [r["hit"] for r in data["summary_cache"]] == [False, True, True]
    markdown = paths[1].read_text()
    assert "TTFT p50: " in markdown and "(target < 800 ms) — OK" in markdown


@pytest.mark.parametrize(
    ("part", "event"),
    [
        ("connection", "conn_handshake_finish"),
        ("client", "sandbox_chunk"),
        ("context", "sandbox_prompt"),
        ("dual", "handover_perform"),
        ("manager", "sandbox_turn"),
    ],
)
async def test_sandboxes_print_their_events(part: str, event: str) -> None:
    code, lines, err = await run("sandbox", part, "--embedded-redis")
    assert code == 0, err
    assert named(lines, event), [line["event"] for line in lines]


async def test_bad_key_is_a_json_error_and_exit_1(tmp_path: Path) -> None:
    async with OpenAISimulator(api_key="sk-right") as sim:
        env = clean_env(OPENAI_BASE_URL=sim.base_url, OPENAI_API_KEY="sk-wrong")
        code, lines, _ = await run("probe-llm", "--embedded-redis", "--report-dir", str(tmp_path), env=env)
    assert code == 1
    (error,) = named(lines, "error")
    assert error["error_type"] == "LLMAuthError"
    assert not list(tmp_path.iterdir())  # no report for a run that never started
