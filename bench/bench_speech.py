"""Benchmark Russian speech: a money reply from the number fragment pack, and verbalization.

(a) ``hybrid_amount_playlist(12_500)`` (the intro + "двенадцать" "тысяч" "пятьсот" "рублей", five
    recorded fragments; the shipped demo fragments and number pack loaded into a private
    redis-server in the playlist's 16 kHz format): time from ``play()`` to the first 20 ms chunk,
    against one raw ``LRANGE 0 0`` of the intro through ``redis.asyncio`` on the same server.
    Target: <= 2x. The reply makes no TTS request (checked).
(b) Verbalization: ``number_words`` over 20 000 random integers below 10**9 (and below 10**12),
    ``money_words``, and ``normalize_tts_text`` of "Ваша стоимость составляет 12 500 рублей", in
    microseconds per call after a first pass over the same inputs (num2words' words for each
    three-digit group are memoized: 3 x 1000 entries at most). Target: <= 20 us per number.

Calls alternate one by one (raw, ours, ours, raw, ...) in rounds after a warm-up round; the result is
the median over rounds of each round's median.

Usage: ``python bench/bench_speech.py [--rounds N] [--iterations N] [--write docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import random
import statistics
import sys
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis
from bench_hybrid import Row, compare
from benchdoc import merge_section, run_context
from redis.utils import HIREDIS_AVAILABLE

from voxcore.adapters.audio import SoxrAudioConverter
from voxcore.adapters.openai.tts import OpenAITTSEngine
from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.application.hybrid import HybridResponder
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.russian import hybrid_amount_playlist, money_words, number_words
from voxcore.core.domain.tts_text import normalize_tts_text
from voxcore.entrypoints.cli import demo_manifest, numbers_manifest
from voxcore.entrypoints.embedded_redis import EmbeddedRedis
from voxcore.entrypoints.logging import configure_logging
from voxcore.entrypoints.manifest import read_manifest

HEADING = "## Speech: number pack and verbalization"
PCM16 = AudioFormat(16_000, 1, 2)
PACK_TARGET = 2.0  # x one raw LRANGE 0 0
WORDS_TARGET_US = 20.0


async def first_audio(url: str, rounds: int, iterations: int) -> list[Row]:
    configure_logging("INFO", stream=io.StringIO())
    raw = aioredis.Redis.from_url(url)
    cache = RedisCacheManager(RedisConfig(url=url))
    await cache.connect()
    # The engine is never called (checked below); it points at a closed port to make sure.
    engine = OpenAITTSEngine(base_url="http://127.0.0.1:9/v1", api_key=None, timeout_s=1.0)
    responder = HybridResponder(
        cache=cache, tts=engine, converter=SoxrAudioConverter(), target_format=PCM16, voice="alloy"
    )
    try:
        for spec in read_manifest(demo_manifest()) + read_manifest(numbers_manifest()):
            assert (await cache.load_audio_file(spec.key, str(spec.file))).ok, spec.key
        playlist = hybrid_amount_playlist(12_500)

        async def ours() -> float:
            started = time.perf_counter()
            async with contextlib.aclosing(responder.play(playlist)) as stream:
                await anext(stream)
                elapsed = time.perf_counter() - started
                async for _ in stream:  # the rest of the reply, untimed
                    pass
            return elapsed

        async def raw_lrange() -> float:
            started = time.perf_counter()
            await raw.lrange("static:intro", 0, 0)
            elapsed = time.perf_counter() - started
            await raw.lrange("static:intro", 1, -1)  # the rest of the list, untimed
            return elapsed

        r, o = await compare(raw_lrange, ours, iterations, rounds)
        metrics = responder.last_metrics
        assert metrics is not None and metrics.misses == 0 and metrics.outcome == "ok", metrics
        assert metrics.voices == ("static",), metrics
        return [
            Row(
                "(a) first chunk of `hybrid_amount_playlist(12_500)`, pack loaded (5 fragments, "
                "0 TTS requests) vs raw `LRANGE 0 0`",
                r,
                o,
                f"<= {PACK_TARGET:g}x",
                o <= PACK_TARGET * r,
            )
        ]
    finally:
        await responder.shutdown()
        await engine.aclose()
        await cache.close()
        await raw.flushdb()
        await raw.aclose()


def per_call_us(fn: object, inputs: list[object], rounds: int) -> float:
    """Median over rounds of the mean microseconds per call of ``fn`` over ``inputs``."""
    call = fn  # type: ignore[assignment]
    for value in inputs:  # first pass: fills the group table, as a running process has
        call(value)  # type: ignore[operator]
    results = []
    for _ in range(rounds):
        started = time.perf_counter()
        for value in inputs:
            call(value)  # type: ignore[operator]
        results.append((time.perf_counter() - started) / len(inputs) * 1e6)
    return statistics.median(results)


def verbalization(rounds: int) -> tuple[list[Row], dict[str, float]]:
    rng = random.Random(7)
    below_1e9: list[object] = [rng.randrange(10**9) for _ in range(20_000)]
    below_1e12: list[object] = [rng.randrange(10**12) for _ in range(20_000)]
    amounts: list[object] = [rng.randrange(10**7) for _ in range(20_000)]
    sentence = "Ваша стоимость составляет 12 500 рублей"
    started = time.perf_counter()
    number_words(987_654_321)  # cold: groups not yet in the table
    cold_us = (time.perf_counter() - started) * 1e6
    rows = [
        Row(
            "(b) `number_words(n)`, n < 10**9 (20 000 random)",
            WORDS_TARGET_US,
            per_call_us(number_words, below_1e9, rounds),
            f"<= {WORDS_TARGET_US:g} us",
            None,
        ),
        Row(
            "(b) `number_words(n)`, n < 10**12 (20 000 random)",
            WORDS_TARGET_US,
            per_call_us(number_words, below_1e12, rounds),
            f"<= {WORDS_TARGET_US:g} us",
            None,
        ),
        Row(
            "(b) `money_words(rubles)`, rubles < 10**7",
            WORDS_TARGET_US,
            per_call_us(money_words, amounts, rounds),
            f"<= {WORDS_TARGET_US:g} us",
            None,
        ),
        Row(
            f"(diagnostic) `normalize_tts_text({sentence!r})`",
            WORDS_TARGET_US,
            per_call_us(normalize_tts_text, [sentence] * 2000, rounds),
            "-",
            None,
        ),
    ]
    for row in rows[:3]:
        row.ok = row.ours_us <= WORDS_TARGET_US
    return rows, {"cold_us": cold_us}


def render(
    pack: list[Row], words: list[Row], extra: dict[str, float], url: str, rounds: int, iterations: int
) -> str:
    lines = [
        HEADING,
        "",
        "Generated by `bench/bench_speech.py`. (a) Time from `HybridResponder.play()` to the first 20 ms",
        "chunk of a money reply spoken entirely from recorded fragments (the shipped demo fragments and",
        "number pack loaded into a private redis-server), against one raw `LRANGE 0 0` through",
        f"`redis.asyncio` on the same server: {rounds} rounds of {iterations} calls per side, alternating",
        "call by call; the median over rounds of each round's median, in microseconds. (b) Verbalization",
        "in microseconds per call (median over rounds of the mean over 20 000 inputs, after a first pass",
        "that fills num2words' memoized three-digit groups).",
        "",
        *run_context(),
        f"- redis-py {redis.__version__}, hiredis parser: {HIREDIS_AVAILABLE}; server: {url}",
        "",
        "| operation | raw (us) | voxcore (us) | ratio | target | ok |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in pack:
        verdict = "-" if row.ok is None else ("yes" if row.ok else "NO")
        numbers = f"{row.raw_us:.1f} | {row.ours_us:.1f} | {row.ratio:.3f}x"
        lines.append(f"| {row.name} | {numbers} | {row.target} | {verdict} |")
    lines += ["", "| verbalization | us per call | target | ok |", "|---|---:|---|---|"]
    for row in words:
        verdict = "-" if row.ok is None else ("yes" if row.ok else "NO")
        lines.append(f"| {row.name} | {row.ours_us:.2f} | {row.target} | {verdict} |")
    lines += [
        "",
        f"A first call whose groups are not in the table yet costs more: {extra['cold_us']:.0f} us for",
        "`number_words(987_654_321)` in a fresh process (num2words' `to_cardinal` per new group).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=200, help="calls per round and side for (a)")
    parser.add_argument("--write", type=Path, help="also put the section into this markdown file")
    args = parser.parse_args()
    words, extra = verbalization(max(3, args.rounds // 3))
    server = EmbeddedRedis().start()
    try:
        pack = asyncio.run(first_audio(server.url, args.rounds, args.iterations))
    finally:
        server.close()
    section = render(pack, words, extra, server.url, args.rounds, args.iterations)
    sys.stdout.write(section)
    if args.write:
        existing = args.write.read_text(encoding="utf-8") if args.write.exists() else ""
        args.write.write_text(merge_section(existing, section, HEADING), encoding="utf-8")
    return 0 if all(r.ok is not False for r in pack + words) else 1


if __name__ == "__main__":
    raise SystemExit(main())
