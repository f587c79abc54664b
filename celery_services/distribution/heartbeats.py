"""A RabbitMQ connection one thread reads, as py-amqp leaves it to that thread: its waits and its heartbeats.

The fast path's serving threads and the event consumer's thread each read a connection of their own, and run
calls or listeners on it. py-amqp leaves two things to them:

- it waits on the broker's answer to a method (a channel opened, a queue declared, a consumer started or
  cancelled, the connection closed) for ever by default: :class:`Line` bounds every such wait to
  :data:`REPLY_WAIT` (``drain_events`` sets its own timeout);
- it sends a heartbeat only when the connection's thread asks for one between two reads
  (``heartbeat_check``): a thread that runs a long call or a slow listener sends none meanwhile, and RabbitMQ
  closes a connection it heard nothing from for two heartbeats, giving its unacknowledged message to another
  consumer. A keeper thread beats for the busy one (:meth:`Line.beat`), so that the heartbeat can be short
  enough to see a broker cut off soon, whatever runs on the connection.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["REPLY_WAIT", "Line", "keep"]

log = logging.getLogger("celery_services.heartbeats")

#: Seconds RabbitMQ may take to answer a method the connection's thread waits on.
REPLY_WAIT = 5.0


class Line:
    """A py-amqp connection read by one thread, its waits bounded, and whether that thread runs a call or a
    listener on it.

    py-amqp's connection is not thread-safe: the keeper writes a heartbeat only while the thread runs
    (:meth:`running`), and under :attr:`lock`, which the thread holds for its own writes meanwhile and to say
    it is done.

    Args:
        connection: the py-amqp connection (kombu's ``Connection.connection``), just connected.
    """

    def __init__(self, connection: Any) -> None:
        connection.sock.settimeout(REPLY_WAIT)
        self.connection = connection
        self.lock = threading.Lock()
        self.busy = False

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The block runs a call or a listener: :meth:`beat` sends heartbeats meanwhile."""
        self.busy = True
        try:
            yield
        finally:
            with self.lock:
                self.busy = False

    def beat(self) -> None:
        """Send a heartbeat if the thread runs something (from the keeper thread, every quarter heartbeat)."""
        with self.lock:
            if not self.busy:
                return
            try:
                self.connection.send_heartbeat()
            except Exception as exc:  # the connection is gone: its own thread will find out
                log.debug("heartbeat not sent: %r", exc)


def keep(stop: threading.Event, heartbeat: float, lines: Callable[[], Iterable[Line]]) -> None:
    """The keeper thread's loop, until ``stop``: every quarter ``heartbeat`` (seconds), :meth:`Line.beat` each
    of the ``lines`` of the moment (a thread's own loop beats between its calls or listeners)."""
    while not stop.wait(heartbeat / 4):
        for line in lines():
            line.beat()
