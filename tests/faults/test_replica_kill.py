"""Replicas killed under load: nothing lost, nothing untyped.

Two replicas of ``tests.apps.provider`` serve a key on a Redis of the test's own; four threads make 150
calls (``probe.slow`` of 0.05-0.2 s, one in five a ``probe.get``) through the proxy discovery mounted. Each
time 15 more calls have ended, the oldest replica is SIGKILLed while it runs a call, and a fresh one started
in its place (paced by the calls' progress, not the clock: a loaded machine changes when the kills come,
never whether they come nor that they hit a call). Guards:

- every call is answered or fails typed (``Unavailable`` / ``Timeout``), and ends by its deadline (none
  hangs, none is lost);
- the calls a killed replica was running are delivered again to a live one and succeed (late acks,
  ``reject_on_worker_lost`` and the lease on calls in flight: a dead replica's calls come back in time);
- all but a few calls succeed.
"""

from __future__ import annotations

import functools
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import pytest

from celery_services.testing import WorkerProcess, wait_for

from ..support import Provider, provider_env
from .brokers import HEARTBEAT, Consumer, Outcome, RedisServer, overran, summary, untyped

CALLS = 150
THREADS = 4
CALL_TIMEOUT = 8.0
SLACK = 2.0
KILL_EVERY = 15  # calls ended
MAX_KILLS = 8


@pytest.mark.timeout(150)
def test_replica_killed_every_two_seconds(private_redis: RedisServer) -> None:
    url, prefix = private_redis.url, f"cs-fault-{os.urandom(4).hex()}"
    key, token = f"rkill-{os.urandom(3).hex()}", os.urandom(3).hex()
    runs = f"test-runs:{key}"
    env = provider_env(
        key,
        url,
        url,
        runs,
        CELERY_SERVICES_REGISTRY_PREFIX=prefix,
        CELERY_SERVICES_HEARTBEAT_INTERVAL=str(HEARTBEAT),
    )
    prov = Provider(key, url, url, runs, env)
    replicas: list[WorkerProcess] = []
    everyone: list[WorkerProcess] = []
    consumer: Consumer | None = None
    try:
        for _ in range(2):
            everyone.append(prov.worker().start())
            replicas.append(everyone[-1])
        consumer = Consumer(url, url, prefix, key, timeout=CALL_TIMEOUT)
        probe = consumer.distribution.wait_for("probe", timeout=10)
        assert probe.get("warm-up")["id"] == "warm-up"

        rng = random.Random(7)
        plan = [(i, None if i % 5 == 0 else round(rng.uniform(0.05, 0.2), 3)) for i in range(CALLS)]

        def call(i: int, seconds: float | None) -> Outcome:
            started = time.monotonic()
            try:
                if seconds is None:
                    result: Any = probe.get(i, {"timeout": CALL_TIMEOUT})
                else:
                    result = probe.slow(
                        {"tag": f"{token}-{i}", "seconds": seconds}, {"timeout": CALL_TIMEOUT}
                    )
                error = None
            except BaseException as exc:  # judged below: only typed errors are allowed
                result, error = None, exc
            return Outcome(f"call {i}", started, time.monotonic(), CALL_TIMEOUT, result, error)

        def running_a_call(worker: WorkerProcess) -> bool:
            """Whether a slow call of this test started on ``worker`` and has not ended there."""
            records = prov.runs()
            started = {
                r for r in records if r.startswith(f"slow-start-{token}-") and r.endswith(f":{worker.pid}")
            }
            return any(r.replace("slow-start-", "slow-end-", 1) not in records for r in started)

        killed: list[int] = []
        with ThreadPoolExecutor(THREADS, thread_name_prefix="fault-calls") as pool:
            futures = [pool.submit(call, i, seconds) for i, seconds in plan]

            def ended() -> int:
                return sum(future.done() for future in futures)

            def due(victim: WorkerProcess, milestone: int) -> bool:
                return ended() == CALLS or (ended() >= milestone and running_a_call(victim))

            while len(killed) < MAX_KILLS:
                victim = replicas[0]  # the oldest: it has been serving for a while
                milestone = (len(killed) + 1) * KILL_EVERY
                wait_for(
                    functools.partial(due, victim, milestone),
                    timeout=60,
                    interval=0.02,
                    what=f"{milestone} calls ended and a call running on the replica to kill",
                )
                if ended() == CALLS:
                    break
                replicas.pop(0)
                victim.kill()
                killed.append(victim.pid)
                everyone.append(prov.worker().start())  # so that two replicas are up again
                replicas.append(everyone[-1])
            pending = wait(futures, timeout=CALLS * CALL_TIMEOUT / THREADS).not_done
            assert not pending, f"{len(pending)} calls never ended"
        outcomes = [future.result() for future in futures]

        assert len(killed) >= 2, f"only {len(killed)} replica(s) killed while the calls ran"
        assert not untyped(outcomes), untyped(outcomes)
        # Each call's own duration (from when its thread sent it): never past its deadline.
        assert not overran(outcomes, SLACK), overran(outcomes, SLACK)

        # The calls a killed replica was running: started there, never finished there.
        records = prov.runs()
        in_flight: dict[int, int] = {}  # call index → the killed replica's pid
        for run in records:
            what, _, pid = run.rpartition(":")
            ended = f"{what.replace('slow-start-', 'slow-end-')}:{pid}" in records
            if what.startswith(f"slow-start-{token}-") and int(pid) in killed and not ended:
                in_flight[int(what.rsplit("-", 1)[1])] = int(pid)
        assert in_flight, "no call was in flight on a killed replica: the kills tested nothing"
        lost = [
            f"{outcomes[i]} (was on {pid})"
            for i, pid in sorted(in_flight.items())
            if not outcomes[i].ok or outcomes[i].result["pid"] == pid
        ]
        assert not lost, f"calls in flight on a killed replica not served again: {lost}"
        failed = [o for o in outcomes if not o.ok]
        for outcome in failed:  # what the replicas recorded of it: where it ran, if anywhere
            index = int(outcome.label.split()[-1])
            mine = [r for r in records if r.split(":")[0] in (f"get-{index}", f"slow-start-{token}-{index}")]
            print(f"\n[replica kill] failed: {outcome}; runs: {mine}; killed: {killed}")
        # Most calls succeed: a kill may still cost the odd call its deadline (seen once in nine runs: one
        # Timeout), which must then be typed, as asserted above.
        assert len(failed) <= 2, f"{summary(outcomes)}: {[str(o) for o in failed]}"
        redelivered = [
            o for o in outcomes if o.ok and isinstance(o.result, dict) and o.result.get("redelivered")
        ]
        slowest = max(o.took for o in outcomes)
        print(
            f"\n[replica kill] {summary(outcomes)}; {len(killed)} replicas killed; {len(in_flight)} calls "
            f"in flight on them, served again; {len(redelivered)} marked redelivered; "
            f"slowest call {slowest:.2f}s; in flight: "
            + ", ".join(f"{outcomes[i].took:.2f}s {outcomes[i].result.get('redelivered')}" for i in in_flight)
        )
    finally:
        if consumer is not None:
            consumer.close()
        for worker in everyone:
            worker.stop()
