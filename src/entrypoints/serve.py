"""``voxcore serve``: the live events server and the call dashboard, under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import uvicorn

from voxcore.core.ports.live_events import StreamUnavailable
from voxcore.entrypoints.runtime import Runtime
from voxcore.entrypoints.web import create_app, dashboard_url
from voxcore.events import emit

log = logging.getLogger("voxcore.serve")


async def _resolved(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future) else value


async def serve(runtime: Runtime, *, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve the SSE endpoints and the dashboard until SIGINT/SIGTERM.

    Prints (logs) ``serve_ready`` with the dashboard URL carrying the operator token.
    """
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
        # An SSE response never ends by itself: do not let keep-alive bookkeeping hold a restart.
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(), name="uvicorn")
    while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn has no "started" event)
        await asyncio.sleep(0.02)
    if server.started:
        bound = port
        with contextlib.suppress(Exception):
            bound = server.servers[0].sockets[0].getsockname()[1]
        emit(
            log,
            "serve_ready",
            url=f"http://{host}:{bound}",
            dashboard=dashboard_url(host, bound, container.operator_token()),
            redis=runtime.redis_target,
        )
        if ready is not None:
            ready.set()
    await task
