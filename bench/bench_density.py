"""Density: how many concurrent simulated calls one worker process carries on one core.

Each call is what a host builds with ``container.open_spoken_conversation(session_id)``: its own warm LLM
connection (handshake + warm-up loop), a ``ConversationManager`` and a ``HybridResponder``. A call takes a
turn, the answer streams from the OpenAI-compatible SIMULATOR at a realistic token rate (first token after
``--first-token-ms``, then 4 characters every 20 ms, ~50 tokens/s) and is spoken sentence by sentence
(TTS through the simulator's ``/v1/audio/speech`` on the first turn, then from the Redis ``tts:*`` cache);
the reply is consumed at real-time pace, one 20 ms chunk every 20 ms, as a telephony leg would send it.
Then the caller "speaks" for ``--think-s`` (uniformly 0.5x..1.5x) and takes the next turn.

Measured, per N, in a fresh worker process pinned to one CPU (the simulator and redis-server run as
separate processes pinned to the other CPU when the machine has two or more):

* CPU per call-second: worker CPU time (user + system) over the measurement window / (N x window);
* RSS per call: (worker RSS with N calls running - RSS before the first call) / N;
* ``time_to_first_audio_ms`` (turn start -> first audio chunk, from ``SpokenConversation``): p50/p99 of
  the turns started in the window, minus the unloaded p50 (N = 1, same run);
* late chunks: a chunk is late when it arrives more than one chunk (20 ms, a one-chunk jitter buffer)
  after its real-time slot (first chunk's arrival + i x 20 ms); the maximum lateness is reported too;
* turns and chunks played in the window, and event-loop lag (a 10 ms ticker's worst overshoot).

``--shared-http`` runs the same load with ``llm.shared_connection: true`` (one pooled HTTP client per
provider for the whole process instead of one per call; see docs/llm.md).

Usage: ``python bench/bench_density.py [--calls 10,100,500,1000] [--window-s 20] [--shared-http both]
[--write docs/benchmarks.md]``. ``--write`` replaces the ``## Density`` section of the file.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADING = "## Density"
_DEVNULL = open(os.devnull, "w")  # noqa: SIM115 - the worker's log sink, open for the process's life
CHUNK_MS = 20
REPLY = "Ваш заказ принят. Доставка будет завтра с десяти до двух. Что-нибудь ещё?"
TARGET_CALLS = 1000
TARGET_P99_OVERHEAD_MS = 10.0
TARGET_RSS_MB = 0.5


# -- the worker (one process per N) ------------------------------------------------------------------


@dataclass
class CallStats:
    ttfa_ms: list[float] = field(default_factory=list)
    chunks: int = 0
    late: int = 0
    max_late_ms: float = 0.0
    turns: int = 0
    failed: int = 0


class _WarningCounter(logging.Handler):
    """Counts the worker's WARNING+ events by name (soft failures: pool exhausted, TTS fallbacks...)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.getMessage()] += 1


@dataclass
class Schedule:
    """When the measurement window opens and closes and when the calls stop (set once all are open)."""

    start: float = math.inf
    end: float = math.inf
    stop: float = math.inf

    def counts(self, t: float) -> bool:
        return self.start <= t < self.end


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def _runqueue_wait_s() -> float:
    """Seconds this thread spent runnable but waiting for a CPU (other processes on its core)."""
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime  # the whole process (threads included)


async def _call(
    container: Any,
    index: int,
    stats: CallStats,
    schedule: Schedule,
    think_s: float,
    ready: asyncio.Event,
    opened: list[int],
    opening: asyncio.Semaphore,
) -> None:
    rng = random.Random(index)
    async with opening:  # calls arrive over time, not all in the same millisecond
        call = await container.open_spoken_conversation(f"density-{index}")
    opened[0] += 1
    try:
        await ready.wait()
        await asyncio.sleep(rng.uniform(0, think_s))  # calls do not all speak at once
        loop = asyncio.get_running_loop()
        while loop.time() < schedule.stop:
            started = loop.time()
            counted = schedule.counts(started)
            slot0: float | None = None
            i = 0
            try:
                async with contextlib.aclosing(call.respond("Когда будет доставка моего заказа?")) as audio:
                    async for _chunk in audio:
                        now = loop.time()
                        if slot0 is None:
                            slot0 = now
                        else:
                            lateness = now - (slot0 + i * CHUNK_MS / 1000)
                            if counted:
                                stats.chunks += 1
                                if lateness > CHUNK_MS / 1000:
                                    stats.late += 1
                                stats.max_late_ms = max(stats.max_late_ms, lateness * 1000)
                        i += 1
                        # real-time pace: the next chunk is wanted in its own 20 ms slot
                        delay = slot0 + i * CHUNK_MS / 1000 - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
            except Exception:
                stats.failed += 1
            metrics = call.last_turn_metrics
            if counted and metrics is not None and metrics.time_to_first_audio_ms is not None:
                stats.ttfa_ms.append(metrics.time_to_first_audio_ms)
                stats.turns += 1
            await asyncio.sleep(rng.uniform(0.5 * think_s, 1.5 * think_s))
    finally:
        await call.shutdown()


async def _lag_probe(schedule: Schedule, worst: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < schedule.stop:
        before = loop.time()
        await asyncio.sleep(0.01)
        if schedule.counts(before):
            worst[0] = max(worst[0], (loop.time() - before - 0.01) * 1000)


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    from voxcore.entrypoints.container import Container
    from voxcore.entrypoints.logging import configure_logging
    from voxcore.entrypoints.settings import load_settings

    configure_logging("INFO", stream=_DEVNULL)  # production logging, written nowhere
    warnings = _WarningCounter()
    logging.getLogger("voxcore").addHandler(warnings)
    env = {
        "REDIS_URL": args.redis_url,
        "OPENAI_BASE_URL": args.base_url,
        "OPENAI_API_KEY": "sk-bench",
        "VOXCORE_LOGGING__CONFIGURE": "false",
        "VOXCORE_VOICE__DEFAULT_AGENT__ENGINE": "openai",
        "VOXCORE_VOICE__DEFAULT_AGENT__VOICE": "alloy",
        # A pool wait past pool_timeout is a soft miss, and a missed tts:* lookup is re-synthesized: an
        # overloaded worker would amplify its own load. Room for 1 000 calls' reads:
        "VOXCORE_REDIS__MAX_CONNECTIONS": "256",
        "VOXCORE_REDIS__POOL_TIMEOUT": "3",
        "VOXCORE_LLM__SHARED_CONNECTION": "true" if args.shared else "false",
        # Each call has its own responder, and a responder speculates on its first synthesized item: with
        # hundreds of calls opening at once that is hundreds of TTS requests cancelled a moment later
        # (a herd that starves the worker), so density runs without the speculation.
        "VOXCORE_VOICE__HYBRID__SPECULATIVE_FIRST_TTS": "false",
    }
    container = Container(settings=load_settings(env=env))
    await container.init_resources()
    n = args.child
    stats = [CallStats() for _ in range(n)]
    loop = asyncio.get_running_loop()
    rss_before = _rss_mb()
    ready = asyncio.Event()
    opened = [0]
    opening = asyncio.Semaphore(50)
    # the window opens once every call is open and has had time for its first turn (TTS cache filled)
    schedule = Schedule()
    tasks = []
    try:
        open_started = loop.time()
        for i in range(n):
            tasks.append(
                asyncio.create_task(
                    _call(container, i, stats[i], schedule, args.think_s, ready, opened, opening),
                    name=f"call-{i}",
                )
            )
            if i % 50 == 49:
                await asyncio.sleep(0)  # let handshakes progress while calls are created
        while opened[0] < n:
            if any(t.done() for t in tasks):
                for t in tasks:
                    if t.done() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            await asyncio.sleep(0.05)
        open_s = loop.time() - open_started
        warm = args.think_s * 1.5 + 6.0  # every call's first turn has ended by then
        now = loop.time()
        schedule.start, schedule.end = now + warm, now + warm + args.window_s
        schedule.stop = schedule.end + 0.5
        ready.set()
        worst_lag = [0.0]
        lag = asyncio.create_task(_lag_probe(schedule, worst_lag))
        await asyncio.sleep(max(0.0, schedule.start - loop.time()))
        cpu0, wait0, rss_loaded = _cpu_s(), _runqueue_wait_s(), _rss_mb()
        await asyncio.sleep(max(0.0, schedule.end - loop.time()))
        cpu1, wait1 = _cpu_s(), _runqueue_wait_s()
        rss_loaded = max(rss_loaded, _rss_mb())
        await lag
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        breakdown = await _breakdown(container) if n == 1 else {}
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        shutdown = container.shutdown_resources()
        if shutdown is not None:
            await shutdown
    ttfa = [v for s in stats for v in s.ttfa_ms]
    return {
        "calls": n,
        "shared": args.shared,
        "open_s": round(open_s, 2),
        "window_s": args.window_s,
        "cpu_s": round(cpu1 - cpu0, 3),
        "cpu_per_call_s": (cpu1 - cpu0) / (n * args.window_s),
        "cpu_share": (cpu1 - cpu0) / args.window_s,
        "runqueue_wait_share": (wait1 - wait0) / args.window_s,
        "rss_before_mb": round(rss_before, 1),
        "rss_loaded_mb": round(rss_loaded, 1),
        "rss_per_call_mb": (rss_loaded - rss_before) / n,
        "turns": sum(s.turns for s in stats),
        "failed": sum(s.failed for s in stats),
        "chunks": sum(s.chunks for s in stats),
        "late": sum(s.late for s in stats),
        "max_late_ms": round(max(s.max_late_ms for s in stats), 1),
        "ttfa_p50": statistics.median(ttfa) if ttfa else math.nan,
        "ttfa_p99": _pct(ttfa, 99),
        "loop_lag_max_ms": round(worst_lag[0], 1),
        "warnings": dict(warnings.counts.most_common(6)),
        **breakdown,
    }


async def _breakdown(container: Any) -> dict[str, float]:
    """What a wake-up costs this process: from idle (the loop sleeps in epoll; the kernel/hypervisor
    wake it) and for one task of a busy loop (1 000 tasks sharing the wake-ups)."""
    del container  # the probe needs only the running loop
    cpu0 = _cpu_s()
    for _ in range(100):
        await asyncio.sleep(CHUNK_MS / 1000)
    idle_us = (_cpu_s() - cpu0) / 100 * 1e6

    async def sleeper() -> None:
        for _ in range(25):
            await asyncio.sleep(CHUNK_MS / 1000)

    cpu0 = _cpu_s()
    await asyncio.gather(*(sleeper() for _ in range(1000)))
    busy_us = (_cpu_s() - cpu0) / 25_000 * 1e6
    return {"idle_wake_us": idle_us, "busy_wake_us": busy_us}


def _pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


# -- the orchestrator ----------------------------------------------------------------------------------


@contextlib.contextmanager
def simulator_process(first_token_ms: float, cpus: set[int] | None) -> Iterator[tuple[str, int]]:
    """``python -m voxcore.simulator`` streaming ~50 tokens/s after ``first_token_ms``; yields its URL."""
    command = [
        sys.executable,
        "-m",
        "voxcore.simulator",
        "--port",
        "0",
        "--no-auth",
        "--first-token-ms",
        str(first_token_ms),
        "--inter-chunk-ms",
        str(CHUNK_MS),
        "--chars-per-chunk",
        "4",
        "--reply",
        REPLY,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        if cpus:
            os.sched_setaffinity(proc.pid, cpus)
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        if started.get("event") != "simulator_started":
            raise RuntimeError(f"simulator did not start: {started}")
        yield str(started["base_url"]), proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_child(
    n: int,
    args: argparse.Namespace,
    redis_url: str,
    base_url: str,
    sim_pid: int,
    shared: bool,
    think_s: float,
    window_s: float | None = None,
) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        str(n),
        "--redis-url",
        redis_url,
        "--base-url",
        base_url,
        "--window-s",
        str(window_s or args.window_s),
        "--think-s",
        str(think_s),
    ]
    if shared:
        command.append("--shared")
    if args.worker_cpu is not None:
        command += ["--pin", str(args.worker_cpu)]
    budget = 120 + args.window_s + n * 0.2
    sim_cpu0, started = _process_cpu_s(sim_pid), time.monotonic()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        # a starved worker that cannot even wind down in time: a row saying so, not a lost run
        return {"calls": n, "shared": shared, "timed_out_s": budget}
    if out.returncode != 0:
        raise RuntimeError(f"worker for N={n} failed:\n{out.stderr[-3000:]}")
    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    # the simulator's average CPU over the worker's whole run: near 100%, the simulator is the bottleneck
    result["simulator_cpu_share"] = (_process_cpu_s(sim_pid) - sim_cpu0) / (time.monotonic() - started)
    return result


def _process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return f"{cpu}, {os.cpu_count()} CPUs, load average {load[0]:.1f} at start"


def _ms(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def render(
    results: list[dict[str, Any]], unloaded: dict[str, dict[str, Any]], args: argparse.Namespace
) -> str:
    lines = [
        HEADING,
        "",
        *_context_lines(),
        f"- host: {machine()}",
        f"- load: each call turns every {args.think_s:g} s (0.5x..1.5x) after its reply; first token after "
        f"{args.first_token_ms:g} ms, then 4 characters every 20 ms; a {len(REPLY)}-character reply "
        "(3 sentences, ~4.4 s of speech) spoken from the tts:* cache and consumed at real-time pace",
        f"- worker pinned to CPU {args.worker_cpu}; simulator and redis-server on the other CPUs; calls "
        f"opened 50 at a time; window {args.window_s:g} s per N after every call's first turn; "
        "`voice.hybrid.speculative_first_tts: false` (with it, every new call's first turn sends a TTS "
        "request that the cache hit cancels: hundreds at once starve the worker)",
        "- CPU busy: worker CPU time / window (100% = one core); waited: time the worker was runnable but "
        "another process held its CPU (/proc schedstat), the machine's contention",
        "- late: a chunk more than 20 ms after its real-time slot; first-audio overhead: p50/p99 of the "
        "loaded run minus the unloaded p50 (N = 1) of the same mode; calls/core = 1 / CPU per call-second",
        "",
        "| mode | N | CPU per call-second | calls/core | CPU busy / waited | simulator CPU | RSS per call "
        "| TTFA p50 / p99 "
        "| overhead p50 / p99 | late chunks / played | max late | loop lag max | turns (failed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for r in results:
        mode = "shared HTTP" if r["shared"] else "per-call HTTP"
        base = unloaded[mode]["ttfa_p50"]
        if "timed_out_s" in r:
            lines.append(
                f"| {mode} | {r['calls']} | worker did not finish within {r['timed_out_s']:.0f} s "
                "(starved) |" + " |" * 11
            )
            continue
        lines.append(
            f"| {mode} | {r['calls']} | {r['cpu_per_call_s'] * 1000:.2f} ms "
            f"| {1 / r['cpu_per_call_s']:.0f} "
            f"| {r['cpu_share'] * 100:.0f}% / {r['runqueue_wait_share'] * 100:.0f}% "
            f"| {r['simulator_cpu_share'] * 100:.0f}% "
            f"| {r['rss_per_call_mb'] * 1000:.0f} KB "
            f"| {_ms(r['ttfa_p50'])} / {_ms(r['ttfa_p99'])} ms "
            f"| {_ms(r['ttfa_p50'] - base, True)} / {_ms(r['ttfa_p99'] - base, True)} ms "
            f"| {r['late']} / {r['chunks']} | {r['max_late_ms']:.1f} ms | {r['loop_lag_max_ms']:.1f} ms "
            f"| {r['turns']} ({r['failed']}) |"
        )
        if r.get("warnings"):
            shown = ", ".join(f"{name} x{count}" for name, count in r["warnings"].items())
            notes.append(f"- {mode}, N = {r['calls']}: warnings {shown}")
    lines.append("")
    lines += notes
    for mode, u in unloaded.items():
        lines.append(f"- unloaded ({mode}, N = 1): TTFA p50 {u['ttfa_p50']:.1f} ms over {u['turns']} turns")
        if "idle_wake_us" in u:
            lines.append(
                f"- wake-up cost on this host: {u['idle_wake_us']:.0f} us of CPU per wake-up of an idle "
                f"process (a 20 ms sleep), {u['busy_wake_us']:.1f} us per task wake-up when 1 000 tasks "
                "share a busy loop: at small N most of the CPU per call-second is wake-ups, which larger N "
                "amortizes"
            )
    lines.append(
        f"- targets: {TARGET_CALLS} calls in one worker on one core with 0 late chunks, p99 first-audio "
        f"overhead <= {TARGET_P99_OVERHEAD_MS:g} ms, <= {TARGET_RSS_MB:g} MB RSS per call"
    )
    for r in results:
        if r["calls"] == TARGET_CALLS and "timed_out_s" not in r:
            mode = "shared HTTP" if r["shared"] else "per-call HTTP"
            over = r["ttfa_p99"] - unloaded[mode]["ttfa_p50"]
            played_ok = r["late"] == 0 and r["chunks"] > 0
            verdict = [
                f"late chunks {r['late']} of {r['chunks']} ({'OK' if played_ok else 'FAIL'})",
                f"p99 overhead {_ms(over)} ms ({'OK' if over <= TARGET_P99_OVERHEAD_MS else 'FAIL'})",
                f"RSS {r['rss_per_call_mb'] * 1000:.0f} KB per call "
                f"({'OK' if r['rss_per_call_mb'] <= TARGET_RSS_MB else 'FAIL'})",
            ]
            lines.append(f"- {mode}, N = {TARGET_CALLS}: " + "; ".join(verdict))
    lines += [
        "",
        "Reading the table: *CPU busy* near 100% means the worker needs more than its core and latency "
        "grows with N; a large *waited* share means other processes held the worker's core (the machine "
        "was not quiet), which inflates loop lag, late chunks and TTFA without the worker being short of "
        "CPU itself. *simulator CPU* near 100% means the LLM/TTS simulator (one Python process on the "
        "other CPU) could not stream any faster, so TTFA grows without the worker being at fault. "
        "*calls/core* is what one uncontended core would carry at that N's CPU per "
        "call-second; since wake-ups are shared by more calls as N grows, the figure at the largest N "
        "that still kept up is the realistic one. Rows with no turns had every call stuck behind the "
        "backlog of the first turns (CPU starvation), so their CPU per call-second is not a steady "
        "state.",
        "",
    ]
    return "\n".join(lines)


def _context_lines() -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchdoc import run_context

    return run_context()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", default="10,100,500,1000", help="comma-separated N values")
    parser.add_argument("--window-s", type=float, default=20.0, help="measurement window per N")
    parser.add_argument(
        "--think-s", type=float, default=3.0, help="mean pause between a reply and the next turn"
    )
    parser.add_argument(
        "--first-token-ms", type=float, default=200.0, help="simulated LLM time to first token"
    )
    parser.add_argument("--shared-http", choices=["off", "on", "both"], default="off")
    parser.add_argument("--worker-cpu", type=int, default=0, help="CPU the worker is pinned to (-1: none)")
    parser.add_argument("--write", type=Path, default=None, help="update docs/benchmarks.md")
    # internal: one worker process
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shared", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pin", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        if args.pin is not None and args.pin >= 0:
            os.sched_setaffinity(0, {args.pin})
        print(json.dumps(asyncio.run(worker(args))), flush=True)
        return 0

    from voxcore.entrypoints.embedded_redis import EmbeddedRedis

    if args.worker_cpu is not None and args.worker_cpu < 0:
        args.worker_cpu = None
    cpus = os.sched_getaffinity(0)
    others = (cpus - {args.worker_cpu}) or None if args.worker_cpu is not None else None
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.shared_http]
    results: list[dict[str, Any]] = []
    unloaded: dict[str, dict[str, Any]] = {}
    with (
        EmbeddedRedis() as redis_server,
        simulator_process(args.first_token_ms, others) as (base_url, sim_pid),
    ):
        if others:
            import redis as redis_sync

            with redis_sync.Redis.from_url(redis_server.url) as client:
                os.sched_setaffinity(int(client.info("server")["process_id"]), others)
        for shared in modes:
            mode = "shared HTTP" if shared else "per-call HTTP"
            u = run_child(1, args, redis_server.url, base_url, sim_pid, shared, think_s=0.5, window_s=30.0)
            unloaded[mode] = u
            print(json.dumps({"unloaded": mode, **u}), flush=True)
            for n in [int(v) for v in args.calls.split(",") if v.strip()]:
                r = run_child(n, args, redis_server.url, base_url, sim_pid, shared, think_s=args.think_s)
                results.append(r)
                print(json.dumps(r), flush=True)
    section = render(results, unloaded, args)
    print(section)
    if args.write is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from benchdoc import merge_section

        existing = args.write.read_text(encoding="utf-8") if args.write.exists() else ""
        args.write.write_text(merge_section(existing, section, HEADING), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
