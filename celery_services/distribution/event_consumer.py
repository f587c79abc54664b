"""The consuming half of the event bus: the queue, its bindings, and the thread that drains it.

:class:`EventConsumer` is owned by :class:`~.events.EventBus`, which holds the wire format: the consumer
binds routing keys the bus computed and hands the JSON body of each message whose key is bound to the bus's
handler, which makes the envelope. Its connections come from the bus's :class:`~.events.Broker`, like the
publisher's: an admin connection (declare, bind, unbind, delete, sweep; never the consumer's, which is busy
draining) and, in the thread, the consumer's own.

Traps of kombu's Redis transport handled here:

- topic routing runs in the publisher, from the set ``_kombu.binding.<exchange>``: :meth:`~EventConsumer.bind`
  writes it before returning and the consumer thread re-adds lost members every few seconds (sweep race,
  Redis restart): :meth:`~EventConsumer._apply`, :meth:`~EventConsumer._heal`;
- ``queue_unbind`` never touches that set and ``queue_delete`` only drops bindings its own connection made, so
  unbind, close and :meth:`~EventConsumer.sweep` edit the sets and delete the queue lists themselves
  (:meth:`~EventConsumer._apply`, :meth:`~EventConsumer._drop`);
- a restored unacked message is re-routed through its exchange, to every bound queue: broadcast consumers run
  without ack emulation; each group queue keeps its unacked events under keys of its own (Celery's visibility
  timeout stays untouched), and gives them back to itself alone: :meth:`~EventConsumer._connection`,
  :func:`_give_back_to`.

On RabbitMQ, once bindings are added at the broker, :meth:`~EventConsumer._apply` starts a new binding epoch
(:mod:`.event_epoch`): publishers that skip a key RabbitMQ returned to them send its events again. A bind or
unbind the admin connection could not make at the broker is made by the consumer thread, on its own channel,
within a heal interval (both brokers): :meth:`~EventConsumer._heal`.

One piece, past 300 lines: the queue, its bindings (at the broker and in kombu's Redis tables) and the thread
draining it must agree on one state under one lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import kombu.entity
import kombu.messaging
import kombu.utils.encoding

from .heartbeats import Line, keep

if TYPE_CHECKING:
    from .event_epoch import BindingEpoch
    from .events import Broker

__all__ = ["EventConsumer"]

log = logging.getLogger("celery_services.events")  # the bus's one logger (see events.py)

# kombu ships some inline hints but leaves its API unannotated: typed as Any-returning callables here
Consumer: Callable[..., Any] = kombu.messaging.Consumer
Queue: Callable[..., Any] = kombu.entity.Queue
bytes_to_str: Callable[[Any], str] = kombu.utils.encoding.bytes_to_str

_POLL = 0.3  # consumer drain timeout and Redis BRPOP timeout: bounds how long close() waits
_HEAL_INTERVAL = 5.0
_VISIBILITY_TIMEOUT = 300  # group mode on Redis: an event held by a killed consumer comes back after this
#: RabbitMQ: the consumer connection's AMQP heartbeat, in seconds. A broker cut off is seen in two or three of
#: them; a listener running longer keeps the connection, as a keeper thread beats for it (:mod:`.heartbeats`).
#: It was 30 s while nothing beat during a listener: a broker cut off was seen a minute late.
_HEARTBEAT = 10


class EventConsumer:
    """The queue of one consumer app instance (or group), its bindings, and the thread consuming it.

    Args:
        broker: where the broker is and how to connect to it (shared with the publishing half).
        exchange: the kombu topic exchange the queue is bound to.
        consumer_key: key of the consuming app; without it there is no queue (only :meth:`sweep` works).
        instance: id of this app instance; names the broadcast queue.
        delivery: ``broadcast`` (a queue per instance) or ``group`` (one durable queue per consumer key).
        queue_prefix: prefix of the queue names.
        handle: called from the consumer thread with the decoded JSON body and the headers of each message
            whose routing key is bound, in queue order; must not raise (the message is acked after it
            returns).
        epoch: on RabbitMQ, the exchange's binding epoch, advanced once bindings are added at the broker
            (:mod:`.event_epoch`).
    """

    def __init__(
        self,
        broker: Broker,
        exchange: Any,
        *,
        consumer_key: str | None,
        instance: str,
        delivery: Literal["broadcast", "group"],
        queue_prefix: str,
        handle: Callable[[Any, Any], None],
        epoch: BindingEpoch | None = None,
    ) -> None:
        self.broker, self.exchange, self.epoch = broker, exchange, epoch
        self.consumer_key, self.instance, self.delivery = consumer_key, instance, delivery
        self.queue_prefix, self.handle = queue_prefix, handle
        suffix = f".{instance}" if delivery == "broadcast" else ""
        self.queue_name: str | None = f"{queue_prefix}.{consumer_key}{suffix}" if consumer_key else None
        self._bindings: set[str] = set()
        #: Routing key -> bound or not: the changes a bind() or unbind() could not make at the broker, which
        #: the consumer thread makes. (On Redis a wanted binding is also a member of kombu's sets, which the
        #: heal re-adds whatever the cause.)
        self._unapplied: dict[str, bool] = {}
        self._bind_lock = threading.RLock()  # guards _bindings, _unapplied and the admin connection
        #: Consumer thread only: while the heal applies bindings on its channel, the events RabbitMQ delivers
        #: meanwhile (py-amqp hands them over while it waits for the broker's answer), held for after it.
        self._held: list[tuple[Any, Any]] | None = None
        self._admin_conn: Any = None
        self._admin_channel: Any = None
        self._declared = self._closed = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: On RabbitMQ, the consumer thread's connection while it has one: beaten while a listener runs.
        self._line: Line | None = None

    @property
    def bindings(self) -> frozenset[str]:
        """The routing keys this consumer wants bound."""
        return frozenset(self._bindings)

    def bind(self, routing_key: str) -> None:
        """Declare the queue and bind ``routing_key``, at the broker before returning.

        Raises:
            ValueError: no ``consumer_key``.
            Exception: the broker's error; the binding stays wanted and the consumer thread applies it on
                (re)connection, and on RabbitMQ within a heal interval while its own connection is fine.
        """
        self._change(routing_key, add=True)

    def unbind(self, routing_key: str) -> None:
        """Remove one binding: messages published after this returns reach neither queue nor ``handle``."""
        self._change(routing_key, add=False)

    def _change(self, key: str, add: bool) -> None:
        self._require_queue()
        with self._bind_lock:
            (self._bindings.add if add else self._bindings.discard)(key)
            # Marked before trying: should the broker refuse, nothing else would ever make the change (a
            # reconnection applies only the wanted bindings, and a binding no longer wanted stays bound).
            self._unapplied[key] = add
            self._admin(lambda channel: self._apply(channel, [key] if add else [], [] if add else [key]))
            del self._unapplied[key]

    def _require_queue(self) -> str:
        if self.queue_name is None:
            raise ValueError("binding needs a consumer_key")
        return self.queue_name

    def _queue(self, channel: Any) -> Any:
        broadcast = self.delivery == "broadcast"
        return Queue(self.queue_name, durable=not broadcast, auto_delete=broadcast and not self.broker.redis)(
            channel
        )

    def _apply(self, channel: Any, add: Iterable[str], remove: Iterable[str] = ()) -> None:
        """Declare exchange and queue, add and remove bindings; on Redis also in the binding sets, on
        RabbitMQ then a new binding epoch (publishers skipping a key nobody took send it again)."""
        self.exchange(channel).declare()
        queue = self._queue(channel)
        queue.queue_declare()
        self._declared = True
        add, remove = list(add), list(remove)
        for key in add:
            queue.bind_to(self.exchange, key)
        for key in remove:
            queue.unbind_from(self.exchange, key)
        if self.broker.redis:  # kombu skips bindings its connection state knows, and never removes any
            client = _client(channel)
            for table in self._tables(channel):
                if add:
                    client.sadd(table, *[self._member(channel, key) for key in add])
                if remove:
                    client.srem(table, *[self._member(channel, key) for key in remove])
        elif add and self.epoch is not None:
            self.epoch.advance()

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
                    self._admin_conn = self.broker.connection()
                    self._admin_conn.ensure_connection(**self.broker.retry_policy)
                    self._admin_channel = self._admin_conn.channel()
                operation(self._admin_channel)
                return
            except Exception:
                self._release_admin()
                if attempt:
                    raise

    def delete_queue(self) -> None:
        """Delete the queue and its bindings now (a group queue otherwise outlives every instance).

        Raises:
            ValueError: no ``consumer_key``.
        """
        name = self._require_queue()
        with self._bind_lock:
            self._admin(lambda channel: self._drop(channel, {name}))

    def sweep(
        self, live_instances: Iterable[str] | Callable[[], Iterable[str]], *, all_keys: bool = False
    ) -> list[str]:
        """Delete the broadcast queues, and bindings, of consumer instances not in ``live_instances``.

        Redis only (RabbitMQ auto-deletes a dead consumer's queue: ``[]``); see :meth:`.EventBus.sweep`.
        ``live_instances``, when a function, is called after the queues are listed.

        Returns:
            The names of the deleted queues.
        """
        if not self.broker.redis:
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
        """Delete ``queues``; on Redis their members of the binding sets and their lists, by hand."""
        if not self.broker.redis:
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
        """Start the consumer thread (no-op when started or closed)."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._run, name=f"events:{self.queue_name}", daemon=True)
        self._thread.start()
        if not self.broker.redis:
            name = f"events-heartbeat:{self.queue_name}"
            threading.Thread(target=self._keep, name=name, daemon=True).start()

    def _keep(self) -> None:
        """Beat for the consumer thread while a listener runs (its own loop beats between messages)."""
        keep(self._stopping, _HEARTBEAT, lambda: [line] if (line := self._line) is not None else [])

    def _run(self) -> None:
        delay, redis = 0.1, self.broker.redis
        while not self._stopping.is_set():
            conn = self._connection()
            try:
                if redis:  # no transport option; set before connecting, as channels are pooled
                    conn.transport.brpop_timeout = _POLL
                conn.ensure_connection(**self.broker.retry_policy)
                if not redis:  # its waits bounded from here (py-amqp's are not), beaten while a listener runs
                    self._line = Line(conn.connection)
                channel = conn.channel()
                if redis and self.delivery == "group":
                    _give_back_to(channel, self._require_queue())
                with self._bind_lock:
                    self._apply(channel, sorted(self._bindings), self._unbinding())
                    self._unapplied.clear()
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
                    if time.monotonic() >= heal_at:
                        self._heal(channel)
                        heal_at = time.monotonic() + _HEAL_INTERVAL
                if not redis:  # else an event arriving while the connection closes is acked too late
                    consumer.cancel()  # (Redis: close() reads the BRPOP in flight itself; cancelling first
                    # would make kombu requeue that event through the exchange, to every bound queue)
            except Exception as exc:
                self._line = None
                # Dropped, not closed: a broker cut off answers no close, which py-amqp would wait for.
                self.broker.drop(conn)
                if self._stopping.is_set():
                    break
                log.warning("event consumer %s: %r; reconnecting in %.1f s", self.queue_name, exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
            else:
                self._line = None
                self.broker.release(conn)

    def _connection(self) -> Any:
        """The consumer thread's connection: AMQP heartbeats; on Redis, the options of the traps above."""
        unacked = f"{self.queue_name}.unacked"  # only this queue's consumers restore what it holds
        return self.broker.connection(
            heartbeat=_HEARTBEAT,
            socket_timeout=5.0,
            redis_options={
                "client_name": self.queue_name,
                # A restored unacked message is re-routed to every bound queue: broadcast consumers run
                # without ack emulation; a group queue keeps its unacked events under keys of its own.
                "ack_emulation": self.delivery == "group",
                "unacked_key": unacked,
                "unacked_index_key": f"{unacked}_index",
                "unacked_mutex_key": f"{unacked}_mutex",
                "visibility_timeout": _VISIBILITY_TIMEOUT,
            },
        )

    def _unbinding(self) -> list[str]:
        return sorted(key for key, bound in self._unapplied.items() if not bound)

    def _heal(self, channel: Any) -> None:
        """Make the changes a bind() or unbind() could not (the consumer's connection may be fine while the
        admin connection failed); on Redis, re-add this queue's bindings should they have vanished."""
        self._apply_unapplied(channel)
        if self.broker.redis and self._bindings and self._bind_lock.acquire(blocking=False):
            try:
                members = [self._member(channel, key) for key in self._bindings]
                client = _client(channel)
                if added := sum(client.sadd(table, *members) for table in self._tables(channel)):
                    log.warning("event queue %s: re-added %d lost bindings", self.queue_name, added)
            finally:
                self._bind_lock.release()

    def _apply_unapplied(self, channel: Any) -> None:
        # Not blocking: a bind() holds the lock while it waits out a broker that does not answer, and the
        # thread must keep draining; the next heal tries again.
        if not self._unapplied or not self._bind_lock.acquire(blocking=False):
            return
        held: list[tuple[Any, Any]] = []
        self._held = held
        try:
            add = sorted(key for key, bound in self._unapplied.items() if bound)
            remove = self._unbinding()
            self._apply(channel, add, remove)  # advances the binding epoch, as a bind() would have
            self._unapplied.clear()
        finally:
            self._held = None  # on failure they go unacknowledged with the connection, as at any reconnection
            self._bind_lock.release()
        log.warning(
            "event queue %s: made %d binding changes a bind or unbind could not",
            self.queue_name,
            len(add) + len(remove),
        )
        # Handled once the lock is free: a listener run under it could wait on a thread waiting for it
        # (one whose on() holds the distribution's binding lock while it binds).
        for body, message in held:
            self._on_message(body, message)

    def _on_message(self, body: Any, message: Any) -> None:
        if self._held is not None:
            self._held.append((body, message))
            return
        if message.delivery_info.get("routing_key") in self._bindings:  # else unbound meanwhile: drop
            line = self._line
            with line.running() if line is not None else contextlib.nullcontext():
                self.handle(body, message.headers)
        message.ack()  # the keeper writes no more once the listener is done

    def _on_decode_error(self, message: Any, exc: Exception) -> None:
        log.warning("event queue %s: undecodable message dropped: %r", self.queue_name, exc)
        message.ack()

    def stop(self) -> None:
        """Stop the consumer thread (within about ``_POLL`` seconds); the queue and bindings stay."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _release_admin(self) -> None:
        if self._admin_conn is not None:
            self.broker.release(self._admin_conn)
        self._admin_conn = self._admin_channel = None

    def release(self) -> None:
        """Release the admin connection (the next operation that needs it makes another)."""
        with self._bind_lock:
            self._release_admin()

    def close(self) -> None:
        """Stop the thread, delete a broadcast queue (on Redis with its bindings), release. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self._declared and self.delivery == "broadcast" and self.queue_name:
            try:
                self.delete_queue()
            except Exception as exc:
                log.warning("event queue %s not deleted: %r", self.queue_name, exc)
        self.release()


def _give_back_to(channel: Any, queue: str) -> None:
    """Make ``channel`` give what it restores (the unacknowledged events of a killed member of its group,
    older than the visibility timeout) back to ``queue`` alone: kombu routes a restored message through its
    exchange again, to every queue bound to its key, and each broadcast listener heard the event twice."""
    restore = channel._do_restore_message

    def to_queue(payload: Any, exchange: str, routing_key: str, pipe: Any, leftmost: bool = False) -> None:
        restore(payload, "", queue, pipe, leftmost)  # kombu's default exchange routes to the queue named

    channel._do_restore_message = to_queue


def _client(channel: Any) -> Any:
    """A pooled Redis client of ``channel``; never ``channel.client``, whose connection may be in a BRPOP."""
    with channel.conn_or_acquire() as client:
        return client
