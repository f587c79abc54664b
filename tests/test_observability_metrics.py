"""Metrics scraped from real processes: a plain ``celery worker`` with ``metrics_port`` set serves its call,
event and registry metrics; the gateway (``celery-services serve``) serves its own on ``/metrics``. The same
worker's log shows the call fields under a plain ``celery worker`` (Celery's logging signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_services import NotFound, finalize
from celery_services.distribution import Distribution
from celery_services.testing import WorkerProcess, wait_for

from .support import ROOT, Provider, cleanup, free_port, make_caller, purge_prefix, registered_provider

METHODS = ["find", "get", "create", "update", "patch", "remove", "boom"]


@dataclass
class Served:
    prov: Provider
    worker: WorkerProcess
    port: int
    distribution: Distribution


@pytest.fixture(scope="module")
def served(redis_url: str) -> Iterator[Served]:
    """A plain ``celery -A tests.apps.traced worker`` serving metrics on a port, and a caller of it."""
    prefix = f"cs-metrics-{os.urandom(4).hex()}"
    port = free_port()
    prov = registered_provider(redis_url, prefix, "metered", CELERY_SERVICES_METRICS_PORT=str(port))
    worker = WorkerProcess("tests.apps.traced", prov.key, env=prov.env)
    caller, distribution = make_caller(prov, prefix, remote_services=[prov.key], distributed_methods=METHODS)
    try:
        worker.start()
        yield Served(prov, worker, port, distribution)
    finally:
        worker.stop()
        finalize(caller)
        cleanup(redis_url, redis_url, prov.key, prov.runs_key)
        purge_prefix(redis_url, prefix)


def samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a Prometheus text exposition, by (name, labels)."""
    text = httpx.get(url, timeout=5).raise_for_status().text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.timeout(60)
def test_a_worker_serves_call_event_and_registry_metrics_on_its_port(served: Served) -> None:
    key, url = served.prov.key, f"http://127.0.0.1:{served.port}/metrics"
    before = samples(url)
    echo = served.distribution.wait_for("echo", 10)
    articles = served.distribution.wait_for("articles", 10)
    for n in range(3):
        assert echo.get(n, {})["id"] == n
    with pytest.raises(NotFound):
        echo.boom({}, {})
    articles.create({"title": "counted"}, {})

    get = {"side": "server", "key": key, "path": "echo", "method": "get"}
    boom = {**get, "method": "boom"}

    def moved() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        now = samples(url)
        published = value(
            now, "celery_services_events_published_total", key=key, path="articles", event="created"
        )
        return now if published >= 1 else None

    now = wait_for(moved, timeout=10, what="the created event counted")
    assert (
        value(now, "celery_services_calls_total", **get) - value(before, "celery_services_calls_total", **get)
        == 3
    )
    assert value(now, "celery_services_call_duration_seconds_count", **get) >= 3
    # Differences: the module's worker is shared, and the other tests may have called boom before this one.
    errors = "celery_services_call_errors_total"
    assert value(now, errors, **boom, error="NotFound") - value(before, errors, **boom, error="NotFound") == 1
    assert (
        value(now, "celery_services_calls_total", **boom)
        - value(before, "celery_services_calls_total", **boom)
        == 1
    )
    assert value(now, "celery_services_calls_in_flight", **get) == 0
    assert value(now, "celery_services_registry_instances", key=key) == 1


@pytest.mark.timeout(60)
def test_a_plain_celery_worker_logs_the_call_fields(served: Served) -> None:
    echo = served.distribution.wait_for("echo", 10)
    echo.get("logged", {})
    with pytest.raises(NotFound):
        echo.boom({}, {})
    key = served.prov.key
    # The service's own line (logged by its code) and the library's, with the call's fields appended.
    own = wait_for(
        lambda: [line for line in served.worker.log().splitlines() if "echo logged" in line],
        timeout=5,
        what="the service's log line",
    )[0]
    assert f"[key={key} path=echo method=get call=" in own
    refused = [line for line in served.worker.log().splitlines() if "call answered NotFound" in line]
    assert refused and f"[key={key} path=echo method=boom call=" in refused[-1]


@pytest.mark.timeout(60)
def test_the_gateway_serves_its_metrics(served: Served, redis_url: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        **served.prov.env,
        "CELERY_SERVICES_KEY": f"metrics-gateway-{os.urandom(3).hex()}",
        "CELERY_SERVICES_REMOTE_SERVICES": f'["{served.prov.key}"]',
        "CELERY_SERVICES_METRICS": "true",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("CELERY_SERVICES_METRICS_PORT")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"gateway-{port}.log"
    command = [
        sys.executable,
        "-m",
        "celery_services.cli",
        "serve",
        "tests.apps.gateway:api",
        "--port",
        str(port),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx.get(f"{base}/echo/7", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=20, interval=0.1, what="the gateway serving echo")
        found = samples(f"{base}/metrics")
        client = {"side": "client", "key": served.prov.key, "path": "echo", "method": "get"}
        assert value(found, "celery_services_calls_total", **client) >= 1
        assert value(found, "celery_services_call_duration_seconds_count", **client) >= 1
        assert value(found, "celery_services_registry_instances", key=served.prov.key) == 1
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.unlink(missing_ok=True)
