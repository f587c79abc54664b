"""The service base class and the wrapper that runs hooks and emits events around every call.

One piece, past 300 lines: the wrapper runs a call either blocking (:meth:`ServiceWrapper.call`) or awaited
(:meth:`ServiceWrapper.acall`), and the two runs of Feathers' hook order stay side by side so they cannot
drift apart; what asyncio needs besides is in :mod:`.aio`.
"""

from __future__ import annotations

import functools
import keyword
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from .aio import AsyncService, is_async_callable, resolve, run_blocking
from .emitter import EventEmitter
from .errors import MethodNotAllowed
from .hooks import HOOK_TYPES, HookContext, Hooks, HookSpec, run_hooks, run_hooks_async

if TYPE_CHECKING:
    from .app import App

__all__ = [
    "STANDARD_EVENTS",
    "STANDARD_METHODS",
    "Publisher",
    "Service",
    "ServiceWrapper",
    "method_attribute",
    "shadowed",
]

log = logging.getLogger("celery_services.service")

#: ``(event, data, context, user) -> bool``: whether a connected client of ``user`` receives an event.
Publisher = Callable[[str, Any, Any, Any], bool]

#: The standard methods, in Feathers' order.
STANDARD_METHODS: tuple[str, ...] = ("find", "get", "create", "update", "patch", "remove")

#: The event each mutating method emits once it succeeded.
STANDARD_EVENTS: dict[str, str] = {
    "create": "created",
    "update": "updated",
    "patch": "patched",
    "remove": "removed",
}


class Service:
    """Optional base class for services: gives service code :meth:`emit` for its custom events.

    Any object with some of the standard methods is a service; subclass this one when the service's own code
    needs to emit events or to know its app and path.
    """

    app: App | None = None
    path: str | None = None

    def setup(self, app: App, path: str) -> None:
        """Called by ``app.use(path, service)``: remembers where the service is mounted."""
        self.app = app
        self.path = path

    def emit(self, event: str, data: Any, context: Any = None) -> None:
        """Emit ``event`` with ``data`` to the listeners of the mounted service (a no-op when unmounted)."""
        if self.app is not None and self.path is not None:
            self.app.service(self.path).emit(event, data, context)


#: How each method's arguments are passed to the service object, after which ``params`` follows.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "find": (),
    "get": ("id",),
    "create": ("data",),
    "update": ("id", "data"),
    "patch": ("id", "data"),
    "remove": ("id",),
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def method_attribute(name: str) -> str:
    """The Python attribute implementing the method ``name``: ``publish-article`` → ``publish_article``.

    Names travel as written (task names, REST's ``X-Service-Method``, events); Python spells ``-`` as ``_``.
    """
    return name.replace("-", "_")


def shadowed(name: str) -> bool:
    """Whether custom method ``name`` would be hidden by an attribute of the service wrapper (its methods,
    :class:`EventEmitter`'s, its fields) or of :class:`Service` (``setup`` …): ``wrapper.<name>`` would reach
    that attribute, never the method, while ``call(name)`` and remote callers ran the method. Such a name
    is refused at ``use``, as Feathers refuses it, and in ``distributed_methods``."""
    attribute = method_attribute(name)
    return attribute in _FIELDS or attribute in _SERVICE_ATTRIBUTES or hasattr(ServiceWrapper, attribute)


def check_name(kind: str, name: str) -> None:
    """Reject a custom method or event name that cannot travel in a task name or routing key."""
    if not _NAME.match(name) or keyword.iskeyword(method_attribute(name)):
        raise ValueError(f"invalid {kind} name {name!r}: a letter, then letters, digits, '_' and '-'")


class ServiceWrapper(EventEmitter):
    """A mounted service: runs hooks around each call and emits the service's events.

    ``app.service(path)`` returns it. Standard methods are methods of the wrapper; custom methods listed at
    ``app.use(..., methods=[...])`` are reached as attributes, so none may be named like one of the
    wrapper's own (``publish``, ``hooks``, ``on`` …: refused at ``use``). Any other method name gives a
    callable that raises :class:`MethodNotAllowed`, never ``AttributeError``. Non-callable attributes of the
    service (``remote``, ``key``, ``id_field`` …) are readable through the wrapper.
    """

    def __init__(
        self,
        app: App,
        path: str,
        service: Any,
        *,
        methods: Sequence[str] = (),
        events: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.app = app
        self.path = path
        self.service = service
        self.custom_methods: tuple[str, ...] = tuple(m for m in dict.fromkeys(methods) if m not in SIGNATURES)
        self.custom_events: tuple[str, ...] = tuple(e for e in dict.fromkeys(events) if e not in _STD_EVENTS)
        self._hooks = Hooks()
        self._async_methods: dict[str, tuple[object, bool]] = {}  # see is_async
        #: This service's publish filter (see :meth:`publish`).
        self.publisher: Publisher | None = None
        for name in methods:
            check_name("method", name)
            if name in SIGNATURES:
                continue
            attribute = method_attribute(name)
            if shadowed(name):
                raise ValueError(f"{name!r} on service {path!r} is not allowed as a custom method name")
            if not callable(getattr(service, attribute, None)):
                raise ValueError(f"service at {path!r} has no method {attribute!r} to offer")
        for name in events:
            check_name("event", name)

    def publish(self, publisher: Publisher) -> ServiceWrapper:
        """Decide which connected clients of the app's transports (the gateway's ``/events``, its sockets)
        receive this service's events, as Feathers' channels do: ``publisher(event, data, context, user)``
        is asked once per event and client (``user`` is ``None`` for an anonymous client). It overrides
        the app's (:meth:`App.publish`); an exception counts as ``False`` (logged)."""
        self.publisher = publisher
        return self

    def published_to(self, event: str, data: Any, context: Any, user: Any) -> bool | None:
        """Whether a client of ``user`` receives ``event``: this service's filter, else the app's, else
        ``None`` (no filter: the transport's default decides)."""
        publisher = self.publisher or self.app.publisher
        if publisher is None:
            return None
        try:
            return bool(publisher(event, data, context, user))
        except Exception:
            log.warning("publish filter of '%s' failed on '%s': not sent", self.path, event, exc_info=True)
            return False

    @property
    def methods(self) -> tuple[str, ...]:
        """Every method the service offers: its standard methods, then its custom ones."""
        standard = tuple(m for m in SIGNATURES if callable(getattr(self.service, m, None)))
        return standard + self.custom_methods

    @property
    def events(self) -> tuple[str, ...]:
        """The standard events of the methods it has, then its custom events (a proxy's: what it receives)."""
        if getattr(self.service, "remote", False):
            return tuple(self.service.events)
        offered = self.methods
        standard = tuple(event for method, event in STANDARD_EVENTS.items() if method in offered)
        return standard + self.custom_events

    def hooks(self, spec: HookSpec) -> ServiceWrapper:
        """Register service-level hooks (see :mod:`celery_services.core.hooks` for the order)."""
        self._hooks.add(spec)
        return self

    def find(self, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Find items matching ``params["query"]``."""
        return self.call("find", params=params, **options)

    def get(self, id: Any, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Get the item ``id``."""
        return self.call("get", id=id, params=params, **options)

    def create(self, data: Any, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Create an item (or several, from a list, where the service allows it)."""
        return self.call("create", data=data, params=params, **options)

    def update(self, id: Any, data: Any, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Replace the item ``id``."""
        return self.call("update", id=id, data=data, params=params, **options)

    def patch(self, id: Any, data: Any, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Merge ``data`` into the item ``id`` (or every match of the query when ``id`` is None)."""
        return self.call("patch", id=id, data=data, params=params, **options)

    def remove(self, id: Any, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Remove the item ``id`` (or every match of the query when ``id`` is None)."""
        return self.call("remove", id=id, params=params, **options)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper itself lacks.
        if name.startswith("_"):
            raise AttributeError(name)
        method = self._custom_method(name)
        if method is not None:  # publish_article reaches publish-article too
            return lambda data=None, params=None, **options: self.call(
                method, data=data, params=params, **options
            )
        value = getattr(self.service, name, _MISSING)
        if value is not _MISSING and not callable(value):
            return value
        return _refuse(self.path, name)

    def call(
        self,
        method: str,
        *,
        id: Any = None,
        data: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Call ``method`` through the hooks; the one entry point of local, remote and HTTP calls.

        When the method or one of the hooks the call runs is ``async def`` (:meth:`is_async`), the call
        returns a coroutine to await (``await app.service("articles").get(1)``); otherwise it blocks and
        returns the result.

        Args:
            method: a standard or custom method the service offers.
            id: the id argument, for the methods that take one.
            data: the data argument, for the methods that take one.
            params: the call's params; copied, and their ``query`` too, so a hook's writes (an owner added to
                the query) never reach the caller's dicts. Values further down are shared.
            timeout: seconds a remote call may take (stored as ``params["timeout"]``).
        """
        context = self._context(method, id, data, params, timeout)
        if self.is_async(method):
            return self._run_async(context, None)
        app_hooks = self.app.hook_table
        try:
            context = run_hooks(app_hooks.for_call("before", method), context)
            context = run_hooks(self._hooks.for_call("before", method), context)
            if not context.result_set:
                context.result = self._invoke(context)
            context.type = "after"
            context = run_hooks(self._hooks.for_call("after", method), context)
            context = run_hooks(app_hooks.for_call("after", method), context)
        except Exception as exc:
            context.type = "error"
            context.error = exc
            context = run_hooks(self._hooks.for_call("error", method), context)
            context = run_hooks(app_hooks.for_call("error", method), context)
            _raise_unrecovered(context, exc)
        self._emit_event(context)
        return context.result

    async def acall(
        self,
        method: str,
        *,
        id: Any = None,
        data: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        executor: Executor | None = None,
    ) -> Any:
        """Call ``method`` through the hooks without blocking the event loop, whatever the service.

        An ``async def`` method is awaited; a remote proxy's call is sent and awaited on asyncio clients; a
        blocking service with blocking hooks runs whole in ``executor`` (``None``: the loop's default one),
        as a blocking method with ``async def`` hooks runs its method there. Arguments as :meth:`call`.
        """
        if not self.is_async(method) and not getattr(self.service, "remote", False):
            blocking = functools.partial(self.call, method, id=id, data=data, params=params, timeout=timeout)
            return await run_blocking(blocking, executor)
        return await self._run_async(self._context(method, id, data, params, timeout), executor)

    @property
    def aio(self) -> AsyncService:
        """The awaitable face of this service: ``await app.service("articles").aio.get(1)`` (see
        :meth:`acall`), for local and remote services alike."""
        return AsyncService(self)

    def is_async(self, method: str) -> bool:
        """Whether :meth:`call` of ``method`` gives a coroutine: the service's method, or one of the hooks
        such a call runs, is ``async def``."""
        function = getattr(self.service, method_attribute(method), None)
        # The answer for the method's function, kept: inspect's test took 2.5 us of a local get's 15.
        plain = getattr(function, "__func__", function)
        known = self._async_methods.get(method)
        if known is None or known[0] is not plain:
            known = self._async_methods[method] = (plain, is_async_callable(function))
        if known[1]:
            return True
        levels = [hooks for hooks in (self.app.hook_table, self._hooks) if hooks.has_async]
        return any(
            is_async_callable(hook)
            for hooks in levels
            for kind in HOOK_TYPES
            for hook in hooks.for_call(kind, method)
        )

    def _context(
        self, method: str, id: Any, data: Any, params: dict[str, Any] | None, timeout: float | None
    ) -> HookContext:
        if method not in SIGNATURES and method not in self.custom_methods:
            raise MethodNotAllowed(f"Method '{method}' is not offered by service '{self.path}'")
        if method in SIGNATURES and not callable(getattr(self.service, method, None)):
            raise MethodNotAllowed(f"Method '{method}' is not supported by service '{self.path}'")
        if params:
            call_params = dict(params)
            query = call_params.get("query")
            # One level more: hooks write into the query (an owner), which a caller reusing params would keep.
            if isinstance(query, dict):
                call_params["query"] = query.copy()
        else:
            call_params = {}
        if timeout is not None:
            call_params["timeout"] = timeout
        return HookContext(
            self.app, self, method, id=id, data=data, params=call_params, event=STANDARD_EVENTS.get(method)
        )

    async def _run_async(self, context: HookContext, executor: Executor | None) -> Any:
        # The order of call(), each hook awaited when async def.
        method = context.method
        app_hooks = self.app.hook_table
        try:
            context = await run_hooks_async(app_hooks.for_call("before", method), context)
            context = await run_hooks_async(self._hooks.for_call("before", method), context)
            if not context.result_set:
                context.result = await self._invoke_async(context, executor)
            context.type = "after"
            context = await run_hooks_async(self._hooks.for_call("after", method), context)
            context = await run_hooks_async(app_hooks.for_call("after", method), context)
        except Exception as exc:
            context.type = "error"
            context.error = exc
            context = await run_hooks_async(self._hooks.for_call("error", method), context)
            context = await run_hooks_async(app_hooks.for_call("error", method), context)
            _raise_unrecovered(context, exc)
        self._emit_event(context)
        return context.result

    def _emit_event(self, context: HookContext) -> None:
        # A proxy's events come from its provider through the event bus: emitting them here would double them.
        if context.event is not None and not getattr(self.service, "remote", False):
            items = context.result if isinstance(context.result, list) else [context.result]
            for item in items:
                self.emit(context.event, item, context)

    def _invoke(self, context: HookContext) -> Any:
        method = getattr(self.service, method_attribute(context.method))
        args = [getattr(context, name) for name in SIGNATURES.get(context.method, ("data",))]
        return method(*args, context.params)

    async def _invoke_async(self, context: HookContext, executor: Executor | None) -> Any:
        call_async = getattr(self.service, "call_async", None)
        if getattr(self.service, "remote", False) and callable(call_async):
            # A proxy's awaitable call: sent and awaited on asyncio clients (distribution/aio.py).
            fields = {name: getattr(context, name) for name in SIGNATURES.get(context.method, ("data",))}
            return await call_async(context.method, params=context.params, **fields)
        method = getattr(self.service, method_attribute(context.method))
        args = [getattr(context, name) for name in SIGNATURES.get(context.method, ("data",))]
        if is_async_callable(method):
            return await method(*args, context.params)
        return await resolve(await run_blocking(functools.partial(method, *args, context.params), executor))

    def _custom_method(self, name: str) -> str | None:
        """The custom method an attribute name reaches (``publish_article`` reaches ``publish-article``)."""
        return next((m for m in self.custom_methods if method_attribute(m) == name), None)

    def __repr__(self) -> str:
        return f"<ServiceWrapper {self.path!r} of {type(self.service).__name__}>"


_STD_EVENTS = frozenset(STANDARD_EVENTS.values())
#: Names a custom method cannot take on the service either: mount calls ``setup(app, path)`` on any
#: service, and :class:`Service` keeps its ``app`` and ``path`` and offers ``emit`` under them.
_SERVICE_ATTRIBUTES = frozenset(dir(Service))
#: The public fields :meth:`ServiceWrapper.__init__` sets (a test holds it to them).
_FIELDS = frozenset({"app", "path", "service", "custom_methods", "custom_events", "publisher"})
_MISSING = object()


def _raise_unrecovered(context: HookContext, exc: Exception) -> None:
    """After the error hooks: raise what is left of the error, unless a hook recovered the call."""
    if context.error is not None:
        if context.error is exc:
            raise exc
        raise context.error from exc


def _refuse(path: str, name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise MethodNotAllowed(f"Method '{name}' is not offered by service '{path}'")

    return refuse
