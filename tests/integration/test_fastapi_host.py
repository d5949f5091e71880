"""examples/fastapi_host under a real uvicorn (a subprocess, ``python -X dev``): 50 concurrent calls,
streamed turns and fragments, 404/503, and SIGTERM in the middle of turns with a clean shutdown."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.entrypoints.cli import example_wav
from voxcore.entrypoints.embedded_redis import EmbeddedRedis, free_port
from voxcore.simulator import OpenAISimulator

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "examples" / "fastapi_host"
KEY = "sk-fastapi-host"
PREFIX = "host:"
# Python warnings and asyncio's complaints about what was left behind; asyncio's slow-callback
# notes under -X dev ("Executing ... took 0.2 seconds") depend on the machine's load, not on us.
PROBLEMS = re.compile(
    r"Warning:|Traceback|never awaited|Task was destroyed|Unclosed|unclosed|Exception in|ERROR", re.MULTILINE
)


class App:
    def __init__(self, proc: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
        self.proc = proc
        self.base_url = base_url
        self.log = log

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def start_app(redis_url: str, simulator: OpenAISimulator, log: Path) -> App:
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "VOXCORE_", "OPENAI_", "OTEL_"))
    }
    env |= {
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": simulator.base_url,
        "OPENAI_API_KEY": KEY,
        "VOXCORE_CACHE__KEY_PREFIX": PREFIX,
        "VOXCORE_LLM__PRELOAD": "false",
    }
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-X",
                "dev",
                "-m",
                "uvicorn",
                "--app-dir",
                str(APP_DIR),
                "app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "30",
            ],  # fmt: skip
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    app = App(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}:\n{app.stderr()[-3000:]}")
        try:
            if httpx.get(f"{app.base_url}/calls", timeout=1).status_code == 200:
                return app
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the app did not answer within 60 s:\n{app.stderr()[-3000:]}")


#: uvicorn re-raises SIGTERM after its graceful shutdown, so a clean stop exits by that signal.
CLEAN_EXIT = (0, -signal.SIGTERM)


async def stop_app(app: App, within_s: float = 60) -> int:
    """SIGTERM, then wait for the exit without blocking the loop (the simulator serves in it)."""
    if app.proc.poll() is None:
        app.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + within_s
    while app.proc.poll() is None:
        if time.monotonic() > deadline:
            app.proc.kill()
            app.proc.wait()
            raise AssertionError(f"the app did not stop within {within_s} s:\n{app.stderr()[-3000:]}")
        await asyncio.sleep(0.05)
    return app.proc.returncode


async def no_open_connections(simulator: OpenAISimulator) -> bool:
    for _ in range(100):
        if simulator.open_connections == 0:
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def simulator() -> AsyncIterator[OpenAISimulator]:
    async with OpenAISimulator(api_key=KEY, chars_per_chunk=4, inter_chunk_delay_ms=2) as sim:
        yield sim


async def load_fragment(redis_url: str, name: str) -> int:
    cache = RedisCacheManager(RedisConfig(url=redis_url), key_prefix=PREFIX)
    await cache.connect()
    try:
        result = await cache.load_audio_file(f"static:{name}", str(example_wav()))
        assert result.ok
        chunks = await cache.get_audio_chunks(f"static:{name}")
        assert chunks
        return sum(len(c) for c in chunks)
    finally:
        await cache.close()


async def test_fifty_concurrent_calls_fragments_and_errors(
    private_redis: EmbeddedRedis, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    pcm_bytes = await load_fragment(private_redis.url, "greeting")
    app = start_app(private_redis.url, simulator, tmp_path / "app.log")
    try:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=app.base_url, timeout=60, limits=limits) as client:

            async def say(call: int, text: str) -> tuple[str, httpx.Headers]:
                response = await client.post(f"/calls/call-{call}/turns", json={"text": text})
                assert response.status_code == 200, response.text
                return response.text, response.headers

            # 50 calls at once, then two turns at once on every call (the library's turn lock).
            first = await asyncio.gather(*(say(i, f"Вопрос {i}") for i in range(50)))
            assert [text for text, _ in first] == [f"Вы сказали: Вопрос {i}" for i in range(50)]
            assert all(h["x-voxcore-safe"] == "true" and len(h["x-trace-id"]) == 32 for _, h in first)
            assert (await client.get("/calls")).json() == {"open": 50}
            both = await asyncio.gather(*(say(i, f"Ещё {i}-{n}") for i in range(50) for n in range(2)))
            assert sorted(text for text, _ in both) == sorted(
                f"Вы сказали: Ещё {i}-{n}" for i in range(50) for n in range(2)
            )
            assert simulator.connections_accepted == 50  # one warm connection per call, reused

            bad = await client.post("/calls/call-0/turns", json={"text": ""})
            assert bad.status_code == 422

            # a recorded fragment streams as WAV; a missing one is a 404
            audio = await client.get("/fragments/greeting")
            assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
            assert audio.content[:4] == b"RIFF" and len(audio.content) == 44 + pcm_bytes
            assert (await client.get("/fragments/nothing-here")).status_code == 404

            assert (await client.delete("/calls/call-7")).status_code == 204
            assert (await client.delete("/calls/call-7")).status_code == 404
            assert (await client.get("/calls")).json() == {"open": 49}

            private_redis.stop()  # Redis goes away: the fragment route says so
            down = await client.get("/fragments/greeting")
            assert down.status_code == 503 and down.headers["retry-after"] == "1"
            private_redis.start()
    finally:
        code = await stop_app(app)
    log = app.stderr()
    assert code in CLEAN_EXIT and "Finished server process" in log, log[-3000:]
    outage = [line for line in log.splitlines() if "ERROR" in line]
    assert outage and all("redis_error" in line for line in outage)  # the deliberate Redis stop, logged
    problems = "\n".join(line for line in log.splitlines() if "redis_error" not in line)
    assert not PROBLEMS.search(problems), problems[-3000:]
    assert await no_open_connections(simulator)  # every call's connection was closed
    # the host's logging got voxcore's lines, with the call's trace id; the lifespan closed all 50 calls
    assert log.count("INFO voxcore.llm.manager user_turn_finish trace=") == 150
    assert log.count("voxcore.llm.manager manager_shutdown trace=") == 50


async def test_sigterm_mid_turn_finishes_the_turns_then_shuts_down_cleanly(
    private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    async with OpenAISimulator(api_key=KEY, chars_per_chunk=2, inter_chunk_delay_ms=25) as slow:
        app = start_app(private_redis.url, slow, tmp_path / "app.log")
        try:
            async with httpx.AsyncClient(base_url=app.base_url, timeout=60) as client:
                started = asyncio.Event()
                begun = 0

                async def turn(call: int) -> str:
                    nonlocal begun
                    text = f"Долгий ответ номер {call} про страховку"
                    parts: list[str] = []
                    async with client.stream(
                        "POST", f"/calls/c{call}/turns", json={"text": text}
                    ) as response:
                        assert response.status_code == 200
                        async for piece in response.aiter_text():
                            parts.append(piece)
                            if len(parts) == 1:
                                begun += 1
                                if begun == 10:
                                    started.set()
                    return "".join(parts)

                turns = [asyncio.create_task(turn(i)) for i in range(10)]
                await asyncio.wait_for(started.wait(), 30)
                app.proc.send_signal(signal.SIGTERM)  # every turn is mid-stream now
                answers = await asyncio.gather(*turns)
            assert answers == [f"Вы сказали: Долгий ответ номер {i} про страховку" for i in range(10)]
        finally:
            code = await stop_app(app)
        log = app.stderr()
        assert code in CLEAN_EXIT and "Finished server process" in log, log[-3000:]
        assert not PROBLEMS.search(log), log[-3000:]
        assert "Shutting down" in log and "Application shutdown complete" in log
        assert await no_open_connections(slow)  # the lifespan closed every call
