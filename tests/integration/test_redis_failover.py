"""Failover under load: a primary dies (or is switched over) while calls use the cache.

Real ``redis-server`` processes: a 3-primary/3-replica cluster and a primary/replica/3-Sentinel set,
one per test (the test kills a node). Part of ``make test-cluster`` (``--redis-modes`` with
``cluster``/``sentinel``); skipped by the fast suite. The measured times are printed and tabulated
by ``bench/bench_failover.py`` in docs/benchmarks.md; here only the outcomes are checked: the replica
is promoted, the calls are served again without a restart, and no call ever got wrong data.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.testing.failover import FailoverReport, run_failover_drill
from voxcore.testing.topologies import LocalRedisCluster, LocalRedisSentinel


def _requested(config: pytest.Config, mode: str) -> bool:
    return mode in str(config.getoption("--redis-modes")).split(",")


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[LocalRedisCluster]:
    if not _requested(request.config, "cluster"):
        pytest.skip("cluster failover runs in make test-cluster (--redis-modes=cluster)")
    with LocalRedisCluster() as topology:
        yield topology


@pytest.fixture
def sentinel_set(request: pytest.FixtureRequest) -> Iterator[LocalRedisSentinel]:
    if not _requested(request.config, "sentinel"):
        pytest.skip("sentinel failover runs in make test-cluster (--redis-modes=sentinel)")
    with LocalRedisSentinel() as topology:
        yield topology


def _check(report: FailoverReport) -> None:
    print(f"\n{report}")  # the figures, for the log of the cluster tier
    assert report.wrong_data == 0, "a call got data no write ever stored"
    assert report.promotion_s is not None, "the replica was never promoted"
    assert report.recovered_s is not None, f"the calls were not served again: {report.errors}"
    if report.how == "kill":
        assert report.soft_failures > 0  # the kill was felt (as soft failures, never exceptions)
        assert report.first_success_s is not None
        assert report.rejoin_recovered_s is not None, "the old primary's return broke the pool"


@pytest.mark.parametrize("how", ["kill", "switchover"])
async def test_cluster_failover_keeps_calls_served(cluster: LocalRedisCluster, how: str) -> None:
    report = await run_failover_drill(cluster, how=how)
    _check(report)


@pytest.mark.parametrize("how", ["kill", "switchover"])
async def test_sentinel_failover_keeps_calls_served(sentinel_set: LocalRedisSentinel, how: str) -> None:
    report = await run_failover_drill(sentinel_set, how=how)
    _check(report)


async def test_cluster_failover_with_a_short_breaker_window(cluster: LocalRedisCluster) -> None:
    # The breaker's probe finds the promoted replica; a short window only shortens the wait for it.
    report = await run_failover_drill(cluster, breaker=CircuitBreaker(base_window_s=0.05, max_window_s=0.2))
    _check(report)
