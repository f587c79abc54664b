"""A provider whose worker runs in the app's own process, taking commands to mount services at run time.

Commands arrive on the Redis list ``TEST_COMMANDS_KEY`` (``add`` / ``remove``); the outcome of each is
pushed on ``TEST_COMMANDS_KEY:done`` (``added``, ``removed`` or ``refused: <message>``).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from celery import signals

from celery_services import App, Service, distribute
from celery_services.distribution.settings import DistributionSettings

COMMANDS = os.environ["TEST_COMMANDS_KEY"]
store = redis.Redis.from_url(os.environ["CELERY_SERVICES_RESULT_BACKEND"])


class Shouter(Service):
    def get(self, id: Any, params: dict[str, Any]) -> Any:
        return {"id": id}

    def shout(self, data: Any, params: dict[str, Any]) -> Any:
        self.emit("shouted", {"text": str(data).upper()})
        return str(data).upper()


def follow_commands() -> None:
    while True:
        _, command = store.blpop([COMMANDS])
        try:
            if command == b"add":
                api.use("custom", Shouter(), methods=["shout"], events=["shouted"])
                outcome = "added"
            elif command == b"remove":
                api.unuse("custom")
                outcome = "removed"
            else:
                return
        except Exception as exc:
            outcome = f"refused: {exc}"
        store.rpush(f"{COMMANDS}:done", outcome)


@signals.worker_ready.connect
def _ready(sender: Any = None, **_: Any) -> None:
    threading.Thread(target=follow_commands, daemon=True).start()


api = App()
distribution = distribute(api, DistributionSettings.load())
app = distribution.celery
