"""Telemetry shared by the speech engines: one span and the tts_* events around a PCM stream."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from voxcore.core.ports.tts import SpeechRequest
from voxcore.events import emit

logger = logging.getLogger("voxcore.tts")


async def traced_speech(
    chunks: AsyncGenerator[bytes, None],
    *,
    span: trace.Span,
    engine: str,
    started: float,
    request: SpeechRequest,
) -> AsyncGenerator[bytes, None]:
    """Yield ``chunks`` while recording time to first byte, size and failure on ``span`` (then ending it).

    Events: ``tts_request`` {engine, chars, voice}, ``tts_first_byte`` {ms}, ``tts_done`` {ms, bytes},
    ``tts_error`` {error} (WARNING). The first two sit on the time-to-first-audio path, so they are
    formatted off it (``call_soon``: while the request is in flight / after the first bytes went out).
    Cancellation or an early ``aclose()`` is not a provider failure: it only marks the span
    ``voxcore.tts.cancelled``.
    """
    loop = asyncio.get_running_loop()
    loop.call_soon(
        functools.partial(
            emit, logger, "tts_request", engine=engine, chars=len(request.text), voice=request.voice
        )
    )
    produced = 0
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if produced == 0:
                    ttfb_ms = _ms_since(started)
                    span.set_attribute("voxcore.tts.time_to_first_byte_ms", ttfb_ms)
                    loop.call_soon(
                        functools.partial(emit, logger, "tts_first_byte", engine=engine, ms=ttfb_ms)
                    )
                produced += len(chunk)
                yield chunk
    except (GeneratorExit, asyncio.CancelledError):
        span.set_attribute("voxcore.tts.cancelled", True)
        raise
    except Exception as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        emit(logger, "tts_error", logging.WARNING, engine=engine, error=str(exc))
        raise
    else:
        span.set_attribute("voxcore.tts.bytes", produced)
        emit(logger, "tts_done", engine=engine, ms=_ms_since(started), bytes=produced)
    finally:
        span.end()


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
