"""Leases on calls in flight, and the prompt redelivery of calls a dead or paused replica held (Redis broker).

Kombu's Redis transport keeps every unacknowledged message of a database in one hash (``unacked``) with
one index (``unacked_index``), and any worker on that database gives back whatever is older than *its own*
``visibility_timeout``. A short timeout would make every late-ack task of every app sharing the database
run again, so the library leaves Celery's default (one hour) alone and redelivers only its own calls:

- the worker that received a call writes a lease for its delivery tag in ``{prefix}:leases:{key}`` (a
  sorted set, score = last renewal by the broker's clock) and renews it every third of
  :attr:`LeaseKeeper.lease_timeout` while kombu's unacked hash still holds the tag (an acknowledged
  call's lease is dropped);
- every worker of the key looks, at the same pace, for leases older than ``lease_timeout``: their holder is
  dead or paused. One atomic script moves such a message from kombu's unacked hash back to the front of the
  key's queue, with a new delivery tag (the paused holder's late ack then removes nothing of the new
  delivery) and the header ``cs_redelivered`` counting redeliveries.

Only tags leased under this key are ever touched: other apps' messages, in flight or not, are left to Celery.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import redis

from .messages import HEADER_REDELIVERED, KEEP, mark_redelivered
from .redis_clients import RedisOptions, is_redis, redis_client

if TYPE_CHECKING:
    from celery import Celery

    from .settings import DistributionSettings

__all__ = ["HEADER_REDELIVERED", "LeaseKeeper", "lease_keeper"]

log = logging.getLogger("celery_services.lease")


# Renews the leases of the tags still unacknowledged; returns those (the others were acked: forgotten).
# Stamped by Redis's clock, the one every replica judges by: a host's own clock may be off by more than a
# lease (scripts replicate their effects, so reading TIME before writing is allowed).
_RENEW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local alive = {}
for i = 2, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[2], now, ARGV[i])
    alive[#alive + 1] = ARGV[i]
  else
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
-- ARGV[1]: as long as Celery keeps an unacknowledged message (messages.KEEP): the set of a key whose
-- replicas are all gone for good goes too.
if #alive > 0 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return alive
"""

# Gives one lapsed call back to its queue, unless its lease was renewed or the call acked meanwhile.
_RESTORE = """
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[3])
return 1
"""


class LeaseKeeper:
    """Leases the calls this worker process holds, and redelivers the lapsed calls of its key.

    Args:
        broker_url: the Redis broker.
        key: the app key; its queue is the list ``{global_keyprefix}{key}``.
        lease_timeout: seconds without renewal after which a call's holder is taken for dead.
        prefix: the registry prefix naming the lease set.
        transport_options: Celery's ``broker_transport_options`` (``global_keyprefix``, ``unacked_key`` …).
        redis_options: the Sentinel master and TLS files of the broker's Redis.
    """

    def __init__(
        self,
        broker_url: str,
        key: str,
        lease_timeout: float,
        *,
        prefix: str,
        transport_options: dict[str, Any] | None = None,
        redis_options: RedisOptions | None = None,
    ) -> None:
        options = transport_options or {}
        keyprefix = str(options.get("global_keyprefix") or "")
        self.lease_timeout = lease_timeout
        self.interval = max(lease_timeout / 3, 0.05)
        self.unacked = keyprefix + str(options.get("unacked_key", "unacked"))
        self.index = keyprefix + str(options.get("unacked_index_key", "unacked_index"))
        self.queue = keyprefix + key
        self.leases = f"{prefix}:leases:{key}"
        self.restored = 0
        self._url = broker_url
        self._redis_options = redis_options
        self._tags: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None

    def start(self) -> None:
        """Start renewing and restoring in this process (idempotent; call it where the consumer runs)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            # Every command is short: a bounded socket timeout, so a dead Redis never parks the thread.
            timeout = max(self.interval, 1.0)
            self._client = redis_client(
                self._url, self._redis_options, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="celery-services-lease", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread; leases left behind lapse and other replicas redeliver their calls."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None
        if self._client is not None:
            self._client.close()

    def hold(self, tag: str) -> None:
        """Lease ``tag`` from now until its message is acknowledged (the thread writes it at once)."""
        if self._thread is None:  # a worker whose ready signal we did not see (an embedded test worker)
            self.start()
        with self._lock:
            self._tags.add(tag)
        self._wake.set()

    def _run(self) -> None:
        client = self._client
        assert client is not None
        renew, restore = client.register_script(_RENEW), client.register_script(_RESTORE)
        next_scan = 0.0
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self._renew(renew)
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + self.interval
                    self._restore_lapsed(client, restore)
            except redis.RedisError as exc:
                log.warning("leases of calls in flight not renewed: %r; retrying", exc)
                self._stop.wait(self.interval)

    def _renew(self, renew: Any) -> None:
        with self._lock:
            tags = list(self._tags)
        if not tags:
            return
        alive = {_text(tag) for tag in renew(keys=[self.unacked, self.leases], args=[KEEP, *tags])}
        with self._lock:
            self._tags.difference_update(tag for tag in tags if tag not in alive)

    def _restore_lapsed(self, client: redis.Redis, restore: Any) -> None:
        seconds, micros = client.time()  # by the clock the leases were stamped with
        cutoff = seconds + micros / 1e6 - self.lease_timeout
        with self._lock:
            mine = set(self._tags)
        lapsed = [
            tag
            for tag in map(_text, client.zrangebyscore(self.leases, "-inf", cutoff, start=0, num=100))
            if tag not in mine  # ours are renewed by this very thread: only a stall made them look old
        ]
        if not lapsed:
            return
        for tag, raw in zip(lapsed, client.hmget(self.unacked, lapsed), strict=True):
            payload = _redelivery(raw)
            if payload is None:  # acked meanwhile, or not a message we can read: drop the lease only
                client.zrem(self.leases, tag)
                continue
            if restore(keys=[self.unacked, self.index, self.leases, self.queue], args=[tag, cutoff, payload]):
                self.restored += 1
                log.warning("call %s of a dead or paused replica given back to queue %s", tag, self.queue)


def lease_keeper(celery: Celery, settings: DistributionSettings) -> LeaseKeeper | None:
    """The lease keeper of a distribution (``None`` on AMQP: it gives a dead consumer's calls back)."""
    broker = str(celery.conf.broker_url or "")
    if not is_redis(broker):
        return None
    return LeaseKeeper(
        broker,
        settings.key,
        settings.resolved_lease_timeout(),
        prefix=settings.registry_prefix,
        transport_options=dict(celery.conf.broker_transport_options or {}),
        redis_options=RedisOptions.of(settings),
    )


def _redelivery(raw: Any) -> str | None:
    """The message of an unacked entry ``[message, exchange, routing_key]``, ready to be queued again."""
    if raw is None:
        return None
    try:
        return json.dumps(mark_redelivered(json.loads(raw)[0]))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        log.warning("unreadable unacked message left to Celery's own restore", exc_info=True)
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
