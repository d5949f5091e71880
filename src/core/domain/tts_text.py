"""Canonical TTS text and content-addressed ``tts:*`` cache keys (pure: text in, strings out)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata

from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.keys import tts_key
from voxcore.core.domain.tts_text_numbers import verbalize

#: Bumped whenever normalization or the key payload changes, so old cache entries stop matching
#: (2: numbers are verbalized, so the key of "12 500" is taken over "двенадцать тысяч пятьсот").
TTS_KEY_VERSION = 2
#: Hex digits of the SHA-256 digest kept in a key (128 bits: collisions are not a practical concern).
TTS_DIGEST_HEX = 32


class InvalidTTSTextError(DomainError):
    """Text that says nothing once normalized, or key parameters of the wrong kind."""


# Invisible characters that change the string but never the speech: zero-width space/joiners used
# as word-break hints, word joiner, BOM, soft hyphen.
_INVISIBLE: dict[str, str | None] = dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff\u00ad")
# Typographic variants an editor or an LLM produces interchangeably. Only variants that are read
# alike are merged: hyphen-likes (word joiner, minus sign) become "-", dash-likes (a pause) "—".
_VARIANTS = str.maketrans(
    {
        "\u00ab": '"',  # «
        "\u00bb": '"',  # »
        "\u201c": '"',  # “
        "\u201d": '"',  # ”
        "\u201e": '"',  # „
        "\u201f": '"',  # ‟
        "\u2018": "'",  # ‘
        "\u2019": "'",  # ’
        "\u201a": "'",  # ‚
        "\u201b": "'",  # ‛
        "\u2010": "-",  # hyphen
        "\u2011": "-",  # non-breaking hyphen
        "\u2212": "-",  # minus sign
        "\u2012": "\u2014",  # figure dash
        "\u2013": "\u2014",  # en dash
        "\u2015": "\u2014",  # horizontal bar
        "\u2026": "...",  # ellipsis
        **_INVISIBLE,
    }
)
_HAS_DIGIT = re.compile(r"[0-9]")


def normalize_tts_text(text: str) -> str:
    """Return the canonical form of ``text``: what a TTS engine is asked to say, numbers as words.

    Steps, in order:

    1. Invisible characters (zero-width spaces/joiners, word joiner, BOM, soft hyphen) are removed;
       typographic variants are unified: all double quotes (« » “ ” „) become ``"``, single ones
       ``'``, hyphen-likes (U+2010, U+2011, minus sign U+2212) ``-``, dash-likes (figure/en dash,
       horizontal bar) the em dash ``—``, and the ellipsis character ``...``.
    2. Unicode NFC (a precomposed "й" and "и" + combining breve are the same text).
    3. Whitespace of any kind (including NBSP, narrow NBSP, thin space, tabs, newlines) is collapsed
       to one ASCII space; leading and trailing whitespace is removed.
    4. Numbers are spoken as Russian words (:func:`~voxcore.core.domain.tts_text_numbers.verbalize`):
       phone numbers ("8 800 555-35-35"), dates ("01.12.2026"), times ("14:05"), money ("12 500 ₽",
       "21 001 рублей" with the unit agreed), percentages, decimals ("12,5") and integers written
       whole or in groups ("12500", "12 500", "12\u00a0500" all become "двенадцать тысяч
       пятьсот"). Engines read digit groups each their own way (espeak-ng says "двенадцать
       пятьсот" for "12 500"), so no digit group ever reaches one.

    Deliberately *not* merged: letter case (acronyms are read differently); ``ё``/``е`` ("всё" is
    not "все"). The result is a function of the input alone and is idempotent.

    Args:
        text: Any text meant for speech synthesis.

    Returns:
        The canonical text (possibly empty when ``text`` held only whitespace/invisible characters).

    Raises:
        InvalidTTSTextError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise InvalidTTSTextError(f"TTS text must be str, got {type(text).__name__}")
    # Variants first: removing an invisible character can bring a base letter and a combining
    # mark together, which NFC must then compose.
    text = unicodedata.normalize("NFC", text.translate(_VARIANTS))
    text = " ".join(text.split())
    if _HAS_DIGIT.search(text):
        # Words replace digits: a combining mark that followed a digit now follows a letter.
        text = unicodedata.normalize("NFC", verbalize(text))
    return text


def tts_cache_key(
    text: str,
    *,
    voice: str,
    model: str,
    engine: str,
    audio_format: AudioFormat,
    speed: float = 1.0,
    variant: str = "",
) -> str:
    """The ``tts:*`` cache key of one synthesis: ``tts:`` + 32 hex digits of a SHA-256.

    The digest covers a canonical JSON document (sorted keys, no whitespace, UTF-8) of the
    normalized text (:func:`normalize_tts_text`), the voice, model, engine, every audio format
    field, the speaking rate and :data:`TTS_KEY_VERSION`. So texts that normalize alike share a key,
    and any other difference (another voice, a 16 kHz instead of a 24 kHz stream) gives another
    key: cached audio is only ever reused for exactly the same synthesis.

    Args:
        text: The text to speak (normalized here; callers need not do it first).
        voice: Provider voice name.
        model: Provider model name (``""`` for engines without models).
        engine: Engine identifier (``TTSEngine.name``).
        audio_format: The PCM format of the stored audio.
        speed: Speaking rate multiplier (it changes the audio, so it is part of the key).
        variant: How the stored audio was processed after synthesis (the hybrid responder stores
            it with its edge silence trimmed: ``"trim30/160"``); ``""`` for the engine's audio as
            is. Part of the key only when not empty, so plain keys are unchanged.

    Returns:
        A key such as ``tts:3f2a...`` (36 characters).

    Raises:
        InvalidTTSTextError: the text is empty once normalized, or a parameter has the wrong type.
    """
    normalized = normalize_tts_text(text)
    if not normalized:
        raise InvalidTTSTextError(f"TTS text is empty once normalized: {text!r}")
    for name, value in (("voice", voice), ("model", model), ("engine", engine)):
        if not isinstance(value, str):
            raise InvalidTTSTextError(f"{name} must be str, got {type(value).__name__}")
    if not voice or not engine:
        raise InvalidTTSTextError("voice and engine must not be empty")
    if not isinstance(audio_format, AudioFormat):
        raise InvalidTTSTextError(f"audio_format must be an AudioFormat, got {type(audio_format).__name__}")
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0 < speed < math.inf:
        raise InvalidTTSTextError(f"speed must be a positive number, got {speed!r}")
    if not isinstance(variant, str):
        raise InvalidTTSTextError(f"variant must be str, got {type(variant).__name__}")
    payload: dict[str, object] = {
        "v": TTS_KEY_VERSION,
        "text": normalized,
        "voice": voice,
        "model": model,
        "engine": engine,
        "format": audio_format.to_fields(),
        "speed": float(speed),
    }
    if variant:
        payload["variant"] = variant
    document = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return tts_key(hashlib.sha256(document.encode("utf-8")).hexdigest()[:TTS_DIGEST_HEX])
