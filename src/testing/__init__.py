"""Test support a host's suite can reuse: real Redis servers and the simulator as pytest fixtures.

The pytest plugin (:mod:`voxcore.testing.plugin`, registered under the ``pytest11`` entry point
``voxcore``) provides ``voxcore_redis``, ``voxcore_simulator`` and ``voxcore_container``; the Redis
source selection lives in :mod:`voxcore.testing.redis`.
"""

from voxcore.testing.redis import (
    RedisKind,
    RedisTarget,
    RedisUnavailableError,
    choose_redis_source,
    container_engine_answers,
    provide_redis,
)

__all__ = [
    "RedisKind",
    "RedisTarget",
    "RedisUnavailableError",
    "choose_redis_source",
    "container_engine_answers",
    "provide_redis",
]
