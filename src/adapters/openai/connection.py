"""``OpenAIConnectionManager``: one phone call's warm ``httpx.AsyncClient`` to the LLM provider."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Final, Self

import httpx
from opentelemetry import metrics, trace

from voxcore.adapters.openai._errors import error_for_exception, error_for_status
from voxcore.adapters.openai.concurrency import gate_for
from voxcore.adapters.openai.config import OpenAIConfig
from voxcore.core.ports.errors import LLMError, LLMTimeoutError
from voxcore.core.ports.llm import LLMConnectionManager
from voxcore.events import emit

log = logging.getLogger("voxcore.llm.conn")

_tracer = trace.get_tracer("voxcore.llm")
_meter = metrics.get_meter("voxcore.llm")
#: GenAI semantic-convention buckets for durations in seconds (0.01 s .. 82 s, doubling).
DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
_handshake_duration = _meter.create_histogram(
    "voxcore.llm.handshake.duration",
    unit="s",
    description="Connection handshake (connect + one light request) to the LLM provider.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
)

#: Key of ``httpx.Response.extensions`` holding whether the request reused an open connection.
REUSED_EXTENSION: Final = "voxcore.connection_reused"
# Where a request keeps its probe (its "trace" entry goes once the connection is known).
_PROBE_EXTENSION: Final = "voxcore.connect_probe"
# httpcore trace events that mean "this request is opening a new connection" (TCP or unix socket,
# direct or through a SOCKS proxy: the prefix is the httpcore module that traces it).
_CONNECT_STARTED: Final = (".connect_tcp.started", ".connect_unix_socket.started")
_CONNECT_COMPLETE: Final = (".connect_tcp.complete", ".connect_unix_socket.complete")

_ssl_lock = threading.Lock()
_ssl_context: ssl.SSLContext | None = None


def shared_ssl_context() -> ssl.SSLContext:
    """The process-wide client SSL context, created on first use (building one costs ~15 ms).

    It is ``httpx.create_ssl_context()``: ``ssl.create_default_context()`` with certifi's CA bundle, or
    ``SSL_CERT_FILE``/``SSL_CERT_DIR`` when set. httpcore sets the ALPN protocols on it before each TLS
    connect, so every manager of the process should agree on ``http2``; its other settings are
    read-only after creation.
    """
    global _ssl_context
    context = _ssl_context
    if context is None:
        with _ssl_lock:
            context = _ssl_context
            if context is None:
                context = _ssl_context = httpx.create_ssl_context()
    return context


class _ConnectProbe:
    """httpcore ``trace`` extension of one request: did it open a new connection?

    httpcore reports ``connection.connect_tcp.*`` only when the pool has no idle connection to hand the
    request and dials a new one, inside that request's own trace; any other event (sending headers, ...)
    proves the request went out. So: events seen and no connect -> the request reused a connection.
    """

    __slots__ = ("seen", "connected", "_chained", "_on_connect", "_extensions")

    def __init__(
        self, chained: Any, on_connect: Callable[[], None], extensions: dict[str, Any] | None = None
    ) -> None:
        self.seen = False
        self.connected = False
        self._chained = chained
        self._on_connect = on_connect
        # The request's extensions (httpcore shares the dict): the probe leaves it once it knows.
        self._extensions = extensions if chained is None else None

    async def __call__(self, name: str, info: dict[str, Any]) -> None:
        self.seen = True
        if name.endswith(_CONNECT_STARTED):
            self.connected = True
        elif name.endswith(_CONNECT_COMPLETE):
            self._on_connect()
        elif self._extensions is not None and not name.startswith("connection."):
            # The request is on its connection (reused or dialed): nothing more to learn. Leaving the
            # extensions spares the request's remaining phases a callback each (the TTFT path).
            self._extensions.pop("trace", None)
            self._extensions = None
        if self._chained is not None:  # a trace extension the caller set itself keeps working
            await self._chained(name, info)


def connection_reused(response: httpx.Response) -> bool | None:
    """Whether ``response``'s request went over an already open connection.

    Known for clients built by :class:`OpenAIConnectionManager` (their event hooks attach a httpcore
    trace probe to every request); ``None`` for other clients or transports that do not trace.
    """
    value = response.extensions.get(REUSED_EXTENSION)
    return value if isinstance(value, bool) else None


#: The warm-up never pings more often than this, whatever the server's keep-alive.
MIN_WARMUP_INTERVAL_S: Final = 0.5
# Share of a server's keep-alive timeout after which an idle connection is pinged.
_KEEPALIVE_MARGIN: Final = 0.6
_KEEPALIVE_TIMEOUT: Final = re.compile(r"timeout\s*=\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


def keep_alive_timeout(headers: httpx.Headers) -> float | None:
    """Seconds from a ``Keep-Alive: timeout=N`` response header, when the server sent one."""
    raw = headers.get("keep-alive")
    match = _KEEPALIVE_TIMEOUT.search(raw) if raw else None
    if match is None:
        return None
    value = float(match.group(1))
    return value if value > 0 else None


class _TrackedStream(httpx.AsyncByteStream):
    """A response body that tells its manager when it ends (read to the end, or closed early)."""

    __slots__ = ("_inner", "_manager", "_complete", "_closed")

    def __init__(self, inner: httpx.AsyncByteStream, manager: OpenAIConnectionManager) -> None:
        self._inner = inner
        self._manager = manager
        self._complete = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._inner:
            yield part
        self._complete = True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._inner.aclose()
        finally:
            self._manager._request_ended(complete=self._complete)


class _TrackingTransport(httpx.AsyncBaseTransport):
    """Counts the requests in flight and learns the server's keep-alive, around the real transport."""

    def __init__(self, inner: httpx.AsyncBaseTransport, manager: OpenAIConnectionManager) -> None:
        self._inner = inner
        self._manager = manager

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        manager = self._manager
        idle_s = manager._request_started()
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            manager._request_ended(complete=False)
            raise
        probe = request.extensions.get(_PROBE_EXTENSION)
        manager._observe(response.headers, idle_s, isinstance(probe, _ConnectProbe) and probe.connected)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _TrackedStream(response.stream, manager)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class OpenAIConnectionManager(LLMConnectionManager[httpx.AsyncClient]):
    """Owns one phone call's warm connection to an OpenAI-compatible provider.

    :meth:`start` builds one ``httpx.AsyncClient`` (HTTP/2 when negotiated, keep-alive, the process-wide
    SSL context) and does the handshake: one light ``GET config.warmup_endpoint`` that opens and
    measures the connection and checks the key. A background loop then keeps the connection warm: once
    the client has been idle for the warm-up interval it pings again (and, with ``warmup_completion``,
    sends a 1-token completion). Ping failures are logged and never stop the loop.

    The warm-up never disturbs a turn (on llama.cpp any new request ends the stream that is running):
    idle time counts from the *end* of the last response, and no ping goes out while a request of this
    manager is in flight, nor while any request to the same base URL holds a slot of the process's
    :class:`~voxcore.adapters.openai.concurrency.ProviderGate` (``max_concurrent_requests``). The
    interval (:attr:`warmup_interval_s`) adapts to the server: at most 60 % of a ``Keep-Alive:
    timeout=N`` it announced, and at most half of an idle time after which its connection was found
    closed (learned when a request after that idle time had to dial anew), never below 0.5 s (unless
    configured so).

    Connection reuse is observed without touching private httpx state: the client's request hook
    attaches a httpcore ``trace`` probe to every request, and the response hook stores in
    ``response.extensions`` whether the request dialed a new connection (see :func:`connection_reused`).
    :attr:`connections_opened` counts the connections dialed.

    Args:
        config: Provider, timeouts and warm-up settings.
        ssl_context: TLS settings; defaults to :func:`shared_ssl_context`.
        clock: Seconds for measuring durations (``time.perf_counter``; injectable for tests).
        tracer: OpenTelemetry tracer (defaults to the ``voxcore.llm`` tracer of the global provider).
        meter: OpenTelemetry meter for ``voxcore.llm.handshake.duration`` (defaults to the global one).

    Events (logger ``voxcore.llm.conn``): ``conn_handshake_start`` ``{base_url}``,
    ``conn_handshake_finish`` ``{ms, status, ok}``, ``keep_alive_ping_start``,
    ``keep_alive_ping_finish`` ``{ms, ok, status}``, ``keep_alive_ping_failed``,
    ``keep_alive_completion`` ``{ms, ok}``, ``keep_alive_loop_failed``, ``conn_closed``.
    """

    def __init__(
        self,
        config: OpenAIConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.perf_counter,
        tracer: trace.Tracer | None = None,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._config = config
        self._ssl_context = ssl_context
        self._clock = clock
        self._tracer = tracer or _tracer
        self._handshake_duration = (
            _handshake_duration
            if meter is None
            else meter.create_histogram(
                "voxcore.llm.handshake.duration",
                unit="s",
                description="Connection handshake (connect + one light request) to the LLM provider.",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )
        )
        self._client: httpx.AsyncClient | None = None
        self._starting: asyncio.Task[None] | None = None
        self._warmup_task: asyncio.Task[None] | None = None
        self._last_end = 0.0  # event-loop time the last response ended (or the last request failed)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool_warm = False  # the last response was read to its end: its connection is pooled
        self._server_keepalive_s: float | None = None
        self._learned_close_s: float | None = None
        self._connections_found_closed = 0
        self._wake = asyncio.Event()
        self._connections_opened = 0
        self._pings = 0
        self._ping_failures = 0
        self._handshake_ms: float | None = None
        self._ping_timeout = httpx.Timeout(
            connect=config.connect_timeout_s,
            read=min(config.read_timeout_s, max(1.0, config.warmup_interval_s)),
            write=config.write_timeout_s,
            pool=config.pool_timeout_s,
        )

    # -- state ------------------------------------------------------------------------------------

    @property
    def config(self) -> OpenAIConfig:
        """The settings this manager was built with."""
        return self._config

    @property
    def is_started(self) -> bool:
        """True between a successful :meth:`start` and :meth:`shutdown`."""
        return self._client is not None

    @property
    def connections_opened(self) -> int:
        """Connections (TCP or unix socket) the client dialed so far, handshake included."""
        return self._connections_opened

    @property
    def pings(self) -> int:
        """Warm-up pings sent so far (failed ones included)."""
        return self._pings

    @property
    def ping_failures(self) -> int:
        """Warm-up pings that failed (error status, timeout, connection error)."""
        return self._ping_failures

    @property
    def in_flight(self) -> int:
        """Requests of this manager's client whose response has not ended yet."""
        return self._in_flight

    @property
    def warmup_interval_s(self) -> float:
        """The warm-up interval in force: the configured one, shortened to the server's keep-alive."""
        interval = self._config.warmup_interval_s
        if self._server_keepalive_s is not None:
            interval = min(interval, self._server_keepalive_s * _KEEPALIVE_MARGIN)
        if self._learned_close_s is not None:
            interval = min(interval, self._learned_close_s / 2)
        return max(interval, min(MIN_WARMUP_INTERVAL_S, self._config.warmup_interval_s))

    @property
    def connections_found_closed(self) -> int:
        """Requests that found the idle pooled connection closed by the server and dialed anew."""
        return self._connections_found_closed

    @property
    def handshake_ms(self) -> float | None:
        """Duration of the last successful handshake, in milliseconds."""
        return self._handshake_ms

    @staticmethod
    def connection_reused(response: httpx.Response) -> bool | None:
        """Whether ``response``'s request reused an open connection (see :func:`connection_reused`)."""
        return connection_reused(response)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the client, do the handshake, and start the warm-up loop (once; no-op when started).

        Concurrent callers share one handshake and all see its outcome.

        Raises:
            LLMAuthError: the provider refused the key (401/403).
            LLMTimeoutError: the provider cannot be reached (connect error or timeout) or did not answer.
            LLMError: another typed failure of the handshake request (see ``_errors``).
        """
        if self._client is not None:
            return
        task = self._starting
        if task is None:
            task = asyncio.get_running_loop().create_task(self._start(), name="voxcore-llm-handshake")
            self._starting = task
            task.add_done_callback(self._start_done)
        try:
            # Shielded: a caller that gives up must not abort the handshake other callers wait for.
            await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or current.cancelling() == 0):
                raise LLMTimeoutError("the connection manager was shut down while connecting") from None
            raise

    async def get_client(self) -> httpx.AsyncClient:
        """The warm client; starts the manager first when needed (see :meth:`start` for errors)."""
        client = self._client
        if client is None:
            await self.start()
            client = self._client
            if client is None:  # shut down right after the start finished
                raise LLMTimeoutError("the connection manager was shut down while connecting")
        return client

    async def shutdown(self) -> None:
        """Cancel the handshake or warm-up loop, close the client; safe to call twice."""
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        warmup, self._warmup_task = self._warmup_task, None
        if warmup is not None:
            warmup.cancel()
            await asyncio.gather(warmup, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
            emit(
                log,
                "conn_closed",
                logging.DEBUG,
                base_url=self._config.base_url,
                connections=self._connections_opened,
            )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    # -- internals --------------------------------------------------------------------------------

    def _build_client(self) -> httpx.AsyncClient:
        config = self._config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        hooks: dict[str, list[Callable[[Any], Awaitable[None]]]] = {
            "request": [self._on_request],
            "response": [self._on_response],
        }
        limits = httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_keepalive_connections,
            keepalive_expiry=config.keepalive_expiry_s,
        )
        return httpx.AsyncClient(
            base_url=config.base_url,
            headers=headers,
            timeout=httpx.Timeout(
                connect=config.connect_timeout_s,
                read=config.read_timeout_s,
                write=config.write_timeout_s,
                pool=config.pool_timeout_s,
            ),
            http2=config.http2,
            limits=limits,
            verify=self._ssl_context or shared_ssl_context(),
            event_hooks=hooks,
            transport=_TrackingTransport(
                httpx.AsyncHTTPTransport(
                    http2=config.http2,
                    limits=limits,
                    verify=self._ssl_context or shared_ssl_context(),
                ),
                self,
            ),
        )

    def _request_started(self) -> float | None:
        """Count a request in; returns how long the pooled connection had been idle, when it was."""
        idle_s = None
        if self._in_flight == 0:
            self._idle.clear()
            if self._pool_warm:
                idle_s = asyncio.get_running_loop().time() - self._last_end
        self._in_flight += 1
        return idle_s

    def _request_ended(self, *, complete: bool) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        self._pool_warm = complete
        self._last_end = asyncio.get_running_loop().time()
        if self._in_flight == 0:
            self._idle.set()

    def _observe(self, headers: httpx.Headers, idle_s: float | None, dialed: bool) -> None:
        """Learn the server's keep-alive from a response (its header, or a connection found closed)."""
        announced = keep_alive_timeout(headers)
        if announced is not None and announced != self._server_keepalive_s:
            self._server_keepalive_s = announced
            self._wake.set()
            emit(
                log,
                "keep_alive_learned",
                source="header",
                timeout_s=announced,
                interval_s=self.warmup_interval_s,
            )
        if dialed and idle_s is not None and idle_s < self._config.keepalive_expiry_s:
            # The pool held a connection, idle for idle_s, and the request had to dial anew: the server
            # closed it in the meantime. Ping sooner than that from now on.
            self._connections_found_closed += 1
            if self._learned_close_s is None or idle_s < self._learned_close_s:
                self._learned_close_s = idle_s
                self._wake.set()
                emit(
                    log,
                    "keep_alive_learned",
                    source="closed_connection",
                    idle_s=round(idle_s, 3),
                    interval_s=self.warmup_interval_s,
                )

    async def _on_request(self, request: httpx.Request) -> None:
        extensions = dict(request.extensions)
        probe = _ConnectProbe(extensions.get("trace"), self._count_connection, extensions)
        extensions["trace"] = extensions[_PROBE_EXTENSION] = probe
        request.extensions = extensions

    async def _on_response(self, response: httpx.Response) -> None:
        probe = response.request.extensions.get(_PROBE_EXTENSION)
        if isinstance(probe, _ConnectProbe) and probe.seen:
            response.extensions = {**response.extensions, REUSED_EXTENSION: not probe.connected}

    def _count_connection(self) -> None:
        self._connections_opened += 1

    def _start_done(self, task: asyncio.Task[None]) -> None:
        if self._starting is task:
            self._starting = None
        if not task.cancelled():
            task.exception()  # retrieved here: every awaiting caller re-raises it; nothing to log twice

    async def _start(self) -> None:
        config = self._config
        endpoint = config.warmup_endpoint
        emit(log, "conn_handshake_start", logging.DEBUG, base_url=config.base_url)
        client = self._build_client()
        started = self._clock()
        status: int | None = None
        attributes: dict[str, str | int] = {
            "server.address": config.server_address,
            "server.port": config.server_port,
        }
        with self._tracer.start_as_current_span(
            "llm.handshake", kind=trace.SpanKind.CLIENT, attributes=attributes
        ) as span:
            try:
                try:
                    response = await client.get(endpoint)
                except httpx.HTTPError as exc:
                    raise error_for_exception(exc, what=f"GET {endpoint}", base_url=config.base_url) from exc
                status = response.status_code
                span.set_attribute("http.response.status_code", status)
                if not response.is_success:
                    raise error_for_status(status, response.content, response.headers, what=f"GET {endpoint}")
            except BaseException as exc:
                elapsed = self._clock() - started
                error_type = str(status) if status is not None else type(exc).__name__
                span.set_status(trace.StatusCode.ERROR, str(exc))
                span.set_attribute("error.type", error_type)
                self._handshake_duration.record(elapsed, {**attributes, "error.type": error_type})
                emit(
                    log,
                    "conn_handshake_finish",
                    logging.WARNING,
                    ms=round(elapsed * 1000, 3),
                    status=status,
                    ok=False,
                    error_type=type(exc).__name__,
                    error=str(exc),
                )
                await client.aclose()
                raise
        elapsed = self._clock() - started
        self._handshake_duration.record(elapsed, attributes)
        self._handshake_ms = round(elapsed * 1000, 3)
        emit(log, "conn_handshake_finish", ms=self._handshake_ms, status=status, ok=True)
        self._client = client
        task = asyncio.get_running_loop().create_task(self._warmup_loop(), name="voxcore-llm-warmup")
        task.add_done_callback(self._warmup_done)
        self._warmup_task = task

    async def _warmup_loop(self) -> None:
        loop = asyncio.get_running_loop()
        gate = gate_for(self._config.base_url, self._config.max_concurrent_requests)
        while True:
            # Never while a request is in flight: on a one-request-at-a-time server a ping would end it.
            if self._in_flight:
                await self._idle.wait()
                continue
            interval = self.warmup_interval_s
            if gate is not None and gate.in_flight:  # another call's request to the same server
                await asyncio.sleep(min(interval, 0.25))
                continue
            # Ping only after the client has been idle for a whole interval, counted from the end of the
            # last response: a conversation's own requests keep the connection warm already.
            idle = loop.time() - self._last_end
            if idle < interval:
                self._wake.clear()  # set when the interval shrinks (a keep-alive was learned)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval - idle):
                        await self._wake.wait()
                continue
            client = self._client
            if client is None:
                return
            await self._ping(client)
            if self._config.warmup_completion:
                await self._warm_completion(client)

    def _warmup_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            emit(
                log,
                "keep_alive_loop_failed",
                logging.ERROR,
                error_type=type(exc).__name__,
                error=str(exc),
            )

    async def _ping(self, client: httpx.AsyncClient) -> bool:
        """One warm-up GET; logs its outcome and never raises (cancellation aside)."""
        config = self._config
        endpoint = config.warmup_endpoint
        self._pings += 1
        emit(log, "keep_alive_ping_start", logging.DEBUG, endpoint=endpoint)
        started = self._clock()
        status: int | None = None
        error: LLMError | None = None
        with self._tracer.start_as_current_span(
            "llm.keepalive_ping",
            kind=trace.SpanKind.CLIENT,
            attributes={"server.address": config.server_address, "server.port": config.server_port},
            record_exception=False,
        ) as span:
            try:
                response = await client.get(endpoint, timeout=self._ping_timeout)
                status = response.status_code
                span.set_attribute("http.response.status_code", status)
                if not response.is_success:
                    error = error_for_status(
                        status, response.content, response.headers, what=f"GET {endpoint}"
                    )
            except httpx.HTTPError as exc:
                error = error_for_exception(exc, what=f"GET {endpoint}", base_url=config.base_url)
            except Exception as exc:  # a ping must never kill the loop
                error = LLMError(f"GET {endpoint}: {type(exc).__name__}: {exc}")
            if error is not None:
                span.set_status(trace.StatusCode.ERROR, str(error))
                span.set_attribute("error.type", str(status) if status is not None else type(error).__name__)
        ms = round((self._clock() - started) * 1000, 3)
        emit(log, "keep_alive_ping_finish", logging.DEBUG, ms=ms, ok=error is None, status=status)
        if error is not None:
            self._ping_failures += 1
            emit(
                log,
                "keep_alive_ping_failed",
                logging.WARNING,
                status=status,
                error_type=type(error).__name__,
                error=str(error),
            )
        return error is None

    async def _warm_completion(self, client: httpx.AsyncClient) -> bool:
        """A 1-token non-streamed completion (keeps the model path warm); never raises."""
        config = self._config
        body = {
            "model": config.warmup_model,
            "messages": [{"role": "user", "content": "ping"}],
            "max_tokens": 1,
            "stream": False,
        }
        started = self._clock()
        status: int | None = None
        error = ""
        try:
            response = await client.post("/chat/completions", json=body)
            status = response.status_code
            if not response.is_success:
                error = str(
                    error_for_status(
                        status,
                        response.content,
                        response.headers,
                        what="POST /chat/completions",
                        model=config.warmup_model,
                    )
                )
        except httpx.HTTPError as exc:
            error = str(error_for_exception(exc, what="POST /chat/completions", base_url=config.base_url))
        except Exception as exc:  # the warm-up must never kill the loop
            error = f"{type(exc).__name__}: {exc}"
        ms = round((self._clock() - started) * 1000, 3)
        emit(
            log,
            "keep_alive_completion",
            logging.INFO if not error else logging.WARNING,
            ms=ms,
            ok=not error,
            status=status,
            model=config.warmup_model,
            **({"error": error} if error else {}),
        )
        return not error
