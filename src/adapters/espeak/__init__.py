"""Offline speech synthesis with the local espeak-ng binary (Debian package ``espeak-ng``)."""

from voxcore.adapters.espeak.tts import DEFAULT_MAX_CHARS, EspeakTTSEngine, WavStreamReader, clean_text

__all__ = ["DEFAULT_MAX_CHARS", "EspeakTTSEngine", "WavStreamReader", "clean_text"]
