"""A FastAPI app of your own that mounts the gateway and awaits a remote service from its own route.

It uses the services of ``my-app`` (run ``celery-services worker workers.articles:app``) like the example
gateway, and adds a route of its own, ``GET /summary``, which awaits the remote ``articles`` service: no
thread is held while the call travels. Serve it with uvicorn (``pip install 'celery-services[fastapi]'``)::

    uvicorn workers.fastapi_app:web --port 8000

``/summary`` is the app's own; every other path (``/articles``, ``/events``, the page at ``/``) is the
gateway's: REST with Feathers' conventions, Server-Sent Events and Socket.IO.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from celery_services import App, distribute, finalize
from celery_services.distribution.settings import DistributionSettings
from celery_services.http import asgi_app


def create(settings: DistributionSettings | None = None) -> FastAPI:
    """The FastAPI app, with its own services app distributed on startup and finalized on shutdown."""
    api = App()
    gateway = asgi_app(api)

    @asynccontextmanager
    async def lifespan(web: FastAPI) -> AsyncIterator[None]:
        distribute(api, settings or DistributionSettings.load("config/gateway.toml"))
        try:
            yield
        finally:
            gateway.state.hub.close()  # ends the /events streams
            finalize(api)
            gateway.state.executor.shutdown(wait=False)

    web = FastAPI(title="celery-services with FastAPI", lifespan=lifespan)
    web.state.api = api

    @web.get("/summary")
    async def summary(limit: int = 5) -> dict[str, Any]:
        # The remote service, awaited: the event loop serves other requests while the call travels.
        articles = api.service("articles").aio
        found = await articles.find({"query": {"$limit": limit, "$sort": {"id": -1}}})
        return {"latest": [article.get("title") for article in found], "count": len(found)}

    web.mount("/", gateway)  # the gateway: the routes of the app above come first
    return web


web = create()
