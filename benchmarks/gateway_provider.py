"""The provider of ``benchmarks/gateway.py``: ``work.get(id)`` takes 50 ms (``await``-free: a blocking
sleep, as a database call would), ``work.find()`` answers at once. Configured by CELERY_SERVICES_*."""

from __future__ import annotations

import time
from typing import Any

from celery_services import App, distribute
from celery_services.distribution.settings import DistributionSettings

#: Seconds each ``get`` takes.
WORK_SECONDS = 0.05


class Work:
    def get(self, id: Any, params: dict[str, Any]) -> Any:
        time.sleep(WORK_SECONDS)
        return {"id": id}

    def find(self, params: dict[str, Any]) -> Any:
        return []


api = App()
api.use("work", Work())
distribution = distribute(api, DistributionSettings.load())
app = distribution.celery
