"""The event loop each serving thread keeps, to run the ``async def`` service calls it serves.

A worker serves calls from plain threads (Celery's pool, the fast path's serving threads): a call whose
service method or hook is ``async def`` gives the provider a coroutine, which :func:`run` runs to its end on
the loop *this thread* keeps, created on the thread's first async call and reused by every later one. Not
``asyncio.run`` per call: a new loop per call would also mean new asyncio Redis connections per call for the
service's own nested awaited calls (their clients belong to one loop, :mod:`.aio`).

The call's deadline is an asyncio timeout: at the deadline the coroutine is cancelled (its ``finally`` blocks
run) and the call ends with :class:`~celery_services.Timeout`; nobody would read a later answer anyway.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
import weakref
from collections.abc import Awaitable
from typing import Any, TypeVar

from ..core.errors import Timeout
from .caller import current_deadline

__all__ = ["run", "settle", "thread_loop"]

T = TypeVar("T")

_local = threading.local()


def thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's kept event loop (made on first use; a forked child makes its own)."""
    kept: tuple[int, asyncio.AbstractEventLoop] | None = getattr(_local, "loop", None)
    if kept is not None and kept[0] == os.getpid() and not kept[1].is_closed():
        return kept[1]
    loop = asyncio.new_event_loop()
    _local.loop = (os.getpid(), loop)
    # The loop goes with its thread (pools replace threads): closed once the thread object is collected.
    weakref.finalize(threading.current_thread(), _close, loop, os.getpid())
    return loop


def settle(result: Any) -> Any:
    """``result`` itself, or, when it is awaitable (an ``async def`` call), what it gives once :func:`run` on
    this thread's loop until the deadline of the call being served (:func:`.caller.current_deadline`)."""
    if inspect.isawaitable(result):
        return run(result, current_deadline())
    return result


def run(awaitable: Awaitable[T], deadline: float | None = None) -> T:
    """Run ``awaitable`` on this thread's loop until it ends, or until ``deadline`` (epoch seconds).

    Context variables set by the caller (the call's deadline for nested calls, the work deferred until the
    reply) are seen inside it, as the loop's task starts from a copy of this thread's context.

    Raises:
        Timeout: the deadline passed first (the coroutine was cancelled).
        RuntimeError: this thread already runs an event loop (await the call there instead).
    """
    loop = thread_loop()
    running = _until(awaitable, deadline)
    try:
        return loop.run_until_complete(running)
    finally:
        _close_pending(running)
        _close_pending(awaitable)


async def _until(awaitable: Awaitable[T], deadline: float | None) -> T:
    if deadline is None:
        return await awaitable
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + (deadline - time.time())):
            return await awaitable
    except TimeoutError:
        raise Timeout("The call ran past its deadline: cancelled", {"deadline": deadline}) from None


def _close_pending(awaitable: Any) -> None:
    # A coroutine the loop never ran (this thread runs another loop) is closed, not left to warn.
    close = getattr(awaitable, "close", None)
    if callable(close) and getattr(awaitable, "cr_frame", None) is not None:
        close()


def _close(loop: asyncio.AbstractEventLoop, pid: int) -> None:
    # A forked child's copy of its parent's loop is left alone: its epoll instance is the parent's own, which
    # running or closing the loop here would change under the parent.
    if pid != os.getpid() or loop.is_running() or loop.is_closed():
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        _shut_down(loop)
        return
    # The thread object was let go where a loop runs (a gateway's), which cannot run this one: a thread of its
    # own shuts it down, without holding up the running loop.
    threading.Thread(target=_shut_down, args=(loop,), name="celery-services-loop-close", daemon=True).start()


def _shut_down(loop: asyncio.AbstractEventLoop) -> None:
    # As asyncio.run ends: the loop's async generators first, which close the asyncio clients of its calls
    # (aio._LoopClients.close_at_shutdown) while it still runs; a bare close() left their sockets to the
    # collector, with a ResourceWarning.
    try:
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
