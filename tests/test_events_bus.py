"""EventBus against real brokers: Redis (kombu's virtual topic routing) and RabbitMQ (skipped when absent)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from kombu import Exchange, Producer
from kombu.connection import Connection as _Connection

from celery_services.distribution import event_publisher
from celery_services.distribution.events import EventBus, EventEnvelope, routing_key
from celery_services.distribution.redis_transport import reuse_sync_clients, routing_by

Connection: Any = _Connection  # kombu's API is unannotated


class TooManyAttempts(BaseException):
    """An attempt past the limit of :class:`ConnectionAttempts`: a retry without bound fails the test at once
    rather than hanging it (a BaseException: neither kombu's retries nor ``except Exception`` swallow it)."""


class ConnectionAttempts:
    """Counts the TCP connections the calling thread attempts to ``port`` (each ``socket.connect``).

    What a call costs a dead or hung broker, counted rather than timed: scheduling noise changes how long it
    takes, never how many connections it tries.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, port: int, limit: int = 10) -> None:
        self.count = 0
        thread = threading.current_thread()
        connect = socket.socket.connect

        def counting(sock: socket.socket, address: Any) -> None:
            if threading.current_thread() is thread and isinstance(address, tuple) and address[1] == port:
                self.count += 1
                if self.count > limit:
                    raise TooManyAttempts(f"{self.count} connection attempts to port {port}: no bound")
            connect(sock, address)

        monkeypatch.setattr(socket.socket, "connect", counting)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        pause.wait(0.01)


class Collector:
    """An ``on_event`` that records envelopes and lets a test wait for a count."""

    def __init__(self) -> None:
        self.items: list[EventEnvelope] = []
        self._cond = threading.Condition()

    def __call__(self, envelope: EventEnvelope) -> None:
        with self._cond:
            self.items.append(envelope)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[EventEnvelope]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.items) >= count, timeout):
                raise AssertionError(f"got {len(self.items)} events, wanted {count}")
            return list(self.items)

    def data(self) -> list[Any]:
        with self._cond:
            return [item.data for item in self.items]


class Broker:
    """One broker under test, with unique names, inspection helpers and cleanup."""

    def __init__(self, kind: str, url: str, unique: str) -> None:
        self.kind, self.url, self.unique = kind, url, unique
        self.exchange = self.prefix = f"test.{unique}"
        self.buses: list[EventBus] = []
        self.redis = redis.Redis.from_url(url) if kind == "redis" else None

    def bus(self, **kwargs: Any) -> EventBus:
        bus = EventBus(self.url, exchange=self.exchange, queue_prefix=self.prefix, **kwargs)
        self.buses.append(bus)
        return bus

    def queue_size(self, name: str) -> int | None:
        """Messages ready in queue ``name``; None when the broker has no such queue (AMQP only)."""
        if self.redis is not None:
            return int(self.redis.llen(name))
        with Connection(self.url) as conn:
            try:
                return int(conn.channel().queue_declare(queue=name, passive=True).message_count)
            except conn.channel_errors:
                return None

    def bound_queues(self) -> dict[str, set[str]]:
        """Redis only: queue name -> routing keys, from kombu's binding set of the exchange."""
        assert self.redis is not None
        table: dict[str, set[str]] = {}
        for member in self.redis.smembers(f"_kombu.binding.{self.exchange}"):
            text = member.decode() if isinstance(member, bytes) else member
            key, _pattern, queue = text.split("\x06\x16")
            table.setdefault(queue, set()).add(key)
        return table

    def cleanup(self) -> None:
        for bus in self.buses:
            bus.close()
        if self.redis is not None:
            keys = [*self.redis.keys(f"{self.prefix}*"), *self.redis.keys(f"_kombu.binding*.{self.exchange}")]
            if keys:
                self.redis.delete(*keys)
            return
        with Connection(self.url) as conn:
            for name in {bus.queue_name for bus in self.buses if bus.queue_name}:
                conn.channel().queue_delete(name)
            conn.channel().exchange_delete(self.exchange)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, unique: str) -> Iterator[Broker]:
    url = request.getfixturevalue(f"{request.param}_url")
    b = Broker(request.param, url, unique)
    yield b
    b.cleanup()


@pytest.fixture
def redis_broker(redis_url: str, unique: str) -> Iterator[Broker]:
    b = Broker("redis", redis_url, unique)
    yield b
    b.cleanup()


@pytest.fixture
def rabbitmq_broker(rabbitmq_url: str, unique: str) -> Iterator[Broker]:
    b = Broker("rabbitmq", rabbitmq_url, unique)
    yield b
    b.cleanup()


def test_routing_key() -> None:
    assert (
        routing_key("my-app", "/api/articles/", "article_published")
        == "my-app.api.articles.article_published"
    )
    for bad in (("a.b", "p", "e"), ("a", "p*", "e"), ("a", "p", "#"), ("a", "", "e")):
        with pytest.raises(ValueError):
            routing_key(*bad)


def test_envelope_keeps_data_beside_routing_fields(broker: Broker) -> None:
    got = Collector()
    consumer = broker.bus(consumer_key="gw", on_event=got)
    consumer.bind("app", "api/articles", "created")
    consumer.start()
    publisher = broker.bus()
    data = {"id": 1, "key": "not-the-app", "event": "mine", "nested": [1, 2.5, None, {"a": "é"}]}
    assert publisher.publish("app", "api/articles", "created", data, {"method": "create", "id": None})
    [envelope] = got.wait_for(1)
    assert envelope.data == data
    assert (envelope.key, envelope.path, envelope.event) == ("app", "api/articles", "created")
    assert envelope.context == {"method": "create", "id": None}
    assert (publisher.published, publisher.publish_failures, consumer.received) == (1, 0, 1)


def test_on_redis_an_event_nobody_is_bound_for_is_neither_encoded_nor_sent(redis_broker: Broker) -> None:
    # kombu routes a Redis event from the exchange's binding set: asked first, an event nobody hears costs
    # no encoding (data that cannot be serialized would fail it) and no message.
    publisher = redis_broker.bus()
    assert publisher.publish("app", "articles", "created", object()) is True  # never encoded
    assert (publisher.published, publisher.unheard, publisher.publish_failures) == (0, 1, 0)
    got = Collector()
    consumer = redis_broker.bus(consumer_key="gw", on_event=got)
    consumer.bind("app", "articles", "created")
    consumer.start()
    assert publisher.publish("app", "articles", "created", object()) is False  # heard: encoded, refused
    assert publisher.publish("app", "articles", "updated", 2) is True  # bound for another event only
    assert publisher.publish("app", "articles", "created", 3) is True
    assert [envelope.data for envelope in got.wait_for(1)] == [3]
    assert (publisher.published, publisher.unheard, publisher.publish_failures) == (1, 2, 1)


def test_on_redis_kombu_routes_an_event_by_the_binding_set_the_publisher_read(redis_broker: Broker) -> None:
    # One read of the set per event: kombu's publish routes by the one the publisher made just before
    # (routing_by), once; the next publish (or a retried one) reads the set again.
    reuse_sync_clients()
    queue = f"{redis_broker.prefix}.held"
    held = [("app.articles.created", r"^app\.articles\.created$", queue)]  # as kombu reads the set
    with _Connection(redis_broker.url) as connection:
        channel = connection.channel()
        exchange = Exchange(redis_broker.exchange, type="topic")
        exchange(channel).declare()
        producer = Producer(channel, exchange=exchange)
        try:
            with routing_by(channel, exchange.name, held):
                producer.publish("1", routing_key="app.articles.created")
            producer.publish("2", routing_key="app.articles.created")  # the real set: nobody bound
            assert redis_broker.redis is not None and redis_broker.redis.llen(queue) == 1
        finally:
            channel.client.delete(queue)


def test_filtering_happens_at_the_broker(broker: Broker) -> None:
    got = Collector()
    consumer = broker.bus(consumer_key="gw", on_event=got)
    consumer.bind("app", "articles", "created")  # not started yet: the queue shows what the broker routed
    publisher = broker.bus()
    for event in ("created", "updated", "updated", "removed"):
        assert publisher.publish("app", "articles", event, event)
    assert publisher.publish("other", "articles", "created", "other app")
    assert consumer.queue_name is not None
    # Published without confirms: the broker routes after publish() returns (the order holds, and the
    # events received after start() show that nothing else was routed here).
    wait_until(lambda: broker.queue_size(consumer.queue_name or "") == 1, what="the created event queued")
    consumer.start()
    got.wait_for(1)
    publisher.publish("app", "articles", "updated", "late update")
    publisher.publish("app", "articles", "created", "marker")
    got.wait_for(2)
    assert got.data() == ["created", "marker"]
    assert consumer.received == 2
    wait_until(lambda: broker.queue_size(consumer.queue_name or "") == 0, what="empty queue")


def test_broadcast_consumers_each_get_every_event_once(broker: Broker) -> None:
    collectors = [Collector(), Collector()]
    buses = [broker.bus(consumer_key="gw", on_event=c) for c in collectors]
    assert buses[0].queue_name != buses[1].queue_name
    for bus in buses:
        bus.bind("app", "articles", "created")
        bus.start()
    publisher = broker.bus()
    for i in range(50):
        publisher.publish("app", "articles", "created", i)
    publisher.publish("app", "articles", "created", "marker")  # order per publisher: nothing can follow it
    for collector in collectors:
        collector.wait_for(51)
        assert collector.data() == [*range(50), "marker"]


def test_group_consumers_share_events_exactly_once(broker: Broker) -> None:
    collectors = [Collector(), Collector()]
    buses = [broker.bus(consumer_key="gw", delivery="group", on_event=c) for c in collectors]
    assert buses[0].queue_name == buses[1].queue_name == f"{broker.prefix}.gw"
    for bus in buses:
        bus.bind("app", "articles", "created")
        bus.start()
    publisher = broker.bus()
    for i in range(200):
        assert publisher.publish("app", "articles", "created", i)
    wait_until(lambda: sum(len(c.items) for c in collectors) >= 200, what="200 events")
    wait_until(lambda: broker.queue_size(f"{broker.prefix}.gw") == 0, what="empty group queue")
    for bus in buses:
        bus.close()
    values = collectors[0].data() + collectors[1].data()
    assert sorted(values) == list(range(200))
    assert buses[0].received + buses[1].received == 200
    for collector in collectors:  # each instance still sees its share in publish order
        assert collector.data() == sorted(collector.data())


def test_group_instance_leaving_mid_stream_loses_and_duplicates_nothing(broker: Broker) -> None:
    collectors = [Collector(), Collector()]
    buses = [broker.bus(consumer_key="gw", delivery="group", on_event=c) for c in collectors]
    for bus in buses:
        bus.bind("app", "articles", "created")
        bus.start()
    publisher = broker.bus()
    thread = threading.Thread(
        target=lambda: [publisher.publish("app", "articles", "created", i) for i in range(1000)]
    )
    thread.start()
    collectors[0].wait_for(20)
    buses[0].close()  # one replica stops while events flow: the other gets the rest, none twice
    thread.join()
    wait_until(lambda: len(collectors[0].items) + len(collectors[1].items) >= 1000, what="1000 events")
    buses[1].close()
    assert sorted(collectors[0].data() + collectors[1].data()) == list(range(1000))


def test_group_queue_keeps_events_while_the_app_is_down(broker: Broker) -> None:
    first = broker.bus(consumer_key="gw", delivery="group", on_event=Collector())
    first.bind("app", "articles", "created")
    first.close()  # the whole consumer app goes down; its group queue and bindings stay
    publisher = broker.bus()
    for i in range(20):
        assert publisher.publish("app", "articles", "created", i)
    wait_until(lambda: broker.queue_size(f"{broker.prefix}.gw") == 20, what="20 events queued while down")
    got = Collector()
    second = broker.bus(consumer_key="gw", delivery="group", on_event=got)
    second.bind("app", "articles", "created")
    second.start()
    got.wait_for(20)
    assert got.data() == list(range(20))
    second.close()
    second.delete_queue()  # after close(): a running consumer would declare it again
    assert broker.queue_size(f"{broker.prefix}.gw") in (0, None)


def test_order_preserved_over_1000_events(broker: Broker) -> None:
    got = Collector()
    consumer = broker.bus(consumer_key="gw", on_event=got)
    consumer.bind("app", "articles", "patched")
    consumer.start()
    publisher = broker.bus()
    for i in range(1000):
        publisher.publish("app", "articles", "patched", i)
    got.wait_for(1000, timeout=30)
    assert got.data() == list(range(1000))


def test_concurrent_publishers_and_binding_while_consuming(broker: Broker) -> None:
    got = Collector()
    consumer = broker.bus(consumer_key="gw", on_event=got)
    consumer.start()  # binds come later, while the consumer thread drains its own connection
    consumer.bind("app", "articles", "created")
    publisher = broker.bus()

    def run(n: int) -> None:
        for i in range(50):
            assert publisher.publish("app", "articles", "created", [n, i])

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got.wait_for(400)
    assert publisher.published == 400
    for n in range(8):  # order per publishing thread
        assert [i for t, i in got.data() if t == n] == list(range(50))


def test_unbind_stops_delivery(broker: Broker) -> None:
    got = Collector()
    consumer = broker.bus(consumer_key="gw", on_event=got)
    consumer.bind("app", "articles", "created")
    consumer.bind("app", "articles", "updated")
    consumer.start()
    publisher = broker.bus()
    publisher.publish("app", "articles", "created", 1)
    got.wait_for(1)
    consumer.unbind("app", "articles", "created")
    assert consumer.bindings == {"app.articles.updated"}
    publisher.publish("app", "articles", "created", 2)
    publisher.publish("app", "articles", "updated", 3)
    got.wait_for(2)
    assert got.data() == [1, 3]
    if broker.redis is not None:
        assert broker.bound_queues() == {consumer.queue_name: {"app.articles.updated"}}
    consumer.bind("app", "articles", "created")  # and binding again works (kombu's state must not skip it)
    publisher.publish("app", "articles", "created", 4)
    got.wait_for(3)
    assert got.data() == [1, 3, 4]


def test_handler_errors_do_not_stop_the_consumer(broker: Broker) -> None:
    got = Collector()

    def handler(envelope: EventEnvelope) -> None:
        if envelope.data == "boom":
            raise RuntimeError("handler bug")
        got(envelope)

    consumer = broker.bus(consumer_key="gw", on_event=handler)
    consumer.bind("app", "articles", "created")
    consumer.start()
    publisher = broker.bus()
    publisher.publish("app", "articles", "created", "boom")
    publisher.publish("app", "articles", "created", "fine")
    got.wait_for(1)
    assert got.data() == ["fine"]
    assert consumer.received == 2


def test_close_deletes_the_broadcast_queue(broker: Broker) -> None:
    got = Collector()
    consumer = broker.bus(consumer_key="gw", on_event=got)
    consumer.bind("app", "articles", "created")
    consumer.start()
    publisher = broker.bus()
    publisher.publish("app", "articles", "created", 1)
    got.wait_for(1)
    [thread] = [t for t in threading.enumerate() if t.name == f"events:{consumer.queue_name}"]
    consumer.close()
    assert not thread.is_alive()  # stopped by close(), which gives up on a thread after 10 s
    name = consumer.queue_name or ""
    publisher.publish("app", "articles", "created", 2)
    if broker.redis is not None:
        assert broker.bound_queues() == {}
        assert broker.queue_size(name) == 0
        assert not broker.redis.keys(f"{name}*")
    else:
        assert broker.queue_size(name) is None


def test_sweep_removes_queues_of_dead_consumers(broker: Broker) -> None:
    dead_got, live_got = Collector(), Collector()
    dead = broker.bus(consumer_key="gw", instance="dead", on_event=dead_got)
    other_app = broker.bus(consumer_key="other", instance="gone")
    group = broker.bus(consumer_key="gw", delivery="group")
    for bus in (dead, other_app, group):
        bus.bind("app", "articles", "created")
    dead.start()
    publisher = broker.bus()
    publisher.publish("app", "articles", "created", 0)
    dead_got.wait_for(1)
    dead._stop_consumer()  # the process 'dies': no close(), no queue deletion
    dead._release_connections()
    other_app._release_connections()
    live = broker.bus(consumer_key="gw", instance="live", on_event=live_got)
    live.bind("app", "articles", "created")
    live.start()
    if broker.redis is not None:
        assert set(broker.bound_queues()) == {
            dead.queue_name,
            other_app.queue_name,
            group.queue_name,
            live.queue_name,
        }
        assert live.sweep(["live"]) == [dead.queue_name]
        assert set(broker.bound_queues()) == {other_app.queue_name, group.queue_name, live.queue_name}
        assert live.sweep(["live"], all_keys=True) == [other_app.queue_name]
        assert set(broker.bound_queues()) == {group.queue_name, live.queue_name}
    else:  # RabbitMQ auto-deletes the queue when its consumer's connection goes; nothing to sweep
        wait_until(lambda: broker.queue_size(dead.queue_name or "") is None, what="auto-delete")
        assert live.sweep(["live"]) == []
    publisher.publish("app", "articles", "created", 1)
    live_got.wait_for(1)
    assert live_got.data() == [1]
    assert broker.queue_size(dead.queue_name or "") in (0, None)
    wait_until(lambda: broker.queue_size(group.queue_name or "") == 2, what="2 events in the group queue")
    group.delete_queue()


def test_consumer_reconnects_and_redeclares_after_losing_its_connection(redis_broker: Broker) -> None:
    broker = redis_broker  # killing exactly the consumer's connections needs Redis CLIENT KILL
    assert broker.redis is not None
    got = Collector()
    consumer = broker.bus(consumer_key="gw", on_event=got)
    consumer.bind("app", "articles", "created")
    consumer.start()
    publisher = broker.bus()
    publisher.publish("app", "articles", "created", 1)
    got.wait_for(1)
    clients = [c for c in broker.redis.client_list() if c.get("name") == consumer.queue_name]
    assert clients
    for client in clients:
        broker.redis.client_kill_filter(_id=client["id"])
    publisher.publish("app", "articles", "created", 2)
    got.wait_for(2)
    assert got.data() == [1, 2]


def test_lost_redis_bindings_come_back(redis_broker: Broker) -> None:
    broker = redis_broker
    assert broker.redis is not None
    got = Collector()
    consumer = broker.bus(consumer_key="gw", on_event=got)
    consumer.bind("app", "articles", "created")
    consumer.start()
    publisher = broker.bus()
    publisher.publish("app", "articles", "created", 0)
    got.wait_for(1)  # the consumer thread has declared everything
    broker.redis.delete(f"_kombu.binding.{broker.exchange}")  # e.g. a sweep that raced with this consumer
    assert broker.bound_queues() == {}
    # The consumer's periodic check puts them back (a reconnect under load would too, without its log line,
    # so the test asserts the outcome rather than the message).
    wait_until(lambda: consumer.queue_name in broker.bound_queues(), timeout=15, what="bindings re-added")
    publisher.publish("app", "articles", "created", 1)
    assert [e.data for e in got.wait_for(2)] == [0, 1]


@pytest.fixture
def long_cooldown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker error makes publishes fail at once for a minute (not 0.5 s): the publish after a failure falls
    in that cooldown however slowly the test runs."""
    monkeypatch.setattr(event_publisher, "_COOLDOWN", (60.0, 60.0))


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"])
def test_publish_to_unreachable_broker_fails_fast(
    url: str, monkeypatch: pytest.MonkeyPatch, long_cooldown: None
) -> None:
    attempts = ConnectionAttempts(monkeypatch, port=1)
    bus = EventBus(url, exchange="test.unreachable")
    try:
        assert bus.publish("app", "articles", "created", {"id": 1}) is False
        first = attempts.count
        assert 1 <= first <= 2  # one retry, then it gives up
        assert bus.publish("app", "articles", "created", {"id": 2}) is False
        assert attempts.count == first  # in the cooldown: failed at once, without trying the broker
        assert (bus.published, bus.publish_failures) == (0, 2)
    finally:
        bus.close()


DEAD = {"redis": "redis://127.0.0.1:1/0", "rabbitmq": "amqp://guest:guest@127.0.0.1:1//"}


def warning_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "celery_services.events" and r.levelno >= logging.WARNING]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in warning_records(caplog)]


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_events_dropped_while_the_broker_is_down_are_counted_and_reported(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_services.events")  # whatever the root logger says
    bus = EventBus(DEAD[kind], exchange="test.unreachable")
    try:
        for n in range(50):
            assert bus.publish("app", "articles", "created", {"id": n}) is False
        during = warning_records(caplog)
    finally:
        bus.close()
    assert (bus.published, bus.dropped, bus.publish_failures) == (0, 50, 50)
    # Rate-limited: one WARNING at the first drop, then one per report interval at most, not one per event
    # (the records' own clock, so a slow run only spreads them further apart).
    assert during, "no WARNING for the dropped events"
    interval = event_publisher._REPORT_INTERVAL - 0.05  # the records' time.time() against monotonic()
    gaps = [later.created - earlier.created for earlier, later in itertools.pairwise(during)]
    assert all(gap >= interval for gap in gaps), gaps
    during = [r.getMessage() for r in during]
    assert during[0].startswith("1 event dropped since ") and "broker down" in during[0]
    # Closing the bus reports what was dropped since the last WARNING: the total is never left unsaid.
    closing = warnings_of(caplog)[len(during) :]
    assert len(closing) == 1 and closing[0].startswith("50 events dropped since "), closing


def test_publishing_recovers_with_a_summary_of_what_was_dropped(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_services.events")
    broker.bus(consumer_key="gw").bind("app", "articles", "created")  # heard: really sent, on Redis too
    bus = EventBus(DEAD[broker.kind], exchange=broker.exchange)
    broker.buses.append(bus)
    for n in range(5):
        assert bus.publish("app", "articles", "created", n) is False
    bus.broker_url = broker.url  # the broker is back (publishes fail fast until the cooldown ends)
    wait_until(lambda: bus.publish("app", "articles", "created", "back"), what="publishing recovered")
    assert bus.dropped >= 5 and bus.published == 1
    recovered = [message for message in warnings_of(caplog) if "recovered" in message]
    assert recovered == [f"event publishing recovered after {bus.dropped} dropped events"], recovered
    assert bus.publish("app", "articles", "created", "again") is True
    assert len([m for m in warnings_of(caplog) if "recovered" in m]) == 1  # said once per outage


def test_publish_to_a_hung_broker_returns_within_bounds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, long_cooldown: None
) -> None:
    # Bounded, counted rather than timed: each connection the publish makes is given up when its socket
    # timeout fires (the WARNING says so), and it makes two at most (one retry).
    caplog.set_level(logging.WARNING, logger="celery_services.events")
    with socket.socket() as silent:  # accepts TCP connections, never answers: a hung broker
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        attempts = ConnectionAttempts(monkeypatch, port)
        for url in (f"redis://127.0.0.1:{port}/0", f"amqp://guest:guest@127.0.0.1:{port}//"):
            caplog.clear()
            attempts.count = 0
            bus = EventBus(url, exchange="test.hung")
            assert bus.publish("app", "articles", "created", 1) is False
            first = attempts.count
            assert 1 <= first <= 2, first
            [warning] = warnings_of(caplog)
            assert re.search(r"time ?d? ?out", warning, re.IGNORECASE), warning  # its socket timeout fired
            assert bus.publish("app", "articles", "created", 2) is False  # meanwhile others fail at once:
            assert attempts.count == first  # in the cooldown, without a connection to the hung broker
            assert bus.publish_failures == 2
            bus.close()


def test_publish_never_raises(broker: Broker) -> None:
    broker.bus(consumer_key="gw").bind("app", "articles", "created")  # heard: encoded, on Redis too
    bus = broker.bus()
    assert bus.publish("app", "articles", "created", object()) is False
    assert bus.publish("app", "bad path!", "created", 1) is False
    assert bus.publish("app", "articles", "created", 1) is True
    assert (bus.published, bus.publish_failures) == (1, 2)


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError):
        EventBus("redis://127.0.0.1:1/0", on_event=print)  # consuming needs a consumer key
    with pytest.raises(ValueError):
        EventBus("redis://127.0.0.1:1/0", consumer_key="a.b")
    with pytest.raises(ValueError):
        EventBus("redis://127.0.0.1:1/0").bind("app", "articles", "created")


@pytest.mark.rabbitmq
@pytest.mark.timeout(30)
def test_a_forked_child_publishes_on_a_connection_of_its_own(rabbitmq_broker: Broker) -> None:
    # A prefork pool's children are forked from a worker whose bus may have published already (an event of a
    # call made at import): they published on the producer connection they inherited, one socket shared by
    # every child and the parent, whose frames and replies they could take from one another. (On Redis,
    # redis-py's pools make new connections in a new process themselves.)
    broker = rabbitmq_broker
    got = Collector()
    listener = broker.bus(consumer_key="gw", on_event=got)
    listener.bind("app", "articles", "created")
    listener.start()
    publisher = broker.bus()
    assert publisher.publish("app", "articles", "created", "parent")
    got.wait_for(1)

    def socket_of(bus: EventBus) -> Any:
        producer: Any = bus._publisher._producer
        return producer.connection.connection.sock.getsockname()  # py-amqp's socket

    inherited = socket_of(publisher)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: publish, say whether on a connection of its own, and leave at once
        try:
            sent = publisher.publish("app", "articles", "created", "child")
            os.write(write, json.dumps([sent, socket_of(publisher) != inherited]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        sent, own = json.loads(answer.read() or "[false, false]")
    os.waitpid(child, 0)
    assert sent and own, "the child published on the connection it inherited"
    assert sorted(got.wait_for(2)[i].data for i in range(2)) == ["child", "parent"]
