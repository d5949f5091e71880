"""JSON logging: one line per event with stable keys, installed by entrypoints, never at import.

A record made by :func:`voxcore.events.emit` becomes ``{"event", "ts", "level", "logger", **fields}``,
plus ``trace_id``/``span_id`` when an OpenTelemetry span is recording. Records from other code
(third-party libraries) keep their message under ``event``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry import trace

from voxcore.events import FIELDS_ATTR

_HANDLER_MARK = "_voxcore_json_handler"
# json.dumps() with options builds a new encoder per call; one shared encoder saves that on every line.
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "event": record.getMessage(),
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, FIELDS_ATTR, None)
        if fields:
            payload.update(fields)
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            payload["trace_id"] = format(context.trace_id, "032x")
            payload["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(payload)


def configure_logging(
    level: int | str = logging.INFO,
    stream: IO[str] | None = None,
    logger_name: str = "voxcore",
) -> logging.Handler:
    """Send ``logger_name``'s records to ``stream`` (stderr by default) as JSON lines.

    Idempotent: a handler installed by an earlier call is replaced, not duplicated. The logger
    stops propagating to the root logger so a host's own handlers do not print the events twice.

    Returns:
        The installed handler (so a caller may remove it again).
    """
    logger = logging.getLogger(logger_name)
    for old in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    logger.propagate = False
    return handler
