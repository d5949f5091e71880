"""What a CLI run needs: settings, a Redis, an LLM provider (or the local simulator), a container.

Redis: ``--redis-url``; ``--embedded-redis``; the configured location (config file, ``REDIS_URL``/
``REDIS_HOST``...); else a private ``redis-server`` for the run (``embedded_redis_started``), with a
random password. A Redis that merely answers on 127.0.0.1:6379 is never used unless configured.

LLM: the configured provider when ``OPENAI_API_KEY``/``OPENAI_BASE_URL`` (or ``llm.api_key``/
``llm.base_url``) are set; otherwise the project's local OpenAI-compatible *simulator* is started
on 127.0.0.1 for the run and every report says so (``llm_simulator_started``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from voxcore.entrypoints.container import Container
from voxcore.entrypoints.embedded_redis import EmbeddedRedis
from voxcore.entrypoints.logging import configure_logging
from voxcore.entrypoints.settings import Settings, load_settings
from voxcore.events import emit
from voxcore.simulator import EchoReply, OpenAISimulator

log = logging.getLogger("voxcore.cli")

#: Simulator timing that resembles a hosted model (so probes on the simulator show realistic shapes).
SIM_FIRST_TOKEN_MS = 120.0
SIM_INTER_CHUNK_MS = 8.0
SIM_API_KEY = "sk-simulator"
#: What the simulator answers to plain (non-streamed) completions, i.e. summary requests: a short
#: summary like a real model's, so the standby context really is smaller than the active one.
SIM_SUMMARY = "Клиент расспрашивает о страховых продуктах и выгодах; ассистент отвечает кратко и вежливо."


def simulator_reply(request: dict[str, Any]) -> str:
    """The simulator's reply policy for CLI runs: echo for turns, a short summary for summaries."""
    if not request.get("stream"):
        return SIM_SUMMARY
    return _ECHO(request)


_ECHO = EchoReply()


@dataclass
class Runtime:
    """One CLI run's wiring.

    Attributes:
        container: The container (resources initialised).
        settings: The effective settings (after CLI overrides).
        llm_target: ``simulator`` or the provider's base URL.
        simulator: The running simulator, when used.
        redis_target: Where the cache's Redis is (without secrets).
    """

    container: Container
    settings: Settings
    llm_target: str
    simulator: OpenAISimulator | None
    redis_target: str

    @property
    def on_simulator(self) -> bool:
        """True when the LLM is the local simulator."""
        return self.simulator is not None


def llm_configured(settings: Settings) -> bool:
    """True when a real provider was configured (key or base URL from any source)."""
    return bool(settings.llm.model_fields_set & {"api_key", "base_url"})


def _update(settings: Settings, section: str, **values: Any) -> Settings:
    current = getattr(settings, section)
    return settings.model_copy(update={section: current.model_copy(update=values)})


async def maybe_await(result: Awaitable[Any] | None) -> None:
    """dependency-injector returns None instead of an awaitable when every resource is sync."""
    if result is not None:
        await result


@asynccontextmanager
async def open_runtime(
    *,
    config: Path | None,
    log_level: str,
    redis_url: str | None = None,
    embedded_redis: bool = False,
    use_llm: bool = False,
    prompts: Path | None = None,
    context_window_tokens: int | None = None,
    simulator_options: dict[str, Any] | None = None,
    embedded_data_dir: Path | None = None,
) -> AsyncIterator[Runtime]:
    """Resolve Redis and the LLM provider, then yield a container with resources initialised.

    Logging goes to stdout as JSON lines (the CLI's contract).
    """
    settings = load_settings(config)
    configure_logging(log_level, stream=sys.stdout)
    settings = _update(settings, "logging", configure=False)  # configured above, on stdout
    if prompts is not None:
        settings = _update(settings, "llm", prompts_path=str(prompts))  # the CLI made it absolute
    if context_window_tokens is not None:
        settings = _update(settings, "llm", context_window_tokens=context_window_tokens)

    embedded: EmbeddedRedis | None = None
    simulator: OpenAISimulator | None = None
    url = redis_url
    if url is None and (embedded_redis or not _redis_known(settings)):
        embedded = await asyncio.to_thread(lambda: EmbeddedRedis(data_dir=embedded_data_dir).start())
        url = embedded.url
        reason = (
            "requested (--embedded-redis)"
            if embedded_redis
            else "no Redis configured (--redis-url, REDIS_URL, config)"
        )
        emit(
            log,
            "embedded_redis_started",
            url=embedded.safe_url,
            binary=embedded.binary,
            reason=reason,
            data_dir=str(embedded_data_dir) if embedded_data_dir else None,
            data_dir_mode="0700" if embedded_data_dir else None,
        )
    if url is not None:
        settings = _update(settings, "redis", url=url)
    try:
        llm_target = settings.llm.base_url
        if use_llm and not llm_configured(settings):
            options: dict[str, Any] = {
                "first_token_delay_ms": SIM_FIRST_TOKEN_MS,
                "inter_chunk_delay_ms": SIM_INTER_CHUNK_MS,
                "reply": simulator_reply,
            }
            simulator = OpenAISimulator(api_key=SIM_API_KEY, **(options | (simulator_options or {})))
            await simulator.start()
            settings = _update(settings, "llm", base_url=simulator.base_url, api_key=SecretStr(SIM_API_KEY))
            llm_target = "simulator"
            emit(
                log,
                "llm_simulator_started",
                base_url=simulator.base_url,
                reason="no OPENAI_API_KEY/OPENAI_BASE_URL configured: the local simulator, not a real model",
            )
        container = Container(settings=settings)
        await maybe_await(container.init_resources())
        try:
            yield Runtime(
                container=container,
                settings=settings,
                llm_target=llm_target,
                simulator=simulator,
                redis_target=container.cache().config.describe(),
            )
        finally:
            await maybe_await(container.shutdown_resources())
    finally:
        if simulator is not None:
            await simulator.stop()
        if embedded is not None:
            await asyncio.to_thread(embedded.close)
            emit(
                log,
                "embedded_redis_stopped",
                url=embedded.safe_url,
                data_dir=str(embedded_data_dir) if embedded_data_dir else None,
            )


def _redis_known(settings: Settings) -> bool:
    """True when a source (config file, environment) said where Redis is."""
    return settings.redis.explicitly_located
