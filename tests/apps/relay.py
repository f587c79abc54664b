"""A provider whose ``relay`` service calls the ``probe`` of the app ``TEST_RELAY_TARGET``, through the proxy
discovery mounts and through a proxy of its own: what a call it serves sees of the registry.

``relay.get(id)`` answers ``{"pid", "mounted", "direct"}``: its own pid, and for each call the pid of the
target that answered it, or the name of the error it raised (``NotFound``, ``Unavailable``, ``Timeout`` …).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from celery_services import App, Service, distribute
from celery_services.core.errors import ServiceError
from celery_services.distribution.settings import DistributionSettings

TARGET = os.environ["TEST_RELAY_TARGET"]
INNER = {"timeout": 3}


def outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()["pid"]
    except ServiceError as exc:
        return exc.name


class Relay(Service):
    def get(self, id: Any, params: dict[str, Any]) -> Any:
        direct = distribution.remote_service(TARGET, "probe", ["get"])
        return {
            "pid": os.getpid(),
            "mounted": outcome(lambda: api.service("probe").get(id, dict(INNER))),
            "direct": outcome(lambda: direct.get(id, dict(INNER))),
        }


if os.environ.get("TEST_SLOW_CHILD_SNAPSHOT"):
    # A registry slow to answer a pool child's first snapshot (a loaded machine, a large database): until it
    # answers, the child's calls must still know what its parent knew at the fork.
    import threading

    from celery_services.distribution.registry import Registry

    parent, snapshot = os.getpid(), Registry.snapshot

    def slow_in_a_child(self: Registry) -> Any:
        if os.getpid() != parent:
            threading.Event().wait(float(os.environ["TEST_SLOW_CHILD_SNAPSHOT"]))
        return snapshot(self)

    Registry.snapshot = slow_in_a_child  # type: ignore[method-assign]

api = App()
api.use("relay", Relay())
distribution = distribute(api, DistributionSettings.load(services=["relay"], remote_services=[TARGET]))
app = distribution.celery
