"""The app: services mounted at paths, app-level hooks and events."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .emitter import EventEmitter
from .errors import Conflict, NotFound
from .hooks import Hooks, HookSpec
from .service import Publisher, ServiceWrapper

if TYPE_CHECKING:
    from ..distribution import Distribution

__all__ = ["App", "normalize_path"]

_PATH = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")


def normalize_path(path: str) -> str:
    """Strip leading/trailing ``/`` and check the segments (``[A-Za-z0-9_-]+`` joined by ``/``)."""
    stripped = path.strip("/")
    if not _PATH.match(stripped):
        raise ValueError(f"invalid service path {path!r}: use [A-Za-z0-9_-]+ segments joined by '/'")
    return stripped


class App(EventEmitter):
    """Services mounted at paths, with app-level hooks and events.

    Events: ``service`` (the wrapper) after every :meth:`use`, ``service-removed`` (the wrapper) after
    every :meth:`unuse`; remote proxies mounted by the distribution raise the same events, and
    ``service-changed`` (the wrapper) once their provider offers other methods or events, changed in place.
    """

    def __init__(self, hooks: HookSpec | None = None) -> None:
        super().__init__()
        self._services: dict[str, ServiceWrapper] = {}
        self._lock = threading.RLock()
        self.hook_table = Hooks(hooks)
        #: The app's distribution, set by :func:`celery_services.distribute`.
        self.distribution: Distribution | None = None
        #: Called with each wrapper before it is mounted; raising refuses the mount. The distribution adds
        #: its check here (a running prefork worker cannot serve a service mounted after it forked), so this
        #: layer needs nothing of the distribution.
        self.mount_checks: list[Callable[[ServiceWrapper], None]] = []
        #: The default publish filter of every service (see :meth:`publish`).
        self.publisher: Publisher | None = None

    def publish(self, publisher: Publisher) -> App:
        """Set the publish filter of every service without one of its own (:meth:`ServiceWrapper.publish`):
        ``publisher(event, data, context, user) -> bool`` decides which connected clients get an event."""
        self.publisher = publisher
        return self

    @property
    def services(self) -> Mapping[str, ServiceWrapper]:
        """A read-only view of path → mounted service."""
        return MappingProxyType(self._services)

    def hooks(self, spec: HookSpec) -> App:
        """Register app-level hooks, run around every service's calls."""
        self.hook_table.add(spec)
        return self

    def use(
        self,
        path: str,
        service: Any,
        *,
        methods: Sequence[str] | None = None,
        events: Sequence[str] | None = None,
    ) -> ServiceWrapper:
        """Mount ``service`` at ``path`` and emit ``service``.

        Args:
            path: where to mount it; ``/`` at either end is stripped.
            service: any object with some of the standard methods (see :class:`~celery_services.Service`).
            methods: custom methods it offers beside the standard ones (checked now, not at first call).
            events: custom events it emits beside the standard ones.

        Raises:
            Conflict: a service is already mounted at ``path``.
            ValueError: the path, a method or an event name is invalid, or a listed method is missing.
        """
        path = normalize_path(path)
        # A service may declare what it offers (proxies do): used when use() names nothing.
        if methods is None:
            methods = _declared(service, "methods")
        if events is None:
            events = _declared(service, "events")
        return self.mount(ServiceWrapper(self, path, service, methods=methods, events=events))

    def mount(self, wrapper: ServiceWrapper) -> ServiceWrapper:
        """Mount a wrapper made for this app at its path, and emit ``service``.

        :meth:`use` builds the wrapper; the distribution mounts again the very wrapper of a proxy whose
        provider came back, so that a handle held by user code keeps its listeners and hooks.

        Raises:
            Conflict: a service is already mounted at the wrapper's path.
        """
        if wrapper.app is not self:
            raise ValueError("this wrapper belongs to another app")
        with self._lock:
            if wrapper.path in self._services:
                raise Conflict(f"A service is already mounted at '{wrapper.path}'", {"path": wrapper.path})
            for check in self.mount_checks:
                check(wrapper)
            self._services[wrapper.path] = wrapper
        setup = getattr(wrapper.service, "setup", None)
        if callable(setup):
            setup(self, wrapper.path)
        self.emit("service", wrapper)
        return wrapper

    def unuse(self, path: str) -> Any:
        """Unmount the service at ``path``, emit ``service-removed`` and return the service object."""
        path = normalize_path(path)
        with self._lock:
            wrapper = self._services.pop(path, None)
        if wrapper is None:
            raise NotFound(f"No service mounted at '{path}'", {"path": path})
        self.emit("service-removed", wrapper)
        return wrapper.service

    def service(self, path: str) -> ServiceWrapper:
        """The service mounted at ``path``.

        Raises:
            NotFound: nothing is mounted there.
        """
        wrapper = self._services.get(path.strip("/"))
        if wrapper is None:
            raise NotFound(f"No service mounted at '{path.strip('/')}'", {"path": path})
        return wrapper


def _declared(service: Any, name: str) -> Sequence[str]:
    value = getattr(service, name, ())
    return tuple(value) if isinstance(value, list | tuple) else ()
