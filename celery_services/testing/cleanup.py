"""Removing what a test created on its broker: a key's queue, and everything under a registry prefix."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from typing import Any

import redis

from ..distribution.redis_clients import is_redis

__all__ = ["purge_prefix", "purge_queues"]

#: Queue priorities kombu's Redis transport keeps a list for, beside the queue's own (``{queue}\x06\x16{n}``).
_PRIORITIES = range(1, 10)


def purge_queues(broker_url: str, queues: Iterable[str]) -> None:
    """Delete the call queues ``queues`` (one per app key) and what kombu keeps for them.

    On Redis: each queue's lists, kombu's binding tables for it, and the entries a killed worker left of it
    in kombu's unacknowledged index (Celery would give them back an hour later, into another test). On
    RabbitMQ: the queues, and the direct exchange of each one's name that Celery declares with it. A broker
    that does not answer is left alone: the test's own failure says why.
    """
    names = set(queues)
    if not names:
        return
    if not is_redis(broker_url):
        import kombu.connection

        connection: Any = kombu.connection.Connection  # kombu is untyped
        with contextlib.suppress(Exception), connection(broker_url, connect_timeout=2) as conn:
            for name in names:
                for delete in ("queue_delete", "exchange_delete"):
                    with contextlib.suppress(Exception):  # a missing one closes its channel
                        getattr(conn.channel(), delete)(name)
        return
    store = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=2)
    try:
        for name in names:
            store.delete(
                name,
                f"_kombu.binding.{name}",
                f"_kombu.binding_permanent.{name}",
                *[f"{name}\x06\x16{priority}" for priority in _PRIORITIES],
            )
        stale = []
        for tag, raw in store.hscan_iter("unacked"):
            with contextlib.suppress(ValueError, IndexError, TypeError):
                if json.loads(raw)[2] in names:
                    stale.append(tag)
        if stale:
            store.hdel("unacked", *stale)
            store.zrem("unacked_index", *stale)
    except redis.RedisError:
        pass
    finally:
        store.close()


def purge_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key under a registry prefix (manifests, replies, leases, fast-path lists …), and the
    event bindings of its consumers' queues (group queues outlive their apps; a killed consumer leaves its
    broadcast queue bound)."""
    store = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
    try:
        names = list(store.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(names), 500):
            store.delete(*names[start : start + 500])
        marker = f"{prefix}.events.".encode()
        for table in store.scan_iter(match="_kombu.binding*", count=1000):
            if store.type(table) != b"set":
                continue
            if stale := [member for member in store.smembers(table) if marker in member]:
                store.srem(table, *stale)
    except redis.RedisError:
        pass
    finally:
        store.close()
