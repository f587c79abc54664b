"""EventBus throughput and latency on the brokers that answer; prints a Markdown table.

Usage: ``python benchmarks/events_bus.py [N]`` (default 2,000 events per broker). Redis: 127.0.0.1:6379
db 9; RabbitMQ: 127.0.0.1:5672 guest/guest (skipped when not answering). Queues and exchanges are removed.
"""

from __future__ import annotations

import socket
import statistics
import sys
import threading
import time
import uuid

from celery_services.distribution.events import EventBus, EventEnvelope

BROKERS = {
    "redis": ("127.0.0.1", 6379, "redis://127.0.0.1:6379/9"),
    "rabbitmq": ("127.0.0.1", 5672, "amqp://guest:guest@127.0.0.1:5672//"),
}


def answers(host: str, port: int) -> bool:
    """Whether something listens on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def run(url: str, count: int) -> dict[str, float]:
    """Publish ``count`` events (timed), then ``count // 4`` one at a time for the end-to-end latency."""
    name = f"bench.{uuid.uuid4().hex[:8]}"
    latencies: list[float] = []
    arrived = threading.Condition()
    received = [0]

    def on_event(envelope: EventEnvelope) -> None:
        if isinstance(envelope.data, float):
            latencies.append(time.perf_counter() - envelope.data)
        with arrived:
            received[0] += 1
            arrived.notify_all()

    publisher = EventBus(url, exchange=name, queue_prefix=name)
    consumer = EventBus(url, exchange=name, queue_prefix=name, consumer_key="bench", on_event=on_event)
    try:
        consumer.bind("app", "articles", "created")
        consumer.start()
        publisher.publish("app", "articles", "created", "warm-up")
        started = time.perf_counter()
        for i in range(count):
            publisher.publish("app", "articles", "created", i)
        publish_s = time.perf_counter() - started
        with arrived:
            arrived.wait_for(lambda: received[0] >= count + 1, timeout=120)
        drain_s = time.perf_counter() - started
        for _ in range(count // 4):
            target = received[0] + 1
            publisher.publish("app", "articles", "created", time.perf_counter())
            with arrived:
                arrived.wait_for(lambda target=target: received[0] >= target, timeout=10)  # type: ignore[misc]
        quantiles = statistics.quantiles(latencies, n=100)
        return {
            "publish/s": count / publish_s,
            "delivered/s": count / drain_s,
            "p50 ms": quantiles[49] * 1000,
            "p99 ms": quantiles[98] * 1000,
        }
    finally:
        consumer.close()
        publisher.close()
        if url.startswith("redis"):
            import redis

            client = redis.Redis.from_url(url)
            keys = [*client.keys(f"{name}*"), *client.keys(f"_kombu.binding*.{name}")]
            if keys:
                client.delete(*keys)
        else:
            from kombu.connection import Connection

            with Connection(url) as conn:  # type: ignore[no-untyped-call]
                conn.channel().exchange_delete(name)


def main() -> None:
    """Run every answering broker and print the table."""
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(
        "| broker | events | publish/s | delivered/s | latency p50 ms | p99 ms |\n|---|---|---|---|---|---|"
    )
    for label, (host, port, url) in BROKERS.items():
        if not answers(host, port):
            print(f"| {label} | not answering | | | | |")
            continue
        r = run(url, count)
        print(
            f"| {label} | {count} | {r['publish/s']:.0f} | {r['delivered/s']:.0f} "
            f"| {r['p50 ms']:.2f} | {r['p99 ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
