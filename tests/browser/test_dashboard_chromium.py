"""The dashboard in a real headless Chromium: a real EventSource, the server restarted mid-call.

The page must show every event of the call exactly once and in order, across the restart.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.live_support import SECRET, ServeProcess
from voxcore.adapters.redis.live_events import RedisEventStreams, RedisLiveEventPublisher
from voxcore.core.domain.keys import events_stream_key
from voxcore.core.domain.live_events import operator_token, session_token

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    profile = tempfile.mkdtemp(prefix="voxcore-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def shown_ids(driver: webdriver.Chrome) -> list[str]:
    script = (
        "return Array.from(document.querySelectorAll('#timeline li[data-event-id]'))"
        ".map(li => li.dataset.eventId)"
    )
    ids: list[str] = driver.execute_script(script)
    return ids


async def test_dashboard_shows_every_event_once_across_a_server_restart(
    browser: webdriver.Chrome, redis_target: Any, key_prefix: str, raw_redis: redis.Redis
) -> None:
    session = "call-browser"
    publisher = RedisLiveEventPublisher(RedisEventStreams(raw_redis, key_prefix=key_prefix))
    stream_key = key_prefix + events_stream_key(session)

    async def stored() -> list[str]:
        return [raw_id.decode() for raw_id, _ in await raw_redis.xrange(stream_key)]

    async def publish_turn(n: int) -> None:
        publisher.publish(session, "user_text", {"turn": n, "text": f"Вопрос {n}"})
        publisher.publish(session, "answer_text", {"turn": n, "text": f"Ответ {n}"})
        publisher.publish(
            session,
            "turn",
            {"turn": n, "outcome": "ok", "time_to_first_token_ms": 120.0 + n, "time_to_first_text_ms": 150.0},
        )
        assert await publisher.flush(5)

    server = ServeProcess(redis_target.url, key_prefix).start()
    try:
        publisher.publish(session, "call_started", {"resumed": False, "model": "simulator"})
        for n in range(1, 4):
            await publish_turn(n)
        url = f"{server.base_url}/dashboard?session={session}&token={session_token(SECRET, session)}"
        await asyncio.to_thread(browser.get, url)
        expected = await stored()
        await asyncio.to_thread(wait_until, lambda: shown_ids(browser) == expected, 30, "the first turns")
        status = browser.find_element(By.ID, "status").get_attribute("data-state")
        assert status == "live"

        # Mid-call the server is restarted; the call goes on meanwhile.
        await asyncio.to_thread(server.stop)
        for n in range(4, 7):
            await publish_turn(n)
        await asyncio.sleep(1.5)  # the page is reconnecting against a closed port
        server = ServeProcess(redis_target.url, key_prefix, port=server.port).start()
        for n in range(7, 10):
            await publish_turn(n)
        publisher.publish(session, "call_ended", {"turns": 9})
        assert await publisher.flush(5)
        expected = await stored()
        assert len(expected) == 1 + 9 * 3 + 1

        def complete() -> bool:
            return len(shown_ids(browser)) >= len(expected)

        await asyncio.to_thread(wait_until, complete, 40, "every event after the restart")
        await asyncio.sleep(1.0)  # nothing more (no duplicate) arrives late
        ids = shown_ids(browser)
        assert ids == expected  # every event exactly once, in order
        texts = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#timeline li")]
        assert any("Вопрос 5" in t for t in texts) and any("first token 125 ms" in t for t in texts)

        # The operator's view lists the call, and opening it shows the same timeline.
        await asyncio.to_thread(browser.get, f"{server.base_url}/dashboard?token={operator_token(SECRET)}")
        item = await asyncio.to_thread(
            wait_until,
            lambda: browser.find_elements(By.CSS_SELECTOR, f'#calls li[data-session="{session}"]'),
            20,
            "the call in the list",
        )
        assert item[0].get_attribute("data-state") == "ended"
        item[0].click()
        await asyncio.to_thread(wait_until, lambda: shown_ids(browser) == expected, 20, "the call's timeline")
    finally:
        server.stop()
        await publisher.aclose()
