"""The publishing half of the event bus: a producer connection that never blocks nor raises into a service.

:class:`EventPublisher` sends routing keys and JSON bodies made by :class:`~.events.EventBus` (which owns it
and holds the wire format) over one producer connection, built by the bus's :class:`~.events.Broker` like
every connection of the bus. It bounds what a broker in trouble costs a service call: one retry, a lock
taken with a timeout, then a cooldown during which publishes fail at once; and it counts what it drops,
reporting the drops at WARNING at most every few seconds.

On Redis there is no broker-side routing: kombu's producer routes each message itself, from the binding set
``_kombu.binding.<exchange>`` that the consuming half keeps right (see :mod:`.event_consumer`). So the
publisher reads that set first, and neither encodes nor sends an event nobody is bound for (kombu's publish
then routes by the same read: :func:`.redis_transport.routing_by`). RabbitMQ routes at the broker and
cannot be asked beforehand: there the events of a served call are published *mandatory*, and once
RabbitMQ returned one nobody took, the later ones of its routing key are skipped while no listener bound
anything since (:mod:`.event_epoch`).

One piece, past 300 lines: one producer connection and what guards it (its lock, its cooldown, its drop
counts, what a forked child makes anew), which every publish reads together.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import kombu.messaging

from .event_epoch import RETURNED_FOR
from .redis_transport import bound_queues, routing_by

if TYPE_CHECKING:
    from .event_epoch import BindingEpoch
    from .events import Broker

__all__ = ["EventPublisher", "Payload"]

log = logging.getLogger("celery_services.events")  # the bus's one logger (see events.py)

# kombu ships some inline hints but leaves its API unannotated: typed as an Any-returning callable here
Producer: Callable[..., Any] = kombu.messaging.Producer

_COOLDOWN = (0.5, 5.0)  # after broker errors, publishes fail at once for 0.5 s, doubling up to 5 s
# A busy provider emits many events per second: while the broker is down, one WARNING per event would
# bury everything else, and a single one would hide how much was lost. Counts are reported this often.
_REPORT_INTERVAL = 5.0
_LOCK_TIMEOUT = 1.0

#: An event's JSON, or a function that makes it (called only when someone is bound for the event).
Payload = str | Callable[[], str]


#: Every publisher of the process, made anew in a forked child (:func:`_after_fork_in_child`).
_PUBLISHERS: weakref.WeakSet[EventPublisher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A prefork pool's child inherits its parent's publishers: their producer connection is the parent's
    # socket (py-amqp checks no pid, unlike redis-py's pools), which every child would share, and a lock
    # held by a parent's thread at the fork would stay held. Only the forking thread runs here.
    for publisher in list(_PUBLISHERS):
        publisher._producer = None  # forgotten, never closed: closing would write on the parent's socket
        publisher._publish_lock, publisher._count_lock = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass
class _Outage:
    """Events dropped since the broker stopped taking them, and what was reported of them."""

    since: float  # time.time() of the first drop
    error: str = ""  # the last broker error
    dropped: int = 0
    reported: int = 0  # dropped as of the last WARNING
    next_report: float = 0.0  # time.monotonic() before which no WARNING is logged


class EventPublisher:
    """Publishes encoded events on ``exchange``; thread-safe, never raises.

    Args:
        broker: where the broker is and how to connect to it (shared with the consuming half).
        exchange: the kombu topic exchange, declared once per producer connection.
        epoch: on RabbitMQ, the exchange's binding epoch; without it every event is sent.

    Attributes:
        published: events the broker took.
        dropped: events the broker could not take (down, erroring, or a publish stuck on it).
        publish_failures: ``dropped`` plus the events :meth:`reject` counted.
        unheard: events not sent since no queue was bound for them (see :meth:`publish`).
    """

    def __init__(self, broker: Broker, exchange: Any, epoch: BindingEpoch | None = None) -> None:
        self.broker, self.exchange, self.epoch = broker, exchange, epoch
        self.published = self.publish_failures = self.dropped = self.unheard = 0
        # RabbitMQ's returns (guarded by _publish_lock): the epoch read last, and each routing key
        # returned under it, with when that return is forgotten.
        self._epoch: str | None = None
        self._returned: dict[str, float] = {}
        self._sent = itertools.count()
        self._publish_lock, self._count_lock = threading.Lock(), threading.Lock()
        self._producer: Any = None  # guarded by _publish_lock
        self._down_until, self._cooldown = 0.0, _COOLDOWN[0]
        self._outage: _Outage | None = None  # guarded by _count_lock
        self._last_error = ""
        self._closed = False
        _PUBLISHERS.add(self)

    def publish(self, routing_key: str, payload: Payload, headers: dict[str, Any] | None = None) -> bool:
        """Publish one JSON ``payload`` under ``routing_key``; returns whether the broker took it.

        ``payload``: the JSON, or a function that makes it, called only when a queue is bound for the
        event; if it raises, the event is counted by :meth:`reject`. ``headers``: message headers (an
        event's trace context, see :mod:`.observability`).

        On Redis kombu's producer routes each message itself, from the exchange's binding set: that set is
        read here first, and an event nobody is bound for is neither made nor sent (counted in ``unheard``;
        ``True``: nothing was to be delivered). Sent through kombu's layers to be routed nowhere, a 100 KB
        ``created`` cost about a third of a provider's time per call (``benchmarks/calls.py``). kombu's
        publish then routes by the same read: one read of the set per event, as before. A listener that
        binds meanwhile misses the event, as it would had the event been sent a moment earlier (its binding
        is at the broker once ``bind`` returns).

        RabbitMQ routes at the broker, and cannot be asked. Given a binding epoch, the events a served call
        publishes after its reply are judged by the epoch read with that reply: each is sent *mandatory*,
        and one whose routing key RabbitMQ returned (nobody took the last one) under that same epoch, less
        than ``RETURNED_FOR`` seconds ago, is skipped, counted in ``unheard`` (:mod:`.event_epoch`). Events
        published outside a served call are sent as they are on a bus without an epoch.

        On a broker error: counts the event in ``dropped`` (and ``publish_failures``), returns False, and
        fails fast for a moment (0.5 s, doubling on each failure up to 5 s); the drops are reported at
        WARNING, rate-limited, and once more when publishing recovers.
        """
        if time.monotonic() < self._down_until:
            return self._dropped(routing_key, self._last_error)
        if not self._publish_lock.acquire(timeout=_LOCK_TIMEOUT):
            return self._dropped(routing_key, "a publish is stuck on it")
        try:
            if self._producer is None:
                conn = self.broker.connection()
                conn.ensure_connection(**self.broker.retry_policy)
                channel = conn.channel()
                self.exchange(channel).declare()  # once, not re-checked on every publish
                # kombu's Redis channels have no returns (nor the events table to hear them on)
                returns = None if self.broker.redis else self._on_return
                self._producer = Producer(
                    channel, exchange=self.exchange, auto_declare=False, on_return=returns
                )
            producer, name = self._producer, self.exchange.name
            table, returnable = None, dict[str, Any]()
            if self.broker.redis:
                try:
                    table = producer.channel.get_table(name)
                except producer.connection.connection_errors as exc:
                    # kombu's publish below retries on a revived connection and reads the set itself
                    log.debug("binding set of %s not read: %r", name, exc)
                if table is not None and not bound_queues(producer.channel, name, table, routing_key):
                    with self._count_lock:
                        self.unheard += 1
                    return self._took()
            elif self.epoch is not None and (epoch := self.epoch.current()) is not None:
                if self._skips(routing_key, epoch):
                    with self._count_lock:
                        self.unheard += 1
                    return self._took()
                # A return names the epoch read before its event was sent.
                returnable = {"mandatory": True, "message_id": f"{epoch}.{next(self._sent)}"}
            if callable(payload):
                try:
                    payload = payload()
                except Exception as exc:  # data pydantic cannot serialize
                    return self.reject("event %s not published: %s", routing_key, exc)
            with routing_by(producer.channel, name, table):
                producer.publish(
                    payload,
                    routing_key=routing_key,
                    content_type="application/json",
                    content_encoding="utf-8",
                    headers=headers,
                    delivery_mode=2,
                    retry=True,
                    retry_policy=self.broker.retry_policy,
                    **returnable,
                )
            self.published += 1
            return self._took()
        except Exception as exc:
            self._release_producer()
            self._down_until = time.monotonic() + self._cooldown
            self._cooldown = min(self._cooldown * 2, _COOLDOWN[1])
            self._last_error = repr(exc)
            return self._dropped(routing_key, self._last_error)
        finally:
            self._publish_lock.release()

    def _skips(self, routing_key: str, epoch: str) -> bool:
        """RabbitMQ, within a served call that read ``epoch``: whether RabbitMQ returned ``routing_key``'s
        last event under that epoch less than ``RETURNED_FOR`` seconds ago (under the publish lock)."""
        if epoch != self._epoch:  # a listener bound something, or the epoch was lost: start again
            self._returned.clear()
            self._epoch = epoch
            return False
        forgotten = self._returned.get(routing_key)
        if forgotten is None:
            return False
        if time.monotonic() >= forgotten:
            del self._returned[routing_key]
            return False
        return True

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        """py-amqp's callback for a message RabbitMQ returned (read in a later publish, under its lock)."""
        epoch = str((message.properties or {}).get("message_id") or "").partition(".")[0]
        if epoch and epoch == self._epoch:  # else sent under an epoch since replaced: a listener may be new
            self._returned[routing_key] = time.monotonic() + RETURNED_FOR

    def _took(self) -> bool:
        """The broker answered (under the publish lock): an outage, if any, is over."""
        self._cooldown = _COOLDOWN[0]
        if self._outage is not None:
            self._recovered()
        return True

    def reject(self, msg: str, *args: Any) -> bool:
        """Count one event that could not be encoded in ``publish_failures``, log ``msg % args`` (WARNING).

        Returns:
            False, for ``return publisher.reject(...)``.
        """
        with self._count_lock:
            self.publish_failures += 1
        log.warning(msg, *args)
        return False

    def _dropped(self, key: str, error: str) -> bool:
        """Count one event the broker did not take; WARNING with the counts at most every few seconds."""
        now = time.monotonic()
        with self._count_lock:
            self.publish_failures += 1
            self.dropped += 1
            outage = self._outage
            if outage is None:
                outage = self._outage = _Outage(since=time.time())
            outage.dropped += 1
            outage.error = error or outage.error
            report = now >= outage.next_report
            if report:
                outage.next_report, outage.reported = now + _REPORT_INTERVAL, outage.dropped
            count, since, error = outage.dropped, outage.since, outage.error
        if report:
            log.warning(
                "%s dropped since %s, broker down: %s", _events(count), _clock(since), error or "unknown"
            )
        else:
            log.debug("event %s dropped: broker down", key)
        return False

    def _recovered(self) -> None:
        with self._count_lock:
            outage, self._outage = self._outage, None
        if outage is not None:
            # WARNING, not INFO: the last rate-limited WARNING may have missed drops; this gives the total
            # to whoever watches warnings only.
            log.warning("event publishing recovered after %d dropped events", outage.dropped)

    def _release_producer(self) -> None:
        if self._producer is not None:
            self.broker.release(self._producer.connection)
        self._producer = None

    def release(self) -> None:
        """Release the producer connection, once no publish is using it (the next publish makes another)."""
        with self._publish_lock:
            self._release_producer()

    def close(self) -> None:
        """Report the drops the last WARNING did not count, release the producer connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._count_lock:
            outage = self._outage
        if outage is not None and outage.dropped > outage.reported:  # else the last WARNING said it all
            log.warning(
                "%s dropped since %s, broker down: %s",
                _events(outage.dropped),
                _clock(outage.since),
                outage.error or "unknown",
            )
        self.release()


def _events(count: int) -> str:
    return f"{count} event{'' if count == 1 else 's'}"


def _clock(stamp: float) -> str:
    """``time.time()`` as local ``HH:MM:SS.mmm``, for log lines."""
    return time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp % 1 * 1000):03d}"
