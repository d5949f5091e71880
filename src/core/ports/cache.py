"""Cache ports: ``AbstractCache`` exactly as SPEC-A, and the audio extension voxcore adds to it.

Every method is asynchronous and *soft*: failures are logged by the implementation and reported
as ``False``/``None``, never raised to the caller (SPEC-A).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import List, Optional

from voxcore.core.domain.audio import AudioFormat


class AbstractCache(abc.ABC):
    """The project's single cache contract (SPEC-A; signatures are fixed).

    Keys: ``static:*`` and ``tts:*`` hold audio as a list of byte chunks; ``summary:session:*``
    holds text with a TTL.
    """

    @abc.abstractmethod
    async def connect(self) -> None: ...
    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def load_and_set_audio(self, key: str, wav_filepath: str, chunk_size_ms: int = 20) -> bool: ...
    @abc.abstractmethod
    async def set_audio_chunks(self, key: str, audio_chunks: List[bytes]) -> bool: ...
    @abc.abstractmethod
    async def get_audio_chunks(self, key: str) -> Optional[List[bytes]]: ...

    @abc.abstractmethod
    async def set_text(self, key: str, text: str, ttl_seconds: int) -> bool: ...
    @abc.abstractmethod
    async def get_text(self, key: str) -> Optional[str]: ...


class AudioChunkStream(abc.ABC):
    """An open streaming read of one audio fragment: an async iterator of its chunks, in order.

    The stream yields either the whole list that was stored when it was opened or a prefix of it
    (only if the fragment is overwritten twice while it is being read, which is logged) - never a
    mix of two versions. Close it (``async with`` or :meth:`aclose`) when stopping early.
    """

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> bytes: ...

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop reading and release what the stream holds; safe to call more than once."""

    async def __aenter__(self) -> AudioChunkStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@dataclass(frozen=True, slots=True)
class AudioLoadResult:
    """Outcome of loading one WAV file into the cache.

    Attributes:
        key: The cache key written (or not).
        ok: True when the fragment was stored.
        reason: Why it was not stored (empty when ``ok``).
        chunks: Chunks stored.
        audio_format: The file's format, when the file could be parsed.
        duration_ms: Playing time of the stored audio.
    """

    key: str
    ok: bool
    reason: str = ""
    chunks: int = 0
    audio_format: AudioFormat | None = None
    duration_ms: float = 0.0


class AbstractAudioCache(AbstractCache):
    """``AbstractCache`` plus what low-latency playback needs: streaming reads and stored formats."""

    @abc.abstractmethod
    async def open_audio_stream(self, key: str, *, raise_on_outage: bool = False) -> AudioChunkStream | None:
        """Start reading a fragment; the first chunks are already fetched when this returns.

        The stream yields the whole fragment, or ends with
        :class:`~voxcore.core.ports.errors.AudioStreamIncompleteError` after a prefix of it.

        Args:
            key: The fragment's key.
            raise_on_outage: Raise instead of answering ``None`` when the backend fails.

        Returns:
            A stream of the fragment's chunks, or ``None`` when the key is missing (or on a soft
            failure, which is logged, unless ``raise_on_outage``).

        Raises:
            CacheUnavailableError: only with ``raise_on_outage=True``, when the backend failed.
        """

    async def fetch_audio_chunks(self, key: str) -> list[bytes] | None:
        """``get_audio_chunks`` that tells a miss (``None``) from an outage (raises).

        The default reads the whole stream of ``open_audio_stream(key, raise_on_outage=True)``;
        adapters override it with one round trip.

        Raises:
            CacheUnavailableError: the backend failed.
            AudioStreamIncompleteError: the fragment could only be read in part.
        """
        stream = await self.open_audio_stream(key, raise_on_outage=True)
        if stream is None:
            return None
        async with stream:
            return [chunk async for chunk in stream]

    @abc.abstractmethod
    async def set_audio_fragment(
        self, key: str, audio_chunks: list[bytes], audio_format: AudioFormat
    ) -> bool:
        """Store chunks together with their format, atomically (``set_audio_chunks`` + format)."""

    @abc.abstractmethod
    async def load_audio_file(self, key: str, wav_filepath: str, chunk_size_ms: int = 20) -> AudioLoadResult:
        """``load_and_set_audio`` that also says why a file was refused (for tools and reports)."""

    @abc.abstractmethod
    async def get_audio_format(self, key: str) -> AudioFormat | None:
        """The stored format of a fragment, or ``None`` if unknown or the key is missing."""
