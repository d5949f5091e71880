"""A real OpenTelemetry collector for tests: rotel (PyPI ``rotel``) on free 127.0.0.1 ports.

rotel receives OTLP over gRPC and HTTP, batches, and exports OTLP/HTTP to a
:class:`tests.otlp_receiver.OTLPReceiver`, where the test reads what the collector forwarded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.otlp_receiver import OTLPReceiver, otlp_receiver
from voxcore.entrypoints.embedded_redis import free_port


@dataclass
class Collector:
    """A running rotel: where to send OTLP, and what it forwarded."""

    grpc_endpoint: str
    http_endpoint: str
    received: OTLPReceiver


def rotel_binary() -> Path:
    import rotel

    return Path(rotel.__file__).parent / "rotel-agent"


def rotel_environment() -> dict[str, str]:
    """The agent embeds this interpreter's libpython: let the loader find it where Python keeps it
    (pyenv builds keep it in their own lib folder, not on the system path)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libdir), env.get("LD_LIBRARY_PATH")]))
    return env


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def rotel_collector(tmp_path: Path) -> Iterator[Collector]:
    """Start rotel in the foreground; stop it (SIGTERM, it flushes) when the block ends."""
    grpc_port, http_port = free_port(), free_port()
    with otlp_receiver() as received:
        proc = subprocess.Popen(
            [
                str(rotel_binary()),
                "start",
                "--otlp-grpc-endpoint",
                f"127.0.0.1:{grpc_port}",
                "--otlp-http-endpoint",
                f"127.0.0.1:{http_port}",
                "--exporter",
                "otlp",
                "--otlp-exporter-endpoint",
                received.endpoint,
                "--otlp-exporter-protocol",
                "http",
                "--pid-file",
                str(tmp_path / "rotel.pid"),
                "--log-file",
                str(tmp_path / "rotel.log"),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=rotel_environment(),
        )
        try:
            deadline = time.monotonic() + 15
            while not (_listening(grpc_port) and _listening(http_port)):
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise RuntimeError(f"rotel exited with {proc.returncode}: {err[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("rotel did not listen within 15 s")
                time.sleep(0.05)
            yield Collector(f"http://127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", received)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr:
                proc.stderr.close()
