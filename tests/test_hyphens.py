"""The seed's names work end to end: the custom method ``publish-article`` and the event
``article-published`` in settings, ``use()``, task names, proxies, events, REST and the CLI."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from celery_services import App, DistributionSettings, distribute, finalize
from celery_services.cli import app as cli
from celery_services.http import make_server
from celery_services.testing import WorkerProcess, wait_for

from .support import cleanup, fresh_prefix, provider_env

pytestmark = pytest.mark.timeout(90)
METHODS = ["find", "get", "create", "patch", "publish-article"]
EVENTS = ["created", "patched", "article-published"]


@pytest.fixture(scope="module")
def prefix(redis_url: str) -> Iterator[str]:
    yield from fresh_prefix(redis_url, "hyphen")


@pytest.fixture(scope="module")
def world(redis_url: str, prefix: str) -> Iterator[tuple[str, str, App]]:
    key = f"hyphen-{os.urandom(3).hex()}"
    env = provider_env(
        key,
        redis_url,
        redis_url,
        f"test-runs:{key}",
        CELERY_SERVICES_REGISTRY_PREFIX=prefix,
        CELERY_SERVICES_DISTRIBUTED_METHODS=",".join(METHODS),  # list settings read commas too
        CELERY_SERVICES_DISTRIBUTED_EVENTS=",".join(EVENTS),
    )
    consumer = App()
    with WorkerProcess("tests.apps.hyphens", key, env=env):
        distribute(
            consumer,
            DistributionSettings(
                key=f"hyphen-gw-{os.urandom(3).hex()}",
                broker_url=redis_url,
                registry_prefix=prefix,
                services=[],
                remote_services=[key],
                distributed_methods=METHODS,
                distributed_events=EVENTS,
                timeout=8,
            ),
        )
        try:
            consumer.distribution.wait_for("articles", timeout=15)  # type: ignore[union-attr]
            yield key, prefix, consumer
        finally:
            finalize(consumer)
    cleanup(redis_url, redis_url, key)


def test_proxy_call_attribute_and_event(world: tuple[str, str, App]) -> None:
    _, _, consumer = world
    articles = consumer.service("articles")
    assert "publish-article" in articles.methods
    heard: list[Any] = []
    articles.on("article-published", lambda data, context=None: heard.append(data))
    created = articles.create({"title": "seed"})
    assert articles.call("publish-article", data={"id": created["id"]})["published"] is True
    again = articles.create({"title": "seed 2"})
    assert articles.publish_article({"id": again["id"]})["published"] is True  # the Python spelling
    wait_for(lambda: len(heard) >= 2, timeout=10, what="article-published heard twice")
    assert {item["id"] for item in heard} == {created["id"], again["id"]}


def test_rest_and_cli(world: tuple[str, str, App], redis_url: str) -> None:
    key, prefix, consumer = world
    server = make_server(consumer, port=0, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10, what="uvicorn started")
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        created = httpx.post(f"{url}/articles", json={"title": "over REST"}).json()
        published = httpx.post(
            f"{url}/articles", json={"id": created["id"]}, headers={"X-Service-Method": "publish-article"}
        )
        assert published.status_code == 200, published.text
        assert published.json()["published"] is True
    finally:
        server.should_exit = True
        thread.join(10)
    env = {
        "CELERY_SERVICES_BROKER_URL": redis_url,
        "CELERY_SERVICES_REGISTRY_PREFIX": prefix,
    }
    result = CliRunner().invoke(
        cli,
        ["call", key, "articles", "publish-article", "--data", json.dumps({"id": created["id"]})],
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["published"] is True


def test_names_are_checked_the_same_everywhere() -> None:
    assert DistributionSettings(distributed_methods=["publish-article"]).distributed_methods == [
        "publish-article"
    ]
    # A name the service wrapper's own attributes take (its methods, its fields, Service's setup) too: a
    # consumer that asked for one could never mount the provider offering it, app.use refusing it.
    for bad in ("-publish", "_private", "publish.article", "class", "publish", "on", "setup", "path"):
        with pytest.raises(ValueError):
            DistributionSettings(distributed_methods=[bad])
        with pytest.raises(ValueError):
            App().use("x", object(), methods=[bad])
