"""Faults around service events: short-lived consumers coming and going, a broker that is down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_services.testing import RedisServer, wait_for

from ..support import cleanup, purge_prefix, registered_provider

#: The console script installed by pyproject (``celery_services.cli:main``).
CLI = str(Path(sys.executable).with_name("celery-services"))
SEP = "\x06\x16"  # kombu's separator in the members of its Redis binding sets


@pytest.fixture(params=["own-prefix", "defaults"])
def registry(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(Redis URL, registry prefix): a prefix of this test's own on the test Redis, or every default
    (registry prefix, events exchange) as a user runs them, on a private redis-server so that sweeping
    the default namespace never touches anyone else's queues."""
    if request.param == "own-prefix":
        url, prefix = request.getfixturevalue("redis_url"), f"cs-evfault-{os.urandom(4).hex()}"
        yield url, prefix
        purge_prefix(url, prefix)
        return
    with RedisServer() as server:
        yield server.url, "celery_services"


def queues_bound_to(store: redis.Redis, routing_key: str) -> set[str]:
    """The queues bound to ``routing_key`` on the default events exchange."""
    members = store.smembers("_kombu.binding.celery_services.events")
    return {
        text.split(SEP)[-1] for text in (m.decode() for m in members) if text.split(SEP)[0] == routing_key
    }


@pytest.mark.timeout(120)
def test_follower_gets_every_event_while_cli_callers_come_and_go(registry: tuple[str, str]) -> None:
    # Each `celery-services call` is a consumer instance that joins the registry and leaves it: the live
    # consumers then sweep the event queues of instances the registry does not know. The follower's queue
    # must survive those sweeps, and be gone once the follower is.
    url, prefix = registry
    provider = registered_provider(url, prefix, "evfault")
    key, store = provider.key, redis.Redis.from_url(url)
    env = {
        **os.environ,
        "CELERY_SERVICES_BROKER_URL": url,
        "CELERY_SERVICES_RESULT_BACKEND": url,
        "CELERY_SERVICES_REGISTRY_PREFIX": prefix,
        "CELERY_SERVICES_HEARTBEAT_INTERVAL": "0.5",
        "CELERY_SERVICES_TIMEOUT": "8",
    }
    follow = [CLI, "events", key, "--path", "articles", "--event", "created"]
    try:
        with provider.worker(), tempfile.NamedTemporaryFile() as out, tempfile.NamedTemporaryFile() as err:
            follower = subprocess.Popen(
                [*follow, "--count", "3", "--timeout", "20", "--json"], env=env, stdout=out, stderr=err
            )
            try:
                wait_for(lambda: b"following" in Path(err.name).read_bytes(), 20, what="follower bound")
                [queue] = queues_bound_to(store, f"{key}.articles.created")
                # Named in its registry's namespace, by an instance that registry lists while it follows.
                assert queue.startswith(f"{prefix}.events."), queue
                consumer, instance = queue.rsplit(".", 2)[-2:]
                assert store.exists(f"{prefix}:manifest:{consumer}:{instance}")
                for title in ("one", "two", "three"):
                    data = json.dumps({"title": title})
                    called = subprocess.run(
                        [CLI, "call", key, "articles", "create", "--data", data],
                        env=env,
                        capture_output=True,
                        timeout=30,
                    )
                    assert called.returncode == 0, called.stderr.decode()
                code = follower.wait(timeout=30)
            finally:
                follower.kill()
                follower.wait()
            output, errors = Path(out.name).read_text(), Path(err.name).read_text()
            assert code == 0, errors
            events = [json.loads(line) for line in output.splitlines()]
            assert [(e["key"], e["event"], e["data"]["title"]) for e in events] == [
                (key, "created", title) for title in ("one", "two", "three")
            ]
            assert "lost bindings" not in errors
            # Gone with the follower: its manifest, its bindings and its queue.
            assert not store.exists(f"{prefix}:manifest:{consumer}:{instance}")
            assert queue not in queues_bound_to(store, f"{key}.articles.created")
            assert not store.exists(queue)
    finally:
        cleanup(url, url, key, provider.runs_key)
        store.close()
