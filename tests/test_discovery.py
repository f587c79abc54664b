"""Registry-driven discovery across processes: real provider workers, real consumer apps, real Redis."""

from __future__ import annotations

import json
import logging
import os
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


def test_collisions_first_mounted_wins_and_is_reported(
    redis_url: str, prefix: str, consumers: list[Consumer], caplog: pytest.LogCaptureFixture
) -> None:
    write_manifest(redis_url, prefix, "zeta", ["shared"])
    consumer = Consumer(redis_url, prefix)
    consumers.append(consumer)
    assert consumer.app.services["shared"].key == "zeta"
    with caplog.at_level(logging.WARNING, logger="celery_services.discovery"):
        write_manifest(redis_url, prefix, "alpha", ["shared"])
        wait_for(lambda: consumer.distribution.discovery.collisions, timeout=5, what="collision seen")
    assert consumer.app.services["shared"].key == "zeta"  # first mounted wins, not the alphabet
    assert consumer.distribution.discovery.collisions == {"shared": ["alpha"]}
    assert "collision" in caplog.text and "alpha" in caplog.text
    # A fresh consumer seeing both at once picks deterministically: the alphabetically first key.
    fresh = Consumer(redis_url, prefix)
    consumers.append(fresh)
    assert fresh.app.services["shared"].key == "alpha"
    assert fresh.distribution.discovery.collisions == {"shared": ["zeta"]}


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
