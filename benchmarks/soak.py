"""Soak: many calls through a proxy while replicas are killed and paused, and the broker restarted.

Usage: ``python benchmarks/soak.py [--calls 10000] [--callers 8] [--replicas 2] [--every 2.0]
[--faults kill,pause,restart,clientkill] [--output FILE]``.

Everything runs on this machine, in processes this script starts and stops by PID: a private Redis as
broker, result backend and registry (restarted during the run, empty each time), a second private Redis
holding the side-effect ledger (each execution of a call appends its call id), ``--replicas`` solo workers
of ``benchmarks/soak_provider.py`` and one consumer app whose proxy ``ledger`` the caller threads share.
Faults are injected in turn every ``--every`` seconds:

- ``kill``: SIGKILL of a replica (a fresh one is started in its place);
- ``pause``: SIGSTOP of a replica for twice the lease timeout, then SIGCONT;
- ``restart``: the broker Redis stopped for about a second, then started again (empty);
- ``clientkill``: ``CLIENT KILL TYPE normal`` on the broker (every client's connection cut).

It prints, and saves to ``benchmarks/results/soak.md``: calls answered, failed typed (by error name), failed
untyped (must be 0), lost (no answer and no error by the deadline + 5 s: must be 0), replies left unread
(pushed for a caller that got another answer: must be 0; for one that had given up, shown apart),
executions per answered call id, and the broker's keys and dataset memory before and after (kombu's binding
tables of the queue, which Celery keeps by design, aside). Nothing here asserts
a time: it is a benchmark.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import itertools
import os
import random
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

from celery_services import App, DistributionSettings, ServiceError, distribute, finalize
from celery_services.testing import RedisServer, WorkerProcess, wait_for

ROOT = Path(__file__).resolve().parents[1]
KEY = "soak"
TIMEOUT = 10.0
LEASE = 1.0


class Replicas:
    """The provider's worker processes; faults pick one at random."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        self.env = env
        self.workers = [self._new() for _ in range(count)]
        self.lock = threading.Lock()

    def _new(self) -> WorkerProcess:
        return WorkerProcess("benchmarks.soak_provider", KEY, env=self.env).start()

    def kill_one(self) -> None:
        with self.lock:
            victim = random.choice(self.workers)
            victim.kill()
            victim.stop()
            self.workers[self.workers.index(victim)] = self._new()

    def pause_one(self, seconds: float) -> None:
        with self.lock:
            victim = random.choice(self.workers)
            os.killpg(victim.pid, signal.SIGSTOP)
            try:
                time.sleep(seconds)  # the pause is the fault itself
            finally:
                os.killpg(victim.pid, signal.SIGCONT)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between two faults")
    parser.add_argument("--faults", default="kill,pause,restart,clientkill")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "soak.md")
    args = parser.parse_args()
    faults = [f for f in args.faults.split(",") if f]

    with RedisServer() as broker_server, RedisServer() as ledger_server:
        broker = redis.Redis.from_url(broker_server.url)
        ledger = redis.Redis.from_url(ledger_server.url)
        before = (broker.dbsize(), int(broker.info("memory")["used_memory_dataset"]))
        prefix = f"soak-{uuid.uuid4().hex[:6]}"
        env = {
            "CELERY_SERVICES_KEY": KEY,
            "CELERY_SERVICES_BROKER_URL": broker_server.url,
            "CELERY_SERVICES_REGISTRY_PREFIX": prefix,
            "CELERY_SERVICES_HEARTBEAT_INTERVAL": "0.5",
            "CELERY_SERVICES_TIMEOUT": str(TIMEOUT),
            "CELERY_SERVICES_LEASE_TIMEOUT": str(LEASE),
            "CELERY_SERVICES_SERVICES": '["*"]',
            "SOAK_LEDGER": ledger_server.url,
            "PYTHONPATH": str(ROOT),
        }
        replicas = Replicas(args.replicas, env)
        app = App()
        distribution = distribute(
            app,
            DistributionSettings(
                key="soak-caller",
                broker_url=broker_server.url,
                registry_prefix=prefix,
                heartbeat_interval=0.5,
                services=[],
                remote_services=[KEY],
                timeout=TIMEOUT,
            ),
        )
        proxy = distribution.wait_for("ledger", timeout=10)
        outcomes: list[tuple[str, str | None, float]] = []  # (outcome, call id, seconds)
        lock = threading.Lock()
        done = threading.Event()
        injected: collections.Counter[str] = collections.Counter()

        def one(i: int) -> None:
            roll = i % 50
            started = time.monotonic()
            call_id: str | None = None
            try:
                if roll == 0:
                    result = proxy.create({"sleep": 0.3})  # long enough to be in flight at a fault
                elif roll % 4 == 1:
                    result = proxy.patch(i, {"sleep": 0.01})
                elif roll % 4 == 2:
                    result = proxy.find()[0]
                else:
                    result = proxy.get(i)
                outcome, call_id = "answered", result["call_id"]
            except ServiceError as exc:
                outcome = f"failed typed: {exc.name}"
            except Exception as exc:
                outcome = f"failed untyped: {type(exc).__name__}"
            elapsed = time.monotonic() - started
            if elapsed > TIMEOUT + 5:
                outcome = "lost"
            with lock:
                outcomes.append((outcome, call_id, elapsed))

        def inject() -> None:
            for fault in itertools.cycle(faults):
                if done.wait(args.every):
                    return
                try:
                    if fault == "kill":
                        replicas.kill_one()
                    elif fault == "pause":
                        replicas.pause_one(2 * LEASE)
                    elif fault == "restart":
                        broker_server.restart(down_for=1.0)
                    elif fault == "clientkill":
                        broker.client_kill_filter(_type="normal", skipme=True)
                    injected[fault] += 1
                except Exception as exc:
                    print(f"fault {fault} failed: {exc!r}", file=sys.stderr)

        injector = threading.Thread(target=inject, daemon=True)
        started = time.monotonic()
        injector.start()
        with ThreadPoolExecutor(args.callers) as pool:
            list(pool.map(one, range(args.calls)))
        elapsed = time.monotonic() - started
        done.set()
        injector.join(timeout=30)

        executions = collections.Counter(
            raw.decode().rsplit(":", 1)[0] for raw in ledger.lrange("soak:ledger", 0, -1)
        )
        answered_ids = {call_id for outcome, call_id, _ in outcomes if outcome == "answered"}
        per_answered = collections.Counter(executions[call_id] for call_id in answered_ids)
        leftover = [k.decode() for k in broker.scan_iter(f"{prefix}:reply:*") if not k.endswith(b":sent")]
        unread_answered = sum(1 for k in leftover if k.rsplit(":", 1)[1] in answered_ids)

        finalize(app)
        replicas.stop()
        # Reply markers and lists expire a second after their call's deadline: wait for them, no longer.
        with_ttl = [k for k in broker.scan_iter("*") if broker.ttl(k) > 0]
        if with_ttl:
            wait_for(lambda: not any(broker.exists(k) for k in with_ttl), timeout=TIMEOUT + 5, what="expiry")
        # Kombu's binding tables of the key's queue are Celery's own (any worker's queue declaration).
        left = sorted(k.decode() for k in broker.scan_iter("*") if not k.startswith(b"_kombu.binding"))
        after = (broker.dbsize(), int(broker.info("memory")["used_memory_dataset"]))

    counts = collections.Counter(outcome for outcome, _, _ in outcomes)
    rows = [
        ("calls", str(len(outcomes))),
        ("seconds", f"{elapsed:.1f}"),
        ("faults injected", ", ".join(f"{k} {v}" for k, v in sorted(injected.items())) or "none"),
        ("answered", str(counts["answered"])),
        *[(name, str(n)) for name, n in sorted(counts.items()) if name.startswith("failed typed")],
        (
            "failed untyped (must be 0)",
            str(sum(n for k, n in counts.items() if k.startswith("failed untyped"))),
        ),
        ("lost (must be 0)", str(counts["lost"])),
        ("replies left unread for an answered call (must be 0)", str(unread_answered)),
        ("replies left unread for a caller that gave up", str(len(leftover) - unread_answered)),
        *[(f"answered calls executed {n} time(s)", str(per_answered[n])) for n in sorted(per_answered)],
        (
            "executions of calls that failed",
            str(sum(executions.values()) - sum(executions[c] for c in answered_ids)),
        ),
        ("broker keys before / after", f"{before[0]} / {after[0]}"),
        ("broker dataset memory before / after (bytes)", f"{before[1]} / {after[1]}"),
        (
            "keys left (besides kombu's binding tables)",
            ", ".join(left[:10]) + (" ..." if len(left) > 10 else "") or "none",
        ),
    ]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = [
        f"# Soak ({stamp})",
        "",
        f"`python benchmarks/soak.py --calls {args.calls} --callers {args.callers} --replicas "
        f"{args.replicas} --every {args.every} --faults {args.faults}` (timeout {TIMEOUT} s, lease {LEASE} s;"
        " 2 shared cores)",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]
    text = "\n".join(table)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
