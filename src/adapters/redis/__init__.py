"""Redis adapters: client configuration, the audio/text cache, the rate limiter."""

from voxcore.adapters.redis.cache import RedisCacheManager
from voxcore.adapters.redis.config import RedisConfig
from voxcore.adapters.redis.rate_limit import RedisRateLimiter

__all__ = ["RedisCacheManager", "RedisConfig", "RedisRateLimiter"]
