"""docker/compose.yml and docker/Dockerfile: valid, and running the commands the test suite exercises.

No Docker engine runs here: the file is validated with ``docker-compose config`` (Debian package
``docker-compose``, installed by ``.ci/run``), and the commands of its services run outside Docker below and
in tests/test_cli.py and tests/test_flower.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis

from celery_services.testing import wait_for

from .support import ROOT, cleanup, provider_env, purge_prefix
from .test_cli import (
    CLI,
    FLOWER_COMMAND,
    FLOWER_LIVENESS,
    GATEWAY_HEALTHCHECK,
    GATEWAY_LIVENESS,
    PROVIDER_COMMAND,
    PROVIDER_HEALTHCHECK,
    cli_worker,
)
from .test_flower import free_port

COMPOSE_FILE = ROOT / "docker" / "compose.yml"
GATEWAY_COMMAND = [
    "celery-services", "serve", "workers.gateway:api", "--host", "0.0.0.0", "--port", "8000", "--auth", "jwt",
]  # fmt: skip
JWT_SECRET = "a-compose-test-secret-of-32-chars-at-least"
TESTS_COMMAND = ["python", "-m", "pytest"]
BROKER = "redis://redis:6379/0"
APP_SERVICES = ("provider", "gateway", "flower", "tests")

COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="docker-compose is not installed (.ci/run installs the Debian package docker-compose)",
)


def compose(*args: str, auth: bool = True) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    env = {name: value for name, value in os.environ.items() if not name.startswith(("FLOWER_", "CELERY_"))}
    if auth:
        env["FLOWER_BASIC_AUTH"] = "admin:test-secret"
        env["CELERY_SERVICES_JWT_SECRET"] = JWT_SECRET
    return subprocess.run(
        [COMPOSE, "-f", str(COMPOSE_FILE), *args], env=env, capture_output=True, text=True, timeout=60
    )


def load_yaml(text: str) -> dict[str, Any]:
    """Parse ``docker-compose config`` output: JSON from Compose v2, else YAML read by Compose v1's Python.

    Compose v1 is a Python program that depends on PyYAML, so its own interpreter can read what it wrote
    (the project itself does not depend on PyYAML).
    """
    assert COMPOSE is not None
    shebang = Path(COMPOSE).read_bytes()[:200].split(b"\n", 1)[0]
    interpreter = shebang[2:].decode().strip().split() if shebang.startswith(b"#!") else []
    if not interpreter:
        pytest.skip("docker-compose is not Compose v1 (Python) and gave no JSON: cannot read its YAML")
    script = "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"
    done = subprocess.run(
        [*interpreter, "-c", script], input=text, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    done = compose("config", "--format", "json")  # Compose v2; v1 answers with its usage
    if done.returncode == 0 and done.stdout.lstrip().startswith("{"):
        parsed: dict[str, Any] = json.loads(done.stdout)
        return parsed
    done = compose("config")
    assert done.returncode == 0, done.stderr
    return load_yaml(done.stdout)


@needs_compose
def test_compose_file_is_valid_with_each_profile() -> None:
    for profile in ([], ["--profile", "rabbitmq"], ["--profile", "tests"]):
        done = compose(*profile, "config", "--quiet")
        assert done.returncode == 0, (profile, done.stderr)


@needs_compose
def test_secrets_must_come_from_the_environment_or_an_env_file() -> None:
    done = compose("config", "--quiet", auth=False)
    assert done.returncode != 0
    assert "FLOWER_BASIC_AUTH" in done.stderr or "CELERY_SERVICES_JWT_SECRET" in done.stderr
    example = (ROOT / "docker" / "gateway.env.example").read_text()
    assert "CELERY_SERVICES_JWT_SECRET=" in example and "FLOWER_BASIC_AUTH=" in example
    assert "docker/gateway.env" in (ROOT / ".gitignore").read_text().split()
    # Never a value written in the compose file: only the variable, filled from the env file.
    assert re.findall(r"CELERY_SERVICES_JWT_SECRET: (.*)", COMPOSE_FILE.read_text()) == [
        "${CELERY_SERVICES_JWT_SECRET:?set CELERY_SERVICES_JWT_SECRET (docker/gateway.env.example)}"
    ]


@needs_compose
def test_services_run_the_commands_the_tests_exercise(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {"redis", "rabbitmq", *APP_SERVICES}

    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["rabbitmq"]["profiles"] == ["rabbitmq"]
    for name in APP_SERVICES:
        assert services[name]["environment"]["CELERY_SERVICES_BROKER_URL"] == BROKER, name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name

    provider = services["provider"]
    assert (
        provider["command"] == PROVIDER_COMMAND
    )  # test_cli: test_worker_spellings_serve_the_example_provider
    assert provider["deploy"]["replicas"] == 2
    assert provider["healthcheck"]["test"] == ["CMD", *PROVIDER_HEALTHCHECK]  # test_cli: test_ping

    gateway = services["gateway"]
    assert gateway["command"] == GATEWAY_COMMAND  # test_gateway_command_serves_and_is_healthy below
    assert gateway["environment"]["CELERY_SERVICES_JWT_SECRET"] == JWT_SECRET  # from the env file
    assert [str(port) for port in gateway["ports"]] in (["127.0.0.1:8000:8000"], [str(gateway["ports"][0])])
    assert "127.0.0.1" in str(gateway["ports"][0])  # never 0.0.0.0 on the host
    assert gateway["healthcheck"]["test"] == ["CMD", *GATEWAY_LIVENESS]  # the gateway itself, below

    flower = services["flower"]
    assert flower["command"] == FLOWER_COMMAND  # test_flower
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "admin:test-secret"
    assert "FLOWER_UNAUTHENTICATED_API" not in flower["environment"]
    assert flower["healthcheck"]["test"] == ["CMD", *FLOWER_LIVENESS]  # test_flower: its /healthcheck

    for name in ("redis", "rabbitmq"):  # pinned to a patch release
        assert re.fullmatch(r"\w+:\d+\.\d+\.\d+-alpine", services[name]["image"]), services[name]["image"]

    tests = services["tests"]
    assert tests["command"] == TESTS_COMMAND
    assert tests["environment"]["CELERY_SERVICES_TEST_REDIS"].startswith("redis://redis:6379/")
    assert tests["build"]["target"] == "tests"


def test_dockerfile_pins_and_keeps_the_tests_out_of_the_runtime_image() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.startswith("#")]
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-bookworm AS runtime", lines[0]), lines[0]
    runtime = lines[: lines.index("FROM runtime AS tests")]
    tests = lines[len(runtime) :]
    assert "ARG EXTRAS=http" in runtime
    assert 'RUN pip install -c constraints.txt ".[${EXTRAS}]"' in runtime  # versions pinned
    for copied in ("celery_services", "workers", "config"):
        assert f"COPY {copied} ./{copied}" in runtime
    assert not [line for line in runtime if "tests" in line.split()]  # no tests in the runtime image
    assert "COPY tests ./tests" in tests
    for stage in (runtime, tests):
        user = [line for line in stage if line.startswith("USER ")]
        assert user and user[-1] not in ("USER root", "USER 0")
    constraints = (ROOT / "docker" / "constraints.txt").read_text().splitlines()
    pinned = {line.split("==")[0].lower() for line in constraints if "==" in line}
    assert {"celery", "kombu", "redis", "pydantic", "starlette", "uvicorn", "pyjwt", "flower"} <= pinned
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


@pytest.fixture
def gateway(redis_url: str) -> Iterator[tuple[str, str, dict[str, str]]]:
    """The compose gateway command (on a free port) over a provider of a key of its own."""
    key = f"compose-{uuid.uuid4().hex[:6]}"
    prefix = f"cs-compose-{uuid.uuid4().hex[:6]}"
    runs = f"test-runs:{key}"
    env = {
        "CELERY_SERVICES_BROKER_URL": redis_url,
        "CELERY_SERVICES_RESULT_BACKEND": redis_url,
        "CELERY_SERVICES_REGISTRY_PREFIX": prefix,
        "CELERY_SERVICES_TIMEOUT": "8",
        "PYTHONPATH": str(ROOT),
    }
    port = free_port()
    command = [CLI, *GATEWAY_COMMAND[1:]]
    command[command.index("--port") + 1] = str(port)
    command[command.index("--host") + 1] = "127.0.0.1"
    worker = cli_worker(
        "tests.apps.provider:app", key, {**provider_env(key, redis_url, redis_url, runs), **env}
    )
    # config/gateway.toml consumes my-app: point it at this test's provider instead.
    gateway_env = {
        **os.environ,
        **env,
        "CELERY_SERVICES_REMOTE_SERVICES": json.dumps([key]),
        "CELERY_SERVICES_JWT_SECRET": JWT_SECRET,
    }
    with worker, tempfile.NamedTemporaryFile(prefix="gateway-", suffix=".log") as log:
        process = subprocess.Popen(
            command, env=gateway_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:

            def up() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"gateway exited: {Path(log.name).read_text()}")
                try:
                    return httpx.get(f"{url}/distribution/healthcheck/{key}", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, timeout=30, interval=0.1, what="gateway serves")
            yield url, key, env
        finally:
            stopped_warmly = process.poll() is None
            if stopped_warmly:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=5)
            # A gateway stopped by SIGTERM (docker stop) withdraws its manifest on the way out.
            left = list(redis.Redis.from_url(redis_url).scan_iter(f"{prefix}:manifest:gateway:*"))
            cleanup(redis_url, redis_url, key, runs)
            purge_prefix(redis_url, prefix)
            assert not (stopped_warmly and left), left


@pytest.mark.timeout(90)
def test_gateway_command_serves_and_is_healthy(gateway: tuple[str, str, dict[str, str]]) -> None:
    url, key, env = gateway
    assert httpx.get(f"{url}/distribution/healthcheck/{key}", timeout=5).json() == {
        "articles": True,
        "probe": True,
    }
    assert httpx.post(f"{url}/articles", json={"title": "anonymous"}, timeout=10).status_code == 401
    editor = jwt.encode(
        {"sub": "ed", "role": "editor", "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256"
    )
    created = httpx.post(
        f"{url}/articles",
        json={"title": "through the gateway"},
        headers={"Authorization": f"Bearer {editor}"},
        timeout=10,
    )
    assert created.status_code == 201, created.text  # README: POST /articles → create (201)
    # The gateway's own healthcheck, as compose runs it (python in the image asks /health).
    port = url.rsplit(":", 1)[1]
    liveness = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in GATEWAY_LIVENESS]
    assert subprocess.run([sys.executable, *liveness[1:]], capture_output=True, timeout=30).returncode == 0
    assert created.json()["title"] == "through the gateway"
    # The gateway's healthcheck, as compose runs it, for the key this gateway consumes here.
    check = subprocess.run(
        [CLI, *GATEWAY_HEALTHCHECK[1:-1], key], env={**os.environ, **env}, capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stderr
