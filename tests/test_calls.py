"""Remote calls across processes: real `celery worker` subprocesses, real Redis (and RabbitMQ) brokers."""

from __future__ import annotations

import datetime as dt
import decimal
import gc
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_services import (
    App,
    BadRequest,
    DistributionSettings,
    GeneralError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Timeout,
    Unavailable,
    distribute,
    finalize,
)
from celery_services.distribution import Distribution
from celery_services.distribution.caller import connect_pauses
from celery_services.testing import WorkerProcess, wait_for

from .support import Provider, cleanup, provider_env
from .test_events_bus import ConnectionAttempts

ALL = ["find", "get", "create", "update", "patch", "remove", "publish_article"]
PROBE = ["get", "find", "slow", "boom", "nested"]
#: The worker process of each module's provider, by key (its log).
WORKERS: dict[str, WorkerProcess] = {}


def provider_log(provider: Provider) -> list[str]:
    return WORKERS[provider.key].log().splitlines()


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> str:
    if request.param == "redis":
        return redis_url
    return str(request.getfixturevalue("rabbitmq_url"))


@pytest.fixture(scope="module")
def provider(broker: str, redis_url: str) -> Iterator[Provider]:
    key = f"prov-{os.urandom(4).hex()}"
    runs = f"test-runs:{key}"
    prov = Provider(key, broker, redis_url, runs, provider_env(key, broker, redis_url, runs))
    with prov.worker() as worker:
        WORKERS[key] = worker
        yield prov
    WORKERS.pop(key, None)
    cleanup(broker, redis_url, key, runs)


def make_caller(provider: Provider, **options: Any) -> tuple[App, Distribution]:
    app = App()
    settings = DistributionSettings(
        key=f"caller-{os.urandom(3).hex()}",
        broker_url=provider.broker,
        result_backend=provider.backend,
        services=[],
        remote_services=[],  # these tests mount their proxies by hand, with remote_service()
        timeout=8,
        **options,
    )
    return app, distribute(app, settings)


def flag_after(seconds: float) -> threading.Event:
    """An event that sets itself ``seconds`` from now: whatever is seen while it is still unset came first."""
    flag = threading.Event()
    timer = threading.Timer(seconds, flag.set)
    timer.daemon = True
    timer.start()
    return flag


@pytest.fixture
def caller(provider: Provider) -> Iterator[tuple[App, Distribution]]:
    app, distribution = make_caller(provider)
    yield app, distribution
    finalize(app)


def test_crud_through_proxy_equals_local(provider: Provider, caller: tuple[App, Distribution]) -> None:
    from workers.services import Articles

    app, distribution = caller
    app.use("articles", distribution.remote_service(provider.key, "articles", ALL))
    local = App().use("articles", Articles(), methods=["publish_article"])
    remote = app.service("articles")
    tag = os.urandom(4).hex()
    for svc in (local, remote):
        created = svc.create({"title": "first", "tag": tag})
        assert svc.get(created["id"]) == created
        assert svc.update(created["id"], {"title": "replaced", "tag": tag}) == {
            "id": created["id"],
            "title": "replaced",
            "tag": tag,
        }
        assert svc.patch(created["id"], {"n": 1})["n"] == 1
        assert svc.find({"query": {"tag": tag}}) == [svc.get(created["id"])]
        assert svc.publish_article({"id": created["id"]})["published"] is True
        assert svc.remove(created["id"])["title"] == "replaced"
        with pytest.raises(NotFound):
            svc.get(created["id"])


def test_values_travel_in_their_json_form_and_what_has_none_is_refused_unsent(
    provider: Provider, caller: tuple[App, Distribution]
) -> None:
    # The wire's encoder is pydantic's (protocol.dumps), as for events: what json.dumps refuses but has a
    # JSON form arrives in that form; what has none is a BadRequest before anything is queued.
    app, distribution = caller
    app.use("articles", distribution.remote_service(provider.key, "articles", ALL))
    remote = app.service("articles")
    uid = uuid.uuid4()
    data = {
        "title": 'é 日本 \u2028 "q" \\',
        "when": dt.datetime(2026, 11, 28, 12, 30, tzinfo=dt.UTC),
        "uid": uid,
        "price": decimal.Decimal("9.90"),
        "tags": ("a", "b"),
        "inf": math.inf,
    }
    created = remote.create(data)
    assert remote.get(created["id"]) == created
    assert {k: created[k] for k in data} == {
        "title": data["title"],
        "when": "2026-11-28T12:30:00Z",
        "uid": str(uid),
        "price": "9.90",
        "tags": ["a", "b"],
        "inf": math.inf,
    }
    queued = redis.Redis.from_url(provider.broker).llen(provider.key) if "amqp" not in provider.broker else 0
    with pytest.raises(BadRequest, match="not JSON serializable"):
        remote.create({"title": object()})
    with pytest.raises(BadRequest, match="not JSON serializable"):
        remote.create({"title": "\ud800"})  # a lone surrogate: no UTF-8 form
    if "amqp" not in provider.broker:
        assert redis.Redis.from_url(provider.broker).llen(provider.key) == queued


def test_method_outside_list_is_refused_without_sending(provider: Provider, redis_url: str) -> None:
    app, distribution = make_caller(provider)
    try:
        app.use("probe", distribution.remote_service("nobody-" + provider.key, "probe", ["get"]))
        with pytest.raises(MethodNotAllowed):
            app.service("probe").find()
        with pytest.raises(MethodNotAllowed):
            app.service("probe").slow({"tag": "x", "seconds": 0})
        if not provider.broker.startswith("amqp"):
            assert redis.Redis.from_url(provider.broker).llen("nobody-" + provider.key) == 0
    finally:
        finalize(app)


def test_a_calling_thread_holds_one_reply_connection_and_gives_it_back_when_it_ends(
    provider: Provider, caller: tuple[App, Distribution]
) -> None:
    app, distribution = caller
    app.use("articles", distribution.remote_service(provider.key, "articles", ["create", "get"]))
    articles = app.service("articles")
    item = articles.create({"title": "held"})
    pool = distribution.reply_store.connection_pool
    seen: list[Any] = []

    def calls() -> None:
        for _ in range(3):
            assert articles.get(item["id"]) == item
            seen.append(distribution.transport._local.replies[1].get())

    thread = threading.Thread(target=calls)
    thread.start()
    thread.join(10)
    # One connection for the thread's calls, taken from the pool once and held between them.
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2]
    assert seen[0] in pool._in_use_connections
    del thread
    gc.collect()
    # The thread ended: its connection is the pool's again, for the next thread.
    assert seen[0] not in pool._in_use_connections and seen[0] in pool._available_connections


def test_errors_come_back_typed(provider: Provider, caller: tuple[App, Distribution]) -> None:
    app, distribution = caller
    app.use("probe", distribution.remote_service(provider.key, "probe", PROBE))
    with pytest.raises(NotFound) as not_found:
        app.service("probe").boom("notfound")
    assert not_found.value.message == "No record found for id 'x'"
    assert not_found.value.code == 404
    assert not_found.value.data == {"id": "x"}
    with pytest.raises(GeneralError) as general:
        app.service("probe").boom("other")
    # A bug's message may name internals: the caller gets the call id the provider logged the detail under.
    assert general.value.message == "Internal error"
    call_id = general.value.data["call_id"]
    assert set(general.value.data) == {"call_id"}
    wait_for(
        lambda: any(call_id in line and "KeyError" in line for line in provider_log(provider)),
        timeout=10,
        what="the provider logs the failure under its call id",
    )


def test_an_error_whose_detail_has_no_json_form_is_answered_not_timed_out(
    provider: Provider, caller: tuple[App, Distribution]
) -> None:
    # A BadRequest whose errors hold an exception object (a validator's, per field) could not be written:
    # the provider answered nothing, and its caller waited its whole timeout for a Timeout (found by a
    # review). Its detail goes as its text, as the data of such an error already did.
    app, distribution = caller
    app.use("probe", distribution.remote_service(provider.key, "probe", PROBE))
    started = time.monotonic()
    with pytest.raises(BadRequest) as refused:
        app.service("probe").boom("unencodable", {"timeout": 6})
    assert time.monotonic() - started < 3, "answered, not timed out"
    assert refused.value.message == "Invalid user"
    assert "not an e-mail" in json.dumps(refused.value.to_dict())


@pytest.mark.parametrize("deadline", ["abc", "nan", "inf", "1e400", [1]])
def test_a_call_whose_deadline_header_is_no_time_is_refused_unrun(
    provider: Provider, caller: tuple[App, Distribution], deadline: Any
) -> None:
    # Only senders outside the library write cs_deadline by hand (with signing on it is signed). An unreadable
    # one escaped untyped; NaN or infinity passed the check, so the call ran, then its answer failed.
    _app, distribution = caller
    tag = f"deadline-{os.urandom(3).hex()}"
    sent = distribution.celery.send_task(
        f"{provider.key}.probe.get",
        kwargs={"id": tag, "params": {}},
        queue=provider.key,
        headers={"cs_deadline": deadline},
    )
    with pytest.raises(BadRequest, match="deadline"):
        sent.get(timeout=8)
    assert not any(run.startswith(f"get-{tag}") for run in provider.runs())


def test_the_payload_limit_counts_bytes_not_characters(
    provider: Provider, caller: tuple[App, Distribution]
) -> None:
    # A call of 350,000 euro signs is 1.05 MB on the wire, over the 1 MiB default, in 350,000 characters:
    # the limit counted characters (found by a review).
    app, distribution = caller
    euros = "\u20ac" * 350_000
    assert len(euros) < 1_048_576 < len(euros.encode())
    app.use("probe", distribution.remote_service(provider.key, "probe", PROBE))
    with pytest.raises(PayloadTooLarge):
        app.service("probe").slow({"tag": euros, "seconds": 0})
    sent = distribution.celery.send_task(
        f"{provider.key}.probe.get", kwargs={"id": 1, "data": euros, "params": {}}, queue=provider.key
    )
    with pytest.raises(PayloadTooLarge):
        sent.get(timeout=8)


def test_provider_hooks_run_with_from_remote_and_gateway_params(
    provider: Provider, caller: tuple[App, Distribution]
) -> None:
    app, distribution = caller
    app.use("probe", distribution.remote_service(provider.key, "probe", PROBE))
    seen = app.service("probe").get(
        7,
        {
            "query": {"a": 1},
            "provider": "rest",
            "user": {"email": "a@b", "password": "hash"},
            "authentication": {"accessToken": "tok"},
            "headers": {
                "authorization": "Bearer tok",
                "x-api-key": "k",
                "x-request-id": "r-1",
                "x-trace": "not listed",
            },
            "connection": object(),  # not JSON-safe, not whitelisted: never sent, never crashes
            "secret": "not whitelisted",
        },
    )
    params = dict(seen["params"])
    assert params.pop("call_id")  # every call has its id, and knows whether it is a redelivery
    assert params.pop("redelivered") is False
    assert params == {
        "query": {"a": 1},
        "headers": {"x-request-id": "r-1"},  # forwarded_headers: an allow-list, credentials never
        "from_remote": True,
        "hooked": True,
    }


def test_proxy_hooks_from_settings(provider: Provider) -> None:
    log: list[str] = []
    app, distribution = make_caller(
        provider,
        hooks={
            "before": {"all": [lambda ctx: log.append(f"before:{ctx.method}")]},
            "after": {"get": [lambda ctx: log.append(f"after:{ctx.result['id']}")]},
        },
    )
    try:
        app.use("probe", distribution.remote_service(provider.key, "probe", PROBE))
        app.service("probe").get(3)
        assert log == ["before:get", "after:3"]
    finally:
        finalize(app)


def test_nested_calls_inherit_deadline_and_self_calls_short_circuit(provider: Provider) -> None:
    # The probe's nested method calls another app (a second provider key) and its own key, from a solo
    # worker of concurrency 1: a self call sent to its own queue would wait for itself forever.
    other = f"other-{os.urandom(3).hex()}"
    env = provider_env(other, provider.broker, provider.backend, provider.runs_key)
    app, distribution = make_caller(provider)
    try:
        with WorkerProcess("tests.apps.provider", other, env=env):
            app.use("probe", distribution.remote_service(provider.key, "probe", PROBE))
            before = time.time()
            out = app.service("probe").nested({"key": other}, {"timeout": 6})
            after = time.time()
            outer = out["outer_deadline"]
            assert before + 6 <= outer <= after + 6  # the caller's clock when it sent the call, plus 6 s
            assert out["inner"]["deadline"] == pytest.approx(outer)
            assert out["inner"]["params"]["from_remote"] is True
            assert out["self"]["id"] == 2
            assert out["self"]["pid"] == out["pid"]  # served in-process, not through the queue
    finally:
        finalize(app)
        cleanup(provider.broker, provider.backend, other)


def test_bad_envelope_and_oversize_payload(provider: Provider, caller: tuple[App, Distribution]) -> None:
    app, distribution = caller
    celery = distribution.celery
    name = f"{provider.key}.probe.get"
    bad = celery.send_task(name, kwargs={"unexpected": 1}, queue=provider.key)
    with pytest.raises(BadRequest, match="Malformed call envelope"):
        bad.get(timeout=8)
    positional = celery.send_task(name, args=(1, 2), queue=provider.key)
    with pytest.raises(BadRequest):
        positional.get(timeout=8)
    big = "x" * (1_048_576 + 10)
    oversize = celery.send_task(name, kwargs={"id": 1, "data": big, "params": {}}, queue=provider.key)
    with pytest.raises(PayloadTooLarge):
        oversize.get(timeout=8)
    app.use("probe", distribution.remote_service(provider.key, "probe", PROBE))
    with pytest.raises(PayloadTooLarge):
        app.service("probe").slow({"tag": big, "seconds": 0})
    assert not any("slow" in run for run in provider.runs())
    assert app.service("probe").get(1)["id"] == 1  # the worker is alive and serving


def unserved_key(provider: Provider, label: str) -> tuple[str, str, dict[str, str]]:
    """A fresh key no worker serves yet, its runs list, and the environment of a worker that would."""
    key = f"{label}-{os.urandom(3).hex()}"
    runs = f"test-runs:{key}"
    return key, runs, provider_env(key, provider.broker, provider.backend, runs)


def test_timeout_and_expired_call_never_runs(provider: Provider, redis_url: str) -> None:
    key, runs, env = unserved_key(provider, "late")
    app, distribution = make_caller(provider)
    try:
        app.use("probe", distribution.remote_service(key, "probe", PROBE))
        # No instance of the key: refused at once (Unavailable, not a Timeout), nothing queued.
        with pytest.raises(Unavailable):
            app.service("probe").get("late", timeout=1.0)
        if not provider.broker.startswith("amqp"):
            assert redis.Redis.from_url(provider.broker).llen(key) == 0
        # Sent anyway, waiting for an instance: a Timeout at the call's own deadline (1 s), never before it,
        # and long before the caller's default timeout (8 s) would have ended it.
        default_half_gone = flag_after(8 / 2)
        before = time.time()
        with pytest.raises(Timeout) as timed_out:
            app.service("probe").get("late", {"wait": True}, timeout=1.0)
        assert time.time() >= before + 1.0 - 0.01  # not before its deadline (Redis counts in milliseconds)
        assert not default_half_gone.is_set()
        assert timed_out.value.code == 408
        with pytest.raises(Timeout):
            app.service("probe").get("late-params", {"timeout": 0.5, "wait": True})
        late = Provider(key, provider.broker, provider.backend, runs, env)
        with late.worker():
            assert app.service("probe").get("after")["id"] == "after"
            runs_seen = late.runs()
        assert any(r.startswith("get-after:") for r in runs_seen)
        assert not any(r.startswith("get-late") for r in runs_seen)
    finally:
        finalize(app)
        cleanup(provider.broker, provider.backend, key, runs)


def queued(broker: str, queue: str) -> int:
    """How many messages wait in ``queue`` (0 when it does not exist)."""
    if not broker.startswith("amqp"):
        store = redis.Redis.from_url(broker)
        try:
            return int(store.llen(queue))
        finally:
            store.close()
    from kombu import Connection

    with Connection(broker) as connection:  # type: ignore[no-untyped-call]
        try:
            return int(connection.default_channel.queue_declare(queue, passive=True).message_count)
        except Exception:  # no such queue: the channel closes
            return 0


def test_a_call_sent_before_any_worker_waits_in_its_queue_and_is_served(provider: Provider) -> None:
    from concurrent.futures import ThreadPoolExecutor

    key, runs, env = unserved_key(provider, "early")
    app, distribution = make_caller(provider)
    try:
        app.use("probe", distribution.remote_service(key, "probe", PROBE))
        with ThreadPoolExecutor(1) as pool:
            # No worker has declared the key's queue yet: the caller declares it, so the call waits there.
            answer = pool.submit(app.service("probe").get, "early", {"wait": True}, timeout=30)
            wait_for(lambda: queued(provider.broker, key) == 1, timeout=10, what="the call queued")
            with Provider(key, provider.broker, provider.backend, runs, env).worker():
                assert answer.result(timeout=30)["id"] == "early"
    finally:
        finalize(app)
        cleanup(provider.broker, provider.backend, key, runs)


def test_flower_and_logs_never_see_user_or_authentication(provider: Provider, redis_url: str) -> None:
    # On both brokers: the worker's task event that shows a call's arguments (what Flower shows, received
    # here the way Flower receives it) and the worker's log mask identity and credential headers of a call
    # that carries them.
    from .test_flower import EVERY_HEADER, TaskEvents, assert_masked, assert_no_secret, credential_params

    key = f"masked-{os.urandom(3).hex()}"
    runs = f"test-runs:{key}"
    marker = os.urandom(8).hex()
    app, distribution = make_caller(provider, authentication=True, forwarded_headers=EVERY_HEADER)
    try:
        worker = WorkerProcess(
            "tests.apps.provider", key, env=provider_env(key, provider.broker, redis_url, runs)
        )
        with worker, TaskEvents(provider.broker) as events:
            app.use("probe", distribution.remote_service(key, "probe", PROBE))
            name = f"{key}.probe.find"

            def received() -> list[dict[str, Any]]:
                # The receiver sees only events sent after it bound: call again until one arrives.
                assert app.service("probe").find(credential_params(marker))[0]["pid"] > 0
                return [e for e in events.received(name) if marker in e["kwargs"]]

            event = wait_for(received, timeout=30, interval=0.1, what="the task event with the arguments")[0]
            log = worker.log()
        assert_masked(event["kwargs"], marker)
        assert_no_secret(json.dumps(event))
        assert event["args"] == "()"
        assert event["expires"] is not None
        assert name in log and marker not in log  # the worker logs the call, never its params
        assert_no_secret(log)
    finally:
        finalize(app)
        cleanup(provider.broker, redis_url, key, runs)


def test_unreachable_broker_is_unavailable_without_naming_it(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = App()
    distribution = distribute(
        app,
        DistributionSettings(
            key=f"lonely-{os.urandom(3).hex()}",
            broker_url="redis://:s3cret@127.0.0.1:1/0",
            result_backend=redis_url,
            services=[],
            remote_services=[],
            timeout=2,
        ),
    )
    try:
        app.use("probe", distribution.remote_service("nobody", "probe", ["get"]))
        attempts = ConnectionAttempts(monkeypatch, port=1)
        with pytest.raises(Unavailable) as unavailable:  # not a Timeout: given up on the broker, not waited
            app.service("probe").get(1, {"wait": True})  # past the registry check, to the broker
        # A retry bounded by the call's 2 s, at the pauses any refusing Redis of a call gets (0.05 s doubling
        # to 0.5 s): 8 attempts at most.
        assert 1 <= attempts.count <= 1 + len(list(connect_pauses(time.time() + 2))), attempts.count
        # The message reaches HTTP clients: no host, no port, no credential; the log has the masked URL.
        assert "127.0.0.1" not in str(unavailable.value.to_dict()) and "s3cret" not in str(
            unavailable.value.to_dict()
        )
    finally:
        finalize(app)


def test_authentication_true_lets_identity_travel(provider: Provider, redis_url: str) -> None:
    key = f"auth-{os.urandom(3).hex()}"
    env = provider_env(key, provider.broker, provider.backend, provider.runs_key)
    env["CELERY_SERVICES_AUTHENTICATION"] = "true"
    app, distribution = make_caller(provider, authentication=True)
    try:
        with WorkerProcess("tests.apps.provider", key, env=env):
            app.use("probe", distribution.remote_service(key, "probe", PROBE))
            params = app.service("probe").get(
                1,
                {
                    "provider": "rest",
                    "user": {"id": 1},
                    "authentication": {"accessToken": "tok"},
                    "headers": {"authorization": "Bearer tok"},
                },
            )["params"]
        assert params["user"] == {"id": 1}
        assert params["authentication"] == {"accessToken": "tok"}
        assert params["provider"] == "rest"
        assert params["headers"] == {"authorization": "Bearer tok"}
    finally:
        finalize(app)
        cleanup(provider.broker, provider.backend, key)


def test_two_replicas_share_the_calls(provider: Provider) -> None:
    app, distribution = make_caller(provider)
    try:
        with provider.worker():
            app.use("probe", distribution.remote_service(provider.key, "probe", PROBE))
            from concurrent.futures import ThreadPoolExecutor

            def pid(_: int) -> int:
                return int(app.service("probe").find()[0]["pid"])

            with ThreadPoolExecutor(8) as pool:
                pids = list(pool.map(pid, range(200)))
        counts = {pid: pids.count(pid) for pid in set(pids)}
        assert len(counts) == 2, counts
        assert min(counts.values()) >= 20, counts
    finally:
        finalize(app)


def test_call_in_flight_on_killed_replica_completes_on_the_other(provider: Provider) -> None:
    replicas = provider.sibling("replicas")
    key, runs = replicas.key, replicas.runs_key
    app, distribution = make_caller(provider)
    first = replicas.worker()
    second = replicas.worker()
    try:
        first.start()
        second.start()
        app.use("probe", distribution.remote_service(key, "probe", PROBE))
        tag = os.urandom(3).hex()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(app.service("probe").slow, {"tag": tag, "seconds": 1.0}, {"timeout": 8})
            start_run = wait_for(
                lambda: next((r for r in replicas.runs() if r.startswith(f"slow-start-{tag}:")), None),
                timeout=5,
                what="slow call started",
            )
            victim_pid = int(start_run.rsplit(":", 1)[1])
            victim = first if first.pid == victim_pid else second
            survivor = second if victim is first else first
            victim.kill()
            result = future.result(timeout=10)  # a result, not a Timeout: answered within its 8 s
        assert result["tag"] == tag
        assert result["pid"] == survivor.pid
        assert result["redelivered"] is True  # served again by the survivor, as a redelivery of the call
    finally:
        first.stop()
        second.stop()
        finalize(app)
        cleanup(provider.broker, provider.backend, key, runs)


def test_long_call_is_not_served_twice(provider: Provider) -> None:
    # The workers' visibility timeout is 2 s (timeout 8 / 4): without the lease kept on a call in flight,
    # the idle replica would take this 4 s call back from the unacked index and run it a second time.
    replicas = provider.sibling("lease")
    key, runs = replicas.key, replicas.runs_key
    app, distribution = make_caller(provider)
    try:
        with replicas.worker(), replicas.worker():
            app.use("probe", distribution.remote_service(key, "probe", PROBE))
            tag = os.urandom(3).hex()
            assert app.service("probe").slow({"tag": tag, "seconds": 4}, {"timeout": 8})["tag"] == tag
            # Give a duplicate the chance to show: the other replica sweeps every second.
            assert app.service("probe").get("after")["id"] == "after"
        starts = [r for r in replicas.runs() if r.startswith(f"slow-start-{tag}:")]
        assert len(starts) == 1, replicas.runs()
    finally:
        finalize(app)
        cleanup(provider.broker, provider.backend, key, runs)


def test_own_celery_app_with_an_in_process_worker_serves_services_mounted_later(redis_url: str) -> None:
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    from celery_services import MemoryService

    key = f"mine-{os.urandom(3).hex()}"
    mine = Celery("mine", broker=redis_url, backend=redis_url, set_as_current=False)
    mine.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    provider = App()
    provider.use("articles", MemoryService())
    common = {"broker_url": redis_url, "result_backend": redis_url, "remote_services": []}
    dist = distribute(provider, DistributionSettings(key=key, **common), celery=mine)
    caller, caller_dist = App(), None
    root_level = logging.getLogger().level  # Celery's start_worker sets it for the whole process
    try:
        assert dist.celery is mine
        assert f"{key}.articles.get" in mine.tasks
        caller_dist = distribute(caller, DistributionSettings(key=f"c-{key}", services=[], **common))
        with start_worker(mine, pool="threads", concurrency=2, perform_ping_check=False, queues=[key]):
            caller.use("articles", caller_dist.remote_service(key, "articles", ["create", "get"]))
            item = caller.service("articles").create({"title": "served by my own app"})
            assert caller.service("articles").get(item["id"]) == item
            # Mounted after the worker started: served too, the worker runs in this process.
            provider.use("late", MemoryService())
            caller.use("late", caller_dist.remote_service(key, "late", ["create"]))
            assert caller.service("late").create({"n": 1}) == {"n": 1, "id": 0}
    finally:
        logging.getLogger().setLevel(root_level)
        finalize(caller)
        finalize(provider)
        cleanup(redis_url, redis_url, key)


@pytest.mark.rabbitmq
@pytest.mark.timeout(30)
def test_a_forked_child_calls_on_a_rabbitmq_connection_of_its_own(rabbitmq_url: str, redis_url: str) -> None:
    # A thread's RabbitMQ producer was kept across a fork (a prefork pool's child, forked by a thread that had
    # made a call, at import say): the child published its calls on its parent's socket. (Its Redis
    # connections were already made anew, by pid.)
    app = App()
    settings = DistributionSettings(
        key=f"forker-{os.urandom(3).hex()}",
        broker_url=rabbitmq_url,
        result_backend=redis_url,
        services=[],
        remote_services=[],
    )
    distribution = distribute(app, settings)
    try:
        inherited = distribution.transport._producer()
        read, write = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                own = distribution.transport._producer() is not inherited
                os.write(write, b"own" if own else b"inherited")
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as answer:
            told = answer.read()
        os.waitpid(child, 0)
        assert told == "own"
    finally:
        finalize(app)
