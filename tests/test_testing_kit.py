"""The test kit users install: the pytest plugin's fixtures and ``mock_remote``, against the real Redis.

The two sections between ``--8<--`` markers are the examples of ``docs/testing.md``, copied there verbatim
(``test_the_docs_show_these_tests`` keeps them in step).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_services import (
    App,
    DistributionSettings,
    MemoryService,
    NotFound,
    Service,
    distribute,
    finalize,
)
from celery_services.testing import (
    BrokerUnavailable,
    EventWaiter,
    KitConfig,
    MockRemote,
    ProviderWorker,
    RedisServer,
    WorkerProcess,
    mock_remote,
    unique_name,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def celery_services_broker_url(redis_url: str) -> str:
    """The suite's own Redis (one database per xdist worker), where its leftover check looks."""
    return redis_url


# --8<-- [start:consumer]
class Orders(Service):
    """The app under test: an order is billed by the remote ``invoices`` service of the app ``billing``."""

    def create(self, data: Any, params: dict[str, Any]) -> Any:
        invoices = self.app.service("invoices")
        invoice = invoices.create({"amount": data["amount"]}, {"user": params.get("user")})
        return {**data, "invoice": invoice["id"]}

    def get(self, id: Any, params: dict[str, Any]) -> Any:
        return {"id": id, "invoice": self.app.service("invoices").get(id)}


@pytest.fixture
def shop(celery_services_config: KitConfig) -> Iterator[App]:
    """The app under test, distributed on the test's broker and registry (a unique key, so parallel
    tests never share its queue)."""
    app = App()
    app.use("orders", Orders())
    distribute(app, celery_services_config.settings(unique_name("shop"), remote_services=["billing"]))
    yield app
    finalize(app)


def test_orders_are_billed_by_a_fake_billing_app(shop: App, celery_services_mock_remote: Any) -> None:
    billing = celery_services_mock_remote(shop, "billing", "invoices", MemoryService())

    with EventWaiter(shop).expect("invoices", "created") as invoiced:
        order = shop.service("orders").create({"amount": 12}, {"user": {"id": 7}})

    assert order == {"amount": 12, "invoice": 0}
    # The fake's events reach the app's listeners, as a real provider's.
    assert invoiced.data == [{"amount": 12, "id": 0}]
    # What the fake received went over the wire: the user stayed home (authentication is off).
    [call] = billing.calls
    assert (call.method, call.data) == ("create", {"amount": 12})
    assert "user" not in call.params and call.params["from_remote"] is True
    # The fake's errors come back typed, as a real provider's.
    with pytest.raises(NotFound):
        shop.service("orders").get(99)


# --8<-- [end:consumer]


# --8<-- [start:integration]
def test_articles_over_a_real_worker(
    celery_services_worker: Any, celery_services_app: App, celery_services_events: EventWaiter
) -> None:
    worker = celery_services_worker("workers.articles:app")
    articles = celery_services_app.distribution.wait_for("articles")

    with celery_services_events.expect("articles", "created", count=2, timeout=5) as created:
        articles.create({"title": "one"})
        articles.create({"title": "two"})

    assert sorted(article["title"] for article in created.data) == ["one", "two"]
    with pytest.raises(NotFound):
        articles.get(999)
    assert worker.key.startswith("articles-")  # a key of the test's own (CELERY_SERVICES_KEY)


# --8<-- [end:integration]


# -- the docs ------------------------------------------------------------------------------------------------


def _section(name: str) -> str:
    source = Path(__file__).read_text()
    found = re.search(rf"# --8<-- \[start:{name}\]\n(.*?)# --8<-- \[end:{name}\]\n", source, re.S)
    assert found, name
    return found.group(1).strip()


def test_the_docs_show_these_tests() -> None:
    doc = (ROOT / "docs" / "testing.md").read_text()
    blocks = [textwrap.dedent(block).strip() for block in re.findall(r"```python\n(.*?)```", doc, re.S)]
    for name in ("consumer", "integration"):
        assert _section(name) in blocks, f"docs/testing.md lacks the '{name}' example as it is in {__file__}"
    readme = (ROOT / "README.md").read_text()
    assert "docs/testing.md" in readme


# -- mock_remote -----------------------------------------------------------------------------------------


class Notes(Service):
    """A fake with a custom method and a custom event."""

    def get(self, id: Any, params: dict[str, Any]) -> Any:
        if id == "missing":
            raise NotFound(f"No note {id}", {"id": id})
        if id == "bug":
            raise KeyError("internal detail")
        return {"id": id, "headers": params.get("headers"), "query": params.get("query")}

    def pin(self, data: Any, params: dict[str, Any]) -> Any:
        self.emit("pinned", data)
        return {"pinned": data}


def test_a_fake_is_a_provider_in_the_registry_and_leaves_nothing_behind(
    celery_services_app: App, celery_services_config: KitConfig
) -> None:
    key = unique_name("notes")
    store = redis.Redis.from_url(celery_services_config.redis_url)
    root = logging.getLogger()
    level_before = root.level
    root.setLevel(logging.DEBUG)  # not the level Celery's embedded worker sets
    try:
        logging_before = (root.level, list(root.handlers))
        with mock_remote(celery_services_app, key, "notes", Notes()) as fake:
            manifests = list(store.scan_iter(f"{celery_services_config.registry_prefix}:manifest:{key}:*"))
            assert len(manifests) == 1
            assert celery_services_app.distribution.healthcheck(key) == {"notes": True}  # type: ignore[union-attr]
            assert fake.distribution is not None
            # Its worker is embedded in this test process: the process's collector and logging are left alone.
            assert gc.get_freeze_count() == 0
            assert (root.level, root.handlers) == logging_before
        assert "notes" not in celery_services_app.services  # unmounted by the time the block ends
        assert not list(store.scan_iter(f"{celery_services_config.registry_prefix}:manifest:{key}:*"))
        assert not store.exists(key, f"_kombu.binding.{key}")
    finally:
        root.setLevel(level_before)
        store.close()


def test_calls_to_a_fake_are_filtered_and_typed_as_real_ones(celery_services_config: KitConfig) -> None:
    app = App()
    distribute(
        app,
        celery_services_config.settings(
            distributed_methods=["get", "pin"], distributed_events=["pinned"], forwarded_headers=["x-trace"]
        ),
    )
    try:
        with mock_remote(
            app, unique_name("notes"), "notes", Notes(), methods=["pin"], events=["pinned"]
        ) as fake:
            notes = app.service("notes")
            params = {
                "query": {"a": 1},
                "headers": {"x-trace": "t1", "authorization": "Bearer secret"},
                "user": {"id": 1},
                "authentication": {"strategy": "jwt"},
            }
            seen = notes.get("n1", params)
            assert seen == {"id": "n1", "headers": {"x-trace": "t1"}, "query": {"a": 1}}
            assert set(fake.calls[0].params) >= {"from_remote", "call_id"}
            assert not {"user", "authentication"} & set(fake.calls[0].params)
            with pytest.raises(NotFound) as missing:
                notes.get("missing")
            assert (missing.value.code, missing.value.data) == (404, {"id": "missing"})
            with pytest.raises(Exception) as bug:
                notes.get("bug")
            assert type(bug.value).__name__ == "GeneralError" and "internal detail" not in str(bug.value)
            with EventWaiter(app).expect("notes", "pinned", timeout=5) as pinned:
                assert notes.pin({"n": 1}) == {"pinned": {"n": 1}}
            assert pinned.data == [{"n": 1}]
    finally:
        finalize(app)


def test_a_fake_the_app_does_not_consume_says_why(celery_services_config: KitConfig) -> None:
    app = App()
    distribute(app, celery_services_config.settings(remote_services=["billing"]))
    try:
        key = unique_name("elsewhere")
        with (
            pytest.raises(TimeoutError, match="remote_services accept the key"),
            mock_remote(app, key, "notes", Notes(), timeout=0.5),
        ):
            pass
        assert "notes" not in app.services
        with pytest.raises(ValueError, match="distribute"):
            mock_remote(App(), "billing", "notes", Notes())
    finally:
        finalize(app)


# -- the event waiter ------------------------------------------------------------------------------------


def test_the_event_waiter_lists_what_arrived_when_too_few_came(
    celery_services_app: App, celery_services_mock_remote: Any
) -> None:
    fake: MockRemote = celery_services_mock_remote(
        celery_services_app, unique_name("memo"), "memos", MemoryService()
    )
    waiter = EventWaiter(celery_services_app)
    with pytest.raises(AssertionError) as failed, waiter.expect("memos", "created", count=2, timeout=1):
        celery_services_app.service("memos").create({"text": "only one"})
        fake.service.remove(0)
    message = str(failed.value)
    assert "expected 2 'created' event(s) of 'memos' within 1s, 1 arrived" in message
    assert "created {'text': 'only one', 'id': 0}" in message
    assert "removed {'text': 'only one', 'id': 0}" in message


# -- the config and workers -------------------------------------------------------------------------------


def test_config_gives_apps_settings_and_workers_variables() -> None:
    config = KitConfig("redis://127.0.0.1:6379/13", "cs-test-x", heartbeat_interval=0.25)
    settings = config.settings("shop", services=[], timeout=3)
    assert isinstance(settings, DistributionSettings)
    assert (settings.key, settings.registry_prefix) == ("shop", "cs-test-x")
    assert settings.heartbeat_interval == 0.25
    assert (settings.services, settings.timeout) == ([], 3)
    assert config.settings().key.startswith("app-")
    env = config.env("shop", services=["articles*"], timeout=8)
    assert env == {
        "CELERY_SERVICES_BROKER_URL": "redis://127.0.0.1:6379/13",
        "CELERY_SERVICES_REGISTRY_PREFIX": "cs-test-x",
        "CELERY_SERVICES_HEARTBEAT_INTERVAL": "0.25",
        "CELERY_SERVICES_KEY": "shop",
        "CELERY_SERVICES_SERVICES": '["articles*"]',
        "CELERY_SERVICES_TIMEOUT": "8",
    }


def test_a_worker_that_exits_at_start_fails_with_its_log(celery_services_config: KitConfig) -> None:
    worker = ProviderWorker("no_such_module:app", celery_services_config, ready_timeout=20)
    with pytest.raises(RuntimeError, match="no_such_module"):
        worker.start()
    worker.stop()


def test_a_redis_server_whose_port_is_taken_does_not_start() -> None:
    # Its own redis-server exited (the port taken), but the server already there answered its PING: start()
    # succeeded, and the test went on with someone else's Redis, which restart() and kill() never touched.
    with RedisServer() as first:
        second = RedisServer(port=first.port)
        try:
            with pytest.raises(BrokerUnavailable):
                second.start()
        finally:
            second.stop()
        assert first.process is not None and first.process.poll() is None


def test_workers_leave_no_open_file_behind() -> None:
    # Each WorkerProcess kept the descriptor mkstemp opened for its log: the unlinked log stayed on disk, and
    # a long session leaked one descriptor per worker.
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        WorkerProcess("tests.apps.provider", "nobody").stop()
    assert len(os.listdir("/proc/self/fd")) == before


INNER = """
import pytest

def test_fails(celery_services_worker, celery_services_app):
    worker = celery_services_worker("workers.articles:app")
    assert celery_services_app.distribution.wait_for("articles", timeout=10)
    assert worker.pid > 0
    pytest.fail("on purpose")
"""


def test_a_failed_test_shows_its_workers_logs(
    pytester: pytest.Pytester, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELERY_SERVICES_BROKER_URL", redis_url)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider", "-p", "no:celery")
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert re.search(
        r"-+ celery_services worker articles-[\w-]+@localhost \(key articles-\w+\) log -+", output
    )
    assert "ready." in output  # the worker's own log lines
    assert "on purpose" in output
