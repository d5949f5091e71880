"""Translation of httpx failures and provider HTTP errors into the typed errors of ``core.ports.errors``.

::

    HTTP status                               -> error
    401, 403                                  -> LLMAuthError
    404                                       -> LLMModelNotFoundError (chat; other paths: LLMBadRequestError)
    400, 409, 413, 422 and other 4xx          -> LLMBadRequestError
    429                                       -> LLMRateLimitedError(retry_after)
    5xx                                       -> LLMServerError(status, retry_after)

    httpx exception                           -> error
    TimeoutException (connect/read/write/pool)-> LLMTimeoutError
    ConnectError (refused, DNS, TLS)          -> LLMTimeoutError  (see below)
    RemoteProtocolError, ReadError, other     -> LLMProtocolError (connection cut mid-response)

A connection that cannot be opened becomes ``LLMTimeoutError`` (transient) rather than
``BackendUnavailableError``: the LLM ports promise ``LLMError`` and only ``LLMError``, so a caller that
ends the turn on ``LLMError`` must see it too. The message says "cannot connect" and names the cause.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from typing import Final

import httpx

from voxcore.core.ports.errors import (
    LLMAuthError,
    LLMBadRequestError,
    LLMError,
    LLMModelNotFoundError,
    LLMProtocolError,
    LLMRateLimitedError,
    LLMServerError,
    LLMTimeoutError,
)

# Provider messages are quoted in errors and logs; an HTML error page must not flood them.
_MAX_MESSAGE_CHARS: Final = 500


def provider_message(body: bytes) -> str:
    """The human message of an error body (``{"error": {"message": ...}}``), or its text, shortened."""
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            text = error["message"]
        elif isinstance(error, str):
            text = error
        elif isinstance(parsed.get("message"), str):
            text = parsed["message"]
    text = " ".join(text.split())
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 1] + "…"
    return text or "(empty body)"


def retry_after_seconds(headers: httpx.Headers, *, now: float | None = None) -> float | None:
    """Seconds a 429/503 asked to wait: ``retry-after-ms`` (precise) or ``Retry-After`` (secs or date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            value = float(raw_ms) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        value = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, value)
    return value if math.isfinite(value) and value >= 0 else None


def error_for_status(
    status: int,
    body: bytes,
    headers: httpx.Headers,
    *,
    what: str,
    model: str | None = None,
) -> LLMError:
    """The typed error for a non-2xx answer.

    Args:
        status: The HTTP status (>= 400, or an unexpected 1xx/3xx).
        body: The response body (the provider's error JSON, usually).
        headers: The response headers (``Retry-After`` for 429 and 5xx, typically 503).
        what: What was asked, for the message (e.g. ``POST /chat/completions``).
        model: The model the request named; ``None`` for requests without one (handshake, ping), where
            a 404 means a wrong path rather than an unknown model.
    """
    message = provider_message(body)
    subject = f"{what} (model {model})" if model else what
    text = f"LLM provider answered {status} to {subject}: {message}"
    if status in (401, 403):
        return LLMAuthError(text)
    if status == 404:
        if model is None:
            return LLMBadRequestError(f"{text} (check base_url and the endpoint path)")
        return LLMModelNotFoundError(text)
    if status == 429:
        return LLMRateLimitedError(text, retry_after=retry_after_seconds(headers))
    if status >= 500:
        return LLMServerError(text, status=status, retry_after=retry_after_seconds(headers))
    return LLMBadRequestError(text)


def error_for_exception(exc: httpx.HTTPError, *, what: str, base_url: str) -> LLMError:
    """The typed error for an httpx failure (see the module docstring for the table)."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return LLMTimeoutError(f"cannot connect to {base_url} for {what}: connect timed out ({detail})")
    if isinstance(exc, httpx.ReadTimeout):
        return LLMTimeoutError(f"{what}: no data from {base_url} within the read timeout ({detail})")
    if isinstance(exc, httpx.WriteTimeout):
        return LLMTimeoutError(f"{what}: sending to {base_url} timed out ({detail})")
    if isinstance(exc, httpx.PoolTimeout):
        return LLMTimeoutError(f"{what}: no free connection to {base_url} in the pool timeout ({detail})")
    if isinstance(exc, httpx.TimeoutException):
        return LLMTimeoutError(f"{what}: timed out talking to {base_url} ({detail})")
    if isinstance(exc, httpx.ConnectError):
        return LLMTimeoutError(f"cannot connect to {base_url} for {what}: {detail}")
    return LLMProtocolError(
        f"{what}: connection to {base_url} failed mid-response ({type(exc).__name__}: {detail})"
    )
