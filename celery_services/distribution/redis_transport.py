"""Two mends of kombu's Redis transport: one Redis client per channel, one read of a binding set per event.

Kombu's Redis transport builds a new ``redis.Redis`` object for every synchronous command of a channel
(each publish, ack, task event): about 60-150 us of CPU each, three or more per call on a worker. The
client objects share the channel's connection pool either way, so one client per channel serves the same
connections; the asynchronous client (the channel's BRPOP connection) is still made afresh, as kombu
expects. Installed process-wide, once, by the distribution; measured: about 0.28 ms less worker CPU per
call (``benchmarks/calls.py``).

kombu's producer routes a message to a topic exchange itself on Redis, reading the exchange's binding set
(``SMEMBERS``) on every publish. The event publisher reads it first, to send nothing nobody is bound for
(:mod:`.event_publisher`), then has kombu route by that same read (:func:`routing_by`): read twice, the set
cost a listened event 0.08 ms more p50 and a fifth of its throughput (``benchmarks/events.py``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["bound_queues", "reuse_sync_clients", "routing_by"]

_installed = False
_lock = threading.Lock()
#: A channel's attribute holding ``(exchange, table)`` for kombu's next read of that binding set.
_HELD = "_celery_services_table"


def reuse_sync_clients() -> None:
    """Make kombu's Redis channels reuse one synchronous client each (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        from kombu.transport import redis as transport

        create: Any = transport.Channel._create_client

        def create_client(self: Any, asynchronous: bool = False) -> Any:
            if asynchronous:
                return create(self, True)
            client = self.__dict__.get("_celery_services_client")
            if client is None:
                client = self.__dict__["_celery_services_client"] = create(self, False)
            return client

        setattr(transport.Channel, "_create_client", create_client)  # noqa: B010 - a method, replaced

        read_table: Any = transport.Channel.get_table

        def get_table(self: Any, exchange: str) -> Any:
            held = self.__dict__.pop(_HELD, None)  # once: a retried publish reads the set again
            if held is not None and held[0] == exchange:
                return held[1]
            return read_table(self, exchange)

        setattr(transport.Channel, "get_table", get_table)  # noqa: B010 - a method, replaced
        _installed = True


def bound_queues(channel: Any, exchange: str, table: Any, routing_key: str) -> set[str]:
    """The queues of ``table`` (``exchange``'s binding set, as ``channel.get_table`` read it) that a message
    published under ``routing_key`` reaches: kombu's own matching, as its producer routes."""
    try:
        queues: set[str] = channel.typeof(exchange).lookup(table, exchange, routing_key, None)
    except KeyError:  # an exchange the channel does not know: kombu routes such a message nowhere too
        return set()
    return queues


@contextlib.contextmanager
def routing_by(channel: Any, exchange: str, table: Any) -> Iterator[None]:
    """Within the block, kombu's next read of ``exchange``'s binding set on ``channel`` (a Redis channel,
    with :func:`reuse_sync_clients` installed) gives ``table``, read just before by the caller, instead of
    reading it again. ``table`` ``None``: nothing held (any other broker)."""
    if table is None:
        yield
        return
    channel.__dict__[_HELD] = (exchange, table)
    try:
        yield
    finally:
        channel.__dict__.pop(_HELD, None)
