"""Text-to-speech port: streamed PCM synthesis of short dynamic phrases (numbers, dates, names)."""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from voxcore.core.domain.audio import AudioFormat


@dataclass(frozen=True, slots=True)
class SpeechRequest:
    """What to say and how.

    Attributes:
        text: The text to speak (already normalized by the caller when it is used as a cache key).
        voice: Provider voice name (e.g. ``alloy``, or ``ru`` for espeak-ng).
        model: Provider model name (e.g. ``gpt-4o-mini-tts``); engines without models ignore it.
        audio_format: The PCM format the caller wants back; engines must deliver exactly this
            (converting if their native output differs) or raise ``TTSError``.
        speed: Speaking rate multiplier (1.0 = normal).
    """

    text: str
    voice: str
    model: str = ""
    audio_format: AudioFormat = AudioFormat(24_000, 1, 2)
    speed: float = 1.0


class TTSEngine(abc.ABC):
    """A speech synthesizer that streams raw PCM as it is produced.

    Attributes:
        name: Engine identifier used in cache keys and telemetry (e.g. ``openai``, ``espeak-ng``).
    """

    name: str = "tts"

    @abc.abstractmethod
    def stream_speech(self, request: SpeechRequest) -> AsyncGenerator[bytes, None]:
        """Yield PCM bytes in ``request.audio_format`` as soon as they are available.

        Chunks have arbitrary sizes but always hold whole frames. The first bytes should arrive as
        early as the engine allows (time to first byte is what a caller waits for). Closing the
        generator early (``aclose``) must release the request or process at once.

        Raises:
            TTSError: synthesis failed (before or during the stream); a partial stream must not be
                treated as complete.
        """

    @abc.abstractmethod
    async def check(self) -> None:
        """Verify credentials/binaries at start; raise ``ConfigurationError`` naming what is missing."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections/processes; safe to call twice."""
