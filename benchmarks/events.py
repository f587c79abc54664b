"""Events benchmark: a provider's ``create`` → ``created`` re-emitted on the proxies of consumer apps.

Prints (and saves to ``benchmarks/results/events.md``), measured in one run per broker, all in this process:

- latency: ``created`` events published one at a time (timestamp in the data, taken just before
  ``app.service("articles").create(...)``, whose call publishes) → the proxy's ``created`` listener runs on
  each consumer app; p50 / p99 over every (event, consumer) receipt, and p50 of the last consumer per event;
- the cost on the caller's call path: ``create()`` duration, next to the same ``create()`` undistributed;
- throughput: N events created back to back, until every consumer app got all N;
- for 1 and for 10 consumer apps, each with its own key and its own ``distribute()``;
- next to a bare kombu baseline on the same broker with the same message size: a ``Producer`` publishing to
  a topic exchange and one ``Consumer`` thread per bound queue (1 queue, and 10 queues for the fan-out).

Library and baseline run side by side and take turns in rounds (order alternating), so that both see the
same load of a shared machine; the ratios are also given per round (min - max).

Brokers: ``--broker`` (repeatable), else Redis db 9 and, when it answers, the local RabbitMQ.
Usage: ``python benchmarks/events.py [--events 2000] [--samples 300] [--rounds 5] [--broker URL]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kombu
import kombu.connection
import kombu.entity
import kombu.messaging
import redis
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery_services import App, DistributionSettings, MemoryService, distribute, finalize  # noqa: E402
from celery_services.distribution.events import EventEnvelope, event_context  # noqa: E402

REDIS_URL = os.environ.get("CELERY_SERVICES_TEST_REDIS", "redis://127.0.0.1:6379/9")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
FANOUT = 10
WARMUP = 20
WAIT = 60.0  # seconds any phase may take before the benchmark gives up
POLL = 0.3  # consumer drain timeout, as the library's
PREFETCH = 100  # as the library's broadcast consumers

Publish = Callable[[str, int], None]
# kombu is unannotated: typed as Any-returning callables, as in celery_services.events
Connection: Callable[..., Any] = kombu.connection.Connection
Consumer: Callable[..., Any] = kombu.messaging.Consumer
Exchange: Callable[..., Any] = kombu.entity.Exchange
Producer: Callable[..., Any] = kombu.messaging.Producer
Queue: Callable[..., Any] = kombu.entity.Queue


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def answers(url: str) -> bool:
    parts = urlsplit(url)
    default = 6379 if parts.scheme.startswith("redis") else 5672
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default), timeout=0.5):
            return True
    except OSError:
        return False


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


class Collector:
    """Receipts of the current phase: ``record`` runs on the consumer threads, the main thread waits."""

    def __init__(self, consumers: int) -> None:
        self.consumers = consumers
        self.cond = threading.Condition()
        self.reset("idle", 0)

    def reset(self, phase: str, target: int, *, per_event: bool = False) -> None:
        with self.cond:
            self.phase, self.target, self.per_event = phase, target, per_event
            self.samples: list[tuple[int, float]] = []  # (seq, latency)
            self.counts = [0] * self.consumers
            self.per_seq: dict[int, int] = {}
            self.finished = 0
            self.last_at = 0.0

    def record(self, index: int, body: Any, now: float) -> None:
        if not isinstance(body, dict):
            return
        with self.cond:
            if body.get("phase") != self.phase or index >= self.consumers:
                return
            seq = body["seq"]
            self.samples.append((seq, now - body["t"]))
            self.counts[index] += 1
            self.per_seq[seq] = got = self.per_seq.get(seq, 0) + 1
            if self.counts[index] == self.target:
                self.finished += 1
                self.last_at = now
            if (self.per_event and got == self.consumers) or self.finished == self.consumers:
                self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout=WAIT):
                raise TimeoutError(f"{what}: counts {self.counts} of {self.target} ({self.phase})")

    def wait_seq(self, seq: int) -> None:
        self.wait(lambda: self.per_seq.get(seq, 0) >= self.consumers, f"event {seq}")

    def wait_all(self) -> None:
        self.wait(lambda: self.finished >= self.consumers, "all events")


@dataclass
class Result:
    """One measured path (library or kombu) with some consumers on one broker, over every round."""

    path: str
    consumers: int
    latencies: list[float] = field(default_factory=list)  # every (event, consumer) receipt
    last: list[float] = field(default_factory=list)  # per event: the slowest consumer
    calls: list[float] = field(default_factory=list)  # duration of the publishing call
    events: int = 0
    seconds: float = 0.0  # until every consumer got every event of the throughput blocks
    caller_seconds: float = 0.0  # the publisher's own loops
    rounds: list[tuple[float, float]] = field(default_factory=list)  # per round: (p50, events/s)

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def caller_rate(self) -> float:
        return self.events / self.caller_seconds


@dataclass
class Side:
    """A publisher and its consumers' collector."""

    collector: Collector
    publish: Publish
    result: Result

    def warm_up(self) -> None:
        self.collector.reset("warmup", WARMUP)
        for seq in range(WARMUP):
            self.publish("warmup", seq)
        self.collector.wait_all()

    def latency_block(self, phase: str, count: int) -> float:
        """``count`` events one at a time, the next once every consumer got one; returns the block's p50."""
        collector, result = self.collector, self.result
        collector.reset(phase, count, per_event=True)
        for seq in range(count):
            started = time.perf_counter()
            self.publish(phase, seq)
            result.calls.append(time.perf_counter() - started)
            collector.wait_seq(seq)
        with collector.cond:
            worst: dict[int, float] = {}
            for seq, latency in collector.samples:
                worst[seq] = max(worst.get(seq, 0.0), latency)
            block = [latency for _, latency in collector.samples]
        result.latencies += block
        result.last += worst.values()
        return statistics.median(block)

    def throughput_block(self, phase: str, count: int) -> float:
        """``count`` events back to back, until every consumer got them all; returns the block's events/s."""
        collector, result = self.collector, self.result
        collector.reset(phase, count)
        started = time.perf_counter()
        for seq in range(count):
            self.publish(phase, seq)
        result.caller_seconds += time.perf_counter() - started
        collector.wait_all()
        seconds = collector.last_at - started
        result.events += count
        result.seconds += seconds
        return count / seconds


def compare(sides: list[Side], rounds: int, samples: int, events: int) -> None:
    """Warm both up, then ``rounds`` rounds: latency blocks, then throughput blocks, the order alternating."""
    for side in sides:
        side.warm_up()
    for number in range(rounds):
        order = sides if number % 2 == 0 else sides[::-1]
        p50s = {id(side): side.latency_block(f"latency{number}", samples // rounds) for side in order}
        rates = {id(side): side.throughput_block(f"throughput{number}", events // rounds) for side in order}
        for side in sides:
            side.result.rounds.append((p50s[id(side)], rates[id(side)]))


def timed_calls(publish: Publish, count: int) -> list[float]:
    """Durations of ``count`` publishing calls nobody receives."""
    out = []
    for seq in range(count):
        started = time.perf_counter()
        publish("solo", seq)
        out.append(time.perf_counter() - started)
    return out


# -- the library -------------------------------------------------------------------------------------------


def library_settings(url: str, prefix: str, key: str, **extra: Any) -> DistributionSettings:
    # The registry and replies live in Redis db 9 whatever the broker (else an AMQP broker means db 0).
    return DistributionSettings(
        key=key, broker_url=url, result_backend=REDIS_URL, registry_prefix=prefix, **extra
    )


class Library:
    """The provider app and the consumer apps, all in this process, under a registry prefix of their own."""

    def __init__(self, url: str, samples: int) -> None:
        self.url = url
        self.prefix = f"bench-events-{uuid.uuid4().hex[:8]}"
        self.provider_key = f"bench-provider-{uuid.uuid4().hex[:6]}"
        self.apps: list[App] = []
        self.sink: dict[str, Collector] = {}
        self.size = 0  # bytes of one event's envelope
        self.leftovers: list[str] = []
        local = App()
        local.use("articles", MemoryService())
        self.undistributed = timed_calls(
            lambda phase, seq: local.service("articles").create({"phase": phase, "seq": seq, "t": 0.0}),
            samples,
        )
        self.provider = App()
        self.provider.use("articles", MemoryService()).on("created", self._size_of)
        distribute(self.provider, library_settings(url, self.prefix, self.provider_key, remote_services=[]))
        self.apps.append(self.provider)
        self.idle = timed_calls(self.publish, samples)  # bound to no queue: the publishing cost alone

    def _size_of(self, data: Any, context: Any = None) -> None:
        if not self.size:
            body = EventEnvelope(key=self.provider_key, path="articles", event="created", data=data)
            body.context = event_context(context)
            self.size = len(body.model_dump_json().encode())

    def publish(self, phase: str, seq: int) -> None:
        self.provider.service("articles").create({"phase": phase, "seq": seq, "t": time.perf_counter()})

    def side(self, consumers: int) -> Side:
        """Grow to ``consumers`` consumer apps, all reporting to a new collector."""
        collector = Collector(consumers)
        self.sink["current"] = collector
        for index in range(len(self.apps) - 1, consumers):
            self.apps.append(self._consumer(index))
        return Side(collector, self.publish, Result("celery_services", consumers))

    def _consumer(self, index: int) -> App:
        app = App()
        sink = self.sink

        def on_created(data: Any, context: Any = None) -> None:
            sink["current"].record(index, data, time.perf_counter())

        def on_service(wrapper: Any) -> None:
            if wrapper.path == "articles":
                wrapper.on("created", on_created)

        app.on("service", on_service)
        key = f"bench-consumer{index}-{uuid.uuid4().hex[:6]}"
        wanted = [self.provider_key]
        distribute(app, library_settings(self.url, self.prefix, key, services=[], remote_services=wanted))
        if "articles" not in app.services:
            finalize(app)
            raise RuntimeError(f"consumer {key} did not mount the provider's articles")
        return app

    def close(self) -> None:
        """Finalize every app, then delete (and report) whatever they left under the prefix."""
        queues = [app.distribution.events.queue_name for app in self.apps if app.distribution is not None]
        for app in reversed(self.apps):
            finalize(app)
        store = redis.Redis.from_url(REDIS_URL)
        self.leftovers = [name.decode() for name in store.scan_iter(f"*{self.prefix}*", count=1000)]
        if self.leftovers:
            store.delete(*self.leftovers)
        store.close()
        if is_redis(self.url):
            broker = redis.Redis.from_url(self.url)
            for table in broker.scan_iter("_kombu.binding*celery_services.events", count=1000):
                if members := [m for m in broker.smembers(table) if self.prefix.encode() in m]:
                    broker.srem(table, *members)
                    self.leftovers.append(f"{table.decode()}: {len(members)} bindings")
            broker.close()
        else:
            self.leftovers += amqp_existing(self.url, [name for name in queues if name], [])


# -- bare kombu ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def kombu_side(url: str, consumers: int, size: int, samples: int) -> Iterator[tuple[Side, list[float]]]:
    """kombu Producer → topic exchange → ``consumers`` bound queues, one Consumer thread each.

    Yields the side and the durations of ``samples`` publishing calls made before any queue was bound.
    """
    name = f"bench-events-kombu-{uuid.uuid4().hex[:8]}"
    exchange = Exchange(name, type="topic", durable=True)
    rkey = "bench.articles.created"
    redis_ = is_redis(url)
    queues = [
        Queue(f"{name}.q{i}", exchange, routing_key=rkey, durable=False, auto_delete=not redis_)
        for i in range(consumers)
    ]
    collector = Collector(consumers)
    stop = threading.Event()
    ready = threading.Barrier(consumers + 1)
    errors: list[BaseException] = []
    pad = size - len(json.dumps({"phase": "throughput0", "seq": 0, "t": time.perf_counter(), "pad": ""}))

    def consume(index: int) -> None:
        # Redis: no ack emulation, as the library's broadcast consumers.
        options = {"ack_emulation": False} if redis_ else {}
        try:
            with Connection(url, transport_options=options) as conn:
                if redis_:
                    conn.transport.brpop_timeout = POLL
                channel = conn.channel()
                queues[index](channel).declare()

                def on_message(body: Any, message: Any) -> None:
                    collector.record(index, body, time.perf_counter())
                    message.ack()

                consumer = Consumer(
                    channel,
                    queues=[queues[index]],
                    callbacks=[on_message],
                    accept=["json"],
                    prefetch_count=PREFETCH,
                )
                with consumer:
                    ready.wait()
                    while not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            conn.drain_events(timeout=POLL)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                ready.abort()

    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(consumers)]
    try:
        with Connection(url) as conn:
            producer = Producer(conn.channel(), exchange=exchange, auto_declare=True)

            def publish(phase: str, seq: int) -> None:
                body = json.dumps({"phase": phase, "seq": seq, "t": time.perf_counter(), "pad": "x" * pad})
                producer.publish(
                    body,
                    routing_key=rkey,
                    content_type="application/json",
                    content_encoding="utf-8",
                    delivery_mode=2,
                )

            idle = timed_calls(publish, samples)  # no queue bound yet
            for thread in threads:
                thread.start()
            ready.wait(timeout=WAIT)
            yield Side(collector, publish, Result("bare kombu", consumers)), idle
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        cleanup_kombu(url, name, queues)
        if errors:
            raise RuntimeError(f"kombu consumer failed: {errors[0]!r}") from errors[0]


def cleanup_kombu(url: str, name: str, queues: list[Any]) -> None:
    with Connection(url) as conn:
        for queue in queues:
            with contextlib.suppress(Exception):
                queue(conn.channel()).delete()
        if not is_redis(url):
            conn.channel().exchange_delete(name)
    if is_redis(url):
        broker = redis.Redis.from_url(url)
        if names := list(broker.scan_iter(f"*{name}*", count=1000)):
            broker.delete(*names)
        broker.close()
    elif left := amqp_existing(url, [queue.name for queue in queues], [name]):
        raise RuntimeError(f"kombu baseline left {left} on the broker")


def amqp_existing(url: str, queues: list[str], exchanges: list[str]) -> list[str]:
    """Which of these queues and exchanges still exist on an AMQP broker (passive declares)."""
    found = []
    with Connection(url) as conn:
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                channel = conn.channel()  # a 404 closes the channel
                try:
                    if kind == "queue":
                        channel.queue_declare(name, passive=True)
                    else:
                        channel.exchange_declare(name, "topic", passive=True)
                except Exception:
                    continue
                found.append(f"{kind} {name}")
                with contextlib.suppress(Exception):
                    channel.close()
    return found


# -- one broker ---------------------------------------------------------------------------------------------


@dataclass
class BrokerRun:
    url: str
    size: int = 0
    undistributed: list[float] = field(default_factory=list)  # create() without distribute
    idle: list[float] = field(default_factory=list)  # the provider's create(), no consumer bound
    kombu_idle: list[float] = field(default_factory=list)  # producer.publish, no queue bound
    results: list[Result] = field(default_factory=list)  # kombu 1, library 1, kombu 10, library 10
    leftovers: list[str] = field(default_factory=list)


def run_broker(url: str, samples: int, events: int, rounds: int) -> BrokerRun:
    run = BrokerRun(url)
    library = Library(url, samples)
    try:
        run.size, run.undistributed, run.idle = library.size, library.undistributed, library.idle
        for consumers in (1, FANOUT):
            lib = library.side(consumers)
            with kombu_side(url, consumers, library.size, samples) as (base, idle):
                run.kombu_idle = run.kombu_idle or idle
                compare([lib, base], rounds, samples, events)
            run.results += [base.result, lib.result]
    finally:
        library.close()
        run.leftovers = library.leftovers
    return run


# -- report -------------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def broker_label(url: str) -> str:
    return "Redis" if is_redis(url) else "RabbitMQ"


HEADER = (
    *("broker", "path", "consumers", "p50 ms", "p99 ms"),
    *("last p50 ms", "call p50 ms", "events/s", "calls/s"),
)
LEGEND = (
    "p50 / p99: every (event, consumer) receipt; last p50: the slowest consumer of each event; call p50: "
    "the publishing call (library: `create()`, kombu: `producer.publish`) during the latency blocks; "
    "events/s: events back to back until every consumer got them all; calls/s: the publisher's own loop"
)


def rows(run: BrokerRun) -> list[tuple[str, ...]]:
    return [
        (
            broker_label(run.url),
            result.path,
            str(result.consumers),
            ms(result.p50),
            ms(percentile(result.latencies, 0.99)),
            ms(statistics.median(result.last)),
            ms(statistics.median(result.calls)),
            f"{result.rate:,.0f}",
            f"{result.caller_rate:,.0f}",
        )
        for result in run.results
    ]


RATIO_HEADER = (
    *("broker", "comparison", "p50 library / kombu", "per round"),
    *("events/s kombu / library", "per round"),
)


def ratios(run: BrokerRun) -> list[tuple[str, ...]]:
    kombu1, one, kombu_n, many = run.results

    def spread(values: list[float]) -> str:
        return f"{min(values):.2f} - {max(values):.2f}"

    out: list[tuple[str, ...]] = []
    for label, lib, base in (
        ("1 consumer vs kombu 1 queue", one, kombu1),
        (f"{FANOUT} consumers vs kombu 1 queue", many, kombu1),
        (f"{FANOUT} consumers vs kombu {FANOUT} queues", many, kombu_n),
    ):
        pairs = list(zip(lib.rounds, base.rounds, strict=True))
        out.append(
            (
                broker_label(run.url),
                label,
                f"{lib.p50 / base.p50:.2f}",
                spread([mine[0] / theirs[0] for mine, theirs in pairs]),
                f"{base.rate / lib.rate:.2f}",
                spread([theirs[1] / mine[1] for mine, theirs in pairs]),
            )
        )
    return out


def notes(run: BrokerRun) -> list[str]:
    """Per broker: the publishing cost alone, the message size, what cleanup found."""
    return [
        f"{broker_label(run.url)}: publishing call with no queue bound, p50: library `create()` "
        f"{ms(statistics.median(run.idle))} ms (same `create()` undistributed "
        f"{ms(statistics.median(run.undistributed))} ms), kombu `producer.publish` "
        f"{ms(statistics.median(run.kombu_idle))} ms; envelope {run.size} bytes; "
        f"left behind by the apps and deleted here: {', '.join(run.leftovers) or 'nothing'}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="events of the throughput blocks in all")
    parser.add_argument("--samples", type=int, default=300, help="events of the latency blocks in all")
    parser.add_argument("--rounds", type=int, default=5, help="turns taken by library and baseline")
    parser.add_argument("--broker", action="append", help="broker URL (repeatable; default Redis + RabbitMQ)")
    args = parser.parse_args()
    brokers = args.broker or [REDIS_URL, *([AMQP_URL] if answers(AMQP_URL) else [])]

    load = os.getloadavg()[0]
    runs: list[BrokerRun] = []
    started = time.perf_counter()
    for url in brokers:
        if not answers(url):
            print(f"{url}: not answering, skipped")
            continue
        runs.append(run_broker(url, args.samples, args.events, args.rounds))
    elapsed = time.perf_counter() - started
    if not runs:
        raise SystemExit("no broker answered")

    console = Console(record=True, width=140)
    title = f"created -> proxy listener ({args.samples} one at a time, {args.events} back to back)"
    table = Table(title=title)
    for column in HEADER:
        table.add_column(column, justify="left" if column in ("broker", "path") else "right")
    for run in runs:
        for row in rows(run):
            table.add_row(*row)
    console.print(table)
    console.print(LEGEND)
    ratio_table = Table(title="library vs bare kombu (> 1: the library is slower)")
    for column in RATIO_HEADER:
        ratio_table.add_column(column)
    for run in runs:
        for row in ratios(run):
            ratio_table.add_row(*row)
    console.print(ratio_table)
    for run in runs:
        for line in notes(run):
            console.print(line)
    console.print(f"total {elapsed:.0f} s, load average {load:.1f} at start")

    out = ROOT / "benchmarks" / "results" / "events.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    defaults = (
        *(("--events", args.events, 2000), ("--samples", args.samples, 300)),
        ("--rounds", args.rounds, 5),
    )
    command = "".join(f" {flag} {value}" for flag, value, default in defaults if value != default)
    command += "".join(f" --broker {url}" for url in args.broker or ())
    lines = [
        "# Events: provider create() -> `created` on the proxies of consumer apps",
        "",
        f"Generated by `.venv/bin/python benchmarks/events.py{command}`.",
        "",
        f"- **date**: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
        f"- **machine**: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
        f"load average {load:.1f} at start (a shared machine: other benchmarks and tests may run)",
        f"- **brokers**: {', '.join(run.url for run in runs)} (registry: {REDIS_URL})",
        f"- **kombu**: {kombu.__version__}",
        f"- **events**: {WARMUP} warm-up; latency: {args.samples} events one at a time (the next once every "
        f"consumer got one); throughput: {args.events} events back to back; in {args.rounds} rounds where "
        f"library and baseline, both running, take turns (order alternating); everything in one process "
        f"({elapsed:.0f} s in all)",
        "- **latency**: `time.perf_counter()` in the data, taken just before the publishing call, read when "
        "the listener runs (library: the proxy's `created` listener on each consumer app; kombu: the "
        "consumer callback)",
        "- **library**: provider `App().use('articles', MemoryService())`, "
        "`distribute(..., remote_services=[])`, `create()` publishes; each consumer its own `App()` and "
        "`distribute(..., services=[])`, its own key and broadcast queue",
        "- **bare kombu**: `Producer` -> topic exchange -> one bound queue per consumer, a `Consumer` thread "
        "each (prefetch 100; on Redis without ack emulation, as the library's broadcast queues), message "
        "padded to the library's envelope size",
        "",
        f"| {' | '.join(HEADER)} |",
        f"|{'---|' * len(HEADER)}",
        *(f"| {' | '.join(row)} |" for run in runs for row in rows(run)),
        "",
        LEGEND + ".",
        "",
        "Library vs bare kombu (> 1: the library is slower; per round: min - max over the rounds):",
        "",
        f"| {' | '.join(RATIO_HEADER)} |",
        f"|{'---|' * len(RATIO_HEADER)}",
        *(f"| {' | '.join(row)} |" for run in runs for row in ratios(run)),
        "",
        *(f"- {line}" for run in runs for line in notes(run)),
        "",
    ]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
