"""The provider's half of a remote call: one Celery task per exposed method, run through the app's wrapper.

The task validates the envelope, runs the call through the provider's hooks with ``from_remote`` set,
pushes the reply on the caller's reply list (see :mod:`.caller`) and then returns the result
or raises the error, so Celery's result backend and Flower keep their usual view (SUCCESS / FAILURE).

One piece, past 300 lines: what a provider checks before a call runs (deadline, signature, caller) and how
it answers (reply list, Celery state, Flower's view of an expected error) are read together.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from functools import partial
from typing import TYPE_CHECKING, Any

import redis
from celery.worker.request import Request

from ..core.errors import (
    Forbidden,
    NotAuthenticated,
    PayloadTooLarge,
    ServiceError,
    Timeout,
    error_from_exception,
)
from .caller import reset_deadline, set_deadline
from .lease import HEADER_REDELIVERED
from .protocol import (
    AUTH_PARAMS,
    HEADER_CALLER,
    HEADER_DEADLINE,
    HEADER_REPLY,
    parse_envelope,
    reply_key,
    task_name,
)

if TYPE_CHECKING:
    from celery import Task

    from .distribution import Distribution
    from .settings import DistributionSettings

__all__ = [
    "HEALTH_METHOD",
    "CallRequest",
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


class CallRequest(Request):  # type: ignore[misc]
    """The worker's request of a call task: an expected error (4xx) is reported without a traceback.

    Flower and every task-event consumer see a call that answered ``NotFound`` as ``FAILURE`` (so
    ``send_task().get()`` still raises it, and failures can be counted), but its ``task-failed`` event
    carries ``exception = "NotFound(404): message"`` and an empty traceback: a refusal, not a crash. An
    internal error (5xx) keeps its traceback, chained to the exception that caused it.
    """

    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-failed":
            error = _expected_error(fields.get("exception"), self)
            if error is not None:
                fields = {**fields, "exception": error, "traceback": ""}
        super().send_event(type, **fields)


def _expected_error(shown: Any, request: Any) -> str | None:
    # The event gets safe_repr(exception): ServiceError.__repr__ is "Name('message', code=404)".
    text = str(shown or "")
    match = re.fullmatch(r"(\w+)\((.*), code=(\d{3})\)", text, re.DOTALL)
    if match is None or int(match.group(3)) >= 500:
        return None
    return f"{match.group(1)}({match.group(3)}): {match.group(2)}"


def _register(distribution: Distribution, fn: Any, name: str) -> None:
    distribution.celery.task(
        fn,
        name=name,
        bind=True,
        typing=False,
        shared=False,  # a task of this app only: other apps in the process may serve the same name
        acks_late=True,
        reject_on_worker_lost=True,
        # Expected errors are the caller's answer, not a worker failure: no traceback in the log for them,
        # nor in Flower for 4xx (CallRequest).
        throws=(ServiceError,),
        Request=CallRequest,
    )


def _answer(distribution: Distribution, task: Task, work: Callable[[], Any], fields: dict[str, str]) -> Any:
    """Admit a call, run it with its deadline set for nested calls, reply on the caller's list and to Celery.

    A call whose deadline has passed is not started, and no reply is pushed once nobody waits for it. With
    signing on, an unsigned, forged or replayed call is refused before anything of it runs; a caller not in
    ``allow_callers`` is refused too.
    """
    request = task.request
    call_id = str(request.id)
    extra = {**fields, "call_id": call_id}
    raw_deadline = getattr(request, HEADER_DEADLINE, None)
    deadline = float(raw_deadline) if raw_deadline is not None else None
    reply_to = None
    if getattr(request, HEADER_REPLY, None):
        reply_to = reply_key(distribution.settings.registry_prefix, call_id)
    signer = distribution.signer

    def reply(body: str) -> None:
        if reply_to:
            distribution.replies.push(
                reply_to, signer.sign_reply(call_id, body) if signer else body, deadline
            )

    if deadline is not None and deadline <= time.time():
        # Its caller gave up (Celery's ``expires`` is only checked on receipt, not when a prefetched or
        # redelivered call starts): nothing runs, nothing is pushed.
        log.info("call not started: its caller's deadline has passed", extra=extra)
        raise Timeout(f"Call '{request.task}' started after its caller's deadline", {"call_id": call_id})
    if signer is not None:
        try:
            signer.check_call(request, deadline)
        except NotAuthenticated as refused:
            reply(json.dumps({"error": refused.to_dict()}))
            raise
        if not signer.first_start(call_id, deadline) and not _redelivered(request):
            # No reply: the original delivery of this call answers its caller.
            log.warning("call %s refused: replayed call id", call_id, extra=extra)
            raise NotAuthenticated("Call refused: replayed", {"call_id": call_id})
    token = set_deadline(deadline)
    try:
        _check_caller(distribution, request, fields)
        result = work()
        body = json.dumps({"result": result})
        limit = distribution.settings.max_payload_bytes
        if len(body) > limit:
            raise PayloadTooLarge(
                f"Result of '{request.task}' is {len(body)} bytes, over the {limit} byte limit",
                {"size": len(body), "limit": limit, "call_id": call_id},
            )
    except Exception as exc:
        error = error_from_exception(exc, debug=distribution.settings.debug, call_id=call_id)
        if error is not exc:
            # The detail stays here, under the call id the caller got (its message may name internals).
            log.exception("call %s failed: %s", call_id, type(exc).__name__, extra=extra)
        else:
            log.info("call answered %s (%s): %s", error.name, error.code, error.message, extra=extra)
        reply(json.dumps({"error": _json_safe(error.to_dict())}))
        if error is exc:
            raise error from None
        raise error from exc  # Flower's traceback of an internal error shows its cause
    finally:
        reset_deadline(token)
    reply(body)
    log.debug("call served", extra=extra)
    return result


def _check_caller(distribution: Distribution, request: Any, fields: dict[str, str]) -> None:
    """Refuse a caller key that ``allow_callers`` does not list for this ``path.method``."""
    allowed = distribution.settings.allow_callers
    if allowed is None or fields["method"] == HEALTH_METHOD:
        return
    caller = str(getattr(request, HEADER_CALLER, None) or "")
    target = f"{fields['path']}.{fields['method']}"
    globs = [*allowed.get(caller, ()), *allowed.get("*", ())] if caller else allowed.get("*", [])
    if not any(fnmatchcase(target, glob) for glob in globs):
        raise Forbidden(
            f"App '{caller or '?'}' may not call '{target}'", {"caller": caller or None, "method": target}
        )


def _redelivered(request: Any) -> bool:
    delivery = getattr(request, "delivery_info", None) or {}
    return bool(getattr(request, HEADER_REDELIVERED, None) or delivery.get("redelivered"))


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
    params["redelivered"] = _redelivered(request)
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
