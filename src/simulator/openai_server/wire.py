"""HTTP/1.1 over asyncio streams for the simulator: requests in, JSON, SSE and chunked bodies out."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

from voxcore.simulator.openai_server.plans import OWNED_BY, Fault, RecordedRequest, RequestPlan

log = logging.getLogger("voxcore.simulator.openai_server")

_MAX_HEAD_BYTES = 1 << 20

_MAX_BODY_BYTES = 32 << 20


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes
    request_id: str
    keep_alive: bool


@dataclass(slots=True)
class _Connection:
    id: int
    writer: asyncio.StreamWriter
    task: asyncio.Task[Any]
    busy: bool = False
    requests: int = 0


@dataclass(slots=True)
class _Timing:
    first_token_delay_ms: float
    inter_chunk_delay_ms: float
    chars_per_chunk: int | tuple[int, int]


class _Body:
    """Writes a response body either chunked (HTTP/1.1) or close-delimited (HTTP/1.0)."""

    def __init__(self, writer: asyncio.StreamWriter, chunked: bool) -> None:
        self.writer = writer
        self.chunked = chunked

    def frame(self, data: bytes) -> bytes:
        if not self.chunked or not data:
            return data
        return b"%x\r\n%s\r\n" % (len(data), data)

    async def send(self, *parts: bytes) -> None:
        self.writer.write(b"".join(self.frame(p) for p in parts))
        await self.writer.drain()

    async def finish(self) -> None:
        if self.chunked:
            self.writer.write(b"0\r\n\r\n")
            await self.writer.drain()


def _sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else _dumps(payload)
    return f"data: {data}\n\n".encode()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _error_payload(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _mask_key(key: str) -> str:
    return key if len(key) <= 8 else f"{key[:3]}{'*' * 12}{key[-4:]}"


def _retry_after_headers(seconds: float) -> list[tuple[str, str]]:
    return [("Retry-After", str(max(0, math.ceil(seconds)))), ("retry-after-ms", str(int(seconds * 1000)))]


class _HttpServer:
    """The connection and HTTP layer of :class:`OpenAISimulator`, which routes what this layer parses."""

    # Set up by OpenAISimulator.__init__.
    idle_timeout_s: float | None
    keep_alive_header: bool
    early_headers: bool
    first_token_delay_ms: float
    inter_chunk_delay_ms: float
    chars_per_chunk: int | tuple[int, int]
    requests: collections.deque[RecordedRequest]
    requests_by_path: collections.Counter[str]
    connections_accepted: int
    _connections: dict[int, _Connection]
    _closing: bool
    _request_event: asyncio.Event
    _seq: int

    async def _dispatch(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one parsed request; returns whether the connection stays open."""
        raise NotImplementedError

    async def _kill(self, connections: list[_Connection]) -> None:
        for conn in connections:
            conn.writer.transport.abort()
            conn.task.cancel()
        current = asyncio.current_task()
        tasks = [c.task for c in connections if c.task is not current]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing or task is None:
            writer.transport.abort()
            return
        self.connections_accepted += 1
        conn = _Connection(id=self.connections_accepted, writer=writer, task=task)
        self._connections[conn.id] = conn
        try:
            await self._serve_connection(conn, reader, writer)
        except asyncio.CancelledError:
            pass  # stop() / drop_connections(): the socket is already aborted
        except OSError:
            pass  # client went away mid-response
        except Exception:
            log.exception("openai simulator: connection %d failed", conn.id)
        finally:
            self._connections.pop(conn.id, None)
            writer.close()
            # stop() may cancel this task while it waits here; ending cancelled would make asyncio's
            # stream callback (task.exception()) log a spurious "Exception in callback" on 3.11.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_connection(
        self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while not self._closing:
            conn.busy = False
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    req = await self._read_request(reader, writer)
            except TimeoutError:
                return
            except _HttpError as err:
                payload = _error_payload(err.message, "invalid_request_error", None)
                await self._send_json(writer, None, err.status, payload, keep_alive=False)
                return
            if req is None:
                return
            conn.busy = True
            conn.requests += 1
            self.requests_by_path[req.path] += 1
            self.requests.append(
                RecordedRequest(
                    method=req.method,
                    path=req.path,
                    query=req.query,
                    headers=dict(req.headers),
                    body=req.body,
                    connection_id=conn.id,
                    index_on_connection=conn.requests,
                    received_at=time.monotonic(),
                )
            )
            self._request_event.set()
            if not await self._dispatch(req, reader, writer):
                return

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as err:
            if err.partial.strip():
                raise _HttpError(400, "Incomplete HTTP request head.") from None
            return None
        except asyncio.LimitOverrunError:
            raise _HttpError(431, "Request header fields too large.") from None
        lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) == 3 and parts[0] == "PRI" and parts[2] == "HTTP/2.0":
            return None  # h2 prior knowledge: not spoken here, just close
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _HttpError(400, f"Malformed request line: {lines[0][:100]!r}")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise _HttpError(400, f"Malformed header line: {line[:100]!r}")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = await self._read_body(reader, headers)
        split = urlsplit(target)
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
        self._seq += 1
        return _Request(
            method=method.upper(),
            path=unquote(split.path) or "/",
            query=split.query,
            version=version,
            headers=headers,
            body=body,
            request_id=f"req_sim{self._seq:012d}",
            keep_alive=keep_alive,
        )

    async def _read_body(self, reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
        try:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                chunks: list[bytes] = []
                total = 0
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0].strip(), 16)
                    if size == 0:
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":
                            pass  # trailers
                        return b"".join(chunks)
                    total += size
                    if total > _MAX_BODY_BYTES:
                        raise _HttpError(413, "Request body too large.")
                    chunks.append(await reader.readexactly(size))
                    await reader.readexactly(2)
            length = int(headers.get("content-length", "0") or "0")
        except ValueError:
            raise _HttpError(400, "Invalid chunk size or Content-Length.") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            raise _HttpError(400, "Incomplete request body.") from None
        if length < 0 or length > _MAX_BODY_BYTES:
            raise _HttpError(413, "Request body too large.")
        try:
            return await reader.readexactly(length) if length else b""
        except asyncio.IncompleteReadError:
            raise _HttpError(400, "Incomplete request body.") from None

    def _head(
        self, req: _Request | None, status: int, headers: Sequence[tuple[str, str]], *, keep_alive: bool
    ) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            f"Date: {formatdate(usegmt=True)}",
            "Server: voxcore-simulator",
            "openai-version: 2020-10-01",
            f"openai-organization: {OWNED_BY}",
        ]
        if req is not None:
            lines.append(f"x-request-id: {req.request_id}")
        lines.extend(f"{k}: {v}" for k, v in headers)
        if keep_alive:
            lines.append("Connection: keep-alive")
            if self.idle_timeout_s is not None and self.keep_alive_header:
                lines.append(f"Keep-Alive: timeout={math.ceil(self.idle_timeout_s)}")
        else:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _open_stream(
        self,
        writer: asyncio.StreamWriter,
        req: _Request,
        content_headers: Sequence[tuple[str, str]],
        *,
        fault: Fault | None,
        first_byte_delay_ms: float,
    ) -> tuple[_Body, bool]:
        """Start a streamed 200: headers (at once with ``early_headers``), the first-byte delay, a body.

        Returns the body writer and whether the connection stays open afterwards (HTTP/1.1, and no
        fault that cuts the stream).
        """
        chunked = req.version != "HTTP/1.0"
        keep_alive = req.keep_alive and chunked and fault is not Fault.TRUNCATED and fault is not Fault.STALL
        headers = list(content_headers)
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        head = self._head(req, 200, headers, keep_alive=keep_alive)
        if self.early_headers:
            writer.write(head)
            await writer.drain()
            head = b""
        if first_byte_delay_ms > 0:
            await asyncio.sleep(first_byte_delay_ms / 1000)
        writer.write(head)
        return _Body(writer, chunked), keep_alive

    async def _send_bytes(
        self,
        writer: asyncio.StreamWriter,
        req: _Request | None,
        status: int,
        body: bytes,
        *,
        keep_alive: bool,
        content_type: str = "application/json",
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra_headers]
        if req is not None and req.method == "HEAD":
            body = b""
        writer.write(self._head(req, status, headers, keep_alive=keep_alive) + body)
        await writer.drain()

    async def _send_json(
        self,
        writer: asyncio.StreamWriter,
        req: _Request | None,
        status: int,
        payload: Any,
        *,
        keep_alive: bool,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        body = _dumps(payload).encode()
        await self._send_bytes(writer, req, status, body, keep_alive=keep_alive, extra_headers=extra_headers)

    async def _send_error(
        self,
        writer: asyncio.StreamWriter,
        req: _Request,
        status: int,
        message: str,
        type_: str,
        code: str | None,
        param: str | None = None,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> bool:
        payload = _error_payload(message, type_, code, param)
        await self._send_json(
            writer, req, status, payload, keep_alive=req.keep_alive, extra_headers=extra_headers
        )
        return req.keep_alive

    async def _stall(self, reader: asyncio.StreamReader, seconds: float | None) -> None:
        """Wait until the client closes its side (or ``seconds`` pass), discarding anything it sends."""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(seconds):
                while await reader.read(65536):
                    pass

    async def _send_json_with_fault(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: _Request,
        payload: Any,
        plan: RequestPlan | None,
    ) -> bool:
        """Send a 200 JSON body, corrupted as the plan's body-level fault says. Returns keep-alive."""
        fault = plan.fault if plan is not None else None
        body = _dumps(payload).encode()
        if fault is Fault.MALFORMED or (fault is Fault.INVALID_JSON and "choices" not in payload):
            body = body[: max(1, len(body) // 3)]
            await self._send_bytes(writer, req, 200, body, keep_alive=req.keep_alive)
            return req.keep_alive
        if fault is Fault.TRUNCATED and plan is not None:
            half = body[: len(body) // 2]
            if plan.graceful:
                await self._send_bytes(writer, req, 200, half, keep_alive=req.keep_alive)
                return req.keep_alive
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            writer.write(self._head(req, 200, headers, keep_alive=False) + half)
            await writer.drain()
            return False
        if fault is Fault.STALL and plan is not None:
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            writer.write(self._head(req, 200, headers, keep_alive=False))
            await writer.drain()
            await self._stall(reader, plan.stall_s)
            return False
        await self._send_bytes(writer, req, 200, body, keep_alive=req.keep_alive)
        return req.keep_alive

    async def _bad_json(self, writer: asyncio.StreamWriter, req: _Request) -> bool:
        return await self._send_error(
            writer,
            req,
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
            "not valid JSON.)",
            "invalid_request_error",
            None,
        )

    async def _valid_body(
        self,
        req: _Request,
        writer: asyncio.StreamWriter,
        validate: Callable[[Any], tuple[int, str, str | None, str | None] | None],
    ) -> Any:
        """The request's parsed JSON body, or the keep-alive flag of the error response already sent."""
        try:
            body = json.loads(req.body)
        except ValueError:
            return await self._bad_json(writer, req)
        invalid = validate(body)
        if invalid is not None:
            status, message, param, code = invalid
            return await self._send_error(writer, req, status, message, "invalid_request_error", code, param)
        return body

    def _timing(self, plan: RequestPlan | None) -> _Timing:
        timing = _Timing(self.first_token_delay_ms, self.inter_chunk_delay_ms, self.chars_per_chunk)
        if plan is not None:
            if plan.first_token_delay_ms is not None:
                timing.first_token_delay_ms = plan.first_token_delay_ms
            if plan.inter_chunk_delay_ms is not None:
                timing.inter_chunk_delay_ms = plan.inter_chunk_delay_ms
            if plan.chars_per_chunk is not None:
                timing.chars_per_chunk = plan.chars_per_chunk
        return timing
