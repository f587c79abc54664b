"""The provider of the soak run: a ``ledger`` service whose every execution appends its call id to a ledger.

Configured by ``CELERY_SERVICES_*`` variables; ``SOAK_LEDGER`` is the Redis (not the broker: the broker is
restarted during the run) holding the list ``soak:ledger``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from celery_services import App, distribute

_ledger = redis.Redis.from_url(os.environ["SOAK_LEDGER"], socket_timeout=5, socket_connect_timeout=2)


class Ledger:
    """Mixed methods, each one recorded; ``data["sleep"]`` keeps a call in flight for a while."""

    def _run(self, params: dict[str, Any], sleep: float = 0.0) -> dict[str, Any]:
        call_id = params.get("call_id")
        _ledger.rpush("soak:ledger", f"{call_id}:{int(bool(params.get('redelivered')))}")
        if sleep:
            time.sleep(sleep)
        return {"call_id": call_id, "pid": os.getpid()}

    def get(self, id: Any, params: dict[str, Any]) -> Any:
        return self._run(params)

    def find(self, params: dict[str, Any]) -> Any:
        return [self._run(params)]

    def create(self, data: Any, params: dict[str, Any]) -> Any:
        return self._run(params, float(data.get("sleep", 0)))

    def patch(self, id: Any, data: Any, params: dict[str, Any]) -> Any:
        return self._run(params, float(data.get("sleep", 0)))


api = App()
api.use("ledger", Ledger())
distribution = distribute(api, publish_events=False)
app = distribution.celery
