"""The caller's half of a remote call, awaited: the same call as :mod:`.caller`'s, on asyncio clients.

What travels is decided once, by the blocking transport (:meth:`.Transport.prepare`: deadline, inherited
deadline, liveness, params allow-list, size cap, headers, signature), and so are the message
(:meth:`.Transport.encode`) and the reading of the reply (:meth:`.Transport.open_reply`: errors rebuilt by
name, ``Timeout``, ``BadGateway``, signatures). Only the I/O differs: it runs on ``redis.asyncio`` clients, so
a call in flight holds a Redis connection and no thread.

- Redis broker, same database as the replies: ``LPUSH`` on the call's queue and ``BLPOP`` on its reply list
  sent together on one connection, as the blocking transport does (one round trip).
- Redis broker elsewhere: ``LPUSH`` on the broker's client, then ``BLPOP`` on the replies'.
- RabbitMQ: the message is published through kombu (the blocking transport's producer) in a small bounded
  pool of threads, then the reply is awaited on the reply Redis without a thread. Publishing is a quick
  write with no broker round trip, so a few threads publish thousands of calls per second; an asyncio AMQP
  client would have been a second writer of Celery's message to keep identical to kombu's.

Every read has a timeout from the call's deadline (never a client default), and a connection lost while
idle is replaced once, as in the blocking transport. A cancelled ``await`` (a client gone, an
``asyncio.timeout``) withdraws its call when it is still queued (Redis broker), forbids its reply (the
provider pushes a call's reply only if it can set the call's reply marker first: this sets it) and deletes a
reply already pushed: it leaves no reply list behind.

Clients belong to the event loop that made them: one set per loop (the gateway's, and the loop each
serving thread of a worker keeps, :mod:`.loops`), kept on the loop itself and closed when it shuts down.

One piece, past 300 lines: the awaited call path, kept in one module as the blocking one is (DESIGN §6), with
the per-loop clients it needs and the clean-up of a cancelled call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio

from ..core.aio import run_blocking
from ..core.errors import ServiceError, Unavailable
from .caller import READ_MARGIN, Call, Transport, connect_pauses, not_sent, timed_out
from .observability import client_acall, hooks
from .protocol import reply_key
from .redis_clients import RedisOptions, async_redis_client, connecting_by, pack_commands, send_by_async

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

__all__ = ["AsyncTransport"]

log = logging.getLogger("celery_services.remote")

#: Seconds the clean-up of a cancelled call may take.
ABANDON_TIMEOUT = 2.0


#: The attribute of a loop holding its clients, by transport. On the loop itself: the clients' connections
#: hold the loop, so anywhere else (a WeakKeyDictionary's values are strong) they kept every loop and its
#: sockets for ever; on the loop, both are one cycle the collector frees once the loop is dropped.
_ON_LOOP = "_celery_services_clients"


class _LoopClients:
    """The clients of one event loop, and the bound on its calls in flight."""

    def __init__(self, replies: redis.asyncio.Redis, broker: redis.asyncio.Redis | None, slots: int) -> None:
        self.replies = replies
        self.broker = broker
        self.slots = asyncio.Semaphore(slots)
        self._until_shutdown: AsyncIterator[None] | None = None  # the loop holds it weakly only

    async def close_at_shutdown(self) -> None:
        """Close these clients when their loop shuts down. A loop's ``shutdown_asyncgens`` (``asyncio.run``,
        ``asyncio.Runner``) closes the async generators it runs while it still runs: the only moment the
        sockets can be closed politely, with no call from the user. A loop closed without it leaves them to
        the collector."""
        self._until_shutdown = self._open()
        await anext(self._until_shutdown)

    async def _open(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        for client in (self.replies, self.broker):
            if client is not None:
                await client.aclose()


class AsyncTransport:
    """Sends calls and awaits their replies without blocking the event loop.

    Args:
        transport: the blocking transport, which decides what travels and reads replies.
        replies_url: the Redis of the reply lists (the result backend's).
        broker_url: the broker's Redis when it is another database than the replies' (``None`` otherwise).
        options: Sentinel master and TLS files of both.
        publish_threads: threads publishing to RabbitMQ (each keeps one broker connection).
        max_in_flight: calls one event loop has in flight at most (each holds a Redis connection while it
            waits); more wait for a slot, within their deadline.
    """

    def __init__(
        self,
        transport: Transport,
        replies_url: str,
        *,
        broker_url: str | None = None,
        options: RedisOptions | None = None,
        publish_threads: int = 4,
        max_in_flight: int = 2000,
    ) -> None:
        self.transport = transport
        self._replies_url = replies_url
        self._broker_url = broker_url
        self._options = options or RedisOptions()
        self._publish_threads = publish_threads
        self._max_in_flight = max_in_flight
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    async def call(
        self,
        key: str,
        path: str,
        method: str,
        *,
        id: Any = None,
        data: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        wait: bool = False,
    ) -> Any:
        """Send one call and await its result; raises what :meth:`.Transport.call` raises."""
        if hooks.on:  # tracing or metrics: the same call in a CLIENT span, counted (observability.py)
            send = functools.partial(self._call, key, path, method, id, data, params, timeout, wait)
            return await client_acall(send, key, path, method)
        return await self._call(key, path, method, id, data, params, timeout, wait)

    async def _call(
        self,
        key: str,
        path: str,
        method: str,
        id: Any,
        data: Any,
        params: dict[str, Any] | None,
        timeout: float | None,
        wait: bool,
    ) -> Any:
        call = self.transport.prepare(
            key, path, method, id=id, data=data, params=params, timeout=timeout, wait=wait
        )
        log.debug("call sent", extra=call.fields)
        try:
            return await self.send(call)
        except ServiceError as exc:
            log.info("call failed: %s (%s) %s", exc.name, exc.code, exc.message, extra=call.fields)
            raise

    async def send(self, call: Call) -> Any:
        """Send a prepared call and await its reply."""
        clients = await self._clients()
        remaining = call.deadline - time.time()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                await clients.slots.acquire()
        except TimeoutError:
            return self.transport.open_reply(call, None)  # no slot before the deadline: its Timeout
        try:
            return self.transport.open_reply(call, await self._send(clients, call))
        finally:
            clients.slots.release()

    async def _send(self, clients: _LoopClients, call: Call) -> bytes | None:
        queue_store = self.transport._queue_store
        if queue_store is None:  # RabbitMQ: kombu publishes, in a few threads of ours
            await run_blocking(functools.partial(self.transport._publish, call), self._publisher())
            return await self._wait(clients, call, None)
        message = self.transport.encode(call)
        if clients.broker is None:  # the broker is the reply store: queued and awaited in one round trip
            return await self._wait(clients, call, message)
        await self._push(clients, call, message)
        return await self._wait(clients, call, None, pushed=message)

    async def _push(self, clients: _LoopClients, call: Call, message: bytes) -> None:
        """``LPUSH`` ``message`` on the call's queue, in a broker Redis apart from the reply store, connected
        and read by the call's deadline (the blocking transport's :meth:`.Transport._push`)."""
        assert clients.broker is not None
        pool = clients.broker.connection_pool
        push = pack_commands([("LPUSH", self.transport.queue_key(call.key), message)])
        for attempt in (1, 2):
            try:
                with connecting_by(call.deadline):
                    connection = await _connected(pool, call.deadline)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("broker not reached while sending %s: %s", call.name, exc)
                raise not_sent(call, exc) from None
            try:
                remaining = call.deadline - time.time()
                if remaining <= 0:
                    raise TimeoutError("no time left to queue the call")
                await send_by_async(connection, push, call.deadline)
                await _read(connection, remaining)
                return
            except (redis.TimeoutError, TimeoutError) as exc:
                await _drop(connection)
                log.warning("broker did not take %s by its deadline", call.name)
                raise not_sent(call, exc) from None
            except redis.ResponseError as exc:  # refused: out of memory (noeviction)
                log.warning("broker refused %s: %s", call.name, exc)
                raise not_sent(call, exc) from None
            except (redis.ConnectionError, OSError) as exc:
                await _drop(connection)  # died while idle: replaced once
                if attempt == 2:
                    log.warning("broker not reached while sending %s: %s", call.name, exc)
                    raise not_sent(call, exc) from None
            except BaseException:  # cancelled: withdrawn if it was queued
                await _drop(connection)
                key = reply_key(self.transport.settings.registry_prefix, call.call_id)
                await self._abandon(clients, call, key, message)
                raise
            finally:
                await pool.release(connection)

    async def _wait(
        self, clients: _LoopClients, call: Call, message: bytes | None, pushed: bytes | None = None
    ) -> bytes | None:
        """``BLPOP`` the call's reply list until its deadline (after ``LPUSH``ing ``message`` on the same
        connection, when given), reading with a timeout set from that deadline."""
        key = reply_key(self.transport.settings.registry_prefix, call.call_id)
        pool = clients.replies.connection_pool
        queued = message is None
        for attempt in (1, 2):
            remaining = call.deadline - time.time()
            if remaining <= 0:
                return None
            connection: Any = None
            try:
                # A new connection's handshake by the deadline too (not a cancelled call's clean-up's).
                with connecting_by(call.deadline):
                    connection = await _connected(pool, call.deadline)
                    remaining = call.deadline - time.time()  # less after an outage waited out
                    if remaining <= 0:
                        return None
                    if queued:
                        await connection.send_command("BLPOP", key, max(remaining, 0.001))
                    else:
                        push = ("LPUSH", self.transport.queue_key(call.key), message)
                        pop = ("BLPOP", key, max(remaining, 0.001))
                        await send_by_async(connection, pack_commands([push, pop]), call.deadline)
                        await _read(connection, remaining + READ_MARGIN)
                        queued = True
                    reply = await _read(connection, remaining + READ_MARGIN)
            except (redis.TimeoutError, TimeoutError) as exc:
                await _drop(connection)
                if connection is None:  # the deadline came while connecting, and nothing refused
                    if queued:
                        return None  # sent before (RabbitMQ's publish): no reply by the deadline
                    raise not_sent(call, exc) from None
                raise self._lost(call, True, exc) from None  # the server stopped answering
            except (redis.ConnectionError, OSError, redis.ResponseError) as exc:
                # A connection that died while idle (a Redis restart) is replaced once. UNBLOCKED / READONLY:
                # its server became a replica under the BLPOP (a Sentinel failover), a lost connection too.
                await _drop(connection)
                lost = not isinstance(exc, redis.ResponseError) or str(exc).startswith(
                    ("UNBLOCKED", "READONLY")
                )
                if attempt == 2 or not lost or time.time() >= call.deadline:
                    raise self._lost(call, queued, exc) from None
                continue
            except BaseException:  # cancelled: its reply may still come, on this connection and in Redis
                await _drop(connection)
                await self._abandon(clients, call, key, message or pushed)
                raise
            finally:
                if connection is not None:
                    await pool.release(connection)
            return None if reply is None else bytes(reply[1])
        return None

    def _lost(self, call: Call, queued: bool, exc: BaseException) -> ServiceError:
        if not queued:
            log.warning("broker not reached while sending %s: %s", call.name, exc)
            return not_sent(call, exc)
        return Unavailable(
            f"Reply store unreachable while waiting for '{call.name}': {type(exc).__name__}",
            {"task": call.name, "call_id": call.call_id},
        )

    async def _abandon(self, clients: _LoopClients, call: Call, key: str, message: bytes | None) -> None:
        """Clean up after a cancelled wait: withdraw the call if nobody took it yet, forbid its reply (the
        provider pushes only if it sets ``{reply}:sent`` first, :class:`.provider.Replies`), delete a reply
        already pushed. Shielded: a second cancellation does not stop it; failures are logged."""
        ttl_ms = int((max(call.deadline - time.time(), 0.0) + 1.0) * 1000)

        async def clean() -> None:
            if message is not None:
                store = clients.broker or clients.replies
                await store.lrem(self.transport.queue_key(call.key), 1, message)  # type: ignore[arg-type]
            async with clients.replies.pipeline(transaction=False) as pipe:
                pipe.set(f"{key}:sent", "abandoned", nx=True, px=ttl_ms)
                pipe.delete(key)
                await pipe.execute()

        async def bounded() -> None:
            try:
                async with asyncio.timeout(ABANDON_TIMEOUT):
                    await clean()
            except Exception:
                log.warning("could not clean up after the cancelled call %s", call.call_id, exc_info=True)

        task = asyncio.get_running_loop().create_task(bounded())
        _cleanups.add(task)
        task.add_done_callback(_cleanups.discard)
        with contextlib.suppress(asyncio.CancelledError):  # cancelled again: it goes on in its own task
            await asyncio.shield(task)

    async def _clients(self) -> _LoopClients:
        loop = asyncio.get_running_loop()
        held = _held_by(loop)
        clients = held.get(self)
        if clients is None:
            # Short commands only: the reply wait sets its own read timeout from each call's deadline. A
            # call in flight holds a connection: the pool fits them all (redis-py's default is 100, and it
            # fails the 101st with "Too many connections" rather than waiting), with room for clean-ups.
            make = functools.partial(
                async_redis_client,
                options=self._options,
                socket_timeout=5.0,
                socket_connect_timeout=2.0,
                max_connections=self._max_in_flight + 32,
            )
            broker = make(self._broker_url) if self._broker_url else None
            clients = _LoopClients(make(self._replies_url), broker, self._max_in_flight)
            # Kept under close()'s lock, or refused: clients kept after close() took its loops stayed open
            # and their call went out. Refused ones never connected (a client connects on its first command).
            with self._lock:
                if self._closed:
                    raise Unavailable("This distribution is finalized: no more calls")
                held[self] = clients
                self._loops.add(loop)
            await clients.close_at_shutdown()
        return clients

    def _publisher(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._publish_threads, thread_name_prefix="celery-services-publish"
                )
            return self._executor

    def close(self) -> None:
        """Close every loop's clients (on their loops, when they still run) and the publishing threads."""
        with self._lock:
            self._closed = True
            loops, self._loops = list(self._loops), weakref.WeakSet()
            executor, self._executor = self._executor, None
        for loop in loops:
            clients = _held_by(loop).pop(self, None)
            if clients is not None:
                _close_on(loop, clients.aclose)
        if executor is not None:
            executor.shutdown(wait=False)


def _held_by(loop: asyncio.AbstractEventLoop) -> weakref.WeakKeyDictionary[AsyncTransport, _LoopClients]:
    held: weakref.WeakKeyDictionary[AsyncTransport, _LoopClients] | None = getattr(loop, _ON_LOOP, None)
    if held is None:
        held = weakref.WeakKeyDictionary()
        setattr(loop, _ON_LOOP, held)
    return held


#: Clean-ups of cancelled calls in progress (a task nobody holds could be collected before it ran).
_cleanups: set[asyncio.Task[None]] = set()


def _close_on(loop: asyncio.AbstractEventLoop, close: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``close()`` on ``loop``: from its own thread, or handed to it. A closed loop cannot run it: its
    shutdown closed them already (:meth:`_LoopClients.close_at_shutdown`), else the collector will."""
    if loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        task = loop.create_task(close())
        _cleanups.add(task)
        task.add_done_callback(_cleanups.discard)
    elif loop.is_running():
        asyncio.run_coroutine_threadsafe(close(), loop)
    else:
        try:
            loop.run_until_complete(close())
        except RuntimeError:  # another loop runs in this thread: nothing more to do politely
            log.debug("async clients of a stopped loop left to the collector")


async def _drop(connection: Any) -> None:
    # A read cut short leaves a reply in flight on the connection: it must never serve another command.
    if connection is not None:
        await connection.disconnect(nowait=True)


async def _read(connection: Any, timeout: float) -> Any:
    """The next answer on ``connection`` within ``timeout`` seconds, else ``TimeoutError`` (the connection
    then closed).

    Not ``read_response(timeout=...)``: redis.asyncio returns ``None`` when that runs out, as for a nil (a
    BLPOP's own timeout), and keeps the connection as it is. The answers still to come then answered the
    next call on it, which got the result of the call before (``tests/faults/test_calls_faults.py``).
    """
    async with asyncio.timeout(timeout):
        return await connection.read_response(timeout=math.inf)


async def _connected(pool: Any, deadline: float) -> Any:
    """A connected connection of ``pool``; while Redis refuses, tried again until ``deadline`` (epoch), as
    the blocking transport does (:func:`.caller._connected`), then a refusal if there was one, else the
    last timeout, is raised."""
    pauses: Iterator[float] | None = None  # made on the first refusal only: this is every call's path
    refused: BaseException | None = None
    while True:
        try:
            return await pool.get_connection()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            refused = refused if timed_out(exc) else exc
            pauses = pauses or connect_pauses(deadline)
            pause = next(pauses, None)
            if pause is None:
                raise refused or exc from None
            await asyncio.sleep(pause)
