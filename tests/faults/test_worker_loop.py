"""The worker's event loop (kombu's hub) under the pattern that stalled calls on Celery's own consumer.

A solo worker runs a late-acknowledged call inside a callback of its loop, and Celery schedules the
acknowledgement with ``call_soon`` from the loop's own thread, which wakes nothing: kombu's hub then slept
for its next timer before running it. With prefetch 1 the broker sends the next call only once it has the
acknowledgement, so that call waited for the timer: about 2 s (a 50 ms no-op timer this project added
bounded it to 50 ms, still 15% of sequential calls on RabbitMQ with the fast path off, p99 50 ms).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from kombu.asynchronous import Hub

from celery_services import finalize
from celery_services.distribution.bootsteps import wake_while_ready

from ..support import amqp_provider, cleanup, fresh_prefix, make_caller


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    yield from fresh_prefix(redis_url, "loop")


@pytest.mark.timeout(30)
def test_a_callback_scheduled_during_a_loop_turn_runs_before_the_loop_sleeps() -> None:
    hub = Hub()
    wake_while_ready(hub)
    broker, worker_side = socket.socketpair()
    received: list[bytes] = []

    def acknowledge() -> None:
        broker.send(b"next call")  # the broker answers an acknowledgement with the next call

    def serve() -> None:  # runs the call, then schedules its acknowledgement, as Celery's solo pool does
        hub.call_soon(acknowledge)

    def on_readable() -> None:  # kombu's reader: what it read is handled in the loop's next turn
        received.append(worker_side.recv(16))
        if len(received) == 1:
            hub.call_soon(serve)

    try:
        hub.add_reader(worker_side, on_readable)
        hub.call_later(5.0, lambda: None)  # a timer: the loop sleeps until it (2 s at most)
        broker.send(b"call")
        loop = hub.create_loop()
        next(loop)  # the call arrives
        assert received == [b"call"]
        started = time.monotonic()
        while len(received) < 2 and time.monotonic() - started < 5:
            next(loop)  # the call is served and acknowledged, the next one arrives
        took = time.monotonic() - started
        assert received == [b"call", b"next call"]
        assert took < 1.0, f"the loop slept {took:.2f} s with the acknowledgement scheduled"
    finally:
        hub.close()
        broker.close()
        worker_side.close()


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_a_solo_worker_on_celerys_consumer_takes_each_next_call_at_once(
    redis_url: str, rabbitmq_url: str, prefix: str
) -> None:
    # The same through a real worker: `-P solo` with the fast path off, on RabbitMQ (prefetch 1, late
    # acknowledgement). Without the mend (and without the 50 ms timer it replaces), 2% to 18% of sequential
    # calls waited about 2 s.
    prov = amqp_provider("loop", rabbitmq_url, redis_url, prefix, CELERY_SERVICES_FAST_PATH="false")
    app, distribution = make_caller(prov, prefix)
    try:
        with prov.worker() as worker:
            assert "fast path serving queue" not in worker.log()
            probe = distribution.remote_service(prov.key, "probe", ["get"])
            took = []
            for n in range(300):
                started = time.monotonic()
                assert probe.get(n, {})["id"] == n
                took.append(time.monotonic() - started)
            slow = [f"{t:.2f}" for t in took if t > 1.0]
            assert not slow, f"calls that waited for the worker's loop: {slow} s"
    finally:
        finalize(app)
        cleanup(rabbitmq_url, redis_url, prov.key, prov.runs_key)
