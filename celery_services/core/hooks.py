"""Hooks: functions run before, after and on error of service calls, for all methods or one.

Order of a call (the Feathers order):

- ``before``: app ``all``, app ``<method>``, service ``all``, service ``<method>``;
- the method itself, unless a before hook set ``context.result``;
- ``after``: service ``all``, service ``<method>``, app ``all``, app ``<method>``;
- on any failure (in a hook or the method): ``error`` hooks in the ``after`` order. An error hook may
  replace ``context.error``, or set ``context.result`` and clear ``context.error`` to recover.

A hook takes the :class:`HookContext` and returns ``None`` or a context to use from then on. A hook may be
``async def``: the call is then awaitable (:mod:`celery_services.core.aio`) and the hook is awaited in its
place in the order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .aio import is_async_callable

if TYPE_CHECKING:
    from .app import App
    from .service import ServiceWrapper

__all__ = ["Hook", "HookContext", "HookSpec", "HookType", "Hooks", "run_hooks", "run_hooks_async"]

HookType = Literal["before", "after", "error"]
HOOK_TYPES: tuple[HookType, ...] = ("before", "after", "error")

#: A hook: returns ``None`` or the context to go on with (an ``async def`` hook: a coroutine of either).
Hook = Callable[["HookContext"], Any]
#: ``{"before": {"all": [hook], "get": hook}, "after": {...}, "error": {...}}``
HookSpec = Mapping[str, Mapping[str, "Hook | Sequence[Hook]"]]


class HookContext:
    """What a hook sees and may change about one call.

    Attributes:
        app: the app the service is mounted on.
        service: the service wrapper being called.
        path: the service's path.
        method: the method called.
        type: the hook type being run (``before``, ``after`` or ``error``).
        id: the id argument (``get``, ``update``, ``patch``, ``remove``).
        data: the data argument (``create``, ``update``, ``patch``, custom methods).
        params: the call's params (a copy owned by this call, its ``query`` too; values further down are
            the caller's).
        result: the result; setting it in a before hook skips the method.
        error: the error being handled, in error hooks.
        event: the event emitted on success (``created`` …); set it to ``None`` to emit nothing.
    """

    def __init__(
        self,
        app: App,
        service: ServiceWrapper,
        method: str,
        *,
        id: Any = None,
        data: Any = None,
        params: dict[str, Any] | None = None,
        event: str | None = None,
    ) -> None:
        self.app = app
        self.service = service
        self.path: str = service.path
        self.method = method
        self.type: HookType = "before"
        self.id = id
        self.data = data
        self.params: dict[str, Any] = params if params is not None else {}
        self.error: BaseException | None = None
        self.event = event
        self._result: Any = None
        self.result_set = False

    @property
    def result(self) -> Any:
        """The call's result (``None`` until the method ran or a hook set it)."""
        return self._result

    @result.setter
    def result(self, value: Any) -> None:
        self._result = value
        self.result_set = True

    def __repr__(self) -> str:
        return f"HookContext({self.type} {self.path}.{self.method} id={self.id!r})"


class Hooks:
    """The hooks registered at one level (an app, or a service)."""

    def __init__(self, spec: HookSpec | None = None) -> None:
        self._table: dict[HookType, dict[str, list[Hook]]] = {kind: {} for kind in HOOK_TYPES}
        #: Whether some hook of this level is ``async def`` (a blocking call never looks further).
        self.has_async = False
        if spec:
            self.add(spec)

    def add(self, spec: HookSpec) -> None:
        """Register hooks from a spec; unknown hook types are rejected at once."""
        for kind, per_method in spec.items():
            if kind not in HOOK_TYPES:
                raise ValueError(f"unknown hook type {kind!r}: expected one of {', '.join(HOOK_TYPES)}")
            table = self._table[kind]
            for method, hooks in per_method.items():
                listed: Iterable[Hook] = [hooks] if callable(hooks) else hooks
                for hook in listed:
                    if not callable(hook):
                        raise TypeError(f"{kind} hook for {method!r} is not callable: {hook!r}")
                    table.setdefault(method, []).append(hook)
                    self.has_async = self.has_async or is_async_callable(hook)

    def for_call(self, kind: HookType, method: str) -> list[Hook]:
        """The hooks of ``kind`` for ``method``: ``all`` first, then the method's own."""
        table = self._table[kind]
        return [*table.get("all", ()), *table.get(method, ())]

    def __bool__(self) -> bool:
        return any(self._table[kind] for kind in HOOK_TYPES)


def run_hooks(hooks: Iterable[Hook], context: HookContext) -> HookContext:
    """Run hooks in order; a hook that returns a context replaces the one passed on."""
    for hook in hooks:
        returned = hook(context)
        if inspect.isawaitable(returned):
            # An awaitable the call did not see coming (an async callable it could not tell): never dropped.
            close = getattr(returned, "close", None)
            if callable(close):
                close()
            raise TypeError(f"hook {hook!r} returned an awaitable in a blocking call: await the call (acall)")
        if returned is not None:
            context = returned
    return context


async def run_hooks_async(hooks: Iterable[Hook], context: HookContext) -> HookContext:
    """:func:`run_hooks` for an awaited call: an ``async def`` hook is awaited, a plain one runs inline."""
    for hook in hooks:
        returned = hook(context)
        if inspect.isawaitable(returned):
            returned = await returned
        if returned is not None:
            context = returned
    return context
