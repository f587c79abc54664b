"""The floor of ``benchmarks/calls.py``: the least a Python round trip over the broker costs.

A loop that takes a request (``"{reply list} {id}"``) and ``LPUSH``es the item's JSON, prepared in advance, on
the reply list; the caller sends the request and ``BRPOP``s the reply. No envelope, no checks, no events:
what any call over this broker pays at least.

- Redis broker: the request is ``LPUSH``ed on the queue's list and taken with ``BRPOP``.
- RabbitMQ broker: the request is published on the queue (default exchange) and consumed with py-amqp
  (prefetch 1, acknowledged after the reply); the reply list is on the Redis of ``BENCH_REPLY_URL``, as the
  fast path's replies are. With ``BENCH_DURABLE=1`` the queue is declared durable, as Celery declares a
  task queue (``benchmarks/rabbitmq_floor.py``).

Configured by the environment::

    BENCH_BROKER_URL=redis://... BENCH_QUEUE=... BENCH_ITEMS='[{"id": 0, ...}]' python floor_worker.py
    BENCH_BROKER_URL=amqp://... BENCH_REPLY_URL=redis://... BENCH_QUEUE=... BENCH_ITEMS=... python ...
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import redis
from kombu.connection import Connection


def main() -> None:
    broker, queue = os.environ["BENCH_BROKER_URL"], os.environ["BENCH_QUEUE"]
    answers = {str(item["id"]).encode(): json.dumps(item) for item in json.loads(os.environ["BENCH_ITEMS"])}
    if not broker.startswith("amqp"):
        store = redis.Redis.from_url(broker, socket_timeout=None)
        print("floor worker ready.", flush=True)  # the line WorkerProcess waits for
        while True:
            popped = store.brpop([queue], timeout=0)
            if popped is None:
                continue
            reply, _, item = popped[1].partition(b" ")
            store.lpush(reply, answers[item])
    replies = redis.Redis.from_url(os.environ["BENCH_REPLY_URL"], socket_timeout=None)
    # kombu only parses the URL and connects: what is used is its py-amqp connection.
    connection = Connection(broker, connect_timeout=5).connection  # type: ignore[no-untyped-call]
    channel = connection.channel()
    channel.queue_declare(queue, durable=os.environ.get("BENCH_DURABLE") == "1", auto_delete=False)
    channel.basic_qos(0, 1, False)

    def on_message(message: Any) -> None:
        body = message.body if isinstance(message.body, bytes) else message.body.encode()
        reply, _, item = body.partition(b" ")
        replies.lpush(reply, answers[item])
        channel.basic_ack(message.delivery_tag)

    channel.basic_consume(queue, callback=on_message)
    print("floor worker ready.", flush=True)
    while True:
        connection.drain_events()


if __name__ == "__main__":
    sys.exit(main())
