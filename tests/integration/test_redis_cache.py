"""RedisCacheManager against a real Redis: round trips, atomicity, TTLs, limits, bad input."""

from __future__ import annotations

import asyncio
import inspect
import logging
import wave
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from tests.unit.test_audio_domain import make_wav
from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.keyspace import Keyspace
from voxcore.core.domain.audio import MAX_CHUNKS, AudioFormat
from voxcore.core.ports.cache import AbstractCache
from voxcore.events import FIELDS_ATTR

# Every test here also runs on a Redis Cluster and a Sentinel set (make test-cluster).
pytestmark = pytest.mark.all_redis_modes


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS_ATTR, {}) for r in caplog.records if r.getMessage() == name]


def write_wav(
    path: Path, rate: int = 16_000, channels: int = 1, width: int = 2, nframes: int = 16_000
) -> bytes:
    data, pcm = make_wav(rate, channels, width, nframes, seed=len(str(path)))
    path.write_bytes(data)
    return pcm


async def collect(cache: RedisCacheManager, key: str) -> list[bytes] | None:
    stream = await cache.open_audio_stream(key)
    if stream is None:
        return None
    async with stream:
        return [chunk async for chunk in stream]


# -- SPEC-A contract --------------------------------------------------------------------------


SPEC_A = {
    "connect": "(self) -> 'None'",
    "close": "(self) -> 'None'",
    "load_and_set_audio": "(self, key: 'str', wav_filepath: 'str', chunk_size_ms: 'int' = 20) -> 'bool'",
    "set_audio_chunks": "(self, key: 'str', audio_chunks: 'List[bytes]') -> 'bool'",
    "get_audio_chunks": "(self, key: 'str') -> 'Optional[List[bytes]]'",
    "set_text": "(self, key: 'str', text: 'str', ttl_seconds: 'int') -> 'bool'",
    "get_text": "(self, key: 'str') -> 'Optional[str]'",
}


def test_abstract_cache_signatures_are_spec_a() -> None:
    assert AbstractCache.__abstractmethods__ == frozenset(SPEC_A)
    for name, signature in SPEC_A.items():
        method = getattr(AbstractCache, name)
        assert inspect.iscoroutinefunction(method)
        assert str(inspect.signature(method)) == signature


def test_redis_cache_manager_matches_the_port() -> None:
    for name in SPEC_A:
        ours = inspect.signature(getattr(RedisCacheManager, name))
        port = inspect.signature(getattr(AbstractCache, name))
        assert list(ours.parameters) == list(port.parameters)
        assert [p.default for p in ours.parameters.values()] == [p.default for p in port.parameters.values()]
        assert inspect.iscoroutinefunction(getattr(RedisCacheManager, name))


# -- audio ------------------------------------------------------------------------------------


async def test_wav_roundtrip_is_byte_exact(cache: RedisCacheManager, tmp_path: Path) -> None:
    pcm = write_wav(tmp_path / "a.wav", nframes=48_123)
    assert await cache.load_and_set_audio("static:a", str(tmp_path / "a.wav"))
    chunks = await cache.get_audio_chunks("static:a")
    assert chunks is not None and b"".join(chunks) == pcm
    assert len(chunks) == -(-48_123 // 320)
    assert await collect(cache, "static:a") == chunks
    assert await cache.get_audio_format("static:a") == AudioFormat(16_000, 1, 2)


@pytest.mark.parametrize(
    ("rate", "channels", "width", "nframes", "chunk_ms", "expected_chunks"),
    [
        (16_000, 1, 2, 16_001, 20, 51),
        (8_000, 1, 1, 8_000, 20, 50),
        (44_100, 2, 2, 44_101, 20, 51),  # 882 frames per chunk, one frame over
        (48_000, 2, 3, 4_801, 20, 6),
        (22_050, 1, 2, 1, 20, 1),
        (16_000, 1, 2, 16_000, 60, 17),
    ],
)
async def test_chunk_counts_and_formats(
    cache: RedisCacheManager,
    tmp_path: Path,
    rate: int,
    channels: int,
    width: int,
    nframes: int,
    chunk_ms: int,
    expected_chunks: int,
) -> None:
    path = tmp_path / "f.wav"
    pcm = write_wav(path, rate, channels, width, nframes)
    result = await cache.load_audio_file("static:f", str(path), chunk_ms)
    assert result.ok and result.chunks == expected_chunks
    chunks = await cache.get_audio_chunks("static:f")
    assert chunks is not None and len(chunks) == expected_chunks and b"".join(chunks) == pcm
    assert all(len(c) % (channels * width) == 0 for c in chunks)
    assert await cache.get_audio_format("static:f") == AudioFormat(rate, channels, width)


async def test_load_logs_spec_c_fields(
    cache: RedisCacheManager, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_wav(tmp_path / "a.wav", nframes=8_000)
    caplog.set_level(logging.INFO, logger="voxcore")
    assert await cache.load_and_set_audio("static:a", str(tmp_path / "a.wav"))
    (read,) = events(caplog, "wav_read")
    assert {k: read[k] for k in ("nchannels", "sampwidth", "framerate", "nframes", "duration_ms")} == {
        "nchannels": 1,
        "sampwidth": 2,
        "framerate": 16_000,
        "nframes": 8_000,
        "duration_ms": 500.0,
    }
    (done,) = events(caplog, "warmup_done")
    assert (
        done["ok"]
        and done["chunks"] == 25
        and done["total_bytes"] == 16_000
        and done["sample_rate"] == 16_000
    )
    assert events(caplog, "set_audio_chunks_ok")[0]["chunks"] == 25


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "file not found"),
        (b"", "not a WAV"),
        (b"RIFF\x00\x00\x00\x00WAVEjunk", "truncated"),
        ("truncated", "truncated"),
        ("float", "not integer PCM"),
        (b"ID3\x03" + b"\x00" * 200, "not a WAV"),
        ("empty", "no audio frames"),
        ("dir", "directory"),
    ],
)
async def test_bad_wav_is_refused_and_existing_key_untouched(
    cache: RedisCacheManager, tmp_path: Path, caplog: pytest.LogCaptureFixture, content: Any, reason: str
) -> None:
    good = write_wav(tmp_path / "good.wav", nframes=3_200)
    assert await cache.load_and_set_audio("static:x", str(tmp_path / "good.wav"))
    bad = tmp_path / "bad.wav"
    if content == "truncated":
        bad.write_bytes((tmp_path / "good.wav").read_bytes()[:-100])
    elif content == "float":
        data = bytearray((tmp_path / "good.wav").read_bytes())
        data[20:22] = (3).to_bytes(2, "little")
        bad.write_bytes(bytes(data))
    elif content == "empty":
        with wave.open(str(bad), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16_000)
    elif content == "dir":
        bad.mkdir()
    elif content is not None:
        bad.write_bytes(content)
    caplog.set_level(logging.INFO, logger="voxcore")
    result = await cache.load_audio_file("static:x", str(bad))
    assert not result.ok and reason in result.reason
    assert not await cache.load_and_set_audio("static:x", str(bad))
    assert reason in events(caplog, "load_audio_failed")[0]["reason"]
    chunks = await cache.get_audio_chunks("static:x")
    assert chunks is not None and b"".join(chunks) == good


async def test_set_and_get_chunks_roundtrip_and_empty_list_deletes(
    cache: RedisCacheManager, raw_redis: redis.Redis, key_prefix: str
) -> None:
    chunks = [bytes([i % 256]) * 640 for i in range(1000)]
    assert await cache.set_audio_chunks("static:s", chunks)
    assert await cache.get_audio_chunks("static:s") == chunks
    assert await raw_redis.llen(f"{key_prefix}static:s") == 1000  # the prefix is applied
    assert await raw_redis.pttl(f"{key_prefix}static:s") == -1  # static:* never expires
    assert await cache.get_audio_format("static:s") is None  # format unknown for raw chunks
    assert await cache.set_audio_chunks("static:s", [])
    assert await cache.get_audio_chunks("static:s") is None
    assert await raw_redis.exists(f"{key_prefix}static:s") == 0


async def test_fragment_format_replaced_with_data(cache: RedisCacheManager) -> None:
    fmt = AudioFormat(24_000, 1, 2)
    assert await cache.set_audio_fragment("tts:abc", [b"\x00\x01" * 240], fmt)
    assert await cache.get_audio_format("tts:abc") == fmt
    assert await cache.set_audio_chunks("tts:abc", [b"\x00" * 10])
    assert await cache.get_audio_format("tts:abc") is None  # never describes other data


async def test_miss_returns_none(cache: RedisCacheManager, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="voxcore")
    assert await cache.get_audio_chunks("static:nothing") is None
    assert await cache.open_audio_stream("static:nothing") is None
    assert events(caplog, "get_audio_chunks_miss")[0]["chunks"] == 0


async def test_hit_event_has_latency_and_chunks(
    cache: RedisCacheManager, caplog: pytest.LogCaptureFixture
) -> None:
    await cache.set_audio_chunks("static:h", [b"a", b"b"])
    caplog.set_level(logging.DEBUG, logger="voxcore")
    await cache.get_audio_chunks("static:h")
    (hit,) = events(caplog, "get_audio_chunks_hit")
    assert hit["chunks"] == 2 and hit["latency_ms"] >= 0


async def test_max_chunks_drops_the_tail(
    cache: RedisCacheManager, caplog: pytest.LogCaptureFixture, raw_redis: redis.Redis, key_prefix: str
) -> None:
    chunks = [i.to_bytes(4, "big") for i in range(MAX_CHUNKS + 7)]
    caplog.set_level(logging.INFO, logger="voxcore")
    assert await cache.set_audio_chunks("static:long", chunks)
    assert await raw_redis.llen(f"{key_prefix}static:long") == MAX_CHUNKS
    assert await cache.get_audio_chunks("static:long") == chunks[:MAX_CHUNKS]
    (cut,) = events(caplog, "audio_chunks_truncated")
    assert cut == {"key": "static:long", "chunks": MAX_CHUNKS + 7, "kept": MAX_CHUNKS}


@pytest.mark.parametrize(
    "bad",
    [None, "not a list", b"bytes", [b"ok", "str"], [b"ok", None], [1, 2], {"a": b"x"}],
)
async def test_wrong_chunk_types_write_nothing(
    cache: RedisCacheManager, bad: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await cache.set_audio_chunks("static:t", [b"keep"])
    caplog.set_level(logging.INFO, logger="voxcore")
    assert await cache.set_audio_chunks("static:t", bad) is False
    assert events(caplog, "cache_invalid_argument")
    assert await cache.get_audio_chunks("static:t") == [b"keep"]


async def test_bad_keys_are_refused(cache: RedisCacheManager) -> None:
    for key in ("", None, 42):
        assert await cache.set_audio_chunks(key, [b"x"]) is False  # type: ignore[arg-type]
        assert await cache.get_audio_chunks(key) is None  # type: ignore[arg-type]
        assert await cache.set_text(key, "x", 10) is False  # type: ignore[arg-type]
        assert await cache.get_text(key) is None  # type: ignore[arg-type]
        assert await cache.open_audio_stream(key) is None  # type: ignore[arg-type]
        assert await cache.load_and_set_audio(key, "x.wav") is False  # type: ignore[arg-type]


async def test_audio_and_text_keys_do_not_overwrite_each_other(cache: RedisCacheManager) -> None:
    await cache.set_audio_chunks("static:guard", [b"audio"])
    assert await cache.set_text("static:guard", "text", 10) is False
    assert await cache.set_text("tts:guard", "text", 10) is False
    assert await cache.get_audio_chunks("static:guard") == [b"audio"]
    assert await cache.set_text("summary:session:abc", "summary", 10)
    assert await cache.set_audio_chunks("summary:session:abc", [b"x"]) is False
    assert await cache.get_text("summary:session:abc") == "summary"


async def test_wrong_type_is_a_soft_error_that_keeps_the_breaker_closed(
    cache: RedisCacheManager, caplog: pytest.LogCaptureFixture
) -> None:
    await cache.set_text("summary:session:w", "text", 10)
    caplog.set_level(logging.INFO, logger="voxcore")
    assert await cache.get_audio_chunks("summary:session:w") is None
    (err,) = events(caplog, "redis_error")
    assert err["op"] == "get_audio_chunks" and "WRONGTYPE" in err["error"]
    assert await cache.get_text("summary:session:w") == "text"  # no fast-fail after a command error


# -- text -------------------------------------------------------------------------------------


async def test_text_roundtrip_unicode_and_ttl(
    cache: RedisCacheManager, raw_redis: redis.Redis, key_prefix: str
) -> None:
    assert await cache.set_text("summary:session:t", "Итог: клиент 👍", 100)
    assert await cache.get_text("summary:session:t") == "Итог: клиент 👍"
    assert 0 < await raw_redis.ttl(f"{key_prefix}summary:session:t") <= 100
    assert await cache.get_text("summary:session:none") is None


@pytest.mark.parametrize(
    ("text", "ttl"), [("x", 0), ("x", -5), ("x", 1.5), ("x", True), (b"bytes", 10), (None, 10)]
)
async def test_set_text_refuses_bad_arguments(cache: RedisCacheManager, text: Any, ttl: Any) -> None:
    await cache.set_text("summary:session:k", "old", 100)
    assert await cache.set_text("summary:session:k", text, ttl) is False
    assert await cache.get_text("summary:session:k") == "old"


async def test_non_utf8_text_reads_as_none(
    cache: RedisCacheManager, raw_redis: redis.Redis, key_prefix: str
) -> None:
    await raw_redis.set(f"{key_prefix}summary:session:bin", b"\xff\xfe\x00")
    assert await cache.get_text("summary:session:bin") is None


async def test_text_and_tts_expire(redis_target: Any, key_prefix: str, raw_redis: redis.Redis) -> None:
    cache = RedisCacheManager(redis_target.config(), key_prefix=key_prefix, tts_ttl_seconds=1)
    await cache.connect()
    try:
        assert await cache.set_text("summary:session:e", "short", 1)
        assert await cache.set_audio_fragment("tts:e", [b"x" * 64] * 3, AudioFormat(16_000, 1, 2))
        assert await cache.set_audio_chunks("static:e", [b"x"])
        assert 0 < await raw_redis.pttl(f"{key_prefix}tts:e") <= 1000
        assert 0 < await raw_redis.pttl(Keyspace(key_prefix).meta("tts:e")) <= 1000
        await asyncio.sleep(1.3)
        assert await cache.get_text("summary:session:e") is None
        assert await cache.get_audio_chunks("tts:e") is None
        assert await cache.get_audio_format("tts:e") is None
        assert await cache.get_audio_chunks("static:e") == [b"x"]
    finally:
        await cache.close()


# -- atomicity and streaming --------------------------------------------------------------------


async def test_readers_never_see_a_mix_during_overwrites(cache: RedisCacheManager) -> None:
    version_a = [b"A" * 640] * 1000
    version_b = [b"B" * 320] * 700
    await cache.set_audio_chunks("static:swap", version_a)
    stop = asyncio.Event()
    seen: list[tuple[bytes, int]] = []

    async def writer() -> None:
        for i in range(40):
            assert await cache.set_audio_chunks("static:swap", version_b if i % 2 == 0 else version_a)
        stop.set()

    async def reader(streaming: bool) -> None:
        while not stop.is_set():
            chunks = (
                await collect(cache, "static:swap")
                if streaming
                else await cache.get_audio_chunks("static:swap")
            )
            assert chunks is not None
            assert chunks in (version_a, version_b), f"mixed read: {len(chunks)} chunks, {set(chunks)!r:.80}"
            seen.append((chunks[0][:1], len(chunks)))

    await asyncio.gather(writer(), *(reader(i % 2 == 0) for i in range(6)))
    assert {s for s in seen} <= {(b"A", 1000), (b"B", 700)}
    assert len(seen) > 20


async def test_stream_yields_the_head_before_the_rest(cache: RedisCacheManager) -> None:
    chunks = [i.to_bytes(2, "big") * 320 for i in range(20_000)]
    await cache.set_audio_chunks("static:big", chunks)
    stream = await cache.open_audio_stream("static:big")
    assert stream is not None
    first = await stream.__anext__()
    assert first == chunks[0]
    rest = [c async for c in stream]
    assert [first, *rest] == chunks


async def test_short_list_stream_needs_one_command(cache: RedisCacheManager) -> None:
    await cache.set_audio_chunks("static:short", [b"1", b"2"])
    stream = await cache.open_audio_stream("static:short")
    assert stream is not None and stream._rest is None  # type: ignore[attr-defined]
    assert [c async for c in stream] == [b"1", b"2"]


async def test_stream_overtaken_by_one_write_finishes_on_the_old_version(
    cache: RedisCacheManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    old = [b"o" + bytes([i]) for i in range(100)]
    new = [b"n" + bytes([i]) for i in range(50)]
    await cache.set_audio_chunks("static:ov", old)
    real_read_rest = cache._read_rest
    overwritten = False

    async def overwrite_first(*args: Any) -> Any:  # the write lands between head and rest
        nonlocal overwritten
        if not overwritten:
            overwritten = True
            assert await cache.set_audio_chunks("static:ov", new)
        return await real_read_rest(*args)

    monkeypatch.setattr(cache, "_read_rest", overwrite_first)
    caplog.set_level(logging.INFO, logger="voxcore")
    assert await collect(cache, "static:ov") == old
    assert events(caplog, "audio_stream_previous_version")
    monkeypatch.undo()
    assert await collect(cache, "static:ov") == new


async def test_stream_overtaken_by_two_writes_stops_without_mixing(
    cache: RedisCacheManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2, v3 = ([tag + bytes([i]) for i in range(30)] for tag in (b"1", b"2", b"3"))
    await cache.set_audio_chunks("static:ov2", v1)
    real_read_rest = cache._read_rest
    writes = 0

    async def overwrite_twice(*args: Any) -> Any:
        nonlocal writes
        if not writes:
            writes = 2
            await cache.set_audio_chunks("static:ov2", v2)
            await cache.set_audio_chunks("static:ov2", v3)
        return await real_read_rest(*args)

    monkeypatch.setattr(cache, "_read_rest", overwrite_twice)
    caplog.set_level(logging.INFO, logger="voxcore")
    got = await collect(cache, "static:ov2")
    assert got == v1[:4]  # only the head it had already yielded: a prefix of one version
    assert events(caplog, "audio_stream_version_lost")


# -- cancellation -------------------------------------------------------------------------------


async def test_cancelled_reader_does_not_poison_the_pool(cache: RedisCacheManager) -> None:
    big = [bytes([i % 256]) * 640 for i in range(20_000)]
    small = [b"s1", b"s2"]
    await cache.set_audio_chunks("static:big", big)
    await cache.set_audio_chunks("static:small", small)
    for delay in (0, 0.0005, 0.001, 0.002, 0.005):
        task = asyncio.create_task(cache.get_audio_chunks("static:big"))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        # every later command gets its own reply, not the cancelled one's
        assert await cache.get_audio_chunks("static:small") == small
        assert await cache.set_text("summary:session:c", f"v{delay}", 10)
        assert await cache.get_text("summary:session:c") == f"v{delay}"
    results = await asyncio.gather(*(cache.get_audio_chunks("static:small") for _ in range(50)))
    assert all(r == small for r in results)


async def test_cancelled_stream_consumer_leaves_cache_usable(cache: RedisCacheManager) -> None:
    await cache.set_audio_chunks("static:big", [b"x" * 640] * 5000)

    async def consume() -> None:
        stream = await cache.open_audio_stream("static:big")
        assert stream is not None
        async with stream:
            async for _ in stream:
                await asyncio.sleep(0)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await cache.get_audio_chunks("static:big") == [b"x" * 640] * 5000


async def test_abandoned_stream_closed_early(cache: RedisCacheManager) -> None:
    await cache.set_audio_chunks("static:ab", [b"a"] * 100)
    stream = await cache.open_audio_stream("static:ab")
    assert stream is not None
    assert await stream.__anext__() == b"a"
    await stream.aclose()
    await stream.aclose()
    assert [c async for c in stream] == []


async def test_close_is_idempotent_and_calls_after_close_are_soft(
    redis_target: Any, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisCacheManager(redis_target.config(), key_prefix=key_prefix)
    caplog.set_level(logging.INFO, logger="voxcore")
    assert await cache.get_text("summary:session:x") is None  # before connect
    await cache.connect()
    await cache.connect()
    await cache.close()
    await cache.close()
    assert await cache.set_text("summary:session:x", "v", 10) is False
    assert any("not connected" in e["error"] for e in events(caplog, "redis_error"))


async def test_more_callers_than_connections_queue_instead_of_failing(
    redis_target: Any, key_prefix: str, raw_redis: redis.Redis
) -> None:
    cache = RedisCacheManager(redis_target.config(max_connections=2), key_prefix=key_prefix)
    await cache.connect()
    try:
        chunks = [b"q" * 640] * 2000
        assert await cache.set_audio_chunks("static:q", chunks)
        results = await asyncio.gather(*(cache.get_audio_chunks("static:q") for _ in range(30)))
        assert all(r == chunks for r in results)
        streams = await asyncio.gather(*(collect(cache, "static:q") for _ in range(10)))
        assert all(s == chunks for s in streams)
    finally:
        await cache.close()


async def test_pool_exhaustion_is_a_soft_timeout(
    redis_target: Any, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisCacheManager(
        redis_target.config(max_connections=1, pool_timeout=0.05), key_prefix=key_prefix
    )
    await cache.connect()
    try:
        caplog.set_level(logging.INFO, logger="voxcore")
        # hold the only slot with a command that blocks on the server for 0.5 s
        held = asyncio.create_task(
            cache._run("test_block", "", lambda r: r.blpop([f"{key_prefix}nothing"], 0.5))
        )
        await asyncio.sleep(0.05)
        assert await cache.get_text("summary:session:p") is None
        assert "pool exhausted" in events(caplog, "redis_error")[-1]["error"]
        await held
        assert await cache.set_text("summary:session:p", "free again", 10)  # breaker stayed closed
    finally:
        await cache.close()
