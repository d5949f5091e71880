"""Audio conversion port: turning PCM of one format into another (sample rate, channels, width)."""

from __future__ import annotations

import abc

from voxcore.core.domain.audio import AudioFormat


class StreamConverter(abc.ABC):
    """Converts one PCM stream piece by piece (keeps resampler state and partial frames)."""

    @abc.abstractmethod
    def feed(self, data: bytes) -> bytes:
        """Converted bytes for ``data`` (may be empty while the resampler fills)."""

    @abc.abstractmethod
    def flush(self) -> bytes:
        """The rest of the stream; raises ``InvalidAudioError`` if it ended inside a frame."""


class AudioConverter(abc.ABC):
    """Makes converters; implementations use a real DSP library, never a raw reinterpretation."""

    @abc.abstractmethod
    def convert(self, data: bytes, src: AudioFormat, dst: AudioFormat) -> bytes:
        """One-shot conversion of whole frames."""

    @abc.abstractmethod
    def stream(self, src: AudioFormat, dst: AudioFormat) -> StreamConverter:
        """A converter for one stream from ``src`` to ``dst``."""
