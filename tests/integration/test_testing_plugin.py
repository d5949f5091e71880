"""The ``voxcore`` pytest plugin as a host's suite uses it: found by its entry point, fixtures working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HOST_SUITE = """
import pytest

from voxcore import Container
from voxcore.testing import RedisTarget


def test_redis_is_real(voxcore_redis: RedisTarget) -> None:
    assert voxcore_redis.url.startswith("redis://") and voxcore_redis.kind == "redis-server"


@pytest.mark.voxcore_simulator(first_token_delay_ms=1)
async def test_a_turn_through_the_container(voxcore_container: Container, voxcore_simulator) -> None:
    assert voxcore_simulator.first_token_delay_ms == 1
    manager = await voxcore_container.open_conversation("plugin-call")
    try:
        text = "".join([c.text_chunk async for c in manager.process_user_turn("Привет")])
    finally:
        await manager.shutdown()
    assert text.endswith("Привет")
    cache = voxcore_container.cache()
    assert cache.key_prefix.startswith("test:")
    assert await cache.set_text("summary:session:x", "ok", 60)
"""


def test_a_host_suite_gets_the_fixtures_from_the_entry_point(tmp_path: Path) -> None:
    (tmp_path / "test_host.py").write_text(HOST_SUITE, encoding="utf-8")
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "VOXCORE_TEST_REDIS": "redis-server"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
