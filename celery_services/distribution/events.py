"""Service events over a kombu topic exchange: the wire format, and :class:`EventBus`, the bus apps hold.

Routing key ``{key}.{path with / as .}.{event}``; body: the JSON of :class:`EventEnvelope`, the service's
``data`` untouched and the routing fields beside it. Consumers bind exact keys, so the broker filters.

The bus is split in three modules, and only this one knows the wire format:

- here: :class:`EventEnvelope`, :func:`routing_key`, :func:`event_context`, :class:`Broker` (the one place
  kombu connections are built, for both halves) and :class:`EventBus`;
- :mod:`.event_publisher`: :class:`~.event_publisher.EventPublisher`, the producer connection, its retry
  policy and cooldown, and the count and rate-limited report of dropped events;
- :mod:`.event_consumer`: :class:`~.event_consumer.EventConsumer`, the queue, its bindings, the sweep of dead
  consumers' queues and the consumer thread, with the traps of kombu's Redis transport it works around;
- :mod:`.event_epoch`: :class:`~.event_epoch.BindingEpoch`, which lets a RabbitMQ publisher skip the events
  nobody is bound for, as the publisher does on Redis.

``EventBus`` owns one of each half and delegates: it turns ``(key, path, event, data)`` into a routing key
and a JSON body for the publisher, and the bodies the consumer receives back into envelopes for
``on_event``. The halves move routing keys and JSON bodies and never import this module at run time, so the
imports run one way: this module imports them.

One piece, past 300 lines: the wire format and the bus that owns both halves; most of its length is the bus's
delegating interface, kept so callers hold one object.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import kombu.connection
import kombu.entity
from pydantic import BaseModel, Field, ValidationError

from .event_consumer import EventConsumer
from .event_epoch import BindingEpoch
from .event_publisher import EventPublisher
from .observability import deliver, hooks, publish
from .protocol import dumps
from .redis_transport import reuse_sync_clients

__all__ = ["Broker", "EventBus", "EventEnvelope", "event_context", "routing_key"]

# One logger for the whole bus, whichever of its modules logs: operators and tests filter on this name.
log = logging.getLogger("celery_services.events")

# kombu ships some inline hints but leaves its API unannotated: typed as Any-returning callables here
Connection: Callable[..., Any] = kombu.connection.Connection
Exchange: Callable[..., Any] = kombu.entity.Exchange

_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Shared by both halves, through Broker: connecting, publishing, and every admin or consumer connection.
_RETRY: dict[str, Any] = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
_CONNECT_TIMEOUT = 1.0


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
    ``extra`` (the ``event_context`` setting): those params are added under ``params`` when they have a
    JSON form, the one a call would give them (:func:`.protocol.dumps`: a date travels as ISO 8601).
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
            dumps(value)
        except ValueError:
            continue
        safe[name] = value
    return {"method": get("method"), "id": get("id"), "params": safe}


class Broker:
    """How a bus reaches its broker: the URL, whether it is Redis, and every kombu connection of both halves.

    Connections get bounded retries (``max_retries`` also bounds kombu's implicit reconnections) and
    explicit timeouts, never the client's defaults. ``url`` may change (a bus pointed at another broker):
    connections made afterwards use it.
    """

    retry_policy: Mapping[str, Any] = _RETRY

    def __init__(
        self, url: str, *, transport_options: Mapping[str, Any] | None = None, ssl: Any = None
    ) -> None:
        self.url = url
        # What the URL cannot say: a Sentinel master's name (``master_name``), TLS files (kombu's ``ssl``).
        self.transport_options = dict(transport_options or {})
        self.ssl = ssl
        self.redis = getattr(Connection(url).transport, "driver_type", "") == "redis"
        if self.redis:
            reuse_sync_clients()

    def connection(
        self,
        *,
        heartbeat: int = 0,
        socket_timeout: float = _CONNECT_TIMEOUT,
        redis_options: Mapping[str, Any] | None = None,
    ) -> Any:
        """A new kombu Connection, not yet connected (``ensure_connection(**retry_policy)`` connects it).

        Args:
            heartbeat: AMQP heartbeat in seconds (0: none).
            socket_timeout: Redis read timeout (connecting always times out after a second).
            redis_options: more Redis transport options.
        """
        options: dict[str, Any] = dict(_RETRY) | self.transport_options
        if self.redis:
            options |= {"socket_timeout": socket_timeout, "socket_connect_timeout": _CONNECT_TIMEOUT}
            # Events are JSON text: kept as text in the message (every kombu consumer reads it) rather than
            # base64, whose passes cost more than the JSON itself for a large event.
            options |= {"body_encoding": "utf-8"}
            options |= redis_options or {}
        return Connection(
            self.url,
            connect_timeout=_CONNECT_TIMEOUT,
            heartbeat=heartbeat,
            transport_options=options,
            ssl=self.ssl or False,
        )

    @staticmethod
    def release(connection: Any) -> None:
        """Release ``connection``, logging (DEBUG) rather than raising what releasing a broken one raises."""
        try:
            connection.release()
        except Exception as exc:
            log.debug("ignored while releasing: %r", exc)

    @staticmethod
    def drop(connection: Any) -> None:
        """Let go of a failed ``connection`` without a word to its broker (which may answer nothing, and
        py-amqp waits for a close's answer for ever), logging (DEBUG) rather than raising."""
        try:
            connection.collect()
        except Exception as exc:
            log.debug("ignored while dropping: %r", exc)


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
        transport_options: more kombu transport options (a Sentinel's ``master_name``).
        ssl: kombu's ``ssl`` option (for ``rediss://``: redis-py's ``ssl_*`` keywords).
        epoch: on RabbitMQ, the exchange's binding epoch, shared by every bus of the exchange (the
            registry's Redis): with it, events nobody is bound for are not sent (:mod:`.event_epoch`);
            without it, every event is. Closed with the bus; ignored on Redis.

    Attributes:
        published: events the broker took.
        dropped: events not published because the broker could not take them (down, erroring, or a
            publish stuck on it), since the bus was made.
        publish_failures: every event not published: ``dropped`` plus invalid ones (bad names, data that
            cannot be serialized).
        unheard: events not sent since no queue was bound for them: on Redis the bus asks the binding set
            kombu routes by before it encodes an event, on RabbitMQ (given an ``epoch``) it skips a key
            RabbitMQ returned; so data that cannot be serialized counts in ``publish_failures`` only once
            someone listens.
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
        transport_options: Mapping[str, Any] | None = None,
        ssl: Any = None,
        epoch: BindingEpoch | None = None,
    ) -> None:
        instance = instance or uuid.uuid4().hex
        if delivery not in ("broadcast", "group"):
            raise ValueError(f"delivery must be 'broadcast' or 'group', not {delivery!r}")
        for label, value in (("consumer_key", consumer_key), ("instance", instance)):
            if value is not None and not _NAME.fullmatch(value):
                raise ValueError(f"{label} {value!r} must match [A-Za-z0-9_-]+")
        if on_event is not None and consumer_key is None:
            raise ValueError("a consuming bus needs a consumer_key")
        self.on_event = on_event
        self.received = 0
        self._broker = Broker(broker_url, transport_options=transport_options, ssl=ssl)
        self._exchange = Exchange(exchange, type="topic", durable=True)
        self._epoch = epoch
        self._publisher = EventPublisher(self._broker, self._exchange, epoch)
        self._consumer = EventConsumer(
            self._broker,
            self._exchange,
            consumer_key=consumer_key,
            instance=instance,
            delivery=delivery,
            queue_prefix=queue_prefix,
            handle=self._deliver,
            epoch=epoch,
        )

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Configuration: one copy, held by the part that uses it.

    @property
    def broker_url(self) -> str:
        """The broker URL; setting it points the connections made from then on at another broker."""
        return self._broker.url

    @broker_url.setter
    def broker_url(self, url: str) -> None:
        self._broker.url = url

    @property
    def exchange(self) -> Any:
        """The kombu topic exchange (durable) both halves use."""
        return self._exchange

    @property
    def consumer_key(self) -> str | None:
        return self._consumer.consumer_key

    @property
    def instance(self) -> str:
        return self._consumer.instance

    @property
    def delivery(self) -> Literal["broadcast", "group"]:
        return self._consumer.delivery

    @property
    def queue_prefix(self) -> str:
        return self._consumer.queue_prefix

    @property
    def queue_name(self) -> str | None:
        """``{queue_prefix}.{consumer_key}.{instance}`` (broadcast) or ``{queue_prefix}.{consumer_key}``."""
        return self._consumer.queue_name

    # Counters of the publishing half.

    @property
    def published(self) -> int:
        return self._publisher.published

    @property
    def dropped(self) -> int:
        return self._publisher.dropped

    @property
    def publish_failures(self) -> int:
        return self._publisher.publish_failures

    @property
    def unheard(self) -> int:
        return self._publisher.unheard

    # Publishing.

    def publish(
        self,
        key: str,
        path: str,
        event: str,
        data: Any,
        context: dict[str, Any] | None = None,
        *,
        headers: dict[str, Any] | None = None,
    ) -> bool:
        """Publish one event; thread-safe, never raises, returns whether the broker took it (``True`` too
        when nobody was bound for it: nothing sent, nothing lost; counted in ``unheard``).

        On a broker error: counts the event in ``dropped`` (and ``publish_failures``), returns False, and
        fails fast for a moment; the drops are reported at WARNING, rate-limited (see the class).
        ``headers``: the event's trace context, when taken earlier than now (default, with tracing on: the
        current one; see :mod:`.observability`).
        """
        try:
            key_ = routing_key(key, path, event)
        except ValueError as exc:
            return self._publisher.reject("event %s %s %s not published: %s", key, path, event, exc)

        def payload() -> str:  # made only if someone is bound for the event (on Redis: see the publisher)
            body = EventEnvelope(key=key, path=path, event=event, data=data, context=context or {})
            return body.model_dump_json()

        if hooks.on:  # tracing or metrics: the trace context in its headers, counted (observability.py)
            return publish(self._publisher.publish, key_, payload, (key, path, event), headers)
        return self._publisher.publish(key_, payload, headers)

    # Consuming.

    @property
    def bindings(self) -> frozenset[str]:
        """The routing keys this bus wants bound."""
        return self._consumer.bindings

    def bind(self, key: str, path: str, event: str) -> None:
        """Declare this bus's queue and bind one exact routing key, at the broker before returning.

        Raises:
            ValueError: invalid names, or no ``consumer_key``.
            Exception: the broker's error; the binding stays wanted and the consumer thread applies it on
                (re)connection, and on RabbitMQ within a few seconds while its own connection is fine.
        """
        self._consumer.bind(routing_key(key, path, event))

    def unbind(self, key: str, path: str, event: str) -> None:
        """Remove one binding: events published after this returns reach neither queue nor ``on_event``."""
        self._consumer.unbind(routing_key(key, path, event))

    def delete_queue(self) -> None:
        """Delete this bus's queue and its bindings now (a group queue otherwise outlives every instance)."""
        self._consumer.delete_queue()

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
        return self._consumer.sweep(live_instances, all_keys=all_keys)

    def start(self) -> None:
        """Start the consumer thread (no-op without ``on_event``, when started or closed)."""
        if self.on_event is not None:
            self._consumer.start()

    def _deliver(self, body: Any, headers: Any = None) -> None:
        """The consumer's ``handle``: one bound message's body, as an envelope, to ``on_event``.

        Never raises (a bad envelope or a failing handler is logged): the consumer acks the message after.
        """
        try:
            envelope = EventEnvelope.model_validate(body)
        except ValidationError as exc:
            log.warning("event queue %s: bad envelope dropped: %s", self.queue_name, exc)
            return
        self.received += 1
        try:
            if self.on_event is not None and hooks.on:  # in the publisher's trace, counted
                deliver(self.on_event, envelope, headers)
            elif self.on_event is not None:
                self.on_event(envelope)
        except Exception:
            log.exception("event handler failed on %s %s %s", envelope.key, envelope.path, envelope.event)

    # Ending.

    def _stop_consumer(self) -> None:
        """Stop the consumer thread only (no queue deletion): what a process that dies leaves behind."""
        self._consumer.stop()

    def _release_connections(self) -> None:
        """Release the producer and admin connections (made again if the bus is used afterwards)."""
        self._publisher.release()
        self._consumer.release()

    def close(self) -> None:
        """Stop the consumer, delete the broadcast queue (on Redis with its bindings), release connections.

        Reports the dropped events the last WARNING did not count. Idempotent.
        """
        self._consumer.close()
        self._publisher.close()
        if self._epoch is not None:
            self._epoch.close()
