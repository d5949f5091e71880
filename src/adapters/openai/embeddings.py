"""OpenAI-compatible embeddings: ``POST /embeddings`` over a keep-alive httpx client.

Vectors are asked for as ``encoding_format: "base64"`` (float32 little-endian bytes, what the cache
stores: no float parsing at all); a server that answers JSON float lists anyway is understood too,
and ``encoding_format="float"`` asks for lists from servers that refuse base64.

Errors (all ``EmbeddingError``)::

    401/403, 400/404/422 and other 4xx     not transient     the provider's message is quoted
    408, 429 (retry_after), 5xx            transient         503 keeps ``retry_after`` too
    timeouts, refused/reset connections    transient
    200 whose body is not one finite vector per input, of one dimension   not transient
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Final, Literal

import httpx
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from voxcore.adapters.openai._errors import provider_message, retry_after_seconds
from voxcore.adapters.openai._http import owned_async_client
from voxcore.core.domain.embeddings import Embedding, EmbeddingFormatError
from voxcore.core.ports.embeddings import Embeddings
from voxcore.core.ports.errors import ConfigurationError, EmbeddingError
from voxcore.events import emit

__all__ = ["OpenAIEmbeddings"]

logger = logging.getLogger("voxcore.embeddings")
_tracer = trace.get_tracer("voxcore.embeddings")

_WHAT: Final = "POST /embeddings"
#: OpenAI's limit of inputs per request; larger batches are split.
MAX_INPUTS_PER_REQUEST: Final = 2048
_MAX_INPUT_CHARS: Final = 32_000  # ~8k tokens, the provider's per-input limit


class OpenAIEmbeddings(Embeddings):
    """Embeds texts with an OpenAI-compatible ``/embeddings`` endpoint.

    Args:
        base_url: API root, e.g. ``https://api.openai.com/v1`` (``/embeddings`` is appended).
        api_key: Bearer key; ``None`` for a local server without authentication.
        model: The embedding model (e.g. ``text-embedding-3-small``).
        dimensions: Ask the provider to shorten vectors to this many components (models that
            support it); ``None`` leaves the model's own size.
        timeout_s: Connect/read/write/pool timeout of each request.
        http2: Negotiate HTTP/2 over TLS.
        max_batch: Inputs per request (larger batches are split, the requests sent one by one).
        encoding_format: ``base64`` (compact, exact float32) or ``float`` (JSON lists).
        http_client: A client to use instead of creating one (left open by :meth:`aclose`).
        tracer: OpenTelemetry tracer (default: the ``voxcore.embeddings`` one).

    Raises:
        ConfigurationError: an empty model, a bad batch size or dimension, or http2 without ``h2``.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        model: str,
        dimensions: int | None = None,
        timeout_s: float = 5.0,
        http2: bool = True,
        max_batch: int = 256,
        encoding_format: Literal["base64", "float"] = "base64",
        http_client: httpx.AsyncClient | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        if not model:
            raise ConfigurationError("embeddings: the model name must not be empty")
        if not 1 <= max_batch <= MAX_INPUTS_PER_REQUEST:
            raise ConfigurationError(f"embeddings: max_batch must be within 1..{MAX_INPUTS_PER_REQUEST}")
        if dimensions is not None and dimensions < 1:
            raise ConfigurationError(f"embeddings: dimensions must be positive, got {dimensions}")
        self.model = model
        self._base_url = base_url.rstrip("/")
        self._url = f"{self._base_url}/embeddings"
        self._api_key = api_key
        self._dimensions = dimensions
        self._timeout = httpx.Timeout(timeout_s)
        self._max_batch = max_batch
        self._encoding: Literal["base64", "float"] = encoding_format
        self._tracer = tracer if tracer is not None else _tracer
        self._owns_client = http_client is None
        self._closed = False
        self._client = (
            http_client
            if http_client is not None
            else owned_async_client(http2=http2, timeout=self._timeout, max_keepalive=4, label="embeddings")
        )

    async def aclose(self) -> None:
        """Close the owned HTTP client (an injected one stays open); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        """One vector per text, in order; see the module docstring for the errors.

        Raises:
            EmbeddingError: the provider failed or its answer is not one vector per input.
            ValueError: a text is not a non-empty string or is too long.
        """
        if self._closed:
            raise EmbeddingError("the embeddings client is closed")
        batch = list(texts)
        for text in batch:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"embedding input must be a non-empty string, got {text!r}")
            if len(text) > _MAX_INPUT_CHARS:
                raise ValueError(f"embedding input too long: {len(text)} > {_MAX_INPUT_CHARS} characters")
        out: list[Embedding] = []
        for start in range(0, len(batch), self._max_batch):
            out.extend(await self._request(batch[start : start + self._max_batch]))
        return out

    async def _request(self, inputs: list[str]) -> list[Embedding]:
        payload: dict[str, Any] = {"model": self.model, "input": inputs, "encoding_format": self._encoding}
        if self._dimensions is not None:
            payload["dimensions"] = self._dimensions
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        started = time.perf_counter()
        with self._tracer.start_as_current_span(
            "embeddings " + self.model,
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "embeddings",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": self.model,
                "voxcore.embeddings.inputs": len(inputs),
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                try:
                    response = await self._client.post(
                        self._url, json=payload, headers=headers, timeout=self._timeout
                    )
                except httpx.HTTPError as exc:
                    raise _transport_error(exc, self._base_url) from exc
                if response.status_code != 200:
                    raise _status_error(response.status_code, response.content, response.headers, self.model)
                vectors = self._parse(response.content, len(inputs))
            except EmbeddingError as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                emit(
                    logger,
                    "embeddings_failed",
                    logging.WARNING,
                    model=self.model,
                    inputs=len(inputs),
                    status=exc.status,
                    transient=exc.transient,
                    error=str(exc),
                )
                raise
            ms = (time.perf_counter() - started) * 1000
            span.set_attribute("voxcore.embeddings.dimension", vectors[0].dimension)
            emit(logger, "embeddings_request", logging.DEBUG, model=self.model, inputs=len(inputs), ms=ms)
            return vectors

    def _parse(self, body: bytes, expected: int) -> list[Embedding]:
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise EmbeddingError(f"{_WHAT}: the answer is not JSON ({exc})", status=200) from exc
        data = parsed.get("data") if isinstance(parsed, dict) else None
        if not isinstance(data, list) or len(data) != expected:
            got = len(data) if isinstance(data, list) else "no"
            raise EmbeddingError(f"{_WHAT}: {got} vectors for {expected} inputs", status=200)
        by_index: dict[int, Embedding] = {}
        for position, item in enumerate(data):
            raw = item.get("embedding") if isinstance(item, dict) else None
            index = item.get("index", position) if isinstance(item, dict) else position
            if not isinstance(index, int) or not 0 <= index < expected or index in by_index:
                raise EmbeddingError(f"{_WHAT}: bad or repeated index {index!r}", status=200)
            by_index[index] = self._vector(raw, index)
        vectors = [by_index[i] for i in range(expected)]
        dims = {v.dimension for v in vectors}
        if len(dims) != 1:
            raise EmbeddingError(f"{_WHAT}: vectors of different dimensions {sorted(dims)}", status=200)
        if self._dimensions is not None and vectors[0].dimension != self._dimensions:
            raise EmbeddingError(
                f"{_WHAT}: vectors of dimension {vectors[0].dimension}, asked for {self._dimensions}",
                status=200,
            )
        return vectors

    def _vector(self, raw: Any, index: int) -> Embedding:
        try:
            if isinstance(raw, str):
                data = base64.b64decode(raw, validate=True)
                if not data or len(data) % 4:
                    raise EmbeddingFormatError(f"{len(data)} bytes are not float32 values")
                vector = Embedding(model=self.model, dimension=len(data) // 4, data=data)
                if not all(math.isfinite(v) for v in vector.floats()):
                    raise EmbeddingFormatError("a component is NaN or infinite")
                return vector
            if (
                isinstance(raw, list)
                and raw
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw)
            ):
                return Embedding.from_floats(self.model, raw)
        except (binascii.Error, EmbeddingFormatError, OverflowError) as exc:
            raise EmbeddingError(f"{_WHAT}: vector {index} is unusable ({exc})", status=200) from exc
        raise EmbeddingError(f"{_WHAT}: vector {index} is neither base64 nor a list of numbers", status=200)


def _status_error(status: int, body: bytes, headers: httpx.Headers, model: str) -> EmbeddingError:
    transient = status in (408, 429) or status >= 500
    retry_after = retry_after_seconds(headers) if status in (429, 503) else None
    text = f"embedding provider answered {status} to {_WHAT} (model {model}): {provider_message(body)}"
    if retry_after is not None:
        text += f" (retry after {retry_after:g}s)"
    return EmbeddingError(text, transient=transient, status=status, retry_after=retry_after)


def _transport_error(exc: httpx.HTTPError, base_url: str) -> EmbeddingError:
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return EmbeddingError(f"{_WHAT}: timed out talking to {base_url} ({detail})", transient=True)
    if isinstance(exc, httpx.ConnectError):
        return EmbeddingError(f"cannot connect to {base_url} for {_WHAT} ({detail})", transient=True)
    if isinstance(exc, httpx.RemoteProtocolError | httpx.NetworkError):
        return EmbeddingError(f"{_WHAT}: connection to {base_url} cut ({detail})", transient=True)
    return EmbeddingError(f"{_WHAT} to {base_url} failed ({detail})")
