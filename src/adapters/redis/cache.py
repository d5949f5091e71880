"""``RedisCacheManager``: the SPEC-A cache on Redis Lists/Strings, fail-soft, bounded and fast to fail.

Storage layout (``P`` is the optional key prefix for a shared Redis, see ``keys.check_key_prefix``):

* ``P<key>`` - the fragment: a Redis List of byte chunks (``static:*``, ``tts:*``), or a String
  (``summary:session:*``).
* ``P voxcore:meta:{P<key>}`` - a Hash with the fragment's audio format and size, written in the
  same MULTI/EXEC as the list (deleted when the format is unknown, so it never describes other data).
* ``P voxcore:prev:{P<key>}`` - the previous version of an overwritten list, kept for a short grace
  period so that a streaming reader that started on it can finish on it.

The braces are a Redis Cluster hash tag: the three keys of a fragment hash to one slot, so the
MULTI/EXEC writes and the Lua read work in a cluster (see ``keyspace``; a key that has its own tag
keeps it). Format hashes written before this layout (``P voxcore:meta:<key>``) are still read.

``voxcore:*`` is reserved: the public methods refuse such keys. How each call is bounded, retried
(never for writes), logged and cancelled is :class:`~voxcore.adapters.redis.guard.RedisGuard`'s job.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar, cast

from redis import exceptions as redis_exc

from voxcore.adapters.redis.config import RedisClient, RedisConfig
from voxcore.adapters.redis.guard import Failure, RedisGuard
from voxcore.adapters.redis.keyspace import Keyspace
from voxcore.adapters.redis.stream import READ_REST_LUA, READ_REST_SHA, RedisAudioStream, RestResult
from voxcore.adapters.redis.wav_file import MAX_WAV_BYTES, WavPathError, read_wav_file
from voxcore.core.domain import keys
from voxcore.core.domain.audio import MAX_CHUNKS, AudioFormat
from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.domain.text import repair_text
from voxcore.core.ports.cache import AbstractAudioCache, AudioChunkStream, AudioLoadResult
from voxcore.core.ports.errors import CacheUnavailableError
from voxcore.events import emit

__all__ = ["MAX_WAV_BYTES", "RedisAudioStream", "RedisCacheManager"]

log = logging.getLogger(__name__)

T = TypeVar("T")

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
_AUDIO_TYPES: Final = (bytes, bytearray, memoryview)
_EXACT_AUDIO_TYPES: Final = frozenset(_AUDIO_TYPES)
#: Default per-call deadline of reads on the audio path (fragments, formats, a stream's head).
DEFAULT_OP_TIMEOUT_MS: Final = 200.0
#: Default deadline of calls off the audio path: writes, texts (summaries), the rest of a streamed read.
DEFAULT_BULK_TIMEOUT_MS: Final = 2000.0


class RedisCacheManager(AbstractAudioCache):
    """The project's cache on Redis (SPEC-A/SPEC-C), one instance per process.

    One instance per process is guaranteed by the container (``providers.Singleton``), not by
    ``__new__``: tests and tools may still build separate instances for separate servers.

    Every operation is soft: a Redis failure returns ``False``/``None`` (logged as ``redis_error``,
    rate-limited per operation) and every call is bounded by a deadline (``op_timeout_ms`` for
    reads on the audio path; writes, texts and the tail of a streamed read ``bulk_timeout_ms``).
    After a connection-level failure or a missed deadline a circuit breaker answers further calls at
    once while one background PING per window finds out whether Redis is back; each state change is
    one ``redis_circuit`` line.

    A caller that must tell a miss from an outage uses :meth:`fetch_audio_chunks` or
    ``open_audio_stream(key, raise_on_outage=True)``: an outage raises
    :class:`~voxcore.core.ports.errors.CacheUnavailableError` and ``None`` is always a miss.

    Args:
        config: Where Redis is and how the client behaves.
        key_prefix: Prepended to every key (for a Redis shared with other applications); validated
            by :func:`~voxcore.core.domain.keys.check_key_prefix`.
        tts_ttl_seconds: Expiry of ``tts:*`` fragments; ``static:*`` never expire.
        stream_first_batch: Chunks fetched by the first command of a streaming read.
        prev_grace_seconds: How long an overwritten fragment stays readable for open streams.
        breaker: Fast-fail policy; a default one is made when omitted.
        clock: Monotonic seconds (injectable for tests).
        op_timeout_ms: Per-call deadline of reads on the audio path (fragments, formats, a stream's head).
        bulk_timeout_ms: Per-call deadline of calls off the audio path: writes, texts, the rest of a
            streamed read.
        extra_namespaces: Key namespaces accepted besides ``static``, ``tts`` and ``summary``.

    Raises:
        ValueError: an argument is out of range (the prefix message says which rule it breaks), or
            ``key_prefix`` has braces that form no cluster hash tag.
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
        op_timeout_ms: float = DEFAULT_OP_TIMEOUT_MS,
        bulk_timeout_ms: float = DEFAULT_BULK_TIMEOUT_MS,
        extra_namespaces: Iterable[str] = (),
    ) -> None:
        if tts_ttl_seconds <= 0:
            raise ValueError(f"tts_ttl_seconds must be positive, got {tts_ttl_seconds}")
        if stream_first_batch < 1:
            raise ValueError(f"stream_first_batch must be at least 1, got {stream_first_batch}")
        if prev_grace_seconds <= 0:
            raise ValueError(f"prev_grace_seconds must be positive, got {prev_grace_seconds}")
        if not op_timeout_ms > 0 or not bulk_timeout_ms > 0:
            raise ValueError("op_timeout_ms and bulk_timeout_ms must be positive")
        try:
            self._namespaces = keys.check_namespaces(extra_namespaces)
            self._prefix = keys.check_key_prefix(key_prefix, self._namespaces)
        except DomainError as exc:
            raise ValueError(str(exc)) from None
        self._config = config
        self._keys = Keyspace(self._prefix, cluster=config.mode == "cluster")
        self._tts_ttl_ms = tts_ttl_seconds * 1000
        self._first_batch = stream_first_batch
        self._prev_grace_ms = prev_grace_seconds * 1000
        self._clock = clock
        self._bulk_timeout_s = bulk_timeout_ms / 1000
        # connect()/ping() are start-up and tooling calls, not the audio path: a cold process's first
        # connection (imports, TCP, AUTH, CLIENT SETNAME) may take longer than a read's deadline.
        self._startup_timeout_s = max(
            op_timeout_ms / 1000, config.socket_connect_timeout + config.socket_timeout
        )
        self._redis: RedisClient | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._guard = RedisGuard(
            component="cache",
            target=config.describe(),
            breaker=breaker or CircuitBreaker(),
            op_timeout_s=op_timeout_ms / 1000,
            max_in_flight=config.max_connections,
            queue_timeout_s=config.pool_timeout,
            retries=config.retries,
            clock=clock,
        )

    def __repr__(self) -> str:
        return f"RedisCacheManager(target={self._config.describe()!r}, key_prefix={self._prefix!r})"

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def config(self) -> RedisConfig:
        """The Redis settings this cache was built with."""
        return self._config

    @property
    def key_prefix(self) -> str:
        """The prefix prepended to every key."""
        return self._prefix

    @property
    def op_timeout_ms(self) -> float:
        """The per-call deadline of reads and small writes."""
        return self._guard.op_timeout_s * 1000

    @property
    def available(self) -> bool:
        """False while the circuit breaker is open (Redis was found unreachable)."""
        return self._guard.breaker.is_closed

    @property
    def failed_operations(self) -> dict[str, int]:
        """Soft failures since start by reason (the ``voxcore.redis.failed_operations`` counter)."""
        return dict(self._guard.failed)

    async def connect(self) -> None:
        """Create the client and PING once; a failure is logged, not raised (the cache stays soft).

        Calling it again while connected does nothing.
        """
        if self._redis is not None:
            return
        self._redis = self._config.build()
        started = time.perf_counter()
        if await self.ping():
            emit(
                log,
                "redis_connected",
                target=self._config.describe(),
                latency_ms=_ms_since(started),
            )

    async def close(self) -> None:
        """Cancel open stream prefetches and the breaker's probe, close the client; safe to call twice."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._guard.aclose()
        client, self._redis = self._redis, None
        if client is not None:
            try:
                await client.aclose()
            except (redis_exc.RedisError, OSError) as exc:
                self._guard.log_error("close", "", exc)

    async def ping(self) -> bool:
        """True when Redis answers PING now (through the breaker like any call).

        Its deadline is the connection's (``socket_connect_timeout + socket_timeout``), not the
        read deadline: it is how tools and ``connect()`` find out whether Redis is there at all.
        """
        result = await self._run("ping", "", lambda r: r.ping(), timeout_s=self._startup_timeout_s)
        return not isinstance(result, Failure) and bool(result)

    # -- audio ----------------------------------------------------------------------------------

    async def set_audio_chunks(self, key: str, audio_chunks: list[bytes]) -> bool:
        """Replace the fragment at ``key`` atomically; its stored format becomes unknown.

        One MULTI/EXEC runs DEL + RPUSH (+ PEXPIRE for ``tts:*``); readers see the whole old or
        the whole new list. An empty list deletes the key. Over ``MAX_CHUNKS`` the tail is dropped
        (logged). Wrong types are refused with a logged error and nothing is written. The write
        is never resent: when its reply is lost, False is returned and ``cache_write_unknown``
        logged (the fragment may or may not have been replaced; writing it again is safe).
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
        return await self._get_chunks(key, raise_on_outage=False)

    async def fetch_audio_chunks(self, key: str) -> list[bytes] | None:
        """:meth:`get_audio_chunks` for callers that must tell a miss from an outage.

        Returns:
            The fragment, or ``None`` only when the key is missing (or the key is refused).

        Raises:
            CacheUnavailableError: Redis did not answer (connection, deadline, circuit open).
        """
        return await self._get_chunks(key, raise_on_outage=True)

    async def _get_chunks(self, key: str, *, raise_on_outage: bool) -> list[bytes] | None:
        if not self._check_key("get_audio_chunks", key):
            return None
        started = time.perf_counter()
        full = self._keys.key(key)
        chunks = await self._run("get_audio_chunks", key, lambda r: r.lrange(full, 0, -1))
        if isinstance(chunks, Failure):
            if raise_on_outage and chunks.outage:
                raise CacheUnavailableError(chunks.error, op="get_audio_chunks", key=key)
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

    async def open_audio_stream(self, key: str, *, raise_on_outage: bool = False) -> AudioChunkStream | None:
        """Start a streaming read: the first command fetches only the first few chunks.

        The rest is fetched in the background as soon as the consumer takes the first chunk, in
        one MULTI/EXEC that also re-reads the head, so the stream can check it is still reading the
        version it started on (see :class:`RedisAudioStream`). Should the rest be lost, iteration
        ends with :class:`~voxcore.core.ports.errors.AudioStreamIncompleteError`, never silently.

        Returns:
            The stream, or ``None`` on a miss (or a soft failure without ``raise_on_outage``).

        Raises:
            CacheUnavailableError: only with ``raise_on_outage=True``, when Redis did not answer.
        """
        if not self._check_key("open_audio_stream", key):
            return None
        started = time.perf_counter()
        head = await self._run(
            "open_audio_stream", key, lambda r: r.lrange(self._prefix + key, 0, self._first_batch - 1)
        )
        if isinstance(head, Failure):
            if raise_on_outage and head.outage:
                raise CacheUnavailableError(head.error, op="open_audio_stream", key=key)
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
        if not self._check_key("get_audio_format", key):
            return None
        try:
            meta = self._keys.meta(key)
        except DomainError as exc:
            self._refuse("get_audio_format", key, str(exc))
            return None
        fields = await self._run("get_audio_format", key, lambda r: r.hgetall(meta))
        if not fields and not isinstance(fields, Failure) and self._config.mode != "cluster":
            # A fragment stored before the cluster-safe layout keeps its format at the old key.
            legacy = self._keys.legacy_meta(key)
            fields = await self._run("get_audio_format", key, lambda r: r.hgetall(legacy))
        if isinstance(fields, Failure) or not fields:
            return None
        try:
            return AudioFormat.from_fields({_text(k): _text(v) for k, v in fields.items()})
        except (DomainError, UnicodeDecodeError) as exc:
            self._guard.log_error("get_audio_format", key, exc)
            return None

    async def load_and_set_audio(self, key: str, wav_filepath: str, chunk_size_ms: int = 20) -> bool:
        """Read a PCM WAV file off the event loop, cut it into ``chunk_size_ms`` chunks and store it.

        The file's format is stored with the fragment. A missing, unreadable, truncated, non-PCM,
        implausible or non-WAV file, or a path that is not a regular file (a FIFO, a device), logs
        ``load_audio_failed`` with the reason and returns False; the existing key is left untouched.
        """
        return (await self.load_audio_file(key, wav_filepath, chunk_size_ms)).ok

    async def load_audio_file(self, key: str, wav_filepath: str, chunk_size_ms: int = 20) -> AudioLoadResult:
        """:meth:`load_and_set_audio` returning the details (reason, chunks, format)."""
        if not self._check_key("load_and_set_audio", key):
            reason = "invalid key (see cache_invalid_argument)"
            return AudioLoadResult(key=key if isinstance(key, str) else repr(key), ok=False, reason=reason)
        try:
            wav = await asyncio.to_thread(read_wav_file, wav_filepath, chunk_size_ms)
        except (OSError, DomainError, TypeError) as exc:
            reason = _describe_load_error(exc)
            emit(
                log, "load_audio_failed", logging.ERROR, key=key, path=_show_path(wav_filepath), reason=reason
            )
            return AudioLoadResult(key=key, ok=False, reason=reason)
        fmt, chunks = wav.format, wav.chunks
        emit(
            log,
            "wav_read",
            key=key,
            path=_show_path(wav_filepath),
            nchannels=fmt.channels,
            sampwidth=fmt.sample_width,
            framerate=fmt.sample_rate,
            nframes=wav.nframes,
            duration_ms=round(wav.duration_ms, 3),
        )
        if wav.total_chunks > len(chunks):
            emit(
                log,
                "audio_chunks_truncated",
                logging.WARNING,
                key=key,
                chunks=wav.total_chunks,
                kept=len(chunks),
            )
        outcome = await self._write_audio_outcome("load_and_set_audio", key, chunks, fmt)
        ok = outcome is True
        stored_bytes = sum(map(len, chunks))
        emit(
            log,
            "warmup_done",
            logging.INFO if ok else logging.ERROR,
            key=key,
            ok=ok,
            chunks=len(chunks),
            sample_rate=fmt.sample_rate,
            nchannels=fmt.channels,
            sampwidth=fmt.sample_width,
            duration_ms=round(fmt.duration_ms(stored_bytes), 3),
            total_bytes=stored_bytes,
        )
        if ok:
            reason = ""
        elif outcome is None:
            reason = "Redis write outcome unknown (the reply was lost; the fragment may have been stored)"
        else:
            reason = "Redis write failed (see redis_error)"
        return AudioLoadResult(
            key=key,
            ok=ok,
            reason=reason,
            chunks=len(chunks) if ok else 0,
            audio_format=fmt,
            duration_ms=round(fmt.duration_ms(stored_bytes), 3),
        )

    # -- text -----------------------------------------------------------------------------------

    async def set_text(self, key: str, text: str, ttl_seconds: int) -> bool:
        """``SETEX key ttl_seconds text``; refuses (False, logged) a non-str text or a TTL <= 0.

        Audio keys (``static:*``, ``tts:*``) are refused too: a string there would destroy a fragment.
        Text with unpaired surrogates (not encodable as UTF-8) is stored with U+FFFD in their place,
        logged once as ``text_repaired``.
        """
        if not self._check_key("set_text", key):
            return False
        if not isinstance(text, str):
            return self._refuse("set_text", key, f"text must be str, got {type(text).__name__}")
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
            return self._refuse("set_text", key, f"ttl_seconds must be a positive int, got {ttl_seconds!r}")
        if keys.is_static(key) or keys.is_tts(key):
            return self._refuse("set_text", key, "audio keys (static:*, tts:*) cannot hold text")
        text, replaced = repair_text(text)
        if replaced:
            emit(log, "text_repaired", logging.WARNING, op="set_text", key=key, replaced=replaced)
        payload = text.encode("utf-8")
        result = await self._run(
            "set_text",
            key,
            lambda r: r.execute_command(  # type: ignore[no-untyped-call,unused-ignore]
                "SETEX", self._prefix + key, ttl_seconds, payload
            ),
            timeout_s=self._bulk_timeout_s,  # off the audio path: summaries
        )
        return not isinstance(result, Failure)

    async def get_text(self, key: str) -> str | None:
        """The UTF-8 text at ``key``, or ``None`` (missing, expired, not UTF-8, or a soft failure)."""
        if not self._check_key("get_text", key):
            return None
        raw = await self._run(
            "get_text", key, lambda r: r.get(self._prefix + key), timeout_s=self._bulk_timeout_s
        )
        if isinstance(raw, Failure) or raw is None:
            return None
        try:
            return _text(raw)
        except UnicodeDecodeError as exc:
            self._guard.log_error("get_text", key, exc)
            return None

    # -- internals ------------------------------------------------------------------------------

    def _check_key(self, op: str, key: object) -> bool:
        try:
            keys.check_public_key(key, self._namespaces)
        except DomainError as exc:
            self._refuse(op, key, str(exc))
            return False
        return True

    async def _write_audio(
        self, op: str, key: str, audio_chunks: Sequence[bytes], audio_format: AudioFormat | None
    ) -> bool:
        return await self._write_audio_outcome(op, key, audio_chunks, audio_format) is True

    async def _write_audio_outcome(
        self, op: str, key: str, audio_chunks: Sequence[bytes], audio_format: AudioFormat | None
    ) -> bool | None:
        """True: stored; False: not stored; None: unknown (the reply was lost after sending)."""
        if not self._check_key(op, key):
            return False
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

        async def script(r: RedisClient) -> list[Any]:
            meta_args: list[Any] = []
            if audio_format is not None and audio_chunks:
                fields = {**audio_format.to_fields(), "chunks": str(len(audio_chunks))}
                meta_args = [part for item in fields.items() for part in item]
            args = (self._prev_grace_ms, "" if ttl_ms is None else ttl_ms, len(meta_args), *meta_args)
            await r.evalsha(_WRITE_SHA, 3, full, meta, prev, *args, *audio_chunks)
            return [None]  # the script raises on an error: no per-command replies to check

        cluster = self._config.mode == "cluster"
        replies = await self._run(
            op,
            key,
            script if cluster else transaction,
            timeout_s=self._bulk_timeout_s,
            idempotent=False,
            script=_WRITE_LUA if cluster else None,
        )
        if isinstance(replies, Failure):
            if replies.uncertain:
                emit(
                    log,
                    "cache_write_unknown",
                    logging.WARNING,
                    op=op,
                    key=key,
                    reason=replies.reason,
                    detail="the reply was lost after the write was sent; it may have been applied "
                    "(not resent: writing the fragment again is safe)",
                )
                return None
            return False
        errors = [reply for reply in replies[1:] if isinstance(reply, Exception)]
        if errors:
            self._guard.log_error(op, key, errors[0])
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

    async def _read_rest(self, key: str, head: list[bytes]) -> RestResult:
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
            fast = await self._run("open_audio_stream", key, snapshot, timeout_s=self._bulk_timeout_s)
            if isinstance(fast, Failure):
                return None
            if fast[0] == head:
                return 1, fast[1]
        result = await self._run(
            "open_audio_stream",
            key,
            lambda r: r.evalsha(READ_REST_SHA, 2, full, prev, *head),
            script=READ_REST_LUA,
            timeout_s=self._bulk_timeout_s,
        )
        if isinstance(result, Failure):
            return None
        source, tail = result
        return int(source), tail

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(
        self,
        op: str,
        key: str,
        call: Callable[[RedisClient], Awaitable[T]],
        *,
        script: str | None = None,
        timeout_s: float | None = None,
        idempotent: bool = True,
    ) -> T | Failure:
        """One Redis call through the guard (breaker, deadline, quiet logs, cancellation)."""
        return await self._guard.run(
            self._redis, op, key, call, script=script, timeout_s=timeout_s, idempotent=idempotent
        )

    def _refuse(self, op: str, key: object, reason: str) -> bool:
        shown = key if isinstance(key, str) else repr(key)
        emit(log, "cache_invalid_argument", logging.ERROR, op=op, key=_printable(shown), error=reason)
        return False


def _describe_load_error(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {_show_path(exc.filename)}"
    if isinstance(exc, IsADirectoryError):
        return f"is a directory, not a WAV file: {_show_path(exc.filename)}"
    if isinstance(exc, WavPathError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"cannot read file: {exc.strerror or exc}"
    return str(exc)


def _show_path(path: object) -> str:
    """A path fit for a log line (NULs and lone surrogates made visible, never raised on)."""
    return _printable(str(path))


def _printable(text: str) -> str:
    return repair_text(text.replace("\x00", "\\x00"))[0]


def _text(value: bytes | str) -> str:
    """Decode a reply element (bytes with decode_responses=False); raises UnicodeDecodeError."""
    return value if isinstance(value, str) else value.decode("utf-8")


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
