"""Cost of a call: the broker's floor, raw Celery, and the proxy on Celery's consumer and on the fast path.

Usage: ``python benchmarks/calls.py [--calls N] [--backend URL] [--brokers redis,rabbitmq] [--replicas 1,2]
[--output FILE]``.

Measured in one run, for each path, with ``articles.get(id)`` on the same 100 items:

- (a) the local service: ``App().use("articles", MemoryService(...))`` then ``svc.get(id)``;
- (f) the floor: the least a Python round trip over the broker costs (``benchmarks/floor_worker.py``, no
  envelope): on Redis ``LPUSH`` → ``BRPOP`` → ``LPUSH`` reply → ``BRPOP``; on RabbitMQ a py-amqp publish →
  consume → ``LPUSH`` reply on the result backend's Redis (where the fast path replies) → ``BRPOP``;
- (b) raw Celery: ``celery.send_task(name, kwargs={"id": id}).get()`` to the plain task of
  ``benchmarks/plain_tasks.py`` (default Celery settings except JSON), served by ``celery worker -P solo``;
- (c) the proxy served by Celery's consumer: ``app.service("articles").get(id)`` to
  ``celery -A workers.articles worker -P solo`` with ``CELERY_SERVICES_FAST_PATH=false``;
- (d) the proxy on the fast path: the same worker with the fast path on (the default).

For each: p50 / p99 latency with one call in flight, calls/s with 1 and 8 caller threads, and CPU per call
of the caller, the path's workers and Redis; one row per broker and per ``--replicas`` value (the same
number of solo workers for each path). A last table: a 100 KB ``articles.create`` against a small ``get``
on the fast path, with what serializing the 100 KB costs (``json.dumps`` + ``json.loads``, measured here),
for each ``--replicas`` value with the caller not listening to the service's events, then listening to
``created``.
The result backend is Redis db 9 on 127.0.0.1:6379, else an embedded Redis started (and stopped) here;
RabbitMQ rows need one on 127.0.0.1:5672. Queues, result keys and broker bindings created by the run are
deleted at the end, even on error. Nothing here asserts a time: it is a benchmark.

Writes the tables to ``benchmarks/results/calls.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import signal
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import celery as celery_pkg
import kombu
import redis
from celery import Celery
from kombu.connection import Connection
from rich.console import Console
from rich.table import Table

from celery_services import App, DistributionSettings, MemoryService, distribute, finalize
from celery_services.distribution.protocol import mask_url
from celery_services.testing import WorkerProcess, purge_queues

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
RESULTS = BENCH_DIR / "results" / "calls.md"
DEFAULT_REDIS = "redis://127.0.0.1:6379/9"
DEFAULT_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
#: Size of the large ``create`` of the payload table, and how many are timed.
LARGE_BYTES = 100_000
LARGE_CALLS = 800
ITEM_COUNT = 100
WARMUP = 50
THREADS = 8
#: Each measure is split in this many rounds, interleaved between the paths compared.
ROUNDS = 8
#: Untimed calls before each round's timed ones: the first calls after another path's 8-caller run wake
#: this path's worker (descheduled, its caches cold) and paid for it: one or two per round were 4 to 8 of
#: the 500 calls timed then, as many as the 1% tail the p99 reads.
SETTLE = 5
#: Before each round's timed calls, the workers of every path compared must be quiet: together under this
#: much CPU over a window of QUIET_WINDOW seconds, i.e. not one clock tick (a path's worker goes on working
#: for some ms after its 8-caller run: task events, acknowledgements; it took the CPU the next path's timed
#: calls needed: one run timed two fast-path workers alike but for no-op observability hooks, (d) and
#: (d0), at 0.68 and 0.32 ms p50, by their places in the rounds). Polled for QUIET_LIMIT seconds at most.
QUIET_CPU = 0.005
QUIET_WINDOW = 0.05
QUIET_LIMIT = 3.0
#: Local calls are ~100x quicker: run more of them so the measure lasts long enough to mean something.
LOCAL_SCALE = 20
CALL_TIMEOUT = 10.0
#: The Redis transport's binding tables of an exchange (``_kombu.{table}.{exchange}``).
BINDING_TABLES = ("binding", "binding_permanent")

#: Runs ``celery -A workers.articles worker ...`` after seeding its articles with the benchmark's items
#: (straight into the MemoryService, so no hook or event runs), and with the Celery result keys of the
#: provider under the run's prefix so they can be deleted afterwards. Arguments follow ``-c``.
PROVIDER_BOOT = """\
import json, os, sys
from workers.articles import api, app
app.conf.result_backend_transport_options = {"global_keyprefix": os.environ["BENCH_KEYPREFIX"]}
store = api.service("articles").service
for item in json.loads(os.environ["BENCH_ITEMS"]):
    store.create(item)
sys.argv = ["celery", *sys.argv[1:]]
from celery.__main__ import main
main()
"""

#: Observability (#14) off costs the fast path (d) nothing measurable: the baseline (d0) is the same worker
#: with its hooks replaced by no-ops (the call's log-fields context variable, the one ``hooks.on`` check of
#: serve); (d1) and (d2) are the same worker with metrics on, and traced by an SDK TracerProvider (spans
#: made, none exported). Redis, one worker each.
HOOKS_NOOP = """\
from celery_services.distribution import logs, provider
logs.enter_call = lambda fields: None
logs.leave_call = lambda token: None
provider.hooks = type("NoHooks", (), {"on": False})()
"""
TRACED = """\
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
trace.set_tracer_provider(TracerProvider())
"""
#: Every worker here logs at INFO, as the issue measured them, and so writes Celery's line for each task it
#: ran (the fast path as Celery's consumer does); (d3) is (d) with Celery's tracer's logger at WARNING, as a
#: worker at WARNING (Celery's default) runs: what that line costs a call.
TRACE_LINE_OFF = """\
import logging
logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
"""
#: (label, key suffix, boot prefix, more environment) of those rows.
OBSERVED_PATHS = (
    ("(d0) fast path, observability hooks no-op", "-noop", HOOKS_NOOP, {}),
    ("(d1) fast path, metrics on", "-metrics", "", {"CELERY_SERVICES_METRICS": "true"}),
    ("(d2) fast path, traced (SDK, no exporter)", "-traced", TRACED, {}),
    ("(d3) fast path, no per-call log line", "-quiet", TRACE_LINE_OFF, {}),
)

Call = Callable[[int], Any]


def make_items(count: int = ITEM_COUNT) -> list[dict[str, Any]]:
    """The items every path serves: small articles, ~300 bytes of JSON each."""
    return [
        {
            "id": n,
            "title": f"Article {n}",
            "body": "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 3,
            "tags": ["bench", f"t{n % 7}"],
            "published": n % 2 == 0,
        }
        for n in range(count)
    ]


# -- measuring --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a path and what it measured (CPU: ms per call in the multi-caller runs)."""

    broker: str
    path: str
    workers: str
    p50_ms: float
    p99_ms: float
    rate_1: float
    rate_n: float
    cpu_caller_ms: float
    cpu_workers_ms: float | None
    cpu_redis_ms: float | None


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def latencies(call: Call, ids: Sequence[int], count: int) -> list[float]:
    """The times in ms of ``count`` calls made one after the other (one call in flight)."""
    times = []
    for n in range(count):
        item_id = ids[n % len(ids)]
        start = time.perf_counter()
        call(item_id)
        times.append((time.perf_counter() - start) * 1000)
    return times


def quiet(pids: Sequence[int]) -> None:
    """Return once processes ``pids`` used less than :data:`QUIET_CPU` seconds of CPU together over the last
    :data:`QUIET_WINDOW` seconds, or after :data:`QUIET_LIMIT` seconds."""
    limit = time.monotonic() + QUIET_LIMIT
    before = sum(process_cpu(pid) for pid in pids)
    while time.monotonic() < limit:
        time.sleep(QUIET_WINDOW)  # the window measured, not a wait for something to happen
        now = sum(process_cpu(pid) for pid in pids)
        if now - before < QUIET_CPU:
            return
        before = now


def sequential(call: Call, ids: Sequence[int], total: int) -> float:
    """Seconds taken by ``total`` calls from this thread."""
    start = time.perf_counter()
    for n in range(total):
        call(ids[n % len(ids)])
    return time.perf_counter() - start


class Callers:
    """``size`` persistent caller threads: their per-thread connections live from warm-up to measure."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pool = ThreadPoolExecutor(size, thread_name_prefix="bench-caller")
        self.stopped = threading.Event()
        self.barrier = threading.Barrier(1)

    def run(self, call: Call, ids: Sequence[int], total: int) -> float:
        """Seconds taken by ``total`` calls shared by every thread (each waits for its reply)."""
        counter = itertools.count()
        barrier = self.barrier = threading.Barrier(self.size + 1)

        def work() -> None:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return  # interrupted before the start (see close)
            while (n := next(counter)) < total and not self.stopped.is_set():
                call(ids[n % len(ids)])

        futures = [self.pool.submit(work) for _ in range(self.size)]
        barrier.wait()
        start = time.perf_counter()
        for future in futures:
            future.result()
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop the threads after their call in flight (an interrupted run does not finish its share)."""
        self.stopped.set()
        # Interrupted before the start, the threads would wait at the barrier for ever, and so would this.
        self.barrier.abort()
        self.pool.shutdown(wait=True, cancel_futures=True)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``, from ``/proc``; NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuProbe:
    """CPU seconds used so far by this process, by some worker processes, and by the Redis server."""

    def __init__(self, store: redis.Redis) -> None:
        self.store = store

    def read(self, pids: Sequence[int]) -> tuple[float, float, float]:
        info = self.store.info("cpu")
        used = float(info.get("used_cpu_sys", math.nan)) + float(info.get("used_cpu_user", math.nan))
        return time.process_time(), sum(process_cpu(pid) for pid in pids), used


@dataclass
class Target:
    """A path under measure: its call, its worker processes, and what its rounds measured so far."""

    broker: str
    path: str
    workers: str
    call: Call
    check: Call
    pids: list[int] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)
    single: list[tuple[int, float]] = field(default_factory=list)
    multi: list[tuple[int, float]] = field(default_factory=list)
    cpu: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def row(self) -> Row:
        calls_n = sum(n for n, _ in self.multi)
        caller, workers, server = (1000 * used / calls_n for used in self.cpu)
        return Row(
            self.broker,
            self.path,
            self.workers,
            statistics.median(self.times_ms),
            percentile(self.times_ms, 0.99),
            sum(n for n, _ in self.single) / sum(s for _, s in self.single),
            calls_n / sum(s for _, s in self.multi),
            caller,
            workers if self.pids and not math.isnan(workers) else None,
            server if self.pids and not math.isnan(server) else None,
        )


def measure(
    targets: Sequence[Target],
    ids: Sequence[int],
    calls: int,
    callers: Callers,
    probe: CpuProbe,
    rounds: int = ROUNDS,
) -> list[Row]:
    """Warm up every target (checking its answers), then measure them in interleaved rounds.

    Each round runs, for each target in turn (the order alternates), a share of the sequential calls timed
    one by one, of the calls from one thread and of the calls from ``THREADS`` threads, so that a change of
    the machine's load during the run weighs on every target alike.
    """
    for target in targets:
        for n in range(WARMUP):
            target.check(ids[n % len(ids)])
        callers.run(target.check, ids, THREADS * 5)  # opens the connections of every caller thread
    # As many calls timed one by one as in each throughput measure: the p99 of 500 was their 5th slowest,
    # and moved from 1.6 to 2.8 ms between two fast-path workers alike in one run (their floor: 1.0).
    share, latency_share = max(calls // rounds, THREADS), max(calls // rounds, 5)
    workers = [pid for target in targets for pid in target.pids]
    for number in range(rounds):
        for target in targets if number % 2 == 0 else list(reversed(targets)):
            quiet(workers)
            latencies(target.call, ids, SETTLE)
            target.times_ms += latencies(target.call, ids, latency_share)
            target.single.append((share, sequential(target.call, ids, share)))
            before = probe.read(target.pids)
            target.multi.append((share, callers.run(target.call, ids, share)))
            after = probe.read(target.pids)
            target.cpu = [total + b - a for total, a, b in zip(target.cpu, before, after, strict=True)]
    return [target.row() for target in targets]


def checked(call: Call, items: dict[int, dict[str, Any]]) -> Call:
    """``call`` that fails loudly when an answer is not the expected item (used during warm-up only)."""

    def check(item_id: int) -> Any:
        result = call(item_id)
        if result != items[item_id]:
            raise RuntimeError(f"wrong answer for id {item_id}: {result!r}")
        return result

    return check


# -- the environment --------------------------------------------------------------------------------------


def answers(url: str) -> bool:
    """Whether something listens at the host and port of ``url``."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Bench:
    """The run's names, workers and the ids of what it created, for the cleanup (one per broker)."""

    broker: str
    backend: str
    items: list[dict[str, Any]]
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    workers: list[WorkerProcess] = field(default_factory=list)
    raw_ids: list[str] = field(default_factory=list)
    floor_connections: list[Any] = field(default_factory=list)  # of the RabbitMQ floor's callers

    @property
    def raw_queue(self) -> str:
        return f"bench-plain-{self.token}"

    @property
    def floor_queue(self) -> str:
        return f"bench-floor-{self.token}"

    @property
    def raw_task(self) -> str:
        return f"bench_plain_{self.token}.articles.get"

    def provider_key(self, fast: bool, variant: str = "") -> str:
        return f"bench-articles-{self.token}-{'fast' if fast else 'celery'}{variant}"

    @property
    def prefix(self) -> str:
        """Registry prefix (reply lists, manifests) of both sides, and result-key prefix of the provider."""
        return f"bench-calls-{self.token}"

    def raw_worker(self) -> WorkerProcess:
        env = {
            "BENCH_BROKER_URL": self.broker,
            "BENCH_RESULT_BACKEND": self.backend,
            "BENCH_TASK_NAME": self.raw_task,
            "BENCH_ITEMS": json.dumps(self.items),
            "PYTHONPATH": str(BENCH_DIR),
        }
        return WorkerProcess("plain_tasks", self.raw_queue, env=env)

    def floor_worker(self) -> WorkerProcess:
        env = {
            "BENCH_BROKER_URL": self.broker,
            "BENCH_REPLY_URL": self.backend,
            "BENCH_QUEUE": self.floor_queue,
            "BENCH_ITEMS": json.dumps(self.items),
        }
        command = [sys.executable, str(BENCH_DIR / "floor_worker.py")]
        return WorkerProcess("floor_worker", self.floor_queue, env=env, command=command)

    def provider_worker(
        self, fast: bool, variant: str = "", boot: str = "", more: dict[str, str] | None = None
    ) -> WorkerProcess:
        key = self.provider_key(fast, variant)
        env = {
            **(more or {}),
            "CELERY_SERVICES_CONFIG": str(ROOT / "config" / "default.toml"),
            "CELERY_SERVICES_KEY": key,
            "CELERY_SERVICES_BROKER_URL": self.broker,
            "CELERY_SERVICES_RESULT_BACKEND": self.backend,
            "CELERY_SERVICES_SERVICES": '["*"]',
            "CELERY_SERVICES_FAST_PATH": "true" if fast else "false",
            "BENCH_ITEMS": json.dumps(self.items),
            "CELERY_SERVICES_REGISTRY_PREFIX": self.prefix,
            "BENCH_KEYPREFIX": f"{self.prefix}:",
            "PYTHONPATH": str(ROOT),
        }
        worker = WorkerProcess("workers.articles", key, env=env)
        # The same command WorkerProcess builds (`python -m celery -A workers.articles worker -Q key -P solo
        # -c 1 ...`), run through PROVIDER_BOOT to seed the items first.
        assert worker.command[1:3] == ["-m", "celery"], worker.command
        worker.command[1:3] = ["-c", boot + PROVIDER_BOOT]
        return worker

    def start(self, workers: list[WorkerProcess]) -> None:
        """Start ``workers`` side by side (each is stopped at the end, even when its start failed)."""
        self.workers.extend(workers)
        with ThreadPoolExecutor(len(workers)) as pool:
            for future in [pool.submit(worker.start) for worker in workers]:
                future.result()

    def stop_workers(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.stop()  # SIGTERM to its process group, SIGKILL if it lingers

    def cleanup(self) -> None:
        """Delete the queues, bindings and result keys of the run."""
        queues = [self.raw_queue, self.floor_queue, self.provider_key(True), self.provider_key(False)]
        queues += [self.provider_key(True, variant) for _, variant, _, _ in OBSERVED_PATHS]
        nodes = [worker.name for worker in self.workers]
        for connection in self.floor_connections:
            with contextlib.suppress(Exception):
                connection.close()
        store = redis.Redis.from_url(self.backend)
        try:
            for start in range(0, len(self.raw_ids), 1000):
                store.delete(*(f"celery-task-meta-{i}" for i in self.raw_ids[start : start + 1000]))
            prefixed = list(store.scan_iter(match=f"{self.prefix}:*", count=1000))
            prefixed += store.scan_iter(match=f"bench-floor-reply-{self.token}-*", count=1000)
            for start in range(0, len(prefixed), 1000):
                store.delete(*prefixed[start : start + 1000])
        finally:
            store.close()
        purge_queues(self.broker, queues)  # with their exchange on RabbitMQ, their kombu tables on Redis
        if self.broker.startswith("amqp"):
            return
        broker = redis.Redis.from_url(self.broker)
        try:
            replies = list(broker.scan_iter(match=f"bench-floor-reply-{self.token}-*", count=1000))
            if replies:
                broker.delete(*replies)
            for table in BINDING_TABLES:  # the workers' pidbox queues, bound to the shared control exchange
                pidbox = f"_kombu.{table}.celery.pidbox"
                stale = [m for m in broker.smembers(pidbox) if any(n.encode() in m for n in nodes)]
                if stale:
                    broker.srem(pidbox, *stale)
        finally:
            broker.close()


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    """``url``, else Redis db 9 on 127.0.0.1:6379, else an embedded Redis for the run."""
    if url:
        yield url
        return
    if answers(DEFAULT_REDIS):
        yield DEFAULT_REDIS
        return
    from celery_services.testing import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


# -- the run ----------------------------------------------------------------------------------------------


def floor_call(bench: Bench) -> Call:
    """The floor's caller: send the request (``LPUSH`` on Redis, a py-amqp publish on RabbitMQ, on a
    per-thread channel) and ``BRPOP`` the reply, on a per-thread reply list."""
    on_redis = not bench.broker.startswith("amqp")
    store = redis.Redis.from_url(bench.broker if on_redis else bench.backend, socket_timeout=CALL_TIMEOUT + 5)
    local = threading.local()

    def call(item_id: int) -> Any:
        reply = getattr(local, "reply", None)
        if reply is None:
            reply = local.reply = f"bench-floor-reply-{bench.token}-{threading.get_ident()}"
            if not on_redis:
                local.connection = Connection(bench.broker, connect_timeout=5)  # type: ignore[no-untyped-call]
                bench.floor_connections.append(local.connection)
                local.channel = local.connection.connection.channel()  # py-amqp's own
        if on_redis:
            store.lpush(bench.floor_queue, f"{reply} {item_id}")
        else:
            request = local.channel.prepare_message(f"{reply} {item_id}".encode(), content_type="text/plain")
            local.channel.basic_publish(request, exchange="", routing_key=bench.floor_queue)
        popped = store.brpop([reply], timeout=CALL_TIMEOUT)
        if popped is None:
            raise TimeoutError("the floor worker did not answer")
        return json.loads(popped[1])

    return call


def run_broker(
    name: str, broker: str, backend: str, args: argparse.Namespace, callers: Callers, probe: CpuProbe
) -> tuple[list[Row], list[list[str]], str]:
    """The rows of one broker, its large-payload row, and the worker settings of its paths."""
    items = make_items()
    by_id = {item["id"]: item for item in items}
    ids = [item["id"] for item in items]
    bench = Bench(broker, backend, items)
    redis_broker = not broker.startswith("amqp")
    rows: list[Row] = []
    large: list[list[str]] = []
    raw = Celery("bench-raw-caller", broker=broker, backend=backend, set_as_current=False)
    raw.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
    )

    def raw_call(item_id: int) -> Any:
        task_id = str(uuid.uuid4())
        bench.raw_ids.append(task_id)  # before sending: an interrupted call's result is deleted too
        result = raw.send_task(bench.raw_task, kwargs={"id": item_id}, queue=bench.raw_queue, task_id=task_id)
        return result.get(timeout=CALL_TIMEOUT)

    caller = App()
    try:
        distribution = distribute(
            caller,
            DistributionSettings(
                key=f"bench-caller-{bench.token}",
                broker_url=broker,
                result_backend=backend,
                services=[],
                # The proxies are mounted by hand; the registry of the run is its own.
                remote_services=[],
                registry_prefix=bench.prefix,
                timeout=CALL_TIMEOUT,
            ),
        )
        for fast in (True, False):
            path = f"articles-{'fast' if fast else 'celery'}"
            caller.use(
                path, distribution.remote_service(bench.provider_key(fast), "articles", ["get", "create"])
            )
        for _, variant, _, _ in OBSERVED_PATHS:
            key = bench.provider_key(True, variant)
            caller.use(f"articles{variant}", distribution.remote_service(key, "articles", ["get", "create"]))
        settings = (
            f"(b) {worker_settings(raw)}, the reply read from the result backend; "
            f"(c, d) {worker_settings(distribution.celery)} (`make_celery`), the reply read from the "
            "caller's reply list"
        )
        workers: dict[str, list[WorkerProcess]] = {"floor": [], "raw": [], "fast": [], "celery": []}
        articles = caller.service("articles-fast")
        label, fast_pids = "", list[int]()  # of the last number of workers measured
        for replicas in args.replicas:
            more = replicas - len(workers["raw"])
            if more > 0:
                new: dict[str, list[WorkerProcess]] = {
                    "raw": [bench.raw_worker() for _ in range(more)],
                    "celery": [bench.provider_worker(False) for _ in range(more)],
                }
                new["fast"] = [bench.provider_worker(True) for _ in range(more)]
                new["floor"] = [bench.floor_worker() for _ in range(more)]
                if redis_broker and replicas == 1:
                    for _, variant, boot, env in OBSERVED_PATHS:
                        new[variant] = [bench.provider_worker(True, variant, boot, env)]
                bench.start([w for group in new.values() for w in group])
                for group, started in new.items():
                    workers.setdefault(group, []).extend(started)
            label = f"{replicas} solo"
            print(f"measuring on {name} with {label} worker(s) per path ...", file=sys.stderr)

            def target(path: str, call: Call, group: str, label: str = label) -> Target:
                pids = [w.pid for w in workers[group]]
                return Target(name, path, label, call, checked(call, by_id), pids)

            targets = []
            floor = "(f) floor: LPUSH/BRPOP" if redis_broker else "(f) floor: publish/consume, BRPOP"
            targets.append(target(floor, floor_call(bench), "floor"))
            targets.append(target("(b) raw Celery", raw_call, "raw"))
            targets.append(
                target("(c) proxy, Celery's consumer", caller.service("articles-celery").get, "celery")
            )
            targets.append(target("(d) proxy, fast path", caller.service("articles-fast").get, "fast"))
            if redis_broker and replicas == 1:
                for path, variant, _, _ in OBSERVED_PATHS:
                    targets.append(target(path, caller.service(f"articles{variant}").get, variant))
            rows += measure(targets, ids, args.calls, callers, probe)
            fast_pids = [w.pid for w in workers["fast"]]
            large.append(measure_large(name, label, articles, ids, fast_pids, listened=False))
        # Then with the event bound (a binding lasts as long as the proxy): each create's 100 KB `created`
        # also reaches the caller.
        articles.on("created", lambda data, context: None)
        large.append(measure_large(name, label, articles, ids, fast_pids, listened=True))
    finally:
        bench.stop_workers()
        finalize(caller)
        raw.close()
        bench.cleanup()
    return rows, large, settings


def measure_large(
    broker: str, workers: str, service: Any, ids: Sequence[int], pids: Sequence[int], listened: bool
) -> list[str]:
    """A 100 KB ``create`` against a small ``get``, and the in-process cost of serializing its payload.

    ``workers``: the label of the workers serving ``service`` (processes ``pids``); ``listened``: whether
    the caller listens to the service's ``created`` events (and so is sent them).

    The three are measured in interleaved rounds, each timed one by one, so that their medians (and the
    ratio) are taken under the same load of the machine; each round's calls start, as the other rows' do,
    once the workers are quiet and after a few untimed calls.
    """
    body = {"title": "large", "body": "x" * LARGE_BYTES, "tags": ["bench"]}
    encoded = json.dumps(body)
    small: list[float] = []
    big: list[float] = []
    serialized: list[float] = []
    share = LARGE_CALLS // ROUNDS

    def create(_: int) -> Any:
        return service.create(body)

    for _ in range(ROUNDS):
        for call, times in ((service.get, small), (create, big)):
            quiet(pids)
            latencies(call, ids, SETTLE)
            times += latencies(call, ids, share)
        for _ in range(share):
            start = time.perf_counter()
            json.loads(json.dumps(body))
            serialized.append((time.perf_counter() - start) * 1000)
    # Once per side and way: the caller encodes the call and decodes the reply, the provider the reverse
    # (the created item comes back in the reply).
    serialize = 2 * statistics.median(serialized)
    extra = statistics.median(big) - statistics.median(small)
    return [
        broker,
        workers,
        f"{len(encoded) // 1000} KB",
        "yes" if listened else "no",
        fmt_ms(statistics.median(small)),
        fmt_ms(statistics.median(big)),
        fmt_ms(extra),
        fmt_ms(serialize),
        f"{extra / serialize:.2f}",
    ]


def run(args: argparse.Namespace, backend: str) -> tuple[list[Row], list[list[str]], dict[str, str]]:
    rows: list[Row] = []
    large: list[list[str]] = []
    notes: list[str] = []
    load_before = os.getloadavg()[0]
    callers = Callers(THREADS)
    store = redis.Redis.from_url(backend)
    probe = CpuProbe(store)
    brokers = {"Redis": args.broker or backend}
    if "rabbitmq" in args.brokers:
        if answers(args.rabbitmq):
            brokers["RabbitMQ"] = args.rabbitmq
        else:
            print(f"no RabbitMQ at {mask_url(args.rabbitmq)}: its rows are left out", file=sys.stderr)
    try:
        print("measuring the local service ...", file=sys.stderr)
        items = make_items()
        by_id = {item["id"]: item for item in items}
        local = App().use("articles", MemoryService(store=by_id))
        target = Target("-", "(a) local service", "in-process", local.get, checked(local.get, by_id))
        rows += measure([target], list(by_id), args.calls * LOCAL_SCALE, callers, probe)
        for name, broker in brokers.items():
            more, big, settings = run_broker(name, broker, backend, args, callers, probe)
            rows += more
            large += big
            notes.append(settings)
    finally:
        callers.close()
    try:
        redis_version = str(store.info("server").get("redis_version", "?"))
    finally:
        store.close()
    about = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()} ({cpu_model()}), "
        f"Python {platform.python_version()}; load average (1 min) {load_before:.2f} before the run, "
        f"{os.getloadavg()[0]:.2f} after",
        "brokers": ", ".join(f"{name} {mask_url(url)}" for name, url in brokers.items()),
        "result backend": f"{mask_url(backend)} (Redis {redis_version})",
        "celery": f"{celery_pkg.__version__} (kombu {kombu.__version__})",
        "calls": (
            f"{WARMUP} warm-up calls, then {ROUNDS} rounds interleaving the paths of a broker; in all, "
            f"per path: {args.calls} sequential calls timed one by one (p50, p99; each round's once "
            f"every path's workers are quiet, after {SETTLE} untimed calls), {args.calls} calls "
            f"from 1 thread and {args.calls} from {THREADS} threads (local: {args.calls * LOCAL_SCALE})"
        ),
        "settings": notes[0] if notes else "",
        "CPU": (
            f"ms per call during the {THREADS}-caller runs: the caller process (all its threads), the "
            "path's worker processes, the Redis server (whole server: other clients of it count too)"
        ),
    }
    return rows, large, about


def worker_settings(app: Celery) -> str:
    """What a worker of ``app`` does per call beyond running it: prefetch, ack, task events."""
    conf = app.conf
    ack = "late" if conf.task_acks_late else "early"
    events = "on" if conf.worker_send_task_events else "off"
    return f"prefetch multiplier {conf.worker_prefetch_multiplier}, {ack} ack, worker task events {events}"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


# -- output -----------------------------------------------------------------------------------------------


def fmt_ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def tables(rows: list[Row]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """The results table and the ratios table (each proxy row against the floor and raw Celery)."""
    head = [
        "broker",
        "path",
        "workers",
        "p50 ms",
        "p99 ms",
        "calls/s, 1 caller",
        f"calls/s, {THREADS} callers",
        "CPU ms/call: caller",
        "CPU: workers",
        "CPU: Redis",
    ]
    cells = [
        [
            r.broker,
            r.path,
            r.workers,
            fmt_ms(r.p50_ms),
            fmt_ms(r.p99_ms),
            f"{r.rate_1:,.0f}",
            f"{r.rate_n:,.0f}",
            fmt_ms(r.cpu_caller_ms),
            "-" if r.cpu_workers_ms is None else fmt_ms(r.cpu_workers_ms),
            "-" if r.cpu_redis_ms is None else fmt_ms(r.cpu_redis_ms),
        ]
        for r in rows
    ]
    ratio_head = [
        "broker",
        "path",
        "workers",
        "p50 / floor",
        f"calls/s ({THREADS} callers) / floor",
        "p50 / raw Celery",
        "calls/s / raw Celery, 1 caller",
        f"calls/s / raw Celery, {THREADS} callers",
    ]
    ratios = []
    for row in rows:
        if not row.path.startswith(("(c)", "(d)")):
            continue
        same = [r for r in rows if r.broker == row.broker and r.workers == row.workers]
        floor = next((r for r in same if r.path.startswith("(f)")), None)
        raw = next(r for r in same if r.path.startswith("(b)"))
        ratios.append(
            [
                row.broker,
                row.path,
                row.workers,
                "-" if floor is None else f"{row.p50_ms / floor.p50_ms:.2f}",
                "-" if floor is None else f"{row.rate_n / floor.rate_n:.2f}",
                f"{row.p50_ms / raw.p50_ms:.2f}",
                f"{row.rate_1 / raw.rate_1:.2f}",
                f"{row.rate_n / raw.rate_n:.2f}",
            ]
        )
    return head, cells, ratio_head, ratios


#: The fast-call issue's targets and the floor it measured them against (Redis, 1 worker; its "this 2-core
#: machine": floor p50 0.26 ms, 3,600 / 3,700 calls/s with 1 / 8 callers, 0.11 ms of worker CPU per call).
#: A shared machine runs faster or slower from hour to hour; each target is also read as its ratio to the
#: floor, which this run measures too. Kind: "max" (at most) or "min" (at least).
ISSUE_FLOOR = {"p50": 0.26, "rate_1": 3600.0, "rate_n": 3700.0, "cpu": 0.11}
TARGETS = [
    ("Redis fast path p50 (ms)", "p50", 0.52, "max"),
    ("Redis fast path p99 (ms)", "p99", 1.5, "max"),
    (f"Redis fast path calls/s, {THREADS} callers", "rate_n", 2000.0, "min"),
    ("Redis fast path calls/s, 1 caller", "rate_1", 1200.0, "min"),
    ("Redis fast path worker CPU (ms/call)", "cpu", 0.35, "max"),
    ("RabbitMQ fast path p50 (ms)", "amqp_p50", 0.8, "max"),
]
TARGETS_HEAD = ["target", "issue", "as a ratio to its floor", "this run", "ratio to this run's floor", "met"]
#: The issue measured no RabbitMQ floor. Where a run's Redis floor ran as the issue's did (0.22-0.27 ms),
#: RabbitMQ's ran 0.45-0.53 ms: the 0.8 ms target read against RabbitMQ's own floor is 1.51-1.78x it. A
#: second reading of that target, since RabbitMQ's floor against Redis's moves with the machine (1.7-2.2x).
AMQP_FLOOR_SEEN = (0.45, 0.53)


def target_rows(rows: list[Row], large: list[list[str]]) -> list[list[str]]:
    """Each target of the fast-call issue: its figure, the same as a ratio to the floor, and this run's."""

    def find(broker: str, prefix: str) -> Row | None:
        return next(
            (r for r in rows if r.broker == broker and r.workers == "1 solo" and r.path.startswith(prefix)),
            None,
        )

    floor, fast, amqp = find("Redis", "(f)"), find("Redis", "(d) proxy"), find("RabbitMQ", "(d) proxy")
    if floor is None or fast is None:
        return []
    measured = {"p50": fast.p50_ms, "p99": fast.p99_ms, "rate_n": fast.rate_n, "rate_1": fast.rate_1}
    measured["cpu"] = fast.cpu_workers_ms or math.nan
    measured["amqp_p50"] = amqp.p50_ms if amqp is not None else math.nan
    floors = {"p50": floor.p50_ms, "p99": floor.p50_ms, "amqp_p50": floor.p50_ms, "rate_n": floor.rate_n}
    floors |= {"rate_1": floor.rate_1, "cpu": floor.cpu_workers_ms or math.nan}
    issue_floors = ISSUE_FLOOR | {"p99": ISSUE_FLOOR["p50"], "amqp_p50": ISSUE_FLOOR["p50"]}
    table = []
    for label, name, figure, kind in TARGETS:
        if math.isnan(measured[name]):
            continue
        wanted, got = figure / issue_floors[name], measured[name] / floors[name]
        met = got <= wanted if kind == "max" else got >= wanted
        sign = "<=" if kind == "max" else ">="
        value = f"{measured[name]:,.0f}" if name.startswith("rate") else fmt_ms(measured[name])
        table.append(
            [
                label,
                f"{sign} {figure:,g}",
                f"{sign} {wanted:.2f}",
                value,
                f"{got:.2f}",
                "yes" if met else "no",
            ]
        )
    amqp_floor = find("RabbitMQ", "(f)")
    if amqp is not None and amqp_floor is not None:
        low, high = (TARGETS[-1][2] / seen for seen in reversed(AMQP_FLOOR_SEEN))
        got = amqp.p50_ms / amqp_floor.p50_ms
        met = "yes" if got <= low else "no" if got > high else "within the estimate"
        table.append(
            [
                "RabbitMQ fast path p50 / RabbitMQ floor",
                "<= 0.8 ms",
                f"<= {low:.2f}-{high:.2f} (estimated)",
                fmt_ms(amqp.p50_ms),
                f"{got:.2f}",
                met,
            ]
        )
    for row in large:
        # As every target, on one worker; the target is the call's own cost, the event's shown beside it.
        if row[1] != "1 solo" or row[3] == "yes":
            continue
        ratio = float(row[-1])
        met = "yes" if ratio <= 2 else "no"
        table.append(
            [f"{row[0]} 100 KB create: extra / serialization", "<= 2", "<= 2", row[6] + " ms", row[-1], met]
        )
    return table


OBSERVED_HEAD = ["path", "p50 / (d0)", "calls/s, 1 caller / (d0)", f"calls/s, {THREADS} callers / (d0)"]
OBSERVED_HEAD += ["CPU workers / (d0)"]


def observed_ratios(rows: list[Row]) -> list[list[str]]:
    """The fast path (d) and its observed variants against (d0), its hooks no-op (Redis, one worker)."""
    same = [r for r in rows if r.broker == "Redis" and r.workers == "1 solo"]
    base = next((r for r in same if r.path.startswith("(d0)")), None)
    if base is None:
        return []
    cells = []
    for row in same:
        if row.path.startswith(("(d)", "(d1)", "(d2)", "(d3)")):
            cpu = "-"
            if row.cpu_workers_ms is not None and base.cpu_workers_ms:
                cpu = f"{row.cpu_workers_ms / base.cpu_workers_ms:.3f}"
            cells.append(
                [
                    row.path,
                    f"{row.p50_ms / base.p50_ms:.3f}",
                    f"{row.rate_1 / base.rate_1:.3f}",
                    f"{row.rate_n / base.rate_n:.3f}",
                    cpu,
                ]
            )
    return cells


LARGE_HEAD = [
    "broker",
    "workers",
    "payload",
    "caller listens to `created`",
    "p50 ms: small get",
    "p50 ms: large create",
    "extra ms",
    "serialize ms (dumps + loads, both ways)",
    "extra / serialize",
]


def markdown_table(head: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def rich_table(title: str, head: list[str], cells: list[list[str]]) -> Table:
    table = Table(title=title)
    for name in head:
        table.add_column(
            name, justify="left" if name in ("broker", "path", "workers", "payload") else "right"
        )
    for row in cells:
        table.add_row(*row)
    return table


def report(rows: list[Row], large: list[list[str]], about: dict[str, str]) -> str:
    head, cells, ratio_head, ratios = tables(rows)
    console = Console(width=max(Console().width, 170))
    console.print(rich_table("articles.get(id): one call", head, cells))
    console.print(
        rich_table("The proxy against the floor and raw Celery (> 1: more than it)", ratio_head, ratios)
    )
    targets = target_rows(rows, large)
    console.print(rich_table("The fast-call targets, also as ratios to the floor", TARGETS_HEAD, targets))
    observed = observed_ratios(rows)
    console.print(
        rich_table("Observability: the fast path against its hooks no-op (d0)", OBSERVED_HEAD, observed)
    )
    console.print(rich_table("A large call on the proxy", LARGE_HEAD, large))
    for name, value in about.items():
        console.print(f"[bold]{name}[/bold]: {value}")
    return "\n".join(
        [
            "# Calls: the broker's floor, raw Celery and the proxy",
            "",
            "Generated by `.venv/bin/python benchmarks/calls.py`.",
            "",
            *(f"- **{name}**: {value}" for name, value in about.items()),
            "- **paths**: (a) `App().use('articles', MemoryService(...)).get(id)`; (f) the floor, "
            "`benchmarks/floor_worker.py`, no envelope: on Redis LPUSH → BRPOP → LPUSH reply → BRPOP, on "
            "RabbitMQ a py-amqp publish → consume → LPUSH reply (the result backend's Redis) → BRPOP; (b) "
            "`celery.send_task(name, kwargs={'id': id}).get()` to the plain task of "
            "`benchmarks/plain_tasks.py` (default Celery settings + JSON); (c) "
            "`app.service('articles').get(id)` through `distribution.remote_service(...)` to "
            "`celery -A workers.articles worker` with `fast_path = false`; (d) the same with the fast path "
            "(the default on Redis). Each path has the same number of `-P solo` workers, one process each.",
            "",
            markdown_table(head, cells),
            "",
            "The proxy against the floor and raw Celery (> 1: more than it):",
            "",
            markdown_table(ratio_head, ratios),
            "",
            "The fast-call targets: the issue's figures were measured against a floor of 0.26 ms p50, "
            "3,600 / 3,700 calls/s (1 / 8 callers) and 0.11 ms of worker CPU per call; each is also read as "
            "its ratio to that floor (the p99 and RabbitMQ's p50 to the floor's p50), against this run's "
            "floor (Redis, 1 worker). The issue measured no RabbitMQ floor; the RabbitMQ p50 is also read "
            "against this run's RabbitMQ floor, where the 0.8 ms target stands for 1.51-1.78x it (the "
            "RabbitMQ floor ran 0.45-0.53 ms on a machine whose Redis floor ran as the issue's):",
            "",
            markdown_table(TARGETS_HEAD, targets),
            "",
            "Observability (#14), Redis, one worker: the fast path (d) with nothing observed, then with "
            "metrics on (d1) and traced (d2), against the same worker with its observability hooks replaced "
            "by no-ops (d0; the budget of (d) is 5%: p50 at most 1.05, calls/s at least 0.95); and (d3), "
            "the worker of (d) with Celery's tracer's logger at WARNING, so without the INFO line each "
            "worker here writes for each call it ran:",
            "",
            markdown_table(OBSERVED_HEAD, observed),
            "",
            f"A large call on the proxy, the fast path ({LARGE_CALLS} calls each, one in flight, in "
            f"{ROUNDS} rounds interleaved with the serialization's own measure, each round's once the "
            "workers are quiet; the create's item comes back in its reply, so the payload travels both "
            "ways), with each number of workers; then the same once the caller listens to `created`, whose "
            "100 KB event then reaches it too. The target reads the one-worker row, as the issue sets every "
            "target on one worker process:",
            "",
            markdown_table(LARGE_HEAD, large),
            "",
        ]
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per throughput measure (default 2000)")
    parser.add_argument("--broker", default=None, help="Redis broker URL (default: the result backend)")
    parser.add_argument(
        "--backend", default=None, help=f"Redis result backend (default {DEFAULT_REDIS}, else embedded)"
    )
    parser.add_argument(
        "--brokers",
        type=lambda text: {part.strip().lower() for part in text.split(",")},
        default={"redis", "rabbitmq"},
        help="brokers measured (default redis,rabbitmq; RabbitMQ rows only when one answers)",
    )
    parser.add_argument(
        "--rabbitmq", default=DEFAULT_RABBITMQ, help=f"RabbitMQ URL (default {DEFAULT_RABBITMQ})"
    )
    parser.add_argument(
        "--replicas",
        type=lambda text: sorted({int(n) for n in text.split(",")}),
        default=[1, 2],
        help="solo workers per path, one row each (default 1,2)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help=f"markdown file written (default {RESULTS.relative_to(ROOT)})",
    )
    args = parser.parse_args()
    # A run stopped by SIGTERM or SIGHUP cleans up like an interrupted one (workers, queues, keys).
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    with redis_server(args.backend) as backend:
        rows, large, about = run(args, backend)
    text = report(rows, large, about)
    output: Path = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"written to {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
