"""Pure rules behind fault handling: breaker transitions, key isolation, text repair, secrets, WAV headers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxcore.core.domain import keys
from voxcore.core.domain.audio import parse_wav
from voxcore.core.domain.errors import InvalidAudioError, InvalidKeyError
from voxcore.core.domain.resilience import CircuitBreaker
from voxcore.core.domain.secrets import mask_url, quote_body, scrub_secrets
from voxcore.core.domain.text import REPLACEMENT_CHARACTER, encodable, repair_text

# -- breaker ------------------------------------------------------------------------------------------


def test_breaker_reports_each_state_change_once_with_counts() -> None:
    b = CircuitBreaker(base_window_s=1.0, max_window_s=4.0)
    b.record_success(0.0)  # closed stays closed: nothing to report
    assert b.drain() == []
    b.record_failure(10.0)
    for _ in range(500):  # calls fast-failed while open: counted, not reported one by one
        assert not b.allow(10.5)
        b.record_rejected()
    b.record_failure(10.6)  # a call that was in flight when the circuit opened: no new window
    assert b.retry_in(10.6) == pytest.approx(0.4)
    assert b.allow(11.0)  # half-open
    b.record_success(11.2)
    opened, half, closed = b.drain()
    assert (opened.previous, opened.state, opened.failures, opened.window_s) == ("closed", "open", 1, 1.0)
    assert (half.state, half.failures, half.rejected, half.since_s) == ("half_open", 1, 500, 1.0)
    assert (closed.state, closed.consecutive_failures, closed.since_s) == ("closed", 0, pytest.approx(0.2))
    assert b.drain() == [] and b.state == "closed"


def test_breaker_cancelled_trial_goes_back_to_open() -> None:
    b = CircuitBreaker(base_window_s=1.0)
    b.record_failure(0.0)
    assert b.allow(1.0) and b.state == "half_open"
    b.release_trial()
    assert b.state == "open" and b.allow(1.0)


# -- keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "t:", "tenant-1:", "app:tenant_2:", "a.b:c-d:"])
def test_valid_prefixes(prefix: str) -> None:
    assert keys.check_key_prefix(prefix) == prefix


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("t", "must end with ':'"),
        ("t::", "segment ''"),
        (":", "segment ''"),
        ("t b:", "segment 't b'"),
        ("static:", "is a key namespace"),
        ("t:tts:", "is a key namespace"),
        ("voxcore:", "is a key namespace"),
        ("t:ratelimit:", "is a key namespace"),
        ("x" * 200 + ":", "max 128"),
        (5, "must be str"),
    ],
)
def test_invalid_prefixes_are_refused_with_the_rule(prefix: object, why: str) -> None:
    with pytest.raises(InvalidKeyError, match=why):
        keys.check_key_prefix(prefix)


def test_public_keys_live_in_namespaces_and_internal_ones_are_reserved() -> None:
    assert keys.check_public_key("static:a") == "static:a"
    assert keys.check_public_key("summary:session:x") == "summary:session:x"
    with pytest.raises(InvalidKeyError, match="reserved"):
        keys.check_public_key("voxcore:meta:static:a")
    with pytest.raises(InvalidKeyError, match="outside the known namespaces"):
        keys.check_public_key("b:static:x")  # tenant t: could otherwise hit tenant t:b:'s static:x
    assert keys.check_public_key("dialog:1", keys.check_namespaces(["dialog"])) == "dialog:1"
    with pytest.raises(InvalidKeyError):
        keys.check_namespaces(["voxcore"])


segment = st.text(alphabet="abt-_.", min_size=1, max_size=4).filter(lambda s: s not in keys.NAMESPACES)
prefixes = st.lists(segment, min_size=0, max_size=3).map(lambda parts: "".join(p + ":" for p in parts))
public_keys = st.tuples(st.sampled_from(keys.NAMESPACES), st.text(max_size=8)).map(lambda t: f"{t[0]}:{t[1]}")


@given(prefixes, public_keys, prefixes, public_keys)
def test_prefixed_keys_of_two_tenants_never_collide(p1: str, k1: str, p2: str, k2: str) -> None:
    for prefix, key in ((p1, k1), (p2, k2)):
        keys.check_key_prefix(prefix)
        try:
            keys.check_public_key(key)
        except InvalidKeyError:
            return  # a key the cache refuses is never written
    if (p1, k1) != (p2, k2):
        assert p1 + k1 != p2 + k2


@given(st.text(max_size=60))
def test_check_key_never_raises_anything_but_invalid_key(text: str) -> None:
    try:
        assert keys.check_public_key(text) == text
        text.encode("utf-8")  # an accepted key is always storable
    except InvalidKeyError:
        pass


def test_surrogate_key_is_refused_clearly() -> None:
    with pytest.raises(InvalidKeyError, match="surrogate"):
        keys.check_key("static:a\ud800")


# -- text repair --------------------------------------------------------------------------------------


def test_repair_replaces_lone_surrogates_and_joins_pairs() -> None:
    assert repair_text("a\ud800b") == (f"a{REPLACEMENT_CHARACTER}b", 1)
    assert repair_text("\ud83d") == (REPLACEMENT_CHARACTER, 1)
    assert repair_text("x\ud83d\ude00y") == ("x\U0001f600y", 0)  # a split pair is joined back
    assert repair_text("привет") == ("привет", 0)
    assert repair_text(f"already {REPLACEMENT_CHARACTER}") == (f"already {REPLACEMENT_CHARACTER}", 0)


@given(st.text(alphabet=st.characters(), max_size=50))
def test_repaired_text_is_always_encodable(text: str) -> None:
    repaired, replaced = repair_text(text)
    repaired.encode("utf-8")
    assert encodable(repaired)
    assert (replaced == 0) == (repaired == text) or REPLACEMENT_CHARACTER in text


# -- secrets ------------------------------------------------------------------------------------------


def test_mask_url_hides_passwords_only() -> None:
    assert mask_url("redis://:s3cret@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert mask_url("rediss://user:pw@h:1/0") == "rediss://user:***@h:1/0"
    assert mask_url("https://token@api.example/v1") == "https://***@api.example/v1"
    assert mask_url("https://api.example/v1?api_key=abc&x=1") == "https://api.example/v1?api_key=***&x=1"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_provider_bodies_are_scrubbed_and_truncated() -> None:
    body = (
        '{"error": {"message": "Incorrect API key provided: sk-proj-AbCdEfGh12345678. '
        'Authorization: Bearer abcdefghijklmnop", "api_key": "hunter22"}}' + " filler" * 200
    )
    quoted = quote_body(body)
    assert "sk-proj" not in quoted and "abcdefghijklmnop" not in quoted and "hunter22" not in quoted
    assert len(quoted) < 260 and quoted.endswith(f"({len(body)} chars)")
    assert "Incorrect API key provided" in quoted
    assert scrub_secrets("x " * 3 + "a" * 64) == "x x x ***"


# -- WAV headers --------------------------------------------------------------------------------------


def wav_bytes(
    *, rate: int = 16_000, channels: int = 1, bits: int = 16, frames: int = 10, extra_fmt: bool = False
) -> bytes:
    width = bits // 8
    byte_rate = (rate * channels * width) & 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, channels, rate, byte_rate, (channels * width) & 0xFFFF, bits)
    pcm = b"\x01" * (frames * channels * width)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    if extra_fmt:
        other = struct.pack("<HHIIHH", 1, 2, 8000, 8000 * 2 * width, 2 * width, bits)
        body += b"fmt " + struct.pack("<I", len(other)) + other
    body += b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"rate": 1}, "implausible WAV header: 1 Hz"),
        ({"rate": 4_000_000_000}, "implausible WAV header"),
        ({"channels": 65_535, "frames": 1}, "65535 channels"),
        ({"extra_fmt": True}, "second 'fmt ' chunk"),
    ],
)
def test_implausible_headers_are_refused(kwargs: dict[str, int], why: str) -> None:
    with pytest.raises(InvalidAudioError, match=why):
        parse_wav(wav_bytes(**kwargs))


def test_header_lies_about_byte_rate_are_refused() -> None:
    data = bytearray(wav_bytes())
    data[28:32] = struct.pack("<I", 1)  # byte rate
    with pytest.raises(InvalidAudioError, match="byte rate"):
        parse_wav(bytes(data))


@given(st.binary(max_size=200), st.integers(0, 60))
def test_fuzzed_headers_never_raise_anything_else(noise: bytes, offset: int) -> None:
    good = bytearray(wav_bytes())
    good[offset : offset + len(noise)] = noise
    try:
        wav = parse_wav(bytes(good))
    except InvalidAudioError:
        return
    assert 4_000 <= wav.format.sample_rate <= 384_000 and wav.format.channels <= 16
