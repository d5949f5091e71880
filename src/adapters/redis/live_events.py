"""Live call events in Redis: a capped Stream per session + a pub/sub channel, and an index of calls.

Layout (``P`` is the optional key prefix; ``{h}`` the session's hash tag)::

    P events:{h}:stream     Stream: t=<type> ts=<ms> d=<JSON data>; MAXLEN ~ N; TTL refreshed per write
    P events:{h}:live       pub/sub channel: the event as JSON, id included, published in the same script
    P events:{index}        Stream of call_started/call_ended of every session (MAXLEN ~ N)
    P events:{index}:live   pub/sub channel of the index

Every Redis command of this feature is in :class:`RedisEventStreams`. On a Redis Cluster client the
channels are *sharded* (``SPUBLISH`` in the write script, ``SSUBSCRIBE`` on the hub's connection):
each channel lives on the shard of its stream (same hash tag), so events are not broadcast to every
node of the cluster. :class:`RedisLiveEventPublisher`
queues events in process and writes them in pipelined batches from one task; :class:`RedisEventHub`
holds the process's one pub/sub connection and fans events out to local subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as redis
from redis import exceptions as redis_exc
from redis.asyncio.cluster import RedisCluster

from voxcore.core.domain.keys import EVENTS_INDEX_CHANNEL, EVENTS_INDEX_KEY, events_channel, events_stream_key
from voxcore.core.domain.live_events import (
    INDEX_TYPES,
    LiveEvent,
    check_event_type,
    encode_data,
    event_from_fields,
    event_from_json,
    parse_event_id,
)
from voxcore.core.ports.live_events import (
    LiveEventPublisher,
    LiveEventSource,
    LiveSubscription,
    PublisherStats,
    StreamGap,
    StreamUnavailable,
    SubscriberOverflow,
)
from voxcore.events import emit

log = logging.getLogger("voxcore.live_events")

_UNAVAILABLE: Final = (redis_exc.ConnectionError, redis_exc.TimeoutError, OSError, TimeoutError)

# XADD (capped, approximately: whole macro nodes are trimmed, which is what keeps XADD O(1)), refresh
# the TTL, and PUBLISH the event with the id XADD gave it, atomically: a subscriber never sees an
# event that the stream does not hold, and the order on the channel is the order of the ids.
# KEYS[1] stream; ARGV: type, ts, data JSON, maxlen, ttl seconds (0: none), channel.
_PUBLISH_LUA: Final = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 't', ARGV[1], 'ts', ARGV[2], 'd', ARGV[3])
if ARGV[5] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
redis.call('PUBLISH', ARGV[6],
  '{"id":"' .. id .. '","type":"' .. ARGV[1] .. '","ts":' .. ARGV[2] .. ',"data":' .. ARGV[3] .. '}')
return id
"""
_PUBLISH_SHA: Final = hashlib.sha1(_PUBLISH_LUA.encode()).hexdigest()
# The same for Redis Cluster: a sharded channel (the channel hashes to the slot of KEYS[1]).
_SPUBLISH_LUA: Final = _PUBLISH_LUA.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
_SPUBLISH_SHA: Final = hashlib.sha1(_SPUBLISH_LUA.encode()).hexdigest()
# A sharded subscription spans one connection per node; each is polled this long in turn, which
# bounds what a message waits while another node's connection is being read.
_SHARD_POLL_S: Final = 0.005


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event waiting to be written: the session (``None``: the index), its type, time and data."""

    session_id: str | None
    type: str
    ts: int
    data: Mapping[str, Any]


class RedisEventStreams:
    """Every Redis command of the live events: writes, reads, stream info, the pub/sub connection.

    Args:
        client: Client for writes and ``XRANGE`` (short socket timeout: these never block).
        blocking_client: Client for the pub/sub connection; its ``socket_timeout`` must exceed the
            time one pub/sub read waits (``read_block_s``), or the read fails as a timeout
            (redis-py issue 2807). Closed by whoever created it.
        key_prefix: Prepended to every key and channel.
        maxlen: Approximate cap of each session's stream.
        ttl_seconds: Lifetime of a session's stream after its last event.
        index_maxlen: Approximate cap of the index of calls.
        read_slots: Reads (``XRANGE``/``XINFO``) in flight at once; more wait for a slot. A plain
            connection pool fails at once when exhausted ("Too many connections"), and a hundred SSE
            clients reconnecting together must queue instead. Default: half the client's pool.
    """

    def __init__(
        self,
        client: redis.Redis,
        blocking_client: redis.Redis | None = None,
        *,
        key_prefix: str = "",
        maxlen: int = 10_000,
        ttl_seconds: int = 24 * 3600,
        index_maxlen: int = 10_000,
        read_slots: int | None = None,
    ) -> None:
        if maxlen < 1 or index_maxlen < 1 or ttl_seconds < 0:
            raise ValueError("maxlen and index_maxlen must be >= 1, ttl_seconds >= 0")
        self._client = client
        self._blocking = blocking_client
        sharded = isinstance(client, RedisCluster)
        self._script = _SPUBLISH_LUA if sharded else _PUBLISH_LUA
        self._sha = _SPUBLISH_SHA if sharded else _PUBLISH_SHA
        self._prefix = key_prefix
        self._maxlen = str(maxlen).encode()
        self._index_maxlen = str(index_maxlen).encode()
        self._ttl = str(ttl_seconds).encode()
        if read_slots is None:
            pool_size = getattr(getattr(client, "connection_pool", None), "max_connections", None)
            read_slots = max(pool_size // 2, 1) if isinstance(pool_size, int) and pool_size < 2**31 else 16
        self._read_slots = asyncio.Semaphore(read_slots)

    # -- names ----------------------------------------------------------------------------------

    def stream_key(self, session_id: str | None) -> str:
        """The stream of ``session_id`` (``None``: the index of calls)."""
        return self._prefix + (EVENTS_INDEX_KEY if session_id is None else events_stream_key(session_id))

    def channel(self, session_id: str | None) -> str:
        """The pub/sub channel of ``session_id`` (``None``: the index of calls)."""
        return self._prefix + (EVENTS_INDEX_CHANNEL if session_id is None else events_channel(session_id))

    # -- writes ---------------------------------------------------------------------------------

    async def write(self, events: Sequence[PendingEvent]) -> list[str]:
        """Write ``events`` in one pipeline (one round trip); returns their ids in order.

        Raises:
            redis.exceptions.RedisError, OSError: the write failed (the caller keeps the events).
        """
        encoded = [(e, encode_data(e.data).encode("utf-8")) for e in events]
        results = await self._run_scripts(encoded)
        if any(isinstance(r, redis_exc.NoScriptError) for r in results):
            await self._client.script_load(self._script)  # after a restart or SCRIPT FLUSH
            results = await self._run_scripts(encoded)
        ids: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            ids.append(result.decode() if isinstance(result, bytes) else str(result))
        return ids

    async def _run_scripts(self, encoded: Sequence[tuple[PendingEvent, bytes]]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for event, data in encoded:
                ts = str(event.ts).encode()
                kind = event.type.encode()
                if event.session_id is None:
                    args = (kind, ts, data, self._index_maxlen, b"0", self.channel(None))
                else:
                    args = (kind, ts, data, self._maxlen, self._ttl, self.channel(event.session_id))
                # (execute_command: the cluster pipeline refuses its evalsha() helper)
                pipe.execute_command("EVALSHA", self._sha, 1, self.stream_key(event.session_id), *args)
            return list(await pipe.execute(raise_on_error=False))

    # -- reads ----------------------------------------------------------------------------------

    async def read_after(self, session_id: str | None, after_id: str | None, count: int) -> list[LiveEvent]:
        """``XRANGE key (after_id + COUNT count``: stored events after ``after_id``, oldest first."""
        start = "-" if after_id is None else "(" + after_id
        async with self._read_slots:
            key = self.stream_key(session_id)
            entries: Any = await self._client.xrange(key, min=start, max="+", count=count)
        events: list[LiveEvent] = []
        for raw_id, fields in entries:
            try:
                events.append(
                    event_from_fields(
                        _text(raw_id), _text(fields[b"t"]), int(fields[b"ts"]), _text(fields[b"d"])
                    )
                )
            except (KeyError, ValueError) as exc:  # a foreign or damaged entry: skip, never stop the stream
                emit(log, "live_event_unreadable", logging.WARNING, id=_text(raw_id), error=str(exc))
        return events

    async def stream_info(self, session_id: str | None) -> dict[str, str | None] | None:
        """First id, last generated id and the newest trimmed id of a stream (``None``: no stream)."""
        try:
            async with self._read_slots:
                info: Any = await self._client.xinfo_stream(self.stream_key(session_id))
        except redis_exc.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        first = info.get("first-entry") or info.get(b"first-entry")
        last = info.get("last-generated-id") or info.get(b"last-generated-id")
        deleted = info.get("max-deleted-entry-id") or info.get(b"max-deleted-entry-id")
        return {
            "first": _text(first[0]) if first else None,
            "last": _text(last) if last else None,
            "max_deleted": _text(deleted) if deleted else None,
        }

    # -- pub/sub --------------------------------------------------------------------------------

    def pubsub(self) -> Any:
        """A new pub/sub object on the blocking client (the hub keeps exactly one)."""
        if self._blocking is None:
            raise RuntimeError("RedisEventStreams has no blocking client: reading live events needs one")
        if isinstance(self._blocking, RedisCluster):
            return _ShardedPubSub(self._blocking)
        return self._blocking.pubsub(ignore_subscribe_messages=False)


class _ShardedPubSub:
    """A cluster's sharded pub/sub behind the plain pub/sub calls the hub makes.

    ``subscribe``/``unsubscribe`` are ``SSUBSCRIBE``/``SUNSUBSCRIBE`` (each channel on the node that
    owns its slot), and messages come back with the plain types (``message``, ``subscribe``).
    """

    _TYPES: Final = {"smessage": "message", "ssubscribe": "subscribe", "sunsubscribe": "unsubscribe"}

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._pubsub: Any = cluster.pubsub()

    async def subscribe(self, *channels: str) -> None:
        # SSUBSCRIBE picks each channel's node from the slot map, which the client reads lazily.
        await self._cluster.initialize()
        await self._pubsub.ssubscribe(*channels)

    async def unsubscribe(self, *channels: str) -> None:
        await self._pubsub.sunsubscribe(*channels)

    async def get_message(self, timeout: float = 0.0) -> dict[str, Any] | None:  # noqa: ASYNC109 - redis-py's signature
        deadline = time.monotonic() + timeout
        while True:
            message: dict[str, Any] | None = await self._pubsub.get_sharded_message(
                ignore_subscribe_messages=False, timeout=_SHARD_POLL_S
            )
            if message is not None:
                kind = _text(message.get("type", ""))
                return {**message, "type": self._TYPES.get(kind, kind)}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not self._pubsub.node_pubsub_mapping:  # nothing subscribed: nothing to wait on
                await asyncio.sleep(min(remaining, _SHARD_POLL_S))

    async def aclose(self) -> None:
        await self._pubsub.aclose()


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a future's exception as seen (its waiters may all have timed out)."""
    if not future.cancelled():
        future.exception()


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)


# -- publisher ---------------------------------------------------------------------------------------


class RedisLiveEventPublisher(LiveEventPublisher):
    """Queues events in process and writes them to Redis from one background task.

    :meth:`publish` costs a few microseconds: a type check, a clock read, a deque append. The
    writer takes up to ``batch_size`` queued events at a time and writes them in one pipelined
    round trip, in publication order. While Redis is down the events stay queued (up to
    ``queue_size``) and are written when it is back; past that bound new events are dropped,
    counted (:attr:`stats`) and logged (``live_events_dropped``, at most once per second).

    Args:
        streams: The Redis commands.
        queue_size: Events held in process at most.
        batch_size: Events per pipelined write.
        drain_timeout_s: How long :meth:`aclose` waits for the queue to be written.
        retry_delays_s: Backoff between failed writes (the last value repeats).
        wall_clock_ms: Milliseconds since the epoch (the events' ``ts``).
    """

    def __init__(
        self,
        streams: RedisEventStreams,
        *,
        queue_size: int = 10_000,
        batch_size: int = 256,
        drain_timeout_s: float = 2.0,
        retry_delays_s: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0),
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        if queue_size < 1 or batch_size < 1 or drain_timeout_s < 0 or not retry_delays_s:
            raise ValueError("need queue_size >= 1, batch_size >= 1, drain_timeout_s >= 0 and retry delays")
        self._streams = streams
        self._queue: deque[PendingEvent] = deque()
        self._queue_size = queue_size
        self._batch = batch_size
        self._drain_timeout = drain_timeout_s
        self._delays = retry_delays_s
        self._now_ms = wall_clock_ms
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._published = 0
        self._dropped = 0
        self._failed = 0
        self._failing = False
        self._last_drop_log = 0.0
        self._drops_unlogged = 0

    @property
    def streams(self) -> RedisEventStreams:
        """The Redis commands this publisher writes with."""
        return self._streams

    @property
    def stats(self) -> PublisherStats:
        """Counters since the publisher was made."""
        return PublisherStats(self._published, self._dropped, self._failed, len(self._queue))

    def publish(self, session_id: str, event_type: str, data: Mapping[str, Any]) -> bool:
        """Queue one event (``call_started``/``call_ended`` also go to the index); never blocks.

        Raises:
            ValueError: an unknown event type or an empty session id.
        """
        check_event_type(event_type)
        if not session_id:
            raise ValueError("session_id must not be empty")
        ts = self._now_ms()
        ok = self._enqueue(PendingEvent(session_id, event_type, ts, data))
        if event_type in INDEX_TYPES:
            self._enqueue(PendingEvent(None, event_type, ts, {"session_id": session_id, **data}))
        return ok

    def _enqueue(self, event: PendingEvent) -> bool:
        if self._closed or len(self._queue) >= self._queue_size:
            self._drop(event, "closed" if self._closed else "queue_full")
            return False
        self._queue.append(event)
        if not self._wake.is_set():
            self._wake.set()
            self._idle.clear()
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run(), name="live-events-writer")
        return True

    def _drop(self, event: PendingEvent, reason: str) -> None:
        self._dropped += 1
        self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 1.0:
            emit(
                log,
                "live_events_dropped",
                logging.WARNING,
                reason=reason,
                dropped=self._drops_unlogged,
                dropped_total=self._dropped,
                type=event.type,
            )
            self._last_drop_log = now
            self._drops_unlogged = 0

    async def flush(self, within_s: float | None = None) -> bool:
        """Wait until the queue is written (``False``: ``within_s`` passed first)."""
        try:
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Write what is queued (up to ``drain_timeout_s``), stop the writer; later events are dropped."""
        if self._closed:
            return
        self._closed = True
        drained = await self.flush(self._drain_timeout)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not drained and self._queue:
            emit(
                log,
                "live_events_lost",
                logging.ERROR,
                events=len(self._queue),
                reason="Redis unavailable at close",
            )
        self._queue.clear()
        if self._published or self._dropped:
            emit(log, "live_events_closed", published=self._published, dropped=self._dropped)

    async def _run(self) -> None:
        attempt = 0
        while True:
            await self._wake.wait()
            while self._queue:
                batch = [self._queue[i] for i in range(min(self._batch, len(self._queue)))]
                try:
                    await self._streams.write(batch)
                except Exception as exc:  # keep the batch, back off, retry: Redis may come back
                    self._failed += 1
                    if not self._failing:
                        self._failing = True
                        emit(
                            log,
                            "live_events_write_failed",
                            logging.WARNING,
                            error=f"{type(exc).__name__}: {exc}",
                            queued=len(self._queue),
                        )
                    await asyncio.sleep(self._delays[min(attempt, len(self._delays) - 1)])
                    attempt += 1
                    continue
                for _ in batch:
                    self._queue.popleft()
                self._published += len(batch)
                if self._failing:
                    self._failing = False
                    emit(log, "live_events_write_recovered", attempts=attempt, queued=len(self._queue))
                attempt = 0
            self._wake.clear()
            self._idle.set()


# -- the hub: one pub/sub connection per process -----------------------------------------------------

_CLOSED: Final = object()


class _Subscription(LiveSubscription):
    """One local subscriber of a channel: a bounded queue filled by the hub's reader."""

    def __init__(self, channel: str, queue_size: int) -> None:
        self.channel = channel
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)
        self.failure: BaseException | None = None

    def push(self, item: LiveEvent | StreamGap) -> None:
        if self.failure is not None:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.fail(SubscriberOverflow(f"more than {self._queue.maxsize} live events waiting"))

    def fail(self, error: BaseException) -> None:
        if self.failure is None:
            self.failure = error
            # Wake a reader waiting on an empty queue. Queued events are never removed: the reader
            # stops at the failure, so what it delivered is a gap-free prefix it can resume after.
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(_CLOSED)

    async def __aiter__(self) -> AsyncIterator[LiveEvent | StreamGap]:
        while True:
            if self.failure is not None:
                raise self.failure
            item = await self._queue.get()
            # A reader woken before a burst overflowed the queue must not take one more event
            # from behind the failure: that would deliver events after a hole.
            if self.failure is not None:
                raise self.failure
            yield item


class RedisEventHub(LiveEventSource):
    """The process's reader of live events: one pub/sub connection shared by every local subscriber.

    Channels are subscribed while at least one local subscriber wants them. One reader task takes
    every message off the connection, parses it once and puts it in each subscriber's bounded
    queue (a subscriber that falls behind is cut with :class:`SubscriberOverflow`; the others are
    not affected). When the connection drops, the hub reconnects within ``reconnect_grace_s`` and
    tells every subscriber to replay (:class:`StreamGap`); when Redis stays away, subscribers get
    :class:`StreamUnavailable` (with ``retry_ms``) and new subscriptions fail until it is back.

    Args:
        streams: The Redis commands.
        read_block_s: Longest single wait for a pub/sub message (below the blocking client's
            ``socket_timeout``).
        reconnect_grace_s: How long a dropped connection is retried before subscribers are told.
        retry_ms: Reconnection delay suggested to clients while Redis is unavailable.
    """

    def __init__(
        self,
        streams: RedisEventStreams,
        *,
        read_block_s: float = 5.0,
        reconnect_grace_s: float = 1.0,
        retry_ms: int = 1000,
    ) -> None:
        self._streams = streams
        self._block = read_block_s
        self._grace = reconnect_grace_s
        self._retry_ms = retry_ms
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._subs: dict[str, set[_Subscription]] = {}
        # A channel is live for its subscribers once Redis has confirmed every SUBSCRIBE sent for it.
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._unconfirmed: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._closed = False
        self.received = 0

    @property
    def subscribers(self) -> int:
        """Local subscribers right now."""
        return sum(len(s) for s in self._subs.values())

    # -- LiveEventSource --------------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(self, session_id: str | None, *, queue_size: int) -> AsyncIterator[LiveSubscription]:
        """Subscribe to a session's channel (``None``: the index); active once entered.

        Raises:
            StreamUnavailable: Redis cannot be reached.
        """
        channel = self._streams.channel(session_id)
        sub = _Subscription(channel, queue_size)
        await self._add(sub)
        try:
            yield sub
        finally:
            await self._remove(sub)

    async def read_after(
        self, session_id: str | None, after_id: str | None, count: int
    ) -> Sequence[LiveEvent]:
        """Stored events after ``after_id`` (``XRANGE``).

        Raises:
            StreamUnavailable: Redis cannot be reached.
        """
        try:
            return await self._streams.read_after(session_id, after_id, count)
        except (redis_exc.RedisError, OSError, TimeoutError) as exc:
            raise StreamUnavailable(f"event stream unreadable: {exc}", retry_ms=self._retry_ms) from exc

    async def trimmed_after(self, session_id: str | None, after_id: str) -> str | None:
        """The oldest stored id when events after ``after_id`` are gone, else ``None``.

        Gone means: the stream's ``max-deleted-entry-id`` is newer than ``after_id``, or
        ``after_id`` is older than the first stored entry (so it was trimmed itself), or newer than
        anything the stream ever generated (a store that lost its data), or the stream is gone.

        Raises:
            StreamUnavailable: Redis cannot be reached.
        """
        position = parse_event_id(after_id)
        try:
            info = await self._streams.stream_info(session_id)
        except (redis_exc.RedisError, OSError, TimeoutError) as exc:
            raise StreamUnavailable(f"event stream unreadable: {exc}", retry_ms=self._retry_ms) from exc
        if info is None:
            return "0-0"  # expired (or never written): nothing after after_id is stored
        oldest = info["first"] or "0-0"
        last = info["last"]
        if last is not None and position > parse_event_id(last):
            return oldest
        deleted = info["max_deleted"]
        if deleted is not None and deleted != "0-0" and parse_event_id(deleted) > position:
            return oldest  # XDEL'd (or trimmed, where the server records it) after the client's id
        # Trimming does not always move max-deleted-entry-id: an id older than the first entry was
        # itself trimmed, and so may be what followed it.
        first = info["first"]
        if first is not None and parse_event_id(first) > position:
            return oldest
        return None

    # -- connection -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pub/sub connection now (otherwise the first subscriber opens it)."""
        async with self._lock:
            await self._ensure_connected()

    async def aclose(self) -> None:
        """Stop the reader, close the connection; subscribers get :class:`StreamUnavailable`."""
        self._closed = True
        async with self._lock:
            await self._disconnect(StreamUnavailable("the event hub is closed", retry_ms=self._retry_ms))

    async def _ensure_connected(self) -> None:
        """Under the lock: make sure a connection and its reader are up, every wanted channel subscribed.

        A connection found broken is replaced, and every existing subscriber is told to replay
        (:class:`StreamGap`): what was published while it was down never reached this process.
        """
        if self._closed:
            raise StreamUnavailable("the event hub is closed", retry_ms=self._retry_ms)
        if self._pubsub is not None and self._reader is not None and not self._reader.done():
            return
        replaced = self._pubsub is not None
        await self._drop_connection()
        # Confirmations still owed by the old connection will never come; the new one owes one per channel.
        self._unconfirmed = dict.fromkeys(self._subs, 1)
        pubsub = self._streams.pubsub()
        try:
            # The hub's own channel (nobody publishes on it) keeps the connection subscribed even
            # when no client is; the channels local subscribers want come back with it.
            await pubsub.subscribe(self._streams.channel(None) + ":hub", *self._subs)
        except (redis_exc.RedisError, OSError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise StreamUnavailable(f"live events unavailable: {exc}", retry_ms=self._retry_ms) from exc
        self._pubsub = pubsub
        self._reader = asyncio.get_running_loop().create_task(self._read(pubsub), name="live-events-hub")
        if replaced or self._subs:
            for subs in self._subs.values():
                for sub in subs:
                    sub.push(StreamGap())
            emit(log, "live_events_hub_recovered", channels=len(self._subs))
        else:
            emit(log, "live_events_hub_connected")

    async def _add(self, sub: _Subscription) -> None:
        channel = sub.channel
        async with self._lock:
            await self._ensure_connected()
            subs = self._subs.setdefault(channel, set())
            subs.add(sub)
            if len(subs) == 1:  # the first local subscriber: subscribe in Redis
                ready = asyncio.get_running_loop().create_future()
                ready.add_done_callback(_retrieve)
                self._ready[channel] = ready
                self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
                try:
                    await self._pubsub.subscribe(channel)
                except (redis_exc.RedisError, OSError, TimeoutError) as exc:
                    self._forget(sub)
                    message = f"live events unavailable: {exc}"
                    raise StreamUnavailable(message, retry_ms=self._retry_ms) from exc
            ready = self._ready[channel]
        try:
            # Every subscriber of the channel, not only the first, waits for Redis to confirm:
            # a replay started before that could miss what is published in between.
            async with asyncio.timeout(self._grace + self._block):
                await asyncio.shield(ready)
        except BaseException:
            await self._remove(sub)
            raise

    def _forget(self, sub: _Subscription) -> bool:
        """Drop a local subscriber; True when it was the channel's last one."""
        subs = self._subs.get(sub.channel)
        if subs is None or sub not in subs:
            return False
        subs.discard(sub)
        if subs:
            return False
        del self._subs[sub.channel]
        ready = self._ready.pop(sub.channel, None)
        if ready is not None and not ready.done():
            ready.cancel()
        return True

    async def _remove(self, sub: _Subscription) -> None:
        async with self._lock:
            if not self._forget(sub):
                return
            if self._pubsub is not None:
                with contextlib.suppress(redis_exc.RedisError, OSError, TimeoutError):
                    await self._pubsub.unsubscribe(sub.channel)

    async def _read(self, pubsub: Any) -> None:
        while True:
            try:
                message = await pubsub.get_message(timeout=self._block)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                emit(
                    log, "live_events_hub_disconnected", logging.WARNING, error=f"{type(exc).__name__}: {exc}"
                )
                # Recover in a separate task: it replaces this reader (which must not cancel itself).
                asyncio.get_running_loop().create_task(self._recover(pubsub), name="live-events-hub-recover")
                return
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = _text(message.get("channel", b""))
        if kind == "message":
            subs = self._subs.get(channel)
            if not subs:
                return
            try:
                event = event_from_json(_text(message["data"]))
            except (ValueError, KeyError) as exc:
                emit(log, "live_event_unreadable", logging.WARNING, channel=channel, error=str(exc))
                return
            self.received += 1
            for sub in tuple(subs):
                sub.push(event)
        elif kind == "subscribe":
            left = self._unconfirmed.get(channel, 0) - 1
            if left > 0:
                self._unconfirmed[channel] = left
                return
            self._unconfirmed.pop(channel, None)
            ready = self._ready.get(channel)
            if ready is not None and not ready.done() and channel in self._subs:
                ready.set_result(None)

    async def _recover(self, broken: Any) -> None:
        async with self._lock:
            if self._pubsub is not broken:
                return  # another task has reconnected already
            deadline = time.monotonic() + self._grace
            delay = 0.05
            while True:
                try:
                    await self._ensure_connected()
                    return
                except StreamUnavailable as exc:
                    if self._closed or time.monotonic() + delay > deadline:
                        await self._disconnect(exc)
                        return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _drop_connection(self) -> None:
        pubsub, reader = self._pubsub, self._reader
        self._pubsub, self._reader = None, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _disconnect(self, error: StreamUnavailable) -> None:
        await self._drop_connection()
        for subs in self._subs.values():
            for sub in subs:
                sub.fail(error)
        self._subs.clear()
        for ready in self._ready.values():
            if not ready.done():
                ready.set_exception(error)
        self._ready.clear()
        self._unconfirmed.clear()
