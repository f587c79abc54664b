"""The HTTP gateway: every service of an app, local or remote, over REST and Server-Sent Events.

- :mod:`.gateway`: the Starlette app (REST routes with Feathers' conventions, healthcheck, live page);
- :mod:`.query`: the query-string parser (``$limit``, ``$in``, ``$or[0][id]`` …);
- :mod:`.sse`: the hub fanning service events out to ``/events`` clients;
- ``static/``: the live page.
"""

from .gateway import EventHub, asgi_app, make_server, serve

__all__ = ["EventHub", "asgi_app", "make_server", "serve"]
