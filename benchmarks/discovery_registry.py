"""Registry costs: snapshot time by registry size, announcement-to-callback latency, death detection time.

Usage: ``python benchmarks/discovery_registry.py [--url redis://127.0.0.1:6379/9] [--sizes 100,1000]``.
Writes under a unique prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

import redis

from celery_services.distribution.manifest import Manifest, ServiceManifest, View
from celery_services.distribution.registry import Registry


def _manifest(key: str, services: int = 5) -> Manifest:
    paths = [ServiceManifest(path="service-0", methods=["find", "get", "create"], events=["created"])]
    paths += [ServiceManifest(path=f"service-{n}", methods=["find"], events=[]) for n in range(1, services)]
    return Manifest.local(key, paths, instance="i1")


def _snapshot_ms(registry: Registry, size: int) -> float:
    for n in range(size):
        registry.publish(_manifest(f"app-{n}"))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        assert len(registry.snapshot()) >= size
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _change_ms(provider: Registry, consumer: Registry, rounds: int = 50) -> float:
    changed = threading.Event()
    target: dict[str, int] = {"services": 0}

    def on_change(view: View) -> None:
        m = view.get("bench-change", {}).get("i1")
        if m is not None and len(m.services) == target["services"]:
            changed.set()

    consumer.watch(on_change)
    consumer.wait_synced(10)
    times = []
    for n in range(rounds):
        target["services"] = 1 + n % 4
        changed.clear()
        start = time.perf_counter()
        provider.publish(_manifest("bench-change", target["services"]), changed=True)
        if not changed.wait(5):
            raise RuntimeError("the watcher missed a change")
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _death_s(url: str, prefix: str, heartbeat: float) -> float:
    gone = threading.Event()
    seen = threading.Event()

    def on_change(view: View) -> None:
        if "bench-death" in view:
            seen.set()
        elif seen.is_set():
            gone.set()

    with Registry(url, prefix=prefix, heartbeat_interval=heartbeat, rescan_interval=60) as consumer:
        provider = Registry(url, prefix=prefix, heartbeat_interval=heartbeat)
        manifest = _manifest("bench-death")
        consumer.watch(on_change)
        provider.start_heartbeat(lambda: manifest)
        if not seen.wait(5):
            raise RuntimeError("the watcher never saw the provider")
        provider.close()
        start = time.perf_counter()
        if not gone.wait(10 * heartbeat + 5):
            raise RuntimeError("the watcher never saw the death")
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--sizes", default="100,1000")
    args = parser.parse_args()
    prefix = f"bench-registry-{uuid.uuid4().hex[:8]}"
    try:
        print("| measure | value |\n|---|---|")
        for size in (int(s) for s in args.sizes.split(",")):
            with Registry(args.url, prefix=f"{prefix}-{size}", heartbeat_interval=60) as registry:
                print(f"| snapshot, {size} instances x 5 services | {_snapshot_ms(registry, size):.1f} ms |")
        with Registry(args.url, prefix=prefix) as provider, Registry(args.url, prefix=prefix) as consumer:
            print(f"| publish(changed) -> on_change, median | {_change_ms(provider, consumer):.2f} ms |")
        for heartbeat in (0.2, 1.0):
            took = _death_s(args.url, prefix, heartbeat)
            print(f"| death seen after the last heartbeat, heartbeat {heartbeat} s | {took:.2f} s |")
    finally:
        client = redis.Redis.from_url(args.url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


if __name__ == "__main__":
    main()
