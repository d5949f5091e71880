"""PCM conversion shared by the speech adapters (numpy + soxr): rate, channels, sample width."""

from voxcore.adapters.audio.convert import SUPPORTED_ENCODINGS, PcmConverter, SoxrAudioConverter, convert_pcm

__all__ = ["SUPPORTED_ENCODINGS", "PcmConverter", "SoxrAudioConverter", "convert_pcm"]
