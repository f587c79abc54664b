"""Leases on calls in flight, for the Redis transport.

Kombu's Redis transport gives an unacknowledged message back to the queue once it is older than
``visibility_timeout``. The distribution keeps that timeout short, so a call lost with a killed replica is
served by another one before its caller gives up; a live worker must then keep telling the broker that
its long calls are still in hand, or they would be served twice. From the moment the consumer receives a
call, its delivery tag's score in the transport's ``unacked_index`` is refreshed every third of the
visibility timeout (``ZADD XX CH``: a tag acknowledged meanwhile is never added back, and is forgotten).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import redis

__all__ = ["LeaseKeeper"]

log = logging.getLogger("celery_services.lease")


class LeaseKeeper:
    """Refreshes the unacked-index score of the delivery tags in flight in this process."""

    def __init__(self, broker_url: str, visibility_timeout: float, index_key: str = "unacked_index") -> None:
        self._url = broker_url
        self._index = index_key
        self.interval = max(visibility_timeout / 3, 0.1)
        self._tags: set[str] = set()
        self._lock = threading.Lock()
        self._pid = 0
        self._wake = threading.Event()
        self._client: redis.Redis | None = None

    def hold(self, tag: str) -> None:
        """Keep ``tag`` leased until its message is acknowledged."""
        with self._lock:
            self._tags.add(tag)
            if self._pid != os.getpid():  # first use in this (possibly forked) process
                self._pid = os.getpid()
                self._client = redis.Redis.from_url(self._url)
                threading.Thread(target=self._run, name="celery-services-lease", daemon=True).start()

    def _run(self) -> None:
        while not self._wake.wait(self.interval):
            with self._lock:
                tags = list(self._tags)
                client = self._client
            if not tags or client is None:
                continue
            try:
                now = time.time()
                with client.pipeline(transaction=False) as pipe:
                    for tag in tags:
                        pipe.zadd(self._index, {tag: now}, xx=True, ch=True)
                    renewed = pipe.execute()
            except redis.RedisError:
                log.warning("could not renew the lease of %d call(s) in flight", len(tags), exc_info=True)
                continue
            with self._lock:
                self._tags.difference_update(tag for tag, done in zip(tags, renewed, strict=True) if not done)
