"""The SSE endpoint over real HTTP (``voxcore serve`` under uvicorn) and a real Redis.

Exact resume under random disconnects, ``reset`` for trimmed ids, 100 concurrent clients, a slow
client cut without hurting the others, a Redis restart mid-stream, and token isolation.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import RedisTarget
from tests.live_support import SECRET, ServeProcess, SSEEvent, sse_stream
from voxcore.adapters.redis.config import RedisConfig
from voxcore.adapters.redis.live_events import RedisEventStreams, RedisLiveEventPublisher
from voxcore.core.domain.keys import events_stream_key
from voxcore.core.domain.live_events import operator_token, session_token
from voxcore.entrypoints.embedded_redis import EmbeddedRedis, redis_server_available

pytestmark = pytest.mark.skipif(not redis_server_available(), reason="needs redis-server")


@pytest.fixture
async def publisher(raw_redis: redis.Redis, key_prefix: str) -> AsyncIterator[RedisLiveEventPublisher]:
    pub = RedisLiveEventPublisher(RedisEventStreams(raw_redis, key_prefix=key_prefix), queue_size=50_000)
    try:
        yield pub
    finally:
        await pub.aclose()


def redis_env(target: RedisTarget) -> dict[str, str]:
    """The server's Redis settings for a cluster or Sentinel target (a URL is enough for one server)."""
    return {} if target.mode == "standalone" else target.env()


async def stored_ids(client: redis.Redis, key: str) -> list[str]:
    return [raw_id.decode() for raw_id, _ in await client.xrange(key)]


def url(server: ServeProcess, session_id: str, token: str | None = None, **query: str) -> str:
    params = ({"token": token} if token else {}) | query
    return f"{server.base_url}/calls/{session_id}/events" + (
        "?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else ""
    )


async def read_events(
    client: httpx.AsyncClient, address: str, *, want: int, headers: dict[str, str] | None = None
) -> list[SSEEvent]:
    """Read until ``want`` stored events arrived (control blocks are skipped)."""
    got: list[SSEEvent] = []
    async with contextlib.aclosing(sse_stream(client, address, headers=headers)) as stream:
        async for item in stream:
            if isinstance(item, httpx.Response):
                assert item.status_code == 200, item.status_code
                continue
            if item.id:
                got.append(item)
                if len(got) >= want:
                    break
    return got


@pytest.mark.all_redis_modes  # also on a Redis Cluster and a Sentinel set (make test-cluster)
async def test_exact_resume_1000_events_random_disconnects(
    redis_target, key_prefix: str, raw_redis: redis.Redis, publisher: RedisLiveEventPublisher
) -> None:
    session = "call-resume"
    rng = random.Random(11)
    with ServeProcess(redis_target.url, key_prefix, env=redis_env(redis_target)) as server:
        received: list[SSEEvent] = []
        reconnects = 0

        async def produce() -> None:
            for i in range(1000):
                publisher.publish(session, "user_text", {"turn": i, "text": f"реплика {i}"})
                if i % 40 == 0:
                    await asyncio.sleep(rng.uniform(0, 0.02))
            assert await publisher.flush(10)

        async def consume() -> None:
            nonlocal reconnects
            last: str | None = None
            async with httpx.AsyncClient(timeout=30) as client:
                while len(received) < 1000:
                    budget = rng.randint(1, 150)  # disconnect after this many events
                    headers = {"Last-Event-ID": last} if last else {}
                    address = url(server, session, session_token(SECRET, session))
                    async with contextlib.aclosing(sse_stream(client, address, headers=headers)) as stream:
                        async for item in stream:
                            if isinstance(item, httpx.Response):
                                assert item.status_code == 200
                                continue
                            assert item.event != "reset"
                            if item.id:
                                received.append(item)
                                last = item.id
                                budget -= 1
                                if budget == 0 or len(received) >= 1000:
                                    break
                    reconnects += 1

        await asyncio.wait_for(asyncio.gather(produce(), consume()), 90)
        ids = [e.id for e in received]
        assert ids == await stored_ids(raw_redis, key_prefix + events_stream_key(session))
        assert len(set(ids)) == 1000  # 0 duplicated
        assert [e.json()["data"]["turn"] for e in received] == list(range(1000))  # 0 lost, order kept
        assert reconnects >= 10


@pytest.mark.all_redis_modes  # also on a Redis Cluster and a Sentinel set (make test-cluster)
async def test_query_last_event_id_resumes_and_trimmed_id_gets_reset(
    redis_target, key_prefix: str, raw_redis: redis.Redis
) -> None:
    session = "call-trim"
    publisher = RedisLiveEventPublisher(RedisEventStreams(raw_redis, key_prefix=key_prefix, maxlen=100))
    with ServeProcess(redis_target.url, key_prefix, env=redis_env(redis_target)) as server:
        publisher.publish(session, "user_text", {"turn": 0})
        await publisher.flush(5)
        first = (await stored_ids(raw_redis, key_prefix + events_stream_key(session)))[0]
        for i in range(1, 2000):
            publisher.publish(session, "user_text", {"turn": i})
        assert await publisher.flush(10)
        stored = await stored_ids(raw_redis, key_prefix + events_stream_key(session))
        assert first not in stored and len(stored) < 500  # trimmed (MAXLEN ~ 100)
        token = session_token(SECRET, session)
        async with httpx.AsyncClient(timeout=10) as client:
            # A stored id in ?last_event_id= resumes right after it.
            got = await read_events(client, url(server, session, token, last_event_id=stored[10]), want=5)
            assert [e.id for e in got] == stored[11:16]
            # A trimmed id: reset (oldest id, and an empty id that clears the client's), then the oldest on.
            blocks: list[SSEEvent] = []
            async with contextlib.aclosing(
                sse_stream(client, url(server, session, token), headers={"Last-Event-ID": first})
            ) as stream:
                async for item in stream:
                    if isinstance(item, SSEEvent) and item.event:
                        blocks.append(item)
                        if len(blocks) == 4:
                            break
        assert blocks[0].event == "reset"
        assert blocks[0].id == ""
        assert blocks[0].json() == {"oldest_id": stored[0], "last_event_id": first}
        assert [b.id for b in blocks[1:]] == stored[:3]
        # A malformed id is a client error, not a silent restart.
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(url(server, session, token, last_event_id="yesterday"))
        assert response.status_code == 400
    await publisher.aclose()


async def test_100_concurrent_clients_get_every_event_in_order(
    redis_target, key_prefix: str, raw_redis: redis.Redis, publisher: RedisLiveEventPublisher
) -> None:
    sessions = [f"call-{n}" for n in range(4)]
    # A small Redis pool: a hundred clients replaying at once must queue for it, not fail.
    with ServeProcess(redis_target.url, key_prefix, env={"VOXCORE_REDIS__MAX_CONNECTIONS": "4"}) as server:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            readers = [
                asyncio.create_task(
                    read_events(client, url(server, sessions[n % 4], operator_token(SECRET)), want=60)
                )
                for n in range(100)
            ]
            await asyncio.sleep(0.5)
            # One pub/sub connection for the whole server process, not one per client.
            pubsub_clients = [
                c for c in await raw_redis.client_list(_type="pubsub") if c["name"] == "voxcore-events"
            ]
            assert len(pubsub_clients) == 1
            for i in range(60):
                for session in sessions:
                    publisher.publish(session, "answer_text", {"turn": i, "text": "ок"})
                await asyncio.sleep(0.005)
            results = await asyncio.wait_for(asyncio.gather(*readers), 60)
        warnings = [line for line in server.lines if '"warning"' in line or '"error"' in line]
    for n, events in enumerate(results):
        expected = await stored_ids(raw_redis, key_prefix + events_stream_key(sessions[n % 4]))
        assert [e.id for e in events] == expected, warnings[:5]
        assert [e.json()["data"]["turn"] for e in events] == list(range(60))


async def test_slow_client_is_cut_without_affecting_others(
    redis_target, key_prefix: str, raw_redis: redis.Redis, publisher: RedisLiveEventPublisher
) -> None:
    session = "call-slow"
    env = {"VOXCORE_EVENTS__SEND_TIMEOUT_S": "2"}
    with ServeProcess(redis_target.url, key_prefix, env=env) as server:
        slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", server.port))
        request = f"GET /calls/{session}/events?token={session_token(SECRET, session)} HTTP/1.1\r\n"
        slow.sendall((request + f"Host: 127.0.0.1:{server.port}\r\n\r\n").encode())
        try:
            await asyncio.sleep(0.5)  # the slow client is subscribed; it never reads
            total = 4000
            async with httpx.AsyncClient(timeout=60) as client:
                reader = asyncio.create_task(
                    read_events(client, url(server, session, session_token(SECRET, session)), want=total)
                )
                text = "х" * 1500
                for i in range(total):
                    publisher.publish(session, "answer_text", {"turn": i, "text": text})
                    if i % 200 == 0:
                        await asyncio.sleep(0.01)
                fast = await asyncio.wait_for(reader, 60)
            assert [e.json()["data"]["turn"] for e in fast] == list(range(total))
            for _ in range(100):
                if server.events("sse_client_cut"):
                    break
                await asyncio.sleep(0.1)
            cuts = server.events("sse_client_cut")
            assert cuts and cuts[0]["reason"] in {"slow_client", "send_timeout"}
            # The server closed the slow connection: reading it to the end terminates.
            slow.settimeout(10)
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := await asyncio.to_thread(slow.recv, 1 << 20):
                    received += chunk
            assert received.startswith(b"HTTP/1.1 200")
        finally:
            slow.close()


@pytest.mark.redis_restart
async def test_redis_restart_mid_stream_retry_hint_and_lossless_resume(
    tmp_path: Path, key_prefix: str
) -> None:
    session = "call-outage"
    server_redis = EmbeddedRedis(data_dir=tmp_path / "redis").start()  # persists across the restart
    client = RedisConfig(url=server_redis.url, retries=0, socket_timeout=1.0).build()
    publisher = RedisLiveEventPublisher(RedisEventStreams(client, key_prefix=key_prefix), queue_size=10_000)
    try:
        with ServeProcess(server_redis.url, key_prefix) as server:
            received: list[SSEEvent] = []
            retry_hints: list[int] = []
            unavailable = 0
            done = asyncio.Event()

            async def consume() -> None:
                nonlocal unavailable
                last: str | None = None
                retry_ms = 3000
                async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=2)) as http:
                    while len(received) < 300:
                        headers = {"Last-Event-ID": last} if last else {}
                        address = url(server, session, session_token(SECRET, session))
                        try:
                            async with contextlib.aclosing(
                                sse_stream(http, address, headers=headers)
                            ) as stream:
                                async for item in stream:
                                    if isinstance(item, httpx.Response):
                                        assert item.status_code == 200
                                        continue
                                    if item.retry is not None:
                                        retry_ms = item.retry
                                        retry_hints.append(item.retry)
                                    if item.event == "unavailable":
                                        unavailable += 1
                                    if item.id:
                                        received.append(item)
                                        last = item.id
                                        if len(received) >= 300:
                                            break
                        except httpx.TransportError:
                            pass
                        await asyncio.sleep(retry_ms / 1000)  # what EventSource does between attempts
                done.set()

            consumer = asyncio.create_task(consume())
            for i in range(100):
                publisher.publish(session, "user_text", {"turn": i})
            assert await publisher.flush(5)
            while len(received) < 100:  # noqa: ASYNC110 (the consumer's progress, polled)
                await asyncio.sleep(0.05)
            await asyncio.to_thread(server_redis.stop)  # SIGTERM: an RDB snapshot is written
            for i in range(100, 200):
                publisher.publish(session, "user_text", {"turn": i})  # queued in process meanwhile
            await asyncio.sleep(3)
            assert unavailable >= 1  # clients were told, with a retry: hint
            await asyncio.to_thread(server_redis.start)
            for i in range(200, 300):
                publisher.publish(session, "user_text", {"turn": i})
            assert await publisher.flush(15)
            await asyncio.wait_for(done.wait(), 30)
            await consumer
            assert retry_hints and all(h == 1000 for h in retry_hints)
            assert [e.json()["data"]["turn"] for e in received] == list(range(300))
            assert [e.id for e in received] == await stored_ids(
                client, key_prefix + events_stream_key(session)
            )
    finally:
        await publisher.aclose()
        await client.aclose()
        server_redis.close()


@pytest.mark.all_redis_modes  # also on a Redis Cluster and a Sentinel set (make test-cluster)
async def test_tokens_isolate_sessions(
    redis_target, key_prefix: str, raw_redis: redis.Redis, publisher: RedisLiveEventPublisher
) -> None:
    publisher.publish("call-A", "user_text", {"turn": 1, "text": "A"})
    publisher.publish("call-B", "user_text", {"turn": 1, "text": "B"})
    assert await publisher.flush(5)
    token_a = session_token(SECRET, "call-A")
    with ServeProcess(redis_target.url, key_prefix, env=redis_env(redis_target)) as server:
        async with httpx.AsyncClient(timeout=10) as client:
            for address, headers in (
                (url(server, "call-B", token_a), {}),
                (url(server, "call-B"), {"Authorization": f"Bearer {token_a}"}),
                (url(server, "call-B"), {}),
                (url(server, "call-B", "not-a-token"), {}),
                (url(server, "call-B", "токен"), {}),
                (f"{server.base_url}/index/events?token={token_a}", {}),
            ):
                response = await client.get(address, headers=headers)
                assert response.status_code == 403, address
                assert "B" not in response.text and "user_text" not in response.text
            own = await read_events(client, url(server, "call-A", token_a), want=1)
            assert [e.json()["data"]["text"] for e in own] == ["A"]
            bearer = await read_events(
                client, url(server, "call-A"), want=1, headers={"Authorization": f"Bearer {token_a}"}
            )
            assert bearer[0].id == own[0].id
            operator = await read_events(client, url(server, "call-B", operator_token(SECRET)), want=1)
            assert operator[0].json()["data"]["text"] == "B"
            publisher.publish("call-A", "call_started", {"resumed": False})
            assert await publisher.flush(5)
            index_url = f"{server.base_url}/index/events?token={operator_token(SECRET)}"
            index = await read_events(client, index_url, want=1)
            assert index[0].event == "call_started" and index[0].json()["data"]["session_id"] == "call-A"


async def test_heartbeats_keep_an_idle_stream_alive(redis_target, key_prefix: str) -> None:
    with ServeProcess(redis_target.url, key_prefix, env={"VOXCORE_EVENTS__HEARTBEAT_S": "0.3"}) as server:
        comments: list[str] = []
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream(
                "GET", url(server, "call-idle", session_token(SECRET, "call-idle"))
            ) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                async for line in resp.aiter_lines():
                    if line.startswith(":"):
                        comments.append(line)
                        if len(comments) >= 3:
                            break
        assert comments[0] == ": voxcore live events" and all("ping" in c for c in comments[1:])
