"""HTTP gateway: every service of an app over REST with Feathers' conventions, its events over SSE.

:func:`asgi_app` builds a Starlette application serving the services mounted on an :class:`~.App` — local
services and remote proxies alike, resolved at each request, so services mounted or removed later are
served (or gone) at once::

    GET    /articles?title=x&$limit=5    find       (query string: see celery_services.http.query)
    GET    /articles/1                   get        ("1" → 1: an integer string id becomes an int)
    POST   /articles                     create     (201)
    POST   /articles + X-Service-Method: publish_article   a custom method (data = the body)
    PUT    /articles/1                   update
    PATCH  /articles/1                   patch      (PATCH /articles?… patches every match)
    DELETE /articles/1                   remove     (DELETE /articles?… removes every match)
    GET    /events?path=articles&event=created          Server-Sent Events of every service
    GET    /distribution/healthcheck[/{key}]            {path: bool}: 200, 404 unknown key, 503 unhealthy
    GET    /health                       200 {"status": "ok"}: the gateway itself answers (liveness)
    GET    /                             a live page of the articles (static/index.html), over Socket.IO
    /socket.io/                          Feathers' socket protocol (celery_services.http.sockets)

Service paths may be nested (``api/v1/users``); the longest mounted path that prefixes the URL wins, and
at most one segment may follow it: the id (percent-encoded, so ``a%2Fb`` is the id ``a/b``). Ids made of
an optional ``-`` and at most 18 digits without a leading zero become ints; any other id stays a string.
``events`` and ``distribution/healthcheck`` are answered by the gateway itself for ``GET``.

Requests: the body is JSON (an empty body reads as ``{}``, as Feathers' body parser gives);
``X-Service-Method`` must name a custom method of the service (standard methods have their verbs); ``POST``
to an id and verbs other than these are a 405, whose ``Allow`` lists the verbs of the path. ``HEAD`` answers
as ``GET`` without the body. Every call carries ``params = {"provider": "rest", "query":
{...}, "headers": {lowercased headers}}`` plus ``"authentication": {"strategy": "jwt", "accessToken": t}``
for ``Authorization: Bearer t``. Calls are awaited (:meth:`~.ServiceWrapper.acall`): a remote proxy's on
asyncio clients and an ``async def`` service's on the loop, holding no thread while they wait; a blocking
service runs in one of the gateway's own threads (at most ``threads`` at once), never on the event loop. A
result of ``None`` answers 204, any other its JSON as the wire writes it (:mod:`.encoding`).

Authentication: ``asgi_app(app, authenticate=...)`` turns each REST call and ``/events`` request into a user
(``params["user"]``) or refuses it with a 401 (:mod:`celery_services.http.auth`); the healthcheck and the
page stay public. Without it every client is anonymous.

Errors answer the JSON of :meth:`~.ServiceError.to_dict` with the error's code as HTTP status: unknown path
404, method not offered 405, body not JSON 400, body over ``max_body_bytes`` 413 (from ``Content-Length``,
and counted while reading), remote timeout 408, dead provider 503; any other exception is logged and
answers a 500 ``GeneralError`` that reveals nothing of it.

Events: ``/events`` streams ``event: <event>`` / ``data: {"path", "event", "data"}`` messages of every
mounted service, local or remote, including services mounted after the client connected; ``path`` and
``event`` (repeated or comma-separated) filter them. Each client has a bounded queue fed from the emitting
threads with ``loop.call_soon_threadsafe``; an event for a full queue is dropped and counted, and the
client then receives a ``dropped`` event (``"path": null``, ``"data": {"dropped": n}``: its cue to
reload), so a slow client never holds back the services or the other clients. A ``: ping`` comment is sent
every ``heartbeat`` seconds.
The :class:`EventHub` listens to the services only while clients are connected.

One piece, past 300 lines: the routes of one Starlette application and the error mapping they share; the
query-string parser and the event hub are modules of their own.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from ..core.app import App
from ..core.errors import (
    ERRORS,
    BadRequest,
    GeneralError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
)
from ..core.service import ServiceWrapper
from ..distribution.protocol import client_json
from .auth import TOKEN_IN_QUERY, Authenticate, authenticate_request, warn_if_anonymous
from .encoding import answer
from .hub import EventHub
from .metrics import metrics_endpoint
from .query import Coerce, parse_id, parse_query
from .sockets import SocketTransport
from .sse import EventStream

__all__ = ["EventHub", "asgi_app", "make_server", "serve"]

log = logging.getLogger("celery_services.http")

T = TypeVar("T")

_JSON = "application/json"
#: The method each verb calls on a service (no id) and on one of its items; other verbs answer a 405.
_ON_SERVICE = {
    "GET": "find",
    "HEAD": "find",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "remove",
}
_ON_ITEM = {"GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "remove"}
_BEARER = re.compile(r"^\s*(?:Bearer|JWT)\s+(\S+)\s*$", re.IGNORECASE)
_PREFIX = re.compile(r"^(/[A-Za-z0-9_.~-]+)*$")
_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "socket.io.min.js": "text/javascript; charset=utf-8",  # socket.io-client 4.8 (MIT), served locally
    "style.css": "text/css; charset=utf-8",
}


def _json_response(body: Any, status: int = 200) -> Response:
    # An error's detail of no JSON form is shown, rather than the error lost.
    return Response(client_json(body, fallback=repr), status_code=status, media_type=_JSON)


def _error_response(exc: BaseException, request: Request | None = None) -> Response:
    if isinstance(exc, ServiceError):
        error = exc
    else:
        where = f"{request.method} {request.url.path}" if request is not None else "HTTP request"
        log.error("%s failed", where, exc_info=exc)
        error = GeneralError("Internal server error")
    status = error.code if 400 <= error.code <= 599 else 500
    response = _json_response(error.to_dict(), status)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _decode(body: bytes) -> Any:
    if not body.strip():
        return {}
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _authentication(header: str | None) -> dict[str, str] | None:
    if not header:
        return None
    match = _BEARER.match(header)
    return {"strategy": "jwt", "accessToken": match.group(1)} if match else None


def _normalize_prefix(prefix: str) -> str:
    stripped = prefix.strip("/")
    normalized = f"/{stripped}" if stripped else ""
    if not _PREFIX.match(normalized):
        raise ValueError(f"invalid prefix {prefix!r}: use URL-safe segments joined by '/'")
    return normalized


class _Gateway:
    """The request handlers of one :func:`asgi_app`."""

    def __init__(
        self,
        app: App,
        prefix: str,
        max_body_bytes: int,
        coerce: Coerce,
        threads: int,
        hub: EventHub,
        heartbeat: float,
        authenticate: Authenticate | None,
    ) -> None:
        self.app = app
        self.authenticate = authenticate
        self.prefix = prefix
        self.max_body_bytes = max_body_bytes
        self.coerce: Coerce = coerce
        self.threads = threads
        self.hub = hub
        self.heartbeat = heartbeat
        # A pool of our own, of fixed threads, for blocking services (remote and async ones hold none): the
        # remote transport keeps one broker connection per calling thread (a blocking service's nested calls),
        # so threads that come and go (anyio's idle workers exit after 10 s) would leave connections behind;
        # and service calls never compete with Starlette's own thread pool.
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="celery-services-http")

    async def in_thread(self, function: Callable[[], T]) -> T:
        """Run blocking ``function`` in one of the gateway's ``threads`` (context variables included)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self.executor, context.run, function)

    async def invoke(
        self, wrapper: ServiceWrapper, method: str, id: Any, data: Any, params: dict[str, Any]
    ) -> Any:
        """Call a service for a request without holding a thread while a remote or async call waits (a
        blocking service runs in the gateway's threads)."""
        return await wrapper.acall(method, id=id, data=data, params=params, executor=self.executor)

    # services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The service route as an ASGI app, which Starlette routes whatever the verb (a function, only for
        # the verbs it is given): _method refuses, saying in Allow what the path takes.
        response = await self.service(Request(scope, receive))
        await response(scope, receive, send)

    async def service(self, request: Request) -> Response:
        try:
            response = await self._service(request)
        except ClientDisconnect:  # gone while sending its body: nobody reads the answer
            return Response(status_code=400)
        except Exception as exc:
            response = _error_response(exc, request)
        if request.method.upper() == "HEAD":  # GET's headers (its Content-Length too), whatever the server
            response.body = b""
        return response

    async def _service(self, request: Request) -> Response:
        self._check_length(request)
        wrapper, id = self._resolve(request)
        try:
            method = self._method(request, wrapper, id)
        except MethodNotAllowed as exc:
            response = _error_response(exc, request)
            response.headers["Allow"] = _allowed(wrapper, id)
            return response
        user = await authenticate_request(self.authenticate, request)
        data = await self._body(request) if request.method in ("POST", "PUT", "PATCH") else None
        query = parse_query(request.url.query, coerce=self.coerce)
        params = self._params(request, query)
        if user is not None:
            params["user"] = user

        result = await self.invoke(wrapper, method, id, _decode(data) if data is not None else None, params)
        if result is None:
            return Response(status_code=204)
        return Response(answer(result), status_code=201 if method == "create" else 200, media_type=_JSON)

    def _check_length(self, request: Request) -> None:
        length = request.headers.get("content-length")
        if length is None:
            return
        if not length.strip().isdigit():
            raise BadRequest("Invalid Content-Length header")
        if int(length) > self.max_body_bytes:
            raise PayloadTooLarge(
                f"The body is {int(length)} bytes, over the {self.max_body_bytes} byte limit",
                {"size": int(length), "limit": self.max_body_bytes},
            )

    async def _body(self, request: Request) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(
                    f"The body is over the {self.max_body_bytes} byte limit", {"limit": self.max_body_bytes}
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _segments(self, request: Request) -> list[str]:
        """The URL path after the prefix, split into percent-decoded segments (``%2F`` stays in its one)."""
        scope = request.scope
        start = str(scope.get("root_path", "")) + self.prefix
        raw = scope.get("raw_path")
        text = raw.decode("latin-1") if isinstance(raw, bytes) else quote(str(scope["path"]))
        if not text.startswith(start):  # a proxy rewrote the path: use the decoded one
            text = quote(str(request.path_params.get("path", "")))
            start = ""
        try:
            return [unquote(part, errors="strict") for part in text[len(start) :].split("/") if part]
        except UnicodeDecodeError:
            raise BadRequest("The URL path is not valid UTF-8") from None

    def _resolve(self, request: Request) -> tuple[ServiceWrapper, int | str | None]:
        segments = self._segments(request)
        services = self.app.services
        for end in range(len(segments), 0, -1):
            wrapper = services.get("/".join(segments[:end]))
            if wrapper is None:
                continue
            rest = segments[end:]
            if len(rest) <= 1:
                return wrapper, parse_id(rest[0]) if rest else None
            break
        path = "/".join(segments)
        raise NotFound(f"Page not found: '{path}'", {"path": path})

    def _method(self, request: Request, wrapper: ServiceWrapper, id: int | str | None) -> str:
        verb = request.method.upper()
        method = (_ON_SERVICE if id is None else _ON_ITEM).get(verb)
        if method is None:
            where = f"'{wrapper.path}'" if id is None else f"an id of '{wrapper.path}'"
            raise MethodNotAllowed(f"HTTP method {verb} is not allowed on {where}", {"method": verb})
        if method == "create" and (custom := request.headers.get("x-service-method")):
            method = custom.strip()
            if method not in wrapper.custom_methods:
                raise MethodNotAllowed(
                    f"Method '{method}' is not a custom method of '{wrapper.path}'", {"method": method}
                )
        if method not in wrapper.methods:
            raise MethodNotAllowed(
                f"Method '{method}' is not offered by service '{wrapper.path}'", {"method": method}
            )
        return method

    def _params(self, request: Request, query: dict[str, Any]) -> dict[str, Any]:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        params: dict[str, Any] = {"provider": "rest", "query": query, "headers": headers}
        authentication = _authentication(headers.get("authorization"))
        if authentication is not None:
            params["authentication"] = authentication
        return params

    # events, health, page

    async def events(self, request: Request) -> Response:
        def wanted(name: str) -> frozenset[str]:
            values = request.query_params.getlist(name)
            return frozenset(item.strip() for value in values for item in value.split(",") if item.strip())

        request.scope[TOKEN_IN_QUERY] = True  # EventSource cannot send headers: ?access_token= is read here
        try:
            user = await authenticate_request(self.authenticate, request)
        except Exception as exc:
            return _error_response(exc, request)
        return EventStream(self.hub, wanted("path"), wanted("event"), self.heartbeat, user)

    async def healthcheck(self, request: Request) -> Response:
        key = request.path_params.get("key")
        distribution = self.app.distribution

        def check() -> dict[str, bool]:
            if distribution is None:
                if key is not None:
                    raise NotFound(f"No remote services of key '{key}'", {"key": key})
                return {}
            return distribution.healthcheck(key)

        try:
            return _json_response(await self.in_thread(check))
        except Unavailable as exc:
            if isinstance(exc.data, dict):
                return _json_response(exc.data, 503)
            return _error_response(exc)
        except Exception as exc:
            return _error_response(exc, request)

    async def page(self, request: Request) -> Response:
        return Response(
            _asset("index.html"), media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
        )

    async def asset(self, request: Request) -> Response:
        name = str(request.path_params["name"])
        if name not in _ASSETS:
            return _error_response(NotFound(f"No static file '{name}'"))
        return Response(_asset(name), media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})


def _allowed(wrapper: ServiceWrapper, id: int | str | None) -> str:
    """The ``Allow`` of a 405: the verbs of what ``wrapper`` offers (POST: create or a custom method)."""
    verbs = _ON_SERVICE if id is None else _ON_ITEM
    offered = {*wrapper.methods, *(["create"] if wrapper.custom_methods else [])}
    return ", ".join(verb for verb, method in verbs.items() if method in offered)


@functools.cache
def _asset(name: str) -> str:
    return (resources.files("celery_services.http") / "static" / name).read_text(encoding="utf-8")


async def _alive(request: Request) -> Response:
    # The gateway's own liveness (a container healthcheck): no provider is asked.
    return _json_response({"status": "ok"})


async def _http_error(request: Request, exc: Exception) -> Response:
    # Only Starlette's own routing errors reach here (the handlers answer theirs): 404 and 405.
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    error_class = next(
        (cls for cls in ERRORS.values() if cls.code == status and cls is not ServiceError), GeneralError
    )
    return _error_response(error_class(f"{request.method} {request.url.path}: {status}", {"status": status}))


def asgi_app(
    app: App,
    *,
    prefix: str = "",
    max_body_bytes: int = 1_048_576,
    coerce: Coerce = "operators",
    threads: int = 64,
    heartbeat: float = 15.0,
    queue_size: int = 256,
    page: bool = True,
    authenticate: Authenticate | None = None,
    sockets: bool = True,
) -> Starlette:
    """A Starlette application serving every service mounted on ``app`` over REST, and their events.

    Args:
        app: the app whose services are served (resolved per request: later mounts are served too).
        prefix: URL prefix of the services, ``/events`` and ``/distribution/healthcheck`` (``"/api"``);
            the page stays at ``/``.
        max_body_bytes: largest request body accepted (413 beyond it).
        coerce: which query-string values become numbers / booleans / null besides ``$limit``, ``$skip``
            and ``$sort``: ``"operators"`` (values of ``$gt``, ``$in``…), ``"all"`` or ``"none"``
            (see :mod:`celery_services.http.query`).
        threads: blocking service calls running at once (in the gateway's threads); remote proxies and
            ``async def`` services are awaited and take none.
        heartbeat: seconds between two ``: ping`` comments on an idle ``/events`` stream.
        queue_size: events pending per ``/events`` client before new ones are dropped for it.
        page: serve the example page at ``/`` (and its files at ``/static/``).
        authenticate: the step turning each REST call and ``/events`` request into a user, or refusing it
            (:mod:`celery_services.http.auth`: :class:`~.auth.JWTAuthentication` or your own callable);
            its user is ``params["user"]``, and events go only to clients with a user (and among them to
            those the publish filters accept). ``None``: every client is anonymous.
        sockets: serve Feathers' socket protocol at ``/socket.io/`` (:mod:`celery_services.http.sockets`).

    Returns:
        The application; ``.state.hub`` is its :class:`EventHub`, ``.state.executor`` the thread pool
        of its service calls.
    """
    if max_body_bytes < 0:
        raise ValueError("max_body_bytes must not be negative")
    if threads < 1:
        raise ValueError("threads must be at least 1")
    if heartbeat <= 0:
        raise ValueError("heartbeat must be positive")
    base = _normalize_prefix(prefix)
    hub = EventHub(app, queue_size=queue_size, requires_user=authenticate is not None)
    gateway = _Gateway(app, base, max_body_bytes, coerce, threads, hub, heartbeat, authenticate)
    routes: list[BaseRoute] = [
        Route("/health", _alive, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),  # Prometheus (http/metrics.py)
        Route(f"{base}/events", gateway.events, methods=["GET"]),
        Route(f"{base}/distribution/healthcheck", gateway.healthcheck, methods=["GET"]),
        Route(f"{base}/distribution/healthcheck/{{key}}", gateway.healthcheck, methods=["GET"]),
    ]
    if page:
        routes += [
            Route("/", gateway.page, methods=["GET"]),
            Route("/static/{name}", gateway.asset, methods=["GET"]),
        ]
    if sockets:
        transport = SocketTransport(
            app,
            hub,
            gateway.executor,
            authenticate=authenticate,
            max_bytes=max_body_bytes,
            queue_size=queue_size,
        )
        routes.append(Mount("/socket.io", app=transport.asgi()))
    routes.append(Route(f"{base}/{{path:path}}", gateway))
    starlette = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    starlette.state.hub = hub
    starlette.state.executor = gateway.executor
    return starlette


class _Server(uvicorn.Server):
    """A uvicorn server that ends the ``/events`` streams first when it shuts down, and its threads last."""

    def __init__(self, config: uvicorn.Config, application: Starlette) -> None:
        super().__init__(config)
        self.application = application

    async def shutdown(self, sockets: Any = None) -> None:
        self.application.state.hub.close()
        await super().shutdown(sockets)
        self.application.state.executor.shutdown(wait=False)


def make_server(
    app: App, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", **options: Any
) -> uvicorn.Server:
    """A uvicorn server for :func:`asgi_app` ``(app, **options)``; ``run()`` it, set ``should_exit`` to stop.

    ``port=0`` picks a free port: read it from ``server.servers[0].sockets[0].getsockname()`` once
    ``server.started``. Open ``/events`` streams are ended on shutdown, so it never waits for them.
    Without ``authenticate``, a warning is logged when ``host`` is not loopback.
    """
    application = asgi_app(app, **options)
    warn_if_anonymous(host, options.get("authenticate"))
    config = uvicorn.Config(
        application, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, lifespan="off"
    )
    return _Server(config, application)


def serve(
    app: App, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", **options: Any
) -> None:
    """Serve ``app`` over HTTP with uvicorn until interrupted (``options`` go to :func:`asgi_app`).

    The app stays distributed when it returns: ``finalize(app)`` is the caller's.
    """
    make_server(app, host, port, log_level=log_level, **options).run()
