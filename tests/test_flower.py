"""Flower sees the calls, and never the caller's credentials: a real Flower process (``celery-services
flower``) behind its basic auth, a real worker, real calls, on Redis and on RabbitMQ.

What Flower shows of a call comes from the worker's task events; :class:`TaskEvents` receives them the way
Flower does (a Celery event receiver), for tests that check the events themselves (tests/test_calls.py).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from celery_services import (
    App,
    Distribution,
    DistributionSettings,
    GeneralError,
    NotFound,
    distribute,
    finalize,
)
from celery_services.testing import wait_for
from celery_services.testing.brokers import free_port

from .support import Provider, amqp_provider, cleanup, make_caller, provider_env, purge_prefix
from .test_cli import CLI, FLOWER_COMMAND

#: The secrets a call carries in ``user``, ``authentication`` and its credential headers.
SECRETS = ("hunter2", "tok-123", "s3cret", "k-456", "px-888", "sc-999", "pw-000", "cs-111", "ak-222")
#: Request headers that carry credentials (any case): their values are masked in what Flower shows.
CREDENTIAL_HEADERS = {
    "authorization": "Bearer tok-123",
    "cookie": "sid=s3cret",
    "x-api-key": "k-456",
    "Proxy-Authorization": "Basic px-888",
    "set-cookie": "sid=sc-999",
    "X-Auth-Token": "tok-123",
    "x-db-password": "pw-000",
    "x-client-secret": "cs-111",
    "x-apikey": "ak-222",
    "x-csrf-token": "tok-123",
}
#: Request headers that carry none: they stay visible.
PLAIN_HEADERS = {"accept": "application/json", "x-request-id": "req-visible", "user-agent": "pytest"}
#: The worst case for what Flower shows: authentication on and every one of these headers forwarded.
EVERY_HEADER = [name.lower() for name in (*CREDENTIAL_HEADERS, *PLAIN_HEADERS)]


def distribute_caller(api: App, flower: Flower, redis_url: str, prefix: str, **options: Any) -> Distribution:
    """Distribute ``api`` as a caller on Flower's broker, in the registry ``prefix``, mounting nothing."""
    settings = DistributionSettings(
        key=f"flower-caller-{uuid.uuid4().hex[:6]}",
        broker_url=flower.broker,
        result_backend=redis_url,
        registry_prefix=prefix,
        services=[],
        remote_services=[],
        timeout=8,
        **options,
    )
    return distribute(api, settings)


def credential_params(marker: str) -> dict[str, Any]:
    """Params of a call from a gateway with ``authentication=True``: identity, credentials, a marker."""
    return {
        "query": {"marker": marker},
        "provider": "rest",
        "user": {"email": "ada@example.com", "password": "hunter2"},
        "authentication": {"strategy": "jwt", "accessToken": "tok-123"},
        "headers": {**CREDENTIAL_HEADERS, **PLAIN_HEADERS},
    }


def assert_no_secret(shown: str) -> None:
    leaked = [secret for secret in SECRETS if secret in shown]
    assert not leaked, f"{leaked} shown in:\n{shown}"


def assert_masked(kwargsrepr: str, marker: str) -> None:
    """``kwargsrepr`` (what Flower and the worker's events show) masks every credential, and only those."""
    assert_no_secret(kwargsrepr)
    params = ast.literal_eval(kwargsrepr)["params"]
    assert params["query"] == {"marker": marker}
    assert params["provider"] == "rest"
    assert params["user"] == "***" and params["authentication"] == "***"
    assert {name: params["headers"][name] for name in CREDENTIAL_HEADERS} == dict.fromkeys(
        CREDENTIAL_HEADERS, "***"
    )
    assert {name: params["headers"][name] for name in PLAIN_HEADERS} == PLAIN_HEADERS


class TaskEvents:
    """The task events of a broker, as Flower receives them: a Celery event receiver in a thread, on the
    event exchange ``exchange`` (Celery's ``event_exchange``)."""

    def __init__(self, broker: str, exchange: str = "celeryev") -> None:
        self.celery = Celery(broker=broker, set_as_current=False)
        self.celery.conf.event_exchange = exchange
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def __enter__(self) -> TaskEvents:
        self._connection = self.celery.connection_for_read()
        self._receiver = self.celery.events.Receiver(self._connection, handlers={"*": self._on_event})
        self._thread = threading.Thread(target=self._capture, name="task-events", daemon=True)
        self._thread.start()
        return self

    def _capture(self) -> None:
        try:
            self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:  # shown by the next received() call
            self._error = exc

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append(event)

    def received(self, name: str) -> list[dict[str, Any]]:
        """The events of the task ``name`` so far that show its arguments: ``task-received`` on Celery's
        consumer, the one merged ``task-succeeded``/``task-failed`` event of the fast path."""
        if self._error is not None:
            raise RuntimeError("the event receiver failed") from self._error
        with self._lock:
            return [e for e in self._events if e.get("name") == name and "kwargs" in e]

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._receiver.should_stop = True  # the receiver's loop checks it at least every second
        self._thread.join(timeout=10)
        self._connection.release()
        self.celery.close()


class EventMessages:
    """The messages of the ``celeryev`` exchange on RabbitMQ as they travel (a list body is a batch of
    events, ``task.multi``), from a queue of the test's own bound to every routing key."""

    def __init__(self, broker: str) -> None:
        self._connection = Connection(broker)
        self._queue = Queue(
            f"test-celeryev-{uuid.uuid4().hex[:8]}",
            Exchange("celeryev", type="topic"),
            routing_key="#",
            auto_delete=True,
            durable=False,
        )
        self.messages: list[tuple[str, Any]] = []  # (routing key, body)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="event-messages", daemon=True)

    def __enter__(self) -> EventMessages:
        self._consumer = self._connection.Consumer([self._queue], callbacks=[self._on_message])
        self._consumer.consume()
        self._thread.start()
        return self

    def _on_message(self, body: Any, message: Any) -> None:
        self.messages.append((message.delivery_info["routing_key"], body))
        message.ack()

    def _drain(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self._connection.drain_events(timeout=0.2)

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every event of the task ``name`` received so far, batches opened."""
        found = []
        for _, body in list(self.messages):
            found += [e for e in (body if isinstance(body, list) else [body]) if e.get("name") == name]
        return found

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._consumer.cancel()
        self._connection.release()


@dataclass
class Flower:
    url: str
    broker: str
    auth: tuple[str, str]

    def get(self, path: str, **params: Any) -> httpx.Response:
        """``GET path`` with Flower's basic auth."""
        return httpx.get(f"{self.url}{path}", params=params, auth=self.auth, timeout=5)

    def tasks(self, name: str, **params: Any) -> dict[str, Any]:
        """``/api/tasks`` for the task ``name``: its records by task id."""
        answer = self.get("/api/tasks", taskname=name, **params)
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found


#: Each broker's Flower takes its basic auth in one of the two spellings: FLOWER_BASIC_AUTH (as
#: docker/compose.yml gives it) or --basic-auth (as `celery-services flower --help` shows).
FLOWERS = [("redis", "FLOWER_BASIC_AUTH"), ("rabbitmq", "--basic-auth")]


@pytest.fixture(scope="module", params=FLOWERS, ids=[f"{broker}-{auth}" for broker, auth in FLOWERS])
def flower(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Flower]:
    """Flower on a free port of the broker, behind basic auth (its REST API open to no one else)."""
    broker_name, spelling = request.param
    broker = redis_url if broker_name == "redis" else str(request.getfixturevalue("rabbitmq_url"))
    auth = ("admin", f"pw-{uuid.uuid4().hex[:12]}")
    port = free_port()
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("FLOWER_", "CELERY_SERVICES_"))
    }
    env.update(CELERY_SERVICES_BROKER_URL=broker, CELERY_SERVICES_RESULT_BACKEND=redis_url)
    command = [CLI, *FLOWER_COMMAND[1:-1], f"--port={port}", "--address=127.0.0.1"]
    if spelling == "FLOWER_BASIC_AUTH":
        env["FLOWER_BASIC_AUTH"] = ":".join(auth)
    else:
        command.append(f"--basic-auth={':'.join(auth)}")
    with tempfile.NamedTemporaryFile(prefix="flower-", suffix=".log") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:

            def up() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"flower exited: {Path(log.name).read_text()}")
                try:  # Flower's healthcheck answers without credentials
                    return httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, timeout=30, interval=0.1, what="flower answers")
            yield Flower(url, broker, auth)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=5)


@pytest.mark.timeout(60)
def test_flower_answers_only_with_its_basic_auth(flower: Flower) -> None:
    for path in ("/api/tasks", "/tasks"):
        assert httpx.get(f"{flower.url}{path}", timeout=5).status_code == 401, path
        wrong = httpx.get(f"{flower.url}{path}", auth=(flower.auth[0], "wrong"), timeout=5)
        assert wrong.status_code == 401, path
        assert flower.get(path).status_code == 200, path
    assert flower.get("/api/tasks").json() is not None


@pytest.mark.timeout(90)
def test_flower_shows_remote_calls_with_their_state(flower: Flower, redis_url: str) -> None:
    key = f"flower-{uuid.uuid4().hex[:8]}"
    prefix = f"cs-flower-{uuid.uuid4().hex[:6]}"
    runs = f"test-runs:{key}"
    env = provider_env(key, flower.broker, redis_url, runs, CELERY_SERVICES_REGISTRY_PREFIX=prefix)
    provider = Provider(key, flower.broker, redis_url, runs, env)
    api = App()
    try:
        with provider.worker() as worker:
            assert "task events: ON" in worker.log()  # make_celery sets worker_send_task_events
            distribution = distribute_caller(api, flower, redis_url, prefix)
            articles = distribution.remote_service(key, "articles", ["create", "get"])
            probe = distribution.remote_service(key, "probe", ["boom"])

            def seen() -> bool:
                # Flower only sees events sent after its receiver bound: call again until it shows all.
                articles.create({"title": "seen by flower"}, {})
                with pytest.raises(NotFound):
                    articles.get(999, {})
                with pytest.raises(GeneralError):
                    probe.boom("crash", {})
                return (
                    bool(flower.tasks(f"{key}.articles.create", state="SUCCESS"))
                    and bool(flower.tasks(f"{key}.articles.get", state="FAILURE"))
                    and bool(flower.tasks(f"{key}.probe.boom", state="FAILURE"))
                )

            wait_for(seen, timeout=30, interval=0.2, what="flower lists the calls")
            # Served on the fast path (one merged event per call): Flower still shows each call whole.
            assert "fast path serving queue" in worker.log()
            created = next(iter(flower.tasks(f"{key}.articles.create", state="SUCCESS").values()))
            assert created["worker"] == worker.name
            assert "seen by flower" in created["kwargs"] and created["args"] == "()"
            assert created["received"] <= created["started"] <= created["succeeded"]
            assert created["runtime"] is not None and 0 <= created["runtime"] < 5
            assert "seen by flower" in created["result"]
            failed = next(iter(flower.tasks(f"{key}.articles.get", state="FAILURE").values()))
            assert failed["name"] == f"{key}.articles.get"
            # An expected error is a refusal, not a crash: its name and code, no traceback.
            assert (failed.get("exception") or "").startswith("NotFound(404): ")
            assert not failed.get("traceback")
            # A bug keeps its traceback in Flower, chained to its cause (its caller got "Internal error").
            crashed = next(iter(flower.tasks(f"{key}.probe.boom", state="FAILURE").values()))
            assert "GeneralError" in (crashed.get("exception") or "")
            assert "KeyError: 'secret-internal-detail'" in (crashed.get("traceback") or "")
            # Calls served at once, each with its own merged task event: Flower shows every one of them.
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda n: articles.create({"title": f"batch-{n}"}, {}), range(24)))

            def batch_seen() -> bool:
                tasks = flower.tasks(f"{key}.articles.create", state="SUCCESS").values()
                shown = {task["kwargs"] for task in tasks if "batch-" in task["kwargs"] and task["runtime"]}
                return len(shown) == 24

            wait_for(batch_seen, timeout=15, interval=0.2, what="flower shows each of 24 concurrent calls")
    finally:
        finalize(api)
        cleanup(flower.broker, redis_url, key, runs)
        purge_prefix(redis_url, prefix)


@pytest.mark.rabbitmq
@pytest.mark.timeout(90)
def test_on_rabbitmq_calls_served_back_to_back_send_their_task_events_together(
    rabbitmq_url: str, redis_url: str
) -> None:
    # A serving thread holds the events of the calls it serves back to back and publishes them as one
    # task.multi list, as Celery's dispatcher batches them: fewer publishes, and each call still heard once.
    prefix = f"cs-batch-{uuid.uuid4().hex[:6]}"
    provider = amqp_provider("batch", rabbitmq_url, redis_url, prefix)
    key, runs = provider.key, provider.runs_key
    app, distribution = make_caller(provider, prefix)
    name = f"{key}.articles.create"
    try:
        with EventMessages(rabbitmq_url) as sent, provider.worker() as worker:
            assert "fast path serving queue" in worker.log()
            articles = distribution.remote_service(key, "articles", ["create"])
            titles = {f"burst-{n}" for n in range(24)}
            # 24 calls at once to a worker that serves one at a time (-P solo): they wait in the queue, and
            # its thread takes each as soon as it acknowledged the one before.
            with ThreadPoolExecutor(24) as pool:
                list(pool.map(lambda title: articles.create({"title": title}, {}), titles))

            def heard() -> set[str]:  # the title quoted as the kwargsrepr shows it: burst-1 is not burst-10
                return {t for event in sent.events(name) for t in titles if f"'{t}'" in event["kwargs"]}

            wait_for(lambda: heard() == titles, timeout=15, interval=0.1, what="an event of every call")
            events = sent.events(name)
            assert len(events) == 24 and len({event["uuid"] for event in events}) == 24  # each once
            assert {(e["type"], e["hostname"]) for e in events} == {("task-succeeded", worker.name)}
            batches = [body for routing_key, body in sent.messages if routing_key == "task.multi"]
            assert batches and all(isinstance(body, list) and len(body) > 1 for body in batches)
            assert len([m for m in sent.messages if name in json.dumps(m[1])]) < 24
    finally:
        finalize(app)
        cleanup(rabbitmq_url, redis_url, key, runs)
        purge_prefix(redis_url, prefix)


@pytest.mark.timeout(90)
def test_flower_never_shows_identity_or_credential_headers(flower: Flower, redis_url: str) -> None:
    key = f"flower-auth-{uuid.uuid4().hex[:8]}"
    prefix = f"cs-flower-{uuid.uuid4().hex[:6]}"
    runs = f"test-runs:{key}"
    env = provider_env(key, flower.broker, redis_url, runs, CELERY_SERVICES_REGISTRY_PREFIX=prefix)
    marker = uuid.uuid4().hex
    api = App()
    try:
        with Provider(key, flower.broker, redis_url, runs, env).worker():
            # authentication: the identity and credential headers travel to the provider.
            distribution = distribute_caller(
                api,
                flower,
                redis_url,
                prefix,
                authentication=True,
                forwarded_headers=EVERY_HEADER,
            )
            probe = distribution.remote_service(key, "probe", ["find"])
            name = f"{key}.probe.find"

            def listed() -> dict[str, Any]:
                # Flower only sees events sent after its receiver bound: call again until it lists one.
                assert probe.find(credential_params(marker))[0]["pid"] > 0
                return {
                    task_id: task
                    for task_id, task in flower.tasks(name, state="SUCCESS").items()
                    if marker in (task.get("kwargs") or "")
                }

            tasks = wait_for(listed, timeout=30, interval=0.2, what="flower lists the call")
        shown = flower.get("/api/tasks", taskname=name).text
        assert marker in shown
        assert_no_secret(shown)
        for task_id, task in tasks.items():
            assert_masked(task["kwargs"], marker)
            info = flower.get(f"/api/task/info/{task_id}")
            assert info.status_code == 200, info.text
            assert_no_secret(info.text)
            assert_masked(json.loads(info.text)["kwargs"], marker)
    finally:
        finalize(api)
        cleanup(flower.broker, redis_url, key, runs)
        purge_prefix(redis_url, prefix)
