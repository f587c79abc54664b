"""Service events over a kombu topic exchange: providers publish, consumer buses get the keys they bind.

Routing key ``{key}.{path with / as .}.{event}``; body: the JSON of :class:`EventEnvelope`, the service's
``data`` untouched and the routing fields beside it. Consumers bind exact keys, so the broker filters.
Traps of kombu's Redis transport handled here:

- topic routing runs in the publisher, from the set ``_kombu.binding.<exchange>``: ``bind`` writes it before
  returning and the consumer thread re-adds lost members every few seconds (sweep race, Redis restart);
- ``queue_unbind`` never touches that set and ``queue_delete`` only drops bindings its own connection made, so
  unbind, close and ``sweep`` edit the sets and delete the queue lists themselves;
- a restored unacked message is re-routed to every bound queue: broadcast consumers run without ack emulation,
  group consumers keep unacked events under their own keys (Celery's visibility timeout stays untouched).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import kombu.connection
import kombu.entity
import kombu.messaging
import kombu.utils.encoding
from pydantic import BaseModel, Field, ValidationError

from .redis_transport import reuse_sync_clients

__all__ = ["EventBus", "EventEnvelope", "event_context", "routing_key"]

log = logging.getLogger("celery_services.events")

# kombu ships some inline hints but leaves its API unannotated: typed as Any-returning callables here
Connection: Callable[..., Any] = kombu.connection.Connection
Consumer: Callable[..., Any] = kombu.messaging.Consumer
Exchange: Callable[..., Any] = kombu.entity.Exchange
Producer: Callable[..., Any] = kombu.messaging.Producer
Queue: Callable[..., Any] = kombu.entity.Queue
bytes_to_str: Callable[[Any], str] = kombu.utils.encoding.bytes_to_str

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_RETRY: dict[str, Any] = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
_COOLDOWN = (0.5, 5.0)  # after broker errors, publishes fail at once for 0.5 s, doubling up to 5 s
# A busy provider emits many events per second: while the broker is down, one WARNING per event would
# bury everything else, and a single one would hide how much was lost. Counts are reported this often.
_REPORT_INTERVAL = 5.0
_LOCK_TIMEOUT = 1.0
_CONNECT_TIMEOUT = 1.0
_POLL = 0.3  # consumer drain timeout and Redis BRPOP timeout: bounds how long close() waits
_HEAL_INTERVAL = 5.0
_VISIBILITY_TIMEOUT = 300  # group mode on Redis: an event held by a killed consumer comes back after this


class EventEnvelope(BaseModel):
    """One service event on the wire: routing fields beside the payload, never merged into it."""

    key: str
    path: str
    event: str
    data: Any = None
    context: dict[str, Any] = Field(default_factory=dict)


def routing_key(key: str, path: str, event: str) -> str:
    """The routing key ``{key}.{path with / as .}.{event}``.

    Raises:
        ValueError: the key, a path segment or the event does not match ``[A-Za-z0-9_-]+``.
    """
    parts = [key, *path.strip("/").split("/"), event]
    if not all(_NAME.fullmatch(part) for part in parts):
        raise ValueError(f"invalid event address {key!r} {path!r} {event!r}: names match [A-Za-z0-9_-]+")
    return ".".join(parts)


def event_context(context: Any, extra: Iterable[str] = ()) -> dict[str, Any]:
    """The context that travels with an event: ``method``, ``id``, ``params.query``, ``params.provider``.

    Nothing else leaves the provider (no ``user``, ``authentication``, headers or tokens) unless named in
    ``extra`` (the ``event_context`` setting): those params are added under ``params`` when JSON-safe.
    """
    if context is None:
        return {}

    def get(name: str) -> Any:
        return context.get(name) if isinstance(context, dict) else getattr(context, name, None)

    params = get("params") or {}
    kept = {name: params[name] for name in ("query", "provider", *extra) if params.get(name) is not None}
    safe: dict[str, Any] = {}
    for name, value in kept.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        safe[name] = value
    return {"method": get("method"), "id": get("id"), "params": safe}


@dataclass
class _Outage:
    """Events dropped since the broker stopped taking them, and what was reported of them."""

    since: float  # time.time() of the first drop
    error: str = ""  # the last broker error
    dropped: int = 0
    reported: int = 0  # dropped as of the last WARNING
    next_report: float = 0.0  # time.monotonic() before which no WARNING is logged


def _events(count: int) -> str:
    return f"{count} event{'' if count == 1 else 's'}"


class EventBus:
    """Publishes service events and, given ``on_event``, consumes the routing keys bound with :meth:`bind`.

    While the broker is down, events are dropped (publishing never blocks nor raises into a service call):
    a WARNING names how many were dropped since when, at most one every few seconds, another one when
    publishing recovers, and :meth:`close` reports those not yet reported.

    Args:
        broker_url: kombu broker URL (``redis://``, ``amqp://``).
        exchange: name of the durable topic exchange.
        consumer_key: key of the consuming app; needed to bind and consume.
        instance: id of this app instance (default: random); names the broadcast queue.
        delivery: ``broadcast``: a queue per instance, each instance gets every event; ``group``: one durable
            queue per consumer key, each event handled by one instance, kept while the app is down.
        on_event: called with each envelope from the consumer thread, in publish order.
        queue_prefix: prefix of the queue names.

    Attributes:
        published: events the broker took.
        dropped: events not published because the broker could not take them (down, erroring, or a
            publish stuck on it), since the bus was made.
        publish_failures: every event not published: ``dropped`` plus invalid ones (bad names, data that
            cannot be serialized).
        received: events handed to ``on_event``.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        exchange: str = "celery_services.events",
        consumer_key: str | None = None,
        instance: str | None = None,
        delivery: Literal["broadcast", "group"] = "broadcast",
        on_event: Callable[[EventEnvelope], None] | None = None,
        queue_prefix: str = "celery_services.events",
    ) -> None:
        self.instance = instance or uuid.uuid4().hex
        if delivery not in ("broadcast", "group"):
            raise ValueError(f"delivery must be 'broadcast' or 'group', not {delivery!r}")
        for label, value in (("consumer_key", consumer_key), ("instance", self.instance)):
            if value is not None and not _NAME.fullmatch(value):
                raise ValueError(f"{label} {value!r} must match [A-Za-z0-9_-]+")
        if on_event is not None and consumer_key is None:
            raise ValueError("a consuming bus needs a consumer_key")
        self.broker_url, self.consumer_key, self.delivery = broker_url, consumer_key, delivery
        self.on_event, self.queue_prefix = on_event, queue_prefix
        self.exchange = Exchange(exchange, type="topic", durable=True)
        suffix = f".{self.instance}" if delivery == "broadcast" else ""
        self.queue_name: str | None = f"{queue_prefix}.{consumer_key}{suffix}" if consumer_key else None
        self.published = self.publish_failures = self.dropped = self.received = 0
        self._redis = getattr(Connection(broker_url).transport, "driver_type", "") == "redis"
        if self._redis:
            reuse_sync_clients()
        self._bindings: set[str] = set()
        self._bind_lock = threading.RLock()  # guards _bindings and the admin connection
        self._publish_lock, self._count_lock = threading.Lock(), threading.Lock()
        self._producer: Any = None
        self._admin_conn: Any = None
        self._admin_channel: Any = None
        self._declared = self._closed = False
        self._down_until, self._cooldown = 0.0, _COOLDOWN[0]
        self._outage: _Outage | None = None  # guarded by _count_lock
        self._last_error = ""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def bindings(self) -> frozenset[str]:
        """The routing keys this bus wants bound."""
        return frozenset(self._bindings)

    def publish(
        self, key: str, path: str, event: str, data: Any, context: dict[str, Any] | None = None
    ) -> bool:
        """Publish one event; thread-safe, never raises, returns whether the broker took it.

        On a broker error: counts the event in ``dropped`` (and ``publish_failures``), returns False, and
        fails fast for a moment; the drops are reported at WARNING, rate-limited (see the class).
        """
        try:
            key_ = routing_key(key, path, event)
            body = EventEnvelope(key=key, path=path, event=event, data=data, context=context or {})
            payload = body.model_dump_json()
        except Exception as exc:  # bad names, data pydantic cannot serialize
            return self._publish_failed("event %s %s %s not published: %s", key, path, event, exc)
        if time.monotonic() < self._down_until:
            return self._dropped(key_, self._last_error)
        if not self._publish_lock.acquire(timeout=_LOCK_TIMEOUT):
            return self._dropped(key_, "a publish is stuck on it")
        try:
            if self._producer is None:
                conn = self._connection()
                conn.ensure_connection(**_RETRY)
                channel = conn.channel()
                self.exchange(channel).declare()  # once, not re-checked on every publish
                self._producer = Producer(channel, exchange=self.exchange, auto_declare=False)
            self._producer.publish(
                payload,
                routing_key=key_,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                retry=True,
                retry_policy=_RETRY,
            )
            self.published += 1
            self._cooldown = _COOLDOWN[0]
            if self._outage is not None:
                self._recovered()
            return True
        except Exception as exc:
            self._release_producer()
            self._down_until = time.monotonic() + self._cooldown
            self._cooldown = min(self._cooldown * 2, _COOLDOWN[1])
            self._last_error = repr(exc)
            return self._dropped(key_, self._last_error)
        finally:
            self._publish_lock.release()

    def _publish_failed(self, msg: str, *args: Any) -> bool:
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

    def bind(self, key: str, path: str, event: str) -> None:
        """Declare this bus's queue and bind one exact routing key, at the broker before returning.

        Raises:
            ValueError: invalid names, or no ``consumer_key``.
            Exception: the broker's error; the binding stays wanted and the consumer thread applies it on
                (re)connection.
        """
        self._change(routing_key(key, path, event), add=True)

    def unbind(self, key: str, path: str, event: str) -> None:
        """Remove one binding: events published after this returns reach neither queue nor ``on_event``."""
        self._change(routing_key(key, path, event), add=False)

    def _change(self, key: str, add: bool) -> None:
        self._require_queue()
        with self._bind_lock:
            (self._bindings.add if add else self._bindings.discard)(key)
            self._admin(lambda channel: self._apply(channel, [key] if add else [], [] if add else [key]))

    def _require_queue(self) -> str:
        if self.queue_name is None:
            raise ValueError("binding needs a consumer_key")
        return self.queue_name

    def _queue(self, channel: Any) -> Any:
        broadcast = self.delivery == "broadcast"
        return Queue(self.queue_name, durable=not broadcast, auto_delete=broadcast and not self._redis)(
            channel
        )

    def _apply(self, channel: Any, add: Iterable[str], remove: Iterable[str] = ()) -> None:
        """Declare exchange and queue, add and remove bindings; on Redis also in the binding sets."""
        self.exchange(channel).declare()
        queue = self._queue(channel)
        queue.queue_declare()
        self._declared = True
        add, remove = list(add), list(remove)
        for key in add:
            queue.bind_to(self.exchange, key)
        for key in remove:
            queue.unbind_from(self.exchange, key)
        if self._redis:  # kombu skips bindings its connection state knows, and never removes any
            client = _client(channel)
            for table in self._tables(channel):
                if add:
                    client.sadd(table, *[self._member(channel, key) for key in add])
                if remove:
                    client.srem(table, *[self._member(channel, key) for key in remove])

    def _tables(self, channel: Any) -> list[str]:
        names = [channel.keyprefix_queue, getattr(channel, "keyprefix_binding_permanent", None)]
        return [name % (self.exchange.name,) for name in names if name]

    def _member(self, channel: Any, key: str) -> str:
        meta = channel.exchange_types["topic"].prepare_bind(self.queue_name, self.exchange.name, key, None)
        return str(channel.sep.join(meta))

    def _admin(self, operation: Callable[[Any], None]) -> None:
        """Run ``operation(channel)`` on the admin connection (never the consumer's), reconnecting once."""
        for attempt in range(2):
            try:
                if self._admin_channel is None:
                    self._admin_conn = self._connection()
                    self._admin_conn.ensure_connection(**_RETRY)
                    self._admin_channel = self._admin_conn.channel()
                operation(self._admin_channel)
                return
            except Exception:
                self._release_admin()
                if attempt:
                    raise

    def delete_queue(self) -> None:
        """Delete this bus's queue and its bindings now (a group queue otherwise outlives every instance)."""
        name = self._require_queue()
        with self._bind_lock:
            self._admin(lambda channel: self._drop(channel, {name}))

    def sweep(
        self, live_instances: Iterable[str] | Callable[[], Iterable[str]], *, all_keys: bool = False
    ) -> list[str]:
        """Delete the broadcast queues, and bindings, of consumer instances not in ``live_instances``.

        Redis only: there a dead consumer's queue stays bound and grows; RabbitMQ auto-deletes it when the
        consumer's connection goes, and this returns ``[]``. Looks at this bus's consumer key, or at every key
        under ``queue_prefix`` with ``all_keys`` or on a bus without consumer key.

        Args:
            live_instances: the live instance ids, or a function returning them. A function is called
                after the queues are listed: an instance publishes its manifest before it binds its queue,
                so every queue listed belongs to an instance the answer knows, unless it is dead.
            all_keys: look at the queues of every consumer key.

        Returns:
            The names of the deleted queues.
        """
        if not self._redis:
            return []
        prefix, dead = f"{self.queue_prefix}.", set[str]()
        any_key = all_keys or self.consumer_key is None

        def collect(channel: Any) -> None:
            candidates: dict[str, str] = {}
            for member in _client(channel).smembers(channel.keyprefix_queue % (self.exchange.name,)):
                queue = bytes_to_str(member).split(channel.sep)[-1]
                parts = queue[len(prefix) :].split(".") if queue.startswith(prefix) else []
                if (
                    len(parts) == 2
                    and parts[1] != self.instance
                    and (any_key or parts[0] == self.consumer_key)
                ):
                    candidates[queue] = parts[1]
            if not candidates:
                return
            live = set(live_instances() if callable(live_instances) else live_instances)
            dead.update(queue for queue, instance in candidates.items() if instance not in live)
            if dead:
                self._drop(channel, dead)

        with self._bind_lock:
            self._admin(collect)
        if dead:
            log.info("swept event queues of dead consumers: %s", sorted(dead))
        return sorted(dead)

    def _drop(self, channel: Any, queues: set[str]) -> None:
        if not self._redis:
            for queue in queues:
                channel.queue_delete(queue)
            return
        client = _client(channel)
        for table in self._tables(channel):
            if members := [
                m for m in client.smembers(table) if bytes_to_str(m).split(channel.sep)[-1] in queues
            ]:
                client.srem(table, *members)
        client.delete(*[channel._q_for_pri(queue, pri) for queue in queues for pri in channel.priority_steps])

    def start(self) -> None:
        """Start the consumer thread (no-op without ``on_event``, when started or closed)."""
        if self.on_event is None or self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._run, name=f"events:{self.queue_name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            conn = self._connection(consumer=True)
            try:
                if self._redis:  # no transport option; set before connecting, as channels are pooled
                    conn.transport.brpop_timeout = _POLL
                conn.ensure_connection(**_RETRY)
                channel = conn.channel()
                with self._bind_lock:
                    self._apply(channel, sorted(self._bindings))
                consumer = Consumer(
                    channel,
                    queues=[self._queue(channel)],
                    callbacks=[self._on_message],
                    accept=["json"],
                    prefetch_count=1 if self.delivery == "group" else 100,
                    auto_declare=False,
                    on_decode_error=self._on_decode_error,
                )
                consumer.consume()
                delay, heal_at = 0.1, time.monotonic() + _HEAL_INTERVAL
                while not self._stopping.is_set():
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=_POLL)
                    conn.heartbeat_check()
                    if self._redis and time.monotonic() >= heal_at:
                        self._heal(channel)
                        heal_at = time.monotonic() + _HEAL_INTERVAL
                if not self._redis:  # else an event arriving while the connection closes is acked too late
                    consumer.cancel()  # (Redis: close() reads the BRPOP in flight itself; cancelling first
                    # would make kombu requeue that event through the exchange, to every bound queue)
            except Exception as exc:
                if self._stopping.is_set():
                    break
                log.warning("event consumer %s: %r; reconnecting in %.1f s", self.queue_name, exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                _quietly(conn.release)

    def _heal(self, channel: Any) -> None:
        """Re-add this queue's Redis bindings should they have vanished."""
        if self._bindings and self._bind_lock.acquire(blocking=False):
            try:
                members = [self._member(channel, key) for key in self._bindings]
                client = _client(channel)
                if added := sum(client.sadd(table, *members) for table in self._tables(channel)):
                    log.warning("event queue %s: re-added %d lost bindings", self.queue_name, added)
            finally:
                self._bind_lock.release()

    def _on_message(self, body: Any, message: Any) -> None:
        if message.delivery_info.get("routing_key") in self._bindings:  # else unbound meanwhile: drop
            try:
                envelope = EventEnvelope.model_validate(body)
            except ValidationError as exc:
                log.warning("event queue %s: bad envelope dropped: %s", self.queue_name, exc)
            else:
                self.received += 1
                try:
                    if self.on_event is not None:
                        self.on_event(envelope)
                except Exception:
                    log.exception(
                        "event handler failed on %s %s %s", envelope.key, envelope.path, envelope.event
                    )
        message.ack()

    def _on_decode_error(self, message: Any, exc: Exception) -> None:
        log.warning("event queue %s: undecodable message dropped: %r", self.queue_name, exc)
        message.ack()

    def _connection(self, *, consumer: bool = False) -> Any:
        options: dict[str, Any] = dict(_RETRY)  # max_retries also bounds kombu's implicit reconnections
        if self._redis:
            options |= {
                "socket_timeout": 5.0 if consumer else _CONNECT_TIMEOUT,
                "socket_connect_timeout": _CONNECT_TIMEOUT,
            }
            if consumer:
                unacked = f"{self.queue_prefix}.unacked"
                options |= {
                    "client_name": self.queue_name,
                    "ack_emulation": self.delivery == "group",
                    "unacked_key": unacked,
                    "unacked_index_key": f"{unacked}_index",
                    "unacked_mutex_key": f"{unacked}_mutex",
                    "visibility_timeout": _VISIBILITY_TIMEOUT,
                }
        return Connection(
            self.broker_url,
            connect_timeout=_CONNECT_TIMEOUT,
            heartbeat=30 if consumer else 0,
            transport_options=options,
        )

    def _stop_consumer(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _release_producer(self) -> None:
        if self._producer is not None:
            _quietly(self._producer.connection.release)
        self._producer = None

    def _release_admin(self) -> None:
        if self._admin_conn is not None:
            _quietly(self._admin_conn.release)
        self._admin_conn = self._admin_channel = None

    def _release_connections(self) -> None:
        with self._publish_lock:
            self._release_producer()
        with self._bind_lock:
            self._release_admin()

    def close(self) -> None:
        """Stop the consumer, delete the broadcast queue (on Redis with its bindings), release connections."""
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
        self._stop_consumer()
        if self._declared and self.delivery == "broadcast" and self.queue_name:
            try:
                self.delete_queue()
            except Exception as exc:
                log.warning("event queue %s not deleted: %r", self.queue_name, exc)
        self._release_connections()


def _clock(stamp: float) -> str:
    """``time.time()`` as local ``HH:MM:SS.mmm``, for log lines."""
    return time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp % 1 * 1000):03d}"


def _client(channel: Any) -> Any:
    """A pooled Redis client of ``channel``; never ``channel.client``, whose connection may be in a BRPOP."""
    with channel.conn_or_acquire() as client:
        return client


def _quietly(release: Callable[[], Any]) -> None:
    try:
        release()
    except Exception as exc:
        log.debug("ignored while releasing: %r", exc)
