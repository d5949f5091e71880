"""LLM commands: ``probe-llm`` (SPEC-LLM-2), ``probe-agent`` (SPEC-LLM-3) and ``sandbox`` (SPEC-LLM-1 §5).

All print JSON lines on stdout. Without ``OPENAI_API_KEY``/``OPENAI_BASE_URL`` they run against the
project's local OpenAI-compatible simulator and say so (event, report). A provider error at the
handshake (bad key, unknown endpoint) prints one JSON ``error`` line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from voxcore.application.context import LLMContext
from voxcore.application.dual_context import DualContextController
from voxcore.application.manager import ConversationManager
from voxcore.core.domain.keys import summary_key
from voxcore.core.domain.models import ConversationMessage, LLMStructuredResponse, make_message
from voxcore.core.ports.errors import LLMError
from voxcore.entrypoints.runtime import Runtime, open_runtime
from voxcore.events import FIELDS_ATTR, emit

log = logging.getLogger("voxcore.cli")

EXIT_OK, EXIT_FAILED = 0, 1
TTFT_TARGET_MS = 800.0
#: Context window used on the simulator unless told otherwise: small enough that a short probe
#: shows the dual context at work (warm-up, standby, handover).
SIM_CONTEXT_WINDOW = 520
#: Messages carried verbatim into the standby context on the simulator (few, for the same reason).
SIM_RECENT_MESSAGES = 2
AGENT_STEPS = (  # SPEC-LLM-3 §4, with two follow-ups before the final step so the context fills up
    "Привет! Скажи в двух фразах, чем ты полезен клиентам страховой компании?",
    "А теперь в одном предложении объясни выгоды вежливо и без воды.",
    "Сколько стоит страховка квартиры площадью 54 метра?",
    "Хорошо, а если добавить машину?",
    "Суммаризируй весь диалог списком из 3 пунктов.",
)


def absolute_path(value: str) -> Path:
    """An argparse type: the path made absolute against the working directory at parse time."""
    return Path(os.path.abspath(value))


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the LLM commands to the ``voxcore`` parser."""
    llm_common = argparse.ArgumentParser(add_help=False)
    llm_common.add_argument("--prompts", type=absolute_path, help="prompts YAML (default: llm.prompts_path)")
    llm_common.add_argument(
        "--context-window-tokens",
        type=int,
        default=None,
        help=f"override llm.context_window_tokens (default on the simulator: {SIM_CONTEXT_WINDOW})",
    )

    probe = sub.add_parser(
        "probe-llm",
        parents=[common, llm_common],
        help="streaming LLM probe: TTFT, totals, chunk rate, handshake, context, dual context (SPEC-LLM-2)",
    )
    probe.add_argument("--model", default="main", help="'main', 'summary' or a model name")
    probe.add_argument("--text", default="Привет! Дай короткое описание продукта.")
    probe.add_argument("--repeats", type=int, default=5)
    probe.add_argument("--report-dir", type=absolute_path, default=absolute_path("reports"))
    probe.set_defaults(handler=probe_llm)

    agent = sub.add_parser(
        "probe-agent",
        parents=[common, llm_common],
        help="dialogue e2e with dual context and the Redis summary cache (SPEC-LLM-3)",
    )
    agent.add_argument("--session-id", default="demo-123")
    agent.add_argument("--repeats", type=int, default=2, help="runs of the summary step (1 miss, then hits)")
    agent.add_argument("--report-dir", type=absolute_path, default=absolute_path("reports"))
    agent.set_defaults(handler=probe_agent)

    sandbox = sub.add_parser(
        "sandbox",
        parents=[common, llm_common],
        help="run one LLM building block on its own and print its JSON events (SPEC-LLM-1 §5)",
    )
    sandbox.add_argument("part", choices=["connection", "client", "context", "dual", "manager"])
    sandbox.set_defaults(handler=sandbox_run)


# -- shared -------------------------------------------------------------------------------------


class EventRecorder(logging.Handler):
    """Keeps the structured events of a run (for reports), alongside the JSON lines on stdout."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[float, str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(
            (record.created, record.getMessage(), dict(getattr(record, FIELDS_ATTR, {}) or {}))
        )

    def named(self, name: str) -> list[dict[str, Any]]:
        return [fields for _, event, fields in self.events if event == name]


@contextmanager
def recording() -> Iterator[EventRecorder]:
    recorder = EventRecorder()
    logger = logging.getLogger("voxcore")
    logger.addHandler(recorder)
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)


@contextmanager
def llm_errors_exit() -> Iterator[list[int]]:
    """Turn a provider error into one JSON ``error`` line and exit code 1 (SPEC-LLM-2 §6.8)."""
    code = [EXIT_OK]
    try:
        yield code
    except LLMError as exc:
        emit(
            log,
            "error",
            logging.ERROR,
            error_type=type(exc).__name__,
            error=str(exc),
            transient=exc.transient,
        )
        sys.stderr.write(f"voxcore: error: {type(exc).__name__}: {exc}\n")
        code[0] = EXIT_FAILED


def runtime_for(args: argparse.Namespace, *, default_level: str = "INFO") -> Any:
    window = args.context_window_tokens
    return open_runtime(
        config=args.config,
        log_level=args.log_level or default_level,
        redis_url=args.redis_url,
        embedded_redis=args.embedded_redis,
        use_llm=True,
        prompts=args.prompts,
        context_window_tokens=window,
        simulator_options=None,
    )


def _fit_window(runtime: Runtime, args: argparse.Namespace) -> None:
    """On the simulator, shrink the context window (unless given) so a short probe shows the dual
    context at work: a warm-up, a ready standby and a handover."""
    if runtime.on_simulator and args.context_window_tokens is None:
        llm = runtime.settings.llm.model_copy(update={"context_window_tokens": SIM_CONTEXT_WINDOW})
        dual = runtime.settings.dual_context.model_copy(update={"recent_messages": SIM_RECENT_MESSAGES})
        runtime.settings = runtime.settings.model_copy(update={"llm": llm, "dual_context": dual})
        runtime.container.settings.override(runtime.settings)


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/mean of a sample (nearest-rank percentiles), rounded to 0.1 ms."""
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5))) - 1]

    return {"p50": round(rank(50), 1), "p95": round(rank(95), 1), "mean": round(statistics.fmean(values), 1)}


def _fmt(value: float | None, unit: str = " ms", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _stats_row(label: str, values: dict[str, float | None]) -> str:
    return f"| {label} | {_fmt(values['p50'])} | {_fmt(values['p95'])} | {_fmt(values['mean'])} |"


def _dual_timings(recorder: EventRecorder) -> dict[str, Any]:
    starts = recorder.named("warmup_start")
    ready = recorder.named("warmup_ready")
    handovers = recorder.named("handover_perform")
    return {
        "warmups_started": len(starts),
        "warmup_start_ratio": round(starts[0]["ratio"], 3) if starts else None,
        "warmup_ready_ms": [round(r["ms"], 1) for r in ready],
        "handovers": len(handovers),
        "handover_ms_since_ready": [round(h["ms_since_ready"], 1) for h in handovers],
        "handover_ms": [round(h["handover_ms"], 3) for h in handovers],
    }


def _stamp() -> datetime:
    return datetime.now(UTC)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    emit(log, "report_saved", path=str(path))
    return path


@dataclass
class TurnRecord:
    """One probed turn (a failed one too: ``error_type`` and ``error`` say why).

    ``time_to_first_text_ms`` is turn start -> first speakable answer character; ``time_to_first_token_ms``
    request sent -> first streamed token (``client_ttft_ms`` repeats it under its former name);
    ``server_deltas`` and ``stream_ms`` (request sent -> end of stream) are the client's.
    """

    step: str
    time_to_first_text_ms: float | None
    time_to_first_token_ms: float | None
    total_ms: float
    chunks: int
    ratio_before: float
    ratio_after: float
    handover_ms: float | None
    reply: str
    server_deltas: int | None = None
    stream_ms: float | None = None
    error_type: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def client_ttft_ms(self) -> float | None:
        """``time_to_first_token_ms`` under the name it had before."""
        return self.time_to_first_token_ms

    @property
    def failed(self) -> bool:
        return self.error_type is not None

    def as_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["client_ttft_ms"] = self.time_to_first_token_ms
        return data


async def run_turn(manager: ConversationManager, text: str, step: str) -> TurnRecord:
    """Stream one turn to the end and collect its numbers; a provider error is recorded, not raised."""
    reply: list[str] = []
    error: LLMError | None = None
    try:
        async for chunk in manager.process_user_turn(text):
            reply.append(chunk.text_chunk)
    except LLMError as exc:
        error = exc
        emit(
            log,
            "probe_turn_failed",
            logging.WARNING,
            step=step,
            error_type=type(exc).__name__,
            error=str(exc),
        )
    metrics = manager.last_turn_metrics
    if metrics is None:  # failed before the turn began (cannot happen once a turn was opened)
        assert error is not None
        raise error
    return TurnRecord(
        step=step,
        time_to_first_text_ms=metrics.time_to_first_text_ms,
        time_to_first_token_ms=metrics.time_to_first_token_ms,
        total_ms=metrics.response_total_ms,
        chunks=metrics.chunks,
        ratio_before=metrics.context_ratio_before,
        ratio_after=metrics.context_ratio_after,
        handover_ms=metrics.handover_ms,
        reply="".join(reply),
        server_deltas=metrics.server_deltas,
        stream_ms=metrics.stream_total_ms,
        error_type=type(error).__name__ if error is not None else None,
        error=str(error) if error is not None else None,
    )


def chunk_rate(turns: Sequence[TurnRecord]) -> float | None:
    """Mean rate of the server's content deltas after the first token, deltas per second."""
    rates = [
        (t.server_deltas - 1) / ((t.stream_ms - t.time_to_first_token_ms) / 1000)
        for t in turns
        if t.server_deltas is not None
        and t.server_deltas > 1
        and t.stream_ms is not None
        and t.time_to_first_token_ms is not None
        and t.stream_ms > t.time_to_first_token_ms
    ]
    return statistics.fmean(rates) if rates else None


def failed_lines(turns: Sequence[TurnRecord]) -> list[str]:
    """The report's list of failed turns (empty when none failed)."""
    failed = [t for t in turns if t.failed]
    if not failed:
        return []
    lines = [
        f"**failed turns: {len(failed)} of {len(turns)}**",
        "",
        "| turn | error type | error |",
        "|---|---|---|",
    ]
    for t in failed:
        message = (t.error or "").replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| {t.step} | {t.error_type} | {message} |")
    return [*lines, ""]


# -- probe-llm ----------------------------------------------------------------------------------


async def probe_llm(args: argparse.Namespace) -> int:
    """SPEC-LLM-2: handshake, N streamed turns, percentiles, chunk rate, context and dual context."""
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    with recording() as recorder, llm_errors_exit() as code:
        async with runtime_for(args) as runtime:
            _fit_window(runtime, args)
            settings = runtime.settings
            model = {"main": settings.llm.models.main, "summary": settings.llm.models.summary}.get(
                args.model, args.model
            )
            if model != settings.llm.models.main:
                models = settings.llm.models.model_copy(update={"main": model})
                runtime.container.settings.override(
                    settings.model_copy(update={"llm": settings.llm.model_copy(update={"models": models})})
                )
            started = time.perf_counter()
            manager = await runtime.container.open_conversation(f"probe-llm-{int(time.time())}")
            turns: list[TurnRecord] = []
            try:
                for i in range(args.repeats):
                    turns.append(await run_turn(manager, args.text, f"repeat {i + 1}"))
            finally:
                await manager.shutdown()
                # Always written, however many turns failed (and whatever ended the loop).
                elapsed = time.perf_counter() - started
                path = _write(
                    args.report_dir / f"llm_probe_{_stamp().strftime('%Y-%m-%dT%H-%M-%S')}.md",
                    _probe_report(runtime, model, args, turns, recorder, elapsed),
                )
            failed = sum(t.failed for t in turns)
            emit(
                log,
                "probe_llm_done",
                report=str(path),
                turns=len(turns),
                failed_turns=failed,
                llm=runtime.llm_target,
            )
            if failed:
                code[0] = EXIT_FAILED
    return code[0]


def _probe_report(
    runtime: Runtime,
    model: str,
    args: argparse.Namespace,
    turns: list[TurnRecord],
    recorder: EventRecorder,
    elapsed_s: float,
) -> str:
    first_text = stats([t.time_to_first_text_ms for t in turns if t.time_to_first_text_ms is not None])
    ttft = stats([t.time_to_first_token_ms for t in turns if t.time_to_first_token_ms is not None])
    total = stats([t.total_ms for t in turns if not t.failed])
    rate = chunk_rate(turns)
    failed = sum(t.failed for t in turns)
    handshake = recorder.named("conn_handshake_finish")
    dual = _dual_timings(recorder)
    provider = (
        "**local simulator** (no OPENAI_API_KEY/OPENAI_BASE_URL configured: these numbers are the "
        "simulator's scripted delays, not a real model)"
        if runtime.on_simulator
        else runtime.llm_target
    )
    lines = [
        f"# LLM probe — {_stamp().strftime('%Y-%m-%d %H:%M:%S UTC')}",
        "",
        f"- provider: {provider}",
        f"- model: `{model}`; turns: {len(turns)} of {args.repeats} ({failed} failed); prompt: «{args.text}»",
        f"- context window: {runtime.settings.llm.context_window_tokens} tokens; "
        f"wall time: {elapsed_s:.2f} s",
        "",
        "| metric | p50 | p95 | mean |",
        "|---|---:|---:|---:|",
        _stats_row("time_to_first_text_ms (turn start -> first speakable character)", first_text),
        _stats_row("time_to_first_token_ms — TTFT (request sent -> first token)", ttft),
        _stats_row("total response (turns that completed)", total),
        "",
        "Figures over the turns that produced them.",
        "",
        f"- handshake: {_fmt(handshake[0]['ms']) if handshake else '-'}",
        f"- chunk rate: {_fmt(rate, ' deltas/s')} (the server's content deltas after the first token)",
        f"- dual context: {dual['warmups_started']} warm-up(s) (first at ratio "
        f"{dual['warmup_start_ratio']}), ready after {dual['warmup_ready_ms']} ms; "
        f"{dual['handovers']} handover(s), {dual['handover_ms_since_ready']} ms after ready, "
        f"taking {dual['handover_ms']} ms",
        "",
        "| # | first text ms | TTFT ms | total ms | deltas | context before | after | handover ms | outcome"
        " |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, t in enumerate(turns, 1):
        lines.append(
            f"| {i} | {_fmt(t.time_to_first_text_ms, '')} | {_fmt(t.time_to_first_token_ms, '')} | "
            f"{t.total_ms:.1f} | {t.server_deltas if t.server_deltas is not None else '-'} | "
            f"{t.ratio_before:.3f} | {t.ratio_after:.3f} | {_fmt(t.handover_ms, '', 3)} | "
            f"{t.error_type or 'ok'} |"
        )
    lines.append("")
    lines += failed_lines(turns)
    verdict = "OK" if ttft["p50"] is not None and ttft["p50"] < TTFT_TARGET_MS else "FAIL"
    lines += [
        f"time_to_first_text_ms p50: {_fmt(first_text['p50'])}",
        f"TTFT p50: {_fmt(ttft['p50'])} (target < {TTFT_TARGET_MS:.0f} ms) — {verdict}",
        "",
    ]
    return "\n".join(lines)


# -- probe-agent --------------------------------------------------------------------------------


async def probe_agent(args: argparse.Namespace) -> int:
    """SPEC-LLM-3: a dialogue with dual context, then the summary cache: a miss, then hits."""
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    with recording() as recorder, llm_errors_exit() as code:
        async with runtime_for(args) as runtime:
            _fit_window(runtime, args)
            if not await runtime.container.cache().ping():
                emit(log, "error", logging.ERROR, error=f"Redis at {runtime.redis_target} does not answer")
                return EXIT_FAILED
            report = await _agent_scenario(runtime, args, recorder)
            stamp = _stamp().strftime("%Y%m%d-%H%M")
            json_path = args.report_dir / f"llm_agent_{stamp}.json"
            md_path = args.report_dir / f"llm_agent_{stamp}.md"
            _write(json_path, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
            _write(md_path, _agent_markdown(report))
            emit(
                log,
                "probe_agent_done",
                report=str(md_path),
                ttft_p50_ms=report["ttft"]["p50"],
                time_to_first_text_p50_ms=report["time_to_first_text"]["p50"],
                failed_turns=report["failed_turns"],
            )
            if report["failed_turns"]:
                code[0] = EXIT_FAILED
    return code[0]


async def _agent_scenario(
    runtime: Runtime, args: argparse.Namespace, recorder: EventRecorder
) -> dict[str, Any]:
    container = runtime.container
    manager = await container.open_conversation(args.session_id)
    turns: list[TurnRecord] = []
    summary_runs: list[dict[str, Any]] = []
    try:
        for i, text in enumerate(AGENT_STEPS, 1):
            turns.append(await run_turn(manager, text, f"step {i}"))
    finally:
        await manager.shutdown()
    # The whole dialogue as the caller heard it (the active context may hold a summary by now).
    history = [
        message
        for text, turn in zip(AGENT_STEPS, turns, strict=True)
        for message in (make_message("user", text), make_message("assistant", turn.reply))
    ]
    # Each run is a new conversation of the same session summarizing the same dialogue: the first
    # asks the summary model and fills the cache, the replays read it.
    for run in range(1, args.repeats + 1):
        replay = await container.open_conversation(args.session_id)
        try:
            label = "run 1" if run == 1 else f"run {run} (replay)"
            summary_runs.append(await _timed_summary(replay, history, label, recorder))
        finally:
            await replay.shutdown()
    ttft = stats([t.time_to_first_token_ms for t in turns if t.time_to_first_token_ms is not None])
    return {
        "generated_at": _stamp().isoformat(),
        "provider": "simulator" if runtime.on_simulator else runtime.llm_target,
        "simulator": runtime.on_simulator,
        "model": runtime.settings.llm.models.main,
        "summary_model": runtime.settings.llm.models.summary,
        "session_key": summary_key(args.session_id),
        "redis": runtime.redis_target,
        "context_window_tokens": runtime.settings.llm.context_window_tokens,
        "handshake_ms": [round(h["ms"], 1) for h in recorder.named("conn_handshake_finish")],
        "turns": [t.as_json() for t in turns],
        "failed_turns": sum(t.failed for t in turns),
        "time_to_first_text": stats(
            [t.time_to_first_text_ms for t in turns if t.time_to_first_text_ms is not None]
        ),
        "ttft": ttft,
        "total": stats([t.total_ms for t in turns if not t.failed]),
        "chunk_rate_deltas_per_s": chunk_rate(turns),
        "context_usage": [{"step": t.step, "before": t.ratio_before, "after": t.ratio_after} for t in turns],
        "dual_context": _dual_timings(recorder),
        "summary_cache": summary_runs,
        "ttft_target_ms": TTFT_TARGET_MS,
        "ttft_ok": ttft["p50"] is not None and ttft["p50"] < TTFT_TARGET_MS,
    }


async def _timed_summary(
    manager: ConversationManager, history: list[ConversationMessage], label: str, recorder: EventRecorder
) -> dict[str, Any]:
    checks_before = len(recorder.named("summary_cache_check"))
    started = time.perf_counter()
    try:
        summary = await manager.summarize(history)
    except LLMError as exc:
        ms = (time.perf_counter() - started) * 1000
        emit(
            log,
            "summary_step",
            logging.WARNING,
            label=label,
            hit=False,
            ms=round(ms, 1),
            error_type=type(exc).__name__,
            error=str(exc),
        )
        return {
            "run": label,
            "hit": False,
            "ms": round(ms, 1),
            "summary": "",
            "error_type": type(exc).__name__,
            "error": str(exc),
        }
    ms = (time.perf_counter() - started) * 1000
    checks = recorder.named("summary_cache_check")[checks_before:]
    hit = bool(checks and checks[-1]["hit"])
    emit(log, "summary_step", label=label, hit=hit, ms=round(ms, 1), chars=len(summary))
    return {"run": label, "hit": hit, "ms": round(ms, 1), "summary": summary}


async def demo_dialogue(runtime: Runtime, *, report_dir: Path) -> int:
    """The dialogue part of ``voxcore demo``: probe-agent's scenario on the given runtime."""
    args = argparse.Namespace(
        session_id="demo-call", repeats=2, report_dir=report_dir, context_window_tokens=None
    )
    with recording() as recorder, llm_errors_exit() as code:
        _fit_window(runtime, args)
        report = await _agent_scenario(runtime, args, recorder)
        stamp = _stamp().strftime("%Y%m%d-%H%M%S")
        _write(
            args.report_dir / f"demo_dialogue_{stamp}.json",
            json.dumps(report, ensure_ascii=False, indent=2) + "\n",
        )
        md = _write(args.report_dir / f"demo_dialogue_{stamp}.md", _agent_markdown(report))
        emit(log, "demo_dialogue_done", report=str(md), ttft_p50_ms=report["ttft"]["p50"])
        failed = [t for t in report["turns"] if t["error_type"]]
        if failed:  # the provider failed a turn: one error line (the report lists every failure)
            emit(
                log,
                "error",
                logging.ERROR,
                error_type=failed[0]["error_type"],
                error=failed[0]["error"],
                failed_turns=len(failed),
                report=str(md),
            )
            code[0] = EXIT_FAILED
    return code[0]


def _agent_markdown(report: dict[str, Any]) -> str:
    ttft, total = report["ttft"], report["total"]
    provider = (
        "**local simulator** (no OPENAI_API_KEY/OPENAI_BASE_URL configured: scripted answers and "
        "delays, not a real model)"
        if report["simulator"]
        else report["provider"]
    )
    dual = report["dual_context"]
    lines = [
        f"# LLM agent e2e — {report['generated_at']}",
        "",
        f"- provider: {provider}; model `{report['model']}`, summaries `{report['summary_model']}`",
        f"- Redis: {report['redis']}; summary key `{report['session_key']}`",
        f"- context window: {report['context_window_tokens']} tokens; handshake: {report['handshake_ms']} ms",
        "",
        "| metric | p50 | p95 | mean |",
        "|---|---:|---:|---:|",
        _stats_row(
            "time_to_first_text_ms (turn start -> first speakable character)", report["time_to_first_text"]
        ),
        _stats_row("time_to_first_token_ms — TTFT (request sent -> first token)", ttft),
        _stats_row("total response (turns that completed)", total),
        "",
        f"- chunk rate: {_fmt(report['chunk_rate_deltas_per_s'], ' deltas/s')} (the server's content deltas)",
        "",
        "| step | first text ms | TTFT ms | total ms | deltas | context before | after | handover ms "
        "| outcome |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in report["turns"]:
        deltas = t["server_deltas"] if t["server_deltas"] is not None else "-"
        lines.append(
            f"| {t['step']} | {_fmt(t['time_to_first_text_ms'], '')} | "
            f"{_fmt(t['time_to_first_token_ms'], '')} | "
            f"{t['total_ms']:.1f} | {deltas} | {t['ratio_before']:.3f} | {t['ratio_after']:.3f} | "
            f"{_fmt(t['handover_ms'], '', 3)} | {t['error_type'] or 'ok'} |"
        )
    failed = [t for t in report["turns"] if t["error_type"]]
    if failed:
        lines += [
            "",
            f"**failed turns: {len(failed)} of {len(report['turns'])}**",
            "",
            "| turn | error type | error |",
            "|---|---|---|",
        ]
        for t in failed:
            message = (t["error"] or "").replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {t['step']} | {t['error_type']} | {message} |")
    lines += [
        "",
        f"Dual context: {dual['warmups_started']} warm-up(s) (first at ratio {dual['warmup_start_ratio']}), "
        f"ready after {dual['warmup_ready_ms']} ms; {dual['handovers']} handover(s) "
        f"{dual['handover_ms_since_ready']} ms after ready, taking {dual['handover_ms']} ms.",
        "",
        "| summary run | cache | ms |",
        "|---|---|---:|",
    ]
    for run in report["summary_cache"]:
        cache = run["error_type"] if run.get("error_type") else ("hit" if run["hit"] else "miss")
        lines.append(f"| {run['run']} | {cache} | {run['ms']:.1f} |")
    verdict = "OK" if report["ttft_ok"] else "FAIL"
    lines += [
        "",
        f"TTFT p50: {_fmt(ttft['p50'])} (target < {TTFT_TARGET_MS:.0f} ms) — {verdict}",
        "",
    ]
    return "\n".join(lines)


# -- sandboxes ------------------------------------------------------------------------------------


async def sandbox_run(args: argparse.Namespace) -> int:
    """Run one building block alone (SPEC-LLM-1 §5); every step prints its JSON events."""
    with llm_errors_exit() as code:
        async with runtime_for(args, default_level="DEBUG") as runtime:
            _fit_window(runtime, args)
            container = runtime.container
            part = args.part
            if part == "connection":
                connection = container.connection_manager()
                await connection.start()
                await connection.shutdown()
            elif part == "client":
                connection = container.connection_manager()
                client = container.llm_client()
                try:
                    http = await connection.get_client()
                    prompt = [make_message("user", "Скажи одно короткое предложение.")]
                    model = runtime.settings.llm.models.main
                    async for chunk in client.stream_structured_generate(
                        http, prompt, model, LLMStructuredResponse
                    ):
                        emit(log, "sandbox_chunk", text=chunk.text_chunk, final=chunk.is_final_chunk)
                finally:
                    await connection.shutdown()
            elif part == "context":
                context: LLMContext = container.llm_context()
                for role, text in (("user", "Здравствуйте!"), ("assistant", "Добрый день! Чем помочь?")):
                    context.add_message(make_message(role, text))
                context.add_message(make_message("user", "Сколько стоит страховка?"))
                emit(log, "sandbox_prompt", messages=context.build_prompt())
                emit(log, "sandbox_ratio", ratio=round(context.estimate_usage_ratio(), 4))
            elif part == "dual":
                await _dual_sandbox(container)
            else:
                manager = await container.open_conversation("sandbox-manager")
                try:
                    turn = await run_turn(manager, "Здравствуйте! Расскажите коротко о себе.", "sandbox")
                    emit(log, "sandbox_turn", **{k: v for k, v in turn.as_json().items() if k != "extra"})
                finally:
                    await manager.shutdown()
    return code[0]


async def _dual_sandbox(container: Any) -> None:
    """Grow the usage ratio until a warm-up, a ready standby and a handover have happened."""

    async def summarize(history: Sequence[ConversationMessage]) -> str:
        return f"Клиент обсуждал {len(history)} реплик(и) о страховке."

    dual: DualContextController = container.dual_context(summarize=summarize)
    for i in range(60):
        dual.begin_turn()
        dual.active_context.add_message(
            make_message("user", f"Вопрос номер {i}: сколько стоит полис на год?")
        )
        dual.after_message()
        dual.active_context.add_message(
            make_message("assistant", f"Ответ {i}: около двенадцати тысяч рублей.")
        )
        dual.after_message()
        await dual.wait_warmup()
        if dual.handovers:
            break
    emit(
        log,
        "sandbox_dual_done",
        handovers=dual.handovers,
        ratio=round(dual.active_context.estimate_usage_ratio(), 4),
    )
    await dual.shutdown()
