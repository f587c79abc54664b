"""The raw-Celery baseline of ``benchmarks/calls.py``: a plain task equivalent to ``articles.get``.

Run by its own worker, configured by the environment (``calls.py`` sets it)::

    BENCH_BROKER_URL=... BENCH_RESULT_BACKEND=... BENCH_TASK_NAME=... BENCH_ITEMS='[{"id": 0, ...}]' \
        celery -A plain_tasks worker -P solo -Q <queue>

Default Celery settings, except JSON serialization and the broker and result backend given.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from celery import Celery

#: The name ``calls.py`` sends the calls to (unique per run).
TASK_NAME = os.environ.get("BENCH_TASK_NAME", "bench_plain.articles.get")

app = Celery(
    "bench_plain",
    broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/9"),
    backend=os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/9"),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
)

#: The same items the proxy's provider serves, id -> item.
ITEMS: dict[Any, dict[str, Any]] = {
    item["id"]: item for item in json.loads(os.environ.get("BENCH_ITEMS", "[]"))
}


@app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]
def get(id: Any) -> dict[str, Any]:
    """The item ``id`` (a copy, as a MemoryService hands out)."""
    return copy.deepcopy(ITEMS[id])
