"""Errors that ports may raise, mapped by adapters from third-party errors at the boundary.

::

    VoxcoreError
     ├── ConfigurationError            settings missing or invalid (raised at start, never mid-call)
     └── BackendError (transient?)     a backing service failed
          ├── BackendUnavailableError     cannot be reached right now            transient
          └── LLMError                    an LLM provider call failed
               ├── LLMAuthError              401/403: bad or missing API key
               ├── LLMModelNotFoundError     404: unknown model
               ├── LLMBadRequestError        400/422: the request was refused
               ├── LLMRateLimitedError       429 (``retry_after`` seconds)       transient
               ├── LLMTimeoutError           connect/read/first-token/turn       transient
               ├── LLMServerError            5xx (``status``, ``retry_after``)   transient
               └── LLMProtocolError          malformed SSE, stream cut short,
                                             invalid structured JSON             transient
          └── TTSError                    a speech synthesis failed (``transient`` as the cause)
          └── EmbeddingError              an embedding request failed (``status``, ``retry_after``;
                                          transient for 408/429/5xx, timeouts, cut connections)

The cache port does not raise at all (SPEC-A: soft returns); these are for the ports that do.
Adapters translate third-party errors at the boundary (``raise LLMTimeoutError(...) from exc``).
"""

from __future__ import annotations


class VoxcoreError(Exception):
    """Root of every error voxcore raises on purpose."""

    transient: bool = False


class ConfigurationError(VoxcoreError):
    """Configuration is missing or invalid; the message names the setting and the source."""


class BackendError(VoxcoreError):
    """A backing service (Redis, an LLM or TTS provider) failed.

    Attributes:
        transient: True when retrying later may succeed (timeouts, outages, rate limits).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class BackendUnavailableError(BackendError):
    """The service cannot be reached right now (connection refused, timeout, circuit open)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class LLMError(BackendError):
    """An LLM provider call failed; the turn that made it ends cleanly."""


class LLMAuthError(LLMError):
    """The provider refused the credentials (HTTP 401/403)."""


class LLMModelNotFoundError(LLMError):
    """The provider does not know the requested model (HTTP 404)."""


class LLMBadRequestError(LLMError):
    """The provider refused the request as invalid (HTTP 400/422)."""


class LLMRateLimitedError(LLMError):
    """The provider is rate limiting (HTTP 429).

    Attributes:
        retry_after: Seconds the provider asked to wait (``Retry-After``), when it said.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, transient=True)
        self.retry_after = retry_after


class LLMTimeoutError(LLMError):
    """Connecting, sending, or waiting for the first/next token took too long."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class LLMServerError(LLMError):
    """The provider failed (HTTP 5xx).

    Attributes:
        status: The HTTP status code.
        retry_after: Seconds the provider asked to wait (``Retry-After`` on a 503), when it said.
    """

    def __init__(
        self, message: str, *, status: int, retry_after: float | None = None, transient: bool = True
    ) -> None:
        super().__init__(message, transient=transient)
        self.status = status
        self.retry_after = retry_after


class LLMProtocolError(LLMError):
    """The response broke the protocol: malformed SSE, a stream cut short, or invalid JSON."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class TTSError(BackendError):
    """Speech synthesis failed; a partially streamed result must not be cached."""


class EmbeddingError(BackendError):
    """An embedding provider call failed (or answered something that is not a vector per input).

    Attributes:
        status: The HTTP status, when the provider answered one.
        retry_after: Seconds the provider asked to wait (429/503 ``Retry-After``), when it said.
    """

    def __init__(
        self,
        message: str,
        *,
        transient: bool = False,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, transient=transient)
        self.status = status
        self.retry_after = retry_after
