"""The gateway's Socket.IO transport, speaking Feathers' socket protocol, so Feathers' own clients connect.

Mounted by :func:`~.gateway.asgi_app` at ``/socket.io/`` (python-socketio). A client calls with
``socket.emit(method, path, ...args, callback)``, the arguments by method as Feathers' socket clients send
them::

    find(query)   get(id, query)   create(data, query)   update(id, data, query)   patch(id, data, query)
    remove(id, query)   <custom method>(data, query)

and the callback gets ``(error, result)``, the error as Feathers writes it (:meth:`~.ServiceError.to_dict`;
an exception that is not a ``ServiceError`` is logged and answered as ``GeneralError`` revealing nothing).
Calls are awaited as the gateway's REST calls are (a blocking service in the gateway's thread pool, never
on the event loop), with ``params = {"provider": "socketio", "query", "headers" (of the handshake), "user",
"authentication"}``.

Authentication is Feathers' authentication client's: ``create`` on the path ``authentication`` with
``{"strategy": "jwt", "accessToken"}`` checks the token (the gateway's :class:`~.auth.JWTAuthentication`,
or any authenticate step with a ``verify(token)`` method, sync or async) and keeps the user on the socket
for its later calls and events, until its token's ``exp``: then each call answers NotAuthenticated
``Token expired`` and its events stop, until it authenticates again. ``remove`` on ``authentication``
forgets the user. With an authenticate step, a socket without a user may only authenticate.

Events: each connected socket is a client of the gateway's :class:`~.sse.EventHub`, so it hears what an
``/events`` client of its user would (the publish filters), as ``'{path} {event}'`` with the data; a
bounded queue per socket drops (and counts) what a slow client cannot take, so it never holds back others.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from concurrent.futures import Executor
from typing import Any

import socketio  # type: ignore[import-untyped]

from ..core.app import App
from ..core.errors import BadRequest, GeneralError, MethodNotAllowed, NotAuthenticated, NotFound, ServiceError
from ..distribution.protocol import client_json
from .auth import Authenticate, expired
from .encoding import Encoded, Event, answer
from .hub import EventHub, HubClient
from .query import parse_id

__all__ = ["AUTHENTICATION_PATH", "SocketTransport"]

log = logging.getLogger("celery_services.http")

#: The path of Feathers' authentication service, answered by the transport itself.
AUTHENTICATION_PATH = "authentication"

#: Where ``params`` is among each method's arguments (Feathers' ``paramsPositions``); 1 for the others.
_PARAMS_AT = {"find": 0, "update": 2, "patch": 2}
_ARGS = {"find": (), "get": ("id",), "remove": ("id",), "update": ("id", "data"), "patch": ("id", "data")}


class _SocketClient(HubClient):
    """One socket as a client of the event hub: its events go out through a bounded queue and one task."""

    def __init__(
        self, hub: EventHub, loop: asyncio.AbstractEventLoop, size: int, sid: str, user: Any
    ) -> None:
        super().__init__(hub, loop, frozenset(), frozenset(), size, user)
        self.sid = sid
        self.outbox: asyncio.Queue[tuple[str, Encoded] | None] = asyncio.Queue(maxsize=size)

    def offer_event(self, event: Event) -> None:
        encoded = event.encoded
        if encoded is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the socket is gone
            self.loop.call_soon_threadsafe(self._enqueue, (f"{event.path} {event.name}", encoded))

    def offer(self, message: bytes | None) -> None:
        if message is None:  # the hub closes: end the sender
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._enqueue, None)

    def _enqueue(self, item: tuple[str, Encoded] | None) -> None:
        if item is None:
            while self.outbox.full():
                self.outbox.get_nowait()
        try:
            self.outbox.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1
            self.hub.count_drop()


class SocketTransport:
    """Feathers' socket protocol for the services of ``app`` (see the module docstring).

    Args:
        app: the app whose services are served.
        hub: the gateway's event hub (its publish decisions).
        executor: the gateway's thread pool, where blocking services run.
        authenticate: the gateway's authenticate step (its ``verify(token)`` checks socket tokens).
        max_bytes: largest message accepted from a client.
        queue_size: events pending per socket before new ones are dropped for it.
    """

    def __init__(
        self,
        app: App,
        hub: EventHub,
        executor: Executor | None,
        *,
        authenticate: Authenticate | None = None,
        max_bytes: int = 1_048_576,
        queue_size: int = 256,
    ) -> None:
        self.app = app
        self.hub = hub
        self.executor = executor
        self.authenticate = authenticate
        self.queue_size = queue_size
        self.server = socketio.AsyncServer(
            async_mode="asgi",
            cors_allowed_origins=None,  # a browser page of the gateway's own origin only ([] would allow any)
            max_http_buffer_size=max_bytes,
            serializer=_Packet,
            ping_interval=10,
            ping_timeout=10,
            logger=False,
            engineio_logger=False,
        )
        self.server.on("connect", self._connect)
        self.server.on("disconnect", self._disconnect)
        self.server.on("*", self._message)
        self._clients: dict[str, _SocketClient] = {}
        self._senders: dict[str, asyncio.Task[None]] = {}

    def asgi(self) -> Any:
        """The ASGI application answering ``/socket.io/``."""
        return socketio.ASGIApp(self.server, socketio_path="socket.io")

    # -- connections ------------------------------------------------------------------------------------

    async def _connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        headers = {
            key[5:].lower().replace("_", "-"): str(value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        await self.server.save_session(sid, {"user": None, "authentication": None, "headers": headers})
        client = _SocketClient(self.hub, asyncio.get_running_loop(), self.queue_size, sid, None)
        self._clients[sid] = client
        self._senders[sid] = asyncio.create_task(self._send(client), name=f"socket-{sid}")
        await self.hub.join(client)

    async def _disconnect(self, sid: str, *args: Any) -> None:
        client = self._clients.pop(sid, None)
        sender = self._senders.pop(sid, None)
        if client is not None:
            self.hub.leave(client)
        if sender is not None:
            sender.cancel()

    async def _send(self, client: _SocketClient) -> None:
        while (item := await client.outbox.get()) is not None:
            name, data = item
            try:
                await self.server.emit(name, data, to=client.sid)
                await self._taken(client.sid)
            except Exception:
                log.debug("event %s not sent to socket %s", name, client.sid, exc_info=True)

    async def _taken(self, sid: str) -> None:
        """Wait until the socket's writer took what was emitted to it.

        python-engineio queues each socket's packets without bound and ``emit`` returns once queued; its
        writer takes more only after writing the last ones out. Waiting for it here keeps a stalled
        client's events in its bounded outbox, where they are dropped and counted, instead of piling up
        until its ping timeout. (A socket that closes meanwhile cancels this sender: see ``_disconnect``.)
        """
        eio_sid = self.server.manager.eio_sid_from_sid(sid, "/")
        socket = self.server.eio.sockets.get(eio_sid) if eio_sid is not None else None
        if socket is not None:
            await socket.queue.join()

    # -- calls --------------------------------------------------------------------------------------------

    async def _message(self, method: Any, sid: str, *args: Any) -> tuple[Any, ...]:
        try:
            if not isinstance(method, str) or not args or not isinstance(args[0], str):
                raise BadRequest("Expected emit(method, path, ...args, callback)")
            path, rest = args[0].strip("/"), list(args[1:])
            if path == AUTHENTICATION_PATH:
                return (None, await self._authentication(sid, method, rest))
            return (None, await self._call(sid, method, path, rest))
        except ServiceError as exc:
            return (exc.to_dict(),)
        except Exception:
            log.exception("socket call %r failed", method)
            return (GeneralError("Internal server error").to_dict(),)

    async def _call(self, sid: str, method: str, path: str, args: list[Any]) -> Any:
        session = await self.server.get_session(sid)
        wrapper = self.app.services.get(path)
        if wrapper is None:
            raise NotFound(f"Service '{path}' not found", {"path": path})
        if method not in wrapper.methods:
            raise MethodNotAllowed(f"Method '{method}' not allowed on service '{path}'", {"method": method})
        if self.authenticate is not None and session["user"] is None:
            raise NotAuthenticated("Not authenticated: create on 'authentication' first")
        # Checked at each call, as REST checks its token, rather than by a timer at exp: nothing to cancel
        # when the socket logs in again, out, or goes, and no call slips in before a timer's turn.
        if expired(session["user"]):
            raise NotAuthenticated("Token expired")
        position = _PARAMS_AT.get(method, 1)
        if len(args) > position + 1:
            raise BadRequest(f"Too many arguments for '{method}' method")
        args = args + [None] * (position + 1 - len(args))
        query = args[position] if isinstance(args[position], dict) else {}
        fields = dict(zip(_ARGS.get(method, ("data",)), args[:position], strict=True))
        if isinstance(fields.get("id"), str):
            fields["id"] = parse_id(fields["id"])
        params: dict[str, Any] = {"provider": "socketio", "query": query, "headers": session["headers"]}
        if session["user"] is not None:
            params["user"] = session["user"]
            params["authentication"] = session["authentication"]
        result = await wrapper.acall(
            method, id=fields.get("id"), data=fields.get("data"), params=params, executor=self.executor
        )
        return Encoded(answer(result).decode())

    async def _authentication(self, sid: str, method: str, args: list[Any]) -> Any:
        session = await self.server.get_session(sid)
        if method == "remove":
            answer = {
                "accessToken": None,
                "authentication": session["authentication"],
                "user": session["user"],
            }
            await self.server.save_session(sid, {**session, "user": None, "authentication": None})
            self._set_user(sid, None)
            return answer
        data = args[0] if args else None
        if method != "create" or not isinstance(data, dict):
            raise MethodNotAllowed(f"Method '{method}' not allowed on service '{AUTHENTICATION_PATH}'")
        verify = getattr(self.authenticate, "verify", None)
        if data.get("strategy") != "jwt" or not isinstance(data.get("accessToken"), str):
            raise NotAuthenticated("Expected {strategy: 'jwt', accessToken}")
        if verify is None:
            raise NotAuthenticated("This gateway has no JWT strategy")
        token = data["accessToken"]
        claims = verify(token)
        if inspect.isawaitable(claims):
            claims = await claims
        if claims is None:  # no user: the socket would pass as logged in while it is not
            raise NotAuthenticated("Invalid token")
        authentication = {"strategy": "jwt", "accessToken": token, "payload": claims}
        await self.server.save_session(
            sid, {**session, "user": claims, "authentication": {"strategy": "jwt", "accessToken": token}}
        )
        self._set_user(sid, claims)
        return {"accessToken": token, "authentication": authentication, "user": claims}

    def _set_user(self, sid: str, user: Any) -> None:
        client = self._clients.get(sid)
        if client is not None:
            client.user = user


class _JSON:
    """The JSON module of the transport's packets: written as the gateway's answers are, what was
    encoded beforehand (a result, an event) put in as it is; read as python-socketio reads."""

    loads = staticmethod(socketio.packet.Packet.json.loads)

    @staticmethod
    def dumps(value: Any, **options: Any) -> str:
        if isinstance(value, list):  # a packet's arguments
            return f"[{','.join(_text(item) for item in value)}]"
        return _text(value)


def _text(value: Any) -> str:
    if isinstance(value, Encoded):
        return value.text
    # Errors and the authentication's answers: a detail of no JSON form is shown, not the answer lost.
    return client_json(value, fallback=repr).decode()


class _Packet(socketio.packet.Packet):  # type: ignore[misc]
    """python-socketio's packet, with the JSON module of this server alone (``json=`` sets it for every
    server and client of the process)."""

    json = _JSON
