"""The pytest plugin (entry point ``celery_services``): fixtures to test apps against a real broker.

Installed with the library, active in every pytest run of a project that installs it. Every fixture is named
``celery_services_*``, so none shadows a fixture of your own:

- ``celery_services_broker_url`` (session): ``CELERY_SERVICES_BROKER_URL`` when set, else an embedded Redis
  started for the test run (:class:`~celery_services.testing.EmbeddedRedis`);
- ``celery_services_registry_prefix``: a registry prefix of the test's own, its keys deleted afterwards;
- ``celery_services_config``: both, as a :class:`~celery_services.testing.KitConfig` giving settings to apps
  and ``CELERY_SERVICES_*`` variables to workers;
- ``celery_services_worker``: starts provider workers of app modules (``"workers.articles:app"``), returns
  each once it is discoverable, stops it by PID after the test; a failed test shows their logs;
- ``celery_services_app``: a consumer app, distributed on the test's broker and registry, finalized after;
- ``celery_services_events``: ``with celery_services_events.expect("articles", "created", count=2): ...``;
- ``celery_services_mock_remote``: :func:`~celery_services.testing.mock_remote`, closed after the test.

``CELERY_SERVICES_RESULT_BACKEND`` sets the Redis of replies and registry when the broker is RabbitMQ.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ..core.app import App
from ..distribution.distribution import distribute, finalize
from .brokers import EmbeddedRedis
from .cleanup import purge_queues
from .config import KitConfig, unique_name
from .events import EventWaiter
from .mock import MockRemote, mock_remote
from .providers import ProviderWorker

__all__ = [
    "celery_services_app",
    "celery_services_broker_url",
    "celery_services_config",
    "celery_services_events",
    "celery_services_mock_remote",
    "celery_services_registry_prefix",
    "celery_services_worker",
]

#: Where the workers a test started are kept, for its report.
_WORKERS = pytest.StashKey[list[ProviderWorker]]()
#: The logs of workers already stopped (a teardown failure still shows them).
_LOGS = pytest.StashKey[dict[str, str]]()


@pytest.fixture(scope="session")
def celery_services_broker_url() -> Iterator[str]:
    """The test run's broker: ``CELERY_SERVICES_BROKER_URL``, else an embedded Redis (one per run, or per
    xdist worker), stopped at the end of the run."""
    url = os.environ.get("CELERY_SERVICES_BROKER_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def celery_services_registry_prefix(celery_services_broker_url: str) -> Iterator[str]:
    """A registry prefix of this test's own; everything under it is deleted after the test."""
    with KitConfig.isolated(celery_services_broker_url, result_backend=_result_backend()) as config:
        yield config.registry_prefix


@pytest.fixture
def celery_services_config(
    celery_services_broker_url: str, celery_services_registry_prefix: str
) -> KitConfig:
    """The test's broker and registry prefix: ``.settings(...)`` for apps, ``.env(...)`` for workers."""
    return KitConfig(celery_services_broker_url, celery_services_registry_prefix, _result_backend())


def _result_backend() -> str | None:
    return os.environ.get("CELERY_SERVICES_RESULT_BACKEND") or None


@pytest.fixture
def celery_services_worker(
    request: pytest.FixtureRequest, celery_services_config: KitConfig
) -> Iterator[Callable[..., ProviderWorker]]:
    """Start a provider worker: ``celery_services_worker("workers.articles:app", **options)``.

    Each worker runs ``celery-services worker`` for the module in a subprocess, on the test's broker and
    registry, and is returned once its manifest is in the registry. Options are those of
    :class:`~celery_services.testing.ProviderWorker` (``key``, ``env``, ``pool``, settings by name …); the
    test's root directory is on the worker's ``PYTHONPATH``. After the test each worker is stopped by PID and
    its queue deleted; when the test failed, the report shows each worker's log.
    """
    started: list[ProviderWorker] = []
    request.node.stash[_WORKERS] = started
    root = str(request.config.rootpath)

    def start(target: str, **options: Any) -> ProviderWorker:
        options["pythonpath"] = [*options.get("pythonpath", ()), root]
        worker = ProviderWorker(target, celery_services_config, **options)
        started.append(worker)
        return worker.start()

    yield start
    logs = request.node.stash.setdefault(_LOGS, {})
    for worker in started:
        logs[worker.name] = worker.log() if worker.log_path.exists() else "(no log)"
        worker.stop()
    purge_queues(celery_services_config.broker_url, [worker.key for worker in started])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Add the log of each worker the test started to the report of a failed phase."""
    report: Any = yield
    if report.failed:
        workers = item.stash.get(_WORKERS, [])
        logs = item.stash.get(_LOGS, {})
        for worker in workers:
            text = logs.get(worker.name)
            if text is None:
                text = worker.log() if worker.log_path.exists() else "(no log)"
            report.sections.append((f"celery_services worker {worker.name} (key {worker.key}) log", text))
    return report  # type: ignore[no-any-return]


@pytest.fixture
def celery_services_app(celery_services_config: KitConfig) -> Iterator[App]:
    """A consumer app distributed on the test's broker and registry: it exposes nothing and mounts every
    remote service of the registry; finalized after the test."""
    app = App()
    distribute(app, celery_services_config.settings(unique_name("consumer"), services=[], timeout=10))
    yield app
    finalize(app)


@pytest.fixture
def celery_services_events(celery_services_app: App) -> EventWaiter:
    """An :class:`~celery_services.testing.EventWaiter` of ``celery_services_app``:
    ``with celery_services_events.expect("articles", "created", count=2, timeout=5): ...``."""
    return EventWaiter(celery_services_app)


@pytest.fixture
def celery_services_mock_remote() -> Iterator[Callable[..., MockRemote]]:
    """:func:`~celery_services.testing.mock_remote`, started at once and closed after the test:
    ``fake = celery_services_mock_remote(app, "billing", "invoices", FakeInvoices())``."""
    fakes: list[MockRemote] = []

    def start(app: App, key: str, path: str, service: Any, **options: Any) -> MockRemote:
        fake = mock_remote(app, key, path, service, **options)
        fakes.append(fake)
        return fake.start()

    yield start
    for fake in reversed(fakes):
        fake.close()
