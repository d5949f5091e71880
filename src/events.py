"""Structured log events: one call, one log record whose fields any formatter can read.

Library modules call :func:`emit` with an event name and its fields. The record's message is the
event name; each field is a flat attribute of the record (``extra``), so a host's formatter
(stdlib ``%(turn)s``, python-json-logger, structlog's ``ExtraAdder``) sees it. While an
OpenTelemetry span is current (a call or a turn, with an SDK installed), the record also carries
``trace_id`` and ``span_id`` (hex), taken when the event happens, so a formatter running in another
thread (``QueueHandler``) still gets them.

A field whose name is a ``LogRecord`` attribute (``name``, ``message``, ``created``…) is stored
as ``<name>_`` on the record; :data:`FIELDS_ATTR` keeps every field under its own name (what
voxcore's JSON formatter prints).

Nothing here configures logging: the ``voxcore`` logger only has a ``NullHandler`` (added in the
package's ``__init__``), so records reach the host's handlers through the root logger.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

FIELDS_ATTR = "voxcore_fields"
#: LogRecord attributes a field may not overwrite (``makeRecord`` refuses them in ``extra``).
RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def emit(logger: logging.Logger, event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log ``event`` with ``fields`` as one structured record.

    The level check comes first so that a disabled event costs a single comparison on hot paths.
    """
    if not logger.isEnabledFor(level):
        return
    extra: dict[str, Any] = {FIELDS_ATTR: fields}
    for key, value in fields.items():
        extra[f"{key}_" if key in RESERVED else key] = value
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        extra["trace_id"] = format(context.trace_id, "032x")
        extra["span_id"] = format(context.span_id, "016x")
    logger.log(level, event, extra=extra)
