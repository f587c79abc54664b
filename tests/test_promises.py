"""Promises of README.md that no other test guards, each checked against real worker processes.

Every test runs on a ``redis-server`` of its own (``celery_services.testing.RedisServer``: broker, result
backend and registry at once), with registry prefixes and keys of its own, so that nothing it counts or
hears comes from another test or another developer's run; the server and everything in it go away with
the test.

1. A proxy call is one published message and one ``BLPOP`` on a reply list; the result backend is never
   written nor read, and no result channel is subscribed (counted with ``MONITOR`` and ``INFO
   commandstats``).
2. ``reject_on_worker_lost`` under a prefork pool: a call whose pool child is SIGKILLed is served again.
3. Tracebacks cross the wire only with ``debug``.
4. Events heard on a consumer's proxy carry ``params.provider`` (and ``params.query``), never identity.
5. ``error`` hooks on a proxy see the typed remote error, and may replace it or recover.
6. ``celery-services --config FILE`` reads that file.
7. ``celery-services events --event E`` prints the events of that name only, from a real provider.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
import redis

from celery_services import (
    App,
    DistributionSettings,
    Forbidden,
    GeneralError,
    NotFound,
    distribute,
    finalize,
)
from celery_services.testing import RedisServer, wait_for

from .support import ROOT, registered_provider

#: The console script installed by pyproject (``celery_services.cli:main``).
CLI = str(Path(sys.executable).with_name("celery-services"))
ARTICLES = ["find", "get", "create", "update", "patch", "remove", "publish_article"]
PROBE = ["get", "find", "slow", "boom", "nested", "grow"]
HEARTBEAT = 0.5


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A Redis of this test's own: broker, result backend and registry."""
    with RedisServer() as private:
        yield private


def token() -> str:
    return uuid.uuid4().hex[:8]


def consumer(
    url: str, prefix: str, remote_key: str | list[str], *, timeout: float = 10.0, **options: Any
) -> tuple[App, Any]:
    """A consumer app (exposing nothing) mounting the proxies of ``remote_key`` (keys) by discovery."""
    app = App()
    settings = DistributionSettings(
        key=options.pop("key", f"consumer-{token()}"),
        broker_url=url,
        result_backend=url,
        registry_prefix=prefix,
        heartbeat_interval=HEARTBEAT,
        services=[],
        remote_services=[remote_key] if isinstance(remote_key, str) else remote_key,
        distributed_methods=[*ARTICLES, *PROBE],
        distributed_events=["created", "patched", "article_published"],
        timeout=timeout,
        **options,
    )
    return app, distribute(app, settings)


def cli_env(**values: str) -> dict[str, str]:
    """The environment of a ``celery-services`` subprocess: this one's without any CELERY_SERVICES_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_SERVICES_")}
    return {**env, "PYTHONPATH": str(ROOT), **values}


# -- 1. one publish, one BLPOP, no result backend -------------------------------------------------------


class CommandLog:
    """``MONITOR`` of a Redis server on a connection of its own, between two marker commands.

    Each entry is ``(client, args)``: ``client`` is the client's local port (``"lua"`` for commands run by
    a script), ``args`` the command and its arguments as Redis logged them.
    """

    _line = re.compile(r"^\S+ \[\d+ (?P<client>[^\]]*)\] (?P<args>.*)$", re.S)
    _arg = re.compile(r'"((?:[^"\\]|\\.)*)"')

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.marker = f"promises-monitor-{token()}"
        self.entries: list[tuple[str, list[str]]] = []
        self._client = server.client(socket_timeout=60)
        self._connection: Any = None
        self._thread = threading.Thread(target=self._read, name="redis-monitor", daemon=True)
        self._started = threading.Event()

    def __enter__(self) -> CommandLog:
        self._connection = self._client.connection_pool.get_connection()
        self._connection.send_command("MONITOR")
        assert self._connection.read_response() in (b"OK", "OK")
        self._thread.start()
        with self.server.client() as marker:
            marker.get(f"{self.marker}:start")
        wait_for(self._started.is_set, timeout=10, what="MONITOR sees the start marker")
        return self

    def __exit__(self, *exc: object) -> None:
        with self.server.client() as marker:
            marker.get(f"{self.marker}:stop")
        self._thread.join(timeout=30)
        self._connection.disconnect()
        self._client.close()
        assert not self._thread.is_alive(), "MONITOR never saw the stop marker"

    def _read(self) -> None:
        recording = False
        while True:
            raw = self._connection.read_response()
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            match = self._line.match(text)
            if match is None:
                continue
            client = match["client"]
            args = [a.replace('\\"', '"') for a in self._arg.findall(match["args"])]
            if args[:2] == ["GET", f"{self.marker}:start"]:
                recording = True
                self._started.set()
                continue
            if args[:2] == ["GET", f"{self.marker}:stop"]:
                return
            if recording:
                self.entries.append((client if client == "lua" else client.rsplit(":", 1)[-1], args))


def redis_ports(pids: list[int], port: int) -> set[str]:
    """The local ports of the processes ``pids``' TCP connections to the Redis on ``port``."""
    ports: set[str] = set()
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        ports |= {str(c.laddr.port) for c in connections if c.raddr and c.raddr.port == port}
    return ports


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}


@pytest.mark.timeout(90)
def test_a_proxy_call_is_one_publish_and_one_blpop_and_never_touches_the_result_backend(
    server: RedisServer,
) -> None:
    calls = 20
    prefix = f"cs-prom-cmds-{token()}"
    provider = registered_provider(server.url, prefix, "cmds")
    with provider.worker() as worker, server.client() as admin:
        app, distribution = consumer(server.url, prefix, provider.key)
        try:
            probe = distribution.wait_for("probe", timeout=15)
            for i in range(5):  # warm up: connections, producer, scripts loaded
                assert probe.get(f"warm-{i}")["id"] == f"warm-{i}"
            before = commandstats(admin)
            with CommandLog(server) as log:
                answers = [probe.get(f"call-{i}") for i in range(calls)]
                # Snapshotted while every connection is still open: whose port is whose.
                mine = redis_ports([os.getpid()], server.port)
                workers = redis_ports(
                    [worker.pid, *(c.pid for c in psutil.Process(worker.pid).children(recursive=True))],
                    server.port,
                )
            after = commandstats(admin)
            channels = {c.decode() for c in admin.pubsub_channels()}
            clients = admin.client_list()
            # The control: a plain Celery caller of the same task does use the backend, and the log sees it.
            with CommandLog(server) as control:
                plain = distribution.celery.send_task(
                    f"{provider.key}.probe.get", kwargs={"id": "plain"}, queue=provider.key
                )
                assert plain.get(timeout=10)["id"] == "plain"
                plain.forget()
        finally:
            finalize(app)
    assert [a["id"] for a in answers] == [f"call-{i}" for i in range(calls)]
    assert mine and workers and not (mine & workers)

    # Every command is attributed: the caller (this process), the worker, or a script (Lua); the only
    # other client is the stop marker's, which says HELLO on connecting.
    unknown = [args for client, args in log.entries if client not in mine | workers | {"lua"}]
    assert [args[0].upper() for args in unknown] in ([], ["HELLO"]), unknown
    caller = [args for client, args in log.entries if client in mine]
    histogram = Counter(args[0].upper() for args in caller)
    # One BLPOP per call, each on the call's own reply list (never a second read, never a poll).
    blpops = [args for args in caller if args[0].upper() == "BLPOP"]
    assert len(blpops) == calls, histogram
    assert all(args[1].startswith(f"{prefix}:reply:") for args in blpops), blpops
    assert len({args[1] for args in blpops}) == calls
    # One published message per call: an LPUSH on the key's queue.
    publishes = [args for args in caller if args[0].upper() == "LPUSH"]
    assert [args[1] for args in publishes] == [provider.key] * calls, histogram
    # No result channel: nothing subscribed, during the calls or left over from before them.
    assert not [args for args in caller if "SUBSCRIBE" in args[0].upper()], histogram
    # The caller's only subscription is its registry watcher's (announcements, expired manifests).
    assert channels == {f"{prefix}:registry", "__keyevent@0__:expired"}, channels
    subscribed = [c for c in clients if c["addr"].rsplit(":", 1)[1] in mine and c["sub"] + c["psub"] != "00"]
    assert [(c["sub"], c["psub"]) for c in subscribed] == [("2", "0")], subscribed
    # Nothing else on the call path: what the caller sent besides the calls is its registry's traffic.
    others = [
        args
        for args in caller
        if args[0].upper() not in ("LPUSH", "BLPOP") and not any(a.startswith(f"{prefix}:") for a in args[1:])
    ]
    assert others == [], Counter(args[0].upper() for args in others)
    # The result backend is neither written nor read by anyone (caller, worker, scripts).
    meta = [(client, args[:2]) for client, args in log.entries if any("celery-task-meta" in a for a in args)]
    assert meta == []
    # ... where the control, a plain `send_task(...).get()`, is seen writing it: the log is not blind to it.
    stored = [args[1] for _, args in control.entries if args[0].upper() in ("SET", "SETEX", "PSETEX")]
    assert f"celery-task-meta-{plain.id}" in stored, control.entries
    # INFO commandstats agrees: exactly one BLPOP per call on the whole server, and no subscription.
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    assert delta.get("blpop", 0) == calls
    assert delta.get("subscribe", 0) == delta.get("psubscribe", 0) == 0


# -- 2. reject_on_worker_lost under a prefork pool ------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_call_whose_prefork_child_is_killed_is_served_again(server: RedisServer) -> None:
    prefix = f"cs-prom-prefork-{token()}"
    # A lease longer than the call's deadline: the lease keeper (whose main process lives on) cannot be what
    # brings the call back in time, only Celery's reject_on_worker_lost can.
    provider = registered_provider(
        server.url, prefix, "prefork", CELERY_SERVICES_TIMEOUT="60", CELERY_SERVICES_LEASE_TIMEOUT="60"
    )
    tag = f"killed-{token()}"
    with provider.worker(pool="prefork", concurrency=1) as worker:
        app, distribution = consumer(server.url, prefix, provider.key, timeout=30)
        try:
            probe = distribution.wait_for("probe", timeout=15)
            assert probe.get("warm")["id"] == "warm"
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(probe.slow, {"tag": tag, "seconds": 2}, {"timeout": 30})
                started = wait_for(
                    lambda: [r for r in provider.runs() if r.startswith(f"slow-start-{tag}:")],
                    timeout=15,
                    what="the slow call started",
                )
                child = int(started[0].rsplit(":", 1)[1])
                assert child != worker.pid
                assert child in {c.pid for c in psutil.Process(worker.pid).children(recursive=True)}
                os.kill(child, signal.SIGKILL)
                answer = pending.result(timeout=60)
            runs = provider.runs()
            children = {c.pid for c in psutil.Process(worker.pid).children(recursive=True)}
        finally:
            finalize(app)
    starts = [r for r in runs if r.startswith(f"slow-start-{tag}:")]
    ends = [r for r in runs if r.startswith(f"slow-end-{tag}:")]
    assert len(starts) == 2, runs  # the killed run, then the redelivered one
    assert ends == [f"slow-end-{tag}:{answer['pid']}"], runs
    assert answer["tag"] == tag
    assert answer["pid"] != child
    assert answer["pid"] in children  # the same worker's new child served it
    assert answer["redelivered"] is True  # the service is told a run may have happened
    assert not any(r.startswith(f"late-start-{tag}") for r in runs)


def test_a_prefork_worker_stopped_by_the_kit_finishes_the_call_it_runs(server: RedisServer) -> None:
    # WorkerProcess.stop() is a warm stop, as docker stop's SIGTERM is: to the worker's main process. Sent to
    # its whole process group, it reached the pool's children too, which Celery leaves on SIGTERM's default:
    # the call in flight died with its child (WorkerLostError) and its caller waited out its timeout.
    prefix = f"cs-prom-stop-{token()}"
    provider = registered_provider(server.url, prefix, "prefstop")
    tag = f"stopped-{token()}"
    with provider.worker(pool="prefork", concurrency=1) as worker:
        app, distribution = consumer(server.url, prefix, provider.key, timeout=8)
        try:
            probe = distribution.wait_for("probe", timeout=15)
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(probe.slow, {"tag": tag, "seconds": 2}, {"timeout": 8})
                wait_for(
                    lambda: any(r.startswith(f"slow-start-{tag}:") for r in provider.runs()),
                    timeout=15,
                    what="the slow call started",
                )
                worker.stop()
                assert pending.result(timeout=15)["tag"] == tag
        finally:
            finalize(app)


# -- 3. tracebacks only with debug ----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_tracebacks_cross_the_wire_only_with_debug(server: RedisServer) -> None:
    prefix = f"cs-prom-debug-{token()}"
    quiet = registered_provider(server.url, prefix, "quiet")
    loud = registered_provider(server.url, prefix, "loud", CELERY_SERVICES_DEBUG="true")
    with quiet.worker(), loud.worker():
        app, distribution = consumer(
            server.url,
            prefix,
            [quiet.key, loud.key],
            remote_service_path=lambda info: f"{info.key}/{info.path}",  # both offer "probe"
        )
        try:
            errors: dict[str, GeneralError] = {}
            for provider in (quiet, loud):
                probe = distribution.wait_for(f"{provider.key}/probe", timeout=15)
                with pytest.raises(GeneralError) as raised:
                    probe.boom("other")
                errors[provider.key] = raised.value
        finally:
            finalize(app)

    without = errors[quiet.key]
    assert (without.name, without.code) == ("GeneralError", 500)
    assert without.message == "Internal error"  # the detail stays in the provider's log, under the call id
    assert set(without.data) == {"call_id"}
    wire = json.dumps(without.to_dict())
    assert "Traceback" not in wire and "provider.py" not in wire and 'File "' not in wire

    debug = errors[loud.key]
    assert (debug.name, debug.code, debug.message) == ("GeneralError", 500, "'secret-internal-detail'")
    assert debug.data["type"] == "KeyError"
    trace = debug.data["traceback"]
    assert trace.startswith("Traceback (most recent call last):")
    assert "tests/apps/provider.py" in trace and "in boom" in trace
    assert "KeyError: 'secret-internal-detail'" in trace


# -- 4. params.provider in event contexts ---------------------------------------------------------------


@pytest.mark.timeout(90)
def test_event_contexts_carry_params_provider_and_query_but_no_identity(server: RedisServer) -> None:
    prefix = f"cs-prom-ctx-{token()}"
    # Both sides with authentication on: the caller lets provider/user/authentication travel, and the
    # provider keeps them (with it off, remote calls run as internal calls: no provider on the provider).
    provider = registered_provider(server.url, prefix, "ctx", CELERY_SERVICES_AUTHENTICATION="true")
    title = f"ctx-{token()}"
    heard: list[tuple[Any, Any]] = []
    with provider.worker():
        app, distribution = consumer(server.url, prefix, provider.key, authentication=True)
        try:
            articles = distribution.wait_for("articles", timeout=15)
            articles.on("created", lambda data, context: heard.append((data, context)))
            created = articles.create(
                {"title": title},
                {
                    "provider": "rest",
                    "query": {"title": title},
                    "user": {"email": "caller@example.org"},
                    "authentication": {"strategy": "jwt", "accessToken": "tok-secret"},
                    "headers": {"authorization": "Bearer tok-secret", "x-trace": "t-1"},
                },
            )
            data, context = wait_for(
                lambda: next((h for h in list(heard) if h[0].get("title") == title), None),
                timeout=15,
                what="the created event on the consumer's proxy",
            )
        finally:
            finalize(app)
    assert data == created
    assert context["method"] == "create"
    assert context["params"]["provider"] == "rest"
    assert context["params"]["query"] == {"title": title}
    assert set(context["params"]) == {"provider", "query"}
    dumped = json.dumps(context)
    for secret in ("tok-secret", "caller@example.org", "a@b", "password", "x-trace", "authorization"):
        assert secret not in dumped, context


# -- 5. error hooks on proxies --------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_error_hooks_on_a_proxy_see_the_typed_error_and_may_replace_it(server: RedisServer) -> None:
    prefix = f"cs-prom-hooks-{token()}"
    provider = registered_provider(server.url, prefix, "hooks")
    seen: list[dict[str, Any]] = []
    mode = {"now": "observe"}

    def on_error(context: Any) -> None:
        error = context.error
        seen.append(
            {
                "type": type(error),
                "code": getattr(error, "code", None),
                "message": getattr(error, "message", None),
                "hook": context.type,
                "path": context.path,
                "method": context.method,
                "id": context.id,
                "remote": getattr(context.service, "remote", False),
            }
        )
        if mode["now"] == "replace":
            context.error = Forbidden("replaced by the proxy's error hook", {"was": error.name})
        elif mode["now"] == "recover":
            context.result = {"id": context.id, "fallback": True}
            context.error = None

    with provider.worker():
        app, distribution = consumer(server.url, prefix, provider.key)
        try:
            distribution.wait_for("articles", timeout=15)
            articles = app.service("articles")
            articles.hooks({"error": {"all": [on_error]}})

            created = articles.create({"title": "fine"})
            assert articles.get(created["id"]) == created
            assert seen == []  # error hooks run on failures only

            with pytest.raises(NotFound) as raised:
                articles.get(999)
            assert raised.value.message == "No record found for id '999'"
            assert seen == [
                {
                    "type": NotFound,
                    "code": 404,
                    "message": "No record found for id '999'",
                    "hook": "error",
                    "path": "articles",
                    "method": "get",
                    "id": 999,
                    "remote": True,
                }
            ]

            mode["now"] = "replace"
            with pytest.raises(Forbidden) as replaced:
                articles.get(998)
            assert replaced.value.data == {"was": "NotFound"}
            assert isinstance(replaced.value.__cause__, NotFound)
            assert seen[-1]["type"] is NotFound and seen[-1]["id"] == 998

            mode["now"] = "recover"
            assert articles.get(997) == {"id": 997, "fallback": True}
            assert len(seen) == 3
        finally:
            finalize(app)


# -- 6. --config FILE -----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_cli_config_option_reads_the_given_file(server: RedisServer, tmp_path: Path) -> None:
    prefix = f"cs-prom-config-{token()}"
    provider = registered_provider(server.url, prefix, "cfg")
    config = tmp_path / "private.toml"
    config.write_text(
        "[distribution]\n"
        f'key = "cfg-cli-{token()}"\n'
        f'broker_url = "{server.url}"\n'
        f'registry_prefix = "{prefix}"\n'
        "timeout = 8.0\n"
    )
    elsewhere = tmp_path / "elsewhere.toml"  # the same server, another registry: the provider is not there
    elsewhere.write_text(
        f'[distribution]\nbroker_url = "{server.url}"\nregistry_prefix = "cs-prom-other-{token()}"\n'
    )
    env = cli_env()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )

    with provider.worker() as worker:
        listed = run("--config", str(config), "services", "--json")
        assert listed.returncode == 0, listed.stderr
        keys = {row["key"]: row for row in json.loads(listed.stdout)["keys"]}
        assert provider.key in keys, listed.stdout
        assert [i["pid"] for i in keys[provider.key]["instances"]] == [worker.pid]

        other = run("--config", str(elsewhere), "services", "--json")
        assert other.returncode == 0, other.stderr
        assert provider.key not in {row["key"] for row in json.loads(other.stdout)["keys"]}

        called = run("--config", str(config), "call", provider.key, "probe", "get", "7")
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout)["id"] == 7


# -- 7. events --event E ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_cli_events_follows_one_event_name_from_a_real_provider(server: RedisServer, tmp_path: Path) -> None:
    prefix = f"cs-prom-events-{token()}"
    provider = registered_provider(server.url, prefix, "evt")
    env = cli_env(
        CELERY_SERVICES_BROKER_URL=server.url,
        CELERY_SERVICES_REGISTRY_PREFIX=prefix,
        CELERY_SERVICES_HEARTBEAT_INTERVAL=str(HEARTBEAT),
        CELERY_SERVICES_TIMEOUT="8",
    )

    def call(*args: str) -> Any:
        done = subprocess.run(
            [CLI, "call", provider.key, "articles", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    out_path, err_path = tmp_path / "events.out", tmp_path / "events.err"
    with provider.worker():
        first = call("create", "--data", json.dumps({"title": "before the follower"}))
        with out_path.open("wb") as out, err_path.open("wb") as err:
            follower = subprocess.Popen(
                [CLI, "events", provider.key, "--event", "created", "--count", "1", "--timeout", "60"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=err,
            )
        try:
            wait_for(lambda: b"following" in err_path.read_bytes(), timeout=20, what="follower bound")
            bound = err_path.read_text()
            assert f"{provider.key}.articles.created" in bound
            assert "patched" not in bound and "article_published" not in bound
            # Events of other names first (patched, article_published), then the one followed.
            call("patch", str(first["id"]), "--data", json.dumps({"n": 1}))
            call("publish_article", "--data", json.dumps({"id": first["id"]}))
            created = call("create", "--data", json.dumps({"title": "followed"}))
            assert follower.wait(timeout=30) == 0, err_path.read_text()
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
    lines = out_path.read_text().splitlines()
    assert len(lines) == 1, lines
    _time, key, path, event, data = lines[0].split(" ", 4)
    assert (key, path, event) == (provider.key, "articles", "created")
    assert json.loads(data) == created
