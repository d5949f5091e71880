"""voxcore.testing: how the Redis source is chosen, and the container branch without a container engine.

No container engine runs on these machines, so the container branch is covered up to what needs
one: an engine is detected through the Docker SDK (a stub engine API on a unix socket answers
``/_ping``), ``DOCKER_HOST`` and Docker contexts are honoured, and testcontainers' current Redis
module is built (and imported under ``-W error``) without touching an engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from voxcore.testing import RedisUnavailableError, choose_redis_source, container_engine_answers
from voxcore.testing.redis import REDIS_IMAGE, provide_redis


class _EngineAPI(BaseHTTPRequestHandler):
    """Just enough of the Docker Engine API for a client to see an engine: ``/_ping`` and ``/version``."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path.endswith("/_ping"):
            body, kind = b"OK", "text/plain"
        elif path.endswith("/version"):
            body, kind = json.dumps({"ApiVersion": "1.45", "Version": "stub"}).encode(), "application/json"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Api-Version", "1.45")
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: object) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def stub_engine(tmp_path: Path) -> Iterator[str]:
    """A unix socket answering like a container engine; yields its ``unix://`` address."""
    path = tmp_path / "engine.sock"
    server = _UnixHTTPServer(str(path), _EngineAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"unix://{path}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def no_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Docker config folder and no DOCKER_HOST: the host's own Docker set-up is not consulted."""
    folder = tmp_path / "docker-config"
    folder.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(folder))
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    return folder


def never() -> bool:
    return False


def always() -> bool:
    return True


# -- precedence ------------------------------------------------------------------------------------


def test_a_container_engine_comes_first() -> None:
    assert choose_redis_source(
        env={"REDIS_URL": "redis://x"}, engine_answers=always, redis_server=always
    ) == ("container")


def test_then_a_local_redis_server() -> None:
    assert choose_redis_source(env={"REDIS_URL": "redis://x"}, engine_answers=never, redis_server=always) == (
        "redis-server"
    )


def test_then_redis_url() -> None:
    assert (
        choose_redis_source(env={"REDIS_URL": "redis://x"}, engine_answers=never, redis_server=never) == "env"
    )


def test_nothing_available_is_a_clear_error() -> None:
    with pytest.raises(RedisUnavailableError, match="REDIS_URL"):
        choose_redis_source(env={}, engine_answers=never, redis_server=never)


def test_a_forced_source_wins_or_fails_loudly() -> None:
    env = {"VOXCORE_TEST_REDIS": "env", "REDIS_URL": "redis://x"}
    assert choose_redis_source(env=env, engine_answers=always, redis_server=always) == "env"
    with pytest.raises(RedisUnavailableError, match="not available"):
        choose_redis_source(
            env={"VOXCORE_TEST_REDIS": "container"}, engine_answers=never, redis_server=always
        )
    with pytest.raises(RedisUnavailableError, match="expected one of"):
        choose_redis_source(env={"VOXCORE_TEST_REDIS": "docker"}, engine_answers=always, redis_server=always)


def test_the_engine_is_only_probed_when_it_matters() -> None:
    calls: list[str] = []

    def probe() -> bool:
        calls.append("engine")
        return False

    choose_redis_source(env={"VOXCORE_TEST_REDIS": "redis-server"}, engine_answers=probe, redis_server=always)
    assert calls == []


def test_redis_url_is_used_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    with provide_redis("env", env={"REDIS_URL": "redis://example:6390/2"}) as target:
        assert (target.url, target.kind) == ("redis://example:6390/2", "env")


# -- detection through the Docker SDK ----------------------------------------------------------------


def test_no_engine_at_docker_host_is_no(no_docker_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{no_docker_config / 'missing.sock'}")
    assert container_engine_answers(timeout_s=1) is False


def test_an_engine_at_docker_host_is_found(
    no_docker_config: Path, stub_engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", stub_engine)
    assert container_engine_answers(timeout_s=1) is True


def test_the_current_docker_context_is_honoured(no_docker_config: Path, stub_engine: str) -> None:
    # What `docker context create stub --docker host=...; docker context use stub` writes.
    (no_docker_config / "config.json").write_text(json.dumps({"currentContext": "stub"}))
    meta = no_docker_config / "contexts" / "meta" / hashlib.sha256(b"stub").hexdigest()
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(
        json.dumps({"Name": "stub", "Metadata": {}, "Endpoints": {"docker": {"Host": stub_engine}}})
    )
    assert container_engine_answers(timeout_s=1) is True


# -- the container branch, built but not started ------------------------------------------------------


def test_the_container_branch_imports_and_builds_without_warnings(stub_engine: str, tmp_path: Path) -> None:
    code = (
        "import warnings\n"
        "from voxcore.testing.redis import redis_container\n"
        "c = redis_container(version='1.45')\n"
        "print(type(c).__module__, type(c).__name__, c.image, c.port)\n"
    )
    env = {**os.environ, "DOCKER_HOST": stub_engine, "DOCKER_CONFIG": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["testcontainers.community.redis", "RedisContainer", REDIS_IMAGE, "6379"]
    assert "Warning" not in done.stderr
