"""RedisRateLimiter on a real Redis: exact under concurrency, denials free, soft on outages, NOSCRIPT."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as redis

from tests.conftest import RedisTarget
from voxcore.adapters.redis.rate_limit import RedisRateLimiter
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.ports.rate_limit import RateLimitDecision, RateLimiter
from voxcore.entrypoints.embedded_redis import EmbeddedRedis
from voxcore.events import FIELDS_ATTR

# Every test here that uses redis_target also runs on a Redis Cluster and a Sentinel set
# (make test-cluster); the outage tests use a private server.
pytestmark = pytest.mark.all_redis_modes

Make = Callable[..., RedisRateLimiter]


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS_ATTR) for r in caplog.records if r.getMessage() == name]


async def wait_until(predicate: Callable[[], Awaitable[bool]], limit_s: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture
async def client(redis_target: RedisTarget) -> AsyncIterator[redis.Redis]:
    """A production-configured client (bounded pool of 32: the limiter must queue, not overflow)."""
    c = redis_target.config().build()
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
async def make(client: redis.Redis, key_prefix: str, raw_redis: redis.Redis) -> AsyncIterator[Make]:
    """Build limiters on the session Redis under the test's key prefix; closes them afterwards."""
    made: list[RedisRateLimiter] = []

    def build(**kwargs: Any) -> RedisRateLimiter:
        limiter = RedisRateLimiter(client, key_prefix=key_prefix, **kwargs)
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        await limiter.aclose()


def test_limiter_is_a_rate_limiter_port(client: redis.Redis) -> None:
    assert isinstance(RedisRateLimiter(client, limit=1, period_s=1), RateLimiter)


async def test_exactly_limit_allowed_under_100_concurrent_callers(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = make(limit=10, period_s=60)
    caplog.set_level(logging.INFO, logger="voxcore")
    decisions = await asyncio.gather(*(limiter.acquire("caller:1") for _ in range(100)))

    allowed = [d for d in decisions if d.allowed]
    denied = [d for d in decisions if not d.allowed]
    assert len(allowed) == 10 and len(denied) == 90
    # the grants were serialized by the script: each saw one unit fewer
    assert sorted(d.remaining for d in allowed) == list(range(10))
    assert all(d.retry_after_s == 0 and d.limit == 10 for d in allowed)
    # a unit comes back every 6 s: that is when the next request could pass
    assert all(0 < d.retry_after_s <= 6.0 and d.remaining == 0 and d.limit == 10 for d in denied)
    assert all(50 < d.reset_after_s <= 60 for d in denied)
    limited = events(caplog, "rate_limited")
    assert len(limited) == 90 and {e["subject"] for e in limited} == {"caller:1"}
    assert all(e["retry_after_s"] > 0 for e in limited)
    assert not events(caplog, "rate_limit_error")


async def test_remaining_counts_down_and_key_expires_when_idle(
    make: Make, raw_redis: redis.Redis, key_prefix: str
) -> None:
    limiter = make(limit=3, period_s=0.3)
    remaining = [(await limiter.acquire("s")).remaining for _ in range(3)]
    assert remaining == [2, 1, 0]
    key = f"{key_prefix}ratelimit:s"
    assert limiter.key_for("s") == key
    ttl = await raw_redis.pttl(key)
    assert 0 < ttl <= 300
    assert await wait_until(lambda: _missing(raw_redis, key), limit_s=5)


async def _missing(client: redis.Redis, key: str) -> bool:
    return not await client.exists(key)


async def test_denied_requests_do_not_consume(make: Make, raw_redis: redis.Redis, key_prefix: str) -> None:
    limiter = make(limit=2, period_s=1.0)  # a unit comes back every 500 ms
    grants = [await limiter.acquire("s") for _ in range(2)]
    assert [g.allowed for g in grants] == [True, True]
    key = f"{key_prefix}ratelimit:s"
    state = await raw_redis.get(key)
    denied = [await limiter.acquire("s") for _ in range(50)]  # a few ms, far below 500 ms
    assert not any(d.allowed for d in denied)
    assert await raw_redis.get(key) == state  # a denial writes nothing
    # Once the subject is idle again the full burst is back, however many denials there were
    # (a log of attempts, as in a sorted-set limiter counting every request, would still refuse).
    await asyncio.sleep(grants[-1].reset_after_s + 0.3)
    assert [(await limiter.acquire("s")).allowed for _ in range(2)] == [True, True]
    assert not (await limiter.acquire("s")).allowed


async def test_retry_after_is_honest(make: Make) -> None:
    limiter = make(limit=4, period_s=2.0)  # a unit comes back every 500 ms
    for _ in range(4):
        assert (await limiter.acquire("s")).allowed
    refused = await limiter.acquire("s")
    assert not refused.allowed and 0 < refused.retry_after_s <= 0.5
    await asyncio.sleep(refused.retry_after_s + 0.2)
    assert (await limiter.acquire("s")).allowed


async def test_exact_across_clients_sharing_one_server(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    clients = [redis_target.config().build() for _ in range(2)]
    limiters = [RedisRateLimiter(c, limit=10, period_s=60, key_prefix=key_prefix) for c in clients]
    try:
        decisions = await asyncio.gather(*(limiters[i % 2].acquire("shared") for i in range(100)))
        assert sum(d.allowed for d in decisions) == 10
    finally:
        for limiter, c in zip(limiters, clients, strict=True):
            await limiter.aclose()
            await c.aclose()


async def test_subjects_are_independent(make: Make) -> None:
    limiter = make(limit=2, period_s=60)
    results = {s: [(await limiter.acquire(s)).allowed for _ in range(3)] for s in ("a", "b", "c")}
    assert results == {s: [True, True, False] for s in ("a", "b", "c")}


async def test_limiters_with_other_namespaces_do_not_share_state(make: Make) -> None:
    one = make(limit=1, period_s=60, namespace="rl:one:")
    two = make(limit=1, period_s=60, namespace="rl:two:")
    assert (await one.acquire("s")).allowed and (await two.acquire("s")).allowed
    assert not (await one.acquire("s")).allowed


async def test_cost_greater_than_one(make: Make) -> None:
    limiter = make(limit=10, period_s=60)
    first = await limiter.acquire("s", cost=4)
    second = await limiter.acquire("s", cost=4)
    third = await limiter.acquire("s", cost=4)  # only 2 left: refused, and nothing taken
    fourth = await limiter.acquire("s", cost=2)
    assert (first.allowed, first.remaining) == (True, 6)
    assert (second.allowed, second.remaining) == (True, 2)
    assert (third.allowed, third.remaining) == (False, 2)
    assert 6.0 < third.retry_after_s <= 12.0  # two more units: 2 x 6 s
    assert (fourth.allowed, fourth.remaining) == (True, 0)
    assert (await limiter.acquire("other", cost=10)).allowed


async def test_burst_differs_from_limit(make: Make) -> None:
    # 10 per second: the four calls must fall within one 100 ms emission interval (10 ms was too
    # tight on a loaded machine: the fourth call then found a new token).
    limiter = make(limit=10, period_s=1, burst=3)
    decisions = [await limiter.acquire("s") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[0].limit == 3 and limiter.burst == 3 and limiter.limit == 10
    assert 0 < decisions[3].retry_after_s <= 0.1


@pytest.mark.parametrize("cost", [0, -1, 11, 1.0, True, "1"])
async def test_bad_cost_is_a_value_error(make: Make, cost: object) -> None:
    with pytest.raises(ValueError):
        await make(limit=10, period_s=1).acquire("s", cost=cost)  # type: ignore[arg-type]


@pytest.mark.parametrize("subject", ["", None, 5, "x" * 2000])
async def test_bad_subject_is_a_value_error(make: Make, subject: object) -> None:
    with pytest.raises(ValueError):
        await make(limit=10, period_s=1).acquire(subject)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 0, "period_s": 1},
        {"limit": -1, "period_s": 1},
        {"limit": 1.5, "period_s": 1},
        {"limit": True, "period_s": 1},
        {"limit": 1, "period_s": 0},
        {"limit": 1, "period_s": -1},
        {"limit": 1, "period_s": float("inf")},
        {"limit": 1, "period_s": float("nan")},
        {"limit": 10**7, "period_s": 1},  # over one per microsecond
        {"limit": 1, "period_s": 1, "burst": 0},
        {"limit": 1, "period_s": 1, "burst": 2.5},
        {"limit": 1, "period_s": 10**9, "burst": 10**9},  # beyond exact double arithmetic
        {"limit": 1, "period_s": 1, "fail_open": "yes"},
        {"limit": 1, "period_s": 1, "queue_timeout_s": 0},
        {"limit": 1, "period_s": 1, "namespace": None},
    ],
)
def test_constructor_validates(client: redis.Redis, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RedisRateLimiter(client, **kwargs)


async def test_noscript_after_script_flush_is_recovered(
    own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    # A private server: SCRIPT FLUSH would disturb other users of the shared one.
    client = redis.Redis.from_url(own_redis.url)
    limiter = RedisRateLimiter(client, limit=3, period_s=60)
    try:
        caplog.set_level(logging.INFO, logger="voxcore")
        assert (await limiter.acquire("s")).remaining == 2
        await client.script_flush()
        assert (await limiter.acquire("s")).remaining == 1
        await client.script_flush()
        assert (await limiter.acquire("s")).remaining == 0
        assert not events(caplog, "rate_limit_error")
    finally:
        await limiter.aclose()
        await client.aclose()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_down_answers_by_policy_and_recovers(
    own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture, fail_open: bool
) -> None:
    client = redis.Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    limiter = RedisRateLimiter(
        client,
        limit=5,
        period_s=60,
        fail_open=fail_open,
        breaker=CircuitBreaker(base_window_s=0.1, max_window_s=0.4),
    )
    try:
        assert (await limiter.acquire("s")).allowed
        await asyncio.to_thread(own_redis.stop)
        caplog.set_level(logging.INFO, logger="voxcore")

        loop = asyncio.get_running_loop()
        started = loop.time()
        decisions = [await limiter.acquire("s", cost=2) for _ in range(50)]
        assert loop.time() - started < 5  # the breaker answers, not 50 socket timeouts
        if fail_open:
            expected = RateLimitDecision(True, 3, 0.0, 5, 0.0)
            assert all(d == expected for d in decisions)
        else:
            assert all(not d.allowed and d.remaining == 0 and d.retry_after_s > 0 for d in decisions)
        errors = events(caplog, "rate_limit_error")
        assert len(errors) == 50 and {e["subject"] for e in errors} == {"s"}
        assert all(e["error"] for e in errors)
        assert not events(caplog, "rate_limited")

        await asyncio.to_thread(own_redis.start)  # an empty server: state and scripts are gone

        async def back() -> bool:
            before = len(events(caplog, "rate_limit_error"))
            decision = await limiter.acquire("t")
            return decision.allowed and len(events(caplog, "rate_limit_error")) == before

        assert await wait_until(back)
        assert (await limiter.acquire("t")).remaining == 3
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_closed_limiter_answers_by_policy(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RedisRateLimiter(client, limit=1, period_s=1, fail_open=False)
    await limiter.aclose()
    await limiter.aclose()  # twice is fine
    caplog.set_level(logging.INFO, logger="voxcore")
    decision = await limiter.acquire("s")
    assert not decision.allowed and decision.retry_after_s > 0
    assert [e["error"] for e in events(caplog, "rate_limit_error")] == ["rate limiter is closed"]


async def test_wrong_type_at_key_is_a_soft_failure(
    make: Make, raw_redis: redis.Redis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    await raw_redis.rpush(f"{key_prefix}ratelimit:s", b"x")
    limiter = make(limit=1, period_s=1, fail_open=True)
    caplog.set_level(logging.INFO, logger="voxcore")
    assert (await limiter.acquire("s")).allowed
    assert "WRONGTYPE" in events(caplog, "rate_limit_error")[0]["error"]
    assert (await limiter.acquire("other")).allowed  # the server is up: no fast-fail afterwards
    assert len(events(caplog, "rate_limit_error")) == 1


async def test_pool_bound_queues_callers_and_survives_cancellation(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis_target.config(max_connections=2).build()
    limiter = RedisRateLimiter(client, limit=10, period_s=60, key_prefix=key_prefix)
    caplog.set_level(logging.INFO, logger="voxcore")
    try:
        tasks = [asyncio.ensure_future(limiter.acquire("s")) for _ in range(40)]
        await asyncio.sleep(0)  # all have started: 2 hold a connection, 38 queue
        for task in tasks[10:20]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        decisions = [r for r in results if isinstance(r, RateLimitDecision)]
        assert len(decisions) == 30
        assert sum(d.allowed for d in decisions) == 10  # "too many connections" never happened
        assert not events(caplog, "rate_limit_error")
        assert limiter._slots is not None and limiter._slots.free == 2  # no slot leaked
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_queue_timeout_is_a_soft_failure_not_an_outage(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis_target.config(max_connections=1).build()
    limiter = RedisRateLimiter(
        client, limit=100, period_s=60, key_prefix=key_prefix, fail_open=False, queue_timeout_s=1e-6
    )
    caplog.set_level(logging.INFO, logger="voxcore")
    try:
        decisions = await asyncio.gather(*(limiter.acquire("s") for _ in range(20)))
        assert decisions[0].allowed  # the first caller got the connection
        errors = events(caplog, "rate_limit_error")
        assert errors and all("no free Redis connection" in e["error"] for e in errors)
        assert sum(not d.allowed for d in decisions) == len(errors)
        caplog.clear()
        assert (await limiter.acquire("s")).allowed  # the breaker stayed closed
        assert not events(caplog, "rate_limit_error")
    finally:
        await limiter.aclose()
        await client.aclose()
