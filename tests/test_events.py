"""Events across processes: a provider worker publishes, consumer apps (two instances each) re-emit."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_services import App, DistributionSettings, MemoryService, distribute, finalize
from celery_services.distribution import Distribution
from celery_services.testing import wait_for

from .support import ROOT, Provider, cleanup, make_caller, provider_env, purge_prefix
from .test_events_bus import ConnectionAttempts

ARTICLES = ["find", "get", "create", "update", "patch", "remove", "publish_article"]


class Instance:
    """One consumer app instance, recording what its ``articles`` proxy hears."""

    def __init__(self, broker: str, backend: str, prefix: str, key: str, **options: Any) -> None:
        self.app = App()
        self.heard: list[tuple[str, Any, Any]] = []
        self._lock = threading.Lock()
        self.app.on("service", self._attach)
        settings = DistributionSettings(
            key=key,
            broker_url=broker,
            result_backend=backend,
            registry_prefix=prefix,
            heartbeat_interval=0.5,
            services=[],
            distributed_methods=ARTICLES,
            distributed_events=options.pop("events", ["created", "patched", "article_published"]),
            **options,
        )
        self.distribution: Distribution = distribute(self.app, settings)

    def _attach(self, service: Any) -> None:
        for event in service.events:
            service.on(event, lambda data, ctx, event=event: self._hear(event, data, ctx))

    def _hear(self, event: str, data: Any, context: Any) -> None:
        with self._lock:
            self.heard.append((event, data, context))

    def of(self, event: str) -> list[Any]:
        with self._lock:
            return [data for name, data, _ in self.heard if name == event]

    def close(self) -> None:
        finalize(self.app)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> str:
    return redis_url if request.param == "redis" else str(request.getfixturevalue("rabbitmq_url"))


@pytest.fixture
def setup(broker: str, redis_url: str) -> Iterator[dict[str, Any]]:
    prefix = f"cs-ev-{os.urandom(4).hex()}"
    key = f"evprov-{os.urandom(3).hex()}"
    runs = f"test-runs:{key}"
    env = provider_env(
        key,
        broker,
        redis_url,
        runs,
        CELERY_SERVICES_REGISTRY_PREFIX=prefix,
        CELERY_SERVICES_HEARTBEAT_INTERVAL="0.5",
    )
    provider = Provider(key, broker, redis_url, runs, env)
    made: list[Instance] = []
    caller, caller_dist = make_caller(provider, prefix, timeout=10)
    caller.use("articles", caller_dist.remote_service(key, "articles", ARTICLES))

    def instance(consumer_key: str, **options: Any) -> Instance:
        made.append(Instance(broker, redis_url, prefix, consumer_key, **options))
        return made[-1]

    with provider.worker():
        yield {"provider": provider, "articles": caller.service("articles"), "instance": instance}
        for inst in made:
            if inst.app.distribution is not None:
                inst.close()
            if inst.distribution.settings.event_delivery == "group":
                inst.distribution.events.delete_queue()  # it outlives the app by design
        finalize(caller)
    cleanup(broker, redis_url, key, runs)
    purge_prefix(redis_url, prefix)


def test_a_proxy_is_sent_an_event_once_something_listens_to_it(setup: dict[str, Any]) -> None:
    articles = setup["articles"]  # the caller's proxy, which nothing listens to yet
    bus = articles.app.distribution.events
    articles.create({"title": "unheard"})
    assert bus.bindings == frozenset()  # a consumer that only calls is sent no event
    heard: list[str] = []
    articles.on("created", lambda data, context: heard.append(data["title"]))
    assert bus.bindings == {f"{articles.key}.articles.created"}  # bound before on() returned
    created = articles.create({"title": "heard"})
    articles.patch(created["id"], {"title": "patched"})  # nothing listens to "patched": not sent
    articles.create({"title": "marker"})
    # One queue, first in first out: a "patched" event sent would have arrived before the marker. (The
    # first create's event, published after its reply, may be published after on() too, and heard.)
    wait_for(lambda: "marker" in heard, timeout=10, what="the events listened to")
    assert heard[-2:] == ["heard", "marker"]
    assert bus.received == len(heard)


def test_a_proxy_held_after_its_app_was_finalized_binds_nothing(redis_url: str) -> None:
    prefix = f"cs-ev-{os.urandom(4).hex()}"
    app = App()
    settings = DistributionSettings(
        key=f"held-{os.urandom(3).hex()}", broker_url=redis_url, registry_prefix=prefix, services=[]
    )
    distribution = distribute(app, settings.model_copy(update={"remote_services": []}))
    app.use("articles", distribution.remote_service("elsewhere", "articles", ["get"], ["created"]))
    finalize(app)
    app.service("articles").on("created", print)  # the app still holds its proxy
    assert distribution.events.bindings == frozenset()
    assert not any(
        str(distribution.events.queue_name).encode() in member
        for member in redis.Redis.from_url(redis_url).smembers(f"_kombu.binding.{settings.events_exchange}")
    )


def test_broadcast_and_group_counts_across_two_apps(setup: dict[str, Any]) -> None:
    a1, a2 = setup["instance"]("app-a"), setup["instance"]("app-a")
    g1 = setup["instance"]("app-g", event_delivery="group")
    g2 = setup["instance"]("app-g", event_delivery="group")
    articles = setup["articles"]
    created = [articles.create({"title": f"t{i}"})["id"] for i in range(40)]
    for inst in (a1, a2):
        wait_for(lambda inst=inst: len(inst.of("created")) >= 40, timeout=10, what="broadcast delivery")
    wait_for(lambda: len(g1.of("created")) + len(g2.of("created")) >= 40, timeout=10, what="group delivery")
    # Nothing more is on its way: a last event in every queue, then exact counts.
    marker = articles.create({"title": "marker"})["id"]
    for inst in (a1, a2):
        wait_for(lambda inst=inst: marker in [d["id"] for d in inst.of("created")], timeout=10, what="marker")
    wait_for(
        lambda: marker in [d["id"] for d in g1.of("created") + g2.of("created")], timeout=10, what="marker"
    )
    for inst in (a1, a2):
        assert [d["id"] for d in inst.of("created")] == [*created, marker]  # exactly once, in order
    group_ids = sorted(d["id"] for d in g1.of("created") + g2.of("created"))
    assert group_ids == sorted([*created, marker])  # once per app: no loss, no duplicate


def test_a_consumer_calling_its_proxy_hears_each_event_once(setup: dict[str, Any]) -> None:
    inst = setup["instance"]("app-self", events=["created"])
    own = inst.app.service("articles").create({"title": "mine"})
    marker = setup["articles"].create({"title": "marker"})  # same queue, after ours: then nothing is missing
    wait_for(lambda: marker in inst.of("created"), timeout=10, what="marker")
    assert inst.of("created") == [own, marker]


def test_proxies_sharing_a_service_share_its_events(setup: dict[str, Any]) -> None:
    inst = setup["instance"]("app-share", events=["created"])
    key = setup["provider"].key
    extra: list[Any] = []
    second = inst.app.use("second", inst.distribution.remote_service(key, "articles", ["get"], ["created"]))
    second.on("created", lambda data, ctx: extra.append(data))
    first = setup["articles"].create({"title": "both hear it"})
    wait_for(lambda: first in extra and first in inst.of("created"), timeout=10, what="both proxies")
    inst.app.unuse("second")  # its bindings are the discovered proxy's too: they stay
    again = setup["articles"].create({"title": "still heard"})
    wait_for(lambda: again in inst.of("created"), timeout=10, what="event after the other proxy left")
    assert extra == [first]


def test_custom_event_context_filtering_and_no_secrets(setup: dict[str, Any]) -> None:
    only_created = setup["instance"]("app-c", events=["created", "article_published"])
    articles = setup["articles"]
    item = articles.create({"title": "x"}, {"query": {"tag": "q"}, "headers": {"authorization": "Bearer s"}})
    articles.patch(item["id"], {"title": "y"})  # `patched` is not consumed: never bound, never delivered
    articles.publish_article({"id": item["id"]})
    wait_for(lambda: only_created.of("article_published"), timeout=10, what="custom event")
    events = [name for name, _, _ in only_created.heard]
    assert events == ["created", "article_published"]
    assert only_created.distribution.events.received == 2  # filtered by the broker, not after delivery
    _, data, context = only_created.heard[0]
    assert data == {"title": "x", "id": item["id"]}  # the data as emitted: no routing fields merged in
    assert context == {"method": "create", "id": None, "params": {"query": {"tag": "q"}}}
    dumped = json.dumps(only_created.heard)
    assert "password" not in dumped and "Bearer" not in dumped and "user" not in dumped


def test_group_mode_delivers_what_was_published_while_down(setup: dict[str, Any]) -> None:
    first = setup["instance"]("app-down", event_delivery="group")
    first.close()  # the whole consumer app is down; its group queue and bindings stay
    articles = setup["articles"]
    ids = [articles.create({"title": f"while-down-{i}"})["id"] for i in range(5)]
    back = setup["instance"]("app-down", event_delivery="group")
    wait_for(lambda: len(back.of("created")) >= 5, timeout=10, what="backlog delivered")
    assert [d["id"] for d in back.of("created")] == ids
    back.close()
    back.distribution.events.delete_queue()


def local_provider(broker: str, redis_url: str, label: str) -> tuple[App, str]:
    """A provider app of ``articles`` in this process (its events published from the test's own thread),
    distributed in a registry prefix of its own; returns it and the prefix. Finalize it when done."""
    prefix = f"cs-ev-{os.urandom(4).hex()}"
    provider = App()
    provider.use("articles", MemoryService())
    key = f"{label}-{os.urandom(3).hex()}"
    base = {"broker_url": broker, "result_backend": redis_url, "registry_prefix": prefix}
    distribute(provider, DistributionSettings(key=key, remote_services=[], **base))
    return provider, prefix


def test_order_over_1000_events(broker: str, redis_url: str) -> None:
    # The provider app is in this process so the 1,000 events are published back to back; they still
    # travel through the broker to the consumer's queue and thread.
    provider, prefix = local_provider(broker, redis_url, "order")
    inst = Instance(broker, redis_url, prefix, "app-order", events=["patched"])
    try:
        articles = provider.service("articles")
        item = articles.create({"n": 0})
        for n in range(1, 1001):
            articles.patch(item["id"], {"n": n})
        wait_for(lambda: len(inst.of("patched")) >= 1000, timeout=30, what="1000 events")
        assert [d["n"] for d in inst.of("patched")] == list(range(1, 1001))
    finally:
        inst.close()
        finalize(provider)
        purge_prefix(redis_url, prefix)  # on RabbitMQ the listener's binding epoch too


def test_an_event_carries_its_values_as_a_call_carries_them(broker: str, redis_url: str) -> None:
    # One encoder for the wire (protocol.dumps): a date in an event's data and in its context's query
    # travels as its JSON form, as it would in a call, instead of the context's query being left out.
    provider, prefix = local_provider(broker, redis_url, "forms")
    inst = Instance(broker, redis_url, prefix, "app-forms", events=["created"])
    when = dt.datetime(2026, 11, 28, 12, 30, tzinfo=dt.UTC)
    try:
        provider.service("articles").create({"when": when}, {"query": {"since": when, "tag": "q"}})
        wait_for(lambda: inst.of("created"), timeout=10, what="the created event")
        _, data, context = inst.heard[0]
        assert data["when"] == "2026-11-28T12:30:00Z"
        assert context["params"] == {"query": {"since": "2026-11-28T12:30:00Z", "tag": "q"}}
    finally:
        inst.close()
        finalize(provider)
        purge_prefix(redis_url, prefix)


def test_publish_events_false_publishes_nothing(broker: str, redis_url: str) -> None:
    prefix = f"cs-ev-{os.urandom(4).hex()}"
    quiet = App()
    quiet.use("articles", __import__("celery_services").MemoryService())
    loud = App()
    loud.use("articles", __import__("celery_services").MemoryService())
    base = {
        "broker_url": broker,
        "result_backend": redis_url,
        "registry_prefix": prefix,
        "remote_services": [],
    }
    # Keys of this test only: nothing another test (or an earlier run) left can be heard here.
    quiet_key, loud_key = f"quiet-{os.urandom(3).hex()}", f"loud-{os.urandom(3).hex()}"
    distribute(quiet, DistributionSettings(key=quiet_key, publish_events=False, **base))
    distribute(loud, DistributionSettings(key=loud_key, **base))
    listener = Instance(
        broker,
        redis_url,
        prefix,
        "listener",
        remote_services=[quiet_key, loud_key],
        remote_service_path=lambda info: f"{info.key}/{info.path}",
    )
    heard: list[str] = []
    listener.app.service(f"{quiet_key}/articles").on("created", lambda d, c: heard.append("quiet"))
    listener.app.service(f"{loud_key}/articles").on("created", lambda d, c: heard.append("loud"))
    try:
        quiet.service("articles").create({"title": "unheard"})
        loud.service("articles").create({"title": "heard"})
        # One queue, first in first out: had the quiet event been published, it would come first.
        wait_for(lambda: "loud" in heard, timeout=10, what="positive control")
        assert heard == ["loud"]
        assert quiet.distribution is not None and quiet.distribution.events.published == 0
    finally:
        for app in (listener.app, quiet, loud):
            finalize(app)
        purge_prefix(redis_url, prefix)


KILLED_CONSUMER = """
import sys, threading
from celery_services import App, DistributionSettings, distribute
app = App()
distribute(app, DistributionSettings(key="doomed", broker_url=sys.argv[1], registry_prefix=sys.argv[2],
           heartbeat_interval=0.5, services=[]))
app.service("articles").on("created", print)  # listened to: the event is bound, the queue declared
print(app.distribution.events.queue_name, flush=True)
threading.Event().wait()
"""


def test_queues_of_a_sigkilled_consumer_are_swept(redis_url: str) -> None:
    prefix = f"cs-ev-{os.urandom(4).hex()}"
    provider = App()
    provider.use("articles", __import__("celery_services").MemoryService())
    base = {"broker_url": redis_url, "registry_prefix": prefix, "heartbeat_interval": 0.5}
    distribute(provider, DistributionSettings(key=f"src-{os.urandom(3).hex()}", remote_services=[], **base))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CONSUMER, redis_url, prefix], stdout=subprocess.PIPE, cwd=ROOT
    )
    survivor = App()
    try:
        assert proc.stdout is not None
        queue = proc.stdout.readline().decode().strip()
        store = redis.Redis.from_url(redis_url)
        binding = f"_kombu.binding.{DistributionSettings().events_exchange}"

        def bound() -> bool:
            return any(queue in m.decode() for m in store.smembers(binding))

        wait_for(bound, timeout=10, what="doomed consumer bound")
        distribute(survivor, DistributionSettings(key="survivor", services=[], **base))
        proc.kill()
        proc.wait()
        provider.service("articles").create({"title": "pile-up"})  # lands in the dead queue meanwhile
        wait_for(lambda: not bound() and not store.exists(queue), timeout=10, what="dead queue swept")
    finally:
        if proc.poll() is None:
            proc.kill()
        for app in (survivor, provider):
            finalize(app)


def test_a_broker_failure_never_breaks_the_call_that_emitted(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_services import MemoryService

    prefix = f"cs-ev-{os.urandom(4).hex()}"
    app = App()
    app.use("articles", MemoryService())
    distribute(
        app,
        DistributionSettings(
            key="cut-off",
            broker_url="redis://127.0.0.1:1/0",  # the events' broker is down; the registry is not
            result_backend=redis_url,
            registry_prefix=prefix,
            remote_services=[],
        ),
    )
    try:
        # What the dead broker costs each call, counted: the publish of its event tries two connections at
        # most (one retry), or none while the bus fails fast after an error; never a retry until it answers.
        attempts = ConnectionAttempts(monkeypatch, port=1)
        assert app.service("articles").create({"title": "still created"})["title"] == "still created"
        assert 1 <= attempts.count <= 2, attempts.count
        assert app.service("articles").create({"title": "and again"})["id"] == 1
        assert attempts.count <= 4, attempts.count
        assert app.distribution is not None and app.distribution.events.publish_failures == 2
    finally:
        finalize(app)
        purge_prefix(redis_url, prefix)
