"""The HTTP gateway: every service of an app, local or remote, over REST and Server-Sent Events.

- :mod:`.gateway`: the Starlette app (REST routes with Feathers' conventions, healthcheck, live page);
- :mod:`.auth`: who is calling (the authenticate step, :class:`JWTAuthentication` and its settings);
- :mod:`.query`: the query-string parser (``$limit``, ``$in``, ``$or[0][id]`` …);
- :mod:`.hub`: the hub fanning service events out to the gateway's clients, through the publish filters;
- :mod:`.sse`: the ``/events`` stream of one client of the hub;
- :mod:`.sockets`: Feathers' socket protocol over Socket.IO;
- :mod:`.encoding`: what the gateway sends, in the JSON of the wire;
- ``static/``: the live page.
"""

from .auth import Authenticate, JWTAuthentication, JWTSettings
from .gateway import EventHub, asgi_app, make_server, serve

__all__ = [
    # serving
    "asgi_app",
    "make_server",
    "serve",
    "EventHub",
    # authentication
    "Authenticate",
    "JWTAuthentication",
    "JWTSettings",
]
