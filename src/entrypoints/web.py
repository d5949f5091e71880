"""The live events server: SSE streams of calls with exact resume, and the call dashboard (ASGI, Starlette).

Routes::

    GET /calls/{session_id}/events   SSE: one call's events (its token, or the operator token)
    GET /index/events                SSE: calls starting and ending (operator token)
    GET /dashboard                   the dashboard page (static HTML + one script, no build step)
    GET /healthz                     {"ok": true}

A token comes as ``?token=`` or ``Authorization: Bearer``; a missing or wrong one gets 403 and no
event. ``Last-Event-ID`` (or ``?last_event_id=`` for the first request) resumes exactly after that
event: the gap is replayed from the stream, then the stream goes live. An id that is no longer
stored gets a ``reset`` event (``{"oldest_id": ...}``) and the replay starts at the oldest event.
Needs the ``web`` extra (starlette, sse-starlette, uvicorn).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from voxcore.application.live_events import Reset, follow_events
from voxcore.core.domain.keys import session_hash
from voxcore.core.domain.live_events import InvalidEventIdError, parse_event_id, token_grants
from voxcore.core.ports.live_events import LiveEventSource, StreamUnavailable, SubscriberOverflow
from voxcore.entrypoints.settings import EventsSettings
from voxcore.events import emit

log = logging.getLogger("voxcore.web")

_ASSETS = "assets/dashboard"
_MAX_SESSION_ID = 256


class _EventStream(EventSourceResponse):
    """An SSE response that logs why it ended when the client stopped accepting bytes.

    The send timeout is enforced by one watchdog per response instead of a timer (a cancel scope)
    around every send, which cost more than the rest of delivering an event to a client: a send
    blocked for ``send_timeout`` is cancelled within ``send_timeout * 1.25`` and ends the response
    with :class:`SendTimeoutError`, as sse-starlette's own check does.
    """

    def __init__(self, *args: Any, label: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._label = label
        self._inflight: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            emit(log, "sse_client_cut", logging.WARNING, stream=self._label, reason="send_timeout")
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        timeout = self.send_timeout
        if timeout is None:
            await send(message)
            return
        task = asyncio.current_task()
        if task is None:  # not in a task: fall back to the library's per-send timer
            await super()._send_with_timeout(send, message)
            return
        loop = asyncio.get_running_loop()
        if self._watchdog is None:
            self._watchdog = loop.create_task(self._watch(float(timeout)), name="sse-send-watchdog")
        self._inflight[task] = loop.time()
        try:
            await send(message)
        except asyncio.CancelledError:
            if task in self._expired:
                self._expired.discard(task)
                task.uncancel()
                raise SendTimeoutError() from None
            raise
        finally:
            self._inflight.pop(task, None)

    async def _watch(self, limit_s: float) -> None:
        loop = asyncio.get_running_loop()
        period = max(limit_s / 4, 0.005)
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for task, since in list(self._inflight.items()):
                if now - since >= limit_s and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.query_params.get("token") or None


def _last_id(request: Request) -> str | None:
    # The header wins: on reconnection EventSource sends it (newer) with the URL of the first request.
    value = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or ""
    return value.strip() or None


def create_app(
    source: LiveEventSource, *, secret: str, settings: EventsSettings, lifespan: Any = None
) -> Starlette:
    """The ASGI app serving ``source``'s events and the dashboard.

    Args:
        source: Where events are read (the container's ``event_hub``).
        secret: The events secret (tokens are HMACs under it).
        settings: Heartbeat, per-client queue, send timeout, retry hint.
        lifespan: Starlette lifespan context (``voxcore serve`` opens and closes the container there).
    """

    def forbidden() -> Response:
        return JSONResponse({"error": "forbidden: a valid token for this call is required"}, status_code=403)

    def stream(session_id: str | None, last_id: str | None) -> Response:
        label = session_hash(session_id) if session_id is not None else "index"

        async def events() -> AsyncIterator[Any]:
            yield ServerSentEvent(retry=settings.retry_ms, comment="voxcore live events")
            sent = 0
            try:
                async for item in follow_events(
                    source, session_id, last_id=last_id, queue_size=settings.client_queue_size
                ):
                    if isinstance(item, Reset):
                        # An empty id clears the client's last id: a reconnection replays from the oldest.
                        data = json.dumps({"oldest_id": item.oldest_id, "last_event_id": last_id})
                        yield ServerSentEvent(data=data, event="reset", id="")
                        continue
                    sent += 1
                    yield item.sse  # encoded once per event, shared by every client
            except StreamUnavailable as exc:
                emit(log, "sse_stream_unavailable", logging.WARNING, stream=label, error=str(exc), sent=sent)
                yield ServerSentEvent(
                    data=json.dumps({"reason": "store_unavailable", "retry_ms": exc.retry_ms}),
                    event="unavailable",
                    retry=exc.retry_ms,
                )
            except SubscriberOverflow as exc:
                emit(
                    log, "sse_client_cut", logging.WARNING, stream=label, reason="slow_client", error=str(exc)
                )
                yield ServerSentEvent(
                    data=json.dumps({"reason": "slow_client", "detail": str(exc)}),
                    event="closed",
                    retry=settings.retry_ms,
                )

        return _EventStream(
            events(),
            label=label,
            ping=settings.heartbeat_s,
            send_timeout=settings.send_timeout_s,
            headers={"Cache-Control": "no-store"},
        )

    def checked_last_id(request: Request) -> str | None | Response:
        last_id = _last_id(request)
        if last_id is None:
            return None
        try:
            parse_event_id(last_id)
        except InvalidEventIdError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return last_id

    async def call_events(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        if not session_id or len(session_id) > _MAX_SESSION_ID:
            return JSONResponse({"error": "invalid session id"}, status_code=400)
        if not token_grants(secret, _token(request), session_id):
            emit(log, "sse_forbidden", logging.WARNING, stream=session_hash(session_id))
            return forbidden()
        last_id = checked_last_id(request)
        if isinstance(last_id, Response):
            return last_id
        return stream(session_id, last_id)

    async def index_events(request: Request) -> Response:
        if not token_grants(secret, _token(request), None):
            emit(log, "sse_forbidden", logging.WARNING, stream="index")
            return forbidden()
        last_id = checked_last_id(request)
        if isinstance(last_id, Response):
            return last_id
        return stream(None, last_id)

    async def dashboard(request: Request) -> Response:
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8")

    async def dashboard_script(request: Request) -> Response:
        return Response(_asset("dashboard.js"), media_type="text/javascript; charset=utf-8")

    async def dashboard_style(request: Request) -> Response:
        return Response(_asset("dashboard.css"), media_type="text/css; charset=utf-8")

    async def root(request: Request) -> Response:
        return RedirectResponse(f"/dashboard?{request.url.query}" if request.url.query else "/dashboard")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/", root),
            Route("/healthz", healthz),
            Route("/dashboard", dashboard),
            Route("/dashboard/dashboard.js", dashboard_script),
            Route("/dashboard/dashboard.css", dashboard_style),
            Route("/index/events", index_events),
            Route("/calls/{session_id}/events", call_events),
        ],
        lifespan=lifespan,
    )


def _asset(name: str) -> bytes:
    return (resources.files("voxcore.entrypoints") / _ASSETS / name).read_bytes()


def dashboard_url(host: str, port: int, token: str, session_id: str | None = None) -> str:
    """The dashboard's address with a token (and a call to open)."""
    from urllib.parse import urlencode

    query = {"token": token} | ({"session": session_id} if session_id else {})
    return f"http://{host}:{port}/dashboard?{urlencode(query)}"


@asynccontextmanager
async def _no_lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
