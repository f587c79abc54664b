"""The hub that fans an app's service events out to the clients of the gateway's event transports
(Server-Sent Events in :mod:`.sse`, Socket.IO in :mod:`.sockets`).

Each client has a bounded queue fed from the emitting threads with ``loop.call_soon_threadsafe``; an event
for a full queue is dropped and counted, and the client then receives a ``dropped`` event, so a slow client
never holds back the services or the other clients. The hub listens to the services only while clients
are connected.

Each client carries its user (``None`` when anonymous), and each event goes only to the clients the
service's publish filter accepts (:meth:`~.ServiceWrapper.publish`, else :meth:`~.App.publish`; without a
filter, every client), and never to a client without a user when the hub ``requires_user`` (an
authenticated gateway), nor to one whose user's token expired (:func:`~.auth.expired`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..core.app import App
from ..core.service import ServiceWrapper
from .auth import expired
from .encoding import Event

__all__ = ["EventHub", "HubClient"]


class HubClient:
    """One ``/events`` connection: its filters and bounded queue, living on the server's event loop."""

    def __init__(
        self,
        hub: EventHub,
        loop: asyncio.AbstractEventLoop,
        paths: frozenset[str],
        events: frozenset[str],
        size: int,
        user: Any = None,
    ) -> None:
        self.hub = hub
        self.loop = loop
        self.paths = paths
        self.events = events
        self.user = user
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=size)
        self.dropped = 0
        self.closed = False

    def wants(self, path: str, event: str) -> bool:
        return (not self.paths or path in self.paths) and (not self.events or event in self.events)

    def offer_event(self, event: Event) -> None:
        """Hand one event to the client (the emitting thread)."""
        message = event.sse
        if message is not None:
            self.offer(message)

    def offer(self, message: bytes | None) -> None:
        """Hand ``message`` to the client's loop (any thread); ``None`` ends the stream."""
        with contextlib.suppress(RuntimeError):  # a closed loop: the client is gone
            self.loop.call_soon_threadsafe(self._put, message)

    def _put(self, message: bytes | None) -> None:
        if self.closed:
            return
        if message is None:
            self.closed = True
            while self.queue.full():  # the end must get through: drop what the client has not read
                self.queue.get_nowait()
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            self.hub.count_drop()


class EventHub:
    """Fans the events of an app's services out to ``/events`` clients.

    While at least one client is connected, the hub listens to the app's ``service`` / ``service-changed`` /
    ``service-removed`` events and to every event of every mounted service (``wrapper.events``); the last
    client leaving removes all these listeners. Each event is serialized once, in the emitting thread, then
    offered to the clients whose filters want it.

    Clients come and go through :meth:`join` and :meth:`leave` on a thread of the hub's own, in order,
    never on the server's event loop: the first client's listeners bind remote proxies' events at the
    broker, which a broker that stopped answering holds for its bounded retry (the loop and every request
    with it were held that long). :meth:`attach` and :meth:`disconnect` do the same from any thread,
    blocking.

    Args:
        app: the app whose services' events are streamed.
        queue_size: the events a client may have pending before new ones are dropped for it.

    Attributes:
        dropped: events dropped so far, over all clients, because their queue was full.
    """

    def __init__(self, app: App, *, queue_size: int = 256, requires_user: bool = False) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.app = app
        self.queue_size = queue_size
        self.requires_user = requires_user
        self.dropped = 0
        self._clients: set[HubClient] = set()
        self._attached: dict[ServiceWrapper, list[tuple[str, Callable[..., None]]]] = {}
        self._lock = threading.RLock()
        # One thread, so that a client's leave runs after its join however the join ended.
        self._members = ThreadPoolExecutor(1, thread_name_prefix="celery-services-hub")
        # Bound once: ``off`` removes a listener by identity, and each attribute access binds anew.
        self._service_listener = self._on_service
        self._removed_listener = self._on_service_removed

    @property
    def clients(self) -> int:
        """How many clients are connected."""
        with self._lock:
            return len(self._clients)

    def attached(self) -> dict[str, tuple[str, ...]]:
        """Path → events the hub listens to now (empty while no client is connected)."""
        with self._lock:
            return {wrapper.path: tuple(e for e, _ in entries) for wrapper, entries in self._attached.items()}

    def client(
        self,
        loop: asyncio.AbstractEventLoop,
        paths: Iterable[str] = (),
        events: Iterable[str] = (),
        user: Any = None,
    ) -> HubClient:
        """A client of ``user`` on ``loop`` (filters: empty means everything), not yet registered."""
        return HubClient(self, loop, frozenset(paths), frozenset(events), self.queue_size, user)

    async def join(self, client: HubClient) -> None:
        """Register ``client`` on the hub's thread; returns once it hears the events published from then."""
        await asyncio.wrap_future(self._members.submit(self.attach, client))

    def leave(self, client: HubClient) -> None:
        """Forget ``client`` on the hub's thread, after its :meth:`join` (without waiting for it)."""
        self._members.submit(self.disconnect, client)

    def attach(self, client: HubClient) -> HubClient:
        """Register ``client``, blocking: it hears what an ``/events`` client of its user would (another
        transport's client subclasses the SSE client, overriding ``offer_event``)."""
        with self._lock:
            first = not self._clients
            self._clients.add(client)
            if first:
                self._listen()
        return client

    def disconnect(self, client: HubClient) -> None:
        """Forget ``client``; the last one leaving removes the hub's listeners."""
        with self._lock:
            self._clients.discard(client)
            if not self._clients:
                self._unlisten()

    def close(self) -> None:
        """End every client's stream (thread-safe), e.g. before the server shuts down."""
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.offer(None)

    def count_drop(self) -> None:
        """Count one event dropped for a full client queue."""
        with self._lock:
            self.dropped += 1

    def _listen(self) -> None:
        self.app.on("service", self._service_listener)
        self.app.on("service-changed", self._service_listener)
        self.app.on("service-removed", self._removed_listener)
        for wrapper in list(self.app.services.values()):
            self._attach(wrapper)

    def _unlisten(self) -> None:
        self.app.off("service", self._service_listener)
        self.app.off("service-changed", self._service_listener)
        self.app.off("service-removed", self._removed_listener)
        for wrapper in list(self._attached):
            self._detach(wrapper)

    def _on_service(self, wrapper: ServiceWrapper) -> None:
        with self._lock:
            if self._clients:
                self._attach(wrapper)

    def _on_service_removed(self, wrapper: ServiceWrapper) -> None:
        with self._lock:
            self._detach(wrapper)

    def _attach(self, wrapper: ServiceWrapper) -> None:
        """Listen to the events ``wrapper`` offers now: to those added since it was attached, and no more to
        those removed (a remote service's offer changes in place: ``service-changed``)."""
        attached = dict(self._attached.get(wrapper, ()))
        for event in wrapper.events:
            if event not in attached:
                attached[event] = listener = self._listener(wrapper, event)
                wrapper.on(event, listener)
        for event in [event for event in attached if event not in wrapper.events]:
            wrapper.off(event, attached.pop(event))
        self._attached[wrapper] = list(attached.items())

    def _detach(self, wrapper: ServiceWrapper) -> None:
        for event, listener in self._attached.pop(wrapper, []):
            wrapper.off(event, listener)

    def _listener(self, wrapper: ServiceWrapper, event: str) -> Callable[..., None]:
        def listener(data: Any, context: Any = None) -> None:
            self.publish(wrapper, event, data, context)

        return listener

    def receives(self, wrapper: ServiceWrapper, event: str, data: Any, context: Any, user: Any) -> bool:
        """Whether a client of ``user`` gets ``event``: the publish filter's answer, else the default."""
        if user is None and self.requires_user:
            return False  # an authenticated gateway's anonymous socket (one that has not logged in yet)
        if expired(user):
            return False  # checked at each event: a client's login outlives its token only until exp
        decided = wrapper.published_to(event, data, context, user)
        return True if decided is None else decided

    def publish(self, wrapper: ServiceWrapper, event: str, data: Any, context: Any = None) -> None:
        """Offer ``event`` of ``wrapper`` to the clients that want it and may see it (any thread)."""
        path = wrapper.path
        with self._lock:
            candidates = [client for client in self._clients if client.wants(path, event)]
        clients = [c for c in candidates if self.receives(wrapper, event, data, context, c.user)]
        encoded = Event(path, event, data)
        for client in clients:
            client.offer_event(encoded)
