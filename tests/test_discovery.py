"""Registry-driven discovery across processes: real provider workers, real consumer apps, real Redis."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_services import (
    App,
    DistributionSettings,
    MethodNotAllowed,
    NotFound,
    Service,
    Timeout,
    Unavailable,
    distribute,
    finalize,
)
from celery_services.distribution import Distribution
from celery_services.testing import WorkerProcess, wait_for

from .support import cleanup, fresh_prefix, registered_provider, write_manifest

STANDARD = ["find", "get", "create", "update", "patch", "remove"]
HEARTBEAT = 0.5  # the consumers' (they probe the registry every quarter of it) and registered_provider's
#: A provider heartbeat so long (its manifest lives 2.5 of them, 75 s) that only a withdrawal can remove it
#: during a test: a removal seen is then a withdrawal, not an expiry, however slow the machine.
NEVER_EXPIRES = "30"


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    yield from fresh_prefix(redis_url, "disc")


class Consumer:
    """A consumer app recording its ``service`` / ``service-removed`` events."""

    def __init__(self, redis_url: str, prefix: str, **options: Any) -> None:
        self.app = App()
        self.events: list[tuple[str, str]] = []
        self.proxies: list[Any] = []
        self.app.on("service", self._mounted)
        self.app.on("service-removed", lambda svc: self.events.append(("removed", svc.path)))
        settings = DistributionSettings(
            key=options.pop("key", f"consumer-{os.urandom(3).hex()}"),
            broker_url=redis_url,
            result_backend=redis_url,
            registry_prefix=prefix,
            heartbeat_interval=HEARTBEAT,
            services=options.pop("services", []),
            timeout=8,
            **options,
        )
        self.distribution: Distribution = distribute(self.app, settings)

    def _mounted(self, svc: Any) -> None:
        self.events.append(("service", svc.path))
        self.proxies.append(svc)

    def close(self) -> None:
        finalize(self.app)


@pytest.fixture
def consumers(redis_url: str, prefix: str) -> Iterator[list[Consumer]]:
    made: list[Consumer] = []
    yield made
    for consumer in made:
        consumer.close()


def test_consumer_started_before_provider(redis_url: str, prefix: str, consumers: list[Consumer]) -> None:
    prov = registered_provider(redis_url, prefix)
    prov.env["CELERY_SERVICES_HEARTBEAT_INTERVAL"] = NEVER_EXPIRES
    consumer = Consumer(
        redis_url,
        prefix,
        remote_services=[prov.key],
        distributed_methods=[*STANDARD, "publish_article"],
        distributed_events=["created", "article_published"],
    )
    consumers.append(consumer)
    assert "articles" not in consumer.app.services
    with pytest.raises(Timeout):
        consumer.distribution.wait_for("articles", timeout=0.2)
    try:
        with prov.worker():
            articles = consumer.distribution.wait_for("articles", timeout=10)
            assert articles.create({"title": "hi"})["title"] == "hi"
            proxy = next(p for p in consumer.proxies if p.path == "articles")
            assert proxy.remote is True
            assert proxy.key == prov.key
            assert "publish_article" in proxy.methods
            assert proxy.events == ("created", "article_published")  # what the consumer asked for
            with pytest.raises(MethodNotAllowed):
                consumer.app.service("probe").slow({})  # offered, but not in the consumer's list
            assert proxy.remote_options == {}
            assert proxy.publish_article({"id": 0})["published"] is True
            assert "probe" in consumer.app.services
        # A warm stop withdraws at once: the proxies go long before the manifest's TTL (75 s) could end.
        wait_for(lambda: ("removed", "articles") in consumer.events, timeout=10, what="articles removed")
    finally:
        cleanup(redis_url, redis_url, prov.key, prov.runs_key)


def test_provider_first_is_mounted_when_distribute_returns_and_restart(
    redis_url: str, prefix: str, consumers: list[Consumer]
) -> None:
    prov = registered_provider(redis_url, prefix)
    prov.env["CELERY_SERVICES_HEARTBEAT_INTERVAL"] = NEVER_EXPIRES
    try:
        with prov.worker():
            consumer = Consumer(redis_url, prefix, remote_services=[prov.key])
            consumers.append(consumer)
            # No discovery delay: mounted, and announced, before distribute() returned (how long that takes
            # is measured by benchmarks/discovery.py).
            assert sorted(consumer.events) == [("service", "articles"), ("service", "probe")]
            assert "articles" in consumer.app.services
            assert consumer.app.service("articles").find() == []
        # Withdrawn by the warm stop: gone long before the manifest's TTL (75 s) could end.
        wait_for(lambda: "articles" not in consumer.app.services, timeout=10, what="withdrawn")
        with prov.worker():
            consumer.distribution.wait_for("articles", timeout=10)
            assert consumer.app.service("articles").find() == []
        assert consumer.events.count(("service", "articles")) == 2
        assert consumer.events.count(("removed", "articles")) >= 1
    finally:
        cleanup(redis_url, redis_url, prov.key, prov.runs_key)


def test_replicas_killed_one_then_the_other(redis_url: str, prefix: str, consumers: list[Consumer]) -> None:
    prov = registered_provider(redis_url, prefix)
    # The promise is a bound (a dead provider leaves within 3 of its heartbeats): a heartbeat of 2 s makes
    # scheduling noise small next to it. The manifest's TTL is 2.5 heartbeats (5 s); the consumer probes
    # every quarter of its own (0.5 s) heartbeat.
    heartbeat = 2.0
    prov.env["CELERY_SERVICES_HEARTBEAT_INTERVAL"] = str(heartbeat)
    first, second = prov.worker(), prov.worker()
    try:
        first.start()
        second.start()
        consumer = Consumer(redis_url, prefix, remote_services=[prov.key])
        consumers.append(consumer)
        probe = consumer.app.service("probe")
        assert len(consumer.distribution.discovery.mounted["probe"].instances) == 2
        first.kill()
        for i in range(20):  # calls keep working on the survivor, the proxy stays
            assert probe.get(i)["pid"] == second.pid
        assert "probe" in consumer.app.services
        second.kill()
        killed = time.monotonic()
        wait_for(lambda: ("removed", "probe") in consumer.events, timeout=20, what="probe removed")
        detected = time.monotonic() - killed
        assert detected < 3 * heartbeat, (
            f"removed {detected:.2f}s after the kill, past 3 heartbeats ({3 * heartbeat:.0f}s; "
            f"the manifest's TTL is 2.5 heartbeats, {2.5 * heartbeat:.0f}s)"
        )
        with pytest.raises(Unavailable):
            probe.get(1)  # a proxy whose provider is gone fails at once (Unavailable, not a Timeout) ...
        assert redis.Redis.from_url(redis_url).llen(prov.key) == 0  # ... and sends nothing
        with pytest.raises(NotFound):
            consumer.app.service("probe")
    finally:
        first.stop()
        second.stop()
        cleanup(redis_url, redis_url, prov.key, prov.runs_key)


def test_malformed_manifest_is_skipped(
    redis_url: str, prefix: str, consumers: list[Consumer], caplog: pytest.LogCaptureFixture
) -> None:
    store = redis.Redis.from_url(redis_url)
    store.set(f"{prefix}:manifest:broken:1", b"{not json", ex=60)
    store.set(f"{prefix}:manifest:foreign:1", json.dumps({"hello": "world"}), ex=60)
    write_manifest(redis_url, prefix, "good", ["things"])
    with caplog.at_level(logging.WARNING, logger="celery_services.registry"):
        consumer = Consumer(redis_url, prefix)
        consumers.append(consumer)
    assert "things" in consumer.app.services
    assert "broken" in caplog.text and "foreign" in caplog.text


def put_manifest(
    redis_url: str,
    prefix: str,
    key: str,
    paths: list[str] | None = None,
    *,
    services: list[dict[str, Any]] | None = None,
    started_at: float | None = None,
    instance: str = "fake-1",
) -> int:
    """Register by hand an instance of ``key`` started at ``started_at`` (default now), and announce it.

    Returns:
        The size of the manifest written, in bytes.
    """
    now = time.time()
    payload = json.dumps(
        {
            "key": key,
            "instance": instance,
            "host": "nowhere",
            "pid": 1,
            "started_at": now if started_at is None else started_at,
            "heartbeat": now,
            "protocol": 1,
            "services": services
            if services is not None
            else [{"path": p, "methods": ["get"], "events": ["created"], "options": {}} for p in paths or []],
        }
    )
    store = redis.Redis.from_url(redis_url)
    store.set(f"{prefix}:manifest:{key}:{instance}", payload, ex=60)
    store.publish(f"{prefix}:registry", json.dumps({"op": "up", "key": key, "instance": instance}))
    store.close()
    return len(payload.encode())


def remove_manifest(redis_url: str, prefix: str, key: str, instance: str = "fake-1") -> None:
    """Withdraw by hand an instance written by :func:`put_manifest` (delete, then announce ``"down"``)."""
    store = redis.Redis.from_url(redis_url)
    store.delete(f"{prefix}:manifest:{key}:{instance}")
    store.publish(f"{prefix}:registry", json.dumps({"op": "down", "key": key, "instance": instance}))
    store.close()


def collision_warnings(caplog: pytest.LogCaptureFixture, path: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "celery_services.discovery" and f"collision at '{path}'" in r.getMessage()
    ]


def test_collisions_earliest_registered_wins_whenever_the_consumer_started(
    redis_url: str, prefix: str, consumers: list[Consumer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_services.discovery")
    now = time.time()
    put_manifest(redis_url, prefix, "zeta", ["shared"], started_at=now - 100)  # registered first, sorts last
    early = Consumer(redis_url, prefix)  # started before the second key registers
    consumers.append(early)
    assert early.app.services["shared"].key == "zeta"
    put_manifest(redis_url, prefix, "alpha", ["shared"], started_at=now)
    wait_for(lambda: early.distribution.discovery.collisions, timeout=5, what="collision seen")
    late = Consumer(redis_url, prefix)  # started after: sees both at once
    consumers.append(late)
    for consumer in (early, late):  # one path, one app, everywhere
        assert consumer.app.services["shared"].key == "zeta"
        assert consumer.distribution.discovery.collisions == {"shared": ["alpha"]}
    assert ("removed", "shared") not in early.events
    [first, second] = collision_warnings(caplog, "shared")  # one per consumer
    assert "zeta kept (registered first), alpha refused" in first and first == second
    # Another change of the view is no change of the decision: not logged again.
    put_manifest(redis_url, prefix, "other", ["elsewhere"])
    for consumer in (early, late):
        consumer.distribution.wait_for("elsewhere", timeout=5)
    assert len(collision_warnings(caplog, "shared")) == 2


def test_collision_winner_replaces_a_mounted_proxy_and_restart_loses_seniority(
    redis_url: str, prefix: str, consumers: list[Consumer]
) -> None:
    now = time.time()
    put_manifest(redis_url, prefix, "zeta", ["shared"], started_at=now)
    consumer = Consumer(redis_url, prefix)
    consumers.append(consumer)
    assert consumer.app.services["shared"].key == "zeta"
    # An older key appears (e.g. its entry is back after a Redis restart): the proxy mounted is replaced.
    put_manifest(redis_url, prefix, "alpha", ["shared"], started_at=now - 100)
    # (Swapped on the watcher thread: unmounted, then mounted; a reader may find the path empty between.)
    wait_for(lambda: getattr(consumer.app.services.get("shared"), "key", None) == "alpha", what="alpha")
    assert consumer.distribution.discovery.collisions == {"shared": ["zeta"]}
    assert consumer.events.count(("service", "shared")) == 2 and ("removed", "shared") in consumer.events
    # alpha restarts: its new instance's started_at is the newest, so zeta is now the senior key.
    remove_manifest(redis_url, prefix, "alpha")
    put_manifest(redis_url, prefix, "alpha", ["shared"], started_at=now + 100, instance="fake-2")
    wait_for(
        lambda: consumer.distribution.discovery.collisions == {"shared": ["alpha"]},
        timeout=5,
        what="alpha lost",
    )
    assert consumer.app.services["shared"].key == "zeta"


def test_a_change_of_options_only_reaches_the_mounted_proxy(
    redis_url: str, prefix: str, consumers: list[Consumer]
) -> None:
    # A deploy that changes only a service's options (same methods, same events) is a change of the offer
    # too: the proxy mounted must say what the provider says now, and the app hear of it, as for a method.
    def offer(options: dict[str, Any]) -> None:
        service = {"path": "notes", "methods": ["get"], "events": ["created"], "options": options}
        put_manifest(redis_url, prefix, "opts", services=[service])

    offer({"page_size": 10})
    consumer = Consumer(redis_url, prefix)
    consumers.append(consumer)
    notes = consumer.app.services["notes"]
    assert notes.service.remote_options == {"page_size": 10}
    changed: list[Any] = []
    consumer.app.on("service-changed", changed.append)
    offer({"page_size": 50})
    wait_for(lambda: notes.service.remote_options == {"page_size": 50}, timeout=5, what="the new options")
    assert consumer.app.services["notes"] is notes  # changed in place, not remounted
    wait_for(lambda: changed == [notes], timeout=5, what="service-changed emitted")


def test_pins_override_seniority_and_leave_the_path_empty_while_absent(
    redis_url: str, prefix: str, consumers: list[Consumer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_services.discovery")
    now = time.time()
    put_manifest(redis_url, prefix, "zeta", ["shared"], started_at=now - 100)
    put_manifest(redis_url, prefix, "alpha", ["shared"], started_at=now)
    pinned = Consumer(redis_url, prefix, pins={"shared": "alpha"})
    consumers.append(pinned)
    assert pinned.app.services["shared"].key == "alpha"  # the younger key, because pinned
    assert pinned.distribution.discovery.collisions == {"shared": ["zeta"]}
    waiting = Consumer(redis_url, prefix, pins={"/shared/": "beta"})  # beta is not registered (yet)
    consumers.append(waiting)
    assert "shared" not in waiting.app.services  # a promise, not a preference: nobody else is mounted
    assert waiting.distribution.discovery.collisions == {"shared": ["alpha", "zeta"]}
    assert any("pinned to beta" in message for message in collision_warnings(caplog, "shared"))
    put_manifest(redis_url, prefix, "beta", ["shared"], started_at=now + 100)
    waiting.distribution.wait_for("shared", timeout=5)
    assert waiting.app.services["shared"].key == "beta"
    assert waiting.distribution.discovery.collisions == {"shared": ["alpha", "zeta"]}
    # The pinned key goes: its path empties, though beta and zeta still offer it.
    remove_manifest(redis_url, prefix, "alpha")
    wait_for(lambda: "shared" not in pinned.app.services, timeout=5, what="pinned key gone")
    assert pinned.distribution.discovery.collisions == {"shared": ["beta", "zeta"]}
    assert ("removed", "shared") in pinned.events


def test_a_local_service_wins_over_every_remote_claim(
    redis_url: str, prefix: str, consumers: list[Consumer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_services.discovery")
    consumer = Consumer(redis_url, prefix)
    consumers.append(consumer)
    local = consumer.app.use("shared", Service())
    put_manifest(redis_url, prefix, "zeta", ["shared"])
    wait_for(lambda: consumer.distribution.discovery.collisions, timeout=5, what="collision seen")
    assert consumer.distribution.discovery.collisions == {"shared": ["zeta"]}
    assert consumer.app.services["shared"] is local
    put_manifest(redis_url, prefix, "other", ["elsewhere"])
    consumer.distribution.wait_for("elsewhere", timeout=5)
    [warning] = collision_warnings(caplog, "shared")  # once, not at every change of the view
    assert "a local service kept, zeta refused" in warning


# -- manifest limits --------------------------------------------------------------------------------------


def test_oversized_manifest_is_skipped_and_consumer_stays_responsive(
    redis_url: str, prefix: str, consumers: list[Consumer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_services.registry")
    put_manifest(redis_url, prefix, "good", ["things"])
    huge = [{"path": f"service-{n:05}", "methods": ["get"], "events": ["created"]} for n in range(20_000)]
    size = put_manifest(redis_url, prefix, "huge", services=huge)
    assert size > 1_400_000  # the case of the issue: 20,000 services, 1.5 MB
    consumer = Consumer(redis_url, prefix)  # default limits: 256 KiB
    consumers.append(consumer)
    assert set(consumer.app.services) == {"things"}  # nothing mounted from it, nor events bound
    assert consumer.distribution.registry.view["huge"]["fake-1"].services == []  # alive, offering nothing
    [warning] = [r.getMessage() for r in caplog.records if "huge" in r.getMessage()]
    assert "max_manifest_bytes" in warning

    registry = consumer.distribution.registry
    snapshots: list[int] = []
    snapshot = registry.snapshot

    def counted() -> Any:
        snapshots.append(1)
        return snapshot()

    registry.snapshot = counted  # type: ignore[method-assign]
    put_manifest(redis_url, prefix, "later", ["more"])  # the watcher thread still answers at once ...
    consumer.distribution.wait_for("more", timeout=10)
    wait_for(lambda: len(snapshots) >= 2, timeout=15, what="two rescans")  # ... and rescans
    assert len([r for r in caplog.records if "huge" in r.getMessage()]) == 1  # logged once, not per rescan

    # A consumer whose byte cap lets it through parses it, and stops at the count of services.
    roomy = Consumer(redis_url, prefix, max_manifest_bytes=4_000_000)
    consumers.append(roomy)
    assert set(roomy.app.services) == {"things", "more"}
    assert any("max_manifest_services" in r.getMessage() for r in caplog.records if "huge" in r.getMessage())


def test_manifests_over_count_limits_are_skipped(
    redis_url: str, prefix: str, consumers: list[Consumer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_services.registry")

    def entry(path: str, methods: int = 2, events: int = 2) -> dict[str, Any]:
        return {
            "path": path,
            "methods": ["get", "find", "create"][:methods],
            "events": ["created", "updated", "removed"][:events],
        }

    put_manifest(redis_url, prefix, "many", services=[entry(f"many-{n}") for n in range(4)])
    put_manifest(redis_url, prefix, "wide", services=[entry("wide", methods=3)])
    put_manifest(redis_url, prefix, "noisy", services=[entry("noisy", events=3)])
    put_manifest(redis_url, prefix, "fine", services=[entry(f"fine-{n}") for n in range(3)])
    consumer = Consumer(
        redis_url, prefix, max_manifest_services=3, max_service_methods=2, max_service_events=2
    )
    consumers.append(consumer)
    assert set(consumer.app.services) == {"fine-0", "fine-1", "fine-2"}
    messages = [r.getMessage() for r in caplog.records if r.name == "celery_services.registry"]
    for key, setting in [
        ("many", "max_manifest_services"),
        ("wide", "max_service_methods"),
        ("noisy", "max_service_events"),
    ]:
        [message] = [m for m in messages if f":manifest:{key}:" in m]
        assert setting in message


def test_own_key_never_proxied_and_globs(redis_url: str, prefix: str, consumers: list[Consumer]) -> None:
    write_manifest(redis_url, prefix, "mine", ["own"])
    write_manifest(redis_url, prefix, "other", ["wanted", "unwanted"])
    consumer = Consumer(redis_url, prefix, key="mine", remote_services=["other/wanted"])
    consumers.append(consumer)
    assert set(consumer.app.services) == {"wanted"}


def test_alias_path_and_callable_filter(redis_url: str, prefix: str, consumers: list[Consumer]) -> None:
    write_manifest(redis_url, prefix, "other", ["articles", "users"])
    consumer = Consumer(
        redis_url,
        prefix,
        remote_services=lambda info: info.path == "articles",
        remote_service_path=lambda info: f"{info.key}/{info.path}",
    )
    consumers.append(consumer)
    assert set(consumer.app.services) == {"other/articles"}


def test_healthcheck_ok_unknown_and_failing(redis_url: str, prefix: str, consumers: list[Consumer]) -> None:
    prov = registered_provider(redis_url, prefix)
    ghost = f"ghost-{os.urandom(3).hex()}"
    write_manifest(redis_url, prefix, ghost, ["phantom"])  # registered, but no worker serves it
    try:
        with prov.worker():
            consumer = Consumer(redis_url, prefix)
            consumers.append(consumer)
            assert consumer.distribution.healthcheck(prov.key) == {"articles": True, "probe": True}
            with pytest.raises(NotFound):
                consumer.distribution.healthcheck("nobody")
            before = time.time()
            with pytest.raises(Unavailable) as unhealthy:
                consumer.distribution.healthcheck(ghost, timeout=0.5)
            # Its question to the ghost, still queued, carries the 0.5 s asked for, not the default 2 s.
            [question] = redis.Redis.from_url(redis_url).lrange(ghost, 0, -1)
            assert 0.5 <= json.loads(question)["headers"]["cs_deadline"] - before < 2.0
            assert unhealthy.value.code == 503
            assert unhealthy.value.data == {"phantom": False}
            with pytest.raises(Unavailable) as partial:
                consumer.distribution.healthcheck(timeout=0.5)
            assert partial.value.data == {"articles": True, "probe": True, "phantom": False}
    finally:
        cleanup(redis_url, redis_url, prov.key, prov.runs_key, ghost)


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_dynamic_custom_service(redis_url: str, prefix: str, consumers: list[Consumer], pool: str) -> None:
    prov = registered_provider(redis_url, prefix, TEST_COMMANDS_KEY=f"test-commands:{os.urandom(3).hex()}")
    commands = prov.env["TEST_COMMANDS_KEY"]
    store = redis.Redis.from_url(redis_url)

    def command(what: str) -> str:
        store.rpush(commands, what)
        _, outcome = store.blpop([f"{commands}:done"], timeout=10) or (None, b"no answer")
        return str(outcome.decode())

    consumer = Consumer(
        redis_url,
        prefix,
        remote_services=[prov.key],
        remote_service_path=lambda info: f"remote-{info.path}",
        distributed_methods=["get", "shout"],
        distributed_events=["shouted"],
    )
    consumers.append(consumer)
    worker = WorkerProcess("tests.apps.dynamic", prov.key, env=prov.env, pool=pool, concurrency=2)
    try:
        with worker:
            outcome = command("add")
            if pool == "prefork":
                assert outcome.startswith("refused:") and "--pool threads" in outcome
                return
            assert outcome == "added"
            custom = consumer.distribution.wait_for("remote-custom", timeout=5)
            assert custom.shout("hello") == "HELLO"
            assert custom.get(3) == {"id": 3}
            assert "shouted" in custom.events
            assert command("remove") == "removed"
            wait_for(lambda: ("removed", "remote-custom") in consumer.events, timeout=5, what="removed")
    finally:
        store.rpush(commands, "stop")
        cleanup(redis_url, redis_url, prov.key, commands, f"{commands}:done")


@pytest.mark.timeout(120)
def test_a_prefork_child_follows_the_registry(redis_url: str, prefix: str, consumers: list[Consumer]) -> None:
    # The calls a prefork worker serves run in its pool's children, forked before the provider they call
    # started, and still running when it dies: each child must see both, as its main process does.
    target = registered_provider(redis_url, prefix, "late")
    # The child's first snapshot takes 3 s: meanwhile it holds its parent's view of the fork.
    relay = registered_provider(
        redis_url, prefix, "relay", TEST_RELAY_TARGET=target.key, TEST_SLOW_CHILD_SNAPSHOT="3"
    )
    consumer = Consumer(redis_url, prefix, remote_services=[relay.key])
    consumers.append(consumer)
    worker = WorkerProcess("tests.apps.relay", relay.key, env=relay.env, pool="prefork", concurrency=1)
    late = target.worker()
    seen: list[dict[str, Any]] = []

    def relayed() -> dict[str, Any]:
        answer = consumer.app.service("relay").get(1, {"timeout": 15})
        assert answer.pop("pid") != worker.pid  # served in the pool's child
        seen.append(answer)
        return answer

    def relayed_until(expected: dict[str, Any]) -> dict[str, Any]:
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: relayed() == expected, timeout=15)
        return seen[-1]

    gone = {"mounted": "NotFound", "direct": "Unavailable"}
    try:
        with worker:
            consumer.distribution.wait_for("relay", timeout=10)
            assert relayed() == gone
            late.start()
            reached = {"mounted": late.pid, "direct": late.pid}
            assert relayed_until(reached) == reached
            late.kill()
            # Seen dead once its entry expired: its calls fail at once, not after their timeout.
            assert relayed_until(gone) == gone
    finally:
        late.stop()
        cleanup(redis_url, redis_url, relay.key, target.key, relay.runs_key, target.runs_key)


def test_a_proxy_offers_exactly_what_its_provider_offers_now() -> None:
    from celery_services.distribution.caller import RemoteService

    sent: list[tuple[Any, ...]] = []

    def send(*args: Any, **fields: Any) -> None:
        sent.append((*args, fields))

    proxy = RemoteService(send, "k", "notes", ["get", "pin-it"])
    assert proxy.get is proxy.get  # made once: a call does not build its method again
    proxy.get(1, {"timeout": 2})
    proxy.pin_it({"n": 1}, None)
    assert [s[:3] for s in sent] == [("k", "notes", "get"), ("k", "notes", "pin-it")]
    # The provider came back without get and with find: the proxy follows at once.
    proxy._offer(["find"], [])
    with pytest.raises(AttributeError):
        proxy.get(1, {})
    with pytest.raises(AttributeError):
        proxy.pin_it({}, None)
    proxy.find({})
    assert sent[-1][:3] == ("k", "notes", "find")


@pytest.mark.timeout(20)
def test_a_method_made_while_the_offer_changes_is_not_kept() -> None:
    # A thread making a proxy's method (its first lookup) while discovery changes the offer kept that method
    # as an attribute, though the provider had stopped offering it: later calls went on to the provider.
    from celery_services.distribution.caller import RemoteService

    proxy = RemoteService(lambda *args, **fields: None, "k", "notes", ["get"])
    making, go = threading.Event(), threading.Event()
    make = proxy._method

    def slow(name: str) -> Any:
        making.set()
        go.wait(10)
        return make(name)

    proxy.__dict__["_method"] = slow  # the first lookup of get is held while it makes the method
    looked_up = threading.Thread(target=lambda: proxy.get)
    looked_up.start()
    making.wait(10)
    offer = threading.Thread(target=proxy._offer, args=(["find"], []))
    offer.start()
    offer.join(0.5)  # unguarded, the offer is made by now; guarded, it waits for the lookup
    go.set()
    for thread in (looked_up, offer):
        thread.join(10)
    with pytest.raises(AttributeError):
        proxy.get(1, {})
    assert "get" not in proxy.__dict__
