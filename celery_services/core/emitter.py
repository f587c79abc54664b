"""A small thread-safe event emitter: ``on``, ``once``, ``off``, ``emit``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["EventEmitter", "Listener"]

Listener = Callable[..., Any]

log = logging.getLogger("celery_services.emitter")


class EventEmitter:
    """Listeners per event name; events come from worker threads, so the listener table is locked."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[tuple[Listener, bool]]] = {}
        self._listeners_lock = threading.Lock()

    def on(self, event: str, listener: Listener) -> Listener:
        """Call ``listener(*args)`` on every ``emit(event, *args)``; returns it (usable as a decorator)."""
        with self._listeners_lock:
            self._listeners.setdefault(event, []).append((listener, False))
        return listener

    def once(self, event: str, listener: Listener) -> Listener:
        """Like :meth:`on`, for the next emission only."""
        with self._listeners_lock:
            self._listeners.setdefault(event, []).append((listener, True))
        return listener

    def off(self, event: str, listener: Listener | None = None) -> None:
        """Remove ``listener`` from ``event``, or every listener of ``event`` when none is given."""
        with self._listeners_lock:
            if listener is None:
                self._listeners.pop(event, None)
                return
            entries = self._listeners.get(event, [])
            # ``==``, not ``is``: each access to a bound method makes a new (equal) object.
            self._listeners[event] = [entry for entry in entries if entry[0] != listener]

    def listeners(self, event: str) -> list[Listener]:
        """The listeners of ``event``, in registration order."""
        with self._listeners_lock:
            return [listener for listener, _ in self._listeners.get(event, [])]

    def emit(self, event: str, *args: Any) -> bool:
        """Call the listeners of ``event`` in order; returns whether any listened.

        A failing listener is logged and does not stop the others: an event is a notification, and the
        call that emitted it has already succeeded.
        """
        with self._listeners_lock:
            entries = list(self._listeners.get(event, []))
            if any(once for _, once in entries):
                self._listeners[event] = [entry for entry in self._listeners[event] if not entry[1]]
        for listener, _ in entries:
            try:
                listener(*args)
            except Exception:
                log.exception("listener %r of event %r failed", listener, event)
        return bool(entries)
