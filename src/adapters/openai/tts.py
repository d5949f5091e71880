"""OpenAI-compatible text-to-speech: ``POST /audio/speech`` streamed as raw PCM over a warm httpx client.

OpenAI's ``pcm`` response format is raw 24 kHz mono signed 16-bit little-endian samples with no
header. The body is read as it arrives; chunk boundaries need not fall on frames, so a partial frame
is carried to the next chunk, and the audio is converted to the format the caller asked for.

Errors (all ``TTSError``)::

    401/403, 400/404/422 and other 4xx     not transient     the provider's message is quoted
    408, 429, 5xx                          transient
    timeouts, refused/reset connections    transient
    body cut short (mid-frame or mid-chunk) transient
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import AsyncGenerator
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from voxcore.adapters.audio import PcmConverter
from voxcore.adapters.audio.traced import traced_speech
from voxcore.adapters.openai._errors import provider_message
from voxcore.adapters.openai._http import owned_async_client
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.errors import InvalidAudioError
from voxcore.core.ports.errors import ConfigurationError, TTSError
from voxcore.core.ports.tts import SpeechRequest, TTSEngine

__all__ = ["DEFAULT_TTS_MODEL", "OPENAI_PCM_FORMAT", "OpenAITTSEngine"]

logger = logging.getLogger("voxcore.tts")
_tracer = trace.get_tracer("voxcore.tts")

#: What OpenAI's ``response_format: "pcm"`` delivers: 24 kHz, mono, s16le.
OPENAI_PCM_FORMAT: Final = AudioFormat(24_000, 1, 2)
#: Model used when a ``SpeechRequest`` names none.
DEFAULT_TTS_MODEL: Final = "gpt-4o-mini-tts"

_MAX_INPUT_CHARS: Final = 4096  # the provider's limit for ``input``
_MIN_SPEED: Final = 0.25
_MAX_SPEED: Final = 4.0
_WHAT: Final = "POST /audio/speech"


class OpenAITTSEngine(TTSEngine):
    """Streams speech from an OpenAI-compatible ``/audio/speech`` endpoint.

    The engine owns a keep-alive ``httpx.AsyncClient`` (so the TLS handshake is paid once, not per
    phrase) unless one is injected; an injected client is left open by :meth:`aclose`.

    Args:
        base_url: API root, e.g. ``https://api.openai.com/v1`` (``/audio/speech`` is appended).
        api_key: Bearer key; may be ``None`` only for a local (loopback) server.
        timeout_s: Connect/read/write/pool timeout; the read timeout bounds the time to first byte
            and every gap between chunks.
        http2: Negotiate HTTP/2 over TLS (one multiplexed connection for concurrent phrases).
        http_client: A client to use instead of creating one (``timeout_s`` still applies to the
            engine's requests; the client's base URL and headers are not used).
        model: Model used when ``SpeechRequest.model`` is empty.
        tracer: OpenTelemetry tracer (default: the ``voxcore.tts`` one).
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        timeout_s: float = 10.0,
        http2: bool = True,
        http_client: httpx.AsyncClient | None = None,
        model: str = DEFAULT_TTS_MODEL,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._url = f"{self._base_url}/audio/speech"
        self._api_key = api_key
        self._timeout = httpx.Timeout(timeout_s)
        self._model = model
        self._tracer = tracer if tracer is not None else _tracer
        self._owns_client = http_client is None
        self._closed = False
        self._client = (
            http_client
            if http_client is not None
            else owned_async_client(http2=http2, timeout=self._timeout, max_keepalive=8, label="OpenAI TTS")
        )

    async def check(self) -> None:
        """Verify the base URL and that a key is set for any non-local server.

        Raises:
            ConfigurationError: the URL is not http(s), or ``OPENAI_API_KEY`` is missing.
        """
        parts = urlsplit(self._base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"OpenAI TTS base_url must be an http(s) URL such as https://api.openai.com/v1, "
                f"got {self._base_url!r}"
            )
        if not self._api_key and not _is_loopback(parts.hostname):
            raise ConfigurationError(
                f"OPENAI_API_KEY is not set: the OpenAI TTS engine needs an API key for {self._base_url}"
            )

    async def aclose(self) -> None:
        """Close the owned HTTP client (an injected one stays open); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()

    async def stream_speech(self, request: SpeechRequest) -> AsyncGenerator[bytes, None]:
        """Yield PCM in ``request.audio_format`` as the provider streams it.

        Close the iterator (``contextlib.aclosing``) when stopping early: that closes the response.

        Raises:
            TTSError: the request is invalid, the provider refused or failed, or the stream was cut.
        """
        started = time.perf_counter()
        model = request.model or self._model
        span = self._tracer.start_span(
            "tts.synthesize",
            kind=SpanKind.CLIENT,
            attributes={
                "voxcore.tts.engine": self.name,
                "voxcore.tts.voice": request.voice,
                "voxcore.tts.chars": len(request.text),
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": model,
            },
        )
        traced = traced_speech(
            self._synthesize(request, model, span),
            span=span,
            engine=self.name,
            started=started,
            request=request,
        )
        async with contextlib.aclosing(traced):  # closing early reaches the engine at once
            async for chunk in traced:
                yield chunk

    async def _synthesize(
        self, request: SpeechRequest, model: str, span: trace.Span
    ) -> AsyncGenerator[bytes, None]:
        if self._closed:
            raise TTSError("OpenAI TTS engine is closed")
        _validate(request)
        try:
            converter = PcmConverter(OPENAI_PCM_FORMAT, request.audio_format)
        except InvalidAudioError as exc:
            raise TTSError(f"cannot deliver the requested audio format: {exc}") from exc
        payload: dict[str, Any] = {
            "model": model,
            "input": request.text,
            "voice": request.voice,
            "response_format": "pcm",
            "speed": request.speed,
        }
        headers = {"Accept": "audio/pcm"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            async with contextlib.AsyncExitStack() as stack:
                # Current only while the request is sent: a context attached across a yield would
                # leak into the consumer's code.
                with trace.use_span(
                    span, end_on_exit=False, record_exception=False, set_status_on_exception=False
                ):
                    response = await stack.enter_async_context(
                        self._client.stream(
                            "POST", self._url, json=payload, headers=headers, timeout=self._timeout
                        )
                    )
                if response.status_code != 200:
                    body = await response.aread()
                    raise _status_error(response.status_code, body, response.headers)
                content_type = response.headers.get("content-type", "")
                if content_type.startswith(("application/json", "text/")):
                    body = await response.aread()
                    message = provider_message(body)
                    raise TTSError(f"{_WHAT} answered 200 with {content_type!r} instead of audio: {message}")
                async for data in response.aiter_bytes():
                    out = converter.feed(data)
                    if out:
                        yield out
            try:
                tail = converter.flush()
            except InvalidAudioError as exc:
                raise TTSError(f"{_WHAT}: audio stream cut short ({exc})", transient=True) from exc
            if tail:
                yield tail
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self._base_url) from exc


def _validate(request: SpeechRequest) -> None:
    if not request.text.strip():
        raise TTSError("nothing to say: the text is empty")
    if len(request.text) > _MAX_INPUT_CHARS:
        raise TTSError(f"text too long for OpenAI TTS: {len(request.text)} > {_MAX_INPUT_CHARS} characters")
    if not request.voice:
        raise TTSError("no voice given")
    if not (math.isfinite(request.speed) and _MIN_SPEED <= request.speed <= _MAX_SPEED):
        raise TTSError(f"speed must be within {_MIN_SPEED}..{_MAX_SPEED}, got {request.speed}")


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _status_error(status: int, body: bytes, headers: httpx.Headers) -> TTSError:
    transient = status in (408, 429) or status >= 500
    text = f"TTS provider answered {status} to {_WHAT}: {provider_message(body)}"
    retry_after = headers.get("retry-after")
    if status == 429 and retry_after:
        text += f" (retry after {retry_after}s)"
    return TTSError(text, transient=transient)


def _transport_error(exc: httpx.HTTPError, base_url: str) -> TTSError:
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return TTSError(f"{_WHAT}: timed out talking to {base_url} ({detail})", transient=True)
    if isinstance(exc, httpx.ConnectError):
        return TTSError(f"cannot connect to {base_url} for {_WHAT} ({detail})", transient=True)
    if isinstance(exc, httpx.RemoteProtocolError | httpx.NetworkError):
        return TTSError(f"{_WHAT}: audio stream from {base_url} cut short ({detail})", transient=True)
    return TTSError(f"{_WHAT} to {base_url} failed ({detail})")
