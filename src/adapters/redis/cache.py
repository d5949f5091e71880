"""``RedisCacheManager``: the SPEC-A cache on Redis Lists/Strings, fail-soft and fast to fail.

Storage layout (``P`` is the optional key prefix for a shared Redis):

* ``P<key>`` - the fragment: a Redis List of byte chunks (``static:*``, ``tts:*``), or a String
  (``summary:session:*``).
* ``P voxcore:meta:{P<key>}`` - a Hash with the fragment's audio format and size, written in the
  same MULTI/EXEC as the list (deleted when the format is unknown, so it never describes other data).
* ``P voxcore:prev:{P<key>}`` - the previous version of an overwritten list, kept for a short grace
  period so that a streaming reader that started on it can finish on it.

The braces are a Redis Cluster hash tag: the three keys of a fragment hash to one slot, so the
MULTI/EXEC writes and the Lua read work in a cluster (see ``keyspace``; a key that has its own tag
keeps it). Format hashes written before this layout (``P voxcore:meta:<key>``) are still read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from redis import exceptions as redis_exc

from voxcore.adapters.redis.config import RedisClient, RedisConfig, SlotMapGate
from voxcore.adapters.redis.keyspace import Keyspace
from voxcore.core.domain import keys
from voxcore.core.domain.audio import MAX_CHUNKS, AudioFormat, WavAudio, parse_wav, plan_chunks, split_pcm
from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.ports.cache import AbstractAudioCache, AudioChunkStream, AudioLoadResult
from voxcore.events import emit

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Largest WAV file ``load_and_set_audio`` reads (MAX_CHUNKS of 20 ms stereo 48 kHz 32-bit is ~150 MB).
MAX_WAV_BYTES: Final = 256 * 1024 * 1024
# Failures that mean "Redis cannot be reached": they open the circuit breaker. Other RedisErrors
# (WRONGTYPE, NOSCRIPT, ...) are answers from a live server and leave it closed.
# In a cluster, a slot without a reachable primary (CLUSTERDOWN, a slot not covered while a replica
# is promoted) is an outage of that shard too.
_CONNECTION_ERRORS: Final = (
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    OSError,
    TimeoutError,
    redis_exc.ClusterDownError,
    redis_exc.SlotNotCoveredError,
)
_AUDIO_TYPES: Final = (bytes, bytearray, memoryview)
_EXACT_AUDIO_TYPES: Final = frozenset(_AUDIO_TYPES)
# The rest of a streamed list, atomically, from whichever version starts with the chunks already
# yielded (ARGV): the current list (KEYS[1]) or the one it replaced (KEYS[2]).
_READ_REST_LUA: Final = """
local n = #ARGV
local function starts_with_head(key)
  local head = redis.call('LRANGE', key, 0, n - 1)
  if #head ~= n then return false end
  for i = 1, n do
    if head[i] ~= ARGV[i] then return false end
  end
  return true
end
if starts_with_head(KEYS[1]) then return {1, redis.call('LRANGE', KEYS[1], n, -1)} end
if starts_with_head(KEYS[2]) then return {2, redis.call('LRANGE', KEYS[2], n, -1)} end
return {0, {}}
"""
_READ_REST_SHA: Final = hashlib.sha1(_READ_REST_LUA.encode()).hexdigest()
# The write transaction of a fragment as one script, for Redis Cluster: redis-py's asyncio cluster
# pipeline runs every queued command of a MULTI in a thread with an event loop of its own (and
# re-reads the slot map from there after a failover), so in cluster mode the three keys of a
# fragment (one hash slot) are written by this script instead - atomic in the same way.
# KEYS: fragment, meta, prev. ARGV: prev grace (ms), TTL (ms, '' for none), the number N of meta
# hash arguments, N field/value arguments, then the chunks (RPUSHed in slices: Lua's unpack() has a
# stack limit of a few thousand values).
_WRITE_LUA: Final = """
redis.pcall('RENAME', KEYS[1], KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1], KEYS[2])
local nmeta = tonumber(ARGV[3])
local first, last = 4 + nmeta, #ARGV
if last < first then return 0 end
for i = first, last, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, last)))
end
if nmeta > 0 then redis.call('HSET', KEYS[2], unpack(ARGV, 4, 3 + nmeta)) end
if ARGV[2] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if nmeta > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
end
return last - first + 1
"""
_WRITE_SHA: Final = hashlib.sha1(_WRITE_LUA.encode()).hexdigest()


class _Failed:
    """Marker for a call that failed softly (its error is already logged)."""

    __slots__ = ()


FAILED: Final = _Failed()


class RedisCacheManager(AbstractAudioCache):
    """The project's cache on Redis (SPEC-A/SPEC-C), one instance per process.

    One instance per process is guaranteed by the container (``providers.Singleton``), not by
    ``__new__``: tests and tools may still build separate instances for separate servers.

    Every operation is soft: a Redis failure logs one ``redis_error`` event ``{op, key, error}``
    and returns ``False``/``None``. After a connection-level failure a circuit breaker answers
    further calls at once (no socket timeout per call) while one background PING per window finds
    out whether Redis is back, so the cache recovers by itself.

    Args:
        config: Where Redis is and how the client behaves.
        key_prefix: Prepended to every key (for a Redis shared with other applications).
        tts_ttl_seconds: Expiry of ``tts:*`` fragments; ``static:*`` never expire.
        stream_first_batch: Chunks fetched by the first command of a streaming read.
        prev_grace_seconds: How long an overwritten fragment stays readable for open streams.
        breaker: Fast-fail policy; a default one is made when omitted.
        clock: Monotonic seconds (injectable for tests).

    Raises:
        ValueError: an argument is out of range, or ``key_prefix`` has braces that form no
            cluster hash tag.
    """

    def __init__(
        self,
        config: RedisConfig,
        *,
        key_prefix: str = "",
        tts_ttl_seconds: int = 7 * 24 * 3600,
        stream_first_batch: int = 4,
        prev_grace_seconds: int = 30,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tts_ttl_seconds <= 0:
            raise ValueError(f"tts_ttl_seconds must be positive, got {tts_ttl_seconds}")
        if stream_first_batch < 1:
            raise ValueError(f"stream_first_batch must be at least 1, got {stream_first_batch}")
        if prev_grace_seconds <= 0:
            raise ValueError(f"prev_grace_seconds must be positive, got {prev_grace_seconds}")
        self._config = config
        self._prefix = key_prefix
        self._keys = Keyspace(key_prefix, cluster=config.mode == "cluster")
        self._tts_ttl_ms = tts_ttl_seconds * 1000
        self._first_batch = stream_first_batch
        self._prev_grace_ms = prev_grace_seconds * 1000
        self._breaker = breaker or CircuitBreaker()
        self._clock = clock
        self._redis: RedisClient | None = None
        self._gate = SlotMapGate(None)
        self._tasks: set[asyncio.Task[Any]] = set()
        # Bounds in-flight commands to the pool size: a caller beyond it waits (up to
        # pool_timeout) instead of the pool raising "too many connections".
        self._slots = asyncio.Semaphore(config.max_connections)

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def config(self) -> RedisConfig:
        """The Redis settings this cache was built with."""
        return self._config

    @property
    def key_prefix(self) -> str:
        """The prefix prepended to every key."""
        return self._prefix

    async def connect(self) -> None:
        """Create the client and PING once; a failure is logged, not raised (the cache stays soft).

        Calling it again while connected does nothing.
        """
        if self._redis is not None:
            return
        self._redis = self._config.build()
        self._gate = SlotMapGate(self._redis)
        started = time.perf_counter()
        if await self.ping():
            emit(
                log,
                "redis_connected",
                target=self._config.describe(),
                latency_ms=_ms_since(started),
            )

    async def close(self) -> None:
        """Cancel open stream prefetches, close the client and its pool; safe to call twice."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        client, self._redis = self._redis, None
        if client is not None:
            try:
                await client.aclose()
            except (redis_exc.RedisError, OSError) as exc:
                self._log_error("close", "", exc)

    async def ping(self) -> bool:
        """True when Redis answers PING now (goes through the breaker like any call)."""
        result = await self._run("ping", "", lambda r: r.ping())
        return not isinstance(result, _Failed) and bool(result)

    # -- audio ----------------------------------------------------------------------------------

    async def set_audio_chunks(self, key: str, audio_chunks: list[bytes]) -> bool:
        """Replace the fragment at ``key`` atomically; its stored format becomes unknown.

        One MULTI/EXEC runs DEL + RPUSH (+ PEXPIRE for ``tts:*``); readers see the whole old or
        the whole new list. An empty list deletes the key. Over ``MAX_CHUNKS`` the tail is dropped
        (logged). Wrong types are refused with a logged error and nothing is written.
        """
        return await self._write_audio("set_audio_chunks", key, audio_chunks, None)

    async def set_audio_fragment(
        self, key: str, audio_chunks: list[bytes], audio_format: AudioFormat
    ) -> bool:
        """Like :meth:`set_audio_chunks`, and store ``audio_format`` in the same transaction."""
        if not isinstance(audio_format, AudioFormat):
            return self._refuse("set_audio_fragment", key, "audio_format must be an AudioFormat")
        return await self._write_audio("set_audio_fragment", key, audio_chunks, audio_format)

    async def get_audio_chunks(self, key: str) -> list[bytes] | None:
        """The whole fragment (``LRANGE 0 -1``), or ``None`` when missing or on a soft failure."""
        if not _valid_key(key):
            self._refuse("get_audio_chunks", key, "key must be a non-empty string")
            return None
        started = time.perf_counter()
        chunks = await self._run("get_audio_chunks", key, lambda r: r.lrange(self._prefix + key, 0, -1))
        if isinstance(chunks, _Failed):
            return None
        if not chunks:
            emit(
                log, "get_audio_chunks_miss", logging.DEBUG, key=key, latency_ms=_ms_since(started), chunks=0
            )
            return None
        emit(
            log,
            "get_audio_chunks_hit",
            logging.DEBUG,
            key=key,
            latency_ms=_ms_since(started),
            chunks=len(chunks),
        )
        return cast("list[bytes]", chunks)  # decode_responses=False: elements are bytes

    async def open_audio_stream(self, key: str) -> AudioChunkStream | None:
        """Start a streaming read: the first command fetches only the first few chunks.

        The rest is fetched in the background as soon as the consumer takes the first chunk, in
        one MULTI/EXEC that also re-reads the head, so the stream can check it is still reading the
        version it started on (see :class:`RedisAudioStream`). Returns ``None`` on a miss or a soft
        failure.
        """
        if not _valid_key(key):
            self._refuse("open_audio_stream", key, "key must be a non-empty string")
            return None
        started = time.perf_counter()
        head = await self._run(
            "open_audio_stream", key, lambda r: r.lrange(self._prefix + key, 0, self._first_batch - 1)
        )
        if isinstance(head, _Failed):
            return None
        if not head:
            emit(
                log, "get_audio_chunks_miss", logging.DEBUG, key=key, latency_ms=_ms_since(started), chunks=0
            )
            return None
        # A head shorter than the batch is already the whole list: nothing more to fetch.
        complete = len(head) < self._first_batch
        return RedisAudioStream(self, key, cast("list[bytes]", head), complete=complete)

    async def get_audio_format(self, key: str) -> AudioFormat | None:
        """The format stored with the fragment, or ``None`` (unknown format, missing key, failure)."""
        if not _valid_key(key):
            self._refuse("get_audio_format", key, "key must be a non-empty string")
            return None
        try:
            meta = self._keys.meta(key)
        except DomainError as exc:
            self._refuse("get_audio_format", key, str(exc))
            return None
        fields = await self._run("get_audio_format", key, lambda r: r.hgetall(meta))
        if not fields and not isinstance(fields, _Failed) and self._config.mode != "cluster":
            # A fragment stored before the cluster-safe layout keeps its format at the old key.
            legacy = self._keys.legacy_meta(key)
            fields = await self._run("get_audio_format", key, lambda r: r.hgetall(legacy))
        if isinstance(fields, _Failed) or not fields:
            return None
        try:
            return AudioFormat.from_fields({_text(k): _text(v) for k, v in fields.items()})
        except (DomainError, UnicodeDecodeError) as exc:
            self._log_error("get_audio_format", key, exc)
            return None

    async def load_and_set_audio(self, key: str, wav_filepath: str, chunk_size_ms: int = 20) -> bool:
        """Read a PCM WAV file off the event loop, cut it into ``chunk_size_ms`` chunks and store it.

        The file's format is stored with the fragment. A missing, unreadable, truncated, non-PCM or
        non-WAV file logs ``load_audio_failed`` with the reason and returns False; the existing key
        is left untouched.
        """
        return (await self.load_audio_file(key, wav_filepath, chunk_size_ms)).ok

    async def load_audio_file(self, key: str, wav_filepath: str, chunk_size_ms: int = 20) -> AudioLoadResult:
        """:meth:`load_and_set_audio` returning the details (reason, chunks, format)."""
        if not _valid_key(key):
            self._refuse("load_and_set_audio", key, "key must be a non-empty string")
            return AudioLoadResult(key=str(key), ok=False, reason="key must be a non-empty string")
        try:
            wav, chunks = await asyncio.to_thread(_read_and_cut, wav_filepath, chunk_size_ms)
        except (OSError, DomainError, TypeError) as exc:
            reason = _describe_load_error(exc)
            emit(log, "load_audio_failed", logging.ERROR, key=key, path=str(wav_filepath), reason=reason)
            return AudioLoadResult(key=key, ok=False, reason=reason)
        fmt = wav.format
        emit(
            log,
            "wav_read",
            key=key,
            path=str(wav_filepath),
            nchannels=fmt.channels,
            sampwidth=fmt.sample_width,
            framerate=fmt.sample_rate,
            nframes=wav.nframes,
            duration_ms=round(wav.duration_ms, 3),
        )
        ok = await self._write_audio("load_and_set_audio", key, chunks, fmt)
        kept = min(len(chunks), MAX_CHUNKS)
        stored_bytes = sum(len(c) for c in chunks[:kept])
        emit(
            log,
            "warmup_done",
            logging.INFO if ok else logging.ERROR,
            key=key,
            ok=ok,
            chunks=kept,
            sample_rate=fmt.sample_rate,
            nchannels=fmt.channels,
            sampwidth=fmt.sample_width,
            duration_ms=round(fmt.duration_ms(stored_bytes), 3),
            total_bytes=stored_bytes,
        )
        return AudioLoadResult(
            key=key,
            ok=ok,
            reason="" if ok else "Redis write failed (see redis_error)",
            chunks=kept if ok else 0,
            audio_format=fmt,
            duration_ms=round(fmt.duration_ms(stored_bytes), 3),
        )

    # -- text -----------------------------------------------------------------------------------

    async def set_text(self, key: str, text: str, ttl_seconds: int) -> bool:
        """``SETEX key ttl_seconds text``; refuses (False, logged) a non-str text or a TTL <= 0.

        Audio keys (``static:*``, ``tts:*``) are refused too: a string there would destroy a fragment.
        """
        if not _valid_key(key):
            return self._refuse("set_text", key, "key must be a non-empty string")
        if not isinstance(text, str):
            return self._refuse("set_text", key, f"text must be str, got {type(text).__name__}")
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
            return self._refuse("set_text", key, f"ttl_seconds must be a positive int, got {ttl_seconds!r}")
        if keys.is_static(key) or keys.is_tts(key):
            return self._refuse("set_text", key, "audio keys (static:*, tts:*) cannot hold text")
        result = await self._run(
            "set_text",
            key,
            lambda r: r.execute_command(  # type: ignore[no-untyped-call,unused-ignore]
                "SETEX", self._prefix + key, ttl_seconds, text.encode("utf-8")
            ),
        )
        return not isinstance(result, _Failed)

    async def get_text(self, key: str) -> str | None:
        """The UTF-8 text at ``key``, or ``None`` (missing, expired, not UTF-8, or a soft failure)."""
        if not _valid_key(key):
            self._refuse("get_text", key, "key must be a non-empty string")
            return None
        raw = await self._run("get_text", key, lambda r: r.get(self._prefix + key))
        if isinstance(raw, _Failed) or raw is None:
            return None
        try:
            return _text(raw)
        except UnicodeDecodeError as exc:
            self._log_error("get_text", key, exc)
            return None

    # -- internals ------------------------------------------------------------------------------

    async def _write_audio(
        self, op: str, key: str, audio_chunks: Sequence[bytes], audio_format: AudioFormat | None
    ) -> bool:
        if not _valid_key(key):
            return self._refuse(op, key, "key must be a non-empty string")
        if keys.is_summary(key):
            return self._refuse(op, key, "summary keys hold text, not audio")
        if not isinstance(audio_chunks, list | tuple):
            return self._refuse(
                op, key, f"audio_chunks must be a list of bytes, got {type(audio_chunks).__name__}"
            )
        # C-speed check for the usual case; the per-item scan only runs to name a bad chunk.
        if not set(map(type, audio_chunks)) <= _EXACT_AUDIO_TYPES:
            for index, chunk in enumerate(audio_chunks):
                if not isinstance(chunk, _AUDIO_TYPES):
                    return self._refuse(op, key, f"chunk {index} is {type(chunk).__name__}, not bytes")
        if len(audio_chunks) > MAX_CHUNKS:
            emit(
                log,
                "audio_chunks_truncated",
                logging.WARNING,
                key=key,
                chunks=len(audio_chunks),
                kept=MAX_CHUNKS,
            )
            audio_chunks = audio_chunks[:MAX_CHUNKS]
        try:
            full, meta, prev = self._keys.key(key), self._keys.meta(key), self._keys.prev(key)
        except DomainError as exc:
            return self._refuse(op, key, str(exc))
        # On one server, also drop a format hash left at the pre-cluster-layout key.
        stale = (self._keys.legacy_meta(key),) if self._config.mode != "cluster" else ()
        started = time.perf_counter()
        ttl_ms = self._tts_ttl_ms if keys.is_tts(key) else None

        async def transaction(r: RedisClient) -> list[Any]:
            pipe = r.pipeline(transaction=True)
            # Keep the version being replaced readable for streams opened on it. RENAME fails on a
            # missing key; inside MULTI that error is just the first reply and aborts nothing.
            # (execute_command: the cluster pipeline blocks its multi-key helpers even in a transaction)
            pipe.execute_command("RENAME", full, prev)
            pipe.pexpire(prev, self._prev_grace_ms)
            pipe.delete(full, meta, *stale)
            if audio_chunks:
                pipe.rpush(full, *audio_chunks)
                if audio_format is not None:
                    fields = {**audio_format.to_fields(), "chunks": str(len(audio_chunks))}
                    pipe.hset(meta, mapping=cast(Any, fields))
                if ttl_ms is not None:
                    pipe.pexpire(full, ttl_ms)
                    if audio_format is not None:
                        pipe.pexpire(meta, ttl_ms)
            return await pipe.execute(raise_on_error=False)

        if self._config.mode == "cluster":
            meta_args: list[Any] = []
            if audio_format is not None and audio_chunks:
                fields = {**audio_format.to_fields(), "chunks": str(len(audio_chunks))}
                meta_args = [part for item in fields.items() for part in item]
            args = (self._prev_grace_ms, "" if ttl_ms is None else ttl_ms, len(meta_args), *meta_args)
            written = await self._run(
                op,
                key,
                lambda r: r.evalsha(_WRITE_SHA, 3, full, meta, prev, *args, *audio_chunks),
                script=_WRITE_LUA,
            )
            if isinstance(written, _Failed):
                return False
        else:
            replies = await self._run(op, key, transaction)
            if isinstance(replies, _Failed):
                return False
            errors = [reply for reply in replies[1:] if isinstance(reply, Exception)]
            if errors:
                self._log_error(op, key, errors[0])
                return False
        emit(
            log,
            "set_audio_chunks_ok",
            key=key,
            chunks=len(audio_chunks),
            bytes=sum(map(len, audio_chunks)),
            ttl_ms=ttl_ms,
            latency_ms=_ms_since(started),
        )
        return True

    async def _read_rest(self, key: str, head: list[bytes]) -> tuple[int, list[bytes]] | None:
        """The chunks after ``head`` of the version that starts with ``head``.

        Fast path: one MULTI/EXEC re-reads the head and reads the tail; when the head is unchanged,
        head + tail is one stored version. After a concurrent overwrite (rare) a Lua script looks
        at the current and the previous version atomically (Lua costs ~3x an LRANGE on big lists,
        hence not the default path).

        Returns ``(1, tail)`` from the current list, ``(2, tail)`` from the retained previous
        version, ``(0, [])`` when neither starts with ``head``, or ``None`` on a soft failure.
        """
        full, prev, n = self._keys.key(key), self._keys.prev(key), len(head)

        async def snapshot(r: RedisClient) -> list[Any]:
            pipe = r.pipeline(transaction=True)
            pipe.lrange(full, 0, n - 1)
            pipe.lrange(full, n, -1)
            return await pipe.execute()

        if self._config.mode != "cluster":  # cluster: no MULTI (see _WRITE_LUA), the script below
            fast = await self._run("open_audio_stream", key, snapshot)
            if isinstance(fast, _Failed):
                return None
            if fast[0] == head:
                return 1, fast[1]
        result = await self._run(
            "open_audio_stream",
            key,
            lambda r: r.evalsha(_READ_REST_SHA, 2, full, prev, *head),
            script=_READ_REST_LUA,
        )
        if isinstance(result, _Failed):
            return None
        source, tail = result
        return int(source), tail

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(
        self, op: str, key: str, call: Callable[[RedisClient], Awaitable[T]], script: str | None = None
    ) -> T | _Failed:
        """Run one Redis call through the breaker; map every failure to a logged ``FAILED``.

        With ``script``, a NOSCRIPT reply (a restarted or flushed server) loads it and retries once.
        """
        client = self._redis
        if client is None:
            self._log_error(op, key, "not connected: call connect() first")
            return FAILED
        breaker = self._breaker
        if not breaker.is_closed:
            # Redis was unreachable: answer at once. When the window is over, one background
            # PING finds out whether it is back, so no caller ever waits on a dead socket.
            now = self._clock()
            if breaker.allow(now):
                self._spawn(self._probe(client))
            retry_ms = round(breaker.retry_in(now) * 1000, 1)
            self._log_error(op, key, f"Redis unavailable (fast fail; next probe in {retry_ms} ms)")
            return FAILED
        slots = self._slots
        if slots.locked():  # every connection busy: queue, but not forever
            try:
                async with asyncio.timeout(self._config.pool_timeout):
                    await slots.acquire()
            except TimeoutError:
                busy = (
                    f"all {self._config.max_connections} connections busy for {self._config.pool_timeout} s"
                )
                self._log_error(op, key, f"{busy} (pool exhausted)")
                return FAILED
        else:
            await slots.acquire()  # free slot: returns without suspending
        try:
            try:
                result = await self._gate.run(lambda: call(client))
            except redis_exc.NoScriptError:
                if script is None:
                    raise
                await client.script_load(script)
                result = await call(client)
        except _CONNECTION_ERRORS as exc:
            breaker.record_failure(self._clock())
            self._log_error(op, key, exc)
            return FAILED
        except (redis_exc.RedisError, redis_exc.RedisClusterException) as exc:
            # The server answered (it is up, the command was wrong), or the cluster client refused
            # the command itself.
            breaker.record_success()
            self._log_error(op, key, exc)
            return FAILED
        except Exception as exc:
            # A client-side breakage (redis-py's cluster client can raise AttributeError on a
            # connection torn down while its slot map is re-read during a failover): soft, and
            # counted as an outage so the breaker spares the callers until a probe succeeds.
            breaker.record_failure(self._clock())
            self._log_error(op, key, exc)
            return FAILED
        finally:
            slots.release()
        breaker.record_success()
        return result

    async def _probe(self, client: RedisClient) -> None:
        """The breaker's trial call: close it if Redis answers, reopen it (longer) if not."""
        try:
            await client.ping()
        except asyncio.CancelledError:
            self._breaker.release_trial()
            raise
        except (*_CONNECTION_ERRORS, redis_exc.RedisError, redis_exc.RedisClusterException) as exc:
            self._breaker.record_failure(self._clock())
            emit(log, "redis_probe_failed", logging.DEBUG, error=f"{type(exc).__name__}: {exc}")
            return
        self._breaker.record_success()
        emit(log, "redis_recovered", target=self._config.describe())

    def _log_error(self, op: str, key: str, error: object) -> None:
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        emit(log, "redis_error", logging.ERROR, op=op, key=key, error=text)

    def _refuse(self, op: str, key: object, reason: str) -> bool:
        emit(log, "cache_invalid_argument", logging.ERROR, op=op, key=repr(key), error=reason)
        return False


class RedisAudioStream(AudioChunkStream):
    """A streaming read that never mixes two versions of a fragment.

    The head (first chunks) comes from the opening command. When the consumer takes the first
    chunk, the remainder is requested in the background (so it overlaps with playing the head and
    costs nothing before the first chunk): the tail of whichever version starts with that head -
    the current list, or the previous version a concurrent overwrite left for open streams. Should
    neither match (two overwrites within one read), the stream ends after the head and logs
    ``audio_stream_version_lost``: a prefix of one version, never a mix.
    """

    def __init__(self, cache: RedisCacheManager, key: str, head: list[bytes], *, complete: bool) -> None:
        self._cache = cache
        self._key = key
        self._head = head
        self._rest: asyncio.Task[None] | None = None
        self._fetched: tuple[int, list[bytes]] | None = None
        self._buffer = head
        self._index = 0
        self._tail_pending = not complete
        self._closed = False

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        if self._index >= len(self._buffer):
            if not self._tail_pending:
                await self.aclose()
                raise StopAsyncIteration
            self._tail_pending = False
            self._buffer = await self._load_tail()
            self._index = 0
            if not self._buffer:
                await self.aclose()
                raise StopAsyncIteration
        elif self._index == 1 and self._tail_pending and self._rest is None:
            self._rest = self._cache._spawn(self._fetch_tail())
        chunk = self._buffer[self._index]
        self._index += 1
        return chunk

    async def _fetch_tail(self) -> None:
        # The result is kept on the stream, not as the task's result: a finished task can outlive
        # the stream for a loop iteration or two, and must not keep megabytes of chunks alive.
        self._fetched = await self._cache._read_rest(self._key, self._head)

    async def _load_tail(self) -> list[bytes]:
        if self._rest is None:  # the consumer skipped straight past the head
            self._rest = self._cache._spawn(self._fetch_tail())
        await self._rest
        result, self._fetched = self._fetched, None
        if result is None:  # a soft failure, already logged
            return []
        source, tail = result
        if source == 2:
            emit(log, "audio_stream_previous_version", key=self._key, chunks=len(tail))
        elif source == 0:
            emit(log, "audio_stream_version_lost", logging.WARNING, key=self._key, yielded=len(self._head))
        return tail

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer = []
        if self._rest is not None and not self._rest.done():
            # The task is tracked by the cache (and cancelled again on close); nothing to wait for.
            self._rest.cancel()


def _valid_key(key: object) -> bool:
    try:
        keys.check_key(key)
    except DomainError:
        return False
    return True


def _read_and_cut(path: str, chunk_ms: int) -> tuple[WavAudio, list[bytes]]:
    """Blocking part of ``load_and_set_audio`` (runs in a worker thread)."""
    if not isinstance(path, str | Path):
        raise TypeError(f"wav_filepath must be a path, got {type(path).__name__}")
    file = Path(path)
    size = file.stat().st_size
    if size > MAX_WAV_BYTES:
        raise DomainError(f"WAV file is {size} bytes, more than the {MAX_WAV_BYTES} bytes accepted")
    wav = parse_wav(file.read_bytes())
    plan = plan_chunks(wav.format, chunk_ms)
    chunks = split_pcm(wav.pcm, plan)
    return wav, chunks


def _describe_load_error(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename}"
    if isinstance(exc, IsADirectoryError):
        return f"is a directory, not a WAV file: {exc.filename}"
    if isinstance(exc, OSError):
        return f"cannot read file: {exc.strerror or exc}"
    return str(exc)


def _text(value: bytes | str) -> str:
    """Decode a reply element (bytes with decode_responses=False); raises UnicodeDecodeError."""
    return value if isinstance(value, str) else value.decode("utf-8")


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
