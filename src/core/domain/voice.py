"""Per-agent voice settings, the outcome of one speech request, and the text/user checks (pure)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.keys import MAX_KEY_LENGTH
from voxcore.core.domain.tts_text import normalize_tts_text

__all__ = [
    "DEFAULT_VOICE_FORMAT",
    "FAILURE_REASONS",
    "REFUSAL_REASONS",
    "SUCCESS_REASONS",
    "AgentVoiceSettings",
    "InvalidSpeechRequestError",
    "InvalidVoiceSettingsError",
    "SpeechReason",
    "SpeechResult",
    "TTS_RATE_PREFIX",
    "prepare_speech_text",
    "tts_rate_subject",
]

#: What an agent speaks in unless its settings say otherwise: 24 kHz mono s16le (OpenAI's ``pcm``).
DEFAULT_VOICE_FORMAT: Final = AudioFormat(24_000, 1, 2)
#: Prefix of the per-user rate-limit subject of speech requests.
TTS_RATE_PREFIX: Final = "tts:"

SpeechReason = Literal[
    "ok",
    "cache_hit",
    "disabled",
    "unknown_agent",
    "invalid_request",
    "rate_limited",
    "engine_error",
    "unavailable",
]
"""Why a speech request ended as it did.

* ``ok`` - synthesized now; ``cache_hit`` - the same synthesis was cached (success, ``from_cache``).
* ``disabled`` - the agent speaks text only (an expected outcome, not a problem).
* ``unknown_agent`` - no settings for the agent and no default.
* ``invalid_request`` - unusable text (not a string, empty once normalized, too long) or user id.
* ``rate_limited`` - the user spent their allowance (``retry_after_s`` says when to try again).
* ``engine_error`` - the engine failed (``transient`` says whether a retry may succeed).
* ``unavailable`` - the service is closed, or the agent's engine is not configured.
"""

#: Reasons of a successful result.
SUCCESS_REASONS: Final[frozenset[SpeechReason]] = frozenset({"ok", "cache_hit"})
#: Reasons the policy gives for not speaking: expected outcomes, nothing failed.
REFUSAL_REASONS: Final[frozenset[SpeechReason]] = frozenset(
    {"disabled", "unknown_agent", "invalid_request", "rate_limited"}
)
#: Reasons meaning something that should have worked did not.
FAILURE_REASONS: Final[frozenset[SpeechReason]] = frozenset({"engine_error", "unavailable"})


class InvalidVoiceSettingsError(DomainError):
    """Voice settings of the wrong type or out of range; the message names the field."""


class InvalidSpeechRequestError(DomainError):
    """A speech request that cannot be served as asked: unusable text or user id."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentVoiceSettings:
    """How one agent speaks (or that it does not).

    Attributes:
        tts_enabled: False for a text-only agent: its requests end as ``disabled``, quietly.
        engine: Name of the engine that speaks for it (a key of the service's engine map, e.g.
            ``openai`` or ``espeak-ng``); may be empty when TTS is off.
        voice: Provider voice (``alloy``, or ``ru`` for espeak-ng); may be empty when TTS is off.
        model: Provider model; ``""`` lets the engine use its default.
        audio_format: PCM format the agent's audio is delivered (and cached) in.
        speed: Speaking rate multiplier (1.0 = normal); engines may narrow the range further.
        max_chars: Longest text, once normalized, one request may speak.

    Raises:
        InvalidVoiceSettingsError: a field has the wrong type or an impossible value.
    """

    tts_enabled: bool
    engine: str = ""
    voice: str = ""
    model: str = ""
    audio_format: AudioFormat = DEFAULT_VOICE_FORMAT
    speed: float = 1.0
    max_chars: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.tts_enabled, bool):
            raise InvalidVoiceSettingsError(f"tts_enabled must be a bool, got {self.tts_enabled!r}")
        for name in ("engine", "voice", "model"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidVoiceSettingsError(f"{name} must be a string, got {type(value).__name__}")
            if value != value.strip():
                raise InvalidVoiceSettingsError(f"{name} must not have surrounding spaces: {value!r}")
        if self.tts_enabled and not (self.engine and self.voice):
            raise InvalidVoiceSettingsError("an agent with TTS enabled needs an engine and a voice")
        if not isinstance(self.audio_format, AudioFormat):
            raise InvalidVoiceSettingsError(
                f"audio_format must be an AudioFormat, got {type(self.audio_format).__name__}"
            )
        speed = self.speed
        if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0 < speed < math.inf:
            raise InvalidVoiceSettingsError(f"speed must be a positive number, got {speed!r}")
        if isinstance(self.max_chars, bool) or not isinstance(self.max_chars, int) or self.max_chars < 1:
            raise InvalidVoiceSettingsError(f"max_chars must be a positive int, got {self.max_chars!r}")


@dataclass(frozen=True, slots=True)
class SpeechResult:
    """The outcome of one speech request; build it with the class methods, which keep it consistent.

    Attributes:
        success: True for ``ok`` and ``cache_hit``.
        audio: The whole utterance in ``audio_format``; ``None`` on failure, and for a streamed
            request (whose audio came through the stream).
        audio_format: Format of the audio (set exactly when ``success``).
        error: Why there is no audio, in words (``None`` exactly when ``success``).
        reason: The outcome as a code (see :data:`SpeechReason`); branch on this, never on ``error``.
        retry_after_s: For ``rate_limited``, seconds until the user may ask again.
        from_cache: True exactly for ``cache_hit``.
        transient: For ``engine_error``, whether retrying later may succeed.

    Raises:
        ValueError: the fields contradict each other (use the class methods).
    """

    success: bool
    audio: bytes | None
    audio_format: AudioFormat | None
    error: str | None
    reason: SpeechReason
    retry_after_s: float | None = None
    from_cache: bool = False
    transient: bool = False

    def __post_init__(self) -> None:
        if self.success != (self.reason in SUCCESS_REASONS):
            raise ValueError(f"success={self.success} contradicts reason {self.reason!r}")
        if self.success:
            if self.audio_format is None or self.error is not None:
                raise ValueError("a successful result has an audio format and no error")
            if self.audio is not None and not self.audio:
                raise ValueError("a successful result cannot carry empty audio")
        elif self.audio is not None or self.audio_format is not None or not self.error:
            raise ValueError("a failed result has an error and no audio")
        if self.from_cache != (self.reason == "cache_hit"):
            raise ValueError(f"from_cache={self.from_cache} contradicts reason {self.reason!r}")
        if (self.retry_after_s is not None) != (self.reason == "rate_limited"):
            raise ValueError("retry_after_s is set exactly for rate_limited results")
        if self.retry_after_s is not None and not 0 <= self.retry_after_s < math.inf:
            raise ValueError(f"retry_after_s must be a non-negative number, got {self.retry_after_s!r}")
        if self.transient and self.reason != "engine_error":
            raise ValueError("only engine errors can be transient")

    @property
    def refused(self) -> bool:
        """True when the policy declined to speak (disabled, unknown agent, invalid, rate limited)."""
        return self.reason in REFUSAL_REASONS

    @property
    def failed(self) -> bool:
        """True when something that should have worked did not (engine error, unavailable)."""
        return self.reason in FAILURE_REASONS

    @classmethod
    def ok(cls, audio: bytes | None, audio_format: AudioFormat, *, from_cache: bool = False) -> SpeechResult:
        """Audio was produced (``from_cache``: reused from the TTS cache); ``audio`` None when streamed."""
        return cls(
            True, audio, audio_format, None, "cache_hit" if from_cache else "ok", from_cache=from_cache
        )

    @classmethod
    def disabled(cls, agent_id: str) -> SpeechResult:
        """The agent has TTS turned off."""
        return cls(False, None, None, f"TTS is disabled for agent {agent_id!r}", "disabled")

    @classmethod
    def unknown_agent(cls, agent_id: object) -> SpeechResult:
        """No voice settings for the agent, and no default."""
        return cls(False, None, None, f"no voice settings for agent {agent_id!r}", "unknown_agent")

    @classmethod
    def invalid_request(cls, error: str) -> SpeechResult:
        """The text or the user id cannot be used."""
        return cls(False, None, None, error, "invalid_request")

    @classmethod
    def rate_limited(cls, retry_after_s: float) -> SpeechResult:
        """The user is over their allowance for now."""
        retry = max(0.0, float(retry_after_s))
        return cls(
            False, None, None, f"too many speech requests; retry in {retry:.3g} s", "rate_limited", retry
        )

    @classmethod
    def engine_error(cls, error: str, *, transient: bool = False) -> SpeechResult:
        """The engine failed; nothing was cached."""
        return cls(False, None, None, error or "speech synthesis failed", "engine_error", transient=transient)

    @classmethod
    def unavailable(cls, error: str) -> SpeechResult:
        """The service cannot speak for this agent (closed, or its engine is not configured)."""
        return cls(False, None, None, error, "unavailable")


def prepare_speech_text(text: object, *, max_chars: int) -> str:
    """The text to synthesize: :func:`normalize_tts_text` of ``text``, checked for length.

    The normalized text is what the engine speaks, so that every text sharing a cache key (see
    ``tts_cache_key``) sounds exactly like the audio cached under it.

    Raises:
        InvalidSpeechRequestError: ``text`` is not a string, is empty once normalized, or has more
            than ``max_chars`` characters once normalized.
    """
    if not isinstance(text, str):
        raise InvalidSpeechRequestError(f"text must be a string, got {type(text).__name__}")
    normalized = normalize_tts_text(text)
    if not normalized:
        raise InvalidSpeechRequestError("nothing to say: the text is empty")
    if len(normalized) > max_chars:
        raise InvalidSpeechRequestError(f"text too long: {len(normalized)} > {max_chars} characters")
    return normalized


def tts_rate_subject(user_id: object) -> str:
    """The rate-limit subject of a user's speech requests: ``tts:<user_id>``.

    Raises:
        InvalidSpeechRequestError: ``user_id`` is not a non-empty string, or makes a key too long.
    """
    if not isinstance(user_id, str) or not user_id:
        raise InvalidSpeechRequestError(f"user_id must be a non-empty string, got {user_id!r}")
    subject = TTS_RATE_PREFIX + user_id
    if len(subject) > MAX_KEY_LENGTH:
        raise InvalidSpeechRequestError(f"user_id is too long ({len(user_id)} characters)")
    return subject
