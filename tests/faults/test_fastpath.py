"""The fast path (``fastpath.py``) under real conditions: beside Celery's consumer on one queue, a replica
SIGKILLed or frozen in the middle of a call, a message it cannot read, Celery's task signals around its calls.

Real ``celery worker`` processes of ``tests.apps.provider`` on the real Redis and RabbitMQ; the fast path is
the default, and ``CELERY_SERVICES_FAST_PATH=false`` gives a worker served by Celery's own consumer.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import TaskRevokedError
from kombu import Connection

from celery_services import (
    App,
    DistributionSettings,
    MemoryService,
    NotFound,
    Timeout,
    Unavailable,
    distribute,
    finalize,
)
from celery_services.distribution import Distribution, heartbeats
from celery_services.distribution.fastpath import AmqpFastPath, RedisFastPath
from celery_services.testing import WorkerProcess, wait_for

from ..support import (
    BROKERS,
    Provider,
    amqp_provider,
    broker_provider,
    caller_on,
    cleanup,
    fresh_prefix,
    make_caller,
    registered_provider,
    reply_lists,
    two_replicas,
)
from .brokers import Cuttable

PROBE = ["get", "slow", "boom"]
FAST = "fast path serving queue"
FROZEN = "start-up objects frozen"


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    yield from fresh_prefix(redis_url, "fast")


def in_flight(redis_url: str, prefix: str, key: str) -> dict[str, int]:
    """The fast path's in-flight lists of ``key`` (one per serving thread) and their lengths."""
    store = redis.Redis.from_url(redis_url)
    try:
        lists = store.scan_iter(f"{prefix}:fast:{key}:inflight:*")
        return {name.decode(): int(store.llen(name)) for name in lists}
    finally:
        store.close()


@pytest.fixture(params=BROKERS)
def served(
    request: pytest.FixtureRequest, redis_url: str, prefix: str
) -> Iterator[tuple[Provider, Distribution]]:
    """On each broker: a provider of a new key (start its workers) and a caller's distribution, its registry
    in ``prefix``; the caller finalized and the key's queue and runs cleaned up afterwards."""
    prov = broker_provider(request, request.param, redis_url, prefix, "served")
    app, distribution = make_caller(prov, prefix)
    try:
        yield prov, distribution
    finally:
        finalize(app)
        cleanup(prov.broker, redis_url, prov.key, prov.runs_key)


def strike_the_holder(
    prov: Provider, probe: Any, workers: list[WorkerProcess], tag: str, signum: int, seconds: float = 1.5
) -> tuple[Any, WorkerProcess, dict[str, int]]:
    """Start a call of ``seconds`` and send ``signum`` to the process group of the worker running it; the
    call's result, that worker, and the fast path's in-flight lists on Redis then. A worker stopped
    (SIGSTOP) is continued once the result came."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(probe.slow, {"tag": tag, "seconds": seconds}, {"timeout": 20})
        start = wait_for(
            lambda: next((r for r in prov.runs() if r.startswith(f"slow-start-{tag}:")), None),
            timeout=10,
            what="slow call started",
        )
        victim = next(w for w in workers if w.pid == int(start.rsplit(":", 1)[1]))
        holds = in_flight(prov.backend, prov.env["CELERY_SERVICES_REGISTRY_PREFIX"], prov.key)
        os.killpg(victim.pid, signum)
        try:
            return future.result(timeout=20), victim, holds  # served by the other worker meanwhile
        finally:
            if signum == signal.SIGSTOP:
                os.killpg(victim.pid, signal.SIGCONT)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker", BROKERS)
def test_a_plain_worker_and_a_fast_path_worker_serve_one_queue(
    request: pytest.FixtureRequest, redis_url: str, prefix: str, broker: str
) -> None:
    prov = broker_provider(request, broker, redis_url, prefix, "mixed")
    fast = prov.worker()
    plain = WorkerProcess(
        "tests.apps.provider", prov.key, env={**prov.env, "CELERY_SERVICES_FAST_PATH": "false"}
    )
    app, distribution = make_caller(prov, prefix)
    client = Celery(broker=prov.broker, backend=prov.backend, set_as_current=False)
    try:
        fast.start()
        plain.start()
        assert FAST in fast.log() and FAST not in plain.log()
        # The fast-path worker owns its process: its start-up objects stay out of the collector's scans.
        assert FROZEN in fast.log() and FROZEN not in plain.log()
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        served: set[int] = set()

        def both_served() -> bool:
            # Each worker takes the calls it pops first: call until both did, every answer checked.
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda n: (n, probe.get(n, {})), range(16)))
            assert all(answer["id"] == n and answer["params"]["from_remote"] for n, answer in answers)
            served.update(answer["pid"] for _, answer in answers)
            return {fast.pid, plain.pid} <= served

        wait_for(both_served, timeout=30, interval=0, what="calls served by both workers")
        # Typed errors come back the same from either path.
        for _ in range(6):
            with pytest.raises(NotFound):
                probe.boom("notfound", {})
        # A plain Celery client (no reply list: the result backend) is served by both paths too.
        by: set[int] = set()

        def plain_client_served_by_both() -> bool:
            result = client.send_task(f"{prov.key}.probe.get", kwargs={"id": "raw"}, queue=prov.key)
            answer = result.get(timeout=10)
            assert answer["id"] == "raw"
            by.add(answer["pid"])
            return {fast.pid, plain.pid} <= by

        wait_for(plain_client_served_by_both, timeout=30, interval=0, what="send_task served by both")
        if broker == "redis":
            # Every call acknowledged. A plain client's result is stored before the call is acknowledged
            # (a call is acknowledged once answered): the last acknowledgement may land after its .get().
            wait_for(
                lambda: in_flight(redis_url, prefix, prov.key) == {}, timeout=5, what="calls acknowledged"
            )
        # `celery inspect registered` lists the calls of a fast-path worker: its remote control is Celery's.
        registered = client.control.inspect(destination=[fast.name], timeout=5).registered() or {}
        assert f"{prov.key}.probe.get" in registered.get(fast.name, []), registered
    finally:
        fast.stop()
        plain.stop()
        finalize(app)
        client.close()
        cleanup(prov.broker, redis_url, prov.key, prov.runs_key)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker", BROKERS)
def test_a_plain_celery_task_sent_compressed_is_served_by_the_fast_path(
    request: pytest.FixtureRequest, redis_url: str, prefix: str, broker: str
) -> None:
    # ``send_task(..., compression="zlib")`` is a valid Celery task, which Celery's consumer decompresses.
    # On Redis the fast path reads kombu's message itself: it dropped this one as unreadable, and
    # acknowledged it, so that the task never ran.
    prov = broker_provider(request, broker, redis_url, prefix, "zlib")
    worker = prov.worker()
    client = Celery(broker=prov.broker, backend=prov.backend, set_as_current=False)
    try:
        worker.start()
        assert FAST in worker.log()
        result = client.send_task(
            f"{prov.key}.probe.get", kwargs={"id": "zipped"}, queue=prov.key, compression="zlib"
        )
        assert result.get(timeout=10)["id"] == "zipped"
        assert "unreadable" not in worker.log()
    finally:
        worker.stop()
        client.close()
        cleanup(prov.broker, redis_url, prov.key, prov.runs_key)


def signalled(prov: Provider, pid: int | None) -> list[tuple[str, ...]]:
    """The task signals worker ``pid`` sent (``TEST_SIGNALS``): (signal, task, call id, detail, request)."""
    return [
        tuple(run.removeprefix("signal-").rsplit(":", 1)[0].split("|"))
        for run in prov.runs()
        if run.startswith("signal-") and run.endswith(f":{pid}")
    ]


@pytest.mark.timeout(90)
def test_celery_task_signals_run_on_the_fast_path_as_on_celerys_consumer(
    served: tuple[Provider, Distribution],
) -> None:
    # Receivers of task_prerun / task_postrun (Django's fixup closes stale database connections there,
    # instrumentation opens and ends its spans) see every call, whichever path serves it, with the call's
    # request as the task's.
    prov, distribution = served
    probe = distribution.remote_service(prov.key, "probe", PROBE)
    seen: dict[str, list[tuple[str, ...]]] = {}
    for path, env in (("fast", {}), ("consumer", {"CELERY_SERVICES_FAST_PATH": "false"})):
        signalling = {**prov.env, "TEST_SIGNALS": "1", **env}
        with WorkerProcess("tests.apps.provider", prov.key, env=signalling) as worker:
            assert (FAST in worker.log()) is (path == "fast")
            assert probe.get(1, {})["pid"] == worker.pid
            with pytest.raises(NotFound):
                probe.boom("notfound", {})
            wait_for(lambda: len(signalled(prov, worker.pid)) >= 6, timeout=10, what="the signals sent")
            seen[path] = [
                (name, task, detail, pushed) for name, task, _, detail, pushed in signalled(prov, worker.pid)
            ]
    get, boom = f"{prov.key}.probe.get", f"{prov.key}.probe.boom"
    expected = [
        ("prerun", get, "", "request"),
        ("success", get, "dict", "request"),
        ("postrun", get, "SUCCESS", "request"),
        ("prerun", boom, "", "request"),
        ("failure", boom, "NotFound traceback", "request"),
        ("postrun", boom, "FAILURE", "request"),
    ]
    assert seen == {"fast": expected, "consumer": expected}


@pytest.mark.timeout(90)
def test_a_call_of_a_killed_fast_path_replica_is_served_by_another(redis_url: str, prefix: str) -> None:
    prov = registered_provider(redis_url, prefix, "fastkill", CELERY_SERVICES_LEASE_TIMEOUT="1")
    with two_replicas(prov, prefix) as (first, second, distribution):
        assert FAST in first.log() and FAST in second.log()
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        result, victim, held = strike_the_holder(prov, probe, [first, second], "k", signal.SIGKILL)
        assert sorted(held.values()) == [1]  # in the victim's in-flight list, not in kombu's unacked hash
        survivor = second if victim is first else first
        assert result["pid"] == survivor.pid
        assert result["redelivered"] is True
        assert prov.runs().count(f"slow-end-k:{survivor.pid}") == 1
        assert f"slow-end-k:{victim.pid}" not in prov.runs()
        assert "given back to queue" in survivor.log()
        wait_for(
            lambda: sum(in_flight(redis_url, prefix, prov.key).values()) == 0,
            timeout=10,
            what="nothing left in flight",
        )
        assert probe.get(1, {})["pid"] == survivor.pid


@pytest.mark.rabbitmq
@pytest.mark.timeout(90)
def test_on_rabbitmq_a_call_of_a_killed_fast_path_replica_is_served_by_another(
    redis_url: str, rabbitmq_url: str, prefix: str
) -> None:
    # RabbitMQ gives back the unacknowledged call of a connection that died: no lease involved.
    prov = amqp_provider("fastkill", rabbitmq_url, redis_url, prefix)
    with two_replicas(prov, prefix) as (first, second, distribution):
        assert FAST in first.log() and FAST in second.log()
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        result, victim, _ = strike_the_holder(prov, probe, [first, second], "a", signal.SIGKILL)
        survivor = second if victim is first else first
        assert result["pid"] == survivor.pid
        assert result["redelivered"] is True
        assert f"slow-end-a:{victim.pid}" not in prov.runs()
        assert probe.get(1, {})["pid"] == survivor.pid


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker", BROKERS)
def test_a_call_of_a_paused_replica_is_served_by_another_and_answered_once(
    request: pytest.FixtureRequest, redis_url: str, prefix: str, broker: str
) -> None:
    # SIGSTOP for longer than the lease (a host cut off looks the same): the other replica takes the call
    # over. On Redis the paused instance's alive key lapses; on RabbitMQ its connection keeps open, and the
    # broker gives its unacknowledged call back once the connection's heartbeats stop. Resumed, it finishes
    # its run too (at least once) but pushes no second reply.
    prov = broker_provider(request, broker, redis_url, prefix, "pause", CELERY_SERVICES_LEASE_TIMEOUT="1")
    with two_replicas(prov, prefix) as (first, second, distribution):
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        result, paused, _ = strike_the_holder(prov, probe, [first, second], "p", signal.SIGSTOP)
        survivor = second if paused is first else first
        assert result["pid"] == survivor.pid
        assert result["redelivered"] is True
        assert result["call_id"]
        wait_for(lambda: "already answered" in paused.log(), timeout=15, what="resumed run, no second reply")
        assert prov.runs().count(f"slow-end-p:{paused.pid}") == 1
        assert prov.runs().count(f"slow-start-p:{survivor.pid}") == 1
        assert reply_lists(redis_url, prefix) == []
        # The resumed replica takes calls again (on RabbitMQ, on a new connection).
        wait_for(
            lambda: {probe.get(1, {})["pid"] for _ in range(6)} == {first.pid, second.pid},
            timeout=20,
            what="both replicas serve again",
        )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker", BROKERS)
def test_a_replica_stopped_warm_keeps_the_call_it_runs_past_the_lease(
    request: pytest.FixtureRequest, redis_url: str, prefix: str, broker: str
) -> None:
    # A warm stop (SIGTERM) lets the running calls finish, so the replica keeps its lease until they have:
    # its alive key on Redis, its connection's heartbeats on RabbitMQ. Had its keeper stopped with the
    # signal, the other replica would have taken over a call still running, and run it a second time.
    prov = broker_provider(request, broker, redis_url, prefix, "warm", CELERY_SERVICES_LEASE_TIMEOUT="1")
    with two_replicas(prov, prefix) as (first, second, distribution):
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        result, stopped, _ = strike_the_holder(prov, probe, [first, second], "w", signal.SIGTERM, seconds=5)
        assert result["pid"] == stopped.pid
        assert result["redelivered"] is False
        assert stopped.process is not None
        wait_for(lambda: stopped.process.poll() is not None, timeout=20, what="the warm stop done")
        assert [r for r in prov.runs() if r.startswith("slow-start-w:")] == [f"slow-start-w:{stopped.pid}"]


def blocked_takes(redis_url: str, relay: Cuttable) -> int:
    """How many ``BLMOVE`` wait on Redis on connections that came through ``relay``."""
    store = redis.Redis.from_url(redis_url)
    try:
        relayed = relay.upstream_ports
        return sum(
            1
            for client in store.client_list()
            if client["cmd"] == "blmove"
            and "b" in client["flags"]
            and int(client["addr"].rsplit(":", 1)[1]) in relayed
        )
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_a_call_in_flight_is_in_a_list_that_expires_from_its_take(redis_url: str, prefix: str) -> None:
    # A thread's in-flight list is made by its take (BLMOVE) and given its lifetime by the keeper's next
    # renewal, a third of a lease later: a worker killed in between, with no other instance of its key to
    # give its call back, left the list, and the call in it, for good (found by a review).
    prov = registered_provider(redis_url, prefix, "ttl", CELERY_SERVICES_LEASE_TIMEOUT="30")
    app, distribution = caller_on(redis_url, redis_url, prefix)
    store = redis.Redis.from_url(redis_url)
    try:
        with prov.worker():
            probe = distribution.remote_service(prov.key, "probe", PROBE)
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(probe.slow, {"tag": "ttl", "seconds": 1.5}, {})
                listed = wait_for(
                    lambda: [name for name, size in in_flight(redis_url, prefix, prov.key).items() if size],
                    timeout=10,
                    what="the call in flight",
                )
                assert store.ttl(listed[0]) > 0, "the in-flight list lives until a renewal 10 s on"
                assert pending.result(timeout=10)["tag"] == "ttl"
    finally:
        store.close()
        finalize(app)
        cleanup(redis_url, redis_url, prov.key, prov.runs_key)


@pytest.mark.timeout(90)
def test_a_call_taken_by_a_blmove_whose_answer_was_lost_is_served(redis_url: str, prefix: str) -> None:
    # Redis ran a serving thread's BLMOVE, moving a call into the thread's in-flight list, but the answer
    # never reached the thread (its connection cut on the way: a network drop, a failover; or a read that
    # timed out). The thread takes again on a new connection: the call in its list must be given back and
    # served, not left there for the next call's acknowledgement (a DEL of the list) to delete unserved.
    relay, through = Cuttable.to(redis_url)
    prov = registered_provider(redis_url, prefix, "lost-take")
    prov.env["CELERY_SERVICES_BROKER_URL"] = through  # its calls taken through the relay
    worker = prov.worker()
    app, distribution = caller_on(redis_url, redis_url, prefix)
    try:
        worker.start()
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        assert probe.get(1, {})["id"] == 1
        wait_for(lambda: blocked_takes(redis_url, relay) > 0, timeout=10, what="a take waiting on Redis")
        relay.cut()  # the waiting BLMOVE's answer is lost: the next call goes to its thread's list
        assert probe.get(2, {"timeout": 20})["id"] == 2
        assert len([r for r in prov.runs() if r.startswith("get-2:")]) == 1
        assert probe.get(3, {})["id"] == 3
        wait_for(
            lambda: sum(in_flight(redis_url, prefix, prov.key).values()) == 0,
            timeout=10,
            what="nothing left in flight",
        )
    finally:
        relay.close()
        worker.stop()  # its broker gone: the stop ends 5 s after its last call (STOP_GRACE, worker.py)
        finalize(app)
        cleanup(redis_url, redis_url, prov.key, prov.runs_key)


@pytest.mark.rabbitmq
@pytest.mark.timeout(90)
def test_on_rabbitmq_a_fast_path_cut_off_from_its_broker_connects_again(
    redis_url: str, rabbitmq_url: str, prefix: str
) -> None:
    # A broker cut off silently (no FIN, no RST: a host gone, a middlebox that lost its state) answers
    # nothing, and the serving thread waiting on it must not wait for ever: it sees the broker's heartbeats
    # stop, drops the connection without a word to it, and connects again (the caller is not cut off).
    relay, through = Cuttable.to(rabbitmq_url)
    prov = amqp_provider("fastcut", through, redis_url, prefix, CELERY_SERVICES_LEASE_TIMEOUT="1")
    app, distribution = make_caller(prov, prefix, broker_url=rabbitmq_url)
    worker = prov.worker()
    try:
        worker.start()
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        assert probe.get(1, {})["id"] == 1
        relay.cut()
        cut = time.monotonic()
        assert probe.get(2, {"timeout": 20})["id"] == 2
        # Its heartbeat is 1 s: seen within 2.2 s, and dropped at once (a close would wait REPLY_WAIT).
        assert time.monotonic() - cut < 6
        assert "cannot reach its queue" in worker.log()
    finally:
        finalize(app)
        # Closed first: Celery's own consumer, cut off too, would wait on its connection's close.
        relay.close()
        worker.stop()
        cleanup(rabbitmq_url, redis_url, prov.key, prov.runs_key)


@pytest.mark.timeout(60)
def test_the_keeper_outlives_a_connection_closed_under_it(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Sentinel pool closes the connections of the master it left while they are read (redis_clients.py):
    # the reading thread gets a ValueError ("I/O operation on closed file"), which the serving threads
    # survive. The keeper thread did not: it ended there, and the instance's lease lapsed while it went on
    # serving, so that the other replicas gave back and ran again every call it held. The renewal fails so
    # here once, in a fast path running in this process.
    key = f"keeper-{os.urandom(3).hex()}"
    provider = App()
    provider.use("articles", MemoryService())
    settings = DistributionSettings(
        key=key,
        broker_url=redis_url,
        result_backend=redis_url,
        registry_prefix=prefix,
        remote_services=[],
        lease_timeout=1,
    )
    fast = RedisFastPath(distribute(provider, settings), 1, f"{key}@test")
    renew, renewals = fast._renew, [0]

    def renew_broken_once() -> None:
        renewals[0] += 1
        if renewals[0] == 2:  # the keeper's first (the start renews first)
            raise ValueError("I/O operation on closed file.")
        renew()

    monkeypatch.setattr(fast, "_renew", renew_broken_once)
    try:
        fast.start()
        wait_for(lambda: renewals[0] >= 5, timeout=10, what="the lease renewed after the broken renewal")
        assert redis.Redis.from_url(redis_url).exists(fast.alive)
    finally:
        fast.stop(timeout=5)
        finalize(provider)
        cleanup(redis_url, redis_url, key)


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
def test_on_rabbitmq_a_serving_thread_waits_on_its_broker_no_longer_than_reply_wait(
    redis_url: str, rabbitmq_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pause cancels the serving thread's consumer and closes its connection, and py-amqp waits for the
    # broker's CancelOk and CloseOk with no timeout: a broker cut off silently just then held the thread for
    # ever, and the worker served nothing again, resumed or not. Every wait of a serving connection on its
    # broker is bounded (REPLY_WAIT, 1 s here): the thread then connects again. The fast path runs in this
    # process, its connections through a relay that cuts; the caller's do not go through it.
    monkeypatch.setattr(heartbeats, "REPLY_WAIT", 1.0)
    relay, through = Cuttable.to(rabbitmq_url)
    key = f"fastwait-amqp-{os.urandom(3).hex()}"
    provider = App()
    provider.use("articles", MemoryService())
    # A lease of 30 s: heartbeats every 10 s, which see the cut long after the test.
    settings = DistributionSettings(
        key=key,
        broker_url=through,
        result_backend=redis_url,
        registry_prefix=prefix,
        remote_services=[],
        lease_timeout=30,
    )
    fast = AmqpFastPath(distribute(provider, settings), 1, f"{key}@test", None)
    caller, distribution = caller_on(rabbitmq_url, redis_url, prefix)
    articles = distribution.remote_service(key, "articles", ["find"])
    try:
        fast.start()
        assert articles.find({}) == []  # served (a find publishes no event, so opens nothing more)
        # Back at its wait for the next call: paused then, it leaves (a thread still finishing a call would
        # see no pause if the resume came first).
        wait_for(lambda: fast._waiting == [True], timeout=5, what="the serving thread waiting for a call")
        made = relay.connections
        relay.cut()
        fast.pause()
        fast.resume()
        # RabbitMQ still gives calls to the cut connection's consumer until its own heartbeats drop it: what
        # shows the thread free again is its new connection.
        wait_for(lambda: relay.connections > made, timeout=10, what="the serving thread connected again")
    finally:
        relay.close()
        fast.stop(timeout=5)
        finalize(caller)
        finalize(provider)
        cleanup(rabbitmq_url, redis_url, key)


@pytest.mark.rabbitmq
@pytest.mark.timeout(90)
def test_on_rabbitmq_a_call_longer_than_the_lease_stays_with_its_live_replica(
    redis_url: str, rabbitmq_url: str, prefix: str
) -> None:
    # The serving thread sends no heartbeat while it runs a call: the connection's heartbeats must go on
    # without it, or RabbitMQ would give a long call to the other replica while it still runs; and an idle
    # serving thread beats between its waits, or RabbitMQ would close its connection.
    prov = amqp_provider("fastlong", rabbitmq_url, redis_url, prefix, CELERY_SERVICES_LEASE_TIMEOUT="1")
    with two_replicas(prov, prefix) as (first, second, distribution):
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        result = probe.slow({"tag": "l", "seconds": 5}, {"timeout": 20})
        assert result["redelivered"] is False
        assert [r for r in prov.runs() if r.startswith("slow-start-l:")] == [f"slow-start-l:{result['pid']}"]
        assert probe.get(1, {})["id"] == 1
        # Nor did the other replica, idle meanwhile, lose its connection: its serving loop beats too.
        assert "cannot reach its queue" not in first.log() + second.log()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker", BROKERS)
def test_a_slow_call_holds_one_slot_and_the_others_go_on(
    request: pytest.FixtureRequest, redis_url: str, prefix: str, broker: str
) -> None:
    # -c 3: three serving threads; two slow calls hold two, quick calls go through the third meanwhile.
    prov = broker_provider(request, broker, redis_url, prefix, "slots")
    app, distribution = make_caller(prov, prefix)
    try:
        with prov.worker(pool="threads", concurrency=3) as worker:
            assert "fast path serving queue" in worker.log() and "with 3 thread(s)" in worker.log()
            probe = distribution.remote_service(prov.key, "probe", PROBE)
            with ThreadPoolExecutor(2) as pool:
                slow = [pool.submit(probe.slow, {"tag": f"s{n}", "seconds": 3}, {}) for n in range(2)]
                wait_for(
                    lambda: sum(r.startswith("slow-start-s") for r in prov.runs()) == 2,
                    timeout=10,
                    what="both slow calls running",
                )
                for n in range(5):
                    assert probe.get(n, {"timeout": 1})["id"] == n  # not queued behind the slow ones
                assert not any(r.startswith("slow-end-s") for r in prov.runs())
                assert [future.result(timeout=10)["tag"] for future in slow] == ["s0", "s1"]
    finally:
        finalize(app)
        cleanup(prov.broker, redis_url, prov.key, prov.runs_key)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker", BROKERS)
def test_an_unreadable_message_is_dropped_and_the_next_call_served(
    request: pytest.FixtureRequest, redis_url: str, prefix: str, broker: str
) -> None:
    prov = broker_provider(request, broker, redis_url, prefix, "garbage")
    app, distribution = make_caller(prov, prefix)
    try:
        with prov.worker() as worker:
            if broker == "redis":
                with redis.Redis.from_url(redis_url) as store:
                    store.lpush(prov.key, b"not a task message")
            else:
                # A JSON body that is no task's [args, kwargs, embed], under a task's headers.
                with Connection(prov.broker) as connection:  # type: ignore[no-untyped-call]
                    connection.Producer().publish(
                        b'{"not": "a task"}',
                        routing_key=prov.key,
                        content_type="application/json",
                        content_encoding="utf-8",
                        headers={"task": f"{prov.key}.probe.get", "id": "garbage-1"},
                    )
            wait_for(lambda: "dropped an unreadable message" in worker.log(), timeout=10, what="drop logged")
            assert distribution.remote_service(prov.key, "probe", PROBE).get(7, {})["id"] == 7
            assert os.kill(worker.pid, 0) is None  # still serving
    finally:
        finalize(app)
        cleanup(prov.broker, redis_url, prov.key, prov.runs_key)


@pytest.mark.rabbitmq
@pytest.mark.timeout(90)
def test_on_rabbitmq_a_backlog_of_calls_publishes_their_events_in_the_order_they_ran(
    redis_url: str, rabbitmq_url: str, prefix: str
) -> None:
    # Sending the held Flower events from within a call's answer let py-amqp's publish (its check for a
    # blocked connection reads what arrived) serve the next call there, before the first call's service
    # events were published: listeners heard "created" out of order (found by test_events, now and then).
    prov = amqp_provider("fastorder", rabbitmq_url, redis_url, prefix)
    app, distribution = make_caller(prov, prefix)
    heard: list[int] = []
    try:
        with prov.worker() as worker:
            assert FAST in worker.log()
            app.use("articles", distribution.remote_service(prov.key, "articles", ["create"], ["created"]))
            articles = app.service("articles")
            articles.on("created", lambda data, context: heard.append(data["id"]))
            # A backlog: each acknowledgement lets RabbitMQ deliver the next call at once.
            with ThreadPoolExecutor(8) as pool:
                created = list(pool.map(lambda i: articles.create({"title": f"b{i}"})["id"], range(200)))
            wait_for(lambda: len(heard) >= len(created), timeout=20, what="every created event")
            assert sorted(heard) == sorted(created)  # each once
            assert heard == sorted(heard), "events heard out of the order their calls ran"
    finally:
        finalize(app)
        cleanup(rabbitmq_url, redis_url, prov.key, prov.runs_key)


@pytest.mark.timeout(90)
def test_celery_remote_control_of_the_key_queue_reaches_the_fast_path(
    served: tuple[Provider, Distribution],
) -> None:
    # An operator drains a worker before a deploy with `celery control cancel_consumer {key}` and checks it
    # with `celery inspect active_queues`. The fast path had taken the queue from Celery's consumer: the
    # worker answered "no longer consuming" yet went on serving, and never listed the queue it served.
    prov, distribution = served
    control = distribution.celery.control
    with prov.worker() as worker:
        assert FAST in worker.log()
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        assert probe.get(1, {})["id"] == 1

        def listed() -> bool:
            answers = control.inspect(destination=[worker.name], timeout=2).active_queues() or {}
            return prov.key in {queue["name"] for queue in answers.get(worker.name, [])}

        assert listed()
        answers = control.cancel_consumer(prov.key, destination=[worker.name], reply=True, timeout=2)
        assert answers and "no longer consuming" in str(answers)
        assert not listed()
        with pytest.raises(Timeout):
            probe.get(2, {"timeout": 1.5})  # left in the queue: this worker takes no call
        control.add_consumer(prov.key, destination=[worker.name], reply=True, timeout=2)
        assert listed()
        assert probe.get(3, {"timeout": 5})["id"] == 3


@pytest.mark.timeout(90)
def test_celery_inspect_active_lists_the_calls_the_fast_path_runs(
    served: tuple[Provider, Distribution],
) -> None:
    # `celery inspect active` (Flower's worker page) lists what a worker is running, before an operator
    # stops it: the fast path's calls never showed there, however long they ran.
    prov, distribution = served
    inspect = distribution.celery.control.inspect
    with prov.worker() as worker, ThreadPoolExecutor(1) as pool:
        assert FAST in worker.log()
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        slow = pool.submit(probe.slow, {"tag": "seen", "seconds": 3}, {"authentication": "secret"})
        wait_for(lambda: any(r.startswith("slow-start-seen:") for r in prov.runs()), 10, what="running")
        running = (inspect(destination=[worker.name], timeout=2).active() or {}).get(worker.name, [])
        assert [call["name"] for call in running] == [f"{prov.key}.probe.slow"]
        call = running[0]
        assert call["hostname"] == worker.name and call["worker_pid"] == worker.pid
        assert "seen" in str(call["kwargs"]) and "secret" not in str(call)  # masked, as in Flower
        assert slow.result(timeout=10)["tag"] == "seen"
        # Its reply comes before the call ends (its service events go out after it): listed until then.
        wait_for(
            lambda: (inspect(destination=[worker.name], timeout=2).active() or {}).get(worker.name) == [],
            timeout=10,
            what="no call listed once it ended",
        )


@pytest.mark.timeout(90)
def test_a_call_revoked_while_queued_is_not_run_by_the_fast_path(
    served: tuple[Provider, Distribution],
) -> None:
    # `celery control revoke <id>` (Flower's "Revoke") stops a task that has not started: Celery's consumer
    # discards it and marks it REVOKED. The fast path ran it anyway.
    prov, distribution = served
    celery = distribution.celery
    with prov.worker() as worker, ThreadPoolExecutor(1) as pool:  # -P solo: one call at a time
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        holding = pool.submit(probe.slow, {"tag": "hold", "seconds": 2}, {})
        wait_for(lambda: any(r.startswith("slow-start-hold:") for r in prov.runs()), 10, what="held")
        name = f"{prov.key}.probe.get"
        revoked = celery.send_task(name, kwargs={"id": "revoked"}, queue=prov.key)
        celery.control.revoke(revoked.id, destination=[worker.name], reply=True, timeout=2)
        kept = celery.send_task(name, kwargs={"id": "kept"}, queue=prov.key)
        assert holding.result(timeout=10)["tag"] == "hold"
        assert kept.get(timeout=10)["id"] == "kept"  # served after the revoked one
        with pytest.raises(TaskRevokedError):
            revoked.get(timeout=10)
        assert "get-revoked" not in {entry.rsplit(":", 1)[0] for entry in prov.runs()}
        revoked.forget()
        kept.forget()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "celery-consumer"])
def test_a_proxy_call_revoked_before_it_ran_fails_at_once(
    served: tuple[Provider, Distribution], fast: bool
) -> None:
    # A proxy call revoked with `celery control revoke <id>` (Flower's "Revoke") was rightly not run, on
    # either path, but nothing told its caller: it waited out its whole timeout, then got a Timeout.
    prov, distribution = served
    env = prov.env if fast else {**prov.env, "CELERY_SERVICES_FAST_PATH": "false"}
    with WorkerProcess("tests.apps.provider", prov.key, env=env) as worker:
        assert (FAST in worker.log()) is fast
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        assert probe.get(1, {})["id"] == 1
        transport = distribution.transport
        call = transport.prepare(prov.key, "probe", "get", id="revoked", timeout=20)
        distribution.celery.control.revoke(call.call_id, destination=[worker.name], reply=True, timeout=2)
        started = time.monotonic()
        with pytest.raises(Unavailable, match="revoked") as refused:
            transport.send(call)
        assert time.monotonic() - started < 10  # told, not timed out
        assert refused.value.data["call_id"] == call.call_id
        assert "get-revoked" not in {entry.rsplit(":", 1)[0] for entry in prov.runs()}
        assert probe.get(2, {})["id"] == 2  # the worker serves on


@pytest.mark.timeout(90)
def test_a_proxy_call_stopped_by_revoke_terminate_fails_at_once(
    served: tuple[Provider, Distribution],
) -> None:
    # `celery control revoke --terminate <id>` stops a running call in a prefork worker (no fast path
    # there): its caller is told it was stopped, rather than waiting out its timeout.
    prov, distribution = served
    with WorkerProcess("tests.apps.provider", prov.key, env=prov.env, pool="prefork") as worker:
        assert FAST not in worker.log()
        probe = distribution.remote_service(prov.key, "probe", PROBE)
        transport = distribution.transport
        call = transport.prepare(
            prov.key, "probe", "slow", data={"tag": "stopped", "seconds": 30}, timeout=40
        )
        with ThreadPoolExecutor(1) as pool:
            sent = pool.submit(transport.send, call)
            wait_for(
                lambda: any(r.startswith("slow-start-stopped:") for r in prov.runs()), 20, what="running"
            )
            started = time.monotonic()
            control = distribution.celery.control
            control.revoke(call.call_id, destination=[worker.name], terminate=True, reply=True, timeout=2)
            with pytest.raises(Unavailable, match="stopped while it ran"):
                sent.result(timeout=20)
            assert time.monotonic() - started < 10  # told, not timed out
        assert not any(r.startswith("slow-end-stopped") for r in prov.runs())
        assert probe.get(2, {})["id"] == 2  # the worker serves on (a new child)
