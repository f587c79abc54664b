"""Calls under real conditions: long calls, a shared broker, late and paused workers, unknown methods.

Each scenario was reproduced against the library before its fix (see the issue "Real conditions"); real
``celery worker`` processes, real Redis (and RabbitMQ where it applies), nothing mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_services import (
    App,
    BadGateway,
    BadRequest,
    DistributionSettings,
    MethodNotAllowed,
    PayloadTooLarge,
    ServiceError,
    Timeout,
    Unavailable,
    distribute,
    finalize,
)
from celery_services.distribution import Distribution
from celery_services.testing import WorkerProcess, wait_for
from celery_services.testing.brokers import RedisServer

from ..support import (
    ROOT,
    Provider,
    caller_on,
    cleanup,
    fresh_prefix,
    make_caller,
    provider_env,
    purge_prefix,
    registered_provider,
    reply_lists,
    write_manifest,
)
from .brokers import stalled

PROBE = ["get", "find", "slow", "boom", "nested", "grow"]
SLACK = 2.0  # how far past its timeout a call may end (scheduling on a loaded machine): more is a hang


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    yield from fresh_prefix(redis_url, "faults")


@contextlib.contextmanager
def serving(redis_url: str, prefix: str, label: str, **env: str) -> Iterator[tuple[Provider, Distribution]]:
    """A provider worker of a new key in ``prefix``, and a caller's distribution; both gone afterwards."""
    prov = registered_provider(redis_url, prefix, label, **env)
    app, distribution = make_caller(prov, prefix)
    try:
        with prov.worker():
            yield prov, distribution
    finally:
        finalize(app)
        cleanup(redis_url, redis_url, prov.key, prov.runs_key)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker_kind", ["redis", "rabbitmq"])
def test_call_longer_than_five_seconds(
    request: pytest.FixtureRequest, redis_url: str, prefix: str, broker_kind: str
) -> None:
    # redis-py 8 cuts a blocking read after 5 s by default: the reply wait sets its own from the deadline.
    broker = redis_url if broker_kind == "redis" else str(request.getfixturevalue("rabbitmq_url"))
    key = f"long-{os.urandom(3).hex()}"
    runs = f"test-runs:{key}"
    env = provider_env(key, broker, redis_url, runs, CELERY_SERVICES_REGISTRY_PREFIX=prefix)
    prov = Provider(key, broker, redis_url, runs, env)
    app, distribution = make_caller(prov, prefix)
    try:
        with prov.worker():
            probe = distribution.remote_service(key, "probe", PROBE)
            result = probe.slow({"tag": "six", "seconds": 6}, {"timeout": 15})
        assert result["tag"] == "six"
    finally:
        finalize(app)
        cleanup(broker, redis_url, key, runs)


@pytest.mark.timeout(90)
def test_other_celery_apps_on_the_same_database_run_once(redis_url: str, prefix: str) -> None:
    # kombu keeps one unacked index per Redis database: a short visibility timeout set by our workers made
    # another app's long late-ack task run again. Our replica (lease 1 s) serves calls meanwhile.
    prov = registered_provider(redis_url, prefix, "shared", CELERY_SERVICES_LEASE_TIMEOUT="1")
    queue = f"foreign-{os.urandom(3).hex()}"
    runs = f"test-runs:{queue}"
    foreign = WorkerProcess(
        "tests.apps.foreign",
        queue,
        env={"FOREIGN_BROKER": redis_url, "FOREIGN_RUNS": runs, "PYTHONPATH": str(ROOT)},
    )
    app, distribution = make_caller(prov, prefix)
    store = redis.Redis.from_url(redis_url)
    try:
        with prov.worker(), foreign:
            from celery import Celery

            sender = Celery("sender", broker=redis_url, set_as_current=False)
            sender.send_task("foreign.work", args=("long", 4.0), queue=queue)
            wait_for(
                lambda: b"start-long" in store.lrange(runs, 0, -1), timeout=15, what="foreign task started"
            )
            probe = distribution.remote_service(prov.key, "probe", PROBE)
            while b"end-long" not in store.lrange(runs, 0, -1):
                assert probe.get(1, {})["id"] == 1  # our worker is busy with its own calls meanwhile
            # FIFO behind it: a copy given back while it ran would run before this one.
            sender.send_task("foreign.work", args=("marker", 0.0), queue=queue)
            wait_for(lambda: b"end-marker" in store.lrange(runs, 0, -1), timeout=15, what="marker ran")
        assert [r for r in store.lrange(runs, 0, -1) if r.startswith(b"start-")] == [
            b"start-long",
            b"start-marker",
        ]
    finally:
        finalize(app)
        store.close()
        cleanup(redis_url, redis_url, prov.key, prov.runs_key, queue, runs)


#: Seconds a loaded machine may take from the library's deadline check to the first line of the method.
CHECK_TO_START = 0.25


@pytest.mark.timeout(90)
def test_timed_out_calls_never_start_and_leave_no_reply(redis_url: str, prefix: str) -> None:
    # 60 ms calls with a 0.1 s timeout from 8 threads: most wait in the queue past their deadline.
    with serving(redis_url, prefix, "late") as (prov, distribution):
        probe = distribution.remote_service(prov.key, "probe", PROBE)

        def one(i: int) -> str:
            try:
                probe.slow({"tag": f"t{i}", "seconds": 0.06}, {"timeout": 0.1})
                return "ok"
            except Timeout:
                return "timeout"

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, range(160)))
        assert "timeout" in outcomes
        # Queued behind all of them: once it is answered, the worker has seen every call.
        assert probe.get("last", {"timeout": 30})["id"] == "last"
        runs = prov.runs()
        # A call whose caller gave up was not started (the probe records a start past the deadline, and how
        # late), and nothing was pushed for it. Without the library's check, calls queued behind the others
        # would start seconds late; one let in just before its deadline reaches the method a little after
        # it when the machine is loaded (the time from the check to the method's first line).
        assert any(r.startswith("slow-start-") for r in runs)
        late = [r for r in runs if r.startswith("late-start-")]
        assert not [r for r in late if float(r.split("+")[1].split("s:")[0]) > CHECK_TO_START], late
        assert reply_lists(redis_url, prefix) == []


@pytest.mark.timeout(60)
def test_result_over_the_limit_is_payload_too_large(redis_url: str, prefix: str) -> None:
    with serving(redis_url, prefix, "big", CELERY_SERVICES_MAX_PAYLOAD_BYTES="100000") as (
        prov,
        distribution,
    ):
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        assert probe.grow({"size": 1000}, {}) == "x" * 1000
        with pytest.raises(PayloadTooLarge) as too_large:
            probe.grow({"size": 200_000}, {})
        assert too_large.value.data["limit"] == 100_000
        assert probe.get(1, {})["id"] == 1  # the worker goes on


@pytest.mark.timeout(60)
def test_call_id_and_redelivered_reach_the_service(redis_url: str, prefix: str) -> None:
    with serving(redis_url, prefix, "ids") as (prov, distribution):
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        one, two = probe.get(1, {})["params"], probe.get(1, {})["params"]
    assert one["redelivered"] is False
    assert one["call_id"] and one["call_id"] != two["call_id"]


@pytest.mark.timeout(60)
def test_unknown_method_is_answered_at_once(redis_url: str, prefix: str) -> None:
    # A newer caller, an older provider: Celery drops the unregistered task; the caller must not wait.
    with serving(redis_url, prefix, "old") as (prov, distribution):
        newer = distribution.remote_service(prov.key, "probe", ["archive"])
        with pytest.raises(MethodNotAllowed) as refused:
            newer.archive({"id": 1}, {"timeout": 30})
        assert refused.value.data == {"key": prov.key, "path": "probe", "method": "archive"}
        assert prov.key in refused.value.message and "probe.archive" in refused.value.message
        assert distribution.remote_service(prov.key, "probe", PROBE).get(1, {})["id"] == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "celery-consumer"])
def test_unknown_method_is_answered_with_a_signed_reply(redis_url: str, prefix: str, fast_path: bool) -> None:
    # With signing on, the caller refuses an unsigned reply (BadGateway): the provider's answer to a method
    # it does not serve must be signed as its other answers are, on either consumer.
    secret = "unknown-method-secret-0000000001"
    env = {
        "CELERY_SERVICES_SIGNING_KEYS": json.dumps([secret]),
        "CELERY_SERVICES_FAST_PATH": json.dumps(fast_path),
    }
    with serving(redis_url, prefix, "signed-old", **env) as (prov, _):
        app, distribution = make_caller(prov, prefix, signing_keys=[secret])
        try:
            newer = distribution.remote_service(prov.key, "probe", ["archive"])
            with pytest.raises(MethodNotAllowed) as refused:
                newer.archive({"id": 1}, {"timeout": 30})
            assert refused.value.data == {"key": prov.key, "path": "probe", "method": "archive"}
            assert distribution.remote_service(prov.key, "probe", PROBE).get(1, {})["id"] == 1
        finally:
            finalize(app)


@pytest.mark.timeout(60)
def test_call_to_a_key_with_no_live_instance(redis_url: str, prefix: str) -> None:
    prov = registered_provider(redis_url, prefix, "absent")
    app, distribution = make_caller(prov, prefix)
    store = redis.Redis.from_url(redis_url)
    try:
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        with pytest.raises(Unavailable) as unavailable:
            probe.get(1, {"timeout": 30})
        assert unavailable.value.data["key"] == prov.key
        assert not store.exists(prov.key)  # nothing queued for nobody
        with pytest.raises(Timeout):  # asked to wait for an instance: sent, and times out
            probe.get(1, {"timeout": 0.3, "wait": True})
        assert store.llen(prov.key) == 1
    finally:
        finalize(app)
        store.close()
        cleanup(redis_url, redis_url, prov.key, prov.runs_key)


@pytest.mark.timeout(60)
def test_cli_call_to_unknown_key_fails_fast_and_leaves_no_queue(redis_url: str, prefix: str) -> None:
    key = f"nosuch-{os.urandom(3).hex()}"
    env = {
        **os.environ,
        "CELERY_SERVICES_BROKER_URL": redis_url,
        "CELERY_SERVICES_REGISTRY_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    cli = str(Path(sys.executable).with_name("celery-services"))
    done = subprocess.run(
        [cli, "call", key, "articles", "get", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert done.returncode == 5, done.stderr
    assert "Unavailable" in done.stderr + done.stdout
    store = redis.Redis.from_url(redis_url)
    try:
        assert not store.exists(key)
        assert not store.exists(f"_kombu.binding.{key}")
        waited = subprocess.run(
            [cli, "call", key, "articles", "get", "1", "--wait", "--timeout", "0.5"],
            env=env,
            capture_output=True,
            text=True,
            timeout=40,
        )
        assert waited.returncode == 4, waited.stderr  # sent, and timed out (408)
        assert "Timeout" in waited.stderr + waited.stdout
        assert store.llen(key) == 1
    finally:
        store.close()
        cleanup(redis_url, redis_url, key)


@pytest.mark.timeout(60)
def test_a_timeout_of_no_finite_number_of_seconds_is_refused_unsent(redis_url: str, prefix: str) -> None:
    # Infinity and NaN failed the call with a bare OverflowError or ValueError; 1e11 seconds was queued,
    # then the wait for its reply failed with a bare OverflowError, its message left on the queue.
    key = f"patient-{os.urandom(3).hex()}"
    write_manifest(redis_url, prefix, key, ["probe"])
    app, distribution = make_caller(Provider(key, redis_url, redis_url, "", {}), prefix)
    store = redis.Redis.from_url(redis_url)
    refused = (math.inf, math.nan, 1e11)

    async def refused_async() -> None:
        for timeout in refused:
            with pytest.raises(BadRequest, match="timeout"):
                await probe.call_async("get", id=1, params={"timeout": timeout})

    try:
        wait_for(lambda: distribution.registry.has_key(key), timeout=5, what="the provider seen")
        probe = distribution.remote_service(key, "probe", ["get"])
        for timeout in refused:
            with pytest.raises(BadRequest, match="timeout"):
                probe.get(1, {"timeout": timeout})
        asyncio.run(refused_async())
        assert store.llen(key) == 0
    finally:
        finalize(app)
        store.close()
        cleanup(redis_url, redis_url, key)


@pytest.mark.timeout(60)
def test_malformed_reply_is_a_typed_error(redis_url: str, prefix: str) -> None:
    # A fake provider answering garbage on the reply list: the caller raises BadGateway, never a raw error.
    key = f"liar-{os.urandom(3).hex()}"
    write_manifest(redis_url, prefix, key, ["probe"])
    prov = Provider(key, redis_url, redis_url, "", {})
    app, distribution = make_caller(prov, prefix)
    store = redis.Redis.from_url(redis_url)
    # The last one nested deeper than json.loads recurses: it raised a bare RecursionError.
    answers = [b"not json", b"[1, 2]", json.dumps({"error": "x"}).encode(), b"[" * 5000 + b"]" * 5000]
    stop = threading.Event()

    def fake_provider() -> None:
        for answer in answers:
            popped = None
            while popped is None and not stop.is_set():
                popped = store.brpop([key], timeout=0.2)
            if popped is None:
                return
            call_id = json.loads(popped[1])["headers"]["id"]
            store.lpush(f"{prefix}:reply:{call_id}", answer)

    thread = threading.Thread(target=fake_provider, daemon=True)
    thread.start()
    try:
        wait_for(lambda: distribution.registry.has_key(key), timeout=5, what="fake provider seen")
        probe = distribution.remote_service(key, "probe", ["get"])
        for _ in answers:
            with pytest.raises(BadGateway) as bad:
                probe.get(1, {"timeout": 5})
            assert isinstance(bad.value, ServiceError) and bad.value.code == 502
    finally:
        stop.set()
        thread.join(timeout=5)
        finalize(app)
        store.delete(*reply_lists(redis_url, prefix) or ["none"])
        store.close()
        cleanup(redis_url, redis_url, key)


@pytest.mark.timeout(90)
def test_held_proxy_works_again_when_its_provider_returns(redis_url: str, prefix: str) -> None:
    # The README's `probe = distribution.wait_for("probe")`: the handle must outlive a provider blip, calls
    # and listeners alike, and `service-removed` / `service` still fire.
    prov = registered_provider(redis_url, prefix, "blip")
    app = App()
    seen: list[tuple[str, str]] = []
    app.on("service", lambda svc: seen.append(("service", svc.path)))
    app.on("service-removed", lambda svc: seen.append(("removed", svc.path)))
    distribution = distribute(
        app,
        DistributionSettings(
            key=f"holder-{os.urandom(3).hex()}",
            broker_url=redis_url,
            result_backend=redis_url,
            registry_prefix=prefix,
            heartbeat_interval=0.5,
            services=[],
            remote_services=[prov.key],
            timeout=8,
        ),
    )
    created: list[Any] = []
    try:
        with prov.worker():
            articles = distribution.wait_for("articles", timeout=10)
            articles.on("created", lambda data, context: created.append(data))
            articles.create({"title": "before"})
            wait_for(lambda: len(created) == 1, timeout=10, what="event before the blip")
        wait_for(lambda: ("removed", "articles") in seen, timeout=10, what="articles removed")
        with pytest.raises(Unavailable):
            articles.find()  # no live instance: at once, nothing queued
        with prov.worker():
            wait_for(lambda: seen.count(("service", "articles")) == 2, timeout=10, what="mounted again")
            assert app.service("articles") is articles  # the very handle, mounted again
            assert articles.create({"title": "after"})["title"] == "after"
            wait_for(lambda: len(created) == 2, timeout=10, what="event after the blip")
        assert [item["title"] for item in created] == ["before", "after"]
    finally:
        finalize(app)
        cleanup(redis_url, redis_url, prov.key, prov.runs_key)


def caller_of_nobody(broker: str, backend: str, registry: str, **options: Any) -> tuple[App, Any]:
    """A consumer app on ``broker`` and ``backend`` (finalize it), and its proxy of a key nobody serves."""
    app, distribution = caller_on(broker, backend, registry, **options)
    return app, distribution.remote_service("nobody", "articles", ["get"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["blocking", "asyncio"])
@pytest.mark.parametrize("apart", [False, True], ids=["broker is the reply store", "broker apart"])
def test_a_broker_out_of_memory_refuses_the_call_typed(
    private_redis: RedisServer, redis_url: str, transport: str, apart: bool
) -> None:
    # A Redis broker at its maxmemory with noeviction (the policy Redis advises for queues) answers LPUSH
    # with an OOM error: the call was refused, not sent. It reached the blocking transport's callers as
    # redis-py's own OutOfMemoryError (untyped), and the asyncio one's when the broker was apart.
    backend, registry = redis_url if apart else private_redis.url, f"cs-oom-{os.urandom(3).hex()}"
    app, proxy = caller_of_nobody(private_redis.url, backend, registry)
    admin = private_redis.client()
    try:
        admin.config_set("maxmemory-policy", "noeviction")  # this test's own server
        admin.config_set("maxmemory", "1")
        start = time.monotonic()
        with pytest.raises(Unavailable, match="not sent"):
            if transport == "blocking":
                proxy.get(1, {"timeout": 5, "wait": True})
            else:
                asyncio.run(proxy.call_async("get", id=1, params={"timeout": 5, "wait": True}))
        assert time.monotonic() - start < 2.5  # refused: not waited out to the deadline
        admin.config_set("maxmemory", "0")
        assert admin.llen("nobody") == 0
    finally:
        admin.close()
        finalize(app)
        if apart:
            purge_prefix(backend, registry)


@pytest.mark.timeout(90)
def test_calls_through_a_redis_broker_apart_from_the_reply_store(
    private_redis: RedisServer, redis_url: str, prefix: str
) -> None:
    # The broker a Redis of its own beside the reply store (broker db 0, results db 1, as Celery's docs set
    # them): a call is LPUSHed on the calling thread's (or loop's) connection to the broker, its reply
    # awaited on the reply store. A broker restart leaves that connection dead while idle: it is replaced
    # once, and the call goes through.
    key = f"apart-{os.urandom(3).hex()}"
    runs = f"test-runs:{key}"
    env = provider_env(key, private_redis.url, redis_url, runs, CELERY_SERVICES_REGISTRY_PREFIX=prefix)
    prov = Provider(key, private_redis.url, redis_url, runs, env)
    app, distribution = make_caller(prov, prefix)
    probe = distribution.remote_service(prov.key, "probe", PROBE)
    loop = asyncio.new_event_loop()  # one loop for every call: its connections are held between them

    def both(item: int) -> list[Any]:
        got = [probe.get(item, {"timeout": 10})["id"]]
        got.append(loop.run_until_complete(probe.call_async("get", id=item, params={"timeout": 10}))["id"])
        return got

    try:
        with prov.worker():
            assert both(1) == [1, 1]
            with private_redis.client() as broker:
                assert broker.llen(key) == 0  # queued on the broker, and taken
            private_redis.restart()
            assert both(2) == [2, 2]
    finally:
        loop.close()
        finalize(app)
        cleanup(private_redis.url, redis_url, key, runs)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["blocking", "asyncio"])
def test_after_redis_stalls_past_a_deadline_each_call_gets_its_own_reply(
    private_redis: RedisServer, transport: str
) -> None:
    # redis.asyncio returns None when a read given a timeout runs out, as it does for a nil, and keeps the
    # connection. The asyncio transport took that for "no reply" and released the connection with the
    # call's two answers still to come: each later call on it read the answers of the call before, and
    # got that call's result as its own.
    prefix = f"cs-stalled-{os.urandom(3).hex()}"
    # Its registry entry must outlive the stall (1-1.5 s): with the tests' usual 0.5 s heartbeat (TTL
    # 1.25 s) it could expire as Redis resumed, before the heartbeat stuck behind the stall renewed it, and
    # a later call failed "no live instance" (seen once in CI).
    prov = registered_provider(private_redis.url, prefix, "stalled", heartbeat="2")
    app, distribution = make_caller(prov, prefix)
    proxy = distribution.remote_service(prov.key, "probe", PROBE)

    async def get_async(item: int, timeout: float) -> Any:
        return await proxy.call_async("get", id=item, params={"timeout": timeout})

    def get(item: int, timeout: float) -> Any:
        if transport == "asyncio":
            return loop.run_until_complete(get_async(item, timeout))
        return proxy.get(item, {"timeout": timeout})

    loop = asyncio.new_event_loop()  # one loop for every call: its connection is held between them
    try:
        with prov.worker():
            assert get(1, 5)["id"] == 1
            assert private_redis.process is not None
            with stalled(private_redis.process), pytest.raises((Timeout, Unavailable)):
                get(2, 0.5)
            assert [get(n, 5)["id"] for n in range(3, 8)] == list(range(3, 8))
    finally:
        loop.close()
        finalize(app)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["blocking", "asyncio"])
def test_a_call_on_a_held_connection_ends_by_its_deadline_while_redis_stalls(transport: str) -> None:
    # The reply wait reads with a timeout of what is left and a margin for Redis's own BLPOP timeout to be
    # answered. A stalled Redis answers nothing: a 1 s call ended 2 s late, the margin (Unavailable: the
    # reply store stopped answering). Redis answers a BLPOP's timeout within its 0.1 s cron: half a second
    # is margin enough.
    server = RedisServer().start()
    app, proxy = caller_of_nobody(server.url, server.url, f"cs-stall-{os.urandom(3).hex()}")
    try:

        async def call_async(timeout: float) -> float:
            start = time.monotonic()
            with pytest.raises((Timeout, Unavailable)):
                await proxy.call_async("get", id=1, params={"timeout": timeout, "wait": True})
            return time.monotonic() - start

        def call(timeout: float) -> float:
            start = time.monotonic()
            with pytest.raises((Timeout, Unavailable)):
                proxy.get(1, {"timeout": timeout, "wait": True})
            return time.monotonic() - start

        async def both_async() -> float:
            await call_async(0.2)  # the loop's connection is made and held while Redis answers
            with stalled(process):
                return await call_async(1.0)

        process = server.process
        assert process is not None
        if transport == "blocking":
            call(0.2)  # the connection is made and held while Redis answers
            with stalled(process):
                took = call(1.0)
        else:
            took = asyncio.run(both_async())
        assert took < 1 + 1.5, f"a 1 s call took {took:.2f} s against a stalled Redis"  # was 3 s
    finally:
        finalize(app)
        server.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["blocking", "asyncio"])
@pytest.mark.parametrize("apart", [False, True], ids=["broker is the reply store", "broker apart"])
def test_a_large_call_ends_by_its_deadline_while_redis_stalls(
    redis_url: str, transport: str, apart: bool
) -> None:
    # Reading a call's answers was cut to its deadline, writing the call was not: the client's socket
    # timeout (5 s) bounded the write of a call larger than the socket buffers, to a Redis that stopped
    # reading, and a 1 s call of 12 MB ended 5 s after it began (found by a reviewer, both transports).
    server = RedisServer().start()
    backend = redis_url if apart else server.url  # apart: the stalled Redis is the broker only
    registry = f"cs-stall-{os.urandom(3).hex()}"
    app, proxy = caller_of_nobody(server.url, backend, registry, max_payload_bytes=64_000_000)
    huge = "x" * 12_000_000
    process = server.process
    assert process is not None

    async def call_async(id: Any, timeout: float) -> float:
        start = time.monotonic()
        with pytest.raises((Timeout, Unavailable)):
            await proxy.call_async("get", id=id, params={"timeout": timeout, "wait": True})
        return time.monotonic() - start

    def call(id: Any, timeout: float) -> float:
        start = time.monotonic()
        with pytest.raises((Timeout, Unavailable)):
            proxy.get(id, {"timeout": timeout, "wait": True})
        return time.monotonic() - start

    async def both_async() -> float:
        await call_async(1, 0.2)  # the loop's connections made and held while Redis answers
        with stalled(process):
            return await call_async(huge, 1.0)

    try:
        if transport == "blocking":
            call(1, 0.2)  # the connections made and held while Redis answers
            with stalled(process):
                took = call(huge, 1.0)
        else:
            took = asyncio.run(both_async())
        assert took < 1 + 1.5, f"a 1 s call of 12 MB took {took:.2f} s against a stalled Redis"
    finally:
        finalize(app)
        server.close()
        purge_prefix(redis_url, registry)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("broker", "transport"),
    [
        ("redis", "blocking"),
        ("redis", "asyncio"),
        ("redis apart", "blocking"),
        ("redis apart", "asyncio"),
        ("rabbitmq", "blocking"),
    ],
)
def test_a_call_from_a_new_thread_ends_by_its_deadline_while_the_broker_stalls(
    request: pytest.FixtureRequest, broker: str, transport: str
) -> None:
    # A thread's first call connects (an event loop's, for the asyncio transport). Against a stalled broker
    # its connection (and Redis's handshake) waited out the configured timeouts, 4-5 s past a 1 s call's
    # deadline: they must come from the call's (on RabbitMQ each attempt to connect gets what is left of
    # the deadline). The deadline that ends the connection ends the call as a Timeout, not sent: the broker
    # refused nothing. It was Unavailable ("broker unreachable"), which a loaded machine also gave a 0.1 s
    # call whose first connection took longer than that (test_timed_out_calls_never_start_and_leave_no_reply).
    if broker == "redis":
        server: Any = RedisServer().start()
        url, backend = server.url, server.url
    elif broker == "redis apart":  # a broker of its own beside the reply store, as Celery's docs set them
        server = RedisServer().start()
        url, backend = server.url, request.getfixturevalue("redis_url")
    else:
        server = request.getfixturevalue("rabbitmq")
        url, backend = server.url, request.getfixturevalue("redis_url")
    registry = f"cs-stall-{os.urandom(3).hex()}"
    app, proxy = caller_of_nobody(url, backend, registry)
    try:
        took: list[float] = []
        errors: list[BaseException] = []

        def first_call() -> None:
            start = time.monotonic()
            try:
                if transport == "blocking":
                    proxy.get(1, {"timeout": 1, "wait": True})
                else:
                    asyncio.run(proxy.call_async("get", id=1, params={"timeout": 1, "wait": True}))
            except ServiceError as exc:
                errors.append(exc)
            took.append(time.monotonic() - start)

        assert server.process is not None
        with stalled(server.process):
            caller = threading.Thread(target=first_call)
            caller.start()
            caller.join(timeout=30)
        assert took and errors and isinstance(errors[0], Timeout), (took, errors)
        assert "not sent" in errors[0].message, errors[0]
        assert took[0] < 1 + SLACK, f"a 1 s call took {took[0]:.2f} s against a stalled broker"
    finally:
        finalize(app)
        if broker != "rabbitmq":
            server.close()
        if backend != url:
            purge_prefix(backend, registry)
