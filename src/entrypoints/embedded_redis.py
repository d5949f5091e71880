"""Start a throw-away ``redis-server`` on a free 127.0.0.1 port (temp dir, no persistence).

Used by the CLI when no Redis is configured, by ``make demo`` and by the test fixture when no
Docker engine answers. The server never touches a Redis already running on the machine: it binds
127.0.0.1 on a port of its own and requires a random password (other local users cannot use it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from voxcore.core.ports.errors import ConfigurationError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_answers(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if a Redis server answers PING at ``host:port`` within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH", b"-ERR"))
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM a child (SIGKILL after ``grace_s``), reap it and close its stderr pipe."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


class EmbeddedRedis:
    """A ``redis-server`` child process bound to 127.0.0.1 on its own port.

    Use as a context manager, or call :meth:`start`/:meth:`stop`. :meth:`stop` followed by
    :meth:`start` restarts it on the same port (tests use this to simulate an outage).

    Args:
        port: Port to bind; a free one is chosen when omitted.
        binary: ``redis-server`` path; looked up on PATH when omitted.
        data_dir: Keep the data across runs in this folder (an RDB snapshot written when the
            server stops and read when it starts; the demo uses it so a second run finds its
            TTS cache). It is created private (0700) and made private if it exists. Default: a
            temporary folder and no persistence.
        password: ``requirepass``; a random one when omitted (part of :attr:`url`).
        extra_args: More ``redis-server`` options (tests use ``--enable-debug-command yes``).
    """

    def __init__(
        self,
        port: int | None = None,
        binary: str | None = None,
        data_dir: Path | None = None,
        *,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        found = binary or shutil.which("redis-server")
        if not found:
            raise ConfigurationError(
                "no Redis configured and no redis-server binary on PATH: install redis-server "
                "(Debian: apt-get install redis-server) or set REDIS_URL"
            )
        self.binary = found
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="voxcore-redis-")
        self._data_dir = data_dir
        self.password = password if password is not None else secrets.token_urlsafe(24)
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"EmbeddedRedis(port={self.port}, running={self.running}, data_dir={self._data_dir})"

    @property
    def url(self) -> str:
        """``redis://:<password>@127.0.0.1:<port>/0`` (mask it before logging: ``safe_url``)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def safe_url(self) -> str:
        """:attr:`url` with the password hidden."""
        return f"redis://:***@127.0.0.1:{self.port}/0"

    @property
    def data_dir(self) -> Path | None:
        """Where the data persists across runs (``None``: a temporary folder)."""
        return self._data_dir

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self._data_dir, 0o700)  # also when it existed: the snapshot is the cache's data
        # With a data folder, a save point makes redis-server write its snapshot when it stops.
        save, folder = ("3600 1", str(self._data_dir)) if self._data_dir else ("", self._dir.name)
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", save,
            "--appendonly", "no",
            "--dir", folder,
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", str(Path(self._dir.name) / "redis.log"),
            *self._extra_args,
        ]  # fmt: skip
        # The password goes in a config file readable by this user only, not on the command line
        # (which every local user can read in /proc).
        conf = Path(self._dir.name) / "auth.conf"
        conf.touch(mode=0o600)
        conf.write_text(f"requirepass {self.password}\n", encoding="utf-8")
        args.insert(1, str(conf))
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {err.strip()}")
            if port_answers("127.0.0.1", self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and wait for the port to close."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)

    def close(self) -> None:
        """Stop the server and remove its temporary directory."""
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def redis_server_available() -> bool:
    """True if a ``redis-server`` binary is on PATH."""
    return shutil.which("redis-server") is not None
