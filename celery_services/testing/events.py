"""Waiting for events with a deadline: ``with waiter.expect("articles", "created", count=2): ...``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..core.app import App

__all__ = ["EventWaiter", "Expectation", "HeardEvent"]


@dataclass(frozen=True)
class HeardEvent:
    """One event a service emitted while an expectation was open.

    Attributes:
        event: the event's name.
        data: what it carried.
        context: its context (for a remote event: ``method``, ``id``, ``params`` as the provider sent them).
    """

    event: str
    data: Any
    context: Any = None


@dataclass
class Expectation:
    """What :meth:`EventWaiter.expect` yields: the events heard so far, filled while the block runs.

    Attributes:
        path: the service listened to.
        event: the event expected.
        count: how many of it are expected.
        heard: every event of the service heard since the block began (the expected one and the others).
    """

    path: str
    event: str
    count: int
    heard: list[HeardEvent] = field(default_factory=list)
    _arrived: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def matched(self) -> list[HeardEvent]:
        """The expected events heard so far."""
        with self._arrived:
            return [heard for heard in self.heard if heard.event == self.event]

    @property
    def data(self) -> list[Any]:
        """The data of the expected events heard so far, in arrival order."""
        return [heard.data for heard in self.matched]

    def _add(self, heard: HeardEvent) -> None:
        with self._arrived:
            self.heard.append(heard)
            self._arrived.notify_all()

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while sum(heard.event == self.event for heard in self.heard) < self.count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._arrived.wait(remaining)  # woken by each arrival, never a blind sleep
            return True

    def describe(self) -> str:
        """What arrived, one line per event, for a failure message."""
        with self._arrived:
            lines = [f"  {heard.event} {heard.data!r}" for heard in self.heard]
        return "\n".join(lines) if lines else "  (nothing)"


class EventWaiter:
    """Waits for the events of an app's services, local or remote, with a deadline.

    Args:
        app: the app whose services are listened to (usually a consumer: remote events reach its proxies).
        timeout: the default seconds :meth:`expect` waits after its block.
    """

    def __init__(self, app: App, timeout: float = 10.0) -> None:
        self.app = app
        self.timeout = timeout

    @contextmanager
    def expect(
        self, path: str, event: str, count: int = 1, timeout: float | None = None
    ) -> Iterator[Expectation]:
        """Listen to ``path`` during the block, then wait until ``count`` ``event`` events have arrived.

        The listeners are on before the block runs, so nothing the block causes is missed. A remote
        service not yet mounted is waited for (within the same timeout) before the block runs.

        Args:
            path: the service's path on the app.
            event: the event expected (``created``, a custom one …).
            count: how many are expected, at least.
            timeout: seconds to wait after the block (default: the waiter's).

        Yields:
            The :class:`Expectation`, whose ``heard`` / ``data`` fill as events arrive.

        Raises:
            AssertionError: fewer than ``count`` arrived in time; the message lists what did arrive.
        """
        seconds = self.timeout if timeout is None else timeout
        wrapper = self._service(path, seconds)
        expectation = Expectation(wrapper.path, event, count)
        names = set(wrapper.events) | {event}
        listeners = []
        for name in sorted(names):

            def listener(data: Any, context: Any = None, name: str = name) -> None:
                expectation._add(HeardEvent(name, data, context))

            wrapper.on(name, listener)
            listeners.append((name, listener))
        try:
            yield expectation
            if not expectation._wait(seconds):
                got = len(expectation.matched)
                raise AssertionError(
                    f"expected {count} '{event}' event(s) of '{wrapper.path}' within {seconds}s, "
                    f"{got} arrived; every event of '{wrapper.path}' heard:\n{expectation.describe()}"
                )
        finally:
            for name, listener in listeners:
                wrapper.off(name, listener)

    def _service(self, path: str, timeout: float) -> Any:
        path = path.strip("/")
        if path in self.app.services or self.app.distribution is None:
            return self.app.service(path)
        return self.app.distribution.wait_for(path, timeout=timeout)
