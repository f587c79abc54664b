"""What RabbitMQ's floor costs once its message is shaped as a call's, against the fast path's call.

Usage: ``python benchmarks/rabbitmq_floor.py [--calls N] [--rounds N] [--output FILE]``.

``calls.py`` reads the fast path on RabbitMQ against a floor that sends the least a message can be: a
transient body on a queue that is not durable, no headers. A call is a Celery task: persistent on a durable
queue, with Celery's protocol v2 headers and the call's own, a correlation id and an expiration (the call's
deadline). This run splits what that shape costs the broker from what the library's Python costs, in one
run, interleaved, one call in flight:

- (f) the floor of ``calls.py`` (``floor_worker.py``: py-amqp publish → consume → ``LPUSH`` reply →
  ``BRPOP``);
- (f1) the same, persistent, on a durable queue;
- (f2) the same, with the headers and properties of a call (``messages.call_message`` and the call's own
  headers, as the caller writes them): the floor of a message shaped as a call (its body stays the floor's,
  a hundred bytes shorter than a call's, and it goes through the default exchange);
- (d) ``articles.get(id)`` through a proxy, served by the fast path of ``celery -A workers.articles worker``.

CPU per call is read from ``/proc`` for the RabbitMQ server (``beam.smp`` on this machine: none, no column),
the path's worker and this process (the caller). Needs RabbitMQ (``--rabbitmq``) and Redis
(``--backend``, db 9 on 127.0.0.1:6379); writes ``benchmarks/results/rabbitmq_floor.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from calls import (
    BENCH_DIR,
    CALL_TIMEOUT,
    DEFAULT_RABBITMQ,
    DEFAULT_REDIS,
    SETTLE,
    WARMUP,
    Bench,
    answers,
    cpu_model,
    make_items,
    markdown_table,
    percentile,
    process_cpu,
    quiet,
    rich_table,
)
from kombu.connection import Connection
from rich.console import Console

from celery_services import App, DistributionSettings, distribute, finalize
from celery_services.distribution.messages import call_message
from celery_services.distribution.protocol import HEADER_CALLER, HEADER_DEADLINE, HEADER_REPLY, mask_url
from celery_services.testing import WorkerProcess, purge_queues

RESULTS = BENCH_DIR / "results" / "rabbitmq_floor.md"
HEAD = [
    "path",
    "p50 ms",
    "p99 ms",
    "p50 / (f)",
    "CPU ms/call: RabbitMQ",
    "CPU: worker",
    "CPU: caller",
]
PATHS = {
    "f": "(f) floor: transient, queue not durable, no headers",
    "f1": "(f1) floor, persistent on a durable queue",
    "f2": "(f2) floor, persistent, a call's headers and properties",
    "d": "(d) proxy, fast path",
}


@dataclass
class Measured:
    """One path: its call, its worker's pid, and what its rounds measured."""

    label: str
    call: Callable[[int], Any]
    pid: int
    times_ms: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # broker, worker, caller


def broker_pid() -> int | None:
    """The local RabbitMQ server's process, if this machine runs it."""
    try:
        found = subprocess.run(["pgrep", "-o", "-x", "beam.smp"], capture_output=True, text=True, check=False)
    except OSError:
        return None
    pids = found.stdout.split()
    return int(pids[0]) if len(pids) == 1 else None


def floor_call(bench: Bench, queue: str, shaped: str) -> Callable[[int], Any]:
    """The floor's caller (as ``calls.floor_call``): ``shaped`` is ``""`` (bare), ``"persistent"`` or
    ``"call"`` (persistent, with a call's headers and properties, made per call as the caller makes them)."""
    store = redis.Redis.from_url(bench.backend, socket_timeout=CALL_TIMEOUT + 5)
    connection = Connection(bench.broker, connect_timeout=5)  # type: ignore[no-untyped-call]
    bench.floor_connections.append(connection)
    channel = connection.connection.channel()  # py-amqp's own
    reply = f"bench-floor-reply-{bench.token}-{queue}"
    name = f"{bench.provider_key(True)}.articles.get"
    caller = f"bench-caller-{bench.token}"

    def call(item_id: int) -> Any:
        body = f"{reply} {item_id}".encode()
        if not shaped:
            request = channel.prepare_message(body, content_type="text/plain")
        else:
            headers: dict[str, Any] = {}
            properties: dict[str, Any] = {"delivery_mode": 2}
            if shaped == "call":
                call_id = str(uuid.uuid4())
                deadline = time.time() + CALL_TIMEOUT
                kwargsrepr = repr({"id": item_id, "data": None, "params": {}})
                headers, more = call_message(name, call_id, deadline, kwargsrepr, f"gen{os.getpid()}@bench")
                headers |= {HEADER_CALLER: caller, HEADER_DEADLINE: deadline, HEADER_REPLY: True}
                properties |= more
            request = channel.prepare_message(body, None, "application/json", "utf-8", headers, properties)
        channel.basic_publish(request, exchange="", routing_key=queue)
        popped = store.brpop([reply], timeout=CALL_TIMEOUT)
        if popped is None:
            raise TimeoutError("the floor worker did not answer")
        return json.loads(popped[1])

    return call


def floor_worker(bench: Bench, queue: str, durable: bool) -> WorkerProcess:
    env = {
        "BENCH_BROKER_URL": bench.broker,
        "BENCH_REPLY_URL": bench.backend,
        "BENCH_QUEUE": queue,
        "BENCH_ITEMS": json.dumps(bench.items),
        "BENCH_DURABLE": "1" if durable else "0",
    }
    command = [sys.executable, str(BENCH_DIR / "floor_worker.py")]
    return WorkerProcess("floor_worker", queue, env=env, command=command)


def run(args: argparse.Namespace) -> tuple[list[list[str]], dict[str, str]]:
    items = make_items()
    ids = [item["id"] for item in items]
    bench = Bench(args.rabbitmq, args.backend, items)
    queues = {"f": bench.floor_queue, "f1": f"{bench.floor_queue}-durable", "f2": f"{bench.floor_queue}-call"}
    workers = {
        "f": floor_worker(bench, queues["f"], durable=False),
        "f1": floor_worker(bench, queues["f1"], durable=True),
        "f2": floor_worker(bench, queues["f2"], durable=True),
        "d": bench.provider_worker(True),
    }
    beam = broker_pid()
    caller = App()
    try:
        bench.start(list(workers.values()))
        distribution = distribute(
            caller,
            DistributionSettings(
                key=f"bench-caller-{bench.token}",
                broker_url=args.rabbitmq,
                result_backend=args.backend,
                services=[],
                remote_services=[],
                registry_prefix=bench.prefix,
                timeout=CALL_TIMEOUT,
            ),
        )
        caller.use("articles", distribution.remote_service(bench.provider_key(True), "articles", ["get"]))
        service = caller.service("articles")
        calls: dict[str, Callable[[int], Any]] = {
            "f": floor_call(bench, queues["f"], ""),
            "f1": floor_call(bench, queues["f1"], "persistent"),
            "f2": floor_call(bench, queues["f2"], "call"),
            "d": service.get,
        }
        paths = {key: Measured(PATHS[key], calls[key], workers[key].pid) for key in PATHS}
        pids = [path.pid for path in paths.values()]
        for path in paths.values():
            for n in range(WARMUP):
                assert path.call(ids[n % len(ids)])["id"] == ids[n % len(ids)]
        order = list(paths.values())
        for round_ in range(args.rounds):
            # Each round starts with another path: none always follows the same one.
            shift = round_ % len(order)
            for path in order[shift:] + order[:shift]:
                for n in range(SETTLE):
                    path.call(ids[n % len(ids)])
                quiet(pids)
                before = (process_cpu(beam) if beam else 0.0, process_cpu(path.pid), time.process_time())
                for n in range(args.calls):
                    start = time.perf_counter()
                    path.call(ids[n % len(ids)])
                    path.times_ms.append((time.perf_counter() - start) * 1000)
                after = (process_cpu(beam) if beam else 0.0, process_cpu(path.pid), time.process_time())
                for index in range(3):
                    path.cpu[index] += after[index] - before[index]
    finally:
        finalize(caller)
        bench.stop_workers()
        purge_queues(args.rabbitmq, list(queues.values()))
        bench.cleanup()
    floor = statistics.median(paths["f"].times_ms)
    cells = []
    for path in paths.values():
        count = len(path.times_ms)
        broker, worker, own = (1000 * used / count for used in path.cpu)
        p50 = statistics.median(path.times_ms)
        cells.append(
            [
                path.label,
                f"{p50:.3f}",
                f"{percentile(path.times_ms, 0.99):.3f}",
                f"{p50 / floor:.2f}",
                f"{broker:.3f}" if beam else "-",
                f"{worker:.3f}",
                f"{own:.3f}",
            ]
        )
    fast, shaped = statistics.median(paths["d"].times_ms), statistics.median(paths["f2"].times_ms)
    cells.append(["(d) / (f2): the fast path against the floor of a call's message", f"{fast / shaped:.2f}"])
    cells[-1] += [""] * (len(HEAD) - len(cells[-1]))
    about = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()} ({cpu_model()}), "
        f"Python {platform.python_version()}; load average (1 min) {os.getloadavg()[0]:.2f} after the run",
        "brokers": f"RabbitMQ {mask_url(args.rabbitmq)}, replies on Redis {mask_url(args.backend)}",
        "calls": f"{WARMUP} warm-up calls per path, then {args.rounds} rounds interleaving the paths, "
        f"{args.calls} sequential calls per path and round, each round's once every worker is quiet, "
        f"after {SETTLE} untimed calls",
    }
    return cells, about


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per path and round (default 500)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds (default 10)")
    parser.add_argument(
        "--backend", default=DEFAULT_REDIS, help=f"Redis for replies (default {DEFAULT_REDIS})"
    )
    parser.add_argument(
        "--rabbitmq", default=DEFAULT_RABBITMQ, help=f"RabbitMQ URL (default {DEFAULT_RABBITMQ})"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="markdown file written")
    args = parser.parse_args()
    if not answers(args.rabbitmq) or not answers(args.backend):
        sys.exit(f"needs RabbitMQ at {mask_url(args.rabbitmq)} and Redis at {mask_url(args.backend)}")
    cells, about = run(args)
    Console(width=max(Console().width, 150)).print(
        rich_table("RabbitMQ: the floor of a call's message", HEAD, cells)
    )
    text = "\n".join(
        [
            "# RabbitMQ: the floor of a call's message",
            "",
            "Generated by `.venv/bin/python benchmarks/rabbitmq_floor.py`.",
            "",
            *(f"- **{name}**: {value}" for name, value in about.items()),
            "",
            markdown_table(HEAD, cells),
            "",
        ]
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"written to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
