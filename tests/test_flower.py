"""Flower sees the calls: a real Flower process (``celery-services flower``), a real worker, real calls."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from celery_services import App, DistributionSettings, NotFound, distribute, finalize
from celery_services.testing import wait_for

from .support import Provider, cleanup, provider_env, purge_prefix
from .test_cli import CLI, FLOWER_COMMAND


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def flower(redis_url: str) -> Iterator[str]:
    """Flower on a free port of the test broker, its REST API open (FLOWER_UNAUTHENTICATED_API=true)."""
    port = free_port()
    env = {**os.environ, "CELERY_SERVICES_BROKER_URL": redis_url, "FLOWER_UNAUTHENTICATED_API": "true"}
    env.pop("FLOWER_BASIC_AUTH", None)
    command = [CLI, *FLOWER_COMMAND[1:-1], f"--port={port}", "--address=127.0.0.1"]
    with tempfile.NamedTemporaryFile(prefix="flower-", suffix=".log") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:

            def up() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"flower exited: {Path(log.name).read_text()}")
                try:
                    return httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, timeout=30, interval=0.1, what="flower answers")
            yield url
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=5)


@pytest.mark.timeout(90)
def test_flower_shows_remote_calls_with_their_state(flower: str, redis_url: str) -> None:
    key = f"flower-{uuid.uuid4().hex[:8]}"
    prefix = f"cs-flower-{uuid.uuid4().hex[:6]}"
    runs = f"test-runs:{key}"
    env = provider_env(key, redis_url, redis_url, runs, CELERY_SERVICES_REGISTRY_PREFIX=prefix)
    provider = Provider(key, redis_url, redis_url, runs, env)
    api = App()
    try:
        with provider.worker() as worker:
            assert "task events: ON" in worker.log()  # make_celery sets worker_send_task_events
            distribution = distribute(
                api,
                DistributionSettings(
                    key=f"flower-caller-{uuid.uuid4().hex[:6]}",
                    broker_url=redis_url,
                    result_backend=redis_url,
                    registry_prefix=prefix,
                    services=[],
                    remote_services=[],
                    timeout=8,
                ),
            )
            articles = distribution.remote_service(key, "articles", ["create", "get"])

            def tasks(name: str, state: str) -> dict[str, Any]:
                answer = httpx.get(
                    f"{flower}/api/tasks", params={"taskname": name, "state": state}, timeout=5
                )
                assert answer.status_code == 200, answer.text
                found: dict[str, Any] = answer.json()
                return found

            def seen() -> bool:
                # Flower only sees events sent after its receiver bound: call again until it shows both.
                articles.create({"title": "seen by flower"}, {})
                with pytest.raises(NotFound):
                    articles.get(999, {})
                return bool(tasks(f"{key}.articles.create", "SUCCESS")) and bool(
                    tasks(f"{key}.articles.get", "FAILURE")
                )

            wait_for(seen, timeout=30, interval=0.2, what="flower lists the calls")
            failed = next(iter(tasks(f"{key}.articles.get", "FAILURE").values()))
            assert failed["name"] == f"{key}.articles.get"
            assert "NotFound" in (failed.get("exception") or "")
    finally:
        finalize(api)
        cleanup(redis_url, redis_url, key, runs)
        purge_prefix(redis_url, prefix)
