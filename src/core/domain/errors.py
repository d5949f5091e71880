"""Domain rule violations.

::

    DomainError (ValueError)
     ├── InvalidAudioError   a WAV/PCM payload or format that cannot be used
     └── InvalidKeyError     a cache key outside the naming rules
"""

from __future__ import annotations


class DomainError(ValueError):
    """A value breaks a domain rule; the message says which and why."""


class InvalidAudioError(DomainError):
    """Audio that cannot be used: not WAV, not integer PCM, truncated, or an impossible format."""


class InvalidKeyError(DomainError):
    """A cache key that is empty, not a string, or otherwise outside the naming rules."""
