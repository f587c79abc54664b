"""A provider whose services are ``async def``, for tests/test_async*.py (configured by CELERY_SERVICES_*).

Services:
- ``notes``: every standard method and the custom method ``pin`` (custom event ``pinned``) are ``async def``,
  with ``async def`` hooks (a before hook stamps ``params["stamped"]``, an after hook adds ``"seen"``);
  ``get("missing")`` raises ``NotFound``, ``get("bug")`` a bug;
- ``clock``: ``nap`` awaits ``asyncio.sleep(seconds)`` and records in ``TEST_RUNS_KEY`` how it ended
  (``nap-done`` / ``nap-cancelled``: the deadline cancels it); ``where`` reports the serving thread's loop;
  ``nested`` awaits the ``probe`` of ``data["key"]`` and ``where`` of its own key through proxies.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import redis

from celery_services import App, HookContext, MemoryService, NotFound, Service, distribute
from celery_services.distribution.caller import current_deadline
from celery_services.distribution.settings import DistributionSettings

RUNS_KEY = os.environ.get("TEST_RUNS_KEY", "")
_store = redis.Redis.from_url(os.environ.get("TEST_REPLY_STORE", "redis://127.0.0.1:6379/9"))


def record(what: str) -> None:
    if RUNS_KEY:
        _store.rpush(RUNS_KEY, what)


class Notes(Service):
    """An async service over a MemoryService (what a service on an async database driver looks like)."""

    def __init__(self) -> None:
        self.memory = MemoryService()

    async def find(self, params: dict[str, Any]) -> Any:
        await asyncio.sleep(0)
        return self.memory.find(params)

    async def get(self, id: Any, params: dict[str, Any]) -> Any:
        await asyncio.sleep(0)
        if id == "missing":
            raise NotFound(f"No record found for id '{id}'", {"id": id})
        if id == "bug":
            raise KeyError("secret-internal-detail")
        return {**self.memory.get(id, params), "stamped": params.get("stamped")}

    async def create(self, data: Any, params: dict[str, Any]) -> Any:
        return self.memory.create(data, params)

    async def update(self, id: Any, data: Any, params: dict[str, Any]) -> Any:
        return self.memory.update(id, data, params)

    async def patch(self, id: Any, data: Any, params: dict[str, Any]) -> Any:
        return self.memory.patch(id, data, params)

    async def remove(self, id: Any, params: dict[str, Any]) -> Any:
        return self.memory.remove(id, params)

    async def pin(self, data: Any, params: dict[str, Any]) -> Any:
        note = self.memory.patch(data["id"], {"pinned": True}, params)
        self.emit("pinned", note)
        return note


class Clock(Service):
    async def nap(self, data: Any, params: dict[str, Any]) -> Any:
        try:
            await asyncio.sleep(float(data["seconds"]))
        except asyncio.CancelledError:
            record(f"nap-cancelled-{data['tag']}")
            raise
        record(f"nap-done-{data['tag']}")
        return {"tag": data["tag"], "deadline": current_deadline()}

    async def where(self, data: Any, params: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        return {"thread": threading.get_ident(), "loop": id(loop), "pid": os.getpid()}

    async def nested(self, data: Any, params: dict[str, Any]) -> Any:
        assert api.distribution is not None
        other = api.distribution.remote_service(data["key"], "probe", ["get"])
        mine = api.distribution.remote_service(api.distribution.key, "clock", ["where"])
        inner, own = await asyncio.gather(other.call_async("get", id=1), mine.call_async("where", data={}))
        return {
            "outer_deadline": current_deadline(),
            "inner": inner,
            "self": own,
            "thread": threading.get_ident(),
        }


async def _stamp(context: HookContext) -> None:
    await asyncio.sleep(0)
    context.params["stamped"] = True


async def _seen(context: HookContext) -> HookContext:
    if context.method == "get" and isinstance(context.result, dict):
        context.result = {**context.result, "seen": True}
    return context


settings = DistributionSettings.load()
api = App()
api.use("notes", Notes(), methods=["pin"], events=["pinned"])
api.use("clock", Clock(), methods=["nap", "where", "nested"])
api.service("notes").hooks({"before": {"all": [_stamp]}, "after": {"get": [_seen]}})
distribution = distribute(api, settings)
app = distribution.celery
