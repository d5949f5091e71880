"""The ``voxcore`` pytest plugin (entry point ``pytest11``): real Redis, the simulator, a ready container.

Installed with voxcore, so any suite in the environment can use the fixtures (``-p no:voxcore``
switches the plugin off):

* ``voxcore_redis`` (session): a :class:`~voxcore.testing.redis.RedisTarget`, from a container when
  a container engine answers, else a local ``redis-server`` on a free port, else ``REDIS_URL``
  (``VOXCORE_TEST_REDIS`` forces one; see :mod:`voxcore.testing.redis`).
* ``voxcore_redis_cluster`` / ``voxcore_redis_sentinel`` (session): a
  :class:`~voxcore.testing.topologies.RedisDeployment` of a local 3-primary/3-replica Redis Cluster,
  or of a primary + replica watched by 3 Sentinels - real ``redis-server`` processes on free
  127.0.0.1 ports, started on first use (``deployment.config()`` is the ``RedisConfig``,
  ``deployment.env()`` the settings' environment, ``deployment.topology`` lets a test kill nodes).
* ``voxcore_simulator``: a running :class:`~voxcore.simulator.OpenAISimulator` on 127.0.0.1
  (keyword arguments from ``@pytest.mark.voxcore_simulator(...)``).
* ``voxcore_container``: a :class:`~voxcore.Container` wired to both, resources initialised,
  its keys under a random prefix that is deleted afterwards (extra settings as environment
  variables from ``@pytest.mark.voxcore_settings(VOXCORE_…="…")``).

The async fixtures need ``pytest-asyncio`` (the ``test`` extra installs it). Importing this module
is cheap: voxcore's heavy parts load when a fixture is first used.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from voxcore.testing.redis import RedisTarget, RedisUnavailableError, provide_redis

if TYPE_CHECKING:
    from voxcore.entrypoints.container import Container
    from voxcore.simulator import OpenAISimulator
    from voxcore.testing.topologies import RedisDeployment

#: The API key the simulator fixture expects and the container fixture sends.
SIMULATOR_API_KEY = "sk-voxcore-test"

_async_fixture: Callable[..., Any]
try:
    import pytest_asyncio

    _async_fixture = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - depends on the installed packages

    def _async_fixture(*args: Any, **kwargs: Any) -> Any:
        def decorate(function: Callable[..., Any]) -> Any:
            def missing(*_args: Any, **_kwargs: Any) -> Any:
                pytest.fail("voxcore's async fixtures need pytest-asyncio: pip install 'voxcore[test]'")

            missing.__name__ = function.__name__
            missing.__doc__ = function.__doc__
            return pytest.fixture(**kwargs)(missing)

        return decorate(args[0]) if args and callable(args[0]) else decorate


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "voxcore_simulator(**kwargs): keyword arguments for the voxcore_simulator fixture"
    )
    config.addinivalue_line(
        "markers",
        "voxcore_settings(**env): extra settings (environment names) for the voxcore_container fixture",
    )


@pytest.fixture(scope="session")
def voxcore_redis() -> Iterator[RedisTarget]:
    """The session's real Redis server (container, local ``redis-server`` or ``REDIS_URL``)."""
    try:
        with provide_redis() as target:
            yield target
    except RedisUnavailableError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def voxcore_redis_cluster() -> Iterator[RedisDeployment]:
    """A local Redis Cluster (3 primaries + 3 replicas) of real ``redis-server`` processes."""
    from voxcore.testing.topologies import LocalRedisCluster, RedisDeployment, TopologyError

    try:
        with LocalRedisCluster() as cluster:
            yield RedisDeployment.of_cluster(cluster)
    except TopologyError as exc:
        pytest.fail(f"no local Redis Cluster: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def voxcore_redis_sentinel() -> Iterator[RedisDeployment]:
    """A local primary + replica watched by 3 Sentinels (quorum 2), real ``redis-server`` processes."""
    from voxcore.testing.topologies import LocalRedisSentinel, RedisDeployment, TopologyError

    try:
        with LocalRedisSentinel() as topology:
            yield RedisDeployment.of_sentinel(topology)
    except TopologyError as exc:
        pytest.fail(f"no local Sentinel set: {exc}", pytrace=False)


@_async_fixture  # type: ignore[untyped-decorator]
async def voxcore_simulator(request: pytest.FixtureRequest) -> AsyncIterator[OpenAISimulator]:
    """The OpenAI-compatible simulator on a free 127.0.0.1 port, stopped after the test."""
    from voxcore.simulator import OpenAISimulator

    options: dict[str, Any] = {"api_key": SIMULATOR_API_KEY}
    marker = request.node.get_closest_marker("voxcore_simulator")
    if marker is not None:
        options.update(marker.kwargs)
    async with OpenAISimulator(**options) as simulator:
        yield simulator


@_async_fixture  # type: ignore[untyped-decorator]
async def voxcore_container(
    request: pytest.FixtureRequest, voxcore_redis: RedisTarget, voxcore_simulator: OpenAISimulator
) -> AsyncIterator[Container]:
    """A container on the session's Redis and the simulator, ``init_resources()`` done.

    Its cache keys live under a random ``cache.key_prefix``; they are deleted after the test,
    after ``shutdown_resources()``. The library's logging is left as the host's (pytest's).
    """
    from voxcore.entrypoints.container import Container
    from voxcore.entrypoints.settings import load_settings

    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    env = {
        "REDIS_URL": voxcore_redis.url,
        "OPENAI_BASE_URL": voxcore_simulator.base_url,
        "OPENAI_API_KEY": voxcore_simulator.api_key or SIMULATOR_API_KEY,
        "VOXCORE_CACHE__KEY_PREFIX": prefix,
        "VOXCORE_LOGGING__CONFIGURE": "false",
    }
    marker = request.node.get_closest_marker("voxcore_settings")
    if marker is not None:
        env.update({str(k): str(v) for k, v in marker.kwargs.items()})
    container = Container(settings=load_settings(env=env))
    started: Any = container.init_resources()
    if started is not None:
        await started
    try:
        yield container
    finally:
        shutdown: Any = container.shutdown_resources()
        if shutdown is not None:
            await shutdown
        if env["VOXCORE_CACHE__KEY_PREFIX"]:  # never a whole-server sweep
            await delete_keys(voxcore_redis.url, env["VOXCORE_CACHE__KEY_PREFIX"])


async def delete_keys(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` on the server at ``url``; returns how many went."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        return len(keys)
    finally:
        await client.aclose()
