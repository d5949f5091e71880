"""Errors that ports may raise, mapped by adapters from third-party errors at the boundary.

::

    VoxcoreError
     ├── ConfigurationError          settings missing or invalid (raised at start, never mid-call)
     └── BackendError (transient?)   a backing service failed
          └── BackendUnavailableError   cannot be reached right now (transient=True)

Later ports (LLM, TTS) extend ``BackendError`` with their own typed errors. The cache port does not
raise at all (SPEC-A: soft returns); these are for the ports that do.
"""

from __future__ import annotations


class VoxcoreError(Exception):
    """Root of every error voxcore raises on purpose."""

    transient: bool = False


class ConfigurationError(VoxcoreError):
    """Configuration is missing or invalid; the message names the setting and the source."""


class BackendError(VoxcoreError):
    """A backing service (Redis, an LLM or TTS provider) failed.

    Attributes:
        transient: True when retrying later may succeed (timeouts, outages, rate limits).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class BackendUnavailableError(BackendError):
    """The service cannot be reached right now (connection refused, timeout, circuit open)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)
