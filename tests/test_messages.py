"""The bytes the caller and the fast path write are the ones Celery and kombu write (no broker needed)."""

from __future__ import annotations

import json
import time
import uuid

from celery import Celery
from celery.app.task import Context
from celery.worker.request import Request
from kombu.message import Message as KombuMessage

from celery_services.distribution.messages import (
    DEFAULT_HEADERS,
    NO_EMBED,
    call_message,
    decode_task,
    encode_event,
    encode_task,
    mark_redelivered,
)
from celery_services.distribution.protocol import dumps

VOLATILE = {"expires", "origin"}  # a moment and a node name: compared apart


def test_call_message_is_celerys_own_task_message_less_its_defaults() -> None:
    celery = Celery(set_as_current=False)
    call_id, name, deadline = str(uuid.uuid4()), "key.articles.get", time.time() + 5
    kwargs = {"id": 1, "data": None, "params": {}}
    theirs = celery.amqp.create_task_message(
        call_id,
        name,
        (),
        kwargs,
        expires=deadline - time.time(),
        ignore_result=True,
        create_sent_event=False,
        argsrepr="()",
        kwargsrepr="{...}",
    )
    headers, properties = call_message(name, call_id, deadline, "{...}", "gen1@host")
    assert {k: v for k, v in headers.items() if k not in VOLATILE} == {
        k: v for k, v in theirs.headers.items() if k not in VOLATILE | set(DEFAULT_HEADERS)
    }
    # What is left out is what Celery writes for a call anyway.
    assert {k: theirs.headers[k] for k in DEFAULT_HEADERS} == DEFAULT_HEADERS
    assert abs(_epoch(headers["expires"]) - _epoch(theirs.headers["expires"])) < 1
    assert {k: properties[k] for k in theirs.properties} == theirs.properties
    assert json.loads(NO_EMBED) == theirs.body[2]


def test_a_celery_worker_reads_a_call_as_it_reads_celerys_own_message() -> None:
    """Each header a call leaves out is read by a worker, and by the task's context, as the value Celery
    would have sent: no time limits, no retries, no ETA, no shadow name, no stamps, no nesting."""
    celery = Celery(set_as_current=False)

    @celery.task(name="key.articles.get", shared=False)
    def get(**kwargs: object) -> object:
        return kwargs

    call_id, deadline = str(uuid.uuid4()), time.time() + 5
    theirs = celery.amqp.create_task_message(
        call_id, get.name, (), {"id": 1}, expires=5, ignore_result=True, argsrepr="()", kwargsrepr="{...}"
    )
    ours, _ = call_message(get.name, call_id, deadline, "{...}", "gen1@host")

    def read(headers: dict[str, object]) -> tuple[Request, Context]:
        message = KombuMessage(
            body=json.dumps(theirs.body),
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
            properties=dict(theirs.properties),
            delivery_info={},
        )
        request = Request(message, app=celery, task=get)
        return request, Context(request.request_dict)

    (request, context), (celerys, celerys_context) = read(ours), read(theirs.headers)
    for attribute in ("name", "eta", "group_index", "stamps", "stamped_headers", "replaced_task_nesting"):
        assert getattr(request, attribute) == getattr(celerys, attribute), attribute
    assert tuple(request.time_limits) == tuple(celerys.time_limits) == (None, None)
    assert request.ignore_result and request.kwargsrepr == celerys.kwargsrepr
    for header in DEFAULT_HEADERS:
        # None where Celery's own message says "none" in another spelling ([None, None], {}).
        value, celerys_value = getattr(context, header), getattr(celerys_context, header)
        assert value == celerys_value or (value is None and not any(celerys_value or ())), header


def test_a_task_message_reads_back_whatever_its_body_holds() -> None:
    values = ['x"y\\z', "é\n\t", {"a": [1, 'q"\\']}, "\u2028", None, "日本 \x7f \U0001f600 \\u00e9"]
    # As the caller writes a call (non-ASCII as UTF-8, compact), and as json.dumps would (ASCII escapes).
    for data, encode in [(value, encode) for value in values for encode in (dumps, json.dumps)]:
        body = f"[[], {encode({'data': data})}, {NO_EMBED}]"
        raw = encode_task({"task": "t", "id": "1"}, {}, body, "queue")
        message = json.loads(raw)
        assert message["body"] == body  # as kombu reads it: the body text, utf-8 body encoding
        assert message["properties"]["body_encoding"] == "utf-8"
        assert message["properties"]["delivery_info"] == {"exchange": "", "routing_key": "queue"}
        read = decode_task(raw)
        assert read.kwargs == {"data": data} and read.name == "t" and read.id == "1"
    # A plain Celery caller's json.dumps escapes a lone surrogate, which only json.loads reads: read too.
    body = json.dumps([[], {"data": "\ud800"}, json.loads(NO_EMBED)])
    assert decode_task(encode_task({"task": "t", "id": "1"}, {}, body, "queue")).kwargs == {"data": "\ud800"}


def test_a_task_event_reads_back_as_the_worker_dispatcher_writes_it() -> None:
    event = {"type": "task-succeeded", "uuid": "c1", "result": '{"a": "q\\"\\\\"}', "kwargs": "{'t': 'é'}"}
    message = json.loads(encode_event(event, "w@host", "celeryev"))
    assert json.loads(message["body"]) == event
    assert message["headers"] == {"hostname": "w@host"}
    assert message["properties"]["delivery_info"] == {"exchange": "celeryev", "routing_key": "task.succeeded"}
    assert message["properties"]["delivery_tag"] == "c1"
    # An error's text may hold a lone surrogate (from a plain caller's JSON): pydantic's encoder refuses
    # it, the event is still written.
    failed = {"type": "task-failed", "uuid": "c2", "exception": "NotFound(404): no '\ud800'"}
    assert json.loads(json.loads(encode_event(failed, "w@host", "celeryev"))["body"]) == failed


def test_a_redelivered_message_is_counted_and_gets_a_new_tag() -> None:
    raw = encode_task({"task": "t", "id": "1"}, {}, json.dumps([[], {}, {}]), "queue")
    message = json.loads(raw)
    tag = message["properties"]["delivery_tag"]
    again = mark_redelivered(mark_redelivered(message))
    assert again["headers"]["cs_redelivered"] == 2
    assert again["properties"]["delivery_tag"] != tag
    assert again["properties"]["delivery_info"]["redelivered"] is True


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()
