"""The Redis registry against a real Redis: publication, heartbeats, discovery, deaths, bad entries, costs."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from celery_services.distribution.manifest import (
    PROTOCOL_VERSION,
    Manifest,
    RegistryLayout,
    ServiceManifest,
    View,
    decode_manifest,
)
from celery_services.distribution.registry import Registry

LOGGER = "celery_services.registry"


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> float:
    """Poll ``predicate`` until it is truthy; return the seconds it took, fail after ``timeout``."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        threading.Event().wait(0.005)


class Recorder:
    """Collects the views a watcher reports, from its thread."""

    def __init__(self) -> None:
        self.views: list[View] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, view: View) -> None:
        with self._lock:
            self.views.append(view)
            self.threads.add(threading.current_thread().name)

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.views)

    @property
    def latest(self) -> View | None:
        with self._lock:
            return self.views[-1] if self.views else None

    def has(self, key: str, instance: str | None = None) -> bool:
        latest = self.latest
        return latest is not None and key in latest and (instance is None or instance in latest[key])


def services(*paths: str, methods: tuple[str, ...] = ("find", "get")) -> list[ServiceManifest]:
    return [ServiceManifest(path=p, methods=list(methods), events=["created"]) for p in paths]


def manifest(key: str, instance: str = "i1", paths: tuple[str, ...] = ("articles",)) -> Manifest:
    return Manifest.local(key, services(*paths), instance=instance)


@pytest.fixture
def prefix(unique: str, redis_url: str) -> Iterator[str]:
    name = f"test-registry-{unique}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def make(redis_url: str, prefix: str) -> Iterator[Callable[..., Registry]]:
    made: list[Registry] = []

    def factory(**kwargs: Any) -> Registry:
        registry = Registry(redis_url, prefix=prefix, **kwargs)
        made.append(registry)
        return registry

    yield factory
    for registry in made:
        registry.close()


def subscribe(raw: redis.Redis, prefix: str) -> Any:
    pubsub = raw.pubsub()
    pubsub.subscribe(RegistryLayout(prefix).channel)
    wait_for(lambda: (pubsub.get_message(timeout=0.01) or {}).get("type") == "subscribe", what="subscription")
    return pubsub


def announcements(pubsub: Any) -> list[dict[str, str]]:
    found = []
    while (message := pubsub.get_message(timeout=0.05)) is not None:
        found.append(json.loads(message["data"]))
    return found


# -- manifests --------------------------------------------------------------------------------------------


def test_manifest_validation_and_lookup() -> None:
    m = manifest("my-app", paths=("articles", "api/v1/users"))
    assert m.protocol == PROTOCOL_VERSION
    assert m.service("api/v1/users") is not None and m.service("nope") is None
    assert m.same_content(m.model_copy(update={"heartbeat": m.heartbeat + 10}))
    assert not m.same_content(m.model_copy(update={"services": services("other")}))
    for bad_key in ("my.app", "a:b", "", "a b"):
        with pytest.raises(ValidationError):
            Manifest.local(bad_key, services("articles"))
    for bad_path in ("/articles", "articles/", "a//b", "a.b", "a b"):
        with pytest.raises(ValidationError):
            ServiceManifest(path=bad_path, methods=[], events=[])
    with pytest.raises(ValidationError):
        Manifest.local("app", services("articles", "articles"))
    with pytest.raises(ValidationError):
        m.key = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="protocol 2"):
        decode_manifest(m.model_copy(update={"protocol": 2}).model_dump_json())
    with pytest.raises(ValueError, match="stored under"):
        decode_manifest(m.model_dump_json(), key="my-app", instance="other")


# -- provider ---------------------------------------------------------------------------------------------


def test_publish_snapshot_round_trip(make: Callable[..., Registry], raw: redis.Redis, prefix: str) -> None:
    registry = make(heartbeat_interval=2.0)
    original = manifest("app-a", paths=("articles", "api/users"))
    written = registry.publish(original)
    registry.publish(manifest("app-a", instance="i2"))
    registry.publish(manifest("app-b"))

    snapshot = registry.snapshot()
    assert set(snapshot) == {"app-a", "app-b"} and set(snapshot["app-a"]) == {"i1", "i2"}
    assert snapshot["app-a"]["i1"] == written and written.same_content(original)
    assert 4000 < raw.pttl(RegistryLayout(prefix).name("app-a", "i1")) <= 5000  # TTL = 2.5 heartbeats

    rows = registry.list()
    assert [row.key for row in rows] == ["app-a", "app-b"]
    assert [i.instance for i in rows[0].instances] == ["i1", "i2"]
    first = rows[0].instances[0]
    assert [s.path for s in first.services] == ["articles", "api/users"] and 0 <= first.heartbeat_age < 5


def test_heartbeat_keeps_entry_alive_silently(
    make: Callable[..., Registry], raw: redis.Redis, prefix: str
) -> None:
    # An entry lives 2.5 heartbeats (its TTL, 1 s here) after its last one: a heartbeat thread held up by a
    # loaded machine has 1.5 heartbeats (0.6 s) before the entry expires under it.
    heartbeat = 0.4
    ttl = 2.5 * heartbeat
    registry = make(heartbeat_interval=heartbeat)
    name = RegistryLayout(prefix).name("app", "i1")
    pubsub = subscribe(raw, prefix)
    m = manifest("app")
    registry.start_heartbeat(lambda: m)
    wait_for(lambda: raw.exists(name), what="first heartbeat")
    start = time.time()

    def alive_and_past_two_ttls() -> bool:
        payload = raw.get(name)
        assert payload is not None, "entry expired although heartbeats run"
        return Manifest.model_validate_json(payload).heartbeat > start + 2 * ttl

    wait_for(alive_and_past_two_ttls, timeout=10, what="heartbeats past 2 TTLs")
    assert [a["op"] for a in announcements(pubsub)] == ["up"]  # heartbeats are never announced
    pubsub.close()


def test_heartbeat_republishes_deleted_entry(
    make: Callable[..., Registry], raw: redis.Redis, prefix: str
) -> None:
    registry = make(heartbeat_interval=0.2)
    name = RegistryLayout(prefix).name("app", "i1")
    m = registry.publish(manifest("app"))
    registry.start_heartbeat(lambda: m)
    pubsub = subscribe(raw, prefix)
    raw.delete(name)  # as a FLUSHDB or a Redis restart would
    wait_for(lambda: raw.exists(name), timeout=2, what="re-publication")
    wait_for(lambda: announcements(pubsub), timeout=2, what="announcement")
    pubsub.close()


def test_heartbeat_announces_changed_content(make: Callable[..., Registry]) -> None:
    provider, consumer = make(heartbeat_interval=0.2), make(rescan_interval=60)
    current = {"m": manifest("app")}
    provider.start_heartbeat(lambda: current["m"])
    seen = Recorder()
    consumer.watch(seen)
    wait_for(lambda: seen.has("app"), what="up")
    current["m"] = manifest("app", paths=("articles", "comments"))
    wait_for(lambda: seen.has("app") and seen.latest["app"]["i1"].service("comments"), what="changed")  # type: ignore[index]


@pytest.mark.timeout(20)
def test_a_heartbeat_never_brings_back_content_older_than_a_publish(
    make: Callable[..., Registry], raw: redis.Redis, prefix: str
) -> None:
    # The heartbeat thread asks the app for its manifest, then writes it. An app that published a newer one
    # in between (a service mounted: Distribution publishes at once) saw it replaced by the older one,
    # announced "changed": consumers unmounted the new service until the next beat (found by a review).
    registry = make(heartbeat_interval=60)  # the first beat only, held in the supplier below
    old, new = manifest("app"), manifest("app", paths=("articles", "users"))
    built, go = threading.Event(), threading.Event()

    def supplier() -> Manifest:
        made = old
        built.set()
        go.wait(10)  # the thread is descheduled between building the manifest and writing it
        return made

    registry.publish(old)
    registry.start_heartbeat(supplier)
    built.wait(10)
    published = registry.publish(new, changed=True)  # the app mounts "users" meanwhile
    pubsub = subscribe(raw, prefix)
    go.set()
    name = RegistryLayout(prefix).name("app", "i1")

    def stored() -> Manifest:
        return Manifest.model_validate_json(raw.get(name) or b"")

    wait_for(lambda: stored().heartbeat > published.heartbeat, what="the beat written, whatever its content")
    assert [service.path for service in stored().services] == ["articles", "users"]
    assert announcements(pubsub) == []  # nothing announced: the content did not change
    pubsub.close()


def test_withdraw_stops_heartbeat(make: Callable[..., Registry], raw: redis.Redis, prefix: str) -> None:
    registry = make(heartbeat_interval=0.1)
    name = RegistryLayout(prefix).name("app", "i1")
    calls = []
    m = manifest("app")
    registry.start_heartbeat(lambda: calls.append(1) or m)
    wait_for(lambda: raw.exists(name), what="first heartbeat")
    registry.withdraw("app", "i1")
    seen = len(calls)
    wait_for(lambda: len(calls) >= seen + 3, what="three more heartbeats")
    assert not raw.exists(name)


# -- consumer ---------------------------------------------------------------------------------------------


def test_watcher_started_before_provider_sees_up_changed_down(make: Callable[..., Registry]) -> None:
    consumer, provider = make(rescan_interval=60), make()
    seen = Recorder()
    consumer.watch(seen)
    assert consumer.wait_synced(5)
    wait_for(lambda: seen.calls == 1, what="initial view")
    assert seen.latest == {}

    provider.publish(manifest("app"))
    wait_for(lambda: seen.has("app", "i1"), timeout=2, what="up")
    provider.publish(manifest("app", paths=("articles", "comments")), changed=True)
    wait_for(lambda: seen.latest["app"]["i1"].service("comments") is not None, timeout=2, what="changed")  # type: ignore[index]
    provider.withdraw("app", "i1")
    wait_for(lambda: seen.latest == {}, timeout=2, what="down")
    assert seen.calls == 4
    assert seen.threads == {"celery_services.registry.watch"}
    assert consumer.view == {}


def test_watcher_started_after_provider(make: Callable[..., Registry]) -> None:
    provider, consumer = make(), make(rescan_interval=60)
    provider.publish(manifest("app"))
    provider.publish(manifest("app", instance="i2"))
    seen = Recorder()
    consumer.watch(seen)
    wait_for(lambda: seen.calls >= 1, what="initial view")
    assert set(seen.views[0]["app"]) == {"i1", "i2"}
    with pytest.raises(RuntimeError):
        consumer.watch(seen)


def test_death_by_expiry_detected_within_three_heartbeats(make: Callable[..., Registry]) -> None:
    # The bound is the promise: the entry lives 2.5 heartbeats (its TTL) after the last one, and the watcher's
    # probe, every quarter of its own heartbeat (0.1 s here), sees it gone: within 3 heartbeats of the death.
    # Heartbeats of 2 s leave 1 s between the TTL and the bound, large next to scheduling noise.
    heartbeat = 2.0
    provider = make(heartbeat_interval=heartbeat)
    consumer = make(heartbeat_interval=0.4, rescan_interval=60)  # no rescan: only the expiry can tell
    seen = Recorder()
    consumer.watch(seen)
    m = manifest("app")
    provider.start_heartbeat(lambda: m)
    wait_for(lambda: seen.has("app"), what="up")
    died = time.monotonic()
    provider.close()  # stops heartbeating without withdrawing, like a SIGKILL
    wait_for(lambda: not seen.has("app"), timeout=3 * heartbeat + 5, what="death")
    detected = time.monotonic() - died
    assert detected < 3 * heartbeat, (
        f"death seen {detected:.2f}s after the last heartbeat, past 3 heartbeats ({3 * heartbeat:.0f}s; "
        f"the entry's TTL is 2.5 heartbeats, {2.5 * heartbeat:.0f}s)"
    )


def test_rescan_catches_what_pubsub_missed(
    make: Callable[..., Registry], raw: redis.Redis, prefix: str
) -> None:
    consumer = make(rescan_interval=0.2)
    seen = Recorder()
    consumer.watch(seen)
    assert consumer.wait_synced(5)
    layout = RegistryLayout(prefix)
    raw.set(layout.name("app", "i1"), manifest("app").model_dump_json(), px=60_000)  # no announcement
    wait_for(lambda: seen.has("app"), timeout=2, what="rescan to find it")
    raw.delete(layout.name("app", "i1"))  # no announcement, no expiry
    wait_for(lambda: not seen.has("app"), timeout=2, what="rescan to drop it")


def test_on_change_only_when_view_changes(
    make: Callable[..., Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, consumer = make(heartbeat_interval=0.1), make(rescan_interval=0.1)
    m = manifest("app")
    provider.start_heartbeat(lambda: m)
    seen = Recorder()
    scans = []
    original = consumer._client.execute_command

    def counting(*args: Any, **options: Any) -> Any:
        if args[0] == "SCAN":
            scans.append(1)
        return original(*args, **options)

    monkeypatch.setattr(consumer._client, "execute_command", counting)
    consumer.watch(seen)
    wait_for(lambda: seen.has("app"), what="up")
    calls = seen.calls
    wait_for(lambda: len(scans) >= 5, what="several rescans over fresh heartbeats")
    assert seen.calls == calls


def test_one_round_trip_per_change(
    make: Callable[..., Registry], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    provider, mortal = make(heartbeat_interval=30), make(heartbeat_interval=0.2)
    consumer = make(heartbeat_interval=0.2, rescan_interval=60)  # probes (EXISTS) every 0.2 s, no rescan
    for n in range(100):  # a populated registry: a rescan would cost a SCAN walk and an MGET of all of it
        provider.publish(manifest(f"app-{n}"))
    seen = Recorder()
    consumer.watch(seen)
    wait_for(lambda: seen.calls == 1, what="initial view")
    assert len(seen.views[0]) == 100
    commands: list[str] = []
    execute_command = consumer._client.execute_command  # a rescan would show as SCAN (then a pipelined MGET)

    def counting(*args: Any, **options: Any) -> Any:
        if args[0] != "EXISTS":  # the liveness probe, one command per heartbeat whatever happens
            commands.append(str(args[0]))
        return execute_command(*args, **options)

    monkeypatch.setattr(consumer._client, "execute_command", counting)
    provider.publish(manifest("app-new"))
    wait_for(lambda: seen.has("app-new"), timeout=2, what="up")
    assert commands == ["GET"]
    provider.publish(manifest("app-new", paths=("articles", "more")), changed=True)
    wait_for(lambda: seen.latest["app-new"]["i1"].service("more") is not None, timeout=2, what="changed")  # type: ignore[index]
    assert commands == ["GET", "GET"]
    provider.withdraw("app-new", "i1")
    wait_for(lambda: not seen.has("app-new"), timeout=2, what="down")
    assert commands == ["GET", "GET"]  # a "down" costs nothing
    mortal.publish(manifest("app-mortal"))  # TTL 0.5 s (2.5 heartbeats), no heartbeat: expires unannounced
    wait_for(lambda: seen.has("app-mortal"), timeout=2, what="up")
    wait_for(lambda: not seen.has("app-mortal"), timeout=3, what="expiry")
    assert commands == ["GET", "GET", "GET"]  # an expiry costs no GET nor rescan (only the regular probe)
    assert seen.calls == 6 and len(seen.latest or {}) == 100
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_bad_entries_are_logged_and_skipped(
    make: Callable[..., Registry], raw: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    registry = make(rescan_interval=60)
    layout = RegistryLayout(prefix)
    good = registry.publish(manifest("good"))
    future = json.loads(manifest("future").model_dump_json()) | {"protocol": 2, "services": "new shape"}
    entries = {
        layout.name("corrupt", "i1"): b"{not json",
        layout.name("binary", "i1"): b"\xff\xfe\x00",
        layout.name("foreign", "i1"): json.dumps({"hello": "world"}),
        layout.name("future", "i1"): json.dumps(future),
        layout.name("liar", "i1"): manifest("somebody-else").model_dump_json(),
        f"{prefix}:manifest:no-instance": manifest("x").model_dump_json(),
    }
    for name, value in entries.items():
        raw.set(name, value, px=60_000)
    raw.hset(layout.name("hash", "i1"), "a", "b")  # wrong type: MGET answers nil, GET answers WRONGTYPE
    raw.pexpire(layout.name("hash", "i1"), 60_000)

    assert registry.snapshot() == {"good": {"i1": good}}
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    for name in entries:
        assert any(name in message for message in messages), name
    assert any("protocol 2" in message for message in messages)

    caplog.clear()
    registry.snapshot()  # the same bad payloads are not logged again at every rescan
    assert not [r for r in caplog.records if r.name == LOGGER]

    seen = Recorder()
    registry.watch(seen)
    wait_for(lambda: seen.calls == 1, what="initial view")
    for key in ("corrupt", "hash", "foreign"):
        raw.publish(layout.channel, layout.announcement("up", key, "i1"))
    raw.publish(layout.channel, "not an announcement")
    registry.publish(manifest("later"))
    wait_for(lambda: seen.has("later"), timeout=2, what="the watcher to survive bad entries")
    assert set(seen.latest or {}) == {"good", "later"}
    assert any("malformed registry announcement" in r.getMessage() for r in caplog.records)


def test_snapshot_of_a_large_registry(make: Callable[..., Registry], monkeypatch: pytest.MonkeyPatch) -> None:
    # What a snapshot costs in round trips, whatever the machine's load: a SCAN walk, then every manifest in
    # one pipelined MGET, never a GET per entry. Its speed is measured by benchmarks/discovery.py.
    registry = make(heartbeat_interval=30)
    paths = tuple(f"service-{n}" for n in range(5))
    for n in range(200):
        registry.publish(manifest(f"app-{n}", paths=paths))
    commands: list[str] = []
    pipelines: list[list[str]] = []
    execute_command, pipeline = registry._client.execute_command, registry._client.pipeline

    def counting(*args: Any, **options: Any) -> Any:
        commands.append(str(args[0]))
        return execute_command(*args, **options)

    def counting_pipeline(*args: Any, **options: Any) -> Any:
        pipe = pipeline(*args, **options)
        execute = pipe.execute

        def counted(*a: Any, **k: Any) -> Any:
            pipelines.append([str(command[0]) for command, _ in pipe.command_stack])
            return execute(*a, **k)

        monkeypatch.setattr(pipe, "execute", counted)
        return pipe

    monkeypatch.setattr(registry._client, "execute_command", counting)
    monkeypatch.setattr(registry._client, "pipeline", counting_pipeline)
    snapshot = registry.snapshot()
    assert len(snapshot) == 200 and all(len(i["i1"].services) == 5 for i in snapshot.values())
    assert set(commands) == {"SCAN"}, commands  # the walk, then nothing one entry at a time
    assert pipelines == [["MGET"]], pipelines  # the 200 manifests in one round trip


def test_watcher_survives_a_killed_connection(
    make: Callable[..., Registry], raw: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    consumer, provider = make(rescan_interval=60), make()
    seen = Recorder()
    consumer.watch(seen)
    assert consumer.wait_synced(5)
    watch_name = f"{prefix}:registry-watch"
    clients = [c for c in raw.client_list() if c.get("name") == watch_name]
    assert len(clients) == 1
    raw.client_kill_filter(_id=clients[0]["id"])
    provider.publish(manifest("while-away"))  # announced while the watcher is disconnected
    wait_for(lambda: seen.has("while-away"), timeout=5, what="resubscribe + rescan")
    assert any("registry watcher" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    provider.publish(manifest("after"))
    wait_for(lambda: seen.has("after"), timeout=2, what="announcements after the reconnect")


def test_close_stops_threads_promptly(make: Callable[..., Registry]) -> None:
    # Both threads wait a minute between rounds, longer than close() waits for each (10 s): they are dead
    # when it returns only if close() woke them up rather than waiting for their next round.
    registry = make(heartbeat_interval=60, rescan_interval=60)
    before = set(threading.enumerate())
    m = manifest("app")
    registry.start_heartbeat(lambda: m)
    registry.watch(Recorder())
    assert registry.wait_synced(5)
    ours = [t for t in set(threading.enumerate()) - before if t.name.startswith("celery_services.registry")]
    assert len(ours) == 2 and all(t.daemon for t in ours)
    registry.close()
    assert not any(t.is_alive() for t in ours)
    registry.close()  # idempotent
