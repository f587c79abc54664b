"""Another team's plain Celery app sharing the Redis database, which the library must never disturb.

Late acks and Celery's defaults everywhere; ``work`` records each run in the Redis list ``FOREIGN_RUNS``.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

app = Celery("foreign", broker=os.environ["FOREIGN_BROKER"], set_as_current=False)
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, task_ignore_result=True)
_runs = redis.Redis.from_url(os.environ["FOREIGN_BROKER"])


@app.task(name="foreign.work")
def work(tag: str, seconds: float) -> None:
    _runs.rpush(os.environ["FOREIGN_RUNS"], f"start-{tag}")
    time.sleep(seconds)
    _runs.rpush(os.environ["FOREIGN_RUNS"], f"end-{tag}")
