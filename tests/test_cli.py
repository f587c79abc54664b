"""The ``celery-services`` command line against real workers and a real Redis.

Quick commands run in-process with typer's CliRunner; ``worker`` and ``events`` run as subprocesses, the
way a user (and docker/compose.yml) runs them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from celery_services import App, DistributionSettings, NotFound, distribute, finalize
from celery_services.cli import EXIT_CLIENT_ERROR, EXIT_SERVER_ERROR, app
from celery_services.distribution import logs as cs_logs
from celery_services.distribution.events import EventBus
from celery_services.testing import WorkerProcess, wait_for

from .support import ROOT, cleanup, fresh_prefix, provider_env, write_manifest

#: The console script installed by pyproject (``celery_services.cli:main``).
CLI = str(Path(sys.executable).with_name("celery-services"))
#: What docker/compose.yml runs; tests/test_compose.py checks the file against these.
PROVIDER_COMMAND = ["celery-services", "--log-level", "info", "worker", "workers.articles:app"]
PROVIDER_HEALTHCHECK = ["celery-services", "ping"]
GATEWAY_HEALTHCHECK = ["celery-services", "health", "my-app"]
#: The containers' liveness checks (docker/compose.yml): the gateway's and Flower's own endpoints.
GATEWAY_LIVENESS = [
    "python",
    "-c",
    "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=3)",
]
FLOWER_LIVENESS = [
    "python",
    "-c",
    "import urllib.request as u; u.urlopen('http://127.0.0.1:5555/healthcheck', timeout=3)",
]
FLOWER_COMMAND = ["celery-services", "flower", "--port=5555"]
COMMANDS = ["worker", "serve", "flower", "demo", "services", "call", "health", "ping", "events"]
HEARTBEAT = "0.5"


@pytest.fixture(scope="module")
def prefix(redis_url: str) -> Iterator[str]:
    yield from fresh_prefix(redis_url, "cli")


@pytest.fixture(scope="module")
def env(redis_url: str, prefix: str) -> dict[str, str]:
    """What every command of these tests runs with: the test broker and a registry of their own."""
    return {
        "CELERY_SERVICES_BROKER_URL": redis_url,
        "CELERY_SERVICES_RESULT_BACKEND": redis_url,
        "CELERY_SERVICES_REGISTRY_PREFIX": prefix,
        "CELERY_SERVICES_HEARTBEAT_INTERVAL": HEARTBEAT,
        "CELERY_SERVICES_TIMEOUT": "8",
    }


def node(key: str) -> str:
    return f"{key}-{uuid.uuid4().hex[:6]}@localhost"


def cli_worker(target: str, key: str, env: dict[str, str], *options: str) -> WorkerProcess:
    """``celery-services --log-level info worker TARGET -P solo ...`` as a real process."""
    name = node(key)
    command = [CLI, "--log-level", "info", "worker", target, "-P", "solo", "-n", name, "--without-gossip"]
    return WorkerProcess(target, key, env=env, command=[*command, "--without-mingle", *options])


@pytest.fixture(scope="module")
def provider(env: dict[str, str], redis_url: str) -> Iterator[tuple[str, WorkerProcess]]:
    """tests/apps/provider.py (articles, probe) served by ``celery-services worker ...:app``."""
    key = f"cli-prov-{uuid.uuid4().hex[:6]}"
    runs = f"test-runs:{key}"
    worker = cli_worker(
        "tests.apps.provider:app", key, {**provider_env(key, redis_url, redis_url, runs), **env}
    )
    with worker:
        yield key, worker
    cleanup(redis_url, redis_url, key, runs)


def invoke(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(app, list(args), env=env)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None) -> None:
    result = CliRunner().invoke(app, [command, "--help"] if command else ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if command is None:
        assert all(name in result.output for name in COMMANDS)


def test_services_lists_keys_paths_and_collisions(
    env: dict[str, str], provider: tuple[str, WorkerProcess], redis_url: str, prefix: str
) -> None:
    key, worker = provider
    other = f"cli-other-{uuid.uuid4().hex[:6]}"
    write_manifest(redis_url, prefix, other, ["articles"])
    try:
        result = invoke(env, "services", "--json")
        assert result.exit_code == 0, result.output
        listing = json.loads(result.stdout)
        rows = {row["key"]: row for row in listing["keys"]}
        [instance] = rows[key]["instances"]
        assert instance["pid"] == worker.pid
        assert 0 <= instance["heartbeat_age"] < 5
        services = {s["path"]: s for s in instance["services"]}
        assert "publish_article" in services["articles"]["methods"]
        assert "article_published" in services["articles"]["events"]
        assert "slow" in services["probe"]["methods"]
        assert listing["collisions"] == {"articles": sorted([key, other])}

        table = invoke(env, "services")
        assert table.exit_code == 0, table.output
        assert key in table.stdout and "probe" in table.stdout
        assert "collision" in table.stdout
        assert f"{instance['host']}:{worker.pid}" in table.stdout
        # A narrow terminal wraps between words, never inside one.
        narrow = invoke({**env, "COLUMNS": "60"}, "services")
        assert narrow.exit_code == 0, narrow.output
        assert "publish_article" in narrow.stdout and "article_published" in narrow.stdout
    finally:
        redis.Redis.from_url(redis_url).delete(f"{prefix}:manifest:{other}:fake-1")


def test_services_of_an_empty_registry(env: dict[str, str]) -> None:
    # With the broker's password in its URL (a Redis without one takes any for its default user): the
    # message names the registry, never the password.
    url = env["CELERY_SERVICES_BROKER_URL"].replace("redis://", "redis://default:S3cretPassw0rd@", 1)
    result = invoke(
        {
            **env,
            "CELERY_SERVICES_BROKER_URL": url,
            "CELERY_SERVICES_RESULT_BACKEND": url,
            "CELERY_SERVICES_REGISTRY_PREFIX": f"cs-empty-{uuid.uuid4().hex[:6]}",
        },
        "services",
    )
    assert result.exit_code == 0
    assert "No live app" in result.stdout
    assert "S3cretPassw0rd" not in result.output


def test_call_prints_the_result_as_json(env: dict[str, str], provider: tuple[str, WorkerProcess]) -> None:
    key, _ = provider
    created = invoke(env, "call", key, "articles", "create", "--data", '{"title": "from the cli"}')
    assert created.exit_code == 0, created.output
    item = json.loads(created.stdout)
    assert item["title"] == "from the cli"
    got = invoke(env, "call", key, "articles", "get", str(item["id"]))
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout) == item
    found = invoke(env, "call", key, "articles", "find", "--query", '{"title": "from the cli"}')
    assert json.loads(found.stdout) == [item]
    published = invoke(
        env, "call", key, "articles", "publish_article", "--data", json.dumps({"id": item["id"]})
    )
    assert json.loads(published.stdout)["published"] is True


def test_call_of_a_typed_error_exits_with_its_family(
    env: dict[str, str], provider: tuple[str, WorkerProcess]
) -> None:
    key, _ = provider
    result = invoke(env, "call", key, "articles", "get", "999")
    assert result.exit_code == EXIT_CLIENT_ERROR == 4
    assert "NotFound (404): No record found for id '999'" in result.stderr
    as_json = invoke(env, "call", key, "probe", "boom", "--data", '"notfound"', "--json")
    assert as_json.exit_code == EXIT_CLIENT_ERROR
    error = json.loads(as_json.stdout)
    assert (error["name"], error["code"], error["data"]) == ("NotFound", 404, {"id": "x"})
    assert 'data: {"id": "x"}' in as_json.stderr
    general = invoke(env, "call", key, "probe", "boom", "--data", '"other"')
    assert general.exit_code == EXIT_SERVER_ERROR
    assert "GeneralError (500): Internal error" in general.stderr
    assert "secret-internal-detail" not in general.stderr and "Traceback" not in general.stderr
    assert 'data: {"call_id": "' in general.stderr  # what the provider logged the detail under


def test_call_timeout_and_bad_arguments(env: dict[str, str], provider: tuple[str, WorkerProcess]) -> None:
    key, _ = provider
    bad = invoke(env, "call", key, "articles", "create", "--data", "{not json")
    assert bad.exit_code == 2
    assert "not JSON" in bad.output
    # An argument the method does not take is refused, not dropped: `find 1` found everything.
    for args in (["find", "1"], ["get", "1", "--data", "{}"], ["create", "1", "--data", "{}"]):
        extra = invoke(env, "call", key, "articles", *args)
        assert extra.exit_code == 2, extra.output
        assert "takes no" in extra.output
    # An id that reads as NaN or Infinity is the string it is, not a number JSON has no form of.
    nan = invoke(env, "call", key, "articles", "get", "NaN")
    assert nan.exit_code == EXIT_CLIENT_ERROR
    assert "No record found for id 'NaN'" in nan.stderr, nan.stderr
    slow = invoke(
        env, "call", key, "probe", "slow", "--data", '{"tag": "t", "seconds": 2}', "--timeout", "0.3"
    )
    assert slow.exit_code == EXIT_CLIENT_ERROR
    assert "Timeout (408)" in slow.stderr


def test_health(
    env: dict[str, str], provider: tuple[str, WorkerProcess], redis_url: str, prefix: str
) -> None:
    key, _ = provider
    up = invoke(env, "health", key, "--json")
    assert up.exit_code == 0, up.output
    assert json.loads(up.stdout) == {"articles": True, "probe": True}
    table = invoke(env, "health", key)
    assert table.exit_code == 0 and "articles" in table.stdout

    unknown = invoke(env, "health", f"nobody-{uuid.uuid4().hex[:6]}")
    assert unknown.exit_code == EXIT_CLIENT_ERROR
    assert "NotFound (404)" in unknown.stderr

    dead = f"cli-dead-{uuid.uuid4().hex[:6]}"  # in the registry, but no worker answers its health task
    write_manifest(redis_url, prefix, dead, ["articles"])
    try:
        down = invoke(env, "health", "--json")  # every app: the live provider and the dead one
        assert down.exit_code == EXIT_SERVER_ERROR, down.output
        answer = json.loads(down.stdout.splitlines()[0])
        assert answer[f"{key}/articles"] is True
        assert answer[f"{dead}/articles"] is False
        assert "Unavailable (503)" in down.stderr
    finally:
        cleanup(redis_url, redis_url, dead, f"{prefix}:manifest:{dead}:fake-1")


def test_ping(env: dict[str, str], provider: tuple[str, WorkerProcess]) -> None:
    _, worker = provider
    name = worker.command[worker.command.index("-n") + 1]
    result = invoke(env, "ping", name)
    assert result.exit_code == 0, result.output
    assert f"{name}: pong" in result.stdout
    missing = invoke(env, "ping", "celery@nowhere-at-all", "--timeout", "0.5")
    assert missing.exit_code == EXIT_SERVER_ERROR
    assert "no answer" in missing.stdout


def test_events_follows_the_registry_services(
    env: dict[str, str], provider: tuple[str, WorkerProcess]
) -> None:
    key, _ = provider
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile() as err:
        follower = subprocess.Popen(
            [CLI, "events", key, "--path", "articles", "--count", "2", "--timeout", "20", "--json"],
            env={**os.environ, **env},
            stdout=out,
            stderr=err,
        )
        try:
            wait_for(lambda: b"following" in Path(err.name).read_bytes(), timeout=15, what="events bound")
            bindings = Path(err.name).read_text()
            assert f"{key}.articles.created" in bindings and f"{key}.articles.article_published" in bindings
            assert f"{key}.probe" not in bindings
            with EventBus(env["CELERY_SERVICES_BROKER_URL"]) as bus:
                assert bus.publish(key, "probe", "created", {"ignored": True})  # not bound: filtered out
                assert bus.publish(key, "articles", "created", {"id": 1})
                assert bus.publish(key, "articles", "article_published", {"id": 1, "published": True})
            assert follower.wait(timeout=15) == 0
        finally:
            follower.kill()
            follower.wait()
        out.seek(0)
        lines = [json.loads(line) for line in out.read().decode().splitlines()]
    assert [(e["key"], e["path"], e["event"], e["data"]) for e in lines] == [
        (key, "articles", "created", {"id": 1}),
        (key, "articles", "article_published", {"id": 1, "published": True}),
    ]


def test_events_without_anything_to_follow(env: dict[str, str]) -> None:
    result = invoke(env, "events", f"nobody-{uuid.uuid4().hex[:6]}")
    assert result.exit_code == EXIT_CLIENT_ERROR
    assert "No events to follow" in result.stderr
    quiet = invoke(env, "events", "k", "--path", "p", "--event", "e", "--count", "1", "--timeout", "0.3")
    assert quiet.exit_code == EXIT_CLIENT_ERROR
    assert "0 of 1 events" in quiet.stderr


def test_events_follower_is_a_registry_instance_until_it_is_stopped(
    env: dict[str, str], redis_url: str, prefix: str
) -> None:
    # Consumers sweep the event queues of instances their registry does not list: the follower is listed
    # while it follows, under the instance naming its queue, and takes both with it when stopped.
    key, store = f"cli-quiet-{uuid.uuid4().hex[:6]}", redis.Redis.from_url(redis_url)
    routing = f"{key}.articles.created".encode()
    table = "_kombu.binding.celery_services.events"

    def queues() -> set[str]:
        return {
            m.split(b"\x06\x16")[-1].decode()
            for m in store.smembers(table)
            if m.startswith(routing + b"\x06")
        }

    with tempfile.NamedTemporaryFile() as err:
        follower = subprocess.Popen(
            [CLI, "events", key, "--path", "articles", "--event", "created"],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_for(lambda: b"following" in Path(err.name).read_bytes(), timeout=15, what="events bound")
            [queue] = queues()
            assert queue.startswith(f"{prefix}.events.cli-"), queue
            consumer, instance = queue.rsplit(".", 2)[-2:]
            manifest = json.loads(store.get(f"{prefix}:manifest:{consumer}:{instance}") or "null")
            assert (manifest["pid"], manifest["services"]) == (follower.pid, [])
            follower.send_signal(signal.SIGTERM)
            assert follower.wait(timeout=15) == 128 + signal.SIGTERM
        finally:
            follower.kill()
            follower.wait()
    assert not store.exists(f"{prefix}:manifest:{consumer}:{instance}")
    assert queues() == set()
    assert not store.exists(queue)
    store.close()


def spellings(key: str) -> dict[str, list[str]]:
    base = ["-P", "solo", "--without-gossip", "--without-mingle", "-n", node(key)]
    plain = [sys.executable, "-m", "celery", "-A", "workers.articles", "worker", "-Q", key, "-l", "info"]
    return {
        "cli-celery-app": [CLI, *PROVIDER_COMMAND[1:], *base],
        "cli-services-app": [CLI, "--log-level", "info", "worker", "workers.articles:api", *base],
        "plain-celery": [*plain, *base],
    }


@pytest.mark.parametrize("spelling", ["cli-celery-app", "cli-services-app", "plain-celery"])
def test_worker_spellings_serve_the_example_provider(
    spelling: str, env: dict[str, str], redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"cli-articles-{uuid.uuid4().hex[:6]}"
    worker_env = {
        **env,
        "CELERY_SERVICES_CONFIG": str(ROOT / "config" / "default.toml"),
        "CELERY_SERVICES_KEY": key,  # workers/articles.py with a key of this test's own
        "PYTHONPATH": str(ROOT),
    }
    worker = WorkerProcess("workers.articles", key, env=worker_env, command=spellings(key)[spelling])
    api = App()
    try:
        with worker:
            distribution = distribute(
                api,
                DistributionSettings(
                    key=f"cli-caller-{uuid.uuid4().hex[:6]}",
                    broker_url=redis_url,
                    result_backend=redis_url,
                    registry_prefix=prefix,
                    services=[],
                    remote_services=[key],
                    distributed_methods=["find", "get", "create", "publish_article"],
                    timeout=8,
                ),
            )
            articles = distribution.wait_for("articles", timeout=10)
            assert articles.create({"title": spelling})["title"] == spelling
            assert articles.publish_article({"id": 0})["published"] is True
            with caplog.at_level(logging.INFO, logger="celery_services.remote"), pytest.raises(NotFound):
                articles.get(999)
            failed = next(r for r in caplog.records if r.getMessage().startswith("call failed"))
            assert (failed.key, failed.path, failed.method) == (key, "articles", "get")  # type: ignore[attr-defined]
            if spelling.startswith("cli"):  # its log lines show the fields, on the provider's side too
                answered = f"[key={key} path=articles method=get call={failed.call_id}]"  # type: ignore[attr-defined]
                wait_for(lambda: answered in worker.log(), timeout=5, what="provider log line")
            banner = worker.log()
            assert f".> {key}" in banner  # the worker consumes the app's key queue
            assert "task events: ON" in banner  # Flower sees the calls
    finally:
        finalize(api)
        cleanup(redis_url, redis_url, key)


@pytest.mark.parametrize(
    "command",
    [
        ["services"],
        ["call", "k", "articles", "get", "1"],
        ["health"],
        ["events", "k", "--path", "p", "--event", "e"],
        ["ping", "--timeout", "1"],
    ],
)
def test_unreachable_broker_exits_5(command: list[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    result = CliRunner().invoke(app, ["--broker", f"redis://127.0.0.1:{port}/0", *command])
    # A container's health check: ping ends by its --timeout (it took 7 s, kombu's own retries).
    assert command[0] != "ping" or time.monotonic() - started < 1 + 1.5
    assert result.exit_code == EXIT_SERVER_ERROR, result.output
    assert "Unreachable" in result.stderr
    # An expected error, said in one line: not four chained tracebacks about a manifest never published.
    assert "Traceback" not in result.stderr and "withdraw" not in result.stderr, result.stderr


def test_worker_refuses_what_is_not_a_distributed_app() -> None:
    result = CliRunner().invoke(app, ["worker", "json:dumps"])
    assert result.exit_code == 2
    flat = " ".join(result.output.replace("│", " ").split())  # rich wraps the message in a box
    assert "neither a distributed App nor the Celery app of one" in flat
    missing = CliRunner().invoke(app, ["worker", "no_such_module_here:app"])
    assert missing.exit_code == 2
    assert "cannot import" in missing.output


def test_log_lines_carry_the_call_fields(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        result = CliRunner().invoke(app, ["--log-level", "nonsense", "services"])
        assert result.exit_code == 2
        cs_logs.configure("debug")
        log = logging.getLogger("celery_services.remote")
        log.debug("call sent", extra=cs_logs.call_fields("my-app", "articles", "get", "id-1"))
        log.debug("no call here")
        lines = capsys.readouterr().err.splitlines()
        assert lines[-2].endswith("call sent [key=my-app path=articles method=get call=id-1]")
        assert lines[-1].endswith("celery_services.remote: no call here")
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["worker", "workers.articles:app"], ["serve", "workers.gateway:api"]])
def test_global_broker_reaches_the_modules_worker_and_serve_import(command: list[str]) -> None:
    # The example modules load their settings when imported: --broker must reach them (it used to be
    # ignored there, and the worker quietly served the default Redis).
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_SERVICES_")}
    process = subprocess.run(
        [CLI, "--broker", f"redis://127.0.0.1:{port}/0", *command],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert process.returncode == EXIT_SERVER_ERROR, process.stdout + process.stderr
    assert f"127.0.0.1:{port}" in process.stderr or str(port) in process.stderr, process.stderr


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        (["--broker", "http://x"], "broker_url 'http://x': scheme must be one of"),
        (["--broker", "redis://127.0.0.1:6379/db"], "the database must be a number"),
    ],
)
def test_a_bad_broker_url_is_bad_usage_not_the_default(options: list[str], complaint: str) -> None:
    result = CliRunner().invoke(app, [*options, "services"])
    assert result.exit_code == 2, result.output
    assert complaint in " ".join(result.output.replace("│", " ").split())
    assert (
        "CELERY_SERVICES_BROKER_URL" not in os.environ
        or os.environ["CELERY_SERVICES_BROKER_URL"] != options[1]
    )


def test_an_unknown_variable_is_bad_usage_with_the_closest_name() -> None:
    result = CliRunner().invoke(app, ["services"], env={"CELERY_SERVICES_TIMOUT": "3"})
    assert result.exit_code == 2, result.output
    assert "did you mean CELERY_SERVICES_TIMEOUT?" in " ".join(result.output.replace("│", " ").split())
