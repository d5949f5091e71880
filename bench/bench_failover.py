"""Measure how long calls go unserved when a Redis primary dies or is switched over.

Starts real topologies of ``redis-server`` processes on free 127.0.0.1 ports (a 3-primary/3-replica
cluster with ``cluster-node-timeout`` 1000 ms; a primary/replica/3-Sentinel set with
``down-after-milliseconds`` 500) and runs :func:`voxcore.testing.failover.run_failover_drill` on each:
16 concurrent callers read and write fragments and summaries through ``RedisCacheManager`` while the
primary of part of the keys is SIGKILLed (then restarted), or switched over by a manual failover.

Reported per scenario (median and worst of ``--runs``): time from the kill to the replica's
promotion (the topology's own detection: node timeout / down-after plus the election), to the calls
being served again (the last soft failure), the client's share of it (served again - promoted),
soft failures and wrong data (must be 0).

Usage: ``python bench/bench_failover.py [--runs N] [--write docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from benchdoc import merge_section, run_context

from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.testing.failover import FailoverReport, run_failover_drill
from voxcore.testing.topologies import LocalRedisCluster, LocalRedisSentinel

HEADING = "## Redis failover"


def _stat(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    if len(known) < len(values):
        return f"{statistics.median(known):.2f} / {max(known):.2f} ({len(values) - len(known)} timed out)"
    return f"{statistics.median(known):.2f} / {max(known):.2f}"


def _client_share(report: FailoverReport) -> float | None:
    if report.recovered_s is None or report.promotion_s is None:
        return None
    return max(0.0, report.recovered_s - report.promotion_s)


def _run(
    make: Callable[[], LocalRedisCluster | LocalRedisSentinel],
    how: str,
    runs: int,
    breaker: tuple[float, float],
) -> list[FailoverReport]:
    reports = []
    for _ in range(runs):
        with make() as topology:
            report = asyncio.run(
                run_failover_drill(
                    topology,
                    how="kill" if how == "kill" else "switchover",
                    breaker=CircuitBreaker(base_window_s=breaker[0], max_window_s=breaker[1]),
                )
            )
        print(f"  {report.topology} {how}: {report}", file=sys.stderr)
        reports.append(report)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", type=Path, help="merge the results into this markdown file")
    args = parser.parse_args()
    logging.getLogger("voxcore").setLevel(logging.CRITICAL)  # soft failures are counted, not printed

    scenarios: list[
        tuple[str, Callable[[], LocalRedisCluster | LocalRedisSentinel], str, tuple[float, float]]
    ] = [
        ("cluster, primary killed", LocalRedisCluster, "kill", (0.25, 2.0)),
        ("cluster, primary killed, breaker 50-200 ms", LocalRedisCluster, "kill", (0.05, 0.2)),
        ("cluster, manual failover (MOVED)", LocalRedisCluster, "switchover", (0.25, 2.0)),
        ("sentinel, primary killed", LocalRedisSentinel, "kill", (0.25, 2.0)),
        ("sentinel, primary killed, breaker 50-200 ms", LocalRedisSentinel, "kill", (0.05, 0.2)),
        ("sentinel, manual failover (READONLY)", LocalRedisSentinel, "switchover", (0.25, 2.0)),
    ]
    lines = [
        HEADING,
        "",
        *run_context(),
        f"- {args.runs} runs per scenario; 16 callers through `RedisCacheManager` (60% fragment reads, "
        "15% overwrites, 15% summary reads, 10% summary writes); cluster: 3 primaries + 3 replicas, "
        "`cluster-node-timeout 1000`; Sentinel: 1 replica, 3 Sentinels, quorum 2, "
        "`down-after-milliseconds 500`",
        "- times in seconds from the kill (or the failover command), median / worst; "
        "*served again* = the last soft failure, after which every call succeeded for 1 s; "
        "*client's share* = served again - promoted",
        "",
        "| scenario | promoted | served again | client's share | calls | soft failures | wrong data |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, make, how, breaker in scenarios:
        print(name, file=sys.stderr)
        reports = _run(make, how, args.runs, breaker)
        lines.append(
            f"| {name} | {_stat([r.promotion_s for r in reports])} "
            f"| {_stat([r.recovered_s for r in reports])} "
            f"| {_stat([_client_share(r) for r in reports])} | {sum(r.operations for r in reports)} "
            f"| {sum(r.soft_failures for r in reports)} | {sum(r.wrong_data for r in reports)} |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        existing = args.write.read_text(encoding="utf-8") if args.write.exists() else ""
        args.write.write_text(merge_section(existing, section, HEADING), encoding="utf-8")


if __name__ == "__main__":
    main()
