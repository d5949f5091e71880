"""Test helpers for the live events: a ``voxcore serve`` child process and an SSE client that resumes.

The SSE client parses the wire format itself (as a browser's EventSource does), so tests see every
field the server sent: ids, event names, ``retry:`` hints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from voxcore.entrypoints.embedded_redis import free_port

SECRET = "test-events-secret"


@dataclass
class SSEEvent:
    """One dispatched SSE block."""

    id: str | None
    event: str
    data: str
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


async def sse_stream(
    client: httpx.AsyncClient, url: str, *, headers: Mapping[str, str] | None = None
) -> AsyncIterator[SSEEvent | httpx.Response]:
    """GET ``url`` as an event stream: first the response (status, headers), then every block.

    A block with only ``retry:`` (or only an ``id:``) is yielded too (event ``""``), so tests see hints.
    """
    async with client.stream("GET", url, headers=dict(headers or {})) as response:
        yield response
        if response.status_code != 200:
            await response.aread()
            return
        event_id: str | None = None
        name, data, retry, seen = "", [], None, False
        async for line in response.aiter_lines():
            if line == "":
                if seen:
                    yield SSEEvent(event_id, name if (name or data) else "", "\n".join(data), retry)
                name, data, retry, seen = "", [], None, False
                event_id = None
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            seen = True
            if key == "id":
                event_id = value
            elif key == "event":
                name = value
            elif key == "data":
                data.append(value)
            elif key == "retry":
                retry = int(value)


@dataclass
class ServeProcess:
    """``voxcore serve`` in a child process on a free 127.0.0.1 port, its JSON log lines collected."""

    redis_url: str
    key_prefix: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    lines: list[str] = field(default_factory=list)
    _proc: subprocess.Popen[str] | None = None
    _pump: threading.Thread = field(default_factory=threading.Thread)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ServeProcess:
        env = {
            **os.environ,
            "VOXCORE_EVENTS__SECRET": SECRET,
            "VOXCORE_CACHE__KEY_PREFIX": self.key_prefix,
            **self.env,
        }
        env.pop("REDIS_URL", None)
        # A cluster or Sentinel deployment comes in through the settings' environment (env), not a URL.
        standalone = env.get("VOXCORE_REDIS__MODE", "standalone") == "standalone"
        where = ["--redis-url", self.redis_url] if standalone else []
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "voxcore.entrypoints.cli",
                "serve",
                *where,
                "--port",
                str(self.port),
                "--log-level",
                "INFO",
            ],  # fmt: skip
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()
        proc = self._proc

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if '"serve_ready"' in line:
                    ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("voxcore serve did not start:\n" + "\n".join(self.lines[-30:]))
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._pump.join(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log records ``name`` the server has printed so far."""
        out = []
        for line in list(self.lines):
            if f'"{name}"' in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
