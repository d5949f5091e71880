"""Structured log events: one call, one JSON line once the entrypoint has configured logging.

Library modules call :func:`emit` with an event name and its fields; the JSON formatter that
``voxcore.entrypoints.logging`` installs turns them into ``{"event": ..., "ts": ..., **fields}``.
Nothing here configures logging: a host that never calls the entrypoint keeps its own set-up.
"""

from __future__ import annotations

import logging
from typing import Any

FIELDS_ATTR = "voxcore_fields"


def emit(logger: logging.Logger, event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log ``event`` with ``fields`` as one structured record.

    The level check comes first so that a disabled event costs a single comparison on hot paths.
    """
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={FIELDS_ATTR: fields})
