"""The composition root a host service imports: ``Container``.

Usage (see the README)::

    container = Container(config_path="/srv/app/voxcore.yml")
    await container.init_resources()      # connects the cache (logging stays the host's)
    cache = container.cache()             # one RedisCacheManager per container (process)
    manager = await container.open_conversation("call-42")  # one per phone call, connection warm
    async for chunk in manager.process_user_turn("Здравствуйте!"):
        ...
    await manager.shutdown()
    await container.shutdown_resources()  # closes the cache
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dependency_injector import containers, providers
from opentelemetry import trace

from voxcore.core.domain.keys import session_hash
from voxcore.core.domain.live_events import operator_token, session_token
from voxcore.core.ports.errors import ConfigurationError
from voxcore.entrypoints.lazy import lazy as _lazy
from voxcore.entrypoints.logging import configure_logging, remove_logging
from voxcore.entrypoints.manifest import numbers_manifest_path, read_manifest
from voxcore.entrypoints.settings import AgentVoice, Settings, load_settings
from voxcore.entrypoints.telemetry import Telemetry, setup_telemetry
from voxcore.events import emit

log = logging.getLogger("voxcore.container")

# Adapters and use cases: imported for type checkers only; at run time each name is a _lazy stand-in
# that imports its module on first call. A new one goes in both lists (tests/unit/test_public_api.py
# fails when importing the container loads numpy, soxr, redis, httpx or tiktoken).
if TYPE_CHECKING:
    from voxcore.adapters.audio.convert import SoxrAudioConverter
    from voxcore.adapters.espeak.tts import EspeakTTSEngine
    from voxcore.adapters.openai.client import OpenAILLMClient
    from voxcore.adapters.openai.config import OpenAIConfig
    from voxcore.adapters.openai.connection import OpenAIConnectionManager
    from voxcore.adapters.openai.embeddings import OpenAIEmbeddings
    from voxcore.adapters.openai.shared import SharedConnections
    from voxcore.adapters.openai.tokenizer import make_tokenizer
    from voxcore.adapters.openai.tts import OpenAITTSEngine
    from voxcore.adapters.redis.cache import RedisCacheManager
    from voxcore.adapters.redis.config import RedisConfig
    from voxcore.adapters.redis.dialogue import RedisDialogueStore
    from voxcore.adapters.redis.embedding_store import RedisEmbeddingStore
    from voxcore.adapters.redis.lease import RedisKeyLeases
    from voxcore.adapters.redis.live_events import RedisEventHub, RedisEventStreams, RedisLiveEventPublisher
    from voxcore.adapters.redis.rate_limit import RedisRateLimiter
    from voxcore.application.calls import CallRegistry
    from voxcore.application.context import LLMContext
    from voxcore.application.dialogue import DialogueRecorder, restore_dialogue
    from voxcore.application.dual_context import DualContextController
    from voxcore.application.embedding_cache import EmbeddingCache
    from voxcore.application.faq import FaqMatcher
    from voxcore.application.hybrid import HybridResponder
    from voxcore.application.live_events import CallEvents
    from voxcore.application.manager import ConversationManager, start_call_span
    from voxcore.application.shared_synthesis import SharedSynthesis
    from voxcore.application.spoken import SpokenConversation
    from voxcore.application.voice import VoiceService
    from voxcore.core.domain.audio import AudioFormat
    from voxcore.core.domain.dual_context import DualContextPolicy
    from voxcore.core.domain.resilience import CircuitBreaker
    from voxcore.core.domain.voice import AgentVoiceSettings
    from voxcore.core.ports.llm import LLMConnectionManager
    from voxcore.core.ports.tokenizer import Tokenizer
    from voxcore.core.ports.tts import TTSEngine
    from voxcore.entrypoints.faq import read_faq_manifest
    from voxcore.entrypoints.prompts import load_prompts
else:
    # The voice stack (numpy, soxr), Redis and HTTP clients load when a provider first builds
    # them: importing the container stays cheap for a host (see _lazy).
    read_faq_manifest = _lazy("voxcore.entrypoints.faq", "read_faq_manifest")
    load_prompts = _lazy("voxcore.entrypoints.prompts", "load_prompts")
    SoxrAudioConverter = _lazy("voxcore.adapters.audio.convert", "SoxrAudioConverter")
    EspeakTTSEngine = _lazy("voxcore.adapters.espeak.tts", "EspeakTTSEngine")
    OpenAILLMClient = _lazy("voxcore.adapters.openai.client", "OpenAILLMClient")
    OpenAIConfig = _lazy("voxcore.adapters.openai.config", "OpenAIConfig")
    OpenAIConnectionManager = _lazy("voxcore.adapters.openai.connection", "OpenAIConnectionManager")
    OpenAIEmbeddings = _lazy("voxcore.adapters.openai.embeddings", "OpenAIEmbeddings")
    SharedConnections = _lazy("voxcore.adapters.openai.shared", "SharedConnections")
    make_tokenizer = _lazy("voxcore.adapters.openai.tokenizer", "make_tokenizer")
    OpenAITTSEngine = _lazy("voxcore.adapters.openai.tts", "OpenAITTSEngine")
    RedisCacheManager = _lazy("voxcore.adapters.redis.cache", "RedisCacheManager")
    RedisConfig = _lazy("voxcore.adapters.redis.config", "RedisConfig")
    RedisEmbeddingStore = _lazy("voxcore.adapters.redis.embedding_store", "RedisEmbeddingStore")
    RedisKeyLeases = _lazy("voxcore.adapters.redis.lease", "RedisKeyLeases")
    RedisRateLimiter = _lazy("voxcore.adapters.redis.rate_limit", "RedisRateLimiter")
    CallRegistry = _lazy("voxcore.application.calls", "CallRegistry")
    RedisDialogueStore = _lazy("voxcore.adapters.redis.dialogue", "RedisDialogueStore")
    RedisEventHub = _lazy("voxcore.adapters.redis.live_events", "RedisEventHub")
    RedisEventStreams = _lazy("voxcore.adapters.redis.live_events", "RedisEventStreams")
    RedisLiveEventPublisher = _lazy("voxcore.adapters.redis.live_events", "RedisLiveEventPublisher")
    DialogueRecorder = _lazy("voxcore.application.dialogue", "DialogueRecorder")
    restore_dialogue = _lazy("voxcore.application.dialogue", "restore_dialogue")
    CallEvents = _lazy("voxcore.application.live_events", "CallEvents")
    LLMContext = _lazy("voxcore.application.context", "LLMContext")
    DualContextController = _lazy("voxcore.application.dual_context", "DualContextController")
    EmbeddingCache = _lazy("voxcore.application.embedding_cache", "EmbeddingCache")
    FaqMatcher = _lazy("voxcore.application.faq", "FaqMatcher")
    HybridResponder = _lazy("voxcore.application.hybrid", "HybridResponder")
    ConversationManager = _lazy("voxcore.application.manager", "ConversationManager")
    start_call_span = _lazy("voxcore.application.manager", "start_call_span")
    SharedSynthesis = _lazy("voxcore.application.shared_synthesis", "SharedSynthesis")
    SpokenConversation = _lazy("voxcore.application.spoken", "SpokenConversation")
    VoiceService = _lazy("voxcore.application.voice", "VoiceService")
    AudioFormat = _lazy("voxcore.core.domain.audio", "AudioFormat")
    DualContextPolicy = _lazy("voxcore.core.domain.dual_context", "DualContextPolicy")
    CircuitBreaker = _lazy("voxcore.core.domain.resilience", "CircuitBreaker")
    AgentVoiceSettings = _lazy("voxcore.core.domain.voice", "AgentVoiceSettings")

_tracer = trace.get_tracer("voxcore.conversation")


def redis_config_from(settings: Settings) -> RedisConfig:
    """Translate validated settings into the adapter's ``RedisConfig``."""
    r = settings.redis
    return RedisConfig(
        host=r.host,
        port=r.port,
        db=r.db,
        password=r.password.get_secret_value() if r.password else None,
        url=r.url,
        socket_timeout=r.socket_timeout,
        socket_connect_timeout=r.socket_connect_timeout,
        max_connections=r.max_connections,
        pool_timeout=r.pool_timeout,
        retries=r.retries,
        health_check_interval=r.health_check_interval,
        mode=r.mode,
        nodes=tuple(r.nodes),
        sentinels=tuple(r.sentinels),
        sentinel_service=r.sentinel_service,
        sentinel_password=r.sentinel_password.get_secret_value() if r.sentinel_password else None,
    )


def build_cache(settings: Settings, redis_config: RedisConfig) -> RedisCacheManager:
    """Build the (not yet connected) cache from settings."""
    c = settings.cache
    return RedisCacheManager(
        redis_config,
        key_prefix=c.key_prefix,
        tts_ttl_seconds=c.tts_ttl_seconds,
        stream_first_batch=c.stream_first_batch,
        prev_grace_seconds=c.prev_grace_seconds,
        breaker=CircuitBreaker(
            base_window_s=c.breaker_base_window_ms / 1000, max_window_s=c.breaker_max_window_ms / 1000
        ),
    )


def openai_config_from(settings: Settings) -> OpenAIConfig:
    """Translate validated settings into the OpenAI adapter's config."""
    llm = settings.llm
    return OpenAIConfig(
        base_url=llm.base_url,
        api_key=llm.api_key.get_secret_value() if llm.api_key else None,
        http2=llm.http2,
        connect_timeout_s=llm.timeouts.connect_s,
        write_timeout_s=llm.timeouts.write_s,
        read_timeout_s=llm.timeouts.read_s,
        pool_timeout_s=llm.timeouts.pool_s,
        first_token_timeout_s=llm.timeouts.first_token_s,
        turn_timeout_s=llm.timeouts.turn_s,
        keepalive_expiry_s=llm.keepalive_expiry_s,
        warmup_interval_s=llm.warmup.interval_s,
        warmup_endpoint=llm.warmup.endpoint,
        warmup_completion=llm.warmup.completion,
        warmup_model=llm.models.main,
        structured_output=llm.structured_output,
        max_concurrent_requests=llm.max_concurrent_requests,
        stream_usage=llm.stream_usage,
        max_output_tokens=llm.max_output_tokens,
        temperature=llm.temperature,
    )


def tokenizer_for(settings: Settings) -> Tokenizer:
    """The tokenizer of the main model (loaded once per process; see ``make_tokenizer``)."""
    return make_tokenizer(settings.llm.models.main)


def dual_policy_from(settings: Settings) -> DualContextPolicy:
    """The dual-context thresholds."""
    d = settings.dual_context
    return DualContextPolicy(
        warmup_threshold_ratio=d.warmup_threshold_ratio,
        handover_threshold_ratio=d.handover_threshold_ratio,
        hard_limit_ratio=d.hard_limit_ratio,
    )


def connection_manager_for(
    config: OpenAIConfig, shared: Callable[[], SharedConnections], use_shared: bool
) -> LLMConnectionManager[Any]:
    """One call's connection: its own manager, or a handle on the shared client (llm.shared_connection)."""
    if use_shared:
        return shared().handle(config)
    return OpenAIConnectionManager(config)


@asynccontextmanager
async def closing_shared_connections(shared: SharedConnections) -> AsyncIterator[SharedConnections]:
    """Close the shared LLM clients (if any were made) at ``shutdown_resources()``."""
    try:
        yield shared
    finally:
        await shared.aclose()


async def open_conversation(
    session_id: str,
    resume: bool = False,
    *,
    connection_factory: Callable[[], LLMConnectionManager[Any]],
    manager_factory: Callable[..., ConversationManager],
    context_factory: Callable[..., LLMContext] | None = None,
    dual_factory: Callable[..., DualContextController] | None = None,
    settings: Settings | None = None,
    dialogue_store: Any = None,
    publisher: Any = None,
) -> ConversationManager:
    """Build one call's conversation with its connection already open and warm.

    The handshake happens here, before the first turn, so the first turn is as fast as the rest.
    Provider errors at the handshake (bad key, unknown endpoint) are raised as typed ``LLMError``s.

    With ``resume=True`` the active context (summary + recent turns) is restored from the dialogue
    cache, exactly as stored; a corrupt, foreign-version or unreadable record is refused with one
    log line and the call starts fresh. Without it (or when nothing is stored) the conversation
    starts empty and its first write replaces whatever the cache held for ``session_id``.

    The call's ``voxcore.call`` span starts here (a child of the host's span current now, if any)
    and ends at ``manager.shutdown()``; the handshake and the warm-up loop run inside it.
    """
    # The store and the publisher arrive as providers (or values): an awaitable argument would make the
    # container run this coroutine detached from its caller, and a cancelled open would leak the call.
    store = await _resolved(_provided(dialogue_store)) if settings is not None else None
    events_publisher = await _resolved(_provided(publisher)) if settings is not None else None
    restored = await restore_dialogue(store, session_id) if resume and store is not None else None
    call_span = start_call_span(_tracer, session_hash(session_id))
    connection: LLMConnectionManager[Any] | None = None
    try:
        with trace.use_span(call_span, end_on_exit=False):  # the warm-up task inherits this context
            connection = connection_factory()
            await connection.start()
    except BaseException as exc:
        call_span.record_exception(exc)
        call_span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        call_span.end()
        if connection is not None:  # a failed or cancelled open leaves no connection or warm-up loop
            await asyncio.shield(connection.shutdown())
        raise
    try:
        extra: dict[str, Any] = {}
        if restored is not None:
            assert context_factory is not None and dual_factory is not None
            active = context_factory(history=restored.history, summary=restored.summary)
            extra["dual_context"] = dual_factory(active=active)
        if store is not None and settings is not None:
            d = settings.dialogue
            extra["dialogue"] = DialogueRecorder(
                store=store,
                session_id=session_id,
                first_seq=restored.last_seq + 1 if restored is not None else 1,
                replace=restored is None,
                max_pending=d.max_messages,
                drain_timeout_s=d.drain_timeout_s,
            )
        events = None
        if events_publisher is not None and settings is not None:
            events = CallEvents(
                publisher=events_publisher, session_id=session_id, coalesce_ms=settings.events.coalesce_ms
            )
            extra["events"] = events
        manager = manager_factory(
            session_id=session_id, connection_manager=connection, call_span=call_span, **extra
        )
    except BaseException:
        call_span.end()
        await asyncio.shield(connection.shutdown())
        raise
    if events is not None and settings is not None:
        events.call_started(
            resumed=restored is not None,
            restored_messages=len(restored.history) if restored is not None else 0,
            model=settings.llm.models.main,
        )
    return manager


def _provided(value: Any) -> Any:
    """A provider's value (a dependency-injector provider is called), or ``value`` itself."""
    return value() if isinstance(value, providers.Provider) else value


async def _resolved(value: Any) -> Any:
    """An async ``Resource`` injected into a ``Coroutine`` provider arrives as an awaitable."""
    return await value if inspect.isawaitable(value) else value


def events_secret_from(settings: Settings) -> str:
    """``events.secret``, or a random one for this process (logged: tokens then work in this process only)."""
    if settings.events.secret is not None and settings.events.secret.get_secret_value():
        return settings.events.secret.get_secret_value()
    emit(
        log,
        "events_secret_generated",
        logging.WARNING,
        reason="events.secret is not set (VOXCORE_EVENTS__SECRET): a random secret for this process; "
        "tokens made by other processes will not open its events",
    )
    return secrets.token_hex(32)


def event_streams_from(settings: Settings, client: Any, blocking_client: Any = None) -> RedisEventStreams:
    """The Redis commands of the live events, with the settings' caps and TTL."""
    e = settings.events
    return RedisEventStreams(
        client,
        blocking_client,
        key_prefix=settings.cache.key_prefix,
        maxlen=e.stream_maxlen,
        ttl_seconds=e.stream_ttl_seconds,
        index_maxlen=e.index_maxlen,
    )


@asynccontextmanager
async def dialogue_store(settings: Settings, client: Any) -> AsyncIterator[RedisDialogueStore | None]:
    """The dialogue cache when ``dialogue.enabled``, else ``None``."""
    d = settings.dialogue
    if not d.enabled:
        yield None
        return
    yield RedisDialogueStore(
        client, ttl_seconds=d.ttl_seconds, max_messages=d.max_messages, key_prefix=settings.cache.key_prefix
    )


@asynccontextmanager
async def event_publisher(settings: Settings, client: Any) -> AsyncIterator[RedisLiveEventPublisher | None]:
    """The live events publisher when ``events.enabled`` (drained at shutdown), else ``None``."""
    e = settings.events
    if not e.enabled:
        yield None
        return
    publisher = RedisLiveEventPublisher(
        event_streams_from(settings, client),
        queue_size=e.queue_size,
        batch_size=e.batch_size,
        drain_timeout_s=e.drain_timeout_s,
    )
    try:
        yield publisher
    finally:
        await publisher.aclose()


def blocking_redis_config(settings: Settings, config: RedisConfig) -> RedisConfig:
    """The pub/sub pool's config: a socket timeout longer than one blocking read (redis-py issue 2807),
    no transparent retry (a dropped connection must be seen, so subscribers replay what it missed)."""
    block = settings.events.read_block_s
    return dataclasses.replace(
        config,
        socket_timeout=block + max(config.socket_timeout, 1.0) + 2.0,
        max_connections=2,
        retries=0,
        client_name="voxcore-events",
    )


@asynccontextmanager
async def event_hub(settings: Settings, config: RedisConfig, client: Any) -> AsyncIterator[RedisEventHub]:
    """The process's reader of live events (connects at its first subscriber); closed at shutdown."""
    blocking = blocking_redis_config(settings, config).build()
    e = settings.events
    hub = RedisEventHub(
        event_streams_from(settings, client, blocking),
        read_block_s=e.read_block_s,
        reconnect_grace_s=e.reconnect_grace_s,
        retry_ms=e.retry_ms,
    )
    try:
        yield hub
    finally:
        await hub.aclose()
        await blocking.aclose()


def agent_voice(agent: AgentVoice) -> AgentVoiceSettings:
    """Settings model -> the domain's ``AgentVoiceSettings``."""
    f = agent.audio_format
    return AgentVoiceSettings(
        tts_enabled=agent.tts_enabled,
        engine=agent.engine,
        voice=agent.voice,
        model=agent.model,
        audio_format=AudioFormat(f.sample_rate, f.channels, f.sample_width),
        speed=agent.speed,
        max_chars=agent.max_chars,
    )


@asynccontextmanager
async def redis_client(config: RedisConfig) -> AsyncIterator[Any]:
    """A plain Redis client for services that script Redis themselves (the rate limiter)."""
    client = config.build()
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def tts_engines(settings: Settings) -> AsyncIterator[dict[str, TTSEngine]]:
    """Every TTS engine by name; their HTTP clients/processes are closed at shutdown."""
    v, llm = settings.voice, settings.llm
    engines: dict[str, TTSEngine] = {
        "openai": OpenAITTSEngine(
            base_url=v.openai.base_url or llm.base_url,
            api_key=llm.api_key.get_secret_value() if llm.api_key else None,
            timeout_s=v.openai.timeout_s,
            http2=llm.http2,
            model=v.openai.model,
        ),
        "espeak-ng": EspeakTTSEngine(
            binary=v.espeak.binary, timeout_s=v.espeak.timeout_s, max_chars=v.espeak.max_chars
        ),
    }
    try:
        yield engines
    finally:
        for engine in engines.values():
            await engine.aclose()


@asynccontextmanager
async def voice_service(
    settings: Settings, engines: dict[str, TTSEngine], cache: RedisCacheManager, client: Any
) -> AsyncIterator[VoiceService | None]:
    """The voice service when ``voice.enabled`` (engines checked at start), else ``None``."""
    v = settings.voice
    if not v.enabled:
        yield None
        return
    limiter = RedisRateLimiter(
        client,
        limit=v.rate_limit.limit,
        period_s=v.rate_limit.period_s,
        burst=v.rate_limit.burst,
        fail_open=v.rate_limit.fail_open,
        key_prefix=settings.cache.key_prefix,
    )
    service = VoiceService(
        agents={name: agent_voice(agent) for name, agent in v.agents.items()},
        engines=engines,
        default_agent=agent_voice(v.default_agent) if v.default_agent else None,
        rate_limiter=limiter,
        cache=cache,
        shared_synthesis=shared_synthesis(settings, cache, client),
    )
    await service.start()
    try:
        yield service
    finally:
        await service.aclose()
        await limiter.aclose()


def shared_synthesis(settings: Settings, cache: RedisCacheManager, client: Any) -> SharedSynthesis | None:
    """Cross-worker single flight of TTS misses (``voice.synthesis_lease``), or ``None``."""
    lease = settings.voice.synthesis_lease
    if not lease.enabled:
        return None
    return SharedSynthesis(
        cache=cache,
        leases=RedisKeyLeases(client, key_prefix=settings.cache.key_prefix),
        lease_ttl_s=lease.ttl_s,
        wait_timeout_s=lease.wait_s,
        poll_interval_s=lease.poll_ms / 1000,
    )


def manifest_transcripts(path: Path) -> Mapping[str, str]:
    """``static:*`` key -> transcript of a fragment manifest, parsed once per file version.

    A responder is opened per call: parsing the YAML each time (~0.2 s for the number pack) would
    cost more CPU than the call's audio.

    Raises:
        ConfigurationError: the manifest cannot be read or is invalid.
    """
    try:
        stat = path.stat()
    except OSError as exc:
        raise ConfigurationError(f"cannot read manifest {path}: {exc}") from exc
    return _parsed_transcripts(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _parsed_transcripts(path: str, _mtime_ns: int, _size: int) -> Mapping[str, str]:
    return MappingProxyType(
        {spec.key: spec.transcript for spec in read_manifest(Path(path)) if spec.transcript}
    )


async def open_hybrid_responder(
    *,
    settings: Settings,
    cache: RedisCacheManager,
    engines: Any,
    converter: SoxrAudioConverter,
    redis: Any = None,
) -> HybridResponder:
    """A responder speaking with ``voice.hybrid.agent``'s voice (or the default agent's).

    Raises:
        ConfigurationError: the agent is unknown or has TTS disabled, or the manifest is invalid.
    """
    v = settings.voice
    name = v.hybrid.agent
    agent = v.agents.get(name) if name else v.default_agent
    if agent is None or not agent.tts_enabled:
        raise ConfigurationError(
            f"voice.hybrid.agent {name!r} has no voice: define it under voice.agents with tts_enabled"
            if name
            else "voice.default_agent is not set (or has TTS disabled): hybrid replies need a voice"
        )
    tts = (await engines if inspect.isawaitable(engines) else engines)[agent.engine]
    # The number pack's transcripts always: say_money() & co. name its fragments, and a fragment
    # missing from the cache is then spoken from its word instead of skipped.
    transcripts = dict(manifest_transcripts(numbers_manifest_path()))
    if v.hybrid.manifest_path:
        path = Path(v.hybrid.manifest_path)
        if not path.is_absolute() and settings.base_dir:
            path = Path(settings.base_dir) / path
        transcripts.update(manifest_transcripts(path))
    voice = agent_voice(agent)
    client = await redis if inspect.isawaitable(redis) else redis
    return HybridResponder(
        cache=cache,
        tts=tts,
        converter=converter,
        target_format=voice.audio_format,
        voice=voice.voice,
        tts_model=voice.model,
        transcripts=transcripts,
        prefetch=v.hybrid.prefetch,
        max_background_writes=v.hybrid.max_background_writes,
        speed=voice.speed,
        speculative_first_tts=v.hybrid.speculative_first_tts,
        join_pause_ms=v.hybrid.join_pause_ms,
        silence_threshold=v.hybrid.silence_threshold,
        shared_synthesis=shared_synthesis(settings, cache, client) if client is not None else None,
    )


@asynccontextmanager
async def embedding_cache(settings: Settings, client: Any) -> AsyncIterator[EmbeddingCache]:
    """The hot embedding cache (``embeddings.*``) over the OpenAI-compatible provider and Redis.

    Nothing connects here: the provider's HTTP client opens on the first miss.
    """
    e, llm = settings.embeddings, settings.llm
    provider = OpenAIEmbeddings(
        base_url=e.base_url or llm.base_url,
        api_key=llm.api_key.get_secret_value() if llm.api_key else None,
        model=e.model,
        dimensions=e.dimensions,
        timeout_s=e.timeout_s,
        http2=llm.http2,
        max_batch=e.max_batch,
        encoding_format=e.encoding_format,
    )
    c = settings.cache
    cache = EmbeddingCache(
        provider=provider,
        store=RedisEmbeddingStore(
            await client if inspect.isawaitable(client) else client,
            breaker=CircuitBreaker(
                base_window_s=c.breaker_base_window_ms / 1000, max_window_s=c.breaker_max_window_ms / 1000
            ),
        ),
        key_prefix=c.key_prefix,
        l1_max_bytes=e.cache.l1_max_bytes,
        l1_ttl_seconds=e.cache.l1_ttl_seconds,
        ttl_seconds=e.cache.ttl_seconds,
    )
    try:
        yield cache
    finally:
        await cache.aclose()


@asynccontextmanager
async def faq_matcher(settings: Settings, embeddings: Any) -> AsyncIterator[FaqMatcher | None]:
    """The started FAQ matcher when ``faq.enabled`` (questions embedded at start), else ``None``.

    Raises:
        ConfigurationError: the manifest is missing or invalid.
        EmbeddingError: the questions could not be embedded (start-up fails loudly).
    """
    f = settings.faq
    if not f.enabled or not f.manifest_path:
        yield None
        return
    path = Path(f.manifest_path)
    if not path.is_absolute() and settings.base_dir:
        path = Path(settings.base_dir) / path
    matcher = FaqMatcher(
        embeddings=await embeddings if inspect.isawaitable(embeddings) else embeddings,
        entries=read_faq_manifest(path),
        threshold=f.threshold,
        timeout_s=f.timeout_ms / 1000,
    )
    await matcher.start()
    yield matcher


async def open_spoken_conversation(
    session_id: str,
    *,
    connection_factory: Callable[[], LLMConnectionManager[Any]],
    manager_factory: Callable[..., ConversationManager],
    settings: Settings,
    cache: RedisCacheManager,
    engines: Callable[[], Any],
    converter: SoxrAudioConverter,
    faq: Callable[[], Any],
    opener: Callable[..., Awaitable[ConversationManager]] | None = None,
) -> SpokenConversation:
    """One call's spoken turns: a warm conversation, a hybrid responder, and the FAQ matcher if enabled.

    ``await conversation.shutdown()`` closes the call's connection and drains the responder. The
    resources arrive as providers (resolved here): an awaitable argument would make the container
    run this coroutine detached from its caller, so a caller cancelling the open (a caller hanging up
    while connecting) would leak the opened call.
    """
    matcher = await _resolved(faq())
    engine_map = await _resolved(engines())
    if opener is not None:  # the container's open_conversation: dialogue cache and live events included
        manager = await opener(session_id)
    else:
        manager = await open_conversation(
            session_id, connection_factory=connection_factory, manager_factory=manager_factory
        )
    try:
        responder = await open_hybrid_responder(
            settings=settings, cache=cache, engines=engine_map, converter=converter
        )
    except BaseException:
        await asyncio.shield(manager.shutdown())
        raise
    return SpokenConversation(conversation=manager, responder=responder, faq=matcher)


def preload_llm(
    settings: Settings, prompts: Callable[[], object], tokenizer: Callable[[], Tokenizer]
) -> Iterator[None]:
    """Build the prompts and the tokenizer at start-up (``llm.preload``): a broken prompts file fails
    ``init_resources()``, and the first call does not pay for loading the BPE ranks."""
    if settings.llm.preload:
        prompts()
        tokenizer()
    yield None


@asynccontextmanager
async def telemetry_setup(settings: Settings) -> AsyncIterator[Telemetry | None]:
    """Install the OpenTelemetry SDK when ``telemetry.enabled``; flush and stop it at shutdown."""
    t = settings.telemetry
    if not t.enabled:
        yield None
        return
    telemetry = setup_telemetry(
        t.service_name,
        t.otlp_endpoint,
        export_interval_ms=t.metric_export_interval_ms,
        protocol=t.protocol,
        traces_exporter=t.traces_exporter,
        metrics_exporter=t.metrics_exporter,
        shutdown_timeout_s=t.shutdown_timeout_s,
    )
    try:
        yield telemetry
    finally:
        telemetry.shutdown()


@asynccontextmanager
async def connected_cache(cache: RedisCacheManager) -> AsyncIterator[RedisCacheManager]:
    """Connect the cache for the container's lifetime (``init_resources``/``shutdown_resources``)."""
    await cache.connect()
    try:
        yield cache
    finally:
        await cache.close()


@asynccontextmanager
async def json_logging(settings: Settings) -> AsyncIterator[logging.Handler | None]:
    """Install voxcore's JSON log handler when ``logging.configure`` is true; undo it at shutdown.

    By default (``false``) the host's logging set-up gets the records, untouched.
    """
    if not settings.logging.configure:
        yield None
        return
    handler = configure_logging(settings.logging.level)
    try:
        yield handler
    finally:
        remove_logging(handler)


@asynccontextmanager
async def call_registry(opener: Callable[..., Any]) -> AsyncIterator[CallRegistry]:
    """The container's per-call registry; every call still open is closed at ``shutdown_resources``."""
    registry = CallRegistry(opener)
    try:
        yield registry
    finally:
        await registry.aclose()


class Container(containers.DeclarativeContainer):
    """voxcore's dependency-injection container.

    Host-suppliable dependencies:
        config_path: YAML settings file (``None``: defaults + environment only).
        settings: A ready :class:`Settings` object instead of loading one.

    Providers:
        cache: The process-wide ``RedisCacheManager`` (``Singleton``), connected by
            ``init_resources()`` and closed by ``shutdown_resources()``.
        tokenizer, prompts, openai_config: Shared, built once.
        connection_manager, llm_client, llm_context, dual_context, conversation_manager: one
            call's objects (``Factory``: a new set per call).
        open_conversation: ``await container.open_conversation(session_id)`` -> a ready
            ``ConversationManager`` whose connection is already warm; ``await manager.shutdown()``
            closes it.
        calls: ``await container.calls()`` -> the :class:`~voxcore.application.calls.CallRegistry`
            (one conversation per call id, a turn lock per call; open calls closed at shutdown).
        audio_converter: PCM format conversion (soxr).
        tts_engines: ``{"openai": ..., "espeak-ng": ...}`` (a resource: ``await container.tts_engines()``).
        voice_service: ``await container.voice_service()`` -> the ``VoiceService`` when
            ``voice.enabled`` (engines checked at ``init_resources()``), else ``None``.
        open_hybrid_responder: ``await container.open_hybrid_responder()`` -> a
            ``HybridResponder`` with ``voice.hybrid``'s voice; ``await responder.shutdown()``
            drains its background cache writes.
        embedding_cache: ``await container.embedding_cache()`` -> the hot ``EmbeddingCache``
            (``embeddings.*``: L1 LRU + Redis in front of the ``/embeddings`` provider).
        faq_matcher: ``await container.faq_matcher()`` -> the started ``FaqMatcher`` when
            ``faq.enabled`` (questions embedded at ``init_resources()``), else ``None``.
        open_spoken_conversation: ``await container.open_spoken_conversation(session_id)`` -> a
            ``SpokenConversation``: ``respond(text)`` yields audio, from a FAQ recording (``faq_hit``)
            or the LLM's answer; ``await conversation.shutdown()`` closes it.
        dialogue_store: The dialogue cache (``RedisDialogueStore``; ``None`` when disabled);
            ``open_conversation(session_id, resume=True)`` restores a call from it.
        event_publisher: The live events publisher (``None`` when disabled); drained at shutdown.
        event_hub: The process's one pub/sub reader of live events (what ``voxcore serve`` reads).
        event_token: ``container.event_token(session_id)`` -> the token that opens that call's events.
        operator_token: ``container.operator_token()`` -> the token that opens every call's events.
    """

    config_path = providers.Dependency(instance_of=object, default=providers.Object(None))
    settings = providers.Dependency(
        instance_of=Settings, default=providers.Singleton(load_settings, config_path)
    )
    logging_setup = providers.Resource(json_logging, settings)
    redis_config = providers.Singleton(redis_config_from, settings)
    cache = providers.Singleton(build_cache, settings, redis_config)
    cache_connection = providers.Resource(connected_cache, cache)
    telemetry = providers.Resource(telemetry_setup, settings)

    # LLM: shared pieces
    prompts = providers.Singleton(load_prompts, settings)
    tokenizer = providers.Singleton(tokenizer_for, settings)
    openai_config = providers.Singleton(openai_config_from, settings)
    dual_policy = providers.Singleton(dual_policy_from, settings)
    llm_preload = providers.Resource(preload_llm, settings, prompts.provider, tokenizer.provider)

    # LLM: one call's objects
    shared_connections = providers.Singleton(SharedConnections)
    shared_connections_lifetime = providers.Resource(closing_shared_connections, shared_connections)
    connection_manager = providers.Factory(
        connection_manager_for,
        openai_config,
        shared_connections.provider,
        settings.provided.llm.shared_connection,
    )
    llm_client = providers.Factory(OpenAILLMClient, openai_config)
    llm_context = providers.Factory(
        LLMContext,
        prompts=prompts,
        tokenizer=tokenizer,
        context_window_tokens=settings.provided.llm.context_window_tokens,
    )
    dual_context = providers.Factory(
        DualContextController,
        active=llm_context,
        policy=dual_policy,
        recent_messages=settings.provided.dual_context.recent_messages,
    )
    conversation_manager = providers.Factory(
        ConversationManager,
        connection_manager=connection_manager,
        llm_client=llm_client,
        dual_context=dual_context,
        main_model=settings.provided.llm.models.main,
        summary_model=settings.provided.llm.models.summary,
        cache=cache,
        summary_ttl_seconds=settings.provided.summary.ttl_seconds,
        summary_max_tokens=settings.provided.summary.max_output_tokens,
        unsafe_reply=settings.provided.llm.unsafe_reply,
        record_text=settings.provided.telemetry.record_text,
    )

    # Dialogue cache and live events
    redis_client = providers.Resource(redis_client, redis_config)
    dialogue_store = providers.Resource(dialogue_store, settings, redis_client)
    event_publisher = providers.Resource(event_publisher, settings, redis_client)
    event_hub = providers.Resource(event_hub, settings, redis_config, redis_client)
    events_secret = providers.Singleton(events_secret_from, settings)
    event_token = providers.Callable(session_token, events_secret)
    operator_token = providers.Callable(operator_token, events_secret)

    open_conversation = providers.Coroutine(
        open_conversation,
        connection_factory=connection_manager.provider,
        manager_factory=conversation_manager.provider,
        context_factory=llm_context.provider,
        dual_factory=dual_context.provider,
        settings=settings,
        dialogue_store=dialogue_store.provider,
        publisher=event_publisher.provider,
    )
    calls = providers.Resource(call_registry, open_conversation.provider)

    # Speech
    audio_converter = providers.Singleton(SoxrAudioConverter)
    tts_engines = providers.Resource(tts_engines, settings)
    voice_service = providers.Resource(voice_service, settings, tts_engines, cache, redis_client)
    open_hybrid_responder = providers.Coroutine(
        open_hybrid_responder,
        settings=settings,
        cache=cache,
        engines=tts_engines,
        converter=audio_converter,
        redis=redis_client,
    )

    # Embeddings and the FAQ matcher
    embedding_cache = providers.Resource(embedding_cache, settings, redis_client)
    faq_matcher = providers.Resource(faq_matcher, settings, embedding_cache)
    open_spoken_conversation = providers.Coroutine(
        open_spoken_conversation,
        connection_factory=connection_manager.provider,
        manager_factory=conversation_manager.provider,
        settings=settings,
        cache=cache,
        engines=tts_engines.provider,
        converter=audio_converter,
        faq=faq_matcher.provider,
        opener=open_conversation.provider,
    )
