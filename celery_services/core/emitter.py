"""A small thread-safe event emitter: ``on``, ``once``, ``off``, ``emit``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["EventEmitter", "Listener", "Watcher"]

Listener = Callable[..., Any]
#: ``(emitter, event)``: told when ``event`` of ``emitter`` gets a listener where it had none.
Watcher = Callable[["EventEmitter", str], None]

log = logging.getLogger("celery_services.emitter")


class EventEmitter:
    """Listeners per event name; events come from worker threads, so the listener table is locked."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[tuple[Listener, bool]]] = {}
        self._listeners_lock = threading.Lock()
        self._watchers: list[Watcher] = []

    def on(self, event: str, listener: Listener) -> Listener:
        """Call ``listener(*args)`` on every ``emit(event, *args)``; returns it (usable as a decorator)."""
        self._add(event, listener, once=False)
        return listener

    def once(self, event: str, listener: Listener) -> Listener:
        """Like :meth:`on`, for the next emission only."""
        self._add(event, listener, once=True)
        return listener

    def watch(self, watcher: Watcher) -> None:
        """Call ``watcher(self, event)`` each time ``event`` gets a listener where it had none, before that
        :meth:`on` returns: a proxy's distribution binds the remote event then, so that the events published
        after ``on()`` returns reach the listener. A watcher that raises is logged."""
        with self._listeners_lock:
            if watcher not in self._watchers:
                self._watchers.append(watcher)

    def unwatch(self, watcher: Watcher) -> None:
        """Stop calling ``watcher``."""
        with self._listeners_lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def _add(self, event: str, listener: Listener, once: bool) -> None:
        with self._listeners_lock:
            entries = self._listeners.setdefault(event, [])
            watchers = [] if entries else list(self._watchers)
            entries.append((listener, once))
        for watcher in watchers:
            try:
                watcher(self, event)
            except Exception:
                log.exception("watcher %r of event %r failed", watcher, event)

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
