"""On RabbitMQ, an event nobody is bound for is not sent once RabbitMQ returned one, and the first event
published after a listener's ``bind`` returns is sent (the binding epoch, ``event_epoch.py``).

Real RabbitMQ for the events, real Redis for the epoch, and a real provider worker for the calls whose events
are judged by the epoch read with their reply. A return reaches the publisher when its next publish reads
the connection, so the tests publish until the publisher counts a skip, with a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection as _Connection

from celery_services import finalize
from celery_services.distribution.event_epoch import BindingEpoch, read_with_reply, reply_scope
from celery_services.distribution.events import EventBus
from celery_services.distribution.manifest import RegistryLayout
from celery_services.distribution.provider import Replies
from celery_services.testing import wait_for

from .support import amqp_provider, cleanup, fresh_prefix, make_caller
from .test_events_bus import Collector, wait_until

Connection: Any = _Connection  # kombu's API is unannotated


class Exchange:
    """One test's exchange on RabbitMQ, its buses and its epoch key, all removed at the end."""

    def __init__(self, rabbitmq_url: str, redis_url: str, unique: str) -> None:
        self.url, self.name, self.redis_url = rabbitmq_url, f"test.epoch.{unique}", redis_url
        self.store = redis.Redis.from_url(redis_url)
        self.epoch_key = RegistryLayout(f"test.epoch.{unique}").binding_epoch(self.name)
        self.buses: list[EventBus] = []

    def bus(self, epoch: bool = True, **kwargs: Any) -> EventBus:
        bus = EventBus(
            self.url,
            exchange=self.name,
            queue_prefix=self.name,
            epoch=BindingEpoch(self.redis_url, self.epoch_key) if epoch else None,
            **kwargs,
        )
        self.buses.append(bus)
        return bus

    def cleanup(self) -> None:
        for bus in self.buses:
            bus.close()
        self.store.delete(self.epoch_key)
        with Connection(self.url) as conn:
            conn.channel().exchange_delete(self.name)
        self.store.close()


@pytest.fixture
def exchange(rabbitmq_url: str, redis_url: str, unique: str) -> Iterator[Exchange]:
    ex = Exchange(rabbitmq_url, redis_url, unique)
    yield ex
    ex.cleanup()


def served(exchange: Exchange, publisher: EventBus, event: str, data: Any) -> bool:
    """Publish as a provider does after a served call's reply: judged by the epoch read with the reply."""
    with reply_scope():
        read_with_reply(exchange.epoch_key, exchange.store.get(exchange.epoch_key))
        return publisher.publish("app", "articles", event, data)


def learn_unheard(exchange: Exchange, publisher: EventBus, event: str = "created") -> None:
    """Publish ``event`` until the publisher skips one: RabbitMQ returned an earlier one to it."""
    before = publisher.unheard
    wait_until(
        lambda: served(exchange, publisher, event, {"n": 1}) and publisher.unheard > before,
        what=f"a {event} event skipped",
    )


def test_an_event_rabbitmq_returned_is_skipped_until_a_listener_binds(exchange: Exchange) -> None:
    publisher = exchange.bus()
    learn_unheard(exchange, publisher)
    sent = publisher.published
    assert sent >= 1  # RabbitMQ had to return one first
    # Skipped before it is encoded: data no JSON holds fails nothing while nobody listens.
    assert served(exchange, publisher, "created", object()) is True
    assert (publisher.published, publisher.publish_failures) == (sent, 0)
    # Outside a served call nothing read the epoch: sent, as without one.
    assert publisher.publish("app", "articles", "created", {"n": 1})
    assert publisher.published == sent + 1

    got = Collector()
    listener = exchange.bus(consumer_key="gw", on_event=got)
    listener.bind("app", "articles", "created")
    listener.start()
    # The first event published once bind returned is sent, with no wait for the publisher to forget.
    assert served(exchange, publisher, "created", {"n": 2})
    assert [envelope.data for envelope in got.wait_for(1)] == [{"n": 2}]
    assert publisher.published == sent + 2
    # An event of a key still routed nowhere is learned on its own.
    learn_unheard(exchange, publisher, "removed")
    assert served(exchange, publisher, "created", {"n": 3})
    assert [envelope.data for envelope in got.wait_for(2)] == [{"n": 2}, {"n": 3}]


def test_an_epoch_lost_with_redis_comes_back_new(exchange: Exchange) -> None:
    # A Redis restart loses the epoch: what the publisher learned under it must not outlive it, even if no
    # listener of the library advances the next one (here a consumer outside it binds meanwhile).
    publisher = exchange.bus()
    learn_unheard(exchange, publisher)
    exchange.store.delete(exchange.epoch_key)
    got = Collector()
    outsider = exchange.bus(epoch=False, consumer_key="outside", on_event=got)
    outsider.bind("app", "articles", "created")
    outsider.start()
    assert served(exchange, publisher, "created", {"n": 2})
    assert [envelope.data for envelope in got.wait_for(1)] == [{"n": 2}]
    assert exchange.store.get(exchange.epoch_key)  # the publisher started the next epoch


def test_a_consumer_outside_the_library_hears_once_the_return_is_forgotten(exchange: Exchange) -> None:
    publisher = exchange.bus()
    learn_unheard(exchange, publisher)
    got = Collector()
    outsider = exchange.bus(epoch=False, consumer_key="outside", on_event=got)
    outsider.bind("app", "articles", "created")  # writes no epoch: the publisher may skip for a second
    outsider.start()
    wait_until(
        lambda: served(exchange, publisher, "created", {"n": 2}) and bool(got.items),
        what="the outsider hearing created",
    )


def test_without_an_answer_from_redis_nothing_is_skipped(exchange: Exchange, unique: str) -> None:
    epoch = BindingEpoch("redis://127.0.0.1:1/0", f"test.epoch.{unique}")
    epoch.advance()  # logs, never raises: a listener binds all the same
    publisher = EventBus(exchange.url, exchange=exchange.name, queue_prefix=exchange.name, epoch=epoch)
    exchange.buses.append(publisher)
    for n in range(20):
        with reply_scope():
            read_with_reply(epoch.key, None)  # the reply's read found no epoch, and none can be started
            assert epoch.current() is None
            assert publisher.publish("app", "articles", "created", {"n": n})
    assert (publisher.published, publisher.unheard) == (20, 0)


def test_within_a_call_the_epoch_read_with_its_reply_judges_its_events(redis_url: str, unique: str) -> None:
    store = redis.Redis.from_url(redis_url)
    key, reply = f"test.epoch.{unique}", f"test.epoch.{unique}.reply"
    store.set(key, "read-with-the-reply", ex=60)
    replies = Replies(store, key)
    unreachable = BindingEpoch("redis://127.0.0.1:1/0", key)  # would say None, had it been asked
    another = BindingEpoch("redis://127.0.0.1:1/0", f"{key}.another")  # another exchange's epoch
    try:
        with reply_scope():
            assert replies.push(reply, "{}", time.time() + 5)
            assert unreachable.current() == "read-with-the-reply"
            assert another.current() is None
        assert unreachable.current() is None  # the call is over
        store.delete(reply, f"{reply}:sent")
        with reply_scope(events=False):  # a call with no event to publish: its reply reads no epoch
            assert replies.push(reply, "{}", time.time() + 5)
            assert unreachable.current() is None
    finally:
        store.delete(key, reply, f"{reply}:sent")
        store.close()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    yield from fresh_prefix(redis_url, "epoch")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "celery-consumer"])
def test_a_call_made_once_a_proxy_listens_is_heard_though_its_provider_skipped_the_event(
    rabbitmq_url: str, redis_url: str, prefix: str, fast: bool
) -> None:
    # The provider judges a call's events by the epoch it read with the call's reply: the call made after
    # on() returned is served after the new epoch, on either path that serves calls.
    path = {"CELERY_SERVICES_FAST_PATH": str(fast).lower()}
    prov = amqp_provider("epoch", rabbitmq_url, redis_url, prefix, **path)
    app, distribution = make_caller(prov, prefix, remote_services=[prov.key])
    try:
        with prov.worker():
            articles = distribution.wait_for("articles", timeout=15)
            probe = distribution.wait_for("probe", timeout=15)
            wait_for(
                lambda: articles.create({"title": "unheard"}) and probe.get("events")["unheard"] > 0,
                timeout=15,
                what="the provider skipping created",
            )
            heard: list[str] = []
            articles.on("created", lambda data, context: heard.append(data["title"]))
            articles.create({"title": "heard"})
            wait_for(lambda: heard == ["heard"], timeout=10, what="created heard")
    finally:
        finalize(app)
        cleanup(prov.broker, redis_url, prov.key, prov.runs_key)
