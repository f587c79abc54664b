"""asyncio in the service layer: which calls are awaitable, and how blocking parts run off the event loop.

A call is *async* when its service method or one of the hooks it runs is ``async def`` (or a remote proxy is
awaited, :meth:`~.ServiceWrapper.acall`). Its hooks then run in Feathers' order as for a blocking call:
``async def`` hooks are awaited, plain ones run inline on the loop (keep those quick: a hook that blocks holds
every call of the loop). A blocking service method is never run on the loop: it goes to an executor (the
gateway's own bounded pool, else the loop's default one), with the caller's context variables, so the
deadline of the call being served reaches its nested calls.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .service import ServiceWrapper

__all__ = ["AsyncService", "is_async_callable", "resolve", "run_blocking"]

T = TypeVar("T")


def is_async_callable(function: object) -> bool:
    """Whether calling ``function`` gives a coroutine: an ``async def`` function or method, a
    :func:`functools.partial` of one, or an object whose ``__call__`` is ``async def``."""
    while isinstance(function, functools.partial):
        function = function.func
    if inspect.iscoroutinefunction(function):
        return True
    # An object whose __call__ is async def (its __call__ attribute, not a callable() test).
    return inspect.iscoroutinefunction(getattr(function, "__call__", None))  # noqa: B004


async def resolve(value: Any) -> Any:
    """``value``, awaited first when it is awaitable (what an ``async def`` hook or method returned)."""
    if inspect.isawaitable(value):
        return await value
    return value


async def run_blocking(function: Callable[[], T], executor: Executor | None = None) -> T:
    """Run blocking ``function`` in ``executor`` (``None``: the running loop's default one), with this
    context's variables, and await its result without blocking the loop."""
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    future: Awaitable[T] = loop.run_in_executor(executor, context.run, function)
    return await future


class AsyncService:
    """The awaitable face of a mounted service (:attr:`ServiceWrapper.aio`): every standard and custom method
    as a coroutine, through :meth:`ServiceWrapper.acall`.

    Args:
        wrapper: the mounted service.
        executor: where blocking service code runs (``None``: the loop's default executor).
    """

    def __init__(self, wrapper: ServiceWrapper, executor: Executor | None = None) -> None:
        self.wrapper = wrapper
        self.executor = executor

    async def call(self, method: str, **fields: Any) -> Any:
        """Await ``method`` with ``id``, ``data``, ``params``, ``timeout`` as :meth:`ServiceWrapper.call`."""
        return await self.wrapper.acall(method, executor=self.executor, **fields)

    async def find(self, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Find items matching ``params["query"]``."""
        return await self.call("find", params=params, **options)

    async def get(self, id: Any, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Get the item ``id``."""
        return await self.call("get", id=id, params=params, **options)

    async def create(self, data: Any, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Create an item (or several)."""
        return await self.call("create", data=data, params=params, **options)

    async def update(self, id: Any, data: Any, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Replace the item ``id``."""
        return await self.call("update", id=id, data=data, params=params, **options)

    async def patch(self, id: Any, data: Any, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Merge ``data`` into the item ``id`` (or every match of the query when ``id`` is None)."""
        return await self.call("patch", id=id, data=data, params=params, **options)

    async def remove(self, id: Any, params: dict[str, Any] | None = None, **options: Any) -> Any:
        """Remove the item ``id`` (or every match of the query when ``id`` is None)."""
        return await self.call("remove", id=id, params=params, **options)

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        # A custom method (publish_article reaches publish-article); any other name is refused when awaited.
        if name.startswith("_"):
            raise AttributeError(name)
        method = self.wrapper._custom_method(name) or name

        async def custom(data: Any = None, params: dict[str, Any] | None = None, **options: Any) -> Any:
            return await self.call(method, data=data, params=params, **options)

        return custom

    def __repr__(self) -> str:
        return f"<AsyncService {self.wrapper.path!r} of {type(self.wrapper.service).__name__}>"
