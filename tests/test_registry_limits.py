"""Manifest limits in the registry, against a real Redis: entries over a cap are read as offering nothing,
logged once, and an instance's own manifest over a cap is never published."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_services.distribution.manifest import (
    Manifest,
    ManifestLimitError,
    ManifestLimits,
    RegistryLayout,
    ServiceManifest,
    View,
    decode_manifest,
    same_view,
)
from celery_services.distribution.registry import Registry
from celery_services.distribution.settings import DistributionSettings
from celery_services.testing import wait_for

LOGGER = "celery_services.registry"
#: Small caps, so that each test entry is over exactly the limit it names.
SMALL = ManifestLimits(
    max_manifest_bytes=2_000, max_manifest_services=3, max_service_methods=2, max_service_events=2
)


def service(path: str, methods: int = 1, events: int = 1) -> ServiceManifest:
    return ServiceManifest(
        path=path, methods=[f"m{n}" for n in range(methods)], events=[f"e{n}" for n in range(events)]
    )


def manifest(key: str, *services: ServiceManifest, instance: str = "i1") -> Manifest:
    return Manifest.local(key, list(services or [service("articles")]), instance=instance)


#: key → a manifest over the limit of that name (and within every other one), for :data:`SMALL`.
OVER = {
    "max_manifest_bytes": manifest("big", service("a" * 2_000)),
    "max_manifest_services": manifest("many", *(service(f"s{n}") for n in range(4))),
    "max_service_methods": manifest("wide", service("articles", methods=3)),
    "max_service_events": manifest("noisy", service("articles", events=3)),
}


@pytest.fixture
def prefix(unique: str, redis_url: str) -> Iterator[str]:
    name = f"test-limits-{unique}"
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


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


class Recorder:
    def __init__(self) -> None:
        self.latest: View | None = None
        self._lock = threading.Lock()

    def __call__(self, view: View) -> None:
        with self._lock:
            self.latest = view


# -- decoding ---------------------------------------------------------------------------------------------


def test_size_is_checked_before_parsing() -> None:
    # Not JSON at all: a parser would say "invalid manifest"; the size check answers first.
    with pytest.raises(ManifestLimitError, match="over max_manifest_bytes = 2000") as over:
        decode_manifest(b"x" * 2_001, limits=SMALL)
    assert (over.value.setting, over.value.found, over.value.limit, over.value.manifest) == (
        "max_manifest_bytes",
        2_001,
        2_000,
        None,
    )
    assert isinstance(over.value, ValueError)
    with pytest.raises(ManifestLimitError, match="max_manifest_bytes"):
        decode_manifest("é" * 1_001, limits=SMALL)  # 2,002 bytes in UTF-8, though 1,001 characters
    with pytest.raises(ValueError, match="invalid manifest"):
        decode_manifest(b"x" * 2_000, limits=SMALL)  # within the cap: parsed, and refused as before


@pytest.mark.parametrize("setting", [name for name in OVER if name != "max_manifest_bytes"])
def test_counts_are_checked_after_parsing(setting: str) -> None:
    payload = OVER[setting].model_dump_json()
    with pytest.raises(ManifestLimitError, match=setting) as over:
        decode_manifest(payload, key=OVER[setting].key, instance="i1", limits=SMALL)
    assert over.value.setting == setting and over.value.manifest == OVER[setting]
    assert decode_manifest(payload) == OVER[setting]  # without limits, nothing is refused
    # The identity check comes first: an entry lying about its instance is refused, not read as one.
    with pytest.raises(ValueError, match="stored under"):
        decode_manifest(payload, key=OVER[setting].key, instance="other", limits=SMALL)


def test_limits_of_settings() -> None:
    assert ManifestLimits.of(DistributionSettings()) == ManifestLimits()
    settings = DistributionSettings(
        max_manifest_bytes=10, max_manifest_services=11, max_service_methods=12, max_service_events=13
    )
    assert ManifestLimits.of(settings) == ManifestLimits(10, 11, 12, 13)
    registry = Registry.from_settings(settings)
    try:
        assert registry.limits == ManifestLimits(10, 11, 12, 13)
    finally:
        registry.close()


# -- reading ----------------------------------------------------------------------------------------------


def test_entries_over_a_limit_offer_nothing_and_are_logged_once(
    make: Callable[..., Registry], raw: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    writer, reader = make(), make(limits=SMALL, rescan_interval=60)
    layout = RegistryLayout(prefix)
    good = writer.publish(manifest("good"))
    for over in OVER.values():
        raw.set(layout.name(over.key, "i1"), over.model_dump_json(), px=60_000)

    view = reader.snapshot()
    assert view["good"] == {"i1": good}
    for setting, over in OVER.items():
        # Still a live instance (its event queues are not swept), offering no service.
        assert set(view[over.key]) == {"i1"} and view[over.key]["i1"].services == [], setting
    assert view["many"]["i1"].started_at == OVER["max_manifest_services"].started_at  # parsed: facts kept
    logged = warnings(caplog)
    assert len(logged) == len(OVER)
    for setting, over in OVER.items():
        [message] = [m for m in logged if layout.name(over.key, "i1") in m]
        assert setting in message, message

    caplog.clear()
    for over in OVER.values():  # a heartbeat rewrites every entry: a new payload, the same excess
        stamped = over.model_copy(update={"heartbeat": over.heartbeat + 1})
        raw.set(layout.name(over.key, "i1"), stamped.model_dump_json(), px=60_000)
    assert same_view(reader.snapshot(), view)  # heartbeats aside
    assert warnings(caplog) == []  # once per entry and limit, not at every rescan

    name = layout.name("many", "i1")
    raw.set(name, manifest("many").model_dump_json(), px=60_000)  # back within the limits ...
    assert [s.path for s in reader.snapshot()["many"]["i1"].services] == ["articles"]
    raw.set(name, OVER["max_manifest_services"].model_dump_json(), px=60_000)  # ... and over again
    assert reader.snapshot()["many"]["i1"].services == []
    assert [m for m in warnings(caplog) if name in m]  # a relapse is news


def test_watcher_applies_limits_to_announced_entries(
    make: Callable[..., Registry], raw: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    layout = RegistryLayout(prefix)
    consumer = make(limits=SMALL, rescan_interval=60)  # no rescan: only the announcements' GETs read
    seen = Recorder()
    consumer.watch(seen)
    assert consumer.wait_synced(5)
    huge = json.dumps({"junk": "x" * 1_500_000})  # never parsed
    raw.set(layout.name("huge", "i1"), huge, px=60_000)
    raw.publish(layout.channel, layout.announcement("up", "huge", "i1"))
    for over in OVER.values():
        raw.set(layout.name(over.key, "i1"), over.model_dump_json(), px=60_000)
        raw.publish(layout.channel, layout.announcement("up", over.key, "i1"))
    raw.set(layout.name("good", "i1"), manifest("good").model_dump_json(), px=60_000)
    raw.publish(layout.channel, layout.announcement("up", "good", "i1"))
    wait_for(lambda: seen.latest and "good" in seen.latest, timeout=5, what="the good entry")
    latest = seen.latest or {}
    assert {key for key, instances in latest.items() if instances["i1"].services} == {"good"}
    assert set(latest) == {"good", "huge", *(over.key for over in OVER.values())}
    assert latest["huge"]["i1"].services == [] and consumer.has_key("huge")
    assert len(warnings(caplog)) == len(OVER) + 1
    assert any("max_manifest_bytes" in m and layout.name("huge", "i1") in m for m in warnings(caplog))


# -- publishing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", list(OVER))
def test_publish_refuses_own_manifest_over_a_limit(
    setting: str, make: Callable[..., Registry], raw: redis.Redis, prefix: str
) -> None:
    registry = make(limits=SMALL)
    over = OVER[setting]
    pubsub = raw.pubsub()
    pubsub.subscribe(RegistryLayout(prefix).channel)
    wait_for(lambda: (pubsub.get_message(timeout=0.01) or {}).get("type") == "subscribe", what="subscribed")
    with pytest.raises(ManifestLimitError, match=setting) as refused:
        registry.publish(over)
    assert refused.value.setting == setting
    assert not raw.exists(RegistryLayout(prefix).name(over.key, "i1"))  # nothing written ...
    assert pubsub.get_message(timeout=0.2) is None  # ... nor announced
    pubsub.close()
    assert registry.publish(manifest(over.key)).key == over.key  # within the limits, published


def test_heartbeat_keeps_the_last_accepted_manifest(
    make: Callable[..., Registry], raw: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    registry = make(limits=SMALL, heartbeat_interval=0.1)
    name = RegistryLayout(prefix).name("many", "i1")
    current = {"m": manifest("many")}
    beats = []

    def supplier() -> Manifest:
        beats.append(1)
        return current["m"]

    registry.start_heartbeat(supplier)
    wait_for(lambda: raw.exists(name), what="first heartbeat")
    current["m"] = OVER["max_manifest_services"]  # e.g. services added at run time, past the cap
    seen = len(beats)
    first = Manifest.model_validate_json(raw.get(name) or b"")
    wait_for(lambda: len(beats) >= seen + 5, what="five heartbeats of refused content")
    kept = Manifest.model_validate_json(raw.get(name) or b"")
    assert [s.path for s in kept.services] == ["articles"]  # the last accepted content ...
    assert kept.heartbeat > first.heartbeat  # ... kept alive
    refusals = [m for m in warnings(caplog) if "max_manifest_services" in m]
    assert len(refusals) == 1, refusals
