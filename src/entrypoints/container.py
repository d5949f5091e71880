"""The composition root a host service imports: ``Container``.

Usage (see the README)::

    container = Container(config_path="/srv/app/voxcore.yml")
    await container.init_resources()      # configures JSON logging, connects the cache
    cache = container.cache()             # one RedisCacheManager per container (process)
    ...
    await container.shutdown_resources()  # closes the cache
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from dependency_injector import containers, providers

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.entrypoints.logging import configure_logging
from voxcore.entrypoints.settings import Settings, load_settings


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
    """Install voxcore's JSON log handler unless ``logging.configure`` is false; remove it at shutdown."""
    if not settings.logging.configure:
        yield None
        return
    handler = configure_logging(settings.logging.level)
    try:
        yield handler
    finally:
        logging.getLogger("voxcore").removeHandler(handler)


class Container(containers.DeclarativeContainer):
    """voxcore's dependency-injection container.

    Host-suppliable dependencies:
        config_path: YAML settings file (``None``: defaults + environment only).
        settings: A ready :class:`Settings` object instead of loading one.

    Providers:
        cache: The process-wide ``RedisCacheManager`` (``Singleton``), connected by
            ``init_resources()`` and closed by ``shutdown_resources()``.
    """

    config_path = providers.Dependency(instance_of=object, default=providers.Object(None))
    settings = providers.Dependency(
        instance_of=Settings, default=providers.Singleton(load_settings, config_path)
    )
    logging_setup = providers.Resource(json_logging, settings)
    redis_config = providers.Singleton(redis_config_from, settings)
    cache = providers.Singleton(build_cache, settings, redis_config)
    cache_connection = providers.Resource(connected_cache, cache)
