"""A voice-agent web service built on voxcore: the host owns the app, logging and OpenTelemetry.

Run it (Redis and an OpenAI-compatible provider from the environment, as everywhere in voxcore)::

    REDIS_URL=redis://127.0.0.1:6380/0 OPENAI_API_KEY=sk-... \\
        uvicorn --app-dir examples/fastapi_host app:app --port 8000

Routes:

* ``POST /calls/{call_id}/turns`` with ``{"text": "..."}``: the answer streams back as UTF-8 text
  while the model writes it. The first call of an id opens its conversation (handshake included);
  turns of one call run one after the other (the library's per-call turn lock). The headers carry
  the safety verdict (``X-Voxcore-Safe``) and the call's trace id (``X-Trace-Id``).
* ``DELETE /calls/{call_id}``: the call ended; its connection closes.
* ``GET /calls``: how many calls are open.
* ``GET /fragments/{name}``: the recorded fragment ``static:<name>`` as a streamed WAV; 404 when
  it is not in the cache, 503 when Redis is down.

The per-call registry and turn lock are voxcore's (``container.calls``); everything is closed at
shutdown (SIGTERM: uvicorn finishes the turns in flight, then the lifespan closes the calls).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from voxcore import CallRegistry, Container, LLMError, LLMRateLimitedError
from voxcore.application.calls import CallLimitError
from voxcore.core.domain.errors import InvalidKeyError
from voxcore.core.domain.keys import static_key


class TraceIds(logging.Filter):
    """Records from outside a call have no ``trace_id``: give them an empty one for the format."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            record.trace_id = "-"
        return True


def host_logging() -> None:
    """The host's own logging: voxcore's records arrive with their fields as attributes."""
    handler = logging.StreamHandler()
    handler.addFilter(TraceIds())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s trace=%(trace_id)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(os.environ.get("LOG_LEVEL", "INFO"))
    for chatty in ("httpx", "httpcore"):  # one line per HTTP request otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)


class Turn(BaseModel):
    """One user turn: what the caller said (the final transcript)."""

    text: str = Field(min_length=1, max_length=4000)


def host_tracing() -> Any:
    """The host's own OpenTelemetry set-up; voxcore's spans join it (voxcore never replaces it).

    Spans are exported over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the exporter reads
    the ``OTEL_*`` variables). Without the SDK installed (``pip install 'voxcore[otel]'``) there is
    no tracing, and no trace ids.
    """
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return None
    service = os.environ.get("OTEL_SERVICE_NAME", "voice-host")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    host_logging()
    tracing = host_tracing()
    # VOXCORE_CONFIG: an explicit settings file; without it, defaults + environment only.
    container = Container(config_path=os.environ.get("VOXCORE_CONFIG"))
    started: Any = container.init_resources()
    if started is not None:
        await started
    app.state.container = container
    app.state.calls = await container.calls()
    try:
        yield
    finally:
        stopped: Any = container.shutdown_resources()  # open calls closed, Redis closed
        if stopped is not None:
            await stopped
        if tracing is not None:
            tracing.shutdown()


app = FastAPI(title="voxcore host example", lifespan=lifespan)


def _calls(request: Request) -> CallRegistry:
    calls: CallRegistry = request.app.state.calls
    return calls


@app.post("/calls/{call_id}/turns")
async def turn(call_id: str, body: Turn, request: Request) -> StreamingResponse:
    calls = _calls(request)
    chunks = calls.stream_turn(call_id, body.text)
    # The first chunk carries the safety verdict: wait for it, so it can go into the headers.
    try:
        first = await anext(chunks)
    except CallLimitError as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from exc
    except LLMError as exc:  # nothing was said: the turn is rolled back, the caller may retry it
        retry = exc.retry_after if isinstance(exc, LLMRateLimitedError) else None
        headers = {"Retry-After": str(max(1, round(retry)))} if retry else None
        raise HTTPException(503 if exc.transient else 502, f"{type(exc).__name__}: {exc}", headers) from exc
    manager = calls.get(call_id)
    headers = {"X-Voxcore-Safe": str(first.is_safe).lower()}
    if manager is not None and manager.trace_id:
        headers["X-Trace-Id"] = manager.trace_id

    async def answer() -> AsyncIterator[bytes]:
        async with aclosing(chunks):  # a client that hangs up closes the turn (it is rolled back)
            if first.text_chunk:
                yield first.text_chunk.encode()
            async for chunk in chunks:
                if chunk.text_chunk:
                    yield chunk.text_chunk.encode()

    return StreamingResponse(answer(), media_type="text/plain; charset=utf-8", headers=headers)


@app.delete("/calls/{call_id}", status_code=204)
async def end_call(call_id: str, request: Request) -> None:
    if not await _calls(request).close(call_id):
        raise HTTPException(404, f"no open call {call_id!r}")


@app.get("/calls")
async def open_calls(request: Request) -> dict[str, int]:
    return {"open": len(_calls(request))}


@app.get("/fragments/{name}")
async def fragment(name: str, request: Request) -> StreamingResponse:
    container: Container = request.app.state.container
    cache = container.cache()
    try:
        key = static_key(name)
    except InvalidKeyError as exc:
        raise HTTPException(400, str(exc)) from exc
    stream = await cache.open_audio_stream(key)
    if stream is None:
        # The cache is soft (a miss and an outage both read as "nothing"): ask Redis which it was.
        if not await cache.ping():
            raise HTTPException(503, "the audio cache is unavailable", headers={"Retry-After": "1"})
        raise HTTPException(404, f"no fragment {name!r}")
    fmt = await cache.get_audio_format(key)

    async def audio() -> AsyncIterator[bytes]:
        async with stream:
            if fmt is not None:
                yield _wav_header(fmt.sample_rate, fmt.channels, fmt.sample_width)
            async for chunk in stream:
                yield chunk

    media_type = "audio/wav" if fmt is not None else "application/octet-stream"
    return StreamingResponse(audio(), media_type=media_type)


def _wav_header(rate: int, channels: int, width: int) -> bytes:
    """A WAV header for a stream of unknown length (sizes at their maximum, as streaming servers do)."""
    unknown = 0xFFFFFFFF
    block = channels * width
    return b"".join(
        [
            b"RIFF", struct.pack("<I", unknown), b"WAVE",
            b"fmt ", struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, width * 8),
            b"data", struct.pack("<I", unknown),
        ]
    )  # fmt: skip
