"""The fast path: a worker serves its key's queue outside Celery's consumer loop.

Each call is still the Celery task ``{key}.{path}.{method}`` in Celery's protocol v2 on the queue ``{key}``
(a plain ``celery worker`` serves the same queue, more slowly), and Flower still sees it: only the way this
worker takes and answers it changes (DESIGN §6 measured kombu's consumer loop and per-message objects as
most of a call's cost):

- on Redis (:class:`RedisFastPath`), a serving thread moves a message from the queue to its own in-flight
  list with one ``BLMOVE`` (the reliable-queue pattern: a crash leaves the message where it can be given
  back); reply, acknowledgement (``DEL`` of that list) and one task event for Flower go in one round trip;
- on RabbitMQ (:class:`AmqpFastPath`), a serving thread consumes the queue on its own connection
  (prefetch 1, late acknowledgement, sent while Redis answers the reply's push): RabbitMQ gives back a
  dead connection's call by itself; the task events of calls served back to back go to Flower as one
  ``task.multi`` message;
- either way the call runs through the same handler as the Celery task (:mod:`.provider`: deadline,
  signature, caller, hooks, payload caps, typed errors), and its service events go out after its reply.

Concurrency: as many serving threads as the worker's pool has slots (``-c N`` of a ``threads`` or
``prefork`` pool; one with ``-P solo``), all in the worker's main process, so a slow call holds one thread
and the others go on. Delivery on Redis: each instance keeps an ``alive`` key with a TTL
(``lease_timeout``); every instance of the key gives back to the front of the queue the in-flight calls of
instances whose key lapsed (killed or paused), with ``cs_redelivered`` counted. A paused instance that
resumes finds its calls gone: its late acknowledgement removes nothing, and its reply is not pushed twice
(:class:`.Replies`).

One piece, past 300 lines: taking a message, serving it and answering it are one protocol on the same keys
(in-flight lists, alive keys, the give-back script), and both brokers share how a message becomes a call.

What the fast path leaves out: Celery's task signals, time limits (the call's deadline stands for them),
retries and ``revoke --terminate`` (a revoked call that has not started is not run); task messages with a
priority (other lists of the queue) are left to Celery's consumers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import kombu.entity
import kombu.messaging
import redis
from billiard.einfo import ExceptionInfo
from celery import signals, states
from celery.app.trace import LOG_FAILURE, LOG_SUCCESS
from celery.utils.time import utcoffset
from celery.worker import state as worker_state

from ..core.errors import ServiceError
from .heartbeats import Line, keep
from .messages import (
    HEADER_REDELIVERED,
    KEEP,
    MalformedMessage,
    TaskMessage,
    decode_task,
    encode_event,
    event_json,
    mark_redelivered,
    task_message,
)
from .protocol import HEADER_DEADLINE, HEADER_REPLY, clipped
from .provider import Answer, Handler, SizedRequest, revoked_call, serve, unknown_task
from .redis_clients import HeldConnection, RedisOptions, pack_commands, redis_client

if TYPE_CHECKING:
    from .distribution import Distribution

__all__ = ["EVENT_TYPES", "AmqpFastPath", "EventTopics", "FastPath", "RedisFastPath"]

#: How a transport ends a call: ``(request, answer, started, event)`` → whether it went through.
Finish = Callable[[Any, Answer, float, "str | None"], bool]

log = logging.getLogger("celery_services.fastpath")

# kombu leaves its API unannotated: typed as Any-returning callables here
_Consumer: Callable[..., Any] = kombu.messaging.Consumer
_Queue: Callable[..., Any] = kombu.entity.Queue

#: Seconds a serving thread blocks on the queue before it looks whether it should stop (a warm shutdown
#: waits this long at most for the idle threads).
POLL = 0.2
#: Seconds a read may take past the time Redis itself blocks (network, scheduling).
READ_MARGIN = 5.0
#: Seconds between two attempts to reach a Redis that stopped answering.
RETRY_INTERVAL = 0.5
#: The task events the fast path sends: one per call.
EVENT_TYPES = ("task-succeeded", "task-failed", "task-revoked")
#: What Flower shows of a result, at most.
RESULT_REPR = 256
#: What a worker's log line shows of a result, at most (Celery's ``Task.resultrepr_maxsize``).
LOG_REPR = 1024
#: Celery's tracer's logger, where a worker's per-task lines are written.
_trace_log = logging.getLogger("celery.app.trace")
#: On RabbitMQ, a serving thread holds the task events of the calls it serves back to back and sends them
#: as one message (Celery's ``task.multi``, a list Flower's receiver reads event by event): each publish
#: cost a sequential call's p50 5-10% (interleaved A/B runs), by the broker's work on the 2 cores as much
#: as by py-amqp's. It sends them once it has no call to serve for EVENT_IDLE seconds, holds EVENT_BATCH
#: events, or its oldest waited EVENT_DELAY seconds (steady load): Flower shows a call that much later.
#: They are sent between calls, never from within one: py-amqp's publish first reads what arrived on the
#: connection (its check for a blocked connection), which can be the next call, served right there.
#: EVENT_IDLE was 1 ms: with two workers taking a caller's calls in turn, each waited longer than that
#: between its calls and published every event on its own, while the next call arrived. At 5 ms, a
#: sequential call's p50 fell 7% there and the workers' CPU per call 19% (interleaved A/B, two workers
#: each); 20 ms gained no more.
EVENT_IDLE = 0.005
EVENT_BATCH = 64
EVENT_DELAY = 0.05

# Gives one in-flight call of a lapsed instance back to the front of its queue, unless the instance came
# back (its alive key) or acknowledged the call meanwhile. KEYS: in-flight list, queue, alive key (none for
# a list of this instance's own: a thread's whose take failed).
_GIVE_BACK = """
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""


@dataclasses.dataclass(frozen=True)
class EventTopics:
    """Where the fast path on Redis publishes each task event: the worker's event exchange (Celery's
    ``event_exchange``, where Flower listens) and the pub/sub channels of each of :data:`EVENT_TYPES`."""

    exchange: str
    channels: dict[str, list[str]]


class FastPath:
    """The serving threads of one worker for its key's queue, and how a message becomes a served call.

    :class:`RedisFastPath` and :class:`AmqpFastPath` take the messages and answer them, each on its broker.

    Args:
        distribution: the distribution whose calls are served (its ``handlers``).
        threads: how many calls run at once.
        hostname: the worker's node name, as Flower shows it.
    """

    def __init__(self, distribution: Distribution, threads: int, hostname: str) -> None:
        self.distribution = distribution
        self.threads = max(1, threads)
        self.hostname = hostname
        self.pid = os.getpid()
        self.queue = distribution.key
        self._stop = threading.Event()
        #: Set once the serving threads ended (or :meth:`stop` gave up waiting): the keeper keeps the lease
        #: until then, or a call still running through a warm stop would be taken over by another replica.
        self._served = threading.Event()
        self._taking = threading.Event()
        self._taking.set()
        #: Per serving thread, whether it waits for a call to take: :meth:`pause` returns once none does.
        self._waiting = [False] * self.threads
        self._workers: list[threading.Thread] = []
        #: The call each serving thread runs now, and when it started (by thread id).
        self._running: dict[int, tuple[Any, float]] = {}
        #: Calls served by this instance.
        self.served = 0
        #: Seconds a lapsed instance's calls wait before another instance takes them (its liveness).
        self.lease_timeout = distribution.settings.resolved_lease_timeout()
        self._keeper: threading.Thread | None = None

    def running(self) -> list[dict[str, Any]]:
        """The calls running now, as ``celery inspect active`` lists a worker's tasks (arguments masked, as
        Flower shows them)."""
        return [
            {
                "id": str(request.id),
                "name": str(request.task),
                **_shown(request),
                "type": str(request.task),
                "hostname": self.hostname,
                "time_start": started,
                "acknowledged": False,
                "delivery_info": request.delivery_info,
                "worker_pid": self.pid,
            }
            for request, started in list(self._running.values())
        ]

    @property
    def busy(self) -> bool:
        """Whether a serving thread runs a call now."""
        return bool(self._running)

    @property
    def taking(self) -> bool:
        """Whether the serving threads take calls (not paused by :meth:`pause`)."""
        return self._taking.is_set()

    def pause(self, timeout: float = POLL + 0.3) -> None:
        """Take no new call (``celery control cancel_consumer {key}``); the running ones finish.

        Returns once no serving thread waits for a call any more (``timeout`` at most: a thread blocked on
        the queue wakes within :data:`POLL`), so no call is taken after it. On RabbitMQ each thread closes
        its connection: a call the broker had sent it ahead goes back to the queue. On Redis the instance
        stays alive (its lease), with nothing in flight.
        """
        self._taking.clear()
        limit = time.monotonic() + timeout
        while any(self._waiting) and time.monotonic() < limit:
            self._stop.wait(0.005)

    def resume(self) -> None:
        """Take calls again (``celery control add_consumer {key}``)."""
        self._taking.set()

    def _may_take(self, index: int) -> bool:
        """Before serving thread ``index`` waits for a call: whether it may (paused: ``False``, once it
        waited a poll at most for :meth:`resume`). Marked waiting first, so :meth:`pause` cannot miss it."""
        self._waiting[index] = True
        if self._taking.is_set():
            return True
        self._waiting[index] = False
        self._taking.wait(POLL)
        return False

    def start(self) -> None:
        """Start the keeper of this instance's liveness, then the serving threads."""
        name = "celery-services-fastpath"
        self._keeper = threading.Thread(target=self._keep, name=f"{name}-keeper", daemon=True)
        self._keeper.start()
        for index in range(self.threads):
            thread = threading.Thread(target=self._serve, args=(index,), name=f"{name}-{index}", daemon=True)
            thread.start()
            self._workers.append(thread)
        log.info("fast path serving queue %s with %d thread(s)", self.queue, self.threads)

    def stop(self, timeout: float | None = None) -> None:
        """Take no new call and let the running ones finish (up to ``timeout``, default the call timeout)."""
        self._stop.set()
        limit = time.monotonic() + (self.distribution.settings.timeout if timeout is None else timeout)
        for thread in self._workers:
            thread.join(max(limit - time.monotonic(), 0.0))
        self._served.set()
        if self._keeper is not None:
            self._keeper.join(self.lease_timeout)
        self._stopped(any(thread.is_alive() for thread in self._workers))

    def _stopped(self, running: bool) -> None:
        """What a transport does once its threads stopped (``running``: some are still in a call)."""

    def _keep(self) -> None:
        """The keeper thread, until :meth:`stop`: keeps this instance's liveness as its broker sees it."""
        raise NotImplementedError

    def _serve(self, index: int) -> None:
        raise NotImplementedError

    def _serve_message(self, message: TaskMessage, received: float, finish: Finish) -> bool:
        """Run one call and ``finish`` it (reply, acknowledgement, Flower's event); what ``finish`` said."""
        headers = message.headers
        handle = self.distribution.handlers.get(message.name)
        request = SizedRequest(
            headers,
            args=message.args,
            kwargs=message.kwargs,
            delivery_info={
                **(message.properties.get("delivery_info") or {}),
                "redelivered": bool(headers.get(HEADER_REDELIVERED) or message.redelivered),
            },
            hostname=self.hostname,
            headers=headers,  # else Celery's context sifts its custom headers out of them on every call
        )
        request.envelope_size = message.size
        if handle is None:
            log.warning("fast path got the unknown task %s", message.name)
            answer = unknown_task(self.distribution, message.name, str(message.id), headers)
            return finish(request, answer, received, None)
        revoked = str(message.id) in worker_state.revoked  # `celery control revoke`, Flower's "Revoke"
        if revoked or _expired(headers):
            reason = "revoked" if revoked else "expired"
            log.info("call %s not started: %s", message.id, reason)
            if not headers.get(HEADER_REPLY) and not getattr(request, "ignore_result", False):
                self._store_revoked(request, reason)  # a plain caller's .get() raises TaskRevokedError
            # A revoked call's proxy caller is told (an expired call is a plain one: a call's deadline is
            # checked by its handler).
            answer = (
                revoked_call(self.distribution, message.name, message.id, headers) if revoked else Answer()
            )
            return finish(request, answer, received, "task-revoked")
        started = time.time()
        done = False

        def reply(answer: Answer) -> None:
            nonlocal done
            runtime = time.time() - started
            if answer.reply_to is None and not getattr(request, "ignore_result", False):
                self._store_result(request, answer)
            done = finish(request, answer, started, _outcome_event(answer))
            if _trace_log.isEnabledFor(logging.INFO):  # once the caller has its reply
                _log_outcome(request, answer, runtime)

        thread = threading.get_ident()
        self._running[thread] = (request, started)
        args, kwargs = tuple(message.args), dict(message.kwargs)
        try:
            if _task_signals_heard():
                self._serve_signalled(message.name, handle, request, args, kwargs, reply, started)
            else:
                serve(handle, request, args, kwargs, reply)
        finally:
            del self._running[thread]
        return done

    def _serve_signalled(
        self,
        name: str,
        handle: Handler,
        request: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        reply: Callable[[Answer], None],
        started: float,
    ) -> None:
        """:func:`.serve` between Celery's task signals, with the call's request as the task's, as Celery's
        tracer runs a task: their receivers (Django's fixup recycles database connections there,
        instrumentation opens and ends its spans) see the fast path's calls as they see the consumer's."""
        task = self.distribution.celery.tasks[name]  # registered with its handler
        task.request_stack.push(request)
        try:
            signals.task_prerun.send(sender=task, task_id=request.id, task=task, args=args, kwargs=kwargs)
            answer = serve(handle, request, args, kwargs, reply)
            _signal_outcome(task, request, args, kwargs, answer, time.time() - started)
        finally:
            task.request_stack.pop()

    def _store_result(self, request: Any, answer: Answer) -> None:
        # A plain ``send_task().get()`` caller reads Celery's result backend.
        backend = self.distribution.celery.backend
        try:
            if answer.error is None:
                backend.mark_as_done(request.id, answer.result, request=request)
            else:
                backend.mark_as_failure(request.id, answer.error, request=request)
        except Exception:
            log.exception("result of call %s not stored in the result backend", request.id)

    def _store_revoked(self, request: Any, reason: str) -> None:
        try:
            self.distribution.celery.backend.mark_as_revoked(request.id, reason, request=request)
        except Exception:
            log.exception("revocation of call %s not stored in the result backend", request.id)

    def _event(
        self, request: Any, answer: Answer, received: float, started: float, kind: str
    ) -> dict[str, Any]:
        # One event per call, holding what the received, started and succeeded/failed events would:
        # Flower's state merges fields by task id, and shows the call's name, arguments, worker and runtime.
        now = time.time()
        fields: dict[str, Any] = {
            "uuid": str(request.id),
            "name": str(request.task),
            **_shown(request),
            "root_id": getattr(request, "root_id", None),
            "parent_id": getattr(request, "parent_id", None),
            "retries": getattr(request, "retries", 0),
            "eta": None,
            "expires": getattr(request, "expires", None),
            "received": received,
            "started": started,
            "hostname": self.hostname,
            "pid": self.pid,
            "clock": self.distribution.celery.clock.forward(),
            "utcoffset": utcoffset(),
            "timestamp": now,
        }
        if kind == "task-succeeded":
            fields["result"] = clipped(answer.encoded, RESULT_REPR)  # the reply's own: no second rendering
            fields["runtime"] = now - started
        elif kind == "task-failed":
            fields["exception"], fields["traceback"] = _failure(answer)
            fields["runtime"] = now - started
        else:
            fields["expired"] = str(request.id) not in worker_state.revoked
        fields["type"] = kind
        return fields


class RedisFastPath(FastPath):
    """The fast path on a Redis broker: ``BLMOVE`` into per-thread in-flight lists, answers in one round
    trip, and the liveness keeper that gives back the calls of lapsed instances.

    Args:
        distribution: the distribution whose calls are served (its ``handlers``).
        threads: how many calls run at once.
        hostname: the worker's node name, as Flower shows it.
        topics: where each task event goes, or ``None`` when task events are off.
    """

    def __init__(
        self,
        distribution: Distribution,
        threads: int,
        hostname: str,
        topics: EventTopics | None = None,
    ) -> None:
        super().__init__(distribution, threads, hostname)
        settings = distribution.settings
        self.topics = topics
        celery = distribution.celery
        broker = str(celery.conf.broker_url or settings.resolved_broker_url())
        options = dict(celery.conf.broker_transport_options or {})
        self.queue = f"{options.get('global_keyprefix') or ''}{settings.key}"
        base = f"{settings.registry_prefix}:fast:{settings.key}"
        self.instances = f"{base}:instances"
        self.base = base
        self.alive = self._alive(distribution.instance)
        # One in-flight list per serving thread: it holds at most the call that thread runs, so the
        # acknowledgement is a DEL, not an LREM that sends the whole message back to Redis.
        self.members = [f"{distribution.instance}:{n}" for n in range(self.threads)]
        # The pops block for POLL seconds: their reads wait that long and a margin, never a library default.
        self.store = redis_client(
            broker,
            RedisOptions.of(settings),
            socket_timeout=POLL + READ_MARGIN,
            socket_connect_timeout=2.0,
        )
        self.same_store = distribution.broker_store is distribution.reply_store
        self._give_back = self.store.register_script(_GIVE_BACK)
        #: Calls given back to the queue from lapsed instances, by this instance.
        self.given_back = 0

    def _inflight(self, member: str) -> str:
        return f"{self.base}:inflight:{member}"

    def _alive(self, instance: str) -> str:
        return f"{self.base}:alive:{instance}"

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Mark this instance alive, start its keeper and its serving threads."""
        self._renew()
        super().start()

    def _stopped(self, running: bool) -> None:
        # This instance leaves (its keeper stopped: it renews no more): the others may give back at once
        # whatever is still in flight here.
        try:
            self.store.delete(self.alive)
            if running:
                log.warning("fast path stopped with calls running: they are given back to the queue")
            else:
                for member in self.members:  # none, normally
                    self._give_back_all(member)
        except redis.RedisError:
            log.warning("fast path could not leave the instances set cleanly", exc_info=True)
        self.store.close()

    # -- liveness -------------------------------------------------------------------------------------

    def _renew(self) -> None:
        pipe = self.store.pipeline(transaction=False)
        pipe.set(self.alive, self.hostname, px=int(self.lease_timeout * 1000))
        pipe.sadd(self.instances, *self.members)
        # Kept as long as Celery keeps an unacknowledged message (its visibility timeout): when every
        # instance of the key is gone for that long, nobody is left to give their calls back.
        pipe.expire(self.instances, KEEP)
        for member in self.members:
            pipe.expire(self._inflight(member), KEEP)
        pipe.execute()

    def _keep(self) -> None:
        interval = self.lease_timeout / 3
        while not self._served.wait(interval):
            try:
                self._renew()
                for raw in self.store.smembers(self.instances):
                    member = raw.decode() if isinstance(raw, bytes) else str(raw)
                    instance = member.rsplit(":", 1)[0]
                    if instance != self.distribution.instance and not self.store.exists(
                        self._alive(instance)
                    ):
                        self._give_back_all(member)
            except (redis.RedisError, OSError, ValueError) as exc:  # ValueError: as in _serve
                log.warning("fast path lease not renewed: %r; retrying", exc)

    def _give_back_all(self, member: str, *, own: bool = False) -> None:
        """Give back the in-flight call of a serving thread (``{instance}:{n}``) whose instance lapsed, or
        (``own``) of this instance's own thread whose take failed (see :meth:`_serve`)."""
        inflight = self._inflight(member)
        alive = self._alive(member.rsplit(":", 1)[0])
        for raw in self.store.lrange(inflight, 0, -1):
            again: Any
            try:
                again = json.dumps(mark_redelivered(json.loads(raw))).encode()
            except (ValueError, TypeError, AttributeError):
                again = raw  # not ours to read: given back as it is, for Celery's consumers to judge
            keys = [inflight, self.queue] if own else [inflight, self.queue, alive]
            if self._give_back(keys=keys, args=[raw, again]):
                self.given_back += 1
                whose = "thread" if own else "lapsed thread"
                log.warning("call of the %s %s given back to queue %s", whose, member, self.queue)
        if not self.store.exists(alive) and self.store.llen(inflight) == 0:
            self.store.srem(self.instances, member)

    # -- serving --------------------------------------------------------------------------------------

    def _serve(self, index: int) -> None:
        inflight = self._inflight(self.members[index])
        # One connection held by the thread, commands written and read on it directly: redis-py's command
        # and pipeline layers cost more per call than the rest of the call's own work (DESIGN §6).
        held = HeldConnection(self.store.connection_pool)
        # The same every time. The list a take makes gets its lifetime with it (the EXPIRE, pipelined, runs
        # once the BLMOVE returns): given by the keeper's next renewal only, a third of a lease on, a worker
        # killed meanwhile with no other instance of its key left the list, and its call, for good.
        take = pack_commands(
            [("BLMOVE", self.queue, inflight, "RIGHT", "LEFT", POLL), ("EXPIRE", inflight, KEEP)]
        )
        failing = False
        # A take that failed may have been run by Redis all the same, its answer lost with the connection:
        # its call then waits in this thread's list, and would be deleted unserved by the next call's
        # acknowledgement (a DEL of the list). It goes back to the queue before the thread takes again.
        unsure = False
        while not self._stop.is_set():
            if not self._may_take(index):
                continue
            try:
                if unsure:
                    self._give_back_all(self.members[index], own=True)
                    unsure = False
                connection = held.get()
                connection.send_packed_command(take)
                raw = connection.read_response(timeout=POLL + READ_MARGIN)
                connection.read_response(timeout=READ_MARGIN)
                self._waiting[index] = False
                if failing:
                    log.warning("fast path reaches its queue %s again", self.queue)
                    failing = False
            except (redis.RedisError, OSError, ValueError) as exc:
                # ValueError: a Sentinel pool closed this connection while it was read (redis_clients.py).
                self._waiting[index] = False
                unsure = True
                held.drop()
                if not failing:
                    log.warning("fast path cannot reach its queue %s: %r; retrying", self.queue, exc)
                    failing = True
                self._stop.wait(RETRY_INTERVAL)
                continue
            if raw is None:
                continue
            done = False
            try:
                done = self._handle(raw, inflight, connection)
            except Exception:  # one bad call must not stop the thread serving the others
                log.exception("fast path failed to serve a message of queue %s", self.queue)
            if not done:
                held.drop()
                self._acknowledge(inflight)
        held.release()

    def _acknowledge(self, inflight: str) -> None:
        """Empty this thread's in-flight list before it takes another call (retried while Redis is away:
        a call left there would be given back and run again once this instance is gone)."""
        while True:
            try:
                self.store.delete(inflight)
                return
            except (redis.RedisError, OSError, ValueError) as exc:  # ValueError: as in _serve
                log.warning("fast path cannot acknowledge its call: %r; retrying", exc)
                if self._stop.wait(RETRY_INTERVAL):
                    return

    def _handle(self, raw: Any, inflight: str, connection: Any) -> bool:
        """Serve one message; whether it was acknowledged (with its reply)."""
        received = time.time()
        try:
            message = decode_task(raw)
        except MalformedMessage as exc:
            # Nobody to answer (no call id can be trusted): Celery's consumer drops such a message too.
            log.error("dropped an unreadable message of queue %s: %s (%r...)", self.queue, exc, raw[:120])
            return False

        def finish(request: Any, answer: Answer, started: float, event: str | None) -> bool:
            return self._finish(connection, inflight, request, answer, received, started, event)

        return self._serve_message(message, received, finish)

    def _finish(
        self,
        connection: Any,
        inflight: str,
        request: Any,
        answer: Answer,
        received: float,
        started: float,
        event: str | None,
    ) -> bool:
        """Reply, acknowledge and tell Flower (``event``), in one round trip on the thread's connection when
        broker and replies share a Redis; whether it went through.

        The reply and the acknowledgement are written first, the event once it is built (while Redis
        answers them): the caller does not wait for Flower's event to be made.
        """
        distribution = self.distribution
        self.served += 1
        push: list[tuple[Any, ...]] = []
        if answer.reply_to and answer.body is not None:
            if self.same_store:
                push = distribution.replies.commands(answer.reply_to, answer.body, answer.deadline)
            else:
                distribution.replies.push(answer.reply_to, answer.body, answer.deadline)
        commands = [*push, ("DEL", inflight)]
        try:
            connection.send_packed_command(pack_commands(commands))
            if self.topics is not None and event is not None:
                fields = self._event(request, answer, received, started, event)
                payload = encode_event(fields, self.hostname, self.topics.exchange)
                published = [("PUBLISH", topic, payload) for topic in self.topics.channels[event]]
                connection.send_packed_command(pack_commands(published))
                commands += published
            results = [connection.read_response() for _ in commands]
        except (redis.RedisError, OSError, ValueError) as exc:
            # The reply may be lost with the connection (its caller then times out).
            log.warning("call %s answered but its reply or acknowledgement failed: %r", request.id, exc)
            return False
        if push:
            distribution.replies.pushed(answer.reply_to or "", results[len(push) - 1])
        return True


class AmqpFastPath(FastPath):
    """The fast path on RabbitMQ: each serving thread consumes the key's queue on its own connection
    (prefetch 1, late acknowledgement), outside Celery's consumer loop and its timers.

    RabbitMQ gives back the unacknowledged call of a connection that died (a killed worker) by itself, and of
    one whose heartbeats stopped (a frozen worker, a host cut off), about a lease later (:attr:`heartbeat`):
    its serving thread beats between calls, and a keeper thread while the serving thread runs a call (a long
    call is not given to another replica). A call's reply is written to Redis, its message acknowledged
    while Redis answers (:meth:`.Replies.push_on`), then its task event held: the events of calls served
    back to back go out together (:class:`_TaskEvents`).

    Args:
        distribution: the distribution whose calls are served (its ``handlers``).
        threads: how many calls run at once.
        hostname: the worker's node name, as Flower shows it.
        events: the exchange of the worker's task events (Celery's ``event_exchange``, where Flower
            listens), or ``None`` when task events are off.
    """

    def __init__(
        self, distribution: Distribution, threads: int, hostname: str, events: kombu.entity.Exchange | None
    ) -> None:
        super().__init__(distribution, threads, hostname)
        self.events = events
        #: The AMQP heartbeat of the serving connections, in whole seconds (the protocol's unit): a third of
        #: the lease, since RabbitMQ closes a connection it heard nothing from for two to three heartbeats
        #: and gives its unacknowledged call to another replica (measured: after 1.6-2.1 s at 1 s, 7.5-8.2 s
        #: at 3 s), so a frozen replica's call comes back about a lease later, as on Redis.
        self.heartbeat = max(1, math.ceil(self.lease_timeout / 3))
        #: Each serving thread's connection, while it has one (by thread index).
        self._lines: dict[int, _Line] = {}

    def _keep(self) -> None:
        """Beat for each serving thread that runs a call (its own loop beats between calls)."""
        keep(self._served, self.heartbeat, lambda: list(self._lines.values()))

    def _serve(self, index: int) -> None:
        celery = self.distribution.celery
        # Celery's own declaration of the key's queue (exchange, binding, durability): declared again on
        # each connection, as Celery's consumer does, so a broker that lost it gets it back.
        queue = celery.amqp.queues.get(self.queue) or _Queue(self.queue)
        replies = HeldConnection(self.distribution.reply_store.connection_pool)
        failing = False
        while not self._stop.is_set():
            if not self._may_take(index):
                continue
            connection = celery.connection_for_read(heartbeat=self.heartbeat)
            try:
                try:
                    # One attempt: this loop's own pause between attempts is the retry.
                    connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
                    errors = connection.connection_errors + connection.channel_errors
                    # Its waits bounded from here (REPLY_WAIT), and beaten while a call runs.
                    line = self._lines[index] = _Line(connection.connection, errors)
                    channel = connection.channel()
                    events = self._task_events(connection, channel)
                    consumer = _Consumer(
                        channel,
                        queues=[queue],
                        on_message=partial(self._on_message, index, events, replies, line),
                        prefetch_count=1,
                        no_ack=False,
                    )
                    with consumer:
                        if failing:
                            log.warning("fast path reaches its queue %s again", self.queue)
                            failing = False
                        while not self._stop.is_set():
                            self._waiting[index] = True
                            if not self._taking.is_set():
                                break  # paused: leave, closing the connection (still waiting: see pause)
                            idle = EVENT_IDLE if events is not None and events.held else POLL
                            try:
                                connection.drain_events(timeout=idle)
                            except TimeoutError:
                                if events is not None:
                                    events.send()  # no call came: Flower hears of those served
                                # Beats when due; raises once the broker's own beats stopped (a broker
                                # cut off answers nothing, and this thread would wait on it for ever).
                                connection.heartbeat_check()
                            else:
                                # Between calls: the call just served has published its service events.
                                if events is not None and events.due():
                                    events.send()
                        if events is not None:
                            events.send()
                except BaseException:
                    # Dropped, not closed: a broker cut off answers no close, and its side goes once
                    # this connection's heartbeats stop.
                    connection.collect()
                    raise
                connection.release()
                self._lines.pop(index, None)
            except Exception as exc:  # a lost or refused connection, whatever its library calls it
                self._lines.pop(index, None)
                self._waiting[index] = False
                if not failing:
                    log.warning("fast path cannot reach its queue %s: %r; retrying", self.queue, exc)
                    failing = True
                self._stop.wait(RETRY_INTERVAL)
        replies.release()

    def _task_events(self, connection: Any, channel: Any) -> _TaskEvents | None:
        """What holds and sends the task events of the calls served on ``channel`` (``None``: none sent).

        The worker's event exchange is declared first, on each connection, as Celery's dispatcher declares
        it before it publishes: on a broker where nobody had declared it yet, each publish to it closed the
        serving connection. Declared on a channel of its own: if an exchange of that name exists with other
        properties, the refusal closes that channel only, and the calls are served without their events
        (Celery's own dispatcher fails the same way, and its worker still runs tasks).
        """
        if self.events is None:
            return None
        try:
            declaring = connection.channel()
            try:
                bound: Any = self.events(declaring)  # kombu leaves declare() unannotated
                bound.declare()
            finally:
                declaring.close()
        except connection.channel_errors as exc:
            log.warning(
                "task events off on this connection: exchange %s not declared: %r", self.events.name, exc
            )
            return None
        return _TaskEvents(channel, self.hostname, self.events.name)

    def _on_message(
        self, index: int, events: _TaskEvents | None, replies: HeldConnection, line: _Line, message: Any
    ) -> None:
        if not self._taking.is_set():
            # Sent ahead before the consumer was cancelled (its cancel reads what arrived first).
            message.requeue()
            return
        self._waiting[index] = False  # serving a call taken before any pause
        with line.running():
            try:
                self._on_task(events, replies, line, message)
            except Exception:  # one bad call must not stop the thread serving the others
                log.exception("fast path failed to serve a message of queue %s", self.queue)
                if not message.acknowledged:
                    line.ack(message)  # as on Redis: a call that broke the server is not taken again

    def _on_task(
        self, events: _TaskEvents | None, replies: HeldConnection, line: _Line, message: Any
    ) -> None:
        received = time.time()
        delivery = dict(message.delivery_info or {})
        try:
            if message.content_type != "application/json":
                raise MalformedMessage(f"content type {message.content_type!r} is not JSON")
            task = task_message(message.headers, message.body, {"delivery_info": delivery})
        except MalformedMessage as exc:
            # Nobody to answer (no call id can be trusted): Celery's consumer drops such a message too.
            log.error("dropped an unreadable message of queue %s: %s", self.queue, exc)
            line.ack(message)
            return
        task = dataclasses.replace(task, redelivered=bool(delivery.get("redelivered")))

        def ack() -> None:
            line.ack(message)

        def finish(request: Any, answer: Answer, started: float, event: str | None) -> bool:
            self.served += 1
            if answer.reply_to and answer.body is not None:
                # The call is acknowledged even if its reply was not pushed: its caller times out, as with
                # a lost reply.
                push = self.distribution.replies.push_on
                push(replies, answer.reply_to, answer.body, answer.deadline, meanwhile=ack)
            else:
                ack()
            if events is not None and event is not None:
                events.hold(event, event_json(self._event(request, answer, received, started, event)))
            return True

        self._serve_message(task, received, finish)


class _Line(Line):
    """A RabbitMQ serving thread's connection (:class:`.Line`), which also acknowledges its calls."""

    def __init__(self, connection: Any, errors: tuple[type[BaseException], ...]) -> None:
        super().__init__(connection)
        self.errors = errors  # what a lost connection raises

    def ack(self, message: Any) -> None:
        """Acknowledge ``message``; on a lost connection, say so (RabbitMQ delivers the call again: the
        connection of a replica frozen past its heartbeats was closed, and its call given to another)."""
        try:
            with self.lock:
                message.ack()
        except self.errors as exc:
            log.warning(
                "call %s not acknowledged, its connection lost (%r): RabbitMQ delivers it again",
                message.properties.get("correlation_id"),
                exc,
            )


class _TaskEvents:
    """The task events a RabbitMQ serving thread holds until it sends them together (see EVENT_IDLE).

    Published on the thread's channel as Celery's dispatcher publishes them (to the worker's event exchange,
    its hostname in the headers): one event under its own routing key (``task.succeeded``), several
    as one ``task.multi`` list. Through a kombu Producer, preparing a message cost as much as publishing it.
    """

    def __init__(self, channel: Any, hostname: str, exchange: str) -> None:
        self.channel = channel
        self.headers = {"hostname": hostname}
        self.exchange = exchange
        self.held: list[tuple[str, str]] = []  # (event type, its JSON)
        self.since = 0.0

    def hold(self, kind: str, body: str) -> None:
        """Keep one event, until the serving loop sends what is held (:meth:`due`, or no call came).

        Never sent from here, within a call: py-amqp's publish reads what arrived first, and would serve
        the next call there, before this one's service events are published (listeners heard them out of
        order; ``tests/faults/test_fastpath.py``).
        """
        if not self.held:
            self.since = time.monotonic()
        self.held.append((kind, body))

    def due(self) -> bool:
        """Whether the events held are EVENT_BATCH, or the oldest of them EVENT_DELAY seconds old."""
        return bool(self.held) and (
            len(self.held) >= EVENT_BATCH or time.monotonic() - self.since >= EVENT_DELAY
        )

    def send(self) -> None:
        """Publish the events held, if any."""
        if not self.held:
            return
        held, self.held = self.held, []
        if len(held) == 1:
            kind, body = held[0]
            routing_key = kind.replace("-", ".")
        else:
            body, routing_key = f"[{','.join(body for _, body in held)}]", "task.multi"
        message = self.channel.prepare_message(
            body.encode(), 0, "application/json", "utf-8", self.headers, {"delivery_mode": 1}
        )
        self.channel.basic_publish(message, exchange=self.exchange, routing_key=routing_key)


def _task_signals_heard() -> bool:
    # As Celery's tracer does, nothing is sent nor pushed for signals nobody receives: sent and pushed on
    # every call, they cost the worker 11% more instructions a call, most of it the request's push (3 us).
    return bool(
        signals.task_prerun.receivers
        or signals.task_postrun.receivers
        or signals.task_success.receivers
        or signals.task_failure.receivers
    )


def _signal_outcome(
    task: Any, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any], answer: Answer, runtime: float
) -> None:
    """``task_success`` or ``task_failure``, then ``task_postrun``: what Celery's tracer sends after a run."""
    if answer.error is None:
        signals.task_success.send(sender=task, result=answer.result, runtime=runtime)
        state, retval = states.SUCCESS, answer.result
    else:
        state, retval = states.FAILURE, answer.error
        if signals.task_failure.receivers:
            try:
                answer.outcome()  # raised as the consumer's task raises it: a traceback, chained to its cause
            except ServiceError as exc:
                signals.task_failure.send(
                    sender=task,
                    task_id=request.id,
                    exception=exc,
                    args=args,
                    kwargs=kwargs,
                    traceback=exc.__traceback__,
                    einfo=ExceptionInfo(),
                )
    signals.task_postrun.send(
        sender=task, task_id=request.id, task=task, args=args, kwargs=kwargs, retval=retval, state=state
    )


def _shown(request: Any) -> dict[str, str]:
    """A call's ``args`` and ``kwargs`` as Flower shows them: the caller's masked reprs."""
    return {
        "args": str(getattr(request, "argsrepr", None) or request.args),
        "kwargs": str(getattr(request, "kwargsrepr", None) or request.kwargs),
    }


def _log_outcome(request: Any, answer: Answer, runtime: float) -> None:
    """The line Celery's tracer writes when a task ends, in its words, logger and level: a worker's log shows
    each call whichever path ran it (a typed error is one the task declares, as ``throws`` makes it on
    Celery's consumer). There is no "received" line: the fast path takes a call when it starts it."""
    context: dict[str, Any] = {"id": request.id, "name": request.task, "runtime": runtime, **_shown(request)}
    if answer.error is None:
        context["return_value"] = clipped(answer.encoded, LOG_REPR)
        _trace_log.info(LOG_SUCCESS, context, extra={"data": context})
    else:
        context |= {"description": "raised expected", "exc": repr(answer.error)}
        _trace_log.info(LOG_FAILURE, context, extra={"data": context})


def _outcome_event(answer: Answer) -> str:
    return "task-succeeded" if answer.error is None else "task-failed"


def _expired(headers: dict[str, Any]) -> bool:
    """A plain task message's ``expires`` has passed (a call's own deadline is checked by its handler)."""
    expires = headers.get("expires")
    if not expires or headers.get(HEADER_DEADLINE) is not None:
        return False
    try:
        moment = dt.datetime.fromisoformat(str(expires))
    except ValueError:
        return False
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp() <= time.time()


def _failure(answer: Answer) -> tuple[str, str]:
    """The ``exception`` and ``traceback`` a task-failed event shows: a 4xx is a refusal, not a crash."""
    error = answer.error
    assert error is not None
    if error.code < 500:
        return f"{error.name}({error.code}): {error.message}", ""
    cause = answer.cause or error
    shown = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
    return repr(error), shown
