"""Redis adapters: client configuration and the audio/text cache."""

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig

__all__ = ["RedisCacheManager", "RedisConfig"]
