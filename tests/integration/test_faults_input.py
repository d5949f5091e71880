"""Bad input never kills a call: lone surrogates, hostile files, secrets, key isolation, whose Redis.

Issue 9, items 1 and 7-11, against real Redis, the simulator and real files (FIFOs, devices).
"""

from __future__ import annotations

import asyncio
import os
import stat
import struct
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RedisTarget
from voxcore.adapters.openai.config import OpenAIConfig
from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.core.domain.audio import MAX_CHUNKS
from voxcore.core.ports.errors import ConfigurationError, LLMError
from voxcore.entrypoints.container import Container
from voxcore.entrypoints.embedded_redis import EmbeddedRedis, port_answers
from voxcore.entrypoints.settings import load_settings
from voxcore.events import FIELDS_ATTR
from voxcore.testing.faults import HostileSSEServer, SSEScript

KEY = "sk-test-simulator"


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS_ATTR, {}) for r in caplog.records if r.getMessage() == name]


def wav_file(
    path: Path, *, rate: int = 16_000, channels: int = 1, bits: int = 16, frames: int = 1600
) -> Path:
    width = bits // 8
    fmt = struct.pack(
        "<HHIIHH",
        1,
        channels,
        rate,
        (rate * channels * width) & 0xFFFFFFFF,
        (channels * width) & 0xFFFF,
        bits,
    )
    pcm = bytes(i % 251 for i in range(frames * channels * width))
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


# -- item 1: one lone surrogate ---------------------------------------------------------------------------


@pytest.fixture
async def surrogate_server() -> AsyncIterator[HostileSSEServer]:
    # A model answer with half an emoji: the JSON escape \ud83d decodes to a lone surrogate.
    script = SSEScript(
        steps=[
            ("chunk", '{"is_safe": true, "aggression_score": 0, "answer": "Конечно '),
            ("chunk", "\\ud83d"),
            ("chunk", ' готово"}'),
        ],
        end="done",
    )
    async with HostileSSEServer(script=script) as server:
        yield server


async def test_a_lone_surrogate_in_an_answer_never_breaks_later_turns(
    surrogate_server: HostileSSEServer,
    redis_target: RedisTarget,
    key_prefix: str,
    raw_redis: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(
        env={
            "OPENAI_BASE_URL": surrogate_server.base_url,
            "OPENAI_API_KEY": KEY,
            "REDIS_URL": redis_target.url,
            "VOXCORE_CACHE__KEY_PREFIX": key_prefix,
            "VOXCORE_LOGGING__CONFIGURE": "false",
        }
    )
    container = Container(settings=settings)
    await container.init_resources()
    try:
        manager = await container.open_conversation("call-surrogate")
        try:
            for user_text in ("Здравствуйте", "А ещё \udc80 вопрос", "Спасибо"):
                try:
                    chunks = [c async for c in manager.process_user_turn(user_text)]
                except LLMError:
                    continue  # a documented error is allowed; anything else fails the test
                text = "".join(c.text_chunk for c in chunks)
                text.encode("utf-8")  # what reaches the caller can always be encoded
                assert "готово" in text
            history = manager.active_context.get_history_for_summary()
            assert len(history) == 6 and all(m["content"].encode("utf-8") for m in history)
            assert "\ufffd" in history[1]["content"] and "\ufffd" in history[2]["content"]
            assert surrogate_server.requests == 3  # every turn reached the provider
        finally:
            await manager.shutdown()
    finally:
        await container.shutdown_resources()


async def test_cache_text_methods_stay_soft_for_any_string(cache: RedisCacheManager) -> None:
    assert await cache.set_text("summary:session:s", "a\ud800b", 60)
    assert await cache.get_text("summary:session:s") == "a\ufffdb"
    assert await cache.get_text("summary:session:\ud800") is None  # refused key: soft, logged
    assert await cache.set_text("summary:session:\ud800", "x", 60) is False
    assert await cache.get_audio_chunks("static:\udfff") is None
    assert await cache.open_audio_stream("static:\udfff") is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(max_size=30), text=st.text(max_size=30))
async def test_fuzzed_keys_and_texts_never_raise(cache: RedisCacheManager, key: str, text: str) -> None:
    for candidate in (key, f"summary:session:{key}", f"static:{key}", f"voxcore:meta:{key}"):
        assert await cache.set_text(candidate, text, 5) in (True, False)
        stored = await cache.get_text(candidate)
        assert stored is None or stored == text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        chunk = text.encode("utf-8", "replace")
        assert await cache.set_audio_chunks(candidate, [chunk]) in (True, False)
        assert await cache.get_audio_chunks(candidate) in (None, [chunk])
        assert await cache.get_audio_format(candidate) is None
        stream = await cache.open_audio_stream(candidate)
        if stream is not None:
            assert [c async for c in stream] == [chunk]


# -- item 7: hostile files -------------------------------------------------------------------------------


async def test_a_fifo_is_refused_at_once_and_nothing_hangs(cache: RedisCacheManager, tmp_path: Path) -> None:
    fifo = tmp_path / "fragment.wav"
    os.mkfifo(fifo)
    result = await asyncio.wait_for(cache.load_audio_file("static:f", str(fifo)), 5)  # no writer, ever
    assert not result.ok and "not a regular file (a FIFO)" in result.reason
    link = tmp_path / "link.wav"
    link.symlink_to(fifo)
    assert "FIFO" in (await cache.load_audio_file("static:f", str(link))).reason
    if Path("/dev/zero").exists():
        assert "character device" in (await cache.load_audio_file("static:f", "/dev/zero")).reason


@pytest.mark.parametrize(
    ("path", "why"),
    [("a\x00b.wav", "NUL byte"), ("frag\ud800.wav", "unpaired surrogate"), ("", "empty path")],
)
async def test_unusable_paths_get_a_clear_reason(
    cache: RedisCacheManager, path: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    result = await cache.load_audio_file("static:p", path)
    assert not result.ok and why in result.reason
    for line in events(caplog, "load_audio_failed"):
        line["path"].encode("utf-8")  # the log line itself is always writable


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"rate": 1}, "1 Hz"),
        ({"rate": 4_000_000_000, "frames": 1}, "implausible"),
        ({"channels": 65_535, "frames": 1}, "65535 channels"),
    ],
)
async def test_header_lies_are_refused(
    cache: RedisCacheManager, tmp_path: Path, kwargs: dict[str, int], why: str
) -> None:
    result = await cache.load_audio_file("static:h", str(wav_file(tmp_path / "lie.wav", **kwargs)))
    assert not result.ok and why in result.reason


async def test_memory_stays_near_the_stored_size(cache: RedisCacheManager, tmp_path: Path) -> None:
    # 420 s of 8 kHz audio: more than MAX_CHUNKS 20 ms chunks; only what is stored is read.
    path = wav_file(tmp_path / "long.wav", rate=8_000, frames=8_000 * 420)
    tracemalloc.start()
    try:
        result = await cache.load_audio_file("static:long", str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stored = MAX_CHUNKS * 320
    assert result.ok and result.chunks == MAX_CHUNKS
    assert peak < 6 * stored  # the old reader held the file, a view and the chunks (and 1 Hz: +243 MB)


# -- item 8: secrets --------------------------------------------------------------------------------------


def test_no_secret_in_reprs_and_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    config = RedisConfig(host="10.0.0.5", port=6380, password="hunter2-redis")
    assert "hunter2" not in repr(config) and "hunter2" not in str(config) and "***" in repr(config)
    by_url = RedisConfig(url="redis://:hunter2-url@10.0.0.5:6380/0")
    assert "hunter2" not in repr(by_url) and "hunter2" not in by_url.describe()
    cache = RedisCacheManager(by_url)
    assert "hunter2" not in repr(cache) and "hunter2" not in repr(cache.config)
    settings = load_settings(env={"REDIS_URL": "redis://:hunter2-env@h:1/0", "REDIS_PASSWORD": "hunter2-pw"})
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)
    with pytest.raises(ConfigurationError) as info:
        OpenAIConfig(base_url="https://user:hunter2-llm@api.example.com/v1?x=1")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValueError) as bad_url:
        RedisConfig(url="http://:hunter2-scheme@h/0")
    assert "hunter2" not in str(bad_url.value)


# -- item 9: key isolation -----------------------------------------------------------------------------


async def test_prefixes_are_validated_and_internal_keys_reserved(
    redis_target: RedisTarget, raw_redis: redis.Redis, key_prefix: str
) -> None:
    with pytest.raises(ValueError, match="must end with ':'"):
        RedisCacheManager(RedisConfig(url=redis_target.url), key_prefix="tenant")
    with pytest.raises(ValueError, match="key namespace"):
        RedisCacheManager(RedisConfig(url=redis_target.url), key_prefix="t:static:")
    with pytest.raises(ConfigurationError, match="key prefix 't' must end with ':'"):
        load_settings(env={"VOXCORE_CACHE__KEY_PREFIX": "t"})
    tenant_a = RedisCacheManager(RedisConfig(url=redis_target.url), key_prefix=f"{key_prefix}t:")
    tenant_b = RedisCacheManager(RedisConfig(url=redis_target.url), key_prefix=f"{key_prefix}t:b:")
    await tenant_a.connect()
    await tenant_b.connect()
    try:
        assert await tenant_b.set_audio_chunks("static:x", [b"b's"])
        # tenant t: cannot reach tenant t:b:'s static:x (the key would be "b:static:x")
        assert await tenant_a.set_audio_chunks("b:static:x", [b"a's"]) is False
        assert await tenant_a.get_audio_chunks("b:static:x") is None
        assert await tenant_b.get_audio_chunks("static:x") == [b"b's"]
        # the format hash and previous versions cannot be written through the public API
        assert await tenant_b.set_text("voxcore:meta:static:x", "junk", 60) is False
        assert await tenant_b.set_audio_chunks("voxcore:prev:static:x", [b"junk"]) is False
        assert await raw_redis.exists(f"{key_prefix}t:b:voxcore:prev:static:x") == 0
    finally:
        await tenant_a.close()
        await tenant_b.close()


# -- items 10 and 11: whose Redis ----------------------------------------------------------------------


def test_explicit_config_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:7000/3")
    monkeypatch.setenv("REDIS_PASSWORD", "from-env")
    config = RedisConfig(host="10.1.1.1", port=6390)
    assert config.url is None and config.describe() == "redis://10.1.1.1:6390/0"
    assert config.password == "from-env"  # what was not given is filled from the environment
    assert RedisConfig(url="redis://10.2.2.2:1/0").url == "redis://10.2.2.2:1/0"
    assert RedisConfig().url == "redis://elsewhere:7000/3"  # nothing given: the environment decides
    monkeypatch.setenv("REDIS_DB", "5")
    assert RedisConfig(host="h").db == 5 and RedisConfig(host="h", db=0).db == 0


async def test_embedded_redis_has_a_random_password_and_a_private_dir(tmp_path: Path) -> None:
    data = tmp_path / "demo-redis"
    data.mkdir(mode=0o755)
    with EmbeddedRedis(data_dir=data) as server:
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert server.password and server.password in server.url and server.password not in server.safe_url
        assert server.password not in repr(server)
        anonymous = redis.Redis(host="127.0.0.1", port=server.port)
        with pytest.raises(redis.AuthenticationError):
            await anonymous.ping()
        await anonymous.aclose()
        client = redis.Redis.from_url(server.url)
        assert await client.ping()
        await client.aclose()
        assert port_answers("127.0.0.1", server.port)
    one, two = EmbeddedRedis(), EmbeddedRedis()
    try:
        assert one.password != two.password and len(one.password) >= 24
    finally:
        one.close()
        two.close()


async def test_cli_never_writes_to_an_unconfigured_local_redis(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "VOXCORE_"))}
    proc = await asyncio.create_subprocess_exec(
        str(Path(os.sys.executable).parent / "voxcore"),
        "probe-cache",
        "--rounds",
        "1",
        "--text-ttl",
        "1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    lines = out.decode().splitlines()
    started = [line for line in lines if '"embedded_redis_started"' in line]
    assert started, err.decode()[-2000:]
    assert (
        "127.0.0.1:6379" not in out.decode() and '"redis_target": "redis://127.0.0.1:6379' not in out.decode()
    )
    assert ":***@127.0.0.1:" in started[0]  # the embedded server's password is never printed


# -- item 12: a stalled stream is bounded by the turn deadline ----------------------------------------------


async def test_a_stream_stalled_after_three_chunks_ends_at_the_turn_deadline(
    redis_target: RedisTarget, key_prefix: str, raw_redis: redis.Redis
) -> None:
    script = SSEScript(
        steps=[
            ("chunk", '{"is_safe": true, "aggression_score": 0, "answer": "Раз'),
            ("chunk", " два"),
            ("chunk", " три"),
        ],
        end="stall",  # the connection stays open and silent: only a deadline ends the turn
    )
    async with HostileSSEServer(script=script) as server:
        settings = load_settings(
            env={
                "OPENAI_BASE_URL": server.base_url,
                "OPENAI_API_KEY": KEY,
                "REDIS_URL": redis_target.url,
                "VOXCORE_CACHE__KEY_PREFIX": key_prefix,
                "VOXCORE_LOGGING__CONFIGURE": "false",
                "VOXCORE_LLM__TIMEOUTS__TURN_S": "1.0",
            }
        )
        container = Container(settings=settings)
        await container.init_resources()
        try:
            manager = await container.open_conversation("call-stall")
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                received: list[str] = []
                with pytest.raises(LLMError) as info:
                    async for chunk in manager.process_user_turn("Считайте"):
                        received.append(chunk.text_chunk)
                elapsed = loop.time() - started
                assert "turn" in str(info.value) and info.value.transient
                assert "".join(received).startswith("Раз")  # what came before the stall was delivered
                assert elapsed < 10  # bounded by turn_s (1 s), not by the 30 s read timeout
            finally:
                await manager.shutdown()
        finally:
            await container.shutdown_resources()
