"""voxcore: the low-latency core of real-time voice agents.

The import package is ``voxcore`` (this folder, ``src/``, is mapped onto it). The public API, all
importable from here (``from voxcore import Container, Settings, load_settings``):

==============================  ==========================================================
``Container``                   the composition root a host service builds (one per process)
``Settings``                    the validated settings model
``load_settings``               settings from a YAML file + ``.env`` + the environment
``CallRegistry``                ``await container.calls()``: one conversation per call id,
                                a turn lock per call, every call closed at shutdown
``ConversationManager``         one call's conversation (``container.open_conversation(id)``)
``TurnMetrics``                 the figures of one turn (``manager.last_turn_metrics``)
``LLMStreamChunk``              one streamed piece of an answer
``configure_logging``           voxcore's JSON log lines on a stream (hosts usually keep theirs)
``setup_telemetry``             voxcore's own OpenTelemetry SDK set-up (never over a host's)
``Telemetry``                   what :func:`setup_telemetry` installed
``VoxcoreError``                root of every error voxcore raises on purpose
``ConfigurationError``          settings missing or invalid (at start, never mid-call)
``BackendError``                a backing service failed (``transient`` flag)
``BackendUnavailableError``     a backing service cannot be reached right now
``LLMError``                    an LLM provider call failed; subclasses below
``LLMAuthError``                401/403: bad or missing API key
``LLMRateLimitedError``         429/503 with ``retry_after``
``LLMTimeoutError``             connect, read, first-token or turn deadline
``LLMServerError``              5xx
``LLMProtocolError``            malformed stream or structured answer
``TTSError``                    a speech synthesis failed
``__version__``                 the package version (the one source of it)
==============================  ==========================================================

Names load on first use: ``import voxcore`` costs next to nothing, and the voice stack (numpy,
soxr) is imported only when a voice feature is used.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# A library never decides where its records go: the host's handlers (root logger) get them.
logging.getLogger(__name__).addHandler(logging.NullHandler())

_EXPORTS: dict[str, str] = {
    "Container": "voxcore.entrypoints.container",
    "CallRegistry": "voxcore.application.calls",
    "Settings": "voxcore.entrypoints.settings",
    "load_settings": "voxcore.entrypoints.settings",
    "ConversationManager": "voxcore.application.manager",
    "TurnMetrics": "voxcore.application.manager",
    "LLMStreamChunk": "voxcore.core.domain.models",
    "configure_logging": "voxcore.entrypoints.logging",
    "setup_telemetry": "voxcore.entrypoints.telemetry",
    "Telemetry": "voxcore.entrypoints.telemetry",
    "VoxcoreError": "voxcore.core.ports.errors",
    "ConfigurationError": "voxcore.core.ports.errors",
    "BackendError": "voxcore.core.ports.errors",
    "BackendUnavailableError": "voxcore.core.ports.errors",
    "LLMError": "voxcore.core.ports.errors",
    "LLMAuthError": "voxcore.core.ports.errors",
    "LLMRateLimitedError": "voxcore.core.ports.errors",
    "LLMTimeoutError": "voxcore.core.ports.errors",
    "LLMServerError": "voxcore.core.ports.errors",
    "LLMProtocolError": "voxcore.core.ports.errors",
    "TTSError": "voxcore.core.ports.errors",
}

__all__ = [
    "__version__",
    "Container",
    "CallRegistry",
    "Settings",
    "load_settings",
    "ConversationManager",
    "TurnMetrics",
    "LLMStreamChunk",
    "configure_logging",
    "setup_telemetry",
    "Telemetry",
    "VoxcoreError",
    "ConfigurationError",
    "BackendError",
    "BackendUnavailableError",
    "LLMError",
    "LLMAuthError",
    "LLMRateLimitedError",
    "LLMTimeoutError",
    "LLMServerError",
    "LLMProtocolError",
    "TTSError",
]

if TYPE_CHECKING:
    from voxcore.application.calls import CallRegistry
    from voxcore.application.manager import ConversationManager, TurnMetrics
    from voxcore.core.domain.models import LLMStreamChunk
    from voxcore.core.ports.errors import (
        BackendError,
        BackendUnavailableError,
        ConfigurationError,
        LLMAuthError,
        LLMError,
        LLMProtocolError,
        LLMRateLimitedError,
        LLMServerError,
        LLMTimeoutError,
        TTSError,
        VoxcoreError,
    )
    from voxcore.entrypoints.container import Container
    from voxcore.entrypoints.logging import configure_logging
    from voxcore.entrypoints.settings import Settings, load_settings
    from voxcore.entrypoints.telemetry import Telemetry, setup_telemetry


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'voxcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
