"""Log lines that say which call they belong to: key, path, method and call id, on both sides of a call.

The call path logs with ``extra=call_fields(key, path, method, call_id)``; :class:`CallFormatter` appends the
fields a record carries (``key=my-app path=articles method=get call=3f2c…``) to whatever the wrapped
formatter writes, so Celery's own worker format stays as it is. :func:`configure` sets up the root logger of
a command line process with it; :func:`decorate` wraps the formatters of handlers someone else installed
(the Celery worker's).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["CALL_FIELDS", "DEFAULT_FORMAT", "CallFormatter", "call_fields", "configure", "decorate"]

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
        fields = [f"{label}={getattr(record, name)}" for name, label in CALL_FIELDS if hasattr(record, name)]
        if not fields:
            return line
        # Keep a traceback (several lines) after the fields, so grep finds them on the line they describe.
        head, sep, tail = line.partition("\n")
        return f"{head} [{' '.join(fields)}]{sep}{tail}"


def decorate(handlers: Iterable[logging.Handler]) -> None:
    """Make ``handlers`` show call fields, keeping their formatters' lines (idempotent).

    Args:
        handlers: Handlers installed by someone else, e.g. ``logging.getLogger().handlers`` once Celery's
            worker configured logging.
    """
    for handler in handlers:
        if not isinstance(handler.formatter, CallFormatter):
            handler.setFormatter(CallFormatter(inner=handler.formatter or logging.Formatter()))


def configure(level: str | int = "WARNING", *, stream: Any = None) -> None:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr), with call fields.

    Replaces the handlers a previous call installed, never other ones.

    Args:
        level: A level name (``"info"``, ``"DEBUG"``) or number.
        stream: Where lines go; default ``sys.stderr``.

    Raises:
        ValueError: ``level`` is not a logging level.
    """
    numeric = _level(level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CommandLineHandler)]:
        root.removeHandler(old)
    handler = _CommandLineHandler(stream)
    handler.setFormatter(CallFormatter())
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
