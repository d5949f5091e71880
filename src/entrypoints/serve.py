"""``voxcore serve``: the live events server and the call dashboard, under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn

from voxcore.core.ports.live_events import StreamUnavailable
from voxcore.entrypoints.runtime import Runtime
from voxcore.entrypoints.web import create_app, dashboard_url
from voxcore.events import emit

log = logging.getLogger("voxcore.serve")


async def _resolved(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future) else value


async def _server(runtime: Runtime, *, host: str, port: int) -> uvicorn.Server:
    container = runtime.container
    hub = await _resolved(container.event_hub())
    try:
        await hub.start()
    except StreamUnavailable as exc:  # Redis may come later: the hub connects at the first client
        emit(log, "serve_redis_unavailable", logging.WARNING, error=str(exc))
    app = create_app(hub, secret=container.events_secret(), settings=runtime.settings.events)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
        timeout_keep_alive=5,
    )
    return uvicorn.Server(config)


async def _started(server: uvicorn.Server, task: asyncio.Task[None], port: int) -> int | None:
    """Wait until uvicorn listens; the bound port (``None``: it stopped before listening)."""
    while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn has no "started" event)
        await asyncio.sleep(0.02)
    if not server.started:
        return None
    with contextlib.suppress(Exception):
        return int(server.servers[0].sockets[0].getsockname()[1])
    return port


async def serve(runtime: Runtime, *, host: str, port: int) -> None:
    """Serve the SSE endpoints and the dashboard until SIGINT/SIGTERM.

    Logs ``serve_ready`` with the dashboard URL carrying the operator token.
    """
    server = await _server(runtime, host=host, port=port)
    task = asyncio.get_running_loop().create_task(server.serve(), name="uvicorn")
    bound = await _started(server, task, port)
    if bound is not None:
        emit(
            log,
            "serve_ready",
            url=f"http://{host}:{bound}",
            dashboard=dashboard_url(host, bound, runtime.container.operator_token()),
            redis=runtime.redis_target,
        )
    await task


@asynccontextmanager
async def serving_in_background(
    runtime: Runtime, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve while the block runs (the demo's dashboard); yields the dashboard URL (operator token).

    uvicorn's signal handlers are not installed: the host process keeps its own (Ctrl-C stays its).
    """
    server = await _server(runtime, host=host, port=port)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.get_running_loop().create_task(server.serve(), name="uvicorn-background")
    try:
        bound = await _started(server, task, port)
        if bound is None:
            raise RuntimeError(f"the dashboard server did not start on {host}:{port}")
        yield dashboard_url(host, bound, runtime.container.operator_token())
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
