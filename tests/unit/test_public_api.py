"""The public surface: ``from voxcore import ...``, the version, and cheap imports."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

import voxcore

HEAVY = ("numpy", "soxr", "redis", "httpx", "tiktoken", "num2words")


def test_every_documented_name_imports_from_the_top() -> None:
    assert voxcore.__doc__ is not None
    for name in voxcore.__all__:
        assert getattr(voxcore, name) is not None, name
        assert f"``{name}``" in voxcore.__doc__, f"{name} is not in the documented list"
    from voxcore import CallRegistry, Container, Settings, load_settings

    assert Container.__module__ == "voxcore.entrypoints.container"
    assert isinstance(load_settings(env={}), Settings)
    assert CallRegistry.__name__ == "CallRegistry"


def test_unknown_names_fail_like_any_module() -> None:
    with pytest.raises(ImportError):
        from voxcore import NoSuchThing  # type: ignore[attr-defined]  # noqa: F401


def test_the_version_has_one_source() -> None:
    assert voxcore.__version__ == importlib.metadata.version("voxcore")
    assert importlib.metadata.metadata("voxcore")["License-Expression"] == "MIT"


@pytest.mark.parametrize("module", ["voxcore", "voxcore.entrypoints.container"])
def test_importing_does_not_load_the_voice_stack_or_clients(module: str) -> None:
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_the_library_logger_has_only_a_null_handler() -> None:
    import logging

    code = "import logging, voxcore; print([type(h).__name__ for h in logging.getLogger('voxcore').handlers])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "['NullHandler']"
    assert logging.getLogger("voxcore").propagate is True


def test_the_compose_files_commands_work() -> None:
    import shlex
    from pathlib import Path

    import yaml

    from voxcore.entrypoints.cli import build_parser

    path = Path(__file__).resolve().parents[2] / "docker-compose.yml"
    text = path.read_text(encoding="utf-8")
    services = yaml.safe_load(text)["services"]
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")  # Jaeger v2
    commands = [line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#   voxcore ")]
    assert commands, "the compose file's comments lost their voxcore command"
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])  # exits (fails) on an unknown flag
        assert args.telemetry is True
    assert "OTEL_METRICS_EXPORTER=none" in text  # Jaeger takes traces only
