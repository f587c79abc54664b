"""Discovery: turns the registry's live view into proxies mounted on the consumer app.

The registry's watcher calls :meth:`Discovery.on_view` with every change of the view (key → instance →
manifest); this module decides which remote services the app wants, mounts a proxy for each at its local
path, and unmounts the ones whose last provider instance withdrew or died.

Collisions: when several keys offer services that land on the same local path, the key registered earliest
wins: the one whose live instances offering that service include the earliest ``started_at`` (ties broken by
key name, then remote path). The rule reads the registry's view alone, so every consumer decides the same
whenever it started, and a proxy already mounted is replaced as soon as the view says another key now wins.
Seniority belongs to live instances: a key whose instances all restart takes the ``started_at`` of its new
ones and loses a contested path to an older rival (a rolling restart keeps it while one old instance lives);
while a key is absent from the registry its paths go to the next claimant, and come back to it when it
returns with its old instances. ``started_at`` is the provider host's clock: skewed clocks skew the order.
A pin (setting ``pins = {"articles": "my-app"}``) overrides the order: that local path is mounted only from
that key, every other key's claim to it is a collision, and while the pinned key offers nothing there
(absent, or filtered out by ``remote_services``) nothing else is mounted there either: a pin is a promise,
not a preference. The losers are logged as a warning once per change of the decision, and listed in
:attr:`Discovery.collisions`. A local service always wins over a proxy.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.errors import Conflict, Timeout
from ..core.service import SIGNATURES
from .manifest import View

if TYPE_CHECKING:
    from ..core.service import ServiceWrapper
    from .distribution import Distribution

__all__ = ["Discovery", "RemoteServiceInfo", "choose", "remote_services"]

log = logging.getLogger("celery_services.discovery")


@dataclass(frozen=True)
class RemoteServiceInfo:
    """A remote service as the registry describes it (what ``remote_services`` filters receive).

    Attributes:
        key: the provider app's key.
        path: the service's path on the provider.
        methods: the methods offered by at least one live instance.
        events: the events published by at least one live instance.
        options: the service options from the manifest.
        instances: the live instances offering it.
        started_at: the earliest ``started_at`` of those instances: its seniority in path collisions.
    """

    key: str
    path: str
    methods: tuple[str, ...]
    events: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict, compare=False)
    instances: tuple[str, ...] = field(default=(), compare=False)
    started_at: float = field(default=0.0, compare=False)


def remote_services(view: View) -> dict[tuple[str, str], RemoteServiceInfo]:
    """Merge the instances of each key: (key, path) → what its live instances offer together."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for key, instances in view.items():
        for instance, manifest in sorted(instances.items()):
            for service in manifest.services:
                entry = merged.setdefault(
                    (key, service.path),
                    {
                        "methods": {},
                        "events": {},
                        "options": dict(service.options),
                        "instances": [],
                        "started_at": manifest.started_at,
                    },
                )
                entry["methods"].update(dict.fromkeys(service.methods))
                entry["events"].update(dict.fromkeys(service.events))
                entry["instances"].append(instance)
                entry["started_at"] = min(entry["started_at"], manifest.started_at)
    return {
        (key, path): RemoteServiceInfo(
            key,
            path,
            tuple(e["methods"]),
            tuple(e["events"]),
            e["options"],
            tuple(e["instances"]),
            e["started_at"],
        )
        for (key, path), e in merged.items()
    }


def choose(infos: list[RemoteServiceInfo], pinned: str | None = None) -> RemoteServiceInfo | None:
    """The claimant a local path is mounted from, by the rule of the module docstring.

    Args:
        infos: the remote services claiming one local path.
        pinned: the key the path is pinned to, if any.

    Returns:
        The pinned key's service (``None`` when it is not among ``infos``), else the earliest registered.
    """
    if pinned is not None:
        return min((i for i in infos if i.key == pinned), key=lambda i: i.path, default=None)
    return min(infos, key=lambda i: (i.started_at, i.key, i.path), default=None)


class Discovery:
    """Keeps the app's proxies in step with the registry."""

    def __init__(self, distribution: Distribution) -> None:
        self.distribution = distribution
        #: local path → the remote service mounted there.
        self.mounted: dict[str, RemoteServiceInfo] = {}
        #: local path → keys whose service was refused there (a collision), sorted by key.
        self.collisions: dict[str, list[str]] = {}
        #: local path → the decision last logged there: (the key kept, or a reason nothing is), the refused.
        self._decisions: dict[str, tuple[str, list[str]]] = {}
        self._instances: set[str] | None = None
        self._changed = threading.Condition()
        #: local path → the proxy wrapper unmounted there, mounted again if the same service comes back.
        self._retired: dict[str, ServiceWrapper] = {}

    def on_view(self, view: View) -> None:
        """Mount, update and unmount proxies to match ``view`` (called on the registry's watcher thread)."""
        distribution = self.distribution
        settings = distribution.settings
        claims: dict[str, list[RemoteServiceInfo]] = {}
        for (key, path), info in sorted(remote_services(view).items()):
            if settings.consumes(key, path, info):
                claims.setdefault(settings.local_path(info, path).strip("/"), []).append(info)
        pins = {path.strip("/"): key for path, key in settings.pins.items()}
        wanted: dict[str, RemoteServiceInfo] = {}
        collisions: dict[str, list[str]] = {}
        decisions: dict[str, tuple[str, list[str]]] = {}
        for local, infos in claims.items():
            existing = distribution.app.services.get(local)
            if existing is not None and local not in self.mounted:  # the app's own: never replaced
                winner = None
                kept = "a proxy mounted by the app kept" if _is_proxy(existing) else "a local service kept"
            else:
                pinned = pins.get(local)
                winner = choose(infos, pinned)
                if winner is not None:
                    kept = f"{winner.key} kept ({'pinned' if pinned else 'registered first'})"
                else:
                    kept = f"nothing mounted (pinned to {pinned}, which offers nothing there)"
            if winner is not None:
                wanted[local] = winner
            losers = [info.key for info in infos if info is not winner]
            if losers:
                collisions[local] = losers
                decisions[local] = (kept, losers)
                if self._decisions.get(local) != decisions[local]:  # once per change, not per view
                    log.warning(
                        "service path collision at '%s': %s, %s refused", local, kept, ", ".join(losers)
                    )
        self.collisions, self._decisions = collisions, decisions
        for local, info in list(self.mounted.items()):
            now = wanted.get(local)
            if now is None or (now.key, now.path) != (info.key, info.path):
                self._unmount(local)
        for local, info in wanted.items():
            if local not in self.mounted:
                self._mount(local, info)
            else:
                was = self.mounted[local]
                if info != was or info.options != was.options:  # options are not compared (unhashable)
                    self._reoffer(local, info)
                self.mounted[local] = info  # same service; its live instances may differ
        instances = {instance for per_key in view.values() for instance in per_key}
        if self._instances is None or self._instances - instances:
            self._sweep()
        self._instances = instances
        with self._changed:
            self._changed.notify_all()

    def _sweep(self) -> None:
        # Some instance is gone (or this app just started): remove the event queues of dead consumers,
        # asking the registry afresh who is alive (see EventBus.sweep for why it is asked last).
        if self.distribution.forked:
            return
        registry = self.distribution.registry

        def live() -> set[str]:
            return {instance for per_key in registry.snapshot().values() for instance in per_key}

        try:
            self.distribution.events.sweep(live, all_keys=True)
        except Exception:
            log.warning("sweeping the event queues of dead consumers failed", exc_info=True)

    def _offered(self, info: RemoteServiceInfo) -> tuple[list[str], list[str]]:
        # As in feathers-distributed, the consumer's own lists say what it uses of what is offered.
        settings = self.distribution.settings
        methods = [m for m in info.methods if m in settings.distributed_methods]
        events = [e for e in info.events if e in settings.distributed_events]
        return methods, events

    def _offer(self, wrapper: ServiceWrapper, info: RemoteServiceInfo) -> None:
        methods, events = self._offered(info)
        wrapper.service._offer(methods, events, info.options)
        wrapper.custom_methods = tuple(m for m in methods if m not in SIGNATURES)

    def _reoffer(self, local: str, info: RemoteServiceInfo) -> None:
        # The same service offers other methods or events (a rolling deploy): changed in place, since an
        # unmount and a mount unbind its events then bind them again, losing those published in between.
        wrapper = self.distribution.app.services.get(local)
        if wrapper is None or not _is_proxy(wrapper):  # unmounted by the app's own hand: left so
            return
        before = tuple(wrapper.service.events)
        self._offer(wrapper, info)
        self.distribution._events_reoffered(wrapper, before)
        # Told to whoever listens to its events by the offer, as the gateway's event hub does.
        self.distribution.app.emit("service-changed", wrapper)
        log.info(
            "remote service %s/%s at '%s' now offers %s", info.key, info.path, local, wrapper.service.methods
        )

    def _mount(self, local: str, info: RemoteServiceInfo) -> None:
        app = self.distribution.app
        wrapper = self._retired.pop(local, None)
        try:
            if wrapper is not None and (wrapper.service.key, wrapper.service.path) == (info.key, info.path):
                # The provider is back: the handle user code holds works again, listeners and all.
                self._offer(wrapper, info)
                app.mount(wrapper)
            else:
                methods, events = self._offered(info)
                proxy = self.distribution.remote_service(info.key, info.path, methods, events, info.options)
                app.use(local, proxy)
        except Conflict:
            existing = app.services.get(local)
            log.warning(
                "service path collision at '%s': %s kept, %s refused",
                local,
                "a local service" if existing is not None and not _is_proxy(existing) else "another",
                info.key,
            )
            self.collisions.setdefault(local, []).append(info.key)
            return
        self.mounted[local] = info
        log.info("remote service %s/%s mounted at '%s'", info.key, info.path, local)

    def _unmount(self, local: str) -> None:
        info = self.mounted.pop(local)
        wrapper = self.distribution.app.services.get(local)
        if wrapper is None or not _is_proxy(wrapper):
            return
        self.distribution.app.unuse(local)
        self._retired[local] = wrapper
        log.info("remote service %s/%s removed from '%s'", info.key, info.path, local)

    def unmount_all(self) -> None:
        """Remove every proxy this discovery mounted (at finalize)."""
        for local in list(self.mounted):
            self._unmount(local)
        self._retired.clear()

    def wait_for(self, path: str, timeout: float) -> ServiceWrapper:
        """The service mounted at ``path`` once it is there; :class:`Timeout` after ``timeout`` seconds."""
        path = path.strip("/")
        app = self.distribution.app
        deadline = time.monotonic() + timeout
        with self._changed:
            while path not in app.services:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"Service '{path}' did not appear within {timeout}s", {"path": path})
                self._changed.wait(min(remaining, 0.5))
        return app.service(path)


def _is_proxy(wrapper: ServiceWrapper) -> bool:
    return bool(getattr(wrapper.service, "remote", False))
