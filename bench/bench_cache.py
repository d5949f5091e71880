"""Benchmark RedisCacheManager against raw redis.asyncio (+hiredis) on the same server, in one process.

Each measurement interleaves the raw baseline and voxcore's call in rounds and reports the median
per-operation time, so machine noise hits both sides alike. Targets (issue: cache foundation):

* ``get_audio_chunks`` of 1000 x 640 B within 1.10x of a raw ``LRANGE 0 -1``;
* first chunk of the streaming read within 1.3x of a raw ``LRANGE 0 0`` (1000 and 20000 chunks);
  both sides then read the rest of the list untimed (the stream's own tail fetch, a raw
  ``LRANGE 1 -1``), since a playback always does;
* a write within 1.15x of a raw ``MULTI DEL + RPUSH``;
* while Redis is down, <= 1 ms per operation.

Usage: ``python bench/bench_cache.py [--redis-url URL] [--rounds N] [--write docs/benchmarks.md]``.
Without ``--redis-url`` a private redis-server is started on a free port.
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
from benchdoc import MARKER, run_context
from redis.utils import HIREDIS_AVAILABLE

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.domain.secrets import mask_url
from voxcore.entrypoints.embedded_redis import EmbeddedRedis
from voxcore.entrypoints.logging import configure_logging

Op = Callable[[], Awaitable[object]]


@dataclass
class Row:
    name: str
    raw_us: float | None
    ours_us: float
    target: str
    ok: bool

    @property
    def ratio(self) -> str:
        return f"{self.ours_us / self.raw_us:.3f}x" if self.raw_us else "-"


async def per_op_us(op: Op, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        await op()
    return (time.perf_counter() - start) / iterations * 1e6


async def compare(raw: Op, ours: Op, iterations: int, rounds: int) -> tuple[float, float]:
    """Median per-op microseconds of raw and ours, measured in alternating rounds after a warm-up."""
    await per_op_us(raw, max(5, iterations // 5))
    await per_op_us(ours, max(5, iterations // 5))
    raw_t, ours_t = [], []
    for i in range(rounds):
        pair = [(raw, raw_t), (ours, ours_t)]
        for op, sink in pair if i % 2 == 0 else reversed(pair):
            sink.append(await per_op_us(op, iterations))
    return statistics.median(raw_t), statistics.median(ours_t)


async def run(url: str, rounds: int, server: EmbeddedRedis | None) -> list[Row]:
    # Production-like logging: voxcore's JSON handler at INFO, written to an in-memory sink.
    configure_logging("INFO", stream=io.StringIO())
    raw = aioredis.Redis.from_url(url)
    cache = RedisCacheManager(
        RedisConfig(url=url), breaker=CircuitBreaker(base_window_s=0.25, max_window_s=2.0)
    )
    await cache.connect()
    rows: list[Row] = []
    chunks_1k = [bytes([i % 256]) * 640 for i in range(1000)]
    chunks_20k = [bytes([i % 256]) * 640 for i in range(20_000)]
    await cache.set_audio_chunks("static:bench1k", chunks_1k)
    await cache.set_audio_chunks("static:bench20k", chunks_20k)

    # 1. whole read
    r, o = await compare(
        lambda: raw.lrange("static:bench1k", 0, -1),
        lambda: cache.get_audio_chunks("static:bench1k"),
        40,
        rounds,
    )
    rows.append(Row("get_audio_chunks, 1000 x 640 B vs raw LRANGE 0 -1", r, o, "<= 1.10x", o <= 1.10 * r))

    # 2. first chunk of a streaming read (the rest is consumed, untimed, so the prefetch really runs)
    for key, n in (("static:bench1k", 1000), ("static:bench20k", 20_000)):
        first_times: list[float] = []

        async def first_chunk(key: str = key, sink: list[float] = first_times) -> None:
            t0 = time.perf_counter()
            stream = await cache.open_audio_stream(key)
            assert stream is not None
            await stream.__anext__()
            sink.append(time.perf_counter() - t0)
            async for _ in stream:
                pass

        raw_first: list[float] = []

        async def raw_head(key: str = key, sink: list[float] = raw_first) -> None:
            t0 = time.perf_counter()
            await raw.lrange(key, 0, 0)
            sink.append(time.perf_counter() - t0)
            # The same untimed follow-up work as the stream (the rest of the list), so both sides
            # start every timed read with equally cold CPU caches and allocator state.
            await raw.lrange(key, 1, -1)

        iterations = 200 if n == 1000 else 30
        await compare(raw_head, first_chunk, iterations, rounds)
        r, o = statistics.median(raw_first) * 1e6, statistics.median(first_times) * 1e6
        rows.append(Row(f"first streamed chunk, {n} chunks vs raw LRANGE 0 0", r, o, "<= 1.3x", o <= 1.3 * r))

    # 3. write
    async def raw_write() -> None:
        pipe = raw.pipeline(transaction=True)
        pipe.delete("static:bench_w_raw")
        pipe.rpush("static:bench_w_raw", *chunks_1k)
        await pipe.execute()

    r, o = await compare(raw_write, lambda: cache.set_audio_chunks("static:bench_w", chunks_1k), 30, rounds)
    rows.append(Row("set_audio_chunks, 1000 x 640 B vs raw MULTI DEL+RPUSH", r, o, "<= 1.15x", o <= 1.15 * r))

    # 4. Redis down
    if server is not None:
        await asyncio.to_thread(server.stop)
        await cache.get_audio_chunks("static:bench1k")  # the failure that opens the breaker
        down: list[float] = []
        for _ in range(2000):
            t0 = time.perf_counter()
            await cache.get_audio_chunks("static:bench1k")
            down.append(time.perf_counter() - t0)
        worst = max(down) * 1e6
        p99 = sorted(down)[int(len(down) * 0.99)] * 1e6
        rows.append(
            Row(
                f"get_audio_chunks while Redis is down (2000 calls, p99 {p99:.1f} us, worst {worst:.0f} us)",
                None,
                statistics.median(down) * 1e6,
                "<= 1000 us",
                p99 <= 1000,
            )
        )
        await asyncio.to_thread(server.start)

    await cache.close()
    await raw.aclose()
    return rows


def render(rows: list[Row], url: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/bench_cache.py`): voxcore against raw `redis.asyncio` on the",
        "same server, in one process, alternating rounds, median microseconds per operation. Logging is",
        "configured as in production (JSON at INFO). Ratios matter; absolute numbers depend on the machine.",
        "First-chunk rows time only the first chunk; both sides then read the rest of the list untimed",
        "(the stream's tail fetch vs a raw `LRANGE 1 -1`), so each timed read starts from the same state.",
        "",
        *run_context(),
        f"- redis-py {redis.__version__}, hiredis parser: {HIREDIS_AVAILABLE}; server: {mask_url(url)}",
        "",
        "| operation | raw (us) | voxcore (us) | ratio | target | ok |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        raw = f"{row.raw_us:.1f}" if row.raw_us else "-"
        verdict = "yes" if row.ok else "NO"
        lines.append(f"| {row.name} | {raw} | {row.ours_us:.1f} | {row.ratio} | {row.target} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="use this server (the outage row is skipped)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--write", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args()
    server = None if args.redis_url else EmbeddedRedis().start()
    url = args.redis_url or (server.url if server else "")
    try:
        rows = asyncio.run(run(url, args.rounds, server))
    finally:
        if server is not None:
            server.close()
    report = render(rows, url)
    sys.stdout.write(report)
    if args.write:
        existing = args.write.read_text(encoding="utf-8") if args.write.exists() else ""
        marker = f"\n{MARKER}\n"
        tail = existing[existing.index(marker) :] if marker in existing else ""
        args.write.write_text(report + tail, encoding="utf-8")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
