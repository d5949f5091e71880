"""``probe-llm``/``probe-agent`` go on after a failed turn, list it, and always write their reports."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_llm_cli import clean_env, named, run
from voxcore.simulator import Fault, OpenAISimulator, RequestPlan


async def test_probe_llm_counts_and_lists_failed_turns_and_writes_the_report(tmp_path: Path) -> None:
    async with OpenAISimulator(api_key="sk-simulator") as sim:
        sim.plan_next(RequestPlan(fault=Fault.SERVICE_UNAVAILABLE, retry_after=2))  # the first turn only
        env = clean_env(OPENAI_BASE_URL=sim.base_url, OPENAI_API_KEY="sk-simulator")
        code, lines, err = await run(
            "probe-llm", "--embedded-redis", "--repeats", "3", "--report-dir", str(tmp_path), env=env
        )
    assert code == 1, err
    (failed,) = named(lines, "probe_turn_failed")
    assert failed["error_type"] == "LLMServerError" and failed["step"] == "repeat 1"
    (done,) = named(lines, "probe_llm_done")
    assert done["turns"] == 3 and done["failed_turns"] == 1
    (saved,) = named(lines, "report_saved")
    text = Path(saved["path"]).read_text()
    assert "failed turns: 1 of 3" in text and "LLMServerError" in text
    # The report leads with time_to_first_text_ms; TTFT comes from the turns that produced one.
    table = text.split("| metric | p50 | p95 | mean |", 1)[1]
    assert table.index("time_to_first_text_ms") < table.index("time_to_first_token_ms")
    assert "TTFT p50: -" not in text and "deltas/s" in text


async def test_probe_agent_reports_unsafe_turns_with_ttft_and_lists_failures(tmp_path: Path) -> None:
    unsafe = {"is_safe": False, "aggression_score": 9, "answer": "нет"}
    async with OpenAISimulator(api_key="sk-simulator", reply=unsafe) as sim:
        sim.plan_next(RequestPlan(fault=Fault.SERVER_ERROR))
        env = clean_env(OPENAI_BASE_URL=sim.base_url, OPENAI_API_KEY="sk-simulator")
        code, lines, err = await run(
            "probe-agent", "--embedded-redis", "--repeats", "1", "--report-dir", str(tmp_path), env=env
        )
    assert code == 1, err
    paths = sorted(Path(p["path"]) for p in named(lines, "report_saved"))
    data = json.loads(paths[0].read_text())
    assert data["failed_turns"] == 1 and data["turns"][0]["error_type"] == "LLMServerError"
    # Every completed turn was flagged unsafe, and still the figures are there.
    assert data["ttft"]["p50"] is not None and data["time_to_first_text"]["p50"] is not None
    assert "failed turns: 1 of" in paths[1].read_text()
