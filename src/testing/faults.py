"""Real network faults for tests and benchmarks: a stalling/delaying TCP proxy and a hostile SSE server.

Both bind 127.0.0.1 on a free port and are plain asyncio servers (no mocks): the code under test
talks to them over real sockets exactly as it talks to Redis or an LLM provider.

* :class:`FaultProxy` sits in front of a real server (Redis). ``mode="pass"`` forwards both ways;
  ``"stall"`` keeps accepting connections and reading requests but never answers (a half-open
  server: the TCP handshake succeeds, nothing comes back); ``"delay"`` forwards replies
  ``delay_s`` late. The mode can change at any time and applies to connections already open.
* :class:`HostileSSEServer` answers ``POST /v1/chat/completions`` with an OpenAI-style SSE stream
  that follows a script: some chunks, then a stall (the connection stays open, nothing more is
  sent), a cut, or raw bytes of the test's choosing. ``GET /v1/models`` answers so a client's
  handshake succeeds.
* :func:`cancel_at_random_point` cancels a call at a random point and reports whether the
  cancellation was honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

ProxyMode = Literal["pass", "stall", "delay"]


class FaultProxy:
    """A TCP proxy on 127.0.0.1 that forwards, stalls or delays (see the module docstring).

    Args:
        target_host: The real server's host.
        target_port: The real server's port.
        mode: Initial mode.
        delay_s: Reply delay in ``delay`` mode.
    """

    def __init__(self, target_host: str, target_port: int, *, mode: ProxyMode = "pass", delay_s: float = 0.0):
        self.target_host = target_host
        self.target_port = target_port
        self.mode: ProxyMode = mode
        self.delay_s = delay_s
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The proxy's port (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, password: str | None = None, db: int = 0) -> str:
        """A ``redis://`` URL through the proxy."""
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    async def start(self) -> FaultProxy:
        """Listen on a free 127.0.0.1 port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        """Close the listener and every proxied connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()  # the handlers see EOF and end by themselves
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def drop_connections(self) -> None:
        """Close every proxied connection now (clients see a reset/EOF)."""
        for writer in list(self._writers):
            writer.close()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            if self.mode == "stall":
                # Half-open: accepted, but the server behind is never reached and nothing comes back.
                while self.mode == "stall" and await reader.read(65536):
                    pass
                if self.mode == "stall":
                    return
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
            self._writers.add(upstream_writer)
            await asyncio.gather(
                self._pump(reader, upstream_writer, replies=False),
                self._pump(upstream_reader, writer, replies=True),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            if task is not None:
                self._tasks.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if self.mode == "stall":
                    continue  # swallowed: requests never arrive, replies never leave
                if replies and self.mode == "delay" and self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()


SSEStep = tuple[Literal["chunk"], str] | tuple[Literal["raw"], bytes] | tuple[Literal["sleep"], float]


@dataclass
class SSEScript:
    """What the hostile server sends for one chat completion.

    Attributes:
        steps: In order: ``("chunk", content_delta)`` sends one OpenAI-style delta event,
            ``("raw", bytes)`` sends bytes as they are, ``("sleep", seconds)`` pauses.
        end: ``stall`` (keep the connection open and send nothing more), ``cut`` (close it
            without ``[DONE]``) or ``done`` (finish properly).
    """

    steps: Sequence[SSEStep] = ()
    end: Literal["stall", "cut", "done"] = "stall"


@dataclass
class HostileSSEServer:
    """An OpenAI-compatible endpoint that misbehaves on purpose (see the module docstring).

    Attributes:
        script: What every chat completion gets.
        model: The model name it reports.
    """

    script: SSEScript = field(default_factory=SSEScript)
    model: str = "hostile-1"
    requests: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def start(self) -> HostileSSEServer:
        """Listen on a free 127.0.0.1 port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        """Close everything, stalled streams included."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()  # a stalled stream sees EOF and ends by itself
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        for task in list(self._tasks):
            task.cancel()
        self._server = None

    async def __aenter__(self) -> HostileSSEServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                if method == "GET" and path.rstrip("/").endswith("/models"):
                    body = json.dumps({"object": "list", "data": [{"id": self.model, "object": "model"}]})
                    writer.write(_response(200, "application/json", body.encode()))
                    await writer.drain()
                    continue
                if method == "POST" and path.endswith("/chat/completions"):
                    self.requests += 1
                    await self._stream(reader, writer)
                    return
                writer.write(_response(404, "application/json", b'{"error": {"message": "not found"}}'))
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"connection: close\r\n\r\n"
        )
        await writer.drain()
        for step in self.script.steps:
            if step[0] == "chunk":
                event = {
                    "id": "chatcmpl-hostile",
                    "object": "chat.completion.chunk",
                    "model": self.model,
                    "choices": [{"index": 0, "delta": {"content": step[1]}, "finish_reason": None}],
                }
                writer.write(f"data: {json.dumps(event)}\n\n".encode())
            elif step[0] == "raw":
                writer.write(step[1])
            else:
                await asyncio.sleep(step[1])
            await writer.drain()
        if self.script.end == "done":
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
        elif self.script.end == "stall":
            while await reader.read(65536):  # silent until the client (or stop()) closes the connection
                pass


def _response(status: int, content_type: str, body: bytes) -> bytes:
    reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


TrialOutcome = Literal["cancelled", "finished_first", "swallowed", "error"]


async def cancel_at_random_point(
    start: Callable[[], Awaitable[object]], rng: random.Random, *, max_delay_s: float = 0.0005
) -> TrialOutcome:
    """Start a call, cancel it at a random point, and say whether the cancellation was honoured.

    The point is either a random number of event-loop steps (0-15: lands on each ``await`` inside
    the client library in turn) or a random delay up to ``max_delay_s`` (lands inside network waits).

    Returns:
        ``cancelled`` (honoured), ``finished_first`` (the call ended before the cancel), ``swallowed``
        (``task.cancel()`` was called on a running task and it still returned normally) or ``error``
        (it raised something else).
    """
    task = asyncio.ensure_future(start())
    if rng.random() < 0.7:
        for _ in range(rng.randrange(16)):
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(rng.uniform(0, max_delay_s))
    if task.done():
        with contextlib.suppress(BaseException):
            task.result()
        return "finished_first"
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    except Exception:
        return "error"
    return "swallowed"
