"""Server-Sent Events of an app's services: the ``/events`` response, each one a client of the gateway's
:class:`~.hub.EventHub`, with a heartbeat comment while nothing happens and a ``dropped`` event after events
it could not take; a stream of a user whose token carries ``exp`` ends then (:func:`~.auth.expired`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .auth import expires_at
from .hub import EventHub, HubClient

__all__ = ["EventStream"]


class EventStream(StreamingResponse):
    """The SSE response: registers its client when it starts streaming, forgets it however it ends."""

    def __init__(
        self,
        hub: EventHub,
        paths: frozenset[str],
        events: frozenset[str],
        heartbeat: float,
        user: Any = None,
    ) -> None:
        super().__init__(
            self._messages(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.hub = hub
        self.paths = paths
        self.events = events
        self.heartbeat = heartbeat
        self.user = user
        self.client: HubClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = self.client = self.hub.client(asyncio.get_running_loop(), self.paths, self.events, self.user)
        try:
            await self.hub.join(client)
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            self.hub.leave(client)

    async def _messages(self) -> AsyncIterator[bytes]:
        yield b"retry: 2000\n: connected\n\n"
        client = self.client
        assert client is not None
        reported = 0
        # Its user is authenticated until its token's exp, where the stream ends: the client opens another
        # with a fresh token (EventSource's own retry repeats the URL's expired one, which is refused).
        deadline = expires_at(self.user)
        while (left := deadline - time.time()) > 0:
            try:
                message = await asyncio.wait_for(client.queue.get(), min(self.heartbeat, left))
            except TimeoutError:
                if left > self.heartbeat:
                    yield b": ping\n\n"
                continue
            if message is None:
                return
            if client.dropped != reported:
                reported = client.dropped
                notice = {"path": None, "event": "dropped", "data": {"dropped": reported}}
                yield f"event: dropped\ndata: {json.dumps(notice)}\n\n".encode()
            yield message


# -- REST ---------------------------------------------------------------------------------------------------
