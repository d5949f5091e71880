"""SharedSynthesis (cross-worker single flight of TTS) with fakes: the lease decides who synthesizes."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.unit.test_hybrid_responder import FakeAudioCache, FakeTTS, collect, events, key_of, make
from voxcore.application.shared_synthesis import SharedSynthesis
from voxcore.core.domain.playlist import Playlist, TTSItem
from voxcore.core.ports.lease import KeyLeases, Lease, LeaseState


class FakeLeases(KeyLeases):
    """Leases in a dict shared by every "worker" built on it; ``down`` makes it unavailable."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}
        self.down = False
        self.acquires = 0
        self.releases: list[str] = []
        self._next = 0

    async def acquire(self, key: str, ttl_ms: int) -> Lease:
        self.acquires += 1
        if self.down:
            return Lease(key, LeaseState.UNAVAILABLE)
        if key in self.held:
            return Lease(key, LeaseState.HELD)
        self._next += 1
        self.held[key] = token = str(self._next)
        return Lease(key, LeaseState.ACQUIRED, token)

    async def release(self, lease: Lease) -> bool:
        self.releases.append(lease.key)
        if self.held.get(lease.key) == lease.token:
            del self.held[lease.key]
            return True
        return False


def shared(cache: FakeAudioCache, leases: FakeLeases, **kwargs: float) -> SharedSynthesis:
    return SharedSynthesis(cache=cache, leases=leases, poll_interval_s=0.005, **kwargs)


async def test_a_free_key_is_taken_and_given_back() -> None:
    cache, leases = FakeAudioCache(), FakeLeases()
    coordinator = shared(cache, leases)
    claim = await coordinator.claim("tts:a")
    assert claim.synthesize and claim.lease is not None and claim.lease.acquired
    assert "tts:a" in leases.held
    await coordinator.release(claim)
    assert leases.held == {}


async def test_a_held_key_waits_for_the_cache_and_plays_it() -> None:
    cache, leases = FakeAudioCache(), FakeLeases()
    leases.held["tts:a"] = "other-worker"

    async def other_worker_fills() -> None:
        await asyncio.sleep(0.03)
        cache.put("tts:a", [b"x" * 10, b"y" * 10])

    filler = asyncio.create_task(other_worker_fills())
    claim = await shared(cache, leases).claim("tts:a")
    await filler
    assert not claim.synthesize and claim.stream is not None
    assert [chunk async for chunk in claim.stream] == [b"x" * 10, b"y" * 10]
    assert claim.waited_s >= 0.02


async def test_a_holder_that_gives_up_hands_the_key_over() -> None:
    cache, leases = FakeAudioCache(), FakeLeases()
    leases.held["tts:a"] = "other-worker"

    async def other_worker_fails() -> None:
        await asyncio.sleep(0.02)
        del leases.held["tts:a"]  # released without a cache write (its synthesis failed)

    failer = asyncio.create_task(other_worker_fails())
    claim = await shared(cache, leases).claim("tts:a")
    await failer
    assert claim.synthesize and claim.lease is not None and claim.lease.acquired


async def test_waiting_is_bounded_then_the_worker_synthesizes_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache, leases = FakeAudioCache(), FakeLeases()
    leases.held["tts:a"] = "a-stuck-worker"
    caplog.set_level(logging.DEBUG, logger="voxcore")
    claim = await shared(cache, leases, wait_timeout_s=0.05).claim("tts:a")
    assert claim.synthesize and claim.lease is None
    assert 0.05 <= claim.waited_s < 1.0
    (_, fields), *_ = events(caplog, "tts_lease_wait_timeout")
    assert fields["key"] == "tts:a"


async def test_an_unavailable_lease_backend_means_synthesize_at_once() -> None:
    cache, leases = FakeAudioCache(), FakeLeases()
    leases.down = True
    claim = await shared(cache, leases).claim("tts:a")
    assert claim.synthesize and claim.lease is not None and not claim.lease.acquired
    assert leases.acquires == 1


async def test_two_responders_on_one_cache_synthesize_a_miss_once() -> None:
    cache, leases = FakeAudioCache(), FakeLeases()
    tts_a, tts_b = FakeTTS(first_byte_delay_s=0.05), FakeTTS(first_byte_delay_s=0.05)
    one = make(cache, tts_a, shared_synthesis=shared(cache, leases))
    two = make(cache, tts_b, shared_synthesis=shared(cache, leases))
    playlist = Playlist.of(TTSItem("Ваш заказ 4512"))
    try:
        first, second = await asyncio.gather(collect(one.play(playlist)), collect(two.play(playlist)))
        await one.drain()
        await two.drain()
    finally:
        await one.shutdown()
        await two.shutdown()
    assert len(tts_a.calls) + len(tts_b.calls) == 1  # one synthesis for both "workers"
    assert first and b"".join(first) == b"".join(second)  # the loser played the winner's audio
    assert leases.held == {}  # released after the cache write
    assert cache.writes and cache.writes[0][0] == key_of("Ваш заказ 4512", tts_a)


async def test_a_failed_synthesis_gives_the_lease_back() -> None:
    cache, leases = FakeAudioCache(), FakeLeases()
    tts = FakeTTS()
    tts.fail_after["Ошибка"] = 0
    responder = make(cache, tts, shared_synthesis=shared(cache, leases))
    try:
        await collect(responder.play(Playlist.of(TTSItem("Ошибка"))))
        await responder.drain()
    finally:
        await responder.shutdown()
    assert leases.held == {}
    assert leases.releases == [key_of("Ошибка", tts)]
