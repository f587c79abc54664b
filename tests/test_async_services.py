"""Async services in one process: ``async def`` methods and hooks, the awaitable face of every service, and
the event loop a serving thread keeps (no worker, no broker)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

from celery_services import App, GeneralError, HookContext, MemoryService, NotFound, Service, Timeout
from celery_services.core.aio import is_async_callable
from celery_services.distribution import loops
from celery_services.distribution.caller import current_deadline, reset_deadline, set_deadline

pytestmark = pytest.mark.timeout(30)


class Notes(Service):
    def __init__(self) -> None:
        self.memory = MemoryService()

    async def get(self, id: Any, params: dict[str, Any]) -> Any:
        await asyncio.sleep(0)
        if id == "missing":
            raise NotFound("No record found for id 'missing'")
        return {**self.memory.get(id), "stamped": params.get("stamped")}

    async def create(self, data: Any, params: dict[str, Any]) -> Any:
        await asyncio.sleep(0)
        return self.memory.create(data)

    async def pin(self, data: Any, params: dict[str, Any]) -> Any:
        note = self.memory.patch(data["id"], {"pinned": True})
        self.emit("pinned", note)
        return note


def test_async_methods_and_hooks_are_awaited_in_feathers_order() -> None:
    order: list[str] = []

    async def app_before(context: HookContext) -> None:
        await asyncio.sleep(0)
        order.append("app before")
        context.params["stamped"] = True

    def service_before(context: HookContext) -> None:  # a plain hook in an awaited call runs inline
        order.append("service before")

    async def service_after(context: HookContext) -> HookContext:
        order.append("service after")
        context.result = {**context.result, "seen": True}
        return context

    app = App(
        hooks={"before": {"all": [app_before]}, "after": {"all": [lambda c: order.append("app after")]}}
    )
    notes = app.use("notes", Notes(), methods=["pin"], events=["pinned"])
    notes.hooks({"before": {"get": service_before}, "after": {"get": [service_after]}})
    heard: list[tuple[str, Any]] = []
    notes.on("created", lambda data, context: heard.append(("created", data)))
    notes.on("pinned", lambda data, context: heard.append(("pinned", data)))

    async def main() -> None:
        created = await notes.create({"title": "a"})  # call() gives a coroutine for an async service
        assert created == {"title": "a", "id": 0}
        order.clear()
        assert await notes.get(0) == {"title": "a", "id": 0, "stamped": True, "seen": True}
        assert order == ["app before", "service before", "service after", "app after"]
        assert await notes.pin({"id": 0}) == {"title": "a", "id": 0, "pinned": True}  # custom method
        assert await notes.aio.pin({"id": 0}) == {"title": "a", "id": 0, "pinned": True}
        with pytest.raises(NotFound):
            await notes.aio.get("missing")

    asyncio.run(main())
    assert heard[0] == ("created", {"title": "a", "id": 0})
    assert [name for name, _ in heard] == ["created", "pinned", "pinned"]


def test_error_hooks_of_an_awaited_call_recover_or_replace() -> None:
    app = App()
    notes = app.use("notes", Notes())

    async def recover(context: HookContext) -> None:
        if context.id == "missing":
            context.error = None
            context.result = {"id": "missing", "default": True}

    notes.hooks({"error": {"get": [recover]}})

    async def main() -> None:
        assert await notes.get("missing") == {"id": "missing", "default": True}
        notes.hooks({"before": {"create": [_refuse]}})
        with pytest.raises(GeneralError, match="refused"):
            await notes.create({"title": "x"})

    asyncio.run(main())


async def _refuse(context: HookContext) -> None:
    raise GeneralError("refused")


def test_a_blocking_service_stays_blocking_and_is_awaitable_off_the_loop() -> None:
    app = App()
    memory = app.use("memory", MemoryService())
    assert not memory.is_async("create")
    assert memory.create({"n": 1}) == {"n": 1, "id": 0}  # unchanged: no coroutine

    threads: list[str] = []
    memory.hooks({"before": {"get": lambda context: threads.append(threading.current_thread().name)}})

    async def main() -> None:
        loop_thread = threading.current_thread().name
        assert await memory.aio.get(0) == {"n": 1, "id": 0}
        assert threads and threads[-1] != loop_thread  # method and hooks ran in the executor

        async def async_hook(context: HookContext) -> None:
            threads.append(f"hook:{threading.current_thread().name}")

        memory.hooks({"before": {"find": [async_hook]}})
        assert memory.is_async("find") and not memory.is_async("get")  # only the calls that run it

        async def replaced(id: object, params: object = None) -> dict[str, int]:
            return {"replaced": 1}

        memory.service.get = replaced  # type: ignore[method-assign]  # an answer kept per method follows it
        assert memory.is_async("get")
        assert await memory.get(0) == {"replaced": 1}
        del memory.service.get
        assert not memory.is_async("get")
        assert await memory.find() == [{"n": 1, "id": 0}]
        assert threads[-1] == f"hook:{loop_thread}"

    asyncio.run(main())


def test_a_hook_returning_an_awaitable_in_a_blocking_call_is_an_error_not_a_silent_skip() -> None:
    async def sneaky(context: HookContext) -> None:
        context.params["ran"] = True

    app = App()
    memory = app.use("memory", MemoryService())
    memory.hooks({"before": {"get": [lambda context: sneaky(context)]}})  # a lambda: not seen as async
    memory.create({"n": 1})
    with pytest.raises(TypeError, match="awaitable"):
        memory.get(0)


def test_async_callables_are_recognised() -> None:
    class Callable:
        async def __call__(self, context: Any) -> None:
            return None

    async def plain(context: Any) -> None:
        return None

    import functools

    assert is_async_callable(plain) and is_async_callable(functools.partial(plain))
    assert is_async_callable(Callable()) and not is_async_callable(lambda c: None)
    assert not is_async_callable(None)


def test_each_thread_keeps_one_loop_and_the_deadline_is_an_asyncio_timeout() -> None:
    async def where() -> int:
        return id(asyncio.get_running_loop())

    first = loops.run(where())
    assert loops.run(where()) == first  # kept, not a new loop per call
    others: list[int] = []
    workers = [threading.Thread(target=lambda: others.extend([loops.run(where()), loops.run(where())]))]
    workers.append(threading.Thread(target=lambda: others.extend([loops.run(where()), loops.run(where())])))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert len(others) == 4 and others[0] == others[1] and others[2] == others[3]
    assert len({first, others[0], others[2]}) == 3  # one loop per thread

    cancelled = threading.Event()

    async def nap() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.monotonic()
    with pytest.raises(Timeout):
        loops.run(nap(), time.time() + 0.2)
    assert time.monotonic() - started < 2 and cancelled.is_set()

    async def inherited() -> float | None:
        return current_deadline()

    deadline = time.time() + 60
    token = set_deadline(deadline)  # what the provider sets around a call: seen inside the coroutine
    try:
        assert loops.settle(inherited()) == deadline
        assert loops.settle("plain") == "plain"
    finally:
        reset_deadline(token)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_leaves_its_parents_kept_loops_alone() -> None:
    """A forked child shares its parent's loops' epoll instances and sockets. A serving thread's object let
    go in the child (or the child's exit, which runs the finalizers left) must neither close nor run the
    parent's loop there: closing it took its self-pipe out of the shared epoll (the parent's loop then
    slept through other threads' wake-ups); running it would close its connections under the parent (a TLS
    one with a close_notify on the shared socket)."""

    async def running() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    kept: list[asyncio.AbstractEventLoop] = []
    threads = [threading.Thread(target=lambda: kept.append(loops.run(running())))]
    threads[0].start()
    threads[0].join(10)
    pid = os.fork()
    if pid == 0:  # the child: the thread object let go here, then out at once
        threads.clear()
        os._exit(1 if kept[0].is_closed() else 0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, "the child closed its parent's loop"
    threads.clear()
    assert kept[0].is_closed()  # the parent's to close
