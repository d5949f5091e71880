"""A failover drill: calls keep using the cache while a Redis primary is replaced under them.

:func:`run_failover_drill` drives a :class:`~voxcore.adapters.redis.cache.RedisCacheManager` the way
calls do (concurrent fragment reads, overwrites, summary reads and writes) and then either

* ``kill``s the primary that serves part of the keys (SIGKILL: a crashed machine), waits until the
  calls are served again, restarts the killed node (it rejoins as a replica) and waits again; or
* ``switchover``: asks for a manual failover (``CLUSTER FAILOVER`` on the replica, ``SENTINEL
  FAILOVER``) - the old primary stays up as a replica, so the pooled connections still point at it
  and get ``MOVED`` (cluster) or ``READONLY`` (Sentinel): the pool must move on without a restart.

It measures what the callers saw: soft failures, wrong data (a read that returns something no write
ever stored - must be 0), when the replica was promoted and when every call succeeded again. Used
by the cluster tier's tests and by ``bench/bench_failover.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.events import FIELDS_ATTR
from voxcore.testing.topologies import LocalRedisCluster, LocalRedisSentinel, RedisNode

_CHUNKS = 6


@dataclass
class FailoverReport:
    """What the calls saw during one drill.

    Attributes:
        topology: ``cluster`` or ``sentinel``.
        how: ``kill`` or ``switchover``.
        operations: Cache calls made in total.
        soft_failures: Calls that failed softly (``None``/``False``, logged), all keys.
        wrong_data: Reads that returned data no write ever stored (must be 0).
        shard_keys: Keys whose primary was killed (all of them with Sentinel).
        promotion_s: Kill -> the topology reports the replica as the new primary.
        first_success_s: Kill -> first successful call on a key of the old primary after its
            first failure there.
        recovered_s: Kill -> end of the last failure, after which every call succeeded for the
            drill's steady stretch.
        rejoin_failures: Soft failures after the killed node came back as a replica (``kill``).
        rejoin_recovered_s: Restart -> end of the last failure (``kill``; 0.0 when none failed).
        errors: The distinct soft-failure messages logged (``redis_error``, first 120 characters).
    """

    topology: str
    how: str = "kill"
    operations: int = 0
    soft_failures: int = 0
    wrong_data: int = 0
    shard_keys: int = 0
    promotion_s: float | None = None
    first_success_s: float | None = None
    recovered_s: float | None = None
    rejoin_failures: int = 0
    rejoin_recovered_s: float | None = None
    errors: set[str] = field(default_factory=set)


class _ErrorLog(logging.Handler):
    def __init__(self, report: FailoverReport) -> None:
        super().__init__(logging.ERROR)
        self._report = report

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, FIELDS_ATTR, None)
        if record.getMessage() == "redis_error" and isinstance(fields, dict):
            text = str(fields.get("error", ""))
            if "fast fail" in text:
                text = "Redis unavailable (fast fail while the breaker is open)"
            if len(self._report.errors) < 50:
                self._report.errors.add(text[:120])


def _chunks(key: str, version: int) -> list[bytes]:
    return [f"{key}|v{version}|{i}|".encode().ljust(320, b".") for i in range(_CHUNKS)]


class _Calls:
    """Concurrent callers over a fixed key set; records every outcome with its time."""

    def __init__(self, cache: RedisCacheManager, keys: list[str], texts: list[str], seed: int) -> None:
        self.cache = cache
        self.keys = keys
        self.texts = texts
        self.written: dict[str, set[int]] = {key: {0} for key in [*keys, *texts]}
        self.outcomes: list[tuple[float, str, bool]] = []  # (time, key, ok)
        self.wrong = 0
        self._rng = random.Random(seed)
        self._version = 0
        self._stop = asyncio.Event()

    async def preload(self) -> None:
        for key in self.keys:
            if not await self.cache.set_audio_chunks(key, _chunks(key, 0)):
                raise RuntimeError(f"preload of {key} failed")
        for key in self.texts:
            if not await self.cache.set_text(key, f"{key}|v0", 3600):
                raise RuntimeError(f"preload of {key} failed")

    async def worker(self) -> None:
        rng = self._rng
        while not self._stop.is_set():
            roll = rng.random()
            if roll < 0.6:
                key = rng.choice(self.keys)
                chunks = await self.cache.get_audio_chunks(key)
                ok = chunks is not None
                if ok and not any(chunks == _chunks(key, v) for v in self.written[key]):
                    self.wrong += 1
            elif roll < 0.75:
                key = rng.choice(self.keys)
                self._version += 1
                version = self._version
                # Registered before the write: a write that fails softly may still have been applied.
                self.written[key].add(version)
                ok = await self.cache.set_audio_chunks(key, _chunks(key, version))
            elif roll < 0.9:
                key = rng.choice(self.texts)
                text = await self.cache.get_text(key)
                ok = text is not None
                if ok and text not in {f"{key}|v{v}" for v in self.written[key]}:
                    self.wrong += 1
            else:
                key = rng.choice(self.texts)
                self._version += 1
                self.written[key].add(self._version)
                ok = await self.cache.set_text(key, f"{key}|v{self._version}", 3600)
            self.outcomes.append((time.monotonic(), key, ok))
            await asyncio.sleep(0.002)  # a call's pace; also keeps the loop fair on a loaded machine

    def stop(self) -> None:
        self._stop.set()


def _watch(condition: Callable[[], bool], timeout_s: float) -> tuple[threading.Thread, list[float]]:
    """Poll ``condition`` in a thread (it uses blocking clients); when it became true lands in the list."""
    seen: list[float] = []

    def poll() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if condition():
                    seen.append(time.monotonic())
                    return
            except Exception:  # a node that is down or busy: ask again
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=poll, name="voxcore-failover-watch", daemon=True)
    thread.start()
    return thread, seen


async def run_failover_drill(
    topology: LocalRedisCluster | LocalRedisSentinel,
    *,
    how: Literal["kill", "switchover"] = "kill",
    workers: int = 16,
    keys: int = 48,
    breaker: CircuitBreaker | None = None,
    steady_s: float = 1.0,
    timeout_s: float = 45.0,
    seed: int = 7,
) -> FailoverReport:
    """Kill a primary of ``topology`` under load and measure how the cache's callers fare.

    Args:
        topology: A started cluster or Sentinel set (a node of it is killed and restarted).
        how: ``kill`` (SIGKILL, then restart) or ``switchover`` (a manual failover; nothing dies).
        workers: Concurrent callers.
        keys: Fragment keys (and as many summary keys).
        breaker: The cache's breaker (default: the production default windows).
        steady_s: Failure-free stretch that counts as recovered.
        timeout_s: Give up waiting for recovery after this long (the report says so: ``recovered_s`` None).
        seed: Random seed of the callers.
    """
    cluster = isinstance(topology, LocalRedisCluster)
    if isinstance(topology, LocalRedisCluster):
        config = RedisConfig(mode="cluster", nodes=topology.startup_nodes)
    else:
        config = RedisConfig(
            mode="sentinel", sentinels=topology.sentinel_addresses, sentinel_service=topology.service
        )
    report = FailoverReport("cluster" if cluster else "sentinel", how)
    errors = _ErrorLog(report)
    voxcore_log = logging.getLogger("voxcore")
    voxcore_log.addHandler(errors)
    saved_level = voxcore_log.level
    if voxcore_log.getEffectiveLevel() > logging.ERROR:
        voxcore_log.setLevel(logging.ERROR)  # the drill's own handler must see the soft failures
    prefix = "drill:"
    cache = RedisCacheManager(config, key_prefix=prefix, breaker=breaker or CircuitBreaker())
    await cache.connect()
    fragment_keys = [f"static:drill-{i}" for i in range(keys)]
    text_keys = [f"summary:session:drill-{i}" for i in range(keys)]
    calls = _Calls(cache, fragment_keys, text_keys, seed)
    tasks: list[asyncio.Task[None]] = []
    victim: RedisNode | None = None
    try:
        await calls.preload()
        if isinstance(topology, LocalRedisCluster):
            victim = topology.primary_for(prefix + fragment_keys[0])
            replica = topology.replicas_of(victim)[0]
            switch_over: Callable[[], None] = functools.partial(topology.manual_failover, replica)
            shard = {
                key for key in [*fragment_keys, *text_keys] if topology.primary_for(prefix + key) is victim
            }

            def promoted() -> bool:
                return topology.role_of(replica) == "master"
        else:
            victim = topology.primary()
            shard = {*fragment_keys, *text_keys}
            switch_over = topology.manual_failover
            old_address = victim.address

            def promoted() -> bool:
                return topology.primary_address() != old_address

        report.shard_keys = len(shard)
        tasks = [asyncio.create_task(calls.worker()) for _ in range(workers)]
        await asyncio.sleep(0.5)  # steady load before the kill
        killed_at = time.monotonic()
        if how == "kill":
            victim.kill()
        else:
            await asyncio.to_thread(switch_over)
        watcher, promoted_at = _watch(promoted, timeout_s)
        recovered_at = await _wait_recovered(calls, killed_at, steady_s, timeout_s)
        await asyncio.to_thread(watcher.join, timeout_s)
        if promoted_at:
            report.promotion_s = promoted_at[0] - killed_at
        if recovered_at is not None:
            report.recovered_s = recovered_at - killed_at
        shard_failures = [t for t, key, ok in calls.outcomes if t > killed_at and not ok and key in shard]
        if shard_failures:
            first_failure = min(shard_failures)
            first_ok = [t for t, key, ok in calls.outcomes if t > first_failure and ok and key in shard]
            if first_ok:
                report.first_success_s = min(first_ok) - killed_at
        if how == "kill":
            # The old primary comes back and rejoins as a replica (cluster: MOVED for its old
            # slots; Sentinel: reconfigured by the Sentinels).
            rejoined_at = time.monotonic()
            victim.start()
            await asyncio.to_thread(victim.wait_answers, 15.0)
            back = await _wait_recovered(calls, rejoined_at, steady_s, timeout_s)
            report.rejoin_failures = sum(1 for t, _, ok in calls.outcomes if t > rejoined_at and not ok)
            if back is not None:
                report.rejoin_recovered_s = back - rejoined_at
    finally:
        calls.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cache.close()
        voxcore_log.removeHandler(errors)
        voxcore_log.setLevel(saved_level)
    report.operations = len(calls.outcomes)
    report.soft_failures = sum(1 for _, _, ok in calls.outcomes if not ok)
    report.wrong_data = calls.wrong
    return report


async def _wait_recovered(calls: _Calls, since: float, steady_s: float, timeout_s: float) -> float | None:
    """When every call succeeded for ``steady_s``: the start of that stretch (None on timeout)."""
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        failures = [t for t, _, ok in calls.outcomes if t > since and not ok]
        last_failure = max(failures) if failures else since
        successes_after = any(t > last_failure and ok for t, _, ok in calls.outcomes)
        if successes_after and now - last_failure >= steady_s:
            return last_failure
    return None
