"""What the gateway sends its clients, REST answers and Socket.IO acks, SSE and Socket.IO events: the JSON
of the wire (:func:`~..distribution.protocol.client_json`), so a value reaches a browser as it reaches a
remote caller (dates in ISO 8601, UUIDs, decimals…), whether its service is local or remote.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ..core.errors import GeneralError
from ..distribution.protocol import client_json

__all__ = ["Encoded", "Event", "answer"]

log = logging.getLogger("celery_services.http")


class Encoded:
    """JSON text encoded beforehand, which a transport puts in its message as it is."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def answer(result: Any) -> bytes:
    """The JSON of a call's result.

    Raises:
        GeneralError: the result has no JSON form. Logged: the call may have changed something all the
            same (a create stored), which its caller, told only of an error, may try again.
    """
    try:
        return client_json(result)
    except ValueError as exc:
        log.warning("a result is not JSON serializable, answered as an error: %s", exc)
        raise GeneralError(f"The result is not JSON serializable: {exc}") from None


class Event:
    """One service event as the transports send it, encoded once (on the first client that takes it),
    however many clients take it."""

    def __init__(self, path: str, name: str, data: Any) -> None:
        self.path = path
        self.name = name
        self.data = data

    @functools.cached_property
    def encoded(self) -> Encoded | None:
        """The JSON of its data; ``None`` when it has none (logged once: the event goes to nobody)."""
        try:
            return Encoded(client_json(self.data).decode())
        except ValueError as exc:
            log.warning("event %s of %s is not JSON serializable, not sent: %s", self.name, self.path, exc)
            return None

    @functools.cached_property
    def sse(self) -> bytes | None:
        """The Server-Sent Events message: ``event:`` its name, ``data:`` ``{"path", "event", "data"}``."""
        if self.encoded is None:
            return None
        path, name = client_json(self.path).decode(), client_json(self.name).decode()
        body = f'{{"path":{path},"event":{name},"data":{self.encoded.text}}}'
        return f"event: {self.name}\ndata: {body}\n\n".encode()
