"""JSON log lines for voxcore's own entrypoints (the CLI, ``logging.configure: true``), never at import.

The library itself only has a ``NullHandler`` on the ``voxcore`` logger: a host's logging set-up
(handlers on the root logger, pytest's ``caplog``) receives every event with its fields as flat
record attributes (see :mod:`voxcore.events`). :func:`configure_logging` is for programs that have
no set-up of their own: it adds one JSON handler and leaves propagation alone.

A record made by :func:`voxcore.events.emit` becomes ``{"event", "ts", "level", "logger", **fields}``,
plus ``trace_id``/``span_id`` when it was emitted inside a recording span. Records from other code
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
_PREVIOUS_LEVEL = "_voxcore_previous_level"
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
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            payload["trace_id"] = trace_id
            payload["span_id"] = getattr(record, "span_id", None)
        else:  # a record from other code: the span current where it is formatted (same thread)
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

    For programs without a logging set-up of their own (voxcore's CLI, benchmarks, or a host that
    sets ``logging.configure: true``). It adds one handler and sets the logger's level to
    ``level`` (the program asked for that level); propagation is left as it is, so a root
    handler the program adds later still sees the records. Idempotent: a handler installed by an
    earlier call is replaced, not duplicated. :func:`remove_logging` undoes it.

    Returns:
        The installed handler.
    """
    logger = logging.getLogger(logger_name)
    previous = logger.level
    for old in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        previous = getattr(old, _PREVIOUS_LEVEL, previous)
        logger.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _HANDLER_MARK, True)
    setattr(handler, _PREVIOUS_LEVEL, previous)
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def remove_logging(handler: logging.Handler, logger_name: str = "voxcore") -> None:
    """Undo :func:`configure_logging`: remove ``handler`` and restore the logger's previous level."""
    logger = logging.getLogger(logger_name)
    if handler in logger.handlers:
        logger.removeHandler(handler)
        logger.setLevel(getattr(handler, _PREVIOUS_LEVEL, logging.NOTSET))
    handler.flush()
