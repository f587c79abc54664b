"""A provider app for integration tests, configured by CELERY_SERVICES_* variables.

Services:
- ``articles``: the example MemoryService (``publish_article``, ``article_published``);
- ``probe``: reports what the provider saw (params, deadline, pid) and records every run in the Redis list
  ``TEST_RUNS_KEY`` so a test can assert that a call never ran (``get("events")``: its event bus's counts);
  ``slow`` sleeps; ``boom`` fails; ``grow`` returns a string of the size asked;
  ``nested`` calls the ``probe`` of ``TEST_NESTED_KEY`` (another app) and of its own key.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from celery_services import App, BadRequest, NotFound, Service, distribute
from celery_services.distribution.caller import current_deadline
from celery_services.distribution.settings import DistributionSettings
from workers.services import Articles

RUNS_KEY = os.environ.get("TEST_RUNS_KEY", "")
_store = redis.Redis.from_url(os.environ.get("TEST_REPLY_STORE", "redis://127.0.0.1:6379/9"))


def record(what: str) -> None:
    if RUNS_KEY:
        _store.rpush(RUNS_KEY, f"{what}:{os.getpid()}")


class Probe(Service):
    def get(self, id: Any, params: dict[str, Any]) -> Any:
        if id == "events":  # what this process's event bus did with the events it was given
            assert api.distribution is not None
            bus = api.distribution.events
            return {"published": bus.published, "unheard": bus.unheard}
        record(f"get-{id}")
        return {"id": id, "params": params, "deadline": current_deadline(), "pid": os.getpid()}

    def find(self, params: dict[str, Any]) -> Any:
        record("find")
        return [{"pid": os.getpid()}]

    def slow(self, data: Any, params: dict[str, Any]) -> Any:
        deadline, now = current_deadline(), time.time()
        if deadline is not None and deadline < now:
            # The library refuses a call whose deadline has passed before it starts; a loaded machine may
            # still cross the deadline between that check and this line: how late, for the test to judge.
            record(f"late-start-{data['tag']}+{now - deadline:.3f}s")
        record(f"slow-start-{data['tag']}")
        time.sleep(float(data["seconds"]))
        record(f"slow-end-{data['tag']}")
        return {
            "tag": data["tag"],
            "pid": os.getpid(),
            "call_id": params.get("call_id"),
            "redelivered": params.get("redelivered"),
        }

    def grow(self, data: Any, params: dict[str, Any]) -> Any:
        return "x" * int(data["size"])

    def boom(self, data: Any, params: dict[str, Any]) -> Any:
        if data == "notfound":
            raise NotFound("No record found for id 'x'", {"id": "x"})
        if data == "unencodable":  # a validator's exception per field, as validation errors often hold
            raise BadRequest("Invalid user", {"errors": {"email": ValueError("not an e-mail")}})
        raise KeyError("secret-internal-detail")

    def nested(self, data: Any, params: dict[str, Any]) -> Any:
        assert api.distribution is not None
        other = api.distribution.remote_service(data["key"], "probe", ["get"])
        mine = api.distribution.remote_service(api.distribution.key, "probe", ["get"])
        return {
            "outer_deadline": current_deadline(),
            "inner": other.get(1, {}),
            "self": mine.get(2, {}),
            "pid": os.getpid(),
        }


settings = DistributionSettings.load()
api = App()
api.use("articles", Articles(), methods=["publish_article"], events=["article_published"])
api.use("probe", Probe(), methods=["slow", "boom", "nested", "grow"])
# An authentication-like hook: what it puts on params must never leave in an event's context.
api.service("articles").hooks(
    {"before": {"all": lambda ctx: ctx.params.update(user={"email": "a@b", "password": "hash"}) and None}}
)
api.service("probe").hooks({"before": {"get": lambda ctx: ctx.params.setdefault("hooked", True) and None}})
distribution = distribute(api, settings)
app = distribution.celery
if os.environ.get("TEST_SIGNALS"):
    from celery import signals

    def signalled(name: str, sender: Any, task_id: Any, extra: str) -> None:
        # What a receiver of Celery's task signals sees, and whether the task's request is the call's (as
        # Django's fixup reads it): tests/faults/test_fastpath.py compares the fast path with the consumer.
        pushed = "request" if getattr(sender.request, "id", None) == task_id else "no-request"
        record(f"signal-{name}|{sender.name}|{task_id}|{extra}|{pushed}")

    def on_prerun(sender: Any, task_id: Any, **_: Any) -> None:
        signalled("prerun", sender, task_id, "")

    def on_success(sender: Any, result: Any, **_: Any) -> None:
        signalled("success", sender, sender.request.id, type(result).__name__)

    def on_failure(sender: Any, task_id: Any, exception: Any, einfo: Any, **_: Any) -> None:
        traced = "traceback" if type(exception).__name__ in einfo.traceback else "no-traceback"
        signalled("failure", sender, task_id, f"{type(exception).__name__} {traced}")

    def on_postrun(sender: Any, task_id: Any, state: Any, **_: Any) -> None:
        signalled("postrun", sender, task_id, str(state))

    signals.task_prerun.connect(on_prerun, weak=False)
    signals.task_success.connect(on_success, weak=False)
    signals.task_failure.connect(on_failure, weak=False)
    signals.task_postrun.connect(on_postrun, weak=False)
if keyprefix := os.environ.get("TEST_GLOBAL_KEYPREFIX"):  # kombu's keys and channels under it
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "global_keyprefix": keyprefix}
if exchange := os.environ.get("TEST_EVENT_EXCHANGE"):
    app.conf.event_exchange = exchange  # the worker's events go there (tests/faults/test_event_exchange.py)
