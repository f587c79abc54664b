"""A fast-path worker sends its task events to its own event exchange (Celery's ``event_exchange``), and
declares it first, as Celery's event dispatcher does.

Found on a fresh RabbitMQ: the fast path published its events to ``celeryev`` by name, and nobody had
declared that exchange yet (no Flower, and a worker run ``--without-heartbeat`` sends no ``worker-online``
that would have). Each publish to the missing exchange closed the serving connection: the next call waited
half a second for a new one, and the events held were lost. A worker whose ``event_exchange`` was not
``celeryev`` sent its fast-path events where its Flower does not listen, on either broker.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection

from celery_services import App, DistributionSettings, distribute, finalize
from celery_services.distribution.celery_app import make_celery
from celery_services.testing import wait_for

from ..support import BROKERS, amqp_provider, broker_provider, cleanup, fresh_prefix, make_caller
from ..test_flower import TaskEvents

NOT_REACHED = "fast path cannot reach its queue"


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    yield from fresh_prefix(redis_url, "evx")


def exchange_exists(broker: str, name: str) -> bool:
    """Whether RabbitMQ knows the exchange ``name`` (a passive declaration, on a connection of our own)."""
    with Connection(broker) as connection:
        channel = connection.channel()
        try:
            channel.exchange_declare(name, "topic", passive=True)
        except connection.channel_errors:
            return False
        return True


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker", BROKERS)
def test_task_events_go_to_the_workers_own_event_exchange_declared_first(
    broker: str, request: pytest.FixtureRequest, redis_url: str, prefix: str
) -> None:
    exchange = f"cs-events-{uuid.uuid4().hex[:8]}"  # declared by nobody else: a fresh broker's celeryev
    extra = {"TEST_EVENT_EXCHANGE": exchange}
    prov = broker_provider(request, broker, redis_url, prefix, "evx", **extra)
    app, distribution = make_caller(prov, prefix)
    worker = prov.worker()
    worker.command.append("--without-heartbeat")  # no worker-online event declares the exchange first
    try:
        with worker:
            assert "fast path serving queue" in worker.log()
            probe = distribution.remote_service(prov.key, "probe", ["get"])
            for _ in range(5):  # each call's event is sent once the next call is late (EVENT_IDLE)
                probe.get(1, {})
            if broker == "rabbitmq":
                wait_for(lambda: exchange_exists(prov.broker, exchange), 5, what=f"exchange {exchange}")
            name = f"{prov.key}.probe.get"
            with TaskEvents(prov.broker, exchange) as events:

                def heard() -> bool:  # calls until the receiver, bound meanwhile, hears one of them
                    probe.get(1, {})
                    return any(e["type"] == "task-succeeded" for e in events.received(name))

                wait_for(heard, 15, interval=0.1, what=f"a task event of {name} on {exchange}")
            assert NOT_REACHED not in worker.log()
    finally:
        finalize(app)
        cleanup(prov.broker, redis_url, prov.key, prov.runs_key, exchange)  # the exchange too, by name


@pytest.mark.timeout(90)
def test_task_events_reach_flower_on_a_redis_broker_with_a_global_keyprefix(
    request: pytest.FixtureRequest, redis_url: str, prefix: str
) -> None:
    # kombu puts global_keyprefix before every pub/sub channel, Flower's subscription included; the fast path
    # published its task events on the channels unprefixed, where nobody listens: Flower showed the worker
    # online and none of its calls (found by a review).
    keyprefix = f"cs-kp-{uuid.uuid4().hex[:6]}:"
    prov = broker_provider(request, "redis", redis_url, prefix, "kp", TEST_GLOBAL_KEYPREFIX=keyprefix)
    settings = DistributionSettings(
        key=f"caller-{uuid.uuid4().hex[:6]}",
        broker_url=redis_url,
        result_backend=redis_url,
        registry_prefix=prefix,
        services=[],
        remote_services=[],
        timeout=8,
    )
    celery = make_celery(settings)  # the caller's Celery app, configured as the provider's
    celery.conf.broker_transport_options = {
        **celery.conf.broker_transport_options,
        "global_keyprefix": keyprefix,
    }
    app = App()
    distribution = distribute(app, settings, celery=celery)
    events = TaskEvents(redis_url)
    events.celery.conf.broker_transport_options = {"global_keyprefix": keyprefix}  # Flower, configured alike
    try:
        with prov.worker() as worker:
            assert "fast path serving queue" in worker.log()
            probe = distribution.remote_service(prov.key, "probe", ["get"])
            name = f"{prov.key}.probe.get"
            with events:

                def heard() -> bool:
                    probe.get(1, {})
                    return any(e["type"] == "task-succeeded" for e in events.received(name))

                wait_for(heard, 15, interval=0.1, what=f"a task event of {name} under {keyprefix}")
    finally:
        finalize(app)
        cleanup(prov.broker, redis_url, prov.key, prov.runs_key)
        store = redis.Redis.from_url(redis_url)
        for stale in store.scan_iter(f"{keyprefix}*"):
            store.delete(stale)
        store.close()


@pytest.mark.timeout(60)
@pytest.mark.rabbitmq
def test_calls_are_served_when_the_event_exchange_cannot_be_declared(
    rabbitmq_url: str, redis_url: str, prefix: str
) -> None:
    # An exchange of that name exists with other properties (a fanout, not Celery's topic): declaring it
    # fails (PRECONDITION_FAILED), as every publish of Celery's own dispatcher would. Flower then misses
    # the fast path's events, but its calls are served: they do not wait on a connection retried forever.
    exchange = f"cs-events-{uuid.uuid4().hex[:8]}"
    with Connection(rabbitmq_url) as connection:
        connection.channel().exchange_declare(exchange, "fanout", durable=False, auto_delete=False)
    prov = amqp_provider("evx", rabbitmq_url, redis_url, prefix, TEST_EVENT_EXCHANGE=exchange)
    app, distribution = make_caller(prov, prefix)
    try:
        with prov.worker() as worker:
            assert "fast path serving queue" in worker.log()
            probe = distribution.remote_service(prov.key, "probe", ["get"])
            for n in range(3):
                assert probe.get(n, {"timeout": 5})["id"] == n
            assert "task events off on this connection" in worker.log()
            assert NOT_REACHED not in worker.log()
    finally:
        finalize(app)
        cleanup(prov.broker, redis_url, prov.key, prov.runs_key, exchange)  # the exchange too, by name
