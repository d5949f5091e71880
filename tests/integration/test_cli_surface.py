"""The ``voxcore`` command's own surface: --version, help that lists every command with defaults,
errors on stderr, and --telemetry exporting a probe's call trace."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tests.otlp_receiver import otlp_receiver
from voxcore import __version__
from voxcore.entrypoints.cli import build_parser

VOXCORE = [sys.executable, "-m", "voxcore.entrypoints.cli"]


def voxcore(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "VOXCORE_", "OPENAI_", "OTEL_"))
    }
    return subprocess.run(
        [*VOXCORE, *args], capture_output=True, text=True, env={**clean, **env}, timeout=120
    )


def test_version() -> None:
    done = voxcore("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"voxcore {__version__}"


def subcommand_help(name: str) -> str:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return str(commands.choices[name].format_help())


def test_help_lists_every_command_and_shows_defaults() -> None:
    text = build_parser().format_help()
    for command in ("load-audio", "probe-cache", "demo", "probe-llm", "probe-agent", "sandbox"):
        assert command in text
    assert "more commands join later" not in text
    probe = subcommand_help("probe-cache")
    assert "--key KEY" in probe and "(default: static:test_example)" in probe
    assert "(default: 20)" in probe and "--telemetry" in probe
    assert "(default: demo-123)" in subcommand_help("probe-agent")


def test_errors_go_to_stderr_with_a_non_zero_exit(tmp_path: Path) -> None:
    done = voxcore("probe-cache", "--config", str(tmp_path / "missing.yml"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"voxcore: error: cannot read config file {tmp_path / 'missing.yml'}: " + (
        "No such file or directory"
    )
    usage = voxcore("probe-cache", "--chunk-ms", "many")
    assert usage.returncode == 2 and "invalid int value" in usage.stderr and usage.stdout == ""


def test_telemetry_flag_exports_the_probes_call_trace(tmp_path: Path) -> None:
    with otlp_receiver() as receiver:
        done = voxcore(
            "probe-agent",
            "--embedded-redis",
            "--repeats",
            "1",
            "--report-dir",
            str(tmp_path),
            "--telemetry",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_SERVICE_NAME="voxcore-cli-test",
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert receiver.wait_for(lambda r: r.by_name("voxcore.call") and r.by_name("voxcore.turn"))
    calls = receiver.by_name("voxcore.call")
    turns = receiver.by_name("voxcore.turn")
    assert {t.parent_span_id for t in turns} <= {c.span_id for c in calls}
    assert {s.service_name for s in receiver.spans} == {"voxcore-cli-test"}
