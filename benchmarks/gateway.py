"""The gateway under 500 concurrent HTTP clients calling a remote method that takes 50 ms, awaited against
parked in threads; and the async proxy against the blocking one.

Usage: ``python benchmarks/gateway.py [--redis URL] [--clients 500] [--seconds 10] [--provider-threads 128]
[--output FILE]``.

Measured in one run, against one provider (``benchmarks/gateway_provider.py``: ``work.get(id)`` sleeps 50 ms,
served by ``celery worker -P threads -c N`` on the fast path, so N calls at once):

- the provider's capacity: ``await work.aio.get(i)`` from this process, as many in flight as there are
  HTTP clients, no HTTP (what the provider serves when nothing else limits it);
- the async gateway (``asgi_app(api)``, calls awaited) and the executor gateway (the gateway before #13,
  kept here only: every call runs ``wrapper.call`` in one of its 64 threads), each in a process of its own
  serving ``GET /work/{id}`` to ``--clients`` keep-alive HTTP/1.1 clients for ``--seconds``, after 2 s of
  warm-up: calls/s, p50 / p99, its RSS at the start and end of the window and its threads;
- the proxies: ``work.find()`` (answered at once) one call in flight (p50), then 8 callers at once
  (8 threads blocking, 8 tasks awaiting) for calls/s.

Everything runs on one Redis (db 8 of 127.0.0.1:6379 by default) under a registry prefix of the run's own;
its keys, the provider's queue and the event bindings are deleted at the end, even on error. Nothing here
asserts a time: it is a benchmark. Writes the tables to ``benchmarks/results/gateway.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import redis
from rich.console import Console
from rich.table import Table

from celery_services import App, DistributionSettings, distribute, finalize
from celery_services.testing import WorkerProcess, wait_for

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results" / "gateway.md"
WARMUP = 2.0
EXECUTOR_THREADS = 64  # the gateway's default before #13


# -- the gateway, in a process of its own (``--serve async|executor``) ---------------------------------------


def serve(mode: str, port: int) -> None:
    """Serve the gateway of ``mode`` on ``port`` until SIGTERM (the settings come from the environment)."""
    from celery_services.http import gateway as gateway_module

    if mode == "executor":
        # The gateway before #13: each call parked in one of the gateway's threads for its whole duration.
        async def invoke(self: Any, wrapper: Any, method: str, id: Any, data: Any, params: Any) -> Any:
            return await self.in_thread(lambda: wrapper.call(method, id=id, data=data, params=params))

        gateway_module._Gateway.invoke = invoke  # type: ignore[method-assign]
    api = App()
    distribution = distribute(api, DistributionSettings.load())
    distribution.wait_for("work", timeout=20)
    server = gateway_module.make_server(api, port=port, log_level="warning", threads=EXECUTOR_THREADS)
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        finalize(api)


# -- load ------------------------------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def http_load(port: int, clients: int, seconds: float) -> tuple[int, list[float]]:
    """``clients`` keep-alive connections, each sending ``GET /work/{n}`` again as soon as it is answered;
    the answers of the window after the warm-up are counted."""
    loop = asyncio.get_running_loop()
    start = loop.time() + WARMUP
    end = start + seconds
    latencies: list[float] = []
    failures = 0

    async def client(n: int) -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = f"GET /work/{n} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode()
        try:
            while loop.time() < end:
                sent = loop.time()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                done = loop.time()
                if not head.startswith(b"HTTP/1.1 200"):
                    failures += 1
                elif start <= done <= end:
                    latencies.append(done - sent)
        finally:
            writer.close()

    await asyncio.gather(*(client(n) for n in range(clients)))
    if failures:
        print(f"  {failures} answers were not 200")
    return len(latencies), latencies


class Sampler:
    """RSS and threads of a process, every 0.25 s."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            with self.process.oneshot():
                self.samples.append(
                    (time.monotonic(), self.process.memory_info().rss, self.process.num_threads())
                )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure_gateway(mode: str, env: dict[str, str], clients: int, seconds: float) -> dict[str, Any]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, "--port", str(port)],
        env={**os.environ, **env},
        cwd=ROOT,
    )
    try:
        wait_for(lambda: port_open(port), 30, 0.1, f"the {mode} gateway listening")
        sampler = Sampler(process.pid)
        begun = time.monotonic()
        count, latencies = asyncio.run(http_load(port, clients, seconds))
        sampler.stop()
        window = [s for s in sampler.samples if s[0] >= begun + WARMUP]
        return {
            "calls/s": count / seconds,
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "rss start": window[0][1] if window else 0,
            "rss end": window[-1][1] if window else 0,
            "threads": max((s[2] for s in window), default=0),
        }
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


async def direct_load(work: Any, clients: int, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time() + WARMUP
    end = start + seconds
    counted = 0

    async def client(n: int) -> None:
        nonlocal counted
        while loop.time() < end:
            await work.aio.get(n)
            if loop.time() >= start:
                counted += 1

    await asyncio.gather(*(client(n) for n in range(clients)))
    return counted / seconds


def proxies(work: Any, calls: int = 300, seconds: float = 3.0) -> list[list[str]]:
    """p50 with one call in flight, and calls/s with 8 callers, of the blocking and the async proxy."""

    def timed(call: Callable[[], Any]) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    blocking_p50 = statistics.median(timed(work.find) for _ in range(calls))

    async def async_p50() -> float:
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            await work.aio.find()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    def blocking_rate() -> float:
        end = time.monotonic() + seconds
        counts = [0] * 8

        def caller(n: int) -> None:
            while time.monotonic() < end:
                work.find()
                counts[n] += 1

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(caller, range(8)))
        return sum(counts) / seconds

    async def async_rate() -> float:
        end = time.monotonic() + seconds
        count = 0

        async def caller() -> None:
            nonlocal count
            while time.monotonic() < end:
                await work.aio.find()
                count += 1

        await asyncio.gather(*(caller() for _ in range(8)))
        return count / seconds

    rows = [["blocking proxy (threads)", blocking_p50, blocking_rate()]]
    rows.append(["async proxy (tasks)", asyncio.run(async_p50()), asyncio.run(async_rate())])
    base_p50, base_rate = rows[0][1], rows[0][2]
    return [
        [name, f"{p50 * 1000:.2f} ms", f"{p50 / base_p50:.2f}", f"{rate:,.0f}", f"{rate / base_rate:.2f}"]
        for name, p50, rate in rows
    ]


# -- plumbing ------------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def cleanup(url: str, prefix: str, key: str) -> None:
    """Delete the run's registry keys, the provider's queue, and the event bindings of the run's queues."""
    store = redis.Redis.from_url(url)
    for name in store.scan_iter(f"{prefix}*", count=1000):
        store.delete(name)
    store.delete(key, f"_kombu.binding.{key}", f"_kombu.binding_permanent.{key}")
    for table in store.scan_iter("_kombu.binding*.celery_services.events"):
        if stale := [m for m in store.smembers(table) if f"{prefix}.events.".encode() in m]:
            store.srem(table, *stale)
    store.close()


def table(title: str, head: list[str], cells: list[list[str]]) -> Table:
    rich = Table(title=title)
    for name in head:
        rich.add_column(name, justify="left" if name in ("path", "proxy") else "right")
    for row in cells:
        rich.add_row(*row)
    return rich


def markdown(head: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def run(args: argparse.Namespace) -> str:
    prefix = f"cs-bench-gw-{uuid.uuid4().hex[:8]}"
    key = f"bench-gw-{uuid.uuid4().hex[:6]}"
    common = {
        "CELERY_SERVICES_BROKER_URL": args.redis,
        "CELERY_SERVICES_REGISTRY_PREFIX": prefix,
        "CELERY_SERVICES_TIMEOUT": "30",
        "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), str(ROOT)]),
    }
    provider_env = {**common, "CELERY_SERVICES_KEY": key, "CELERY_SERVICES_SERVICES": '["work"]'}
    gateway_env = {
        **common,
        "CELERY_SERVICES_KEY": f"gw-{uuid.uuid4().hex[:6]}",
        "CELERY_SERVICES_SERVICES": "[]",
        "CELERY_SERVICES_REMOTE_SERVICES": f'["{key}"]',
    }
    worker = WorkerProcess(
        "gateway_provider", key, env=provider_env, pool="threads", concurrency=args.provider_threads
    )
    api = App()
    try:
        worker.start()
        settings = DistributionSettings(
            key=f"bench-{uuid.uuid4().hex[:6]}",
            broker_url=args.redis,
            registry_prefix=prefix,
            services=[],
            remote_services=[key],
            timeout=30,
        )
        distribution = distribute(api, settings)
        work = distribution.wait_for("work", timeout=20)
        print(f"provider ready: {args.provider_threads} threads; measuring its capacity")
        capacity = asyncio.run(direct_load(work, args.clients, args.seconds))
        results = {}
        for mode in ("async", "executor"):
            print(f"{mode} gateway: {args.clients} clients for {args.seconds:.0f} s")
            results[mode] = measure_gateway(mode, gateway_env, args.clients, args.seconds)
        print("proxies")
        proxy_rows = proxies(work)
    finally:
        finalize(api)
        worker.stop()
        cleanup(args.redis, prefix, key)

    ceiling = args.provider_threads / 0.05
    head = ["path", "calls/s", "x provider", "p50", "p99", "RSS start", "RSS end", "RSS Δ", "threads"]
    cells = [["provider, awaited directly (no HTTP)", f"{capacity:,.0f}", "1.00", "", "", "", "", "", ""]]
    for mode, label in (
        ("async", "async gateway (#13)"),
        ("executor", f"executor gateway ({EXECUTOR_THREADS} threads)"),
    ):
        r = results[mode]
        cells.append(
            [
                label,
                f"{r['calls/s']:,.0f}",
                f"{r['calls/s'] / capacity:.2f}",
                f"{r['p50'] * 1000:.0f} ms",
                f"{r['p99'] * 1000:.0f} ms",
                f"{r['rss start'] / 2**20:.0f} MiB",
                f"{r['rss end'] / 2**20:.0f} MiB",
                f"{(r['rss end'] - r['rss start']) / 2**20:+.1f} MiB",
                str(r["threads"]),
            ]
        )
    proxy_head = ["proxy", "p50 (1 in flight)", "x blocking", "calls/s (8 callers)", "x blocking"]
    about = {
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
        "provider": f"`celery worker -P threads -c {args.provider_threads}` (fast path), `work.get` sleeps "
        f"50 ms: at most {ceiling:,.0f} calls/s",
        "load": f"{args.clients} keep-alive HTTP/1.1 clients, {args.seconds:.0f} s after {WARMUP:.0f} s "
        "of warm-up",
        "broker": "Redis (broker, replies and registry on one database)",
    }
    console = Console(width=max(Console().width, 150))
    console.print(table(f"GET /work/{{id}} (50 ms remote), {args.clients} clients", head, cells))
    console.print(table("work.find(): the async proxy against the blocking one", proxy_head, proxy_rows))
    for name, value in about.items():
        console.print(f"[bold]{name}[/bold]: {value}")
    return "\n".join(
        [
            "# Gateway: awaited calls against calls parked in threads",
            "",
            "Generated by `.venv/bin/python benchmarks/gateway.py`.",
            "",
            *(f"- **{name}**: {value}" for name, value in about.items()),
            "",
            markdown(head, cells),
            "",
            "The async proxy against the blocking one (`work.find()`, answered at once):",
            "",
            markdown(proxy_head, proxy_rows),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/8")
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--provider-threads", type=int, default=128)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--serve", choices=["async", "executor"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    text = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"written to {args.output.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
