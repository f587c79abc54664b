"""The provider's half of a remote call: one Celery task per exposed method, run through the app's wrapper.

The task validates the envelope, runs the call through the provider's hooks with ``from_remote`` set,
pushes the reply on the caller's reply list (see :mod:`.caller`) and then returns the result
or raises the error, so Celery's result backend and Flower keep their usual view (SUCCESS / FAILURE).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import redis

from ..core.errors import PayloadTooLarge, ServiceError, Timeout, error_from_exception
from .caller import reset_deadline, set_deadline
from .lease import HEADER_REDELIVERED
from .protocol import AUTH_PARAMS, HEADER_DEADLINE, HEADER_REPLY, parse_envelope, reply_key, task_name

if TYPE_CHECKING:
    from celery import Task

    from .distribution import Distribution
    from .settings import DistributionSettings

__all__ = [
    "HEALTH_METHOD",
    "Replies",
    "call_params",
    "health_task_name",
    "register_health",
    "register_method",
]

log = logging.getLogger("celery_services.tasks")

HEALTH_METHOD = "_health"

#: Seconds a reply of a call without deadline (a plain caller's) waits to be popped.
DEFAULT_REPLY_TTL = 60.0

# The first reply of a call wins: a call redelivered from a paused replica may run twice, never answer twice.
_PUSH_REPLY = """
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then
  redis.call('LPUSH', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


class Replies:
    """The provider's side of the reply lists (see :mod:`.caller` for the caller's)."""

    def __init__(self, store: redis.Redis) -> None:
        self._push = store.register_script(_PUSH_REPLY)

    def push(self, key: str, body: str, deadline: float | None) -> bool:
        """Push a call's reply on its caller's list, once per call, while its caller still waits.

        Nothing is pushed after the deadline (nobody would pop it), nor a second time for the same call (a
        redelivered call that ran twice): the first reply wins. The list and its marker expire a second
        after the deadline. Returns whether the reply was pushed.
        """
        ttl = (deadline - time.time()) if deadline is not None else DEFAULT_REPLY_TTL
        if ttl <= 0:
            log.info("reply %s not pushed: its caller's deadline has passed", key)
            return False
        try:
            pushed = bool(self._push(keys=[key, f"{key}:sent"], args=[body, int((ttl + 1.0) * 1000)]))
        except redis.RedisError:
            log.exception("could not push the reply %s", key)
            return False
        if not pushed:
            log.info("reply %s not pushed: the call was already answered", key)
        return pushed


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
                distribution,
                task,
                partial(_run, distribution, task.request, path, method, args, kwargs),
                fields,
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
    """Run a call with its deadline set for nested calls; reply on the caller's list, then to Celery.

    A call whose deadline has passed is not started, and no reply is pushed once nobody waits for it.
    """
    request = task.request
    call_id = str(request.id)
    extra = {**fields, "call_id": call_id}
    raw_deadline = getattr(request, HEADER_DEADLINE, None)
    deadline = float(raw_deadline) if raw_deadline is not None else None
    reply_to = None
    if getattr(request, HEADER_REPLY, None):
        reply_to = reply_key(distribution.settings.registry_prefix, call_id)
    if deadline is not None and deadline <= time.time():
        # Its caller gave up (Celery's ``expires`` is only checked on receipt, not when a prefetched or
        # redelivered call starts): nothing runs, nothing is pushed.
        log.info("call not started: its caller's deadline has passed", extra=extra)
        raise Timeout(f"Call '{request.task}' started after its caller's deadline", {"call_id": call_id})
    token = set_deadline(deadline)
    try:
        result = work()
        body = json.dumps({"result": result})
        limit = distribution.settings.max_payload_bytes
        if len(body) > limit:
            raise PayloadTooLarge(
                f"Result of '{request.task}' is {len(body)} bytes, over the {limit} byte limit",
                {"size": len(body), "limit": limit, "call_id": call_id},
            )
    except Exception as exc:
        error = error_from_exception(exc, debug=distribution.settings.debug)
        if error is not exc:
            log.exception("call failed: %s", type(exc).__name__, extra=extra)
        else:
            log.info("call answered %s (%s): %s", error.name, error.code, error.message, extra=extra)
        if reply_to:
            distribution.replies.push(reply_to, json.dumps({"error": _json_safe(error.to_dict())}), deadline)
        raise error from None
    finally:
        reset_deadline(token)
    if reply_to:
        distribution.replies.push(reply_to, body, deadline)
    log.debug("call served", extra=extra)
    return result


def call_params(settings: DistributionSettings, request: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The params a provider's service sees for a remote call.

    Identity params are dropped unless ``authentication`` (the gateway pattern: remote calls run as internal
    ones); ``from_remote``, ``call_id`` (the same on every delivery of a call: the key for idempotence) and
    ``redelivered`` (this delivery may follow one that ran, at least in part) are added.
    """
    params = dict(params)
    if not settings.authentication:
        for name in AUTH_PARAMS:
            params.pop(name, None)
    params["from_remote"] = True
    params["call_id"] = str(request.id)
    delivery = getattr(request, "delivery_info", None) or {}
    params["redelivered"] = bool(getattr(request, HEADER_REDELIVERED, None) or delivery.get("redelivered"))
    return params


def _run(
    distribution: Distribution,
    request: Any,
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
    params = call_params(settings, request, envelope.params)
    return distribution.app.service(path).call(method, id=envelope.id, data=envelope.data, params=params)


def _json_safe(payload: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(payload)
    except (TypeError, ValueError):
        payload = {**payload, "data": repr(payload.get("data"))}
    return payload
