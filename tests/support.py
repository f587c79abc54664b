"""Helpers shared by the integration tests: provider worker processes and their clean-up, and what keeps
the xdist workers of one run apart (a Redis database and a range of ports each)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from celery_services import App, DistributionSettings, distribute, finalize
from celery_services.distribution import Distribution
from celery_services.distribution.manifest import RegistryLayout
from celery_services.testing import WorkerProcess, purge_queues

ROOT = Path(__file__).resolve().parents[1]
#: The highest database number of a Redis with its default ``databases 16``.
LAST_REDIS_DB = 15
#: Ports handed out below the kernel's ephemeral range (a restarted server gets its port back: no client
#: socket took it meanwhile), split into this many slices, one per xdist worker.
PORT_SLICES = 16


def xdist_worker() -> int:
    """The index of this xdist worker (``gw3`` → 3), 0 outside xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0


def worker_redis_url(base: str) -> str:
    """``base`` with the database of this xdist worker: gw0 the base's, gw1 the next one, and so on.

    kombu keeps state per database that every app on it shares (its ``unacked`` hash and index, the binding
    tables of the shared exchanges) and the session's leftover check reads a whole database: each worker
    needs one of its own.
    """
    parts = urlsplit(base)
    if "db=" in parts.query:
        raise ValueError(f"give the test Redis's database in the path, not the query: {base}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the test Redis URL's path is not a database number: {base}")
    worker = xdist_worker()
    db = int(path or 0) + worker
    if db > LAST_REDIS_DB:
        raise ValueError(
            f"xdist worker gw{worker} would use Redis database {db} of {base}, past {LAST_REDIS_DB}: "
            f"use fewer workers (-n) or a lower base database"
        )
    return urlunsplit(parts._replace(path=f"/{db}"))


def _port_range() -> range:
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    low = max(low, 20000 + 10 * PORT_SLICES)
    size = (low - 20000) // PORT_SLICES
    start = 20000 + (xdist_worker() % PORT_SLICES) * size
    return range(start, start + size)


def _ports() -> Iterator[int]:
    ports = _port_range()
    # Another run of the suite on this machine starts elsewhere (os.urandom: pytest-randomly reseeds random).
    start = int.from_bytes(os.urandom(4)) % len(ports)
    return itertools.cycle([*ports[start:], *ports[:start]])


#: This worker's ports, taken in turn: two servers of one test never get the same port before either has
#: bound it, and the workers' slices never overlap (the library's ``free_port`` draws from the whole range).
_PORTS = _ports()


def free_port() -> int:
    """A free loopback port of this xdist worker's own slice, below the ephemeral range."""
    for _ in range(200):
        port = next(_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in this worker's slice")


@dataclass
class Provider:
    key: str
    broker: str
    backend: str
    runs_key: str
    env: dict[str, str]

    def runs(self) -> list[str]:
        return [r.decode() for r in redis.Redis.from_url(self.backend).lrange(self.runs_key, 0, -1)]

    def worker(self, **kwargs: Any) -> WorkerProcess:
        return WorkerProcess("tests.apps.provider", self.key, env=self.env, **kwargs)

    def sibling(self, label: str) -> Provider:
        """Another provider key on the same broker and backend (its own queue and run log)."""
        key = f"{label}-{os.urandom(3).hex()}"
        runs = f"test-runs:{key}"
        return Provider(
            key, self.broker, self.backend, runs, provider_env(key, self.broker, self.backend, runs)
        )


def provider_env(key: str, broker: str, backend: str, runs_key: str, **extra: str) -> dict[str, str]:
    return {
        "CELERY_SERVICES_KEY": key,
        "CELERY_SERVICES_BROKER_URL": broker,
        "CELERY_SERVICES_RESULT_BACKEND": backend,
        "CELERY_SERVICES_SERVICES": '["*"]',
        "CELERY_SERVICES_TIMEOUT": "8",
        "TEST_RUNS_KEY": runs_key,
        "TEST_REPLY_STORE": backend,
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def cleanup(broker: str, backend: str, *names: str) -> None:
    """Delete the queues (and Redis keys) ``names`` that a test created, on its broker and backend."""
    store = redis.Redis.from_url(backend)
    for name in names:
        store.delete(name)
    if broker.startswith("amqp"):
        # The default namespace's binding epoch, which a test's provider or listener may have started
        # (deleting it is safe: the next read starts another): named from the settings' defaults.
        defaults = DistributionSettings.model_fields
        layout = RegistryLayout(defaults["registry_prefix"].default)
        store.delete(layout.binding_epoch(defaults["events_exchange"].default))
    store.close()
    # The queues and what kombu keeps for them (the library's test kit does it: purge_queues).
    purge_queues(broker, names)
    if not broker.startswith("amqp"):
        broker_store = redis.Redis.from_url(broker)
        broker_store.delete(*(f"celery_services:leases:{name}" for name in names))
        broker_store.close()


def registered_provider(
    redis_url: str, prefix: str, label: str = "prov", heartbeat: str = "0.5", **extra: str
) -> Provider:
    """A provider of a new key in the registry ``prefix``, on Redis (start its workers); its registry entry
    outlives a missed ``heartbeat`` (seconds; short, so that a test sees a dead provider go soon)."""
    key = f"{label}-{os.urandom(3).hex()}"
    runs = f"test-runs:{key}"
    env = provider_env(
        key,
        redis_url,
        redis_url,
        runs,
        CELERY_SERVICES_REGISTRY_PREFIX=prefix,
        CELERY_SERVICES_HEARTBEAT_INTERVAL=heartbeat,
        **extra,
    )
    return Provider(key, redis_url, redis_url, runs, env)


def amqp_provider(label: str, rabbitmq_url: str, redis_url: str, prefix: str, **extra: str) -> Provider:
    """A provider of a new key on RabbitMQ (replies and registry on Redis, in ``prefix``)."""
    key = f"{label}-amqp-{os.urandom(3).hex()}"
    runs = f"test-runs:{key}"
    env = provider_env(key, rabbitmq_url, redis_url, runs, CELERY_SERVICES_REGISTRY_PREFIX=prefix, **extra)
    return Provider(key, rabbitmq_url, redis_url, runs, env)


def fresh_prefix(redis_url: str, label: str) -> Iterator[str]:
    """A registry prefix of one test (module); its keys are deleted afterwards. Use in a fixture."""
    name = f"cs-{label}-{os.urandom(4).hex()}"
    yield name
    purge_prefix(redis_url, name)


def purge_prefix(redis_url: str, prefix: str) -> None:
    """Delete a registry prefix's keys, and the event bindings of its queues (group queues outlive apps,
    and a consumer killed in a test leaves its broadcast queue bound)."""
    store = redis.Redis.from_url(redis_url)
    for key in store.scan_iter(f"{prefix}*"):
        store.delete(key)
    for table in store.scan_iter("_kombu.binding*.celery_services.events"):
        if stale := [m for m in store.smembers(table) if f"{prefix}.events.".encode() in m]:
            store.srem(table, *stale)
    store.close()


def write_manifest(redis_url: str, prefix: str, key: str, paths: list[str], instance: str = "fake-1") -> None:
    """Register by hand an instance of ``key`` offering ``paths`` (no worker serves them), and announce it."""
    manifest = {
        "key": key,
        "instance": instance,
        "host": "nowhere",
        "pid": 1,
        "started_at": time.time(),
        "heartbeat": time.time(),
        "protocol": 1,
        "services": [{"path": p, "methods": ["get"], "events": ["created"], "options": {}} for p in paths],
    }
    store = redis.Redis.from_url(redis_url)
    store.set(f"{prefix}:manifest:{key}:{instance}", json.dumps(manifest), ex=60)
    store.publish(f"{prefix}:registry", json.dumps({"op": "up", "key": key, "instance": instance}))
    store.close()


def reply_lists(redis_url: str, prefix: str) -> list[bytes]:
    """Reply lists left in the reply store (the once-only markers beside them expire by themselves)."""
    store = redis.Redis.from_url(redis_url)
    try:
        return [name for name in store.scan_iter(f"{prefix}:reply:*") if not name.endswith(b":sent")]
    finally:
        store.close()


#: Both brokers, for ``parametrize("broker", BROKERS)`` (RabbitMQ's case marked ``rabbitmq``).
BROKERS = ["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]


def broker_provider(
    request: pytest.FixtureRequest, broker: str, redis_url: str, prefix: str, label: str, **extra: str
) -> Provider:
    """A provider of a new key on ``broker`` (one of :data:`BROKERS`; replies and registry on Redis, in
    ``prefix``)."""
    if broker == "redis":
        return registered_provider(redis_url, prefix, label, **extra)
    return amqp_provider(label, request.getfixturevalue("rabbitmq_url"), redis_url, prefix, **extra)


@contextlib.contextmanager
def two_replicas(prov: Provider, prefix: str) -> Iterator[tuple[WorkerProcess, WorkerProcess, Distribution]]:
    """Two workers of ``prov``, started, and a caller's distribution; afterwards the workers stopped, the
    caller finalized and the key's queue and runs cleaned up."""
    first, second = prov.worker(), prov.worker()
    app, distribution = make_caller(prov, prefix)
    try:
        first.start()
        second.start()
        yield first, second, distribution
    finally:
        first.stop()
        second.stop()
        finalize(app)
        cleanup(prov.broker, prov.backend, prov.key, prov.runs_key)


def make_caller(prov: Provider, prefix: str, **options: Any) -> tuple[App, Distribution]:
    """:func:`caller_on` ``prov``'s broker and backend."""
    return caller_on(prov.broker, prov.backend, prefix, **options)


def caller_on(broker: str, backend: str, prefix: str, **options: Any) -> tuple[App, Distribution]:
    """A consumer app on ``broker`` and ``backend`` in the registry ``prefix``: no services of its own
    and no remote services mounted unless ``options`` say so (finalize it when done)."""
    app = App()
    settings: dict[str, Any] = {
        "key": f"caller-{os.urandom(3).hex()}",
        "broker_url": broker,
        "result_backend": backend,
        "registry_prefix": prefix,
        "services": [],
        "remote_services": [],
        "timeout": 8,
    }
    return app, distribute(app, DistributionSettings(**(settings | options)))
