"""Fault campaign: what a caller sees, how long it waits and what is lost, for each fault of issue 9.

Real tools only: a private ``redis-server`` (with ``DEBUG SLEEP`` for late replies), the
:class:`~voxcore.testing.faults.FaultProxy` in front of it (half-open Redis), real files, and
random-point cancellations. Each figure is compared with a raw baseline in the same run (redis-py
configured as voxcore used to configure it) where one exists.

Figures (targets from the issue):

* cache call on a half-open Redis: worst case <= 250 ms (warm and new connection), then <= 1 ms
  per call while the breaker is open; recovery <= 1 s after Redis answers again;
* late replies: 0 double-applied commands in 100 trials (limiter script and MULTI/EXEC write);
* cancellation: 0 swallowed in 1 000 random-point trials (on this Python, and on the one given
  with ``--also-python``, e.g. ``.venv313/bin/python``);
* outage logs: a handful of lines for 20 callers during a 5 s outage, every failure counted;
* hostile files: a FIFO refused at once; an implausible header refused with no allocation; memory
  near the stored size for the longest accepted file;
* an LLM stream that stalls after three chunks ends at ``llm.timeouts.turn_s`` (baseline: the read
  timeout, 30 s, that bounded it before).

Usage: ``python bench/bench_faults.py [--write docs/benchmarks.md] [--reliability docs/reliability.md]
[--also-python .venv313/bin/python]``. ``--only cancel --json`` prints the cancellation figures as JSON
(what ``--also-python`` runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from benchdoc import merge_section, run_context
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.adapters.redis.rate_limit import _GCRA_LUA, RedisRateLimiter
from voxcore.core.domain.audio import MAX_CHUNKS
from voxcore.core.ports.errors import LLMError
from voxcore.entrypoints.container import Container
from voxcore.entrypoints.embedded_redis import EmbeddedRedis
from voxcore.entrypoints.settings import load_settings
from voxcore.testing.faults import FaultProxy, HostileSSEServer, SSEScript, cancel_at_random_point

HEADING = "## Faults"
#: How late a late reply is: past the 100 ms deadline / socket timeout of the trial, but short enough
#: for the old configuration's retry to get a new connection through and resend.
LATE_S = 0.16
RELIABILITY_HEADING = "## Measured fault table"


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: float | None
    baseline: float | None = None  # the same fault with redis-py as voxcore used to configure it

    @property
    def ok(self) -> bool:
        return self.target is None or self.value <= self.target


def old_client(url: str, *, socket_timeout: float = 1.0) -> aioredis.Redis:
    """redis-py as voxcore configured it before issue 9 (command retry on timeouts included)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=0.5,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.005), 1),
    )


async def wait_for_true(check: Callable[[], Awaitable[bool]], step_s: float, limit_s: float = 30.0) -> None:
    """Poll ``check`` every ``step_s`` until it is true (or ``limit_s`` passed)."""
    for _ in range(max(1, int(limit_s / step_s))):
        if await check():
            return
        await asyncio.sleep(step_s)


async def timed(call: Callable[[], Awaitable[object]]) -> tuple[float, object]:
    started = time.perf_counter()
    try:
        result: object = await call()
    except Exception as exc:  # the baseline raises; ours never does
        result = exc
    return (time.perf_counter() - started) * 1000, result


# -- half-open Redis ---------------------------------------------------------------------------------------


async def half_open(server: EmbeddedRedis, trials: int) -> list[Figure]:
    warm_ms, new_ms, open_ms, recovery_ms, baseline_warm, baseline_new = [], [], [], [], [], []
    async with FaultProxy("127.0.0.1", server.port) as proxy:
        url = proxy.url(server.password)
        cache = RedisCacheManager(RedisConfig(url=url))
        await cache.connect()
        await cache.set_audio_chunks("static:a", [b"x" * 640] * 10)
        for trial in range(trials):
            proxy.mode = "pass"
            await wait_for_true(lambda: _hit(cache), 0.01)
            proxy.mode = "stall"
            ms, _ = await timed(lambda: cache.get_audio_chunks("static:a"))
            warm_ms.append(ms)
            for _ in range(200):
                ms, _ = await timed(lambda: cache.get_audio_chunks("static:a"))
                open_ms.append(ms)
            await asyncio.sleep(0.4 + 0.3 * (trial % 3))  # outages of different lengths
            proxy.mode = "pass"
            returned = time.perf_counter()
            await wait_for_true(lambda: _hit(cache), 0.001)
            recovery_ms.append((time.perf_counter() - returned) * 1000)
        await cache.close()
        for _ in range(trials):  # a new connection: the handshake itself is never answered
            proxy.mode = "stall"
            fresh = RedisCacheManager(RedisConfig(url=url))
            fresh._redis = fresh.config.build()  # connect() would already spend the deadline on PING
            ms, _ = await timed(lambda fresh=fresh: fresh.get_audio_chunks("static:a"))
            new_ms.append(ms)
            await fresh.close()
        for _ in range(min(trials, 3)):  # the old configuration, for comparison
            proxy.mode = "pass"
            old = old_client(url)
            await old.lrange("static:a", 0, -1)
            proxy.mode = "stall"
            ms, _ = await timed(lambda old=old: old.lrange("static:a", 0, -1))
            baseline_warm.append(ms)
            await old.aclose()
            old = old_client(url)
            ms, _ = await timed(lambda old=old: old.lrange("static:a", 0, -1))
            baseline_new.append(ms)
            await old.aclose()
        proxy.mode = "pass"
    return [
        Figure("half-open Redis, warm connection: worst call", max(warm_ms), "ms", 250, max(baseline_warm)),
        Figure("half-open Redis, new connection: worst call", max(new_ms), "ms", 250, max(baseline_new)),
        Figure("breaker open: call p50", statistics.median(open_ms), "ms", None),
        Figure("breaker open: worst call", max(open_ms), "ms", 1.0),
        Figure("recovery after Redis answers again: worst", max(recovery_ms), "ms", 1000),
    ]


async def _hit(cache: RedisCacheManager) -> bool:
    return await cache.get_audio_chunks("static:a") is not None


async def _both_up(limiter: RedisRateLimiter, cache: RedisCacheManager) -> bool:
    return (await limiter.acquire("probe")).decided_by == "redis" and await cache.ping()


# -- late replies ------------------------------------------------------------------------------------------


async def debug_sleep(url: str, seconds: float) -> asyncio.Task[None]:
    client = aioredis.Redis.from_url(url)
    await client.ping()

    async def sleep() -> None:
        try:
            await client.execute_command("DEBUG", "SLEEP", seconds)  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()

    task = asyncio.ensure_future(sleep())
    await asyncio.sleep(0.03)
    return task


async def late_replies(server: EmbeddedRedis, trials: int) -> list[Figure]:
    url = server.url
    raw = aioredis.Redis.from_url(url)
    limiter_client = RedisConfig(url=url).build()
    limiter = RedisRateLimiter(limiter_client, limit=10, period_s=60, op_timeout_s=0.1)
    cache = RedisCacheManager(RedisConfig(url=url), bulk_timeout_ms=100)
    await cache.connect()
    old = old_client(url, socket_timeout=0.1)
    sha = await raw.script_load(_GCRA_LUA)
    doubles = {"limiter": 0, "write": 0, "old": 0}
    unknown = 0
    try:
        await limiter.acquire("warm")
        await cache.set_audio_chunks("static:w", [b"w"])
        await old.evalsha(sha, 1, "old:warm", 6_000_000, 60_000_000, 1)
        for i in range(trials):
            # each trial starts with both breakers closed (the previous deadline opened them)
            await wait_for_true(lambda: _both_up(limiter, cache), 0.05)
            sleeper = await debug_sleep(url, LATE_S)
            decision = await limiter.acquire(f"s{i}")
            unknown += not decision.outcome_known
            await sleeper
            doubles["limiter"] += await raw.pttl(f"ratelimit:s{i}") > 6_500  # 2 units: ~12 s
            await raw.config_resetstat()
            sleeper = await debug_sleep(url, LATE_S)
            await cache.set_audio_chunks("static:w", [b"v", bytes([i % 256])])
            await sleeper
            stats = await raw.info("commandstats")
            doubles["write"] += stats.get("cmdstat_rpush", {}).get("calls", 0) > 1
        for i in range(max(10, trials // 10)):  # the old configuration resends on a timeout
            sleeper = await debug_sleep(url, LATE_S)
            try:
                await old.evalsha(sha, 1, f"old:{i}", 6_000_000, 60_000_000, 1)
            except Exception:  # noqa: S110 - the baseline may give up after its retry
                pass
            await sleeper
            doubles["old"] += await raw.pttl(f"old:{i}") > 6_500
    finally:
        await limiter.aclose()
        await limiter_client.aclose()
        await cache.close()
        await old.aclose()
        await raw.aclose()
    old_trials = max(10, trials // 10)
    return [
        Figure(
            f"late replies: limiter double-charged (of {trials})",
            doubles["limiter"],
            "",
            0,
            round(doubles["old"] * trials / old_trials),
        ),
        Figure(f"late replies: MULTI/EXEC write applied twice (of {trials})", doubles["write"], "", 0),
        Figure(f"late replies: limiter said outcome unknown (of {trials})", unknown, "", None),
    ]


# -- cancellation ------------------------------------------------------------------------------------------


async def cancellations(url: str, landed_target: int) -> dict[str, Any]:
    cache = RedisCacheManager(RedisConfig(url=url))
    await cache.connect()
    await cache.set_audio_chunks("static:c", [b"x" * 640] * 40)
    await cache.set_text("summary:session:c", "text", 600)
    client = RedisConfig(url=url).build()
    limiter = RedisRateLimiter(client, limit=10**6, period_s=1)
    raw = aioredis.Redis.from_url(url)

    async def stream() -> None:
        s = await cache.open_audio_stream("static:c")
        if s is not None:
            async with s:
                async for _ in s:
                    pass

    ours: list[Callable[[], Awaitable[object]]] = [
        lambda: cache.get_audio_chunks("static:c"),
        lambda: cache.get_text("summary:session:c"),
        lambda: cache.set_text("summary:session:c", "t", 600),
        stream,
        lambda: limiter.acquire("s"),
    ]
    results: dict[str, Any] = {"python": platform.python_version()}
    rng = random.Random(2026)
    for name, calls in (("voxcore", ours), ("raw redis-py", [lambda: raw.lrange("static:c", 0, -1)])):
        counts: dict[str, int] = {}
        i = 0
        while counts.get("cancelled", 0) + counts.get("swallowed", 0) < landed_target:
            outcome = await cancel_at_random_point(calls[i % len(calls)], rng)
            counts[outcome] = counts.get(outcome, 0) + 1
            i += 1
        results[name] = counts
    await limiter.aclose()
    await client.aclose()
    await raw.aclose()
    await cache.close()
    return results


def cancellation_figures(results: list[dict[str, Any]]) -> list[Figure]:
    figures = []
    for r in results:
        ours, raw = r["voxcore"], r["raw redis-py"]
        landed = ours.get("cancelled", 0) + ours.get("swallowed", 0)
        figures.append(
            Figure(
                f"cancellations swallowed, Python {r['python']} (of {landed} landed)",
                ours.get("swallowed", 0) + ours.get("error", 0),
                "",
                0,
                raw.get("swallowed", 0),
            )
        )
    return figures


# -- outage logs -------------------------------------------------------------------------------------------


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1


async def outage_logs(outage_s: float) -> list[Figure]:
    server = EmbeddedRedis().start()
    counter = _Count()
    logger = logging.getLogger("voxcore")
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)
    try:
        cache = RedisCacheManager(RedisConfig(url=server.url))
        await cache.connect()
        await asyncio.to_thread(server.stop)
        loop = asyncio.get_running_loop()
        until = loop.time() + outage_s

        async def caller() -> int:
            calls = 0
            while loop.time() < until:
                await cache.get_audio_chunks("static:x")
                calls += 1
                await asyncio.sleep(0.0005)
            return calls

        calls = sum(await asyncio.gather(*(caller() for _ in range(20))))
        failed = sum(cache.failed_operations.values())
        await asyncio.to_thread(server.start)
        returned = time.perf_counter()
        await wait_for_true(cache.ping, 0.001)
        recovery_ms = (time.perf_counter() - returned) * 1000
        await cache.close()
    finally:
        logger.removeHandler(counter)
        server.close()
    return [
        Figure(
            f"outage {outage_s:g} s, 20 callers: log lines (calls: {calls}, counted: {failed})",
            counter.lines,
            "",
            40,
        ),
        Figure("recovery after a Redis restart", recovery_ms, "ms", 1000),
    ]


# -- hostile files -----------------------------------------------------------------------------------------


def _wav(path: Path, rate: int, frames: int) -> Path:
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    pcm = b"\x01\x02" * frames
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


async def hostile_files() -> list[Figure]:
    server = EmbeddedRedis().start()
    cache = RedisCacheManager(RedisConfig(url=server.url))
    await cache.connect()
    try:
        with tempfile.TemporaryDirectory() as folder:
            fifo = Path(folder) / "f.wav"
            os.mkfifo(fifo)
            fifo_ms, _ = await timed(lambda: cache.load_audio_file("static:f", str(fifo)))
            slow = _wav(Path(folder) / "1hz.wav", 1, 2_500_000)  # 5 MB at 1 Hz
            tracemalloc.start()
            await cache.load_audio_file("static:s", str(slow))
            _, one_hz_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            long = _wav(Path(folder) / "long.wav", 8_000, 8_000 * 420)  # > MAX_CHUNKS chunks
            tracemalloc.start()
            result = await cache.load_audio_file("static:l", str(long))
            _, long_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            stored = MAX_CHUNKS * 320 if result.ok else 1
    finally:
        await cache.close()
        server.close()
    return [
        Figure("FIFO as a WAV path: refused after", fifo_ms, "ms", None),
        Figure("5 MB WAV at 1 Hz: memory allocated", one_hz_peak / 1e6, "MB", 1.0, 243.0),
        Figure("longest accepted WAV: peak memory / stored bytes", long_peak / stored, "x", 5.0),
    ]


# -- LLM stream stalled after three chunks --------------------------------------------------------------


async def stalled_turn(turn_s: float) -> list[Figure]:
    script = SSEScript(
        steps=[
            ("chunk", '{"is_safe": true, "aggression_score": 0, "answer": "Раз'),
            ("chunk", " два"),
            ("chunk", " три"),
        ],
        end="stall",
    )
    redis_server = EmbeddedRedis().start()
    try:
        async with HostileSSEServer(script=script) as server:
            settings = load_settings(
                env={
                    "OPENAI_BASE_URL": server.base_url,
                    "OPENAI_API_KEY": "sk-bench",
                    "REDIS_URL": redis_server.url,
                    "VOXCORE_LOGGING__CONFIGURE": "false",
                    "VOXCORE_LLM__TIMEOUTS__TURN_S": str(turn_s),
                }
            )
            container = Container(settings=settings)
            await container.init_resources()
            try:
                manager = await container.open_conversation("bench-stall")
                started = time.perf_counter()
                try:
                    async for _ in manager.process_user_turn("Считайте"):
                        pass
                except LLMError:
                    pass
                elapsed_s = time.perf_counter() - started
                await manager.shutdown()
            finally:
                await container.shutdown_resources()
    finally:
        redis_server.close()
    read_s = settings.llm.timeouts.read_s
    return [
        Figure(
            f"LLM stream stalled after 3 chunks: turn ends (turn_s={turn_s:g})",
            elapsed_s,
            "s",
            turn_s + 0.5,
            read_s,
        )
    ]


# -- report ------------------------------------------------------------------------------------------------


def render(figures: list[Figure]) -> str:
    lines = [
        HEADING,
        "",
        *run_context(),
        "- tools: private redis-server (DEBUG SLEEP), voxcore.testing.faults.FaultProxy, real files;",
        "  baseline = redis-py as voxcore configured it before (socket timeout 1 s, one command retry)",
        "",
        "| fault | measured | baseline | target | ok |",
        "|---|---:|---:|---:|:-:|",
    ]
    for f in figures:
        shown = f"{f.value:.3g}" if isinstance(f.value, float) else f"{f.value}"
        value = f"{shown} {f.unit}".strip()
        baseline = "-" if f.baseline is None else f"{f.baseline:.4g} {f.unit}".strip()
        target = "-" if f.target is None else f"<= {f.target:g} {f.unit}".strip()
        verdict = "-" if f.target is None else ("yes" if f.ok else "NO")
        lines.append(f"| {f.name} | {value} | {baseline} | {target} | {verdict} |")
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> list[Figure]:
    debug = EmbeddedRedis(extra_args=("--enable-debug-command", "yes")).start()
    try:
        figures = await half_open(debug, args.trials_half_open)
        figures += await late_replies(debug, args.trials_late)
        cancel = [await cancellations(debug.url, args.trials_cancel)]
    finally:
        debug.close()
    figures += cancellation_figures([*cancel, *args.other_pythons])
    figures += await outage_logs(args.outage_s)
    figures += await hostile_files()
    figures += await stalled_turn(args.turn_s)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="put the section into this markdown file")
    parser.add_argument("--reliability", type=Path, help="also put the table into docs/reliability.md")
    parser.add_argument("--also-python", help="run the cancellation trials under this interpreter too")
    parser.add_argument("--only", choices=["cancel"], help="run one part (with --json: print JSON)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trials-half-open", type=int, default=10)
    parser.add_argument("--trials-late", type=int, default=100)
    parser.add_argument(
        "--trials-cancel", type=int, default=1000, help="cancellations that land on a running call"
    )
    parser.add_argument("--outage-s", type=float, default=5.0)
    parser.add_argument(
        "--turn-s", type=float, default=2.0, help="llm.timeouts.turn_s for the stalled stream"
    )
    args = parser.parse_args()
    logging.getLogger("voxcore").addHandler(logging.NullHandler())  # only the figures on stdout
    logging.getLogger("voxcore").propagate = False
    if args.only == "cancel":
        with EmbeddedRedis() as server:
            result = asyncio.run(cancellations(server.url, args.trials_cancel))
        sys.stdout.write(json.dumps(result) + "\n" if args.json else f"{result}\n")
        return 0 if result["voxcore"].get("swallowed", 0) == 0 else 1
    if args.also_python is None:
        default = Path(__file__).resolve().parent.parent / ".venv313" / "bin" / "python"
        args.also_python = str(default) if default.exists() else None
    args.other_pythons = []
    if args.also_python:  # the same trials under another interpreter (e.g. 3.13), as JSON
        command = [args.also_python, __file__, "--only", "cancel", "--json"]
        out = subprocess.run(
            [*command, "--trials-cancel", str(args.trials_cancel)], check=True, capture_output=True, text=True
        ).stdout
        args.other_pythons.append(json.loads(out.strip().splitlines()[-1]))
    figures = asyncio.run(run(args))
    section = render(figures)
    sys.stdout.write(section)
    for path, heading in ((args.write, HEADING), (args.reliability, RELIABILITY_HEADING)):
        if path is not None:
            text = section.replace(HEADING, heading, 1)
            existing = path.read_text(encoding="utf-8") if path.exists() else ""
            path.write_text(merge_section(existing, text, heading), encoding="utf-8")
    return 0 if all(f.ok for f in figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
