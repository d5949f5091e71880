"""Cross-worker single flight of TTS: workers that miss the same ``tts:*`` key synthesize it once.

Within one process the hybrid responder already shares one synthesis among every item that needs
the same key. Across processes (several workers on one Redis) :class:`SharedSynthesis` adds a short
lease per key: the first worker to miss takes it and synthesizes (and fills the cache); a worker
that finds the lease held waits for the cache to be filled, polling it, and plays the stored audio
instead of paying for a second synthesis. It never waits longer than ``wait_timeout_s``: then (or
when the holder gives up, or the lease backend fails) it synthesizes itself - a duplicate
synthesis is the worst case, never a silent caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from voxcore.core.ports.cache import AbstractAudioCache, AudioChunkStream
from voxcore.core.ports.lease import KeyLeases, Lease, LeaseState
from voxcore.events import emit

__all__ = ["SharedSynthesis", "SynthesisClaim"]

logger = logging.getLogger("voxcore.hybrid")


@dataclass(frozen=True, slots=True)
class SynthesisClaim:
    """What a worker that missed a ``tts:*`` key should do.

    Attributes:
        stream: Another worker's synthesis, now in the cache: play it (and synthesize nothing).
        lease: Synthesize; when the lease is held (``lease.acquired``), release it after the cache
            write (:meth:`SharedSynthesis.release`). ``None`` with ``stream`` set, or when waiting
            timed out.
        waited_s: Time spent waiting for another worker (0 when the lease was free).
    """

    stream: AudioChunkStream | None = None
    lease: Lease | None = None
    waited_s: float = 0.0

    @property
    def synthesize(self) -> bool:
        """True when this worker must synthesize the audio itself."""
        return self.stream is None


class SharedSynthesis:
    """Coordinates the synthesis of ``tts:*`` keys among workers sharing one cache.

    Args:
        cache: The shared audio cache (where the winner's synthesis lands).
        leases: Per-key leases on the same backend.
        lease_ttl_s: Lease lifetime: longer than a synthesis and its cache write (a holder that
            dies frees the key after this long).
        wait_timeout_s: Longest wait for another worker's synthesis before synthesizing anyway.
        poll_interval_s: How often a waiting worker looks at the cache (and at the lease).
        clock, sleep: Injectable for tests.

    Events: ``tts_lease_wait`` ``{key}`` when another worker holds the key; ``tts_lease_cache_hit``
    ``{key, waited_ms}`` when its audio arrived; ``tts_lease_wait_timeout`` ``{key, waited_ms}``
    (WARNING) when this worker gave up waiting and synthesizes itself.
    """

    def __init__(
        self,
        *,
        cache: AbstractAudioCache,
        leases: KeyLeases,
        lease_ttl_s: float = 15.0,
        wait_timeout_s: float = 5.0,
        poll_interval_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if lease_ttl_s <= 0 or wait_timeout_s < 0 or poll_interval_s <= 0:
            raise ValueError("lease_ttl_s and poll_interval_s must be positive, wait_timeout_s >= 0")
        self._cache = cache
        self._leases = leases
        self._ttl_ms = max(1, round(lease_ttl_s * 1000))
        self._wait_s = wait_timeout_s
        self._poll_s = poll_interval_s
        self._clock = clock
        self._sleep = sleep

    async def claim(self, key: str) -> SynthesisClaim:
        """Take ``key`` (synthesize it) or wait for the worker that has it (play its audio).

        Call it after a cache miss. Never raises for a backend failure: it answers "synthesize".
        """
        lease = await self._leases.acquire(key, self._ttl_ms)
        if lease.acquired or lease.state is LeaseState.UNAVAILABLE:
            return SynthesisClaim(lease=lease)
        started = self._clock()
        emit(logger, "tts_lease_wait", logging.DEBUG, key=key)
        while (waited := self._clock() - started) < self._wait_s:
            await self._sleep(min(self._poll_s, max(0.0, self._wait_s - waited)))
            stream = await self._cache.open_audio_stream(key)
            waited = self._clock() - started
            if stream is not None:
                emit(logger, "tts_lease_cache_hit", key=key, waited_ms=round(waited * 1000, 1))
                return SynthesisClaim(stream=stream, waited_s=waited)
            lease = await self._leases.acquire(key, self._ttl_ms)
            if lease.acquired or lease.state is LeaseState.UNAVAILABLE:
                # The holder gave up (failed, cancelled) or its lease expired: this worker takes over.
                return SynthesisClaim(lease=lease, waited_s=waited)
        waited = self._clock() - started
        emit(logger, "tts_lease_wait_timeout", logging.WARNING, key=key, waited_ms=round(waited * 1000, 1))
        return SynthesisClaim(waited_s=waited)

    async def release(self, claim: SynthesisClaim | None) -> None:
        """Free the claim's lease (after the cache write, or when the synthesis failed)."""
        if claim is not None and claim.lease is not None and claim.lease.acquired:
            await self._leases.release(claim.lease)
