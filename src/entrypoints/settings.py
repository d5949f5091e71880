"""Validated settings: YAML file (explicit path) + ``.env`` + process environment, unknown keys rejected.

Precedence, lowest to highest: built-in defaults, the YAML file, the ``.env`` file, the process
environment. Environment names:

* ``REDIS_URL`` or ``REDIS_HOST``/``REDIS_PORT``/``REDIS_DB``/``REDIS_PASSWORD`` (SPEC-B);
* ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` (the LLM provider);
* ``VOXCORE_<SECTION>__<KEY>`` for any other setting, e.g. ``VOXCORE_CACHE__TTS_TTL_SECONDS=3600``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from voxcore.core.ports.errors import ConfigurationError

# defer_build: the validators are built on first use, not at import (a host imports the container early)
_STRICT = ConfigDict(extra="forbid", frozen=True, defer_build=True)
_REDIS_ENV = {
    "REDIS_URL": "url",
    "REDIS_HOST": "host",
    "REDIS_PORT": "port",
    "REDIS_DB": "db",
    "REDIS_PASSWORD": "password",
}
_LLM_ENV = {"OPENAI_API_KEY": "api_key", "OPENAI_BASE_URL": "base_url"}
_PREFIX = "VOXCORE_"


class RedisSettings(BaseModel):
    """Where Redis is and how the client behaves (see ``RedisConfig``)."""

    model_config = _STRICT

    url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    password: SecretStr | None = None
    socket_timeout: PositiveFloat = 1.0
    socket_connect_timeout: PositiveFloat = 0.5
    max_connections: PositiveInt = 32
    pool_timeout: PositiveFloat = 1.0
    retries: int = Field(default=1, ge=0, le=10)
    health_check_interval: int = Field(default=30, ge=0)
    # Deployment: one server, a Redis Cluster (startup `nodes`), or a Sentinel-managed primary.
    mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    nodes: list[str] = Field(default_factory=list)  # cluster startup nodes, "host:port"
    sentinels: list[str] = Field(default_factory=list)  # "host:port" of the Sentinels
    sentinel_service: str = Field(default="mymaster", min_length=1)
    sentinel_password: SecretStr | None = None  # of the Sentinels themselves

    @field_validator("nodes", "sentinels", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """``"h1:7000,h2:7000"`` (how an environment variable carries a list) -> a list."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("nodes", "sentinels")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected 'host:port', got {address!r}")
        return value

    @model_validator(mode="after")
    def _mode_needs(self) -> RedisSettings:
        if self.mode == "sentinel" and not self.sentinels:
            raise ValueError("mode sentinel needs `sentinels` (a list of host:port)")
        if self.mode == "cluster" and self.db != 0:
            raise ValueError("Redis Cluster has only database 0: `db` must be 0 in cluster mode")
        return self

    @property
    def explicitly_located(self) -> bool:
        """True when a source set where Redis is (so tools must not pick a server themselves)."""
        return bool(self.model_fields_set & {"url", "host", "port", "nodes", "sentinels"})


class CacheSettings(BaseModel):
    """Behaviour of the audio/text cache."""

    model_config = _STRICT

    key_prefix: str = ""
    tts_ttl_seconds: PositiveInt = 7 * 24 * 3600
    stream_first_batch: int = Field(default=4, ge=1, le=1000)
    prev_grace_seconds: PositiveInt = 30
    breaker_base_window_ms: PositiveFloat = 250.0
    breaker_max_window_ms: PositiveFloat = 2000.0


class LLMTimeouts(BaseModel):
    """HTTP timeouts of LLM requests, in seconds."""

    model_config = _STRICT

    connect_s: PositiveFloat = 3.0
    write_s: PositiveFloat = 10.0
    read_s: PositiveFloat = 30.0  # longest silence between two streamed chunks
    pool_s: PositiveFloat = 5.0
    first_token_s: PositiveFloat = 15.0  # request sent -> first content token
    turn_s: PositiveFloat = 60.0  # the whole streamed turn: request -> last chunk, however it trickles


class LLMModels(BaseModel):
    """Model names per role."""

    model_config = _STRICT

    main: str = "gpt-4o-mini"
    summary: str = "gpt-4o-mini"


class LLMWarmup(BaseModel):
    """Keeping the provider connection warm between turns."""

    model_config = _STRICT

    interval_s: PositiveFloat = 20.0
    endpoint: str = "/models"  # a light GET, relative to base_url
    completion: bool = False  # also send a 1-token completion on every warm-up


class LLMSettings(BaseModel):
    """The OpenAI-compatible provider (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``)."""

    model_config = _STRICT

    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    models: LLMModels = Field(default_factory=LLMModels)
    context_window_tokens: PositiveInt = 128_000
    max_output_tokens: PositiveInt = 512
    temperature: float = Field(default=0.3, ge=0.0, le=2.0)
    http2: bool = True
    keepalive_expiry_s: PositiveFloat = 90.0  # must outlive warmup.interval_s
    timeouts: LLMTimeouts = Field(default_factory=LLMTimeouts)
    warmup: LLMWarmup = Field(default_factory=LLMWarmup)
    # auto: json_schema, then json_object, then instructions, as the server accepts (learned per base_url)
    structured_output: Literal["auto", "json_schema", "json_object", "instructions"] = "auto"
    max_concurrent_requests: PositiveInt | None = None  # per base_url; 1 for llama.cpp / single-GPU servers
    stream_usage: bool = True  # ask for usage in the last chunk (stream_options.include_usage)
    unsafe_reply: str = "Извините, я не могу ответить на это. Чем ещё могу помочь?"
    prompts_path: str | None = None  # YAML; relative paths resolve against the config file's folder
    preload: bool = True  # load prompts and the tokenizer (~0.2 s) at init_resources(), not at the first call
    shared_connection: bool = False  # one warm client per provider for all calls (docs/llm.md)

    @model_validator(mode="after")
    def _keepalive_outlives_warmup(self) -> LLMSettings:
        if self.keepalive_expiry_s <= self.warmup.interval_s:
            raise ValueError("keepalive_expiry_s must be longer than warmup.interval_s")
        return self


class DualContextSettings(BaseModel):
    """When the standby context is prepared and handed over."""

    model_config = _STRICT

    warmup_threshold_ratio: float = Field(default=0.6, gt=0.0, lt=1.0)
    handover_threshold_ratio: float = Field(default=0.8, gt=0.0, le=1.0)
    recent_messages: int = Field(default=6, ge=0)  # kept verbatim in the standby context
    hard_limit_ratio: float = Field(default=0.95, gt=0.0, le=1.0)  # oldest turns dropped above this

    @model_validator(mode="after")
    def _ordered(self) -> DualContextSettings:
        if not self.warmup_threshold_ratio < self.handover_threshold_ratio <= self.hard_limit_ratio:
            raise ValueError("need warmup_threshold_ratio < handover_threshold_ratio <= hard_limit_ratio")
        return self


class SummarySettings(BaseModel):
    """Summaries of the conversation (for the standby context) and their cache."""

    model_config = _STRICT

    ttl_seconds: PositiveInt = 24 * 3600
    max_output_tokens: PositiveInt = 300


class AudioFormatSettings(BaseModel):
    """A PCM format."""

    model_config = _STRICT

    sample_rate: PositiveInt = 24_000
    channels: int = Field(default=1, ge=1, le=8)
    sample_width: Literal[1, 2, 3, 4] = 2


class AgentVoice(BaseModel):
    """How one agent speaks (``tts_enabled: false``: a text-only agent, refused quietly)."""

    model_config = _STRICT

    tts_enabled: bool = True
    engine: Literal["openai", "espeak-ng"] = "espeak-ng"
    voice: str = "ru"
    model: str = ""
    audio_format: AudioFormatSettings = Field(default_factory=AudioFormatSettings)
    speed: float = Field(default=1.0, gt=0.0, le=4.0)
    max_chars: PositiveInt = 1000


class RateLimitSettings(BaseModel):
    """Per-user TTS rate limit (GCRA in Redis)."""

    model_config = _STRICT

    limit: PositiveInt = 30
    period_s: PositiveFloat = 60.0
    burst: PositiveInt | None = None
    fail_open: bool = True  # when Redis is down: allow (true) or refuse (false)


class OpenAITTSSettings(BaseModel):
    """OpenAI-compatible ``/v1/audio/speech`` (key and base URL default to the ``llm`` ones)."""

    model_config = _STRICT

    base_url: str | None = None
    model: str = "gpt-4o-mini-tts"
    timeout_s: PositiveFloat = 10.0


class EspeakSettings(BaseModel):
    """The local espeak-ng engine."""

    model_config = _STRICT

    binary: str = "espeak-ng"
    timeout_s: PositiveFloat = 10.0
    max_chars: PositiveInt = 1000


class SynthesisLeaseSettings(BaseModel):
    """Cross-worker single flight of TTS: a short Redis lease per ``tts:*`` key (docs/scale-out.md)."""

    model_config = _STRICT

    enabled: bool = True
    ttl_s: PositiveFloat = 15.0  # longer than a synthesis + its cache write; a dead holder frees it then
    wait_s: float = Field(default=5.0, ge=0.0)  # longest wait for another worker's audio
    poll_ms: PositiveFloat = 50.0  # how often a waiting worker looks at the cache


class HybridSettings(BaseModel):
    """Hybrid replies (recorded fragments + TTS): whose voice, and the fragments' transcripts."""

    model_config = _STRICT

    agent: str | None = None  # the voice of this agent (voice.agents); default: voice.default_agent
    manifest_path: str | None = None  # load-audio manifest; relative to the config file's folder
    prefetch: int = Field(default=4, ge=1, le=64)
    max_background_writes: int = Field(default=8, ge=1, le=256)
    speculative_first_tts: bool = True
    # Longest silence where a synthesized piece joins the next (edge silence trimmed to half each).
    join_pause_ms: int = Field(default=60, ge=0, le=1000)
    silence_threshold: int = Field(default=160, ge=0, le=32766)  # |sample| counted as silence


class VoiceSettings(BaseModel):
    """Speech: engines, per-agent voices, the per-user rate limit.

    ``enabled: false`` (the default) keeps the voice service out of ``init_resources()``, so a host
    that only uses the cache or the LLM needs no TTS engine; with ``enabled: true`` the engines every
    TTS-enabled agent uses are checked at start and a missing key or binary fails start-up with a
    message naming it.
    """

    model_config = _STRICT

    enabled: bool = False
    default_agent: AgentVoice | None = Field(default_factory=AgentVoice)
    agents: dict[str, AgentVoice] = Field(default_factory=dict)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    openai: OpenAITTSSettings = Field(default_factory=OpenAITTSSettings)
    espeak: EspeakSettings = Field(default_factory=EspeakSettings)
    hybrid: HybridSettings = Field(default_factory=HybridSettings)
    synthesis_lease: SynthesisLeaseSettings = Field(default_factory=SynthesisLeaseSettings)


class EmbeddingCacheSettings(BaseModel):
    """The hot embedding cache: an in-process LRU (L1) in front of Redis (L2)."""

    model_config = _STRICT

    l1_max_bytes: int = Field(default=16 * 1024 * 1024, ge=0)  # vectors + ~0.4 KB per entry; 0: no L1
    l1_ttl_seconds: PositiveFloat = 3600.0
    ttl_seconds: PositiveInt = 30 * 24 * 3600  # Redis copies


class EmbeddingsSettings(BaseModel):
    """The OpenAI-compatible ``/embeddings`` provider (key and base URL default to the ``llm`` ones)."""

    model_config = _STRICT

    base_url: str | None = None
    model: str = "text-embedding-3-small"
    dimensions: PositiveInt | None = None  # ask the provider for shorter vectors (models that support it)
    timeout_s: PositiveFloat = 5.0
    encoding_format: Literal["base64", "float"] = "base64"  # "float" for servers that refuse base64
    max_batch: int = Field(default=256, ge=1, le=2048)
    cache: EmbeddingCacheSettings = Field(default_factory=EmbeddingCacheSettings)


class FaqSettings(BaseModel):
    """Opt-in FAQ matcher: known questions answered from recordings, with no LLM call (docs/faq.md)."""

    model_config = _STRICT

    enabled: bool = False
    manifest_path: str | None = None  # YAML/JSON; relative to the config file's folder
    threshold: float = Field(default=0.965, gt=0.0, le=1.0)  # cosine, model-specific (docs/faq.md)
    timeout_ms: PositiveFloat = 250.0  # longest wait for a turn's embedding before the LLM answers instead

    @model_validator(mode="after")
    def _manifest_when_enabled(self) -> FaqSettings:
        if self.enabled and not self.manifest_path:
            raise ValueError("faq.enabled needs faq.manifest_path (the manifest of known questions)")
        return self


class TelemetrySettings(BaseModel):
    """voxcore's own OpenTelemetry SDK set-up (needs the ``otel`` extra); never over a host's providers.

    The standard ``OTEL_*`` variables win over these keys (the deployment's environment overrides
    the file, as everywhere in voxcore's settings): ``OTEL_SERVICE_NAME``,
    ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_TRACES_EXPORTER``,
    ``OTEL_METRICS_EXPORTER``, ``OTEL_METRIC_EXPORT_INTERVAL``.
    """

    model_config = _STRICT

    enabled: bool = False
    service_name: str = "voxcore"
    otlp_endpoint: str | None = None  # default: http://127.0.0.1:4318 (http/protobuf) or :4317 (grpc)
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    traces_exporter: Literal["otlp", "none"] = "otlp"
    metrics_exporter: Literal["otlp", "none"] = "otlp"  # none: e.g. Jaeger v1, which takes traces only
    metric_export_interval_ms: PositiveInt = 5000
    shutdown_timeout_s: PositiveFloat = 1.0  # longest a stop waits for an unreachable collector
    record_text: bool = False  # put user/model text on turn spans (marked droppable; see docs/telemetry.md)


class LoggingSettings(BaseModel):
    """voxcore's JSON log lines: off by default (the host's logging gets the records); the CLI sets them."""

    model_config = _STRICT

    configure: bool = False  # true: the container adds a stderr JSON handler to the `voxcore` logger
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class DialogueSettings(BaseModel):
    """The dialogue cache: every call's completed turns kept in Redis so a call can resume elsewhere."""

    model_config = _STRICT

    enabled: bool = True
    ttl_seconds: PositiveInt = 30 * 24 * 3600  # refreshed by every write
    max_messages: PositiveInt = 500  # newest messages kept per session (LTRIM)
    drain_timeout_s: float = Field(default=2.0, ge=0.0)  # how long a call's end waits for pending writes


class EventsSettings(BaseModel):
    """Live call events (Redis Streams + pub/sub) and the SSE server / dashboard (``voxcore serve``)."""

    model_config = _STRICT

    enabled: bool = True
    secret: SecretStr | None = None  # HMAC key of access tokens; VOXCORE_EVENTS__SECRET
    stream_maxlen: PositiveInt = 10_000  # per session, approximate (MAXLEN ~)
    stream_ttl_seconds: PositiveInt = 24 * 3600  # a session's stream outlives its last event by this
    index_maxlen: PositiveInt = 10_000  # the index of calls started/ended
    queue_size: PositiveInt = 10_000  # events held in process while Redis is slow or down
    batch_size: PositiveInt = 256  # events per pipelined write
    drain_timeout_s: float = Field(default=2.0, ge=0.0)
    coalesce_ms: float = Field(default=50.0, ge=0.0)  # answer text deltas merged per event
    heartbeat_s: float = Field(default=15.0, gt=0.0, le=15.0)
    client_queue_size: PositiveInt = 1000  # live events buffered per SSE client before it is cut
    send_timeout_s: PositiveFloat = 10.0  # a client that accepts no byte for this long is cut
    retry_ms: PositiveInt = 1000  # the SSE retry: hint
    read_block_s: PositiveFloat = 5.0  # one pub/sub read waits at most this (its pool's timeout is longer)
    reconnect_grace_s: PositiveFloat = 1.0
    host: str = "127.0.0.1"  # voxcore serve
    port: int = Field(default=8765, ge=1, le=65535)


class Settings(BaseModel):
    """All of voxcore's settings."""

    model_config = _STRICT

    redis: RedisSettings = Field(default_factory=RedisSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    dual_context: DualContextSettings = Field(default_factory=DualContextSettings)
    summary: SummarySettings = Field(default_factory=SummarySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    voice: VoiceSettings = Field(default_factory=VoiceSettings)
    embeddings: EmbeddingsSettings = Field(default_factory=EmbeddingsSettings)
    faq: FaqSettings = Field(default_factory=FaqSettings)
    dialogue: DialogueSettings = Field(default_factory=DialogueSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    #: The folder relative paths in the settings resolve against (the config file's folder).
    base_dir: str | None = None


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    dotenv_path: str | os.PathLike[str] | None = None,
) -> Settings:
    """Build :class:`Settings` from a YAML file, a ``.env`` file and the environment.

    Args:
        config_path: The YAML file; ``None`` means defaults + environment only. It must exist.
        env: The environment to read (``os.environ`` by default).
        dotenv_path: A ``.env`` file; by default the ``.env`` beside ``config_path`` if there is
            one. Never looked up in the current working directory.

    Raises:
        ConfigurationError: unreadable file, invalid YAML, unknown keys or invalid values; the
            message names the file and the setting.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if config_path is not None:
        path = Path(config_path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"config file {path} must hold a mapping at the top level")
        data = loaded
        data.setdefault("base_dir", str(path.resolve().parent))
        if dotenv_path is None and (path.parent / ".env").is_file():
            dotenv_path = path.parent / ".env"
    variables: dict[str, str] = {}
    if dotenv_path is not None:
        if not Path(dotenv_path).is_file():
            raise ConfigurationError(f".env file {dotenv_path} does not exist")
        variables.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    variables.update(os.environ if env is None else env)
    _apply_env(data, variables)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise ConfigurationError(f"invalid settings ({source} + environment): {problems}") from exc


def _apply_env(data: dict[str, Any], variables: Mapping[str, str]) -> None:
    def section(name: str) -> dict[str, Any]:
        current = data.setdefault(name, {})
        if not isinstance(current, dict):
            raise ConfigurationError(f"settings section {name!r} must be a mapping")
        return current

    for env_map, name in ((_REDIS_ENV, "redis"), (_LLM_ENV, "llm")):
        for var, field_name in env_map.items():
            value = variables.get(var)
            if value:
                section(name)[field_name] = value
    for var, value in variables.items():
        if var.startswith(_PREFIX) and "__" in var:
            path = var[len(_PREFIX) :].lower().split("__")  # VOXCORE_LLM__MODELS__MAIN -> llm.models.main
            if all(path):
                node = section(path[0])
                for part in path[1:-1]:
                    child = node.setdefault(part, {})
                    if not isinstance(child, dict):
                        raise ConfigurationError(f"{var}: setting {part!r} is not a section")
                    node = child
                node[path[-1]] = value
