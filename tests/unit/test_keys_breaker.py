"""Key naming rules and the circuit breaker state machine."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxcore.core.domain import keys
from voxcore.core.domain.errors import InvalidKeyError
from voxcore.core.domain.resilience import CircuitBreaker


def test_key_helpers() -> None:
    assert keys.static_key("welcome") == "static:welcome"
    assert keys.tts_key("12500") == "tts:12500"
    digest = hashlib.sha1(b"demo-123").hexdigest()[:16]
    assert keys.summary_key("demo-123") == f"summary:session:{digest}"
    assert keys.is_static("static:x") and keys.is_tts("tts:x") and keys.is_summary(keys.summary_key("a"))


@pytest.mark.parametrize("bad", ["", None, 5, "x" * 2000])
def test_check_key_refuses(bad: object) -> None:
    with pytest.raises(InvalidKeyError):
        keys.check_key(bad)


def test_empty_names_refused() -> None:
    with pytest.raises(InvalidKeyError):
        keys.static_key("")
    with pytest.raises(InvalidKeyError):
        keys.summary_key("")


def test_breaker_opens_fast_fails_then_single_trial() -> None:
    b = CircuitBreaker(base_window_s=1.0, max_window_s=4.0)
    assert b.allow(0.0) and b.is_closed
    b.record_failure(10.0)
    assert not b.allow(10.5) and b.retry_in(10.5) == pytest.approx(0.5)
    assert b.allow(11.0)  # the trial
    assert not b.allow(11.0)  # only one at a time
    b.record_failure(11.1)  # trial failed: window doubles
    assert not b.allow(12.5) and b.allow(13.2)
    b.record_success()
    assert b.is_closed and b.allow(13.3) and b.allow(13.3)


def test_breaker_cancelled_trial_is_released() -> None:
    b = CircuitBreaker(base_window_s=1.0)
    b.record_failure(0.0)
    assert b.allow(2.0)
    b.release_trial()
    assert b.allow(2.0)


@given(st.lists(st.floats(0.001, 5.0), min_size=1, max_size=30))
def test_breaker_window_never_exceeds_cap(gaps: list[float]) -> None:
    b = CircuitBreaker(base_window_s=0.1, max_window_s=1.0)
    now = 0.0
    for gap in gaps:
        now += gap
        b.allow(now)  # a trial when the window is over (a failure while open does not extend it)
        b.record_failure(now)
        assert 0 <= b.retry_in(now) <= 1.0 + 1e-9
        assert b.state == "open"


def test_breaker_rejects_bad_windows() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(base_window_s=0)
    with pytest.raises(ValueError):
        CircuitBreaker(base_window_s=2, max_window_s=1)
