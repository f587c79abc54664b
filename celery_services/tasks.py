"""The provider's half of a remote call: one Celery task per exposed method, run through the app's wrapper.

The task validates the envelope, runs the call through the provider's hooks with ``from_remote`` set,
pushes the reply on the caller's reply list (see :mod:`celery_services.remote`) and then returns the result
or raises the error, so Celery's result backend and Flower keep their usual view (SUCCESS / FAILURE).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from .errors import PayloadTooLarge, ServiceError, Timeout, error_from_exception
from .protocol import AUTH_PARAMS, HEADER_DEADLINE, HEADER_REPLY, parse_envelope, reply_key, task_name
from .remote import reset_deadline, set_deadline

if TYPE_CHECKING:
    from celery import Task

    from .distribution import Distribution

__all__ = ["HEALTH_METHOD", "health_task_name", "register_health", "register_method"]

log = logging.getLogger("celery_services.tasks")

#: Seconds a reply waits for a caller that may have given up, before Redis drops it.
REPLY_TTL = 60
HEALTH_METHOD = "_health"


def health_task_name(key: str) -> str:
    """The task that answers a key's healthcheck."""
    return f"{key}.{HEALTH_METHOD}"


def register_method(distribution: Distribution, path: str, method: str) -> str:
    """Register the task serving ``method`` of the service at ``path``; returns its name."""
    name = task_name(distribution.key, path, method)
    if name not in distribution.celery.tasks:
        fields = {"key": distribution.key, "path": path, "method": method}

        def serve(task: Task, *args: Any, **kwargs: Any) -> Any:
            return _answer(
                distribution, task, partial(_run, distribution, path, method, args, kwargs), fields
            )

        _register(distribution, serve, name)
    return name


def register_health(distribution: Distribution) -> str:
    """Register the key's health task: ``{path: bool}`` for every exposed service of the instance."""
    name = health_task_name(distribution.key)
    if name not in distribution.celery.tasks:
        fields = {"key": distribution.key, "path": "", "method": HEALTH_METHOD}

        def health(task: Task, *args: Any, **kwargs: Any) -> Any:
            return _answer(distribution, task, distribution.local_health, fields)

        _register(distribution, health, name)
    return name


def _register(distribution: Distribution, fn: Any, name: str) -> None:
    distribution.celery.task(
        fn,
        name=name,
        bind=True,
        typing=False,
        shared=False,  # a task of this app only: other apps in the process may serve the same name
        acks_late=True,
        reject_on_worker_lost=True,
        # Expected errors are the caller's answer, not a worker failure: no traceback in the log for them.
        throws=(ServiceError,),
    )


def _answer(distribution: Distribution, task: Task, work: Callable[[], Any], fields: dict[str, str]) -> Any:
    """Run a call with its deadline set for nested calls; reply on the caller's list, then to Celery."""
    request = task.request
    extra = {**fields, "call_id": str(request.id)}
    deadline = getattr(request, HEADER_DEADLINE, None)
    reply_to = None
    if getattr(request, HEADER_REPLY, None):
        reply_to = reply_key(distribution.settings.registry_prefix, str(request.id))
    token = set_deadline(float(deadline) if deadline is not None else None)
    try:
        if deadline is not None and float(deadline) < time.time():
            raise Timeout(f"Call '{request.task}' arrived after its caller's deadline")
        result = work()
        body = json.dumps({"result": result})
    except Exception as exc:
        error = error_from_exception(exc, debug=distribution.settings.debug)
        if error is not exc:
            log.exception("call failed: %s", type(exc).__name__, extra=extra)
        else:
            log.info("call answered %s (%s): %s", error.name, error.code, error.message, extra=extra)
        if reply_to:
            distribution.push_reply(reply_to, json.dumps({"error": _json_safe(error.to_dict())}), REPLY_TTL)
        raise error from None
    finally:
        reset_deadline(token)
    if reply_to:
        distribution.push_reply(reply_to, body, REPLY_TTL)
    log.debug("call served", extra=extra)
    return result


def _run(
    distribution: Distribution,
    path: str,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    settings = distribution.settings
    envelope = parse_envelope(args, kwargs)
    size = len(json.dumps(kwargs))
    if size > settings.max_payload_bytes:
        raise PayloadTooLarge(
            f"Call is {size} bytes, over the {settings.max_payload_bytes} byte limit",
            {"size": size, "limit": settings.max_payload_bytes},
        )
    params = dict(envelope.params)
    if not settings.authentication:
        # The gateway pattern: the provider treats remote calls as internal ones.
        for name in AUTH_PARAMS:
            params.pop(name, None)
    params["from_remote"] = True
    return distribution.app.service(path).call(method, id=envelope.id, data=envelope.data, params=params)


def _json_safe(payload: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(payload)
    except (TypeError, ValueError):
        payload = {**payload, "data": repr(payload.get("data"))}
    return payload
