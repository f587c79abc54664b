"""The provider's half of a remote call: one Celery task per exposed method, run through the app's wrapper.

The task validates the envelope, runs the call through the provider's hooks with ``from_remote`` set,
pushes the reply on the caller's reply list (see :mod:`.caller`) and then returns the result
or raises the error, so Celery's result backend and Flower keep their usual view (SUCCESS / FAILURE).

One piece, past 300 lines: what a provider checks before a call runs (deadline, signature, caller) and how
it answers (reply list, Celery state, Flower's view of an expected error) are read together.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import partial
from typing import TYPE_CHECKING, Any

import redis
from celery.app.task import Context
from celery.worker.request import Request

from ..core.errors import (
    BadRequest,
    Forbidden,
    GeneralError,
    MethodNotAllowed,
    NotAuthenticated,
    PayloadTooLarge,
    ServiceError,
    Timeout,
    Unavailable,
    error_from_exception,
)
from . import logs
from .caller import reset_deadline, set_deadline
from .event_epoch import epoch_wanted, read_with_reply, reply_scope
from .lease import HEADER_REDELIVERED
from .loops import settle
from .observability import hooks
from .observability import server as observed
from .protocol import (
    AUTH_PARAMS,
    HEADER_CALLER,
    HEADER_DEADLINE,
    HEADER_REPLY,
    clipped,
    dumps,
    loads,
    parse_envelope,
    payload_size,
    reply_key,
    split_task_name,
    task_name,
)
from .redis_clients import HeldConnection, pack_commands

if TYPE_CHECKING:
    from celery import Task

    from .distribution import Distribution
    from .settings import DistributionSettings
    from .signing import Signer

__all__ = [
    "HEALTH_METHOD",
    "Answer",
    "CallRequest",
    "Handler",
    "Replies",
    "SizedRequest",
    "after_reply",
    "call_deadline",
    "call_params",
    "health_task_name",
    "register_health",
    "register_method",
    "revoked_call",
    "serve",
    "unknown_task",
]

log = logging.getLogger("celery_services.tasks")

HEALTH_METHOD = "_health"

#: Seconds a reply of a call without deadline (a plain caller's) waits to be popped.
DEFAULT_REPLY_TTL = 60.0

# The first reply of a call wins: a call redelivered from a paused replica may run twice, never answer twice.
# The body does not go through the script: a 100 KB argument cost Redis 0.16 ms to hand to Lua, most of a
# large reply's time there. It is pushed on a list of this push's own (KEYS[3], already expiring), which the
# script renames to the reply list if the call was not answered yet (RENAME wakes a BLPOP as LPUSH does).
_PUSH_REPLY = """
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('RENAME', KEYS[3], KEYS[1])
  return 1
end
redis.call('DEL', KEYS[3])
return 0
"""


class Replies:
    """The provider's side of the reply lists (see :mod:`.caller` for the caller's).

    Args:
        store: the result backend's Redis.
        epoch: on RabbitMQ, the key of the event exchange's binding epoch, when it is in ``store``: read in
            the push's round trip of a call that has events to publish after its reply, for those events
            (:mod:`.event_epoch`).
    """

    def __init__(self, store: redis.Redis, epoch: str | None = None) -> None:
        self._store = store
        self._epoch = epoch
        self._token = uuid.uuid4().hex[:12]  # this process's pushes: their lists are never another's

    def commands(self, key: str, body: str, deadline: float | None) -> list[tuple[Any, ...]]:
        """The Redis commands that push a reply, to send in one round trip (with others, by a caller that
        has some); the last one's answer says whether it was pushed (:meth:`pushed`). None (an empty list)
        once the deadline has passed: nobody would pop it."""
        ttl = (deadline - time.time()) if deadline is not None else DEFAULT_REPLY_TTL
        if ttl <= 0:
            log.info("reply %s not pushed: its caller's deadline has passed", key)
            return []
        ms = int((ttl + 1.0) * 1000)
        pending = f"{key}:pending:{self._token}:{threading.get_ident()}"
        # EVAL, not a registered script: sent among other commands, the script object would first ask
        # SCRIPT EXISTS, one more round trip on every call. Redis caches the script by its digest.
        return [
            ("LPUSH", pending, body),
            ("PEXPIRE", pending, ms),
            ("EVAL", _PUSH_REPLY, 3, key, f"{key}:sent", pending, ms),
        ]

    def push(self, key: str, body: str, deadline: float | None) -> bool:
        """Push a call's reply on its caller's list, once per call, while its caller still waits.

        Nothing is pushed after the deadline (nobody would pop it), nor a second time for the same call (a
        redelivered call that ran twice): the first reply wins. The list and its marker expire a second
        after the deadline. Returns whether the reply was pushed.
        """
        commands, epoch = self._with_epoch(self.commands(key, body, deadline))
        if not commands:
            return False
        try:
            with self._store.pipeline(transaction=False) as pipe:
                queue: Any = pipe  # redis-py leaves execute_command unannotated
                for command in commands:
                    queue.execute_command(*command)
                replies = pipe.execute()
        except redis.RedisError:
            log.exception("could not push the reply %s", key)
            return False
        return self._pushed(key, replies, epoch)

    def push_answer(self, answer: Answer) -> None:
        """:meth:`push` ``answer``'s reply, if its caller waits on one."""
        if answer.reply_to and answer.body is not None:
            self.push(answer.reply_to, answer.body, answer.deadline)

    def push_on(
        self,
        held: HeldConnection,
        key: str,
        body: str,
        deadline: float | None,
        meanwhile: Callable[[], object],
    ) -> bool:
        """:meth:`push`, written and read on ``held``, a serving thread's own connection (dropped if it
        fails): through redis-py's script object and command layers, the push cost a quarter of a RabbitMQ
        fast-path worker's time per call.

        ``meanwhile`` runs once the push is written, before Redis's answer is read, and runs even when
        nothing could be pushed. The RabbitMQ fast path acknowledges its call there: the broker hears of it
        a Redis round trip sooner, and may deliver the next call sooner (a call's p50 fell 6-8%).
        """
        commands, epoch = self._with_epoch(self.commands(key, body, deadline))
        connection = None
        if commands:
            try:
                connection = held.get()
                connection.send_packed_command(pack_commands(commands))
            except (redis.RedisError, OSError, ValueError) as exc:
                connection = None
                held.drop()
                log.warning("could not push the reply %s: %r", key, exc)
        try:
            meanwhile()
        finally:
            # Read even if ``meanwhile`` failed: answers left unread would answer the thread's next push.
            replies = None
            if connection is not None:
                try:
                    replies = [connection.read_response() for _ in commands]
                except (redis.RedisError, OSError, ValueError) as exc:
                    held.drop()
                    log.warning("could not push the reply %s: %r", key, exc)
        return replies is not None and self._pushed(key, replies, epoch)

    def _with_epoch(self, commands: list[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], str | None]:
        """``commands``, and the binding epoch's ``GET`` after them when the call being served has events to
        publish after its reply; the epoch's key if so."""
        if commands and self._epoch is not None and epoch_wanted():
            return [*commands, ("GET", self._epoch)], self._epoch
        return commands, None

    def _pushed(self, key: str, replies: list[Any], epoch: str | None) -> bool:
        """:meth:`pushed`, from Redis's answers to :meth:`_with_epoch`'s commands (recording the epoch)."""
        if epoch is not None:
            read_with_reply(epoch, replies[-1])
            replies = replies[:-1]
        return self.pushed(key, replies[-1])

    @staticmethod
    def pushed(key: str, reply: Any) -> bool:
        """Whether Redis's answer to the last of :meth:`commands` says the reply was pushed; a call already
        answered (the first reply wins) is logged."""
        if not reply:
            log.info("reply %s not pushed: the call was already answered", key)
        return bool(reply)


def unknown_task(distribution: Distribution, name: str, call_id: str, headers: Mapping[str, Any]) -> Answer:
    """How a call of a task this worker does not serve ends (a newer caller, an older provider):
    ``MethodNotAllowed``, told at once to a caller that waits on a reply (see :func:`_refused`)."""
    key, path, method = split_task_name(name)
    error = MethodNotAllowed(
        f"No instance of '{key}' serving this call offers '{path}.{method}' (task '{name}' unknown)",
        {"key": key, "path": path, "method": method},
    )
    return _refused(distribution, call_id, headers, error)


def revoked_call(
    distribution: Distribution,
    name: str,
    call_id: str,
    headers: Mapping[str, Any],
    terminated: bool = False,
) -> Answer:
    """How a revoked call ends (``celery control revoke``, Flower's "Revoke"): not run (or, ``terminated``,
    stopped), and ``Unavailable`` told at once to a caller that waits on a reply, not left to time out."""
    when = "stopped while it ran" if terminated else "before it ran"
    error = Unavailable(
        f"Call '{name}' was revoked {when}", {"task": name, "call_id": call_id, "reason": "revoked"}
    )
    return _refused(distribution, call_id, headers, error)


def _refused(
    distribution: Distribution, call_id: str, headers: Mapping[str, Any], error: ServiceError
) -> Answer:
    # The reply is signed as every other reply is, or a caller with signing on would refuse it (BadGateway).
    answer = Answer(error=error)
    if headers.get(HEADER_REPLY):
        answer.reply_to = reply_key(distribution.settings.registry_prefix, call_id)
        with contextlib.suppress(BadRequest):  # no time: its reply lives the default TTL
            answer.deadline = call_deadline(headers.get(HEADER_DEADLINE))
        answer.error, answer.body = _error_reply(distribution.signer, call_id, error)
    return answer


def call_deadline(raw: Any) -> float | None:
    """A call's deadline (epoch seconds) from its ``cs_deadline`` header; ``None`` without one.

    Raises:
        BadRequest: the header is no finite number. Only a sender outside the library writes it by hand
            (with signing on it is signed): unread, it escaped untyped, and NaN or infinity passed the
            deadline check, so the call ran, then its reply could not be given a lifetime.
    """
    if raw is None:
        return None
    try:
        deadline = float(raw)
    except (TypeError, ValueError, OverflowError):
        deadline = math.nan
    if not math.isfinite(deadline):
        raise BadRequest(f"Malformed call: its deadline {clipped(repr(raw), 64)} is no time")
    return deadline


def health_task_name(key: str) -> str:
    """The task that answers a key's healthcheck."""
    return f"{key}.{HEALTH_METHOD}"


@dataclass(slots=True)
class Answer:
    """How a call ended: its result or its error, and the reply its caller gets.

    Attributes:
        result: the call's result (when ``error`` is ``None``).
        encoded: the result in JSON, as its reply carries it.
        error: the typed error the caller gets (``None`` on success).
        cause: the exception that was not a service error (an internal error's cause, for the log/Flower).
        reply_to: the caller's reply list (``None``: a caller that does not wait on one).
        body: the reply to push there (``None``: push nothing, as for a replayed call).
        deadline: the caller's deadline (epoch), if any.
    """

    result: Any = None
    encoded: str = "null"
    error: ServiceError | None = None
    cause: BaseException | None = None
    reply_to: str | None = None
    body: str | None = None
    deadline: float | None = None

    def outcome(self) -> Any:
        """The result, or raise the error (chained to its cause): what the Celery task returns or raises."""
        if self.error is None:
            return self.result
        if self.cause is None:
            raise self.error from None
        raise self.error from self.cause  # Flower's traceback of an internal error shows its cause


#: What serves one call: the task's request (Celery's context, or the fast path's), its args and kwargs.
Handler = Callable[[Any, tuple[Any, ...], dict[str, Any]], Answer]

#: What a call being served defers until its reply is sent (the events it published: see after_reply).
_after_reply: contextvars.ContextVar[list[Callable[[], object]] | None] = contextvars.ContextVar(
    "celery_services_after_reply", default=None
)


def after_reply(work: Callable[[], object]) -> bool:
    """Run ``work`` once the call being served in this context has replied; ``False`` outside a call.

    The distribution publishes a call's service events this way: its caller does not wait for them.
    """
    pending = _after_reply.get()
    if pending is None:
        return False
    pending.append(work)
    return True


def serve(
    handle: Handler,
    request: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    reply: Callable[[Answer], None],
) -> Answer:
    """Run a call with ``handle``, ``reply`` with its answer, then what it deferred (:func:`after_reply`)."""
    pending: list[Callable[[], object]] = []
    token = _after_reply.set(pending)
    try:
        # Tracing or metrics: the same handler in a SERVER span, counted (observability.py).
        answer = handle(request, args, kwargs) if not hooks.on else observed(handle, request, args, kwargs)
    finally:
        _after_reply.reset(token)
    with reply_scope(bool(pending)):  # the binding epoch read with the reply judges the events after it
        try:
            reply(answer)
        finally:
            for work in pending:
                try:
                    work()
                except Exception:  # one failed publication must not lose the others, nor the answer
                    log.exception("work deferred after the reply of call %s failed", request.id)
    return answer


def register_method(distribution: Distribution, path: str, method: str) -> str:
    """Register the task serving ``method`` of the service at ``path``; returns its name."""
    name = task_name(distribution.key, path, method)
    if name not in distribution.celery.tasks:
        fields = {"key": distribution.key, "path": path, "method": method}

        def handle(request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Answer:
            work = partial(_run, distribution, request, path, method, args, kwargs)
            return _answer(distribution, request, work, fields)

        _register(distribution, handle, name)
    return name


def register_health(distribution: Distribution) -> str:
    """Register the key's health task: ``{path: bool}`` for every exposed service of the instance."""
    name = health_task_name(distribution.key)
    if name not in distribution.celery.tasks:
        fields = {"key": distribution.key, "path": "", "method": HEALTH_METHOD}

        def handle(request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Answer:
            return _answer(distribution, request, distribution.local_health, fields)

        _register(distribution, handle, name)
    return name


class SizedRequest(Context):  # type: ignore[misc]
    """The request of a call the fast path read: Celery's context, and the size of the call's envelope.

    ``envelope_size`` is set after the message's headers are applied, so no header can stand for it.
    """

    envelope_size: int = 0


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


def _register(distribution: Distribution, handle: Handler, name: str) -> None:
    distribution.handlers[name] = handle  # the fast path serves the same calls (fastpath.py)

    def task(task: Task, *args: Any, **kwargs: Any) -> Any:
        return serve(handle, task.request, args, kwargs, distribution.replies.push_answer).outcome()

    distribution.celery.task(
        task,
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


def _answer(
    distribution: Distribution, request: Any, work: Callable[[], Any], fields: dict[str, str]
) -> Answer:
    """Admit a call, run it with its deadline set for nested calls, and say how it ended and what to reply.

    A call whose deadline has passed is not started, and no reply is pushed once nobody waits for it. With
    signing on, an unsigned, forged or replayed call is refused before anything of it runs; a caller not in
    ``allow_callers`` is refused too. Errors are returned, not raised: the Celery task raises them after the
    reply is pushed, the fast path sends reply, ack and event together.
    """
    call_id = str(request.id)
    extra = {**fields, "call_id": call_id}
    reply_to = None
    if getattr(request, HEADER_REPLY, None):
        reply_to = reply_key(distribution.settings.registry_prefix, call_id)
    signer = distribution.signer
    answer = Answer(reply_to=reply_to)

    def failed(error: ServiceError, cause: BaseException | None = None) -> Answer:
        answer.cause = cause
        answer.error, answer.body = _error_reply(signer, call_id, error)
        return answer

    try:
        deadline = answer.deadline = call_deadline(getattr(request, HEADER_DEADLINE, None))
    except BadRequest as malformed:
        log.warning("call %s refused: %s", call_id, malformed.message, extra=extra)
        return failed(malformed)
    if deadline is not None and deadline <= time.time():
        # Its caller gave up (Celery's ``expires`` is only checked on receipt, not when a prefetched or
        # redelivered call starts): nothing runs, nothing is pushed.
        log.info("call not started: its caller's deadline has passed", extra=extra)
        late = f"Call '{request.task}' started after its caller's deadline"
        answer.error = Timeout(late, {"call_id": call_id})
        return answer
    if signer is not None:
        try:
            signer.check_call(request, deadline)
        except NotAuthenticated as refused:
            return failed(refused)
        if not signer.first_start(call_id, deadline) and not _redelivered(request):
            # No reply: the original delivery of this call answers its caller.
            log.warning("call %s refused: replayed call id", call_id, extra=extra)
            answer.error = NotAuthenticated("Call refused: replayed", {"call_id": call_id})
            return answer
    token = set_deadline(deadline)
    logged = logs.enter_call(extra)  # the service's own log lines carry the call's fields too
    try:
        _check_caller(distribution, request, fields)
        result = work()
        encoded = dumps(result)
        body = f'{{"result": {encoded}}}'
        limit, size = distribution.settings.max_payload_bytes, payload_size(body)
        if size > limit:
            raise PayloadTooLarge(
                f"Result of '{request.task}' is {size} bytes, over the {limit} byte limit",
                {"size": size, "limit": limit, "call_id": call_id},
            )
    except Exception as exc:
        error = error_from_exception(exc, debug=distribution.settings.debug, call_id=call_id)
        if error is not exc:
            # The detail stays here, under the call id the caller got (its message may name internals).
            log.exception("call %s failed: %s", call_id, type(exc).__name__, extra=extra)
            return failed(error, exc)
        log.info("call answered %s (%s): %s", error.name, error.code, error.message, extra=extra)
        return failed(error)
    finally:
        logs.leave_call(logged)
        reset_deadline(token)
    log.debug("call served", extra=extra)
    answer.result, answer.encoded = result, encoded
    answer.body = signer.sign_reply(call_id, body) if signer else body
    return answer


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
    # The fast path read the envelope's size off its message: no second serialization of a large call.
    size = request.envelope_size if isinstance(request, SizedRequest) else payload_size(dumps(kwargs))
    if size > settings.max_payload_bytes:
        raise PayloadTooLarge(
            f"Call is {size} bytes, over the {settings.max_payload_bytes} byte limit",
            {"size": size, "limit": settings.max_payload_bytes},
        )
    params = call_params(settings, request, envelope.params)
    # An async def method or hook gives a coroutine: settled on this thread's kept loop, by the deadline.
    return settle(
        distribution.app.service(path).call(method, id=envelope.id, data=envelope.data, params=params)
    )


def _error_reply(signer: Signer | None, call_id: str, error: ServiceError) -> tuple[ServiceError, str]:
    """``error`` as it can travel, and the reply of a call that failed with it, signed when signing is on.

    A detail of no JSON form (a validator's exception object in its ``errors``) travels as its ``repr``, in
    a copy of the error, which Celery's result backend can write too: unwritten, the caller got no reply
    and waited its whole timeout. An error not even so (a lone surrogate in its message) is an internal one.
    """
    try:
        text = dumps(error.to_dict())
    except ValueError:
        try:
            text = dumps(error.to_dict(), fallback=repr)
            error = ServiceError.from_dict(loads(text))
        except ValueError:
            error = GeneralError("Internal error", {"call_id": call_id})
            text = dumps(error.to_dict())
    body = f'{{"error":{text}}}'
    return error, signer.sign_reply(call_id, body) if signer else body
