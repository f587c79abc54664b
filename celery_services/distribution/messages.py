"""Celery protocol-v2 task messages and task events, as kombu's Redis transport stores them.

The fast path (:mod:`.fastpath`) and the caller (:mod:`.caller`) read and write these bytes straight on the
Redis connection, so that a call costs one round trip each way instead of kombu's consumer loop. What they
write is what ``send_task`` and a worker's event dispatcher write (checked by the tests against both; a call
leaves out the optional headers Celery writes at their defaults), so a plain ``celery worker`` serves a call
the caller queued here, and Flower reads the events.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from kombu.compression import decompress

from .protocol import dumps, loads, payload_size

__all__ = [
    "DEFAULT_HEADERS",
    "EMBED",
    "KEEP",
    "NO_EMBED",
    "MalformedMessage",
    "TaskMessage",
    "call_message",
    "decode_task",
    "encode_event",
    "encode_task",
    "event_json",
    "mark_redelivered",
    "task_message",
]

#: Header a redelivery increments (the library's own; kombu's ``redelivered`` flag is set too).
HEADER_REDELIVERED = "cs_redelivered"
#: Seconds kombu's Redis transport keeps an unacknowledged message before giving it back (Celery's default
#: visibility timeout, which the library leaves alone): the bookkeeping of calls in flight (leases, the fast
#: path's in-flight lists and instances) outlives its last renewal as long.
KEEP = 3600


class MalformedMessage(ValueError):
    """Bytes on a call queue that are not a Celery protocol-v2 task message in JSON."""


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """A task message read from a queue: Celery's headers, its arguments, kombu's delivery info, the size
    in bytes of its ``[args, kwargs, embed]`` body, and whether the broker says it was delivered before."""

    headers: dict[str, Any]
    args: list[Any]
    kwargs: dict[str, Any]
    properties: dict[str, Any]
    size: int
    redelivered: bool = False

    @property
    def id(self) -> str:
        """The task id (a call's call id)."""
        return str(self.headers["id"])

    @property
    def name(self) -> str:
        """The task name, ``{key}.{path}.{method}`` for a call."""
        return str(self.headers["task"])


#: The ``embed`` part of a task body without callbacks, errbacks, chain or chord (and in JSON).
EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
NO_EMBED = json.dumps(EMBED)


#: The optional headers of Celery's protocol v2 that a call leaves out, with the value Celery writes for a
#: call: a worker treats each absent one as that value (its ``Request`` reads the same, and the task's
#: context reads ``None`` for the empty time limits and stamps).
#: On RabbitMQ every header costs py-amqp's pure-Python table codec on both sides: leaving these eight
#: out took 1-6% off a call's p50 there (interleaved A/B runs).
DEFAULT_HEADERS: dict[str, Any] = {
    "shadow": None,
    "eta": None,
    "group_index": None,
    "retries": 0,
    "timelimit": [None, None],
    "replaced_task_nesting": 0,
    "stamped_headers": None,
    "stamps": {},
}


def call_message(
    name: str, call_id: str, deadline: float, kwargsrepr: str, origin: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The headers and properties of a call task, as ``celery.amqp.create_task_message`` makes them for
    ``(call_id, name, (), kwargs, expires=..., ignore_result=True, argsrepr="()", kwargsrepr=...)``, less
    the headers of :data:`DEFAULT_HEADERS`.

    Written here, not asked of Celery: its version costs a third of a call's time on the caller (dates
    made aware and converted, routing options); ``tests/test_messages.py`` holds the two equal, and a
    Celery worker's reading of both the same.
    """
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": call_id,
        "expires": dt.datetime.fromtimestamp(deadline, tz=dt.UTC).isoformat(),
        "group": None,
        "root_id": call_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": kwargsrepr,
        "origin": origin,
        "ignore_result": True,
    }
    properties = {
        "correlation_id": call_id,
        "reply_to": "",
        "expiration": str(max(int((deadline - time.time()) * 1000), 1)),
    }
    return headers, properties


def encode_task(headers: dict[str, Any], properties: dict[str, Any], body: str, queue: str) -> bytes:
    """The bytes kombu's Redis transport ``LPUSH``es for ``celery.amqp.create_task_message(...)``'s parts.

    ``body`` is the ``[args, kwargs, embed]`` triple in JSON, serialized once, by the caller (see
    :func:`_kombu_message`);
    ``properties`` gets kombu's delivery fields (a delivery tag, the default exchange and ``queue`` as
    routing key, priority 0: the queue's own list). The tag is the call's id (its ``correlation_id``):
    unique to the call already, so no second uuid is made per call; a redelivery gets a fresh one
    (:func:`mark_redelivered`).
    """
    delivery = {
        **properties,
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "utf-8",
        "delivery_tag": properties.get("correlation_id") or str(uuid.uuid4()),
    }
    return _kombu_message(body, headers, delivery)


def _kombu_message(body: str, headers: dict[str, Any], properties: dict[str, Any]) -> bytes:
    """A message as kombu's Redis transport writes it, its JSON ``body`` kept as text (``body_encoding``
    ``utf-8``, which every kombu consumer reads) rather than base64.

    The body is written into the message by hand: ``json.dumps`` of the body's JSON would scan a large call
    once more, at 2 ns a character, only to escape its quotes and backslashes. Nothing else needs escaping
    in JSON text an encoder wrote without indentation: its control characters are escaped already, and any
    other character may stand in a JSON string as it is. Looking for a backslash first costs 1 us for
    100 KB; replacing none of them, 40.
    """
    text = body.replace("\\", "\\\\") if "\\" in body else body
    text = text.replace('"', '\\"')
    rest = {
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    return f'{{"body": "{text}", {dumps(rest)[1:]}'.encode()


def decode_task(raw: bytes) -> TaskMessage:
    """Read a task message as kombu's Redis transport stored it.

    Raises:
        MalformedMessage: not JSON, not protocol v2 (``headers.task`` and ``headers.id``), a compressed body
            that does not decompress, or a body that is not ``[args, kwargs, embed]`` in JSON.
    """
    try:
        message = loads(raw)
        headers = message["headers"]
        body = message["body"]
        properties = message.get("properties") or {}
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise MalformedMessage(f"unreadable task message: {type(exc).__name__}: {exc}") from None
    if isinstance(headers, dict) and headers.get("compression"):
        # send_task(..., compression="zlib"): undone as kombu's Message undoes it for Celery's consumer.
        try:
            body = decompress(body, headers["compression"])  # type: ignore[no-untyped-call]
        except Exception as exc:  # an unknown scheme (KeyError), corrupt data (each codec's own error)
            raise MalformedMessage(f"task body not decompressed: {type(exc).__name__}: {exc}") from None
    if message.get("content-type") != "application/json":
        raise MalformedMessage(f"content type {message.get('content-type')!r} is not JSON")
    return task_message(headers, body, properties)


def task_message(headers: Any, body: str | bytes, properties: dict[str, Any]) -> TaskMessage:
    """A protocol-v2 task message from its headers and its JSON ``[args, kwargs, embed]`` body.

    Raises:
        MalformedMessage: the headers name no task or id, or the body is not that triple in JSON.
    """
    if not isinstance(headers, dict) or "task" not in headers or "id" not in headers:
        raise MalformedMessage("no task name or id in its headers (not Celery's protocol v2)")
    try:
        args, kwargs, _embed = loads(body)
    except (ValueError, TypeError) as exc:
        raise MalformedMessage(f"unreadable task body: {type(exc).__name__}: {exc}") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise MalformedMessage("its body is not [args, kwargs, embed]")
    return TaskMessage(headers, args, kwargs, properties, payload_size(body))


def mark_redelivered(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` (kombu's Redis form) as given back to its queue: redelivery counted, with a new tag.

    The new delivery tag keeps a late ack of the paused holder from removing anything of the new delivery.
    """
    headers = message.setdefault("headers", {})
    headers[HEADER_REDELIVERED] = int(headers.get(HEADER_REDELIVERED) or 0) + 1
    properties = message.setdefault("properties", {})
    properties["delivery_tag"] = str(uuid.uuid4())
    properties.setdefault("delivery_info", {})["redelivered"] = True
    return message


def encode_event(event: dict[str, Any], hostname: str, exchange: str) -> bytes:
    """The bytes a worker's event dispatcher publishes on Redis for ``event`` (a dict with its ``type``) to
    the event exchange ``exchange``; a task's event carries its ``uuid``, which serves as the delivery tag:
    one event per call on the fast path."""
    properties = {
        "delivery_mode": 1,
        "delivery_info": {"exchange": exchange, "routing_key": event["type"].replace("-", ".")},
        "priority": 0,
        "body_encoding": "utf-8",
        "delivery_tag": str(event.get("uuid") or uuid.uuid4()),
    }
    return _kombu_message(event_json(event), {"hostname": hostname}, properties)


def event_json(event: dict[str, Any]) -> str:
    """A task event in JSON, as Flower reads it.

    pydantic's encoder, a quarter of ``json.dumps``'s time for a call's event (2 us against 7), save for
    an error's message or traceback holding a lone surrogate, which only ``json.dumps`` writes (escaped).
    """
    try:
        return dumps(event)
    except ValueError:
        return json.dumps(event)
