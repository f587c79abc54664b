"""Log lines that say which call they belong to: key, path, method and call id, on both sides of a call.

The call path logs with ``extra=call_fields(key, path, method, call_id)``; :class:`CallFormatter` appends the
fields a record carries (``key=my-app path=articles method=get call=3f2c…``) to whatever the wrapped
formatter writes, so Celery's own worker format stays as it is. :func:`configure` sets up the root logger of
a command line process with it; :func:`decorate` wraps the formatters of handlers someone else installed
(the Celery worker's).

A call being served sets its fields for its context (:func:`enter_call`), so the lines the service's own
code logs meanwhile carry them too, on Celery's consumer and on the fast path alike. :class:`JsonFormatter`
writes one JSON object per line instead (``log_format = "json"``, ``--log-format json``), with the call
fields and, when OpenTelemetry traces the call, its ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Literal

__all__ = [
    "CALL_FIELDS",
    "DEFAULT_FORMAT",
    "CallFormatter",
    "JsonFormatter",
    "LogFormat",
    "call_fields",
    "configure",
    "current_call",
    "decorate",
    "enter_call",
    "leave_call",
]

#: ``text``: the usual lines, call fields appended; ``json``: one JSON object per line.
LogFormat = Literal["text", "json"]

#: Record attributes describing a call, in the order they are shown, with their label in the line.
CALL_FIELDS: tuple[tuple[str, str], ...] = (
    ("key", "key"),
    ("path", "path"),
    ("method", "method"),
    ("call_id", "call"),
)

#: Format of the lines :func:`configure` writes (the call fields follow the message).
DEFAULT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def call_fields(key: str, path: str, method: str, call_id: str) -> dict[str, str]:
    """The ``extra`` of a log call about one remote call.

    Args:
        key: The provider app's key.
        path: The service path.
        method: The method called.
        call_id: The call id (Celery's task id).

    Returns:
        A dict for ``logger.info(..., extra=...)``.
    """
    return {"key": key, "path": path, "method": method, "call_id": call_id}


#: The fields of the call being served in this context (see :func:`enter_call`).
_call: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "celery_services_call_fields", default=None
)


def enter_call(fields: Mapping[str, str]) -> contextvars.Token[Mapping[str, str] | None]:
    """Make ``fields`` those of every line logged in this context until :func:`leave_call`.

    The provider does it around the service code of each call it serves, whichever path brought it.
    """
    return _call.set(fields)


def leave_call(token: contextvars.Token[Mapping[str, str] | None]) -> None:
    """Undo :func:`enter_call`."""
    _call.reset(token)


def current_call() -> Mapping[str, str] | None:
    """The fields of the call being served in this context, if any."""
    return _call.get()


def _fields(record: logging.LogRecord) -> Mapping[str, Any] | None:
    """The call fields of a record: its own (``extra=``), else those of the call it was logged in."""
    own = {name: getattr(record, name) for name, _ in CALL_FIELDS if hasattr(record, name)}
    return own or _call.get()


class CallFormatter(logging.Formatter):
    """Appends the call fields of a record to the line of a wrapped formatter.

    Args:
        fmt: Format of the line, when no formatter is wrapped.
        inner: A formatter to wrap (e.g. Celery's colour formatter); its line comes first.
    """

    def __init__(self, fmt: str | None = DEFAULT_FORMAT, inner: logging.Formatter | None = None) -> None:
        super().__init__(fmt)
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record``, then add `` key=… path=… method=… call=…`` for the fields it carries."""
        line = self.inner.format(record) if self.inner is not None else super().format(record)
        found = _fields(record)
        if not found:
            return line
        fields = [f"{label}={found[name]}" for name, label in CALL_FIELDS if name in found]
        # Keep a traceback (several lines) after the fields, so grep finds them on the line they describe.
        head, sep, tail = line.partition("\n")
        return f"{head} [{' '.join(fields)}]{sep}{tail}"


class JsonFormatter(CallFormatter):
    """One JSON object per record, on one line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, ``process``, ``thread``, the call fields (``key``, ``path``, ``method``, ``call_id``),
    ``trace_id`` / ``span_id`` when a traced span is current, Celery's ``task_id`` / ``task_name`` when the
    record has them, and ``exception`` (the traceback, newlines escaped) when there is one.
    """

    def __init__(self) -> None:
        super().__init__(None)

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        found = _fields(record)
        if found:
            out.update(found)
        for name in ("task_id", "task_name"):
            value = getattr(record, name, None)
            if value and value != "???":  # Celery's TaskFormatter puts ??? outside tasks
                out[name] = value
        from .tracing import current_ids  # imports nothing more without the otel extra

        ids = current_ids()
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def decorate(handlers: Iterable[logging.Handler], format: LogFormat = "text") -> None:
    """Make ``handlers`` show call fields (idempotent).

    Args:
        handlers: Handlers installed by someone else, e.g. ``logging.getLogger().handlers`` once Celery's
            worker configured logging.
        format: ``text`` keeps their formatters' lines and appends the fields (a handler already writing
            JSON stays so); ``json`` makes them write :class:`JsonFormatter` lines.
    """
    for handler in handlers:
        if format == "json":
            if not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
        elif not isinstance(handler.formatter, CallFormatter):
            handler.setFormatter(CallFormatter(inner=handler.formatter or logging.Formatter()))


def configure(level: str | int = "WARNING", *, stream: Any = None, format: LogFormat = "text") -> None:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr), with call fields.

    Replaces the handlers a previous call installed, never other ones.

    Args:
        level: A level name (``"info"``, ``"DEBUG"``) or number.
        stream: Where lines go; default ``sys.stderr``.
        format: ``text`` lines, or ``json``: one JSON object per line (:class:`JsonFormatter`); Python's
            warnings then become log records too, so that nothing else is written between the lines.

    Raises:
        ValueError: ``level`` is not a logging level.
    """
    numeric = _level(level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CommandLineHandler)]:
        root.removeHandler(old)
    handler = _CommandLineHandler(stream)
    handler.setFormatter(JsonFormatter() if format == "json" else CallFormatter())
    if format == "json":
        logging.captureWarnings(True)  # e.g. Celery's SecurityWarning, printed before its logging is set
    root.addHandler(handler)
    root.setLevel(numeric)


class _CommandLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``stream``, or to whatever ``sys.stderr`` is at each record (test runners swap it)."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__()
        self._fixed = stream

    @property
    def stream(self) -> Any:
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # StreamHandler.__init__ sets it; the property decides


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return numeric
