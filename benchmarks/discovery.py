"""Discovery benchmark: how fast a consumer sees providers come and go.

Prints (and saves to ``benchmarks/results/discovery.md``), measured in one run against one Redis:

- provider ``distribute()`` → proxy mounted on a running consumer (p50 / p99 over N runs), next to a bare
  Redis pub/sub round trip as the baseline;
- a SIGKILLed last replica → ``service-removed`` on the consumer, against the 3 x heartbeat bound;
- consumer start-up (``distribute()`` returning with every proxy mounted) with 200 keys x 5 services
  registered, next to the bare registry snapshot (SCAN + MGET) of the same entries.

Usage: ``python benchmarks/discovery.py [--runs 20] [--redis URL]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery_services import App, DistributionSettings, MemoryService, distribute, finalize  # noqa: E402
from celery_services.distribution.registry import Registry  # noqa: E402
from celery_services.testing import wait_for  # noqa: E402

HEARTBEAT = 1.0
# A provider process that distributes one service and waits to be killed (no worker needed to be seen).
PROVIDER = """
import sys, threading
from celery_services import App, DistributionSettings, MemoryService, distribute
app = App(); app.use("things", MemoryService())
distribute(app, DistributionSettings(key=sys.argv[1], broker_url=sys.argv[2], registry_prefix=sys.argv[3],
           heartbeat_interval=float(sys.argv[4]), remote_services=[]))
print("up", flush=True); threading.Event().wait()
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def settings(url: str, prefix: str, key: str, **extra: object) -> DistributionSettings:
    return DistributionSettings(
        key=key, broker_url=url, registry_prefix=prefix, heartbeat_interval=HEARTBEAT, **extra
    )


@contextmanager
def consumer(url: str, prefix: str) -> Iterator[tuple[App, threading.Condition, list[str]]]:
    app = App()
    seen: list[str] = []
    changed = threading.Condition()

    def note(kind: str) -> object:
        def listener(service: object) -> None:
            with changed:
                seen.append(f"{kind}:{getattr(service, 'path', '')}")
                changed.notify_all()

        return listener

    app.on("service", note("service"))
    app.on("service-removed", note("removed"))
    distribute(app, settings(url, prefix, f"consumer-{uuid.uuid4().hex[:6]}", services=[]))
    try:
        yield app, changed, seen
    finally:
        finalize(app)


def pubsub_baseline(url: str, runs: int) -> list[float]:
    client = redis.Redis.from_url(url)
    sub = client.pubsub()
    channel = f"bench-{uuid.uuid4().hex}"
    sub.subscribe(channel)
    sub.get_message(timeout=1)
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        client.publish(channel, "x")
        while sub.get_message(timeout=1) is None:
            pass
        out.append(time.perf_counter() - started)
    sub.close()
    client.close()
    return out


def mount_latency(url: str, prefix: str, runs: int) -> list[float]:
    out = []
    with consumer(url, prefix) as (_, changed, seen):
        for i in range(runs):
            provider = App()
            path = f"things{i}"
            provider.use(path, MemoryService())
            started = time.perf_counter()
            distribute(provider, settings(url, prefix, f"prov-{uuid.uuid4().hex[:6]}", remote_services=[]))
            with changed:
                if not changed.wait_for(lambda p=path: f"service:{p}" in seen, timeout=10):
                    raise TimeoutError(f"{path} never mounted")
            out.append(time.perf_counter() - started)
            finalize(provider)
    return out


def death_detection(url: str, prefix: str, runs: int) -> list[float]:
    out = []
    with consumer(url, prefix) as (app, changed, seen):
        for _ in range(runs):
            key = f"doomed-{uuid.uuid4().hex[:6]}"
            proc = subprocess.Popen(
                [sys.executable, "-c", PROVIDER, key, url, prefix, str(HEARTBEAT)],
                stdout=subprocess.PIPE,
                cwd=ROOT,
            )
            assert proc.stdout is not None
            proc.stdout.readline()
            wait_for(lambda: "things" in app.services, timeout=10, what="provider mounted")
            before = len([s for s in seen if s == "removed:things"])
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = time.perf_counter()
            with changed:
                changed.wait_for(lambda b=before: seen.count("removed:things") > b, timeout=30)
            out.append(time.perf_counter() - killed)
    return out


def startup(url: str, prefix: str, keys: int, services: int) -> tuple[float, float, int]:
    store = redis.Redis.from_url(url)
    with store.pipeline(transaction=False) as pipe:
        for k in range(keys):
            manifest = {
                "key": f"bulk{k}",
                "instance": "i1",
                "host": "bench",
                "pid": 1,
                "started_at": time.time(),
                "heartbeat": time.time(),
                "services": [
                    {"path": f"bulk{k}/svc{s}", "methods": ["get", "find"], "events": ["created"]}
                    for s in range(services)
                ],
            }
            pipe.set(f"{prefix}:manifest:bulk{k}:i1", json.dumps(manifest), ex=120)
        pipe.execute()
    registry = Registry(url, prefix=prefix)
    started = time.perf_counter()
    registry.snapshot()
    bare = time.perf_counter() - started
    registry.close()
    app = App()
    started = time.perf_counter()
    distribute(app, settings(url, prefix, "bulk-consumer", services=[]))
    full = time.perf_counter() - started
    mounted = len(app.services)
    finalize(app)
    return bare, full, mounted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--redis", default=os.environ.get("CELERY_SERVICES_TEST_REDIS", "redis://127.0.0.1:6379/9")
    )
    args = parser.parse_args()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    url = args.redis
    try:
        baseline = pubsub_baseline(url, args.runs)
        mounts = mount_latency(url, prefix, args.runs)
        deaths = death_detection(url, prefix, 3)
        bare, full, mounted = startup(url, prefix, 200, 5)
    finally:
        store = redis.Redis.from_url(url)
        for name in store.scan_iter(f"{prefix}:*"):
            store.delete(name)

    table = Table(title=f"Discovery on {url} (heartbeat {HEARTBEAT:g} s)")
    for column in ("measure", "p50", "p99", "baseline", "ratio"):
        table.add_column(column)
    ms = 1000.0
    rows = [
        (
            f"distribute() → proxy mounted ({args.runs} runs)",
            f"{statistics.median(mounts) * ms:.1f} ms",
            f"{percentile(mounts, 0.99) * ms:.1f} ms",
            f"pub/sub round trip {statistics.median(baseline) * ms:.2f} ms",
            f"{statistics.median(mounts) / statistics.median(baseline):.0f}x",
        ),
        (
            "SIGKILL of last replica → service-removed (3 runs)",
            f"{statistics.median(deaths) * ms:.0f} ms",
            f"{max(deaths) * ms:.0f} ms",
            f"bound 3 x heartbeat = {3 * HEARTBEAT * ms:.0f} ms",
            f"{statistics.median(deaths) / (3 * HEARTBEAT):.2f}",
        ),
        (
            f"consumer start-up, 200 x 5 services ({mounted} proxies)",
            f"{full * ms:.0f} ms",
            "",
            f"registry snapshot alone {bare * ms:.1f} ms",
            f"{full / bare:.0f}x",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    console = Console(record=True)
    console.print(table)
    out = ROOT / "benchmarks" / "results" / "discovery.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Discovery benchmark ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})",
        "",
        "| measure | p50 | p99 | baseline | ratio |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
    ]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
