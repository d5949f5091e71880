"""Benchmark one RedisRateLimiter check against one raw EVALSHA round trip on the same server.

The baseline is the cheapest scripted round trip there is: ``EVALSHA`` of ``return 1`` through a
raw ``redis.asyncio`` client. The limiter's check is one ``EVALSHA`` too (GCRA with ``TIME``,
``GET`` and ``PSETEX``), plus its Python work (validation, breaker, pool bound, the decision).
Both are measured call by call, alternating, in rounds after a warm-up, and the medians compared.
Target: <= 1.2x, for an allowed and for a denied check. Rows without a target explain the rest:
a denial with its ``rate_limited`` JSON log line (the log line is the host's logging cost, not the
check's), and a raw ``EVALSHA`` of the GCRA script itself (the server's share of the difference).

Usage: ``python bench/bench_rate_limit.py [--redis-url URL] [--rounds N] [--write docs/benchmarks.md]``.
Without ``--redis-url`` a private redis-server is started on a free port. ``--write`` replaces the
``## Rate limiter`` section of the file (up to the next ``## `` heading) or appends it below the
``<!-- more benchmarks below -->`` marker, leaving every other section as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.asyncio as aioredis
from benchdoc import merge_section, run_context
from redis.utils import HIREDIS_AVAILABLE

from voxcore.adapters.redis import rate_limit
from voxcore.adapters.redis.config import RedisConfig
from voxcore.adapters.redis.rate_limit import RedisRateLimiter
from voxcore.core.domain.secrets import mask_url
from voxcore.entrypoints.embedded_redis import EmbeddedRedis
from voxcore.entrypoints.logging import configure_logging

Op = Callable[[], Awaitable[object]]

HEADING = "## Rate limiter"
TARGET = 1.2


@dataclass
class Row:
    name: str
    raw_us: float
    ours_us: float
    target: float | None

    @property
    def ratio(self) -> float:
        return self.ours_us / self.raw_us

    @property
    def ok(self) -> bool:
        return self.target is None or self.ratio <= self.target


async def compare(raw: Op, ours: Op, iterations: int, rounds: int) -> tuple[float, float]:
    """Median microseconds per call of raw and ours.

    Calls alternate one by one (raw, ours, ours, raw, ...), so drift in the machine's speed hits
    both sides alike; each round yields the median latency of each side, and the result is the
    median over rounds. A warm-up round comes first and is discarded.
    """
    raw_rounds: list[float] = []
    ours_rounds: list[float] = []
    clock = time.perf_counter
    for round_no in range(rounds + 1):
        raw_t: list[float] = []
        ours_t: list[float] = []
        for i in range(iterations):
            pair = ((raw, raw_t), (ours, ours_t)) if i % 2 == 0 else ((ours, ours_t), (raw, raw_t))
            for op, sink in pair:
                started = clock()
                await op()
                sink.append(clock() - started)
        if round_no:
            raw_rounds.append(statistics.median(raw_t) * 1e6)
            ours_rounds.append(statistics.median(ours_t) * 1e6)
    return statistics.median(raw_rounds), statistics.median(ours_rounds)


async def run(url: str, rounds: int, iterations: int) -> list[Row]:
    # Production-like logging: voxcore's JSON handler at INFO (denials are logged), to memory.
    configure_logging("INFO", stream=io.StringIO())
    raw = aioredis.Redis.from_url(url)
    client = RedisConfig(url=url).build()
    prefix = f"bench:{time.time_ns()}:"
    # 10^6 units per second with a burst of 10^6: never refused at the rate one connection can ask.
    allowing = RedisRateLimiter(client, limit=1_000_000, period_s=1.0, key_prefix=prefix)
    refusing = RedisRateLimiter(client, limit=1, period_s=3600.0, key_prefix=prefix)
    try:
        trivial = await raw.script_load("return 1")
        gcra = await raw.script_load(rate_limit._GCRA_LUA)
        assert (await allowing.acquire("allowed")).allowed
        assert (await refusing.acquire("denied")).allowed
        assert not (await refusing.acquire("denied")).allowed

        async def raw_evalsha() -> object:
            return await raw.evalsha(trivial, 0)

        rows: list[Row] = []
        r, o = await compare(raw_evalsha, lambda: allowing.acquire("allowed"), iterations, rounds)
        rows.append(Row("acquire, allowed (TIME+GET+PSETEX) vs raw EVALSHA `return 1`", r, o, TARGET))
        configure_logging("WARNING", stream=io.StringIO())  # the check alone: no denial events
        r, o = await compare(raw_evalsha, lambda: refusing.acquire("denied"), iterations, rounds)
        rows.append(Row("acquire, denied (TIME+GET) vs raw EVALSHA `return 1`", r, o, TARGET))
        configure_logging("INFO", stream=io.StringIO())
        r, o = await compare(raw_evalsha, lambda: refusing.acquire("denied"), iterations, rounds)
        rows.append(Row("(logging) acquire, denied + `rate_limited` JSON line at INFO", r, o, None))

        key = prefix + "ratelimit:raw"

        async def raw_gcra() -> object:
            return await raw.evalsha(gcra, 1, key, 1, 1_000_000, 1)  # the arguments of `allowing`

        r, o = await compare(raw_evalsha, raw_gcra, iterations, rounds)
        rows.append(Row("(server share) raw EVALSHA of the GCRA script vs `return 1`", r, o, None))
        return rows
    finally:
        await allowing.aclose()
        await refusing.aclose()
        leftovers = [k async for k in raw.scan_iter(match=f"{prefix}*", count=1000)]
        if leftovers:
            await raw.delete(*leftovers)
        await client.aclose()
        await raw.aclose()


def render(rows: list[Row], url: str, rounds: int, iterations: int) -> str:
    lines = [
        HEADING,
        "",
        "Generated by `bench/bench_rate_limit.py`: one `RedisRateLimiter.acquire` (one `EVALSHA` of the",
        "GCRA script) against one raw `EVALSHA` of `return 1` on the same server, in one process,",
        f"{rounds} rounds of {iterations} calls per side, alternating call by call; the median over rounds",
        "of each round's median latency, in microseconds. Logging is configured as in production (JSON",
        "at INFO). Ratios matter; absolute numbers depend on the machine.",
        "",
        *run_context(),
        f"- redis-py {redis.__version__}, hiredis parser: {HIREDIS_AVAILABLE}; server: {mask_url(url)}",
        "",
        "| operation | raw (us) | voxcore (us) | ratio | target | ok |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        target = f"<= {row.target}x" if row.target is not None else "-"
        verdict = "-" if row.target is None else ("yes" if row.ok else "NO")
        lines.append(
            f"| {row.name} | {row.raw_us:.1f} | {row.ours_us:.1f} | {row.ratio:.3f}x | {target} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="use this server instead of a private redis-server")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=1000, help="calls per round and side")
    parser.add_argument("--write", type=Path, help="also put the section into this markdown file")
    args = parser.parse_args()
    server = None if args.redis_url else EmbeddedRedis().start()
    url = args.redis_url or (server.url if server else "")
    try:
        rows = asyncio.run(run(url, args.rounds, args.iterations))
    finally:
        if server is not None:
            server.close()
    section = render(rows, url, args.rounds, args.iterations)
    sys.stdout.write(section)
    if args.write:
        existing = args.write.read_text(encoding="utf-8") if args.write.exists() else ""
        args.write.write_text(merge_section(existing, section, HEADING), encoding="utf-8")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
