"""``OpenAIConfig``: validated settings of the OpenAI-compatible LLM adapter (no I/O, no env reads)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from voxcore.adapters.openai.structured_output import STRUCTURED_OUTPUTS as _STRUCTURED_OUTPUTS
from voxcore.adapters.openai.structured_output import StructuredOutput
from voxcore.core.ports.errors import ConfigurationError

__all__ = ["OpenAIConfig", "StructuredOutput"]
_POSITIVE_SECONDS = (
    "connect_timeout_s",
    "write_timeout_s",
    "read_timeout_s",
    "pool_timeout_s",
    "first_token_timeout_s",
    "turn_timeout_s",
    "keepalive_expiry_s",
    "warmup_interval_s",
)


@dataclass(frozen=True, slots=True)
class OpenAIConfig:
    """How the adapter talks to an OpenAI-compatible chat-completions provider.

    Every value is checked when the instance is created; a bad one raises
    :class:`~voxcore.core.ports.errors.ConfigurationError` naming the setting.

    Attributes:
        base_url: Root of the API, ending in the version (``https://api.openai.com/v1``); paths such as
            ``/chat/completions`` are resolved against it.
        api_key: Bearer key; ``None`` omits the ``Authorization`` header (local servers). Hidden from
            ``repr()`` and :meth:`describe`.
        http2: Negotiate HTTP/2 (over TLS, via ALPN); plain ``http://`` URLs always use HTTP/1.1.
        connect_timeout_s: TCP + TLS connect.
        write_timeout_s: Sending one request.
        read_timeout_s: Longest silence between two received pieces of a response (e.g. stream chunks).
        pool_timeout_s: Waiting for a free connection of the pool.
        first_token_timeout_s: Request sent -> first content token of a stream.
        turn_timeout_s: The whole streamed turn: call -> last chunk (``llm.timeouts.turn_s``). A stream that
            trickles chunks just often enough to beat ``read_timeout_s`` still ends here.
        keepalive_expiry_s: Idle pooled connections are closed after this; must outlive
            ``warmup_interval_s`` so that the warm-up keeps the connection open.
        warmup_interval_s: Idle time after which the warm-up loop pings the provider.
        warmup_endpoint: A light GET used for the handshake and the pings, relative to ``base_url``.
        warmup_completion: Also send a 1-token completion to ``warmup_model`` on every warm-up.
        warmup_model: Model of the warm-up completion.
        structured_output: ``json_schema`` sends ``response_format`` (strict JSON schema);
            ``json_object`` sends JSON mode (with the schema, for servers that take it) and puts the
            schema in the prompt; ``instructions`` sends none (the prompt itself asks for JSON);
            ``auto`` tries them in that order and remembers per base URL what the server accepts
            (see ``voxcore.adapters.openai.structured_output``).
        stream_usage: Ask for token usage in the last streamed chunk (``stream_options.include_usage``).
        max_output_tokens: ``max_tokens`` of a streamed answer.
        temperature: Sampling temperature, 0..2.
        provider_name: ``gen_ai.provider.name`` in telemetry.
        max_connections: Connection pool bound of one manager (one phone call).
        max_keepalive_connections: Idle connections the pool keeps open.
        max_concurrent_requests: Requests in flight at once to this ``base_url`` across the process
            (``None``: unlimited). With 1 (llama.cpp, single-GPU servers that serve one request at a
            time), a background summary waits for the turn and gives way to the next one.
    """

    base_url: str = "https://api.openai.com/v1"
    api_key: str | None = field(default=None, repr=False)
    http2: bool = True
    connect_timeout_s: float = 3.0
    write_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    pool_timeout_s: float = 5.0
    first_token_timeout_s: float = 15.0
    turn_timeout_s: float = 60.0
    keepalive_expiry_s: float = 90.0
    warmup_interval_s: float = 20.0
    warmup_endpoint: str = "/models"
    warmup_completion: bool = False
    warmup_model: str = "gpt-4o-mini"
    structured_output: StructuredOutput = "auto"
    stream_usage: bool = True
    max_output_tokens: int = 512
    temperature: float = 0.3
    provider_name: str = "openai"
    max_connections: int = 8
    max_keepalive_connections: int = 4
    max_concurrent_requests: int | None = None

    def __post_init__(self) -> None:
        _check_base_url(self.base_url)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ConfigurationError("OpenAIConfig.api_key must be a non-empty string or None")
        for name in _POSITIVE_SECONDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigurationError(f"OpenAIConfig.{name} must be a number of seconds, got {value!r}")
            if value <= 0:
                raise ConfigurationError(f"OpenAIConfig.{name} must be positive, got {value!r}")
        if self.keepalive_expiry_s <= self.warmup_interval_s:
            raise ConfigurationError(
                f"OpenAIConfig.keepalive_expiry_s ({self.keepalive_expiry_s:g} s) must be longer than "
                f"warmup_interval_s ({self.warmup_interval_s:g} s), or idle connections expire between "
                "warm-ups"
            )
        for flag in ("http2", "warmup_completion", "stream_usage"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigurationError(f"OpenAIConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        if not isinstance(self.warmup_endpoint, str) or not self.warmup_endpoint.strip():
            raise ConfigurationError(
                "OpenAIConfig.warmup_endpoint must be a non-empty path such as '/models'"
            )
        if "://" in self.warmup_endpoint:
            raise ConfigurationError(
                f"OpenAIConfig.warmup_endpoint must be relative to base_url, got {self.warmup_endpoint!r}"
            )
        for name in ("warmup_model", "provider_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigurationError(f"OpenAIConfig.{name} must be a non-empty string, got {value!r}")
        if self.structured_output not in _STRUCTURED_OUTPUTS:
            raise ConfigurationError(
                f"OpenAIConfig.structured_output must be one of {', '.join(_STRUCTURED_OUTPUTS)}, "
                f"got {self.structured_output!r}"
            )
        for name in ("max_output_tokens", "max_connections", "max_keepalive_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"OpenAIConfig.{name} must be a positive integer, got {value!r}")
        limit = self.max_concurrent_requests
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigurationError(
                f"OpenAIConfig.max_concurrent_requests must be a positive integer or None, got {limit!r}"
            )
        if self.max_keepalive_connections > self.max_connections:
            raise ConfigurationError(
                f"OpenAIConfig.max_keepalive_connections ({self.max_keepalive_connections}) must not exceed "
                f"max_connections ({self.max_connections})"
            )
        temperature = self.temperature
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0.0 <= temperature <= 2.0
        ):
            raise ConfigurationError(f"OpenAIConfig.temperature must be within 0..2, got {temperature!r}")

    @property
    def server_address(self) -> str:
        """Host of ``base_url`` (the ``server.address`` telemetry attribute)."""
        return urlsplit(self.base_url).hostname or ""

    @property
    def server_port(self) -> int:
        """Port of ``base_url``, defaulting by scheme (the ``server.port`` telemetry attribute)."""
        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def describe(self) -> str:
        """Where this config points and how, without the API key (for logs and messages)."""
        key = "set" if self.api_key else "none"
        http = "h2" if self.http2 else "http/1.1"
        return (
            f"{self.provider_name} {self.base_url} ({http}, api_key={key}, "
            f"structured_output={self.structured_output})"
        )


def _check_base_url(base_url: object) -> None:
    if not isinstance(base_url, str) or not base_url.strip():
        raise ConfigurationError(
            "OpenAIConfig.base_url must be a non-empty URL such as https://api.openai.com/v1"
        )
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigurationError(f"OpenAIConfig.base_url {base_url!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ConfigurationError(
            f"OpenAIConfig.base_url must start with http:// or https://, got {base_url!r}"
        )
    if not parts.hostname:
        raise ConfigurationError(f"OpenAIConfig.base_url has no host: {base_url!r}")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"OpenAIConfig.base_url must not carry a query or fragment: {base_url!r}")
    if parts.username or parts.password:
        raise ConfigurationError("OpenAIConfig.base_url must not embed credentials; use api_key")
