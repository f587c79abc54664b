"""The floor of ``benchmarks/calls.py``: the least a Python round trip over Redis lists costs.

A loop that ``BRPOP``s a request (``"{reply list} {id}"``) and ``LPUSH``es the item's JSON, prepared in
advance, on the reply list; the caller ``LPUSH``es the request and ``BRPOP``s the reply. No envelope, no
checks, no events: what any call over Redis lists pays at least. Configured by the environment::

    BENCH_BROKER_URL=redis://... BENCH_QUEUE=... BENCH_ITEMS='[{"id": 0, ...}]' python floor_worker.py
"""

from __future__ import annotations

import json
import os
import sys

import redis


def main() -> None:
    store = redis.Redis.from_url(os.environ["BENCH_BROKER_URL"], socket_timeout=None)
    queue = os.environ["BENCH_QUEUE"]
    answers = {str(item["id"]).encode(): json.dumps(item) for item in json.loads(os.environ["BENCH_ITEMS"])}
    print("floor worker ready.", flush=True)  # the line WorkerProcess waits for
    while True:
        popped = store.brpop([queue], timeout=0)
        if popped is None:
            continue
        reply, _, item = popped[1].partition(b" ")
        store.lpush(reply, answers[item])


if __name__ == "__main__":
    sys.exit(main())
