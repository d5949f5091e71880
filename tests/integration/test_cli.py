"""The ``voxcore`` console script, run as a subprocess against real Redis servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import redis

from tests.conftest import RedisTarget
from tests.unit.test_audio_domain import make_wav
from voxcore.core.domain.keys import EVENTS_INDEX_KEY, events_stream_key
from voxcore.entrypoints.cli import demo_manifest, example_wav, numbers_manifest
from voxcore.entrypoints.embedded_redis import EmbeddedRedis
from voxcore.entrypoints.manifest import read_manifest

VOXCORE = [sys.executable, "-m", "voxcore.entrypoints.cli"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "VOXCORE_"))}
    return subprocess.run(
        [*VOXCORE, *args], capture_output=True, text=True, env={**base, **(env or {})}, timeout=timeout
    )


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]  # every stdout line must be JSON


def test_load_audio_directory_skips_bad_files(
    redis_target: RedisTarget, key_prefix: str, tmp_path: Path
) -> None:
    for name, frames in (("hello", 16_000), ("bye", 8_001)):
        (tmp_path / f"{name}.wav").write_bytes(make_wav(16_000, 1, 2, frames)[0])
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEnope")
    done = run(
        "load-audio",
        str(tmp_path),
        "--redis-url",
        redis_target.url,
        env={"VOXCORE_CACHE__KEY_PREFIX": key_prefix},
    )
    assert done.returncode == 1  # something failed, and it says what
    summary = json_lines(done.stdout)[-1]
    assert summary["event"] == "load_audio_summary"
    assert (summary["loaded"], summary["failed"]) == (2, 1)
    assert (
        summary["failures"][0]["key"] == "static:broken" and "truncated" in summary["failures"][0]["reason"]
    )
    assert "[3/3]" in done.stderr  # progress display
    client = redis.Redis.from_url(redis_target.url)
    try:
        assert client.llen(f"{key_prefix}static:hello") == 50
        assert client.llen(f"{key_prefix}static:bye") == 26
        assert not client.exists(f"{key_prefix}static:broken")
        client.delete(*client.keys(f"{key_prefix}*"))
    finally:
        client.close()


def test_load_audio_manifest_with_missing_file(
    redis_target: RedisTarget, key_prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "a.wav").write_bytes(make_wav(8_000, 1, 1, 800)[0])
    manifest = tmp_path / "m.yml"
    manifest.write_text(
        "fragments:\n  - {key: a, file: a.wav, transcript: А}\n  - {key: static:b, file: gone.wav}\n"
    )
    done = run(
        "load-audio",
        str(manifest),
        "--redis-url",
        redis_target.url,
        env={"VOXCORE_CACHE__KEY_PREFIX": key_prefix},
    )
    summary = json_lines(done.stdout)[-1]
    assert (summary["loaded"], summary["failed"]) == (1, 1)
    assert "file not found" in summary["failures"][0]["reason"]
    client = redis.Redis.from_url(redis_target.url)
    try:
        client.delete(*client.keys(f"{key_prefix}*"))
    finally:
        client.close()


def test_bad_manifest_is_a_clear_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yml"
    manifest.write_text("fragments:\n  - {file: a.wav}\n")
    done = run("load-audio", str(manifest), "--embedded-redis")
    assert done.returncode == 2
    assert "needs a non-empty 'key'" in json_lines(done.stdout)[-1]["error"]


def test_probe_cache_on_embedded_redis(tmp_path: Path) -> None:
    done = run("probe-cache", "--embedded-redis", "--concurrency", "3", "--rounds", "2")
    assert done.returncode == 0, done.stderr
    lines = json_lines(done.stdout)
    names = [line["event"] for line in lines]
    for expected in (
        "embedded_redis_started",
        "warmup_done",
        "get_audio_chunks_hit",
        "get_audio_chunks_miss",
        "text_roundtrip",
        "text_expiry",
        "bench_read_ok",
        "bench_summary",
        "probe_done",
    ):
        assert expected in names, expected
    summary = next(line for line in lines if line["event"] == "bench_summary")
    assert summary["reads"] == 6 and {"first_chunk_ms_p50", "stream_ms_p95", "total_ms_p95"} <= set(summary)
    warm = next(line for line in lines if line["event"] == "warmup_done")
    with wave.open(str(example_wav())) as example:  # 20 ms chunks of the shipped example (~3 s)
        expected_chunks = -(-example.getnframes() // 320)
    assert warm["ok"] and warm["sample_rate"] == 16_000 and warm["chunks"] == expected_chunks
    done_line = next(line for line in lines if line["event"] == "probe_done")
    assert done_line["ok"] and all(done_line["checks"].values())
    assert names[-1] == "embedded_redis_stopped"


def test_probe_cache_with_bad_wav_fails_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "x.wav"
    with wave.open(str(bad), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
    done = run("probe-cache", "--embedded-redis", "--wav", str(bad), "--rounds", "1", "--text-ttl", "1")
    assert done.returncode == 1
    probe = next(line for line in json_lines(done.stdout) if line["event"] == "probe_done")
    assert probe["ok"] is False and probe["checks"]["warmup"] is False


def test_no_redis_anywhere_says_so(tmp_path: Path) -> None:
    # an explicit, unreachable location: the CLI must not silently pick another server
    done = run("probe-cache", "--redis-url", "redis://127.0.0.1:1/0", "--rounds", "1")
    assert done.returncode == 1
    assert "does not answer" in json_lines(done.stdout)[-1]["error"]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    done = run("demo", "--report-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = json_lines(done.stdout)
    summary = next(line for line in lines if line["event"] == "load_audio_summary")
    shipped = len(read_manifest(demo_manifest())) + len(read_manifest(numbers_manifest()))
    assert summary["loaded"] == shipped and summary["failed"] == 0
    assert [line["event"] for line in lines[-2:]] == ["embedded_redis_stopped", "demo_done"]
    assert any(line["event"] == "probe_done" and line["ok"] for line in lines)
    assert any(line["event"] == "demo_dialogue_done" for line in lines)
    (call,) = [line for line in lines if line["event"] == "demo_call_done"]
    (done,) = [line for line in lines if line["event"] == "demo_done"]
    assert done["call_audio"] == call["wav"] and len(done["files"]) == 5
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.is_file()) == [
        ".json",
        ".json",
        ".md",
        ".md",
        ".wav",
    ]
    assert (tmp_path / ".demo-redis" / "dump.rdb").is_file()  # a second run finds the TTS cache
    steps = [line for line in lines if line["event"] == "demo_call_step"]
    assert len(steps) == 8 and all(s["time_to_first_audio_ms"] is not None for s in steps)
    assert all(s["outcome"] == "ok" for s in steps)
    amounts = [s for s in steps if "say_money" in s["kind"]]
    assert len(amounts) == 4 and all(s["voices"] == ["static"] and s["misses"] == 0 for s in amounts)
    assert sum(s["misses"] for s in steps if s["pass_no"] == 2) == 0  # second pass: TTS from the cache
    with wave.open(call["wav"]) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16_000, 1, 2)
        assert w.getnframes() > 16_000 * 5  # several seconds of bot speech
    # The dashboard was served while the demo ran, and the call's events stay in the demo's Redis.
    assert done["dashboard"].startswith("http://127.0.0.1:") and "/dashboard?token=" in done["dashboard"]
    assert (tmp_path / ".demo-redis" / "events.secret").is_file()
    with EmbeddedRedis(data_dir=tmp_path / ".demo-redis") as server:
        client = redis.Redis.from_url(server.url)
        index = [json.loads(f[b"d"])["session_id"] for _, f in client.xrange(EVENTS_INDEX_KEY)]
        assert "demo-call-pass-1" in index
        kinds = {f[b"t"].decode() for _, f in client.xrange(events_stream_key("demo-call-pass-1"))}
        assert {"call_started", "user_text", "answer_text", "turn", "hybrid_item", "call_ended"} <= kinds
        client.close()


def test_missing_redis_server_binary_is_a_clear_error(tmp_path: Path) -> None:
    python_dir = str(Path(sys.executable).parent)
    done = run("probe-cache", "--embedded-redis", env={"PATH": python_dir})
    assert done.returncode == 2
    assert "no redis-server binary on PATH" in json_lines(done.stdout)[-1]["error"]


def test_demo_without_espeak_stops_with_one_clear_line(tmp_path: Path) -> None:
    # No espeak-ng and no provider: the only voice left would be the simulator's test tones.
    env = {"VOXCORE_VOICE__ESPEAK__BINARY": "no-espeak-here", "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}
    done = run("demo", "--report-dir", str(tmp_path), env=env)
    assert done.returncode == 2  # a configuration error
    errors = [line for line in json_lines(done.stdout) if line["event"] == "error"]
    assert len(errors) == 1 and "espeak-ng" in errors[0]["error"] and "apt-get install" in errors[0]["error"]
    assert not list(tmp_path.glob("demo_call_*"))
