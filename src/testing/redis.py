"""Where a test session's real Redis comes from: a container, a local ``redis-server``, or ``REDIS_URL``.

Precedence (first that applies wins):

1. **container**: a container engine answers (Docker, or Podman/Colima/Rancher through their
   Docker-compatible API). The engine is found the way testcontainers itself finds it:
   testcontainers' ``tc.host`` property, ``DOCKER_HOST``, then the current Docker context
   (``docker context use …``), then the Docker SDK's default socket. The container is
   testcontainers' current Redis module, ``testcontainers.community.redis.RedisContainer``
   (``testcontainers.redis`` is deprecated since testcontainers 4.15).
2. **redis-server**: a ``redis-server`` binary is on ``PATH``: a private server on a free
   127.0.0.1 port, no persistence.
3. **env**: ``REDIS_URL`` is set: that server, as is (tests touch only keys under their own
   random prefix and delete them afterwards).

``VOXCORE_TEST_REDIS=container|redis-server|env`` forces one source (an error if it is not
available) instead of choosing.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from voxcore.entrypoints.embedded_redis import EmbeddedRedis, redis_server_available

RedisKind = Literal["container", "redis-server", "env"]
KINDS: tuple[RedisKind, ...] = ("container", "redis-server", "env")
FORCE_ENV = "VOXCORE_TEST_REDIS"
#: The image the container branch runs (pinned to a major version: a test suite must not drift).
REDIS_IMAGE = "redis:7-alpine"
#: Any engine answering ``/_ping`` speaks at least this API version; passing it keeps the Docker
#: SDK from asking the engine for its version while the client is built.
_MIN_API_VERSION = "1.24"


class RedisUnavailableError(RuntimeError):
    """No source of a real Redis is available (or the forced one is not)."""


@dataclass(frozen=True)
class RedisTarget:
    """The session's Redis: its URL and where it came from (``container``, ``redis-server``, ``env``)."""

    url: str
    kind: RedisKind


def container_engine_host() -> str | None:
    """The engine address testcontainers would use (``tc.host``, ``DOCKER_HOST``, Docker context), if any.

    ``None`` means "the Docker SDK's default" (the local socket).
    """
    from testcontainers.core.docker_client import get_docker_host

    host: str | None = get_docker_host()
    return host


def container_engine_answers(timeout_s: float = 2.0) -> bool:
    """True if a container engine answers ``/_ping`` through the Docker SDK within ``timeout_s``.

    Honours ``DOCKER_HOST`` (with ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH``), the current Docker
    context and testcontainers' own ``tc.host``; a missing SDK or engine is simply ``False``.
    """
    try:
        import docker
    except ImportError:
        return False
    try:
        host = container_engine_host()
    except Exception:  # a broken Docker config file must not break test selection
        host = None
    environment: dict[str, str] = dict(os.environ)
    if host:
        environment["DOCKER_HOST"] = host
    # The SDK leaves a socket unclosed when the engine refuses the connection; that is not ours to
    # report, and under ``-W error`` its ResourceWarning would turn a clean "no" into an error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(
                version=_MIN_API_VERSION,
                timeout=max(1, round(timeout_s)),
                environment=environment,
                # as testcontainers does: the shell's ssh, not paramiko (which trips on pytest's stdin)
                use_ssh_client=bool(host and host.startswith("ssh://")),
            )
        except Exception:
            return False
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()
            gc.collect()


def choose_redis_source(
    *,
    env: Mapping[str, str] | None = None,
    engine_answers: Callable[[], bool] = container_engine_answers,
    redis_server: Callable[[], bool] = redis_server_available,
) -> RedisKind:
    """Pick where the session's Redis comes from (see the module docstring for the precedence).

    Args:
        env: The environment (``os.environ`` by default): ``REDIS_URL`` and ``VOXCORE_TEST_REDIS``.
        engine_answers: Probe for a container engine (only called when it matters).
        redis_server: Probe for a ``redis-server`` binary.

    Raises:
        RedisUnavailableError: nothing is available, or the forced source is not.
    """
    env = os.environ if env is None else env
    forced = env.get(FORCE_ENV, "").strip()
    if forced:
        if forced not in KINDS:
            raise RedisUnavailableError(f"{FORCE_ENV}={forced!r}: expected one of {', '.join(KINDS)}")
        kind: RedisKind = (
            "container" if forced == "container" else "redis-server" if forced == "redis-server" else "env"
        )
        if kind == "container":
            available = engine_answers()
        elif kind == "redis-server":
            available = redis_server()
        else:
            available = bool(env.get("REDIS_URL"))
        if not available:
            raise RedisUnavailableError(f"{FORCE_ENV}={forced} but that source is not available")
        return kind
    if engine_answers():
        return "container"
    if redis_server():
        return "redis-server"
    if env.get("REDIS_URL"):
        return "env"
    raise RedisUnavailableError(
        "no Redis for tests: start a container engine (Docker/Podman), install redis-server "
        "(Debian: apt-get install redis-server), or set REDIS_URL"
    )


def redis_container(image: str = REDIS_IMAGE, **docker_client_kw: Any) -> Any:
    """testcontainers' Redis container (not started): ``with redis_container() as c: ...``.

    Imports only ``testcontainers.community.redis`` (the current module, no deprecation warning).
    Building it connects to the engine unless ``docker_client_kw`` pins an API ``version``.
    """
    from testcontainers.community.redis import RedisContainer

    return RedisContainer(image, docker_client_kw=docker_client_kw or None)


def container_url(container: Any) -> str:
    """``redis://host:port/0`` of a started Redis container."""
    host = container.get_container_host_ip()
    port = container.get_exposed_port(6379)
    return f"redis://{host}:{port}/0"


@contextmanager
def provide_redis(
    kind: RedisKind | None = None, *, env: Mapping[str, str] | None = None
) -> Iterator[RedisTarget]:
    """Start (or locate) a real Redis of ``kind`` (chosen by :func:`choose_redis_source` when omitted)."""
    env = os.environ if env is None else env
    kind = kind or choose_redis_source(env=env)
    if kind == "container":
        with redis_container() as container:
            yield RedisTarget(container_url(container), "container")
    elif kind == "redis-server":
        with EmbeddedRedis() as server:
            yield RedisTarget(server.url, "redis-server")
    else:
        url = env.get("REDIS_URL")
        if not url:
            raise RedisUnavailableError("REDIS_URL is not set")
        yield RedisTarget(url, "env")
