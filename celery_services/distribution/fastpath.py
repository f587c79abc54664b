"""The fast path: a worker serves its key's queue with blocking pops on Redis, without kombu's consumer loop.

Each call is still the Celery task ``{key}.{path}.{method}`` in Celery's protocol v2 on the queue ``{key}``
(a plain ``celery worker`` serves the same queue, more slowly), and Flower still sees it: only the way this
worker takes and answers it changes (DESIGN §6 measured kombu's consumer loop and per-message objects as
most of a call's cost):

- a serving thread moves a message from the queue to this instance's in-flight list with one ``BLMOVE``
  (the reliable-queue pattern: a crash leaves the message where it can be given back);
- the call runs through the same handler as the Celery task (:mod:`.provider`: deadline, signature, caller,
  hooks, payload caps, typed errors);
- reply, acknowledgement (``LREM`` from the in-flight list) and one task event for Flower go in one
  pipelined round trip.

Concurrency: as many serving threads as the worker's pool has slots (``-c N`` of a ``threads`` or
``prefork`` pool; one with ``-P solo``), all in the worker's main process, so a slow call holds one thread
and the others go on. Delivery: each instance keeps an ``alive`` key with a TTL (``lease_timeout``); every
instance of the key gives back to the front of the queue the in-flight calls of instances whose key
lapsed (killed or paused), with ``cs_redelivered`` counted. A paused instance that resumes finds its calls
gone: its late acknowledgement removes nothing, and its reply is not pushed twice (:class:`.Replies`).

What the fast path leaves out: Celery's task signals, time limits (the call's deadline stands for them)
and retries; task messages with a priority (other lists of the queue) are left to Celery's consumers.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import redis
from celery.utils.time import utcoffset

from .messages import HEADER_REDELIVERED, MalformedMessage, decode_task, encode_event, mark_redelivered
from .protocol import HEADER_DEADLINE, HEADER_REPLY, reply_key
from .provider import Answer, SizedRequest, serve, unknown_task_error
from .redis_clients import RedisOptions, redis_client

if TYPE_CHECKING:
    from .distribution import Distribution

__all__ = ["EVENT_TYPES", "FastPath"]

log = logging.getLogger("celery_services.fastpath")

#: Seconds a serving thread blocks on the queue before it looks whether it should stop (a warm shutdown
#: waits this long at most for the idle threads).
POLL = 0.2
#: Seconds a read may take past the time Redis itself blocks (network, scheduling).
READ_MARGIN = 5.0
#: Seconds between two attempts to reach a Redis that stopped answering.
RETRY_INTERVAL = 0.5
#: Seconds the in-flight lists and the instances set outlive their last renewal.
KEEP = 3600
#: The task events the fast path sends: one per call.
EVENT_TYPES = ("task-succeeded", "task-failed", "task-revoked")
#: What Flower shows of a result, at most.
RESULT_REPR = 256

# Gives one in-flight call of a lapsed instance back to the front of its queue, unless the instance came
# back (its alive key) or acknowledged the call meanwhile. KEYS: in-flight list, queue, alive key.
_GIVE_BACK = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""


class FastPath:
    """The serving threads and the liveness keeper of one worker for its key's queue.

    Args:
        distribution: the distribution whose calls are served (its ``handlers``).
        threads: how many calls run at once.
        hostname: the worker's node name, as Flower shows it.
        topics: the pub/sub channels of each of :data:`EVENT_TYPES`, or ``None`` when task events are off.
    """

    def __init__(
        self,
        distribution: Distribution,
        threads: int,
        hostname: str,
        topics: dict[str, list[str]] | None = None,
    ) -> None:
        settings = distribution.settings
        self.distribution = distribution
        self.threads = max(1, threads)
        self.hostname = hostname
        self.topics = topics
        self.pid = os.getpid()
        self.lease_timeout = settings.resolved_lease_timeout()
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
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._keeper: threading.Thread | None = None
        #: Calls given back to the queue from lapsed instances, by this instance.
        self.given_back = 0
        #: Calls served by this instance.
        self.served = 0

    def _inflight(self, member: str) -> str:
        return f"{self.base}:inflight:{member}"

    def _alive(self, instance: str) -> str:
        return f"{self.base}:alive:{instance}"

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Mark this instance alive, start its keeper and its serving threads."""
        self._renew()
        name = "celery-services-fastpath"
        self._keeper = threading.Thread(target=self._keep, name=f"{name}-keeper", daemon=True)
        self._keeper.start()
        for index, member in enumerate(self.members):
            inflight = self._inflight(member)
            thread = threading.Thread(
                target=self._serve, args=(inflight,), name=f"{name}-{index}", daemon=True
            )
            thread.start()
            self._workers.append(thread)
        log.info("fast path serving queue %s with %d thread(s)", self.queue, self.threads)

    def stop(self, timeout: float | None = None) -> None:
        """Take no new call, let the running ones finish (up to ``timeout``), and leave the registry of
        instances; a call still running after that is given back by the others once the lease lapses."""
        self._stop.set()
        limit = time.monotonic() + (self.distribution.settings.timeout if timeout is None else timeout)
        for thread in self._workers:
            thread.join(max(limit - time.monotonic(), 0.0))
        if self._keeper is not None:
            self._keeper.join(self.lease_timeout)
        try:
            self.store.delete(self.alive)  # the others may give back at once what is still in flight
            if any(thread.is_alive() for thread in self._workers):
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
        while not self._stop.wait(interval):
            try:
                self._renew()
                for raw in self.store.smembers(self.instances):
                    member = raw.decode() if isinstance(raw, bytes) else str(raw)
                    instance = member.rsplit(":", 1)[0]
                    if instance != self.distribution.instance and not self.store.exists(
                        self._alive(instance)
                    ):
                        self._give_back_all(member)
            except redis.RedisError as exc:
                log.warning("fast path lease not renewed: %r; retrying", exc)

    def _give_back_all(self, member: str) -> None:
        """Give back the in-flight call of a serving thread (``{instance}:{n}``) whose instance lapsed."""
        inflight = self._inflight(member)
        alive = self._alive(member.rsplit(":", 1)[0])
        for raw in self.store.lrange(inflight, 0, -1):
            again: Any
            try:
                again = json.dumps(mark_redelivered(json.loads(raw))).encode()
            except (ValueError, TypeError, AttributeError):
                again = raw  # not ours to read: given back as it is, for Celery's consumers to judge
            if self._give_back(keys=[inflight, self.queue, alive], args=[raw, again]):
                self.given_back += 1
                log.warning("call of the lapsed thread %s given back to queue %s", member, self.queue)
        if not self.store.exists(alive) and self.store.llen(inflight) == 0:
            self.store.srem(self.instances, member)

    # -- serving --------------------------------------------------------------------------------------

    def _serve(self, inflight: str) -> None:
        # One connection held by the thread, commands written and read on it directly: redis-py's command
        # and pipeline layers cost more per call than the rest of the call's own work (DESIGN §6).
        pool = self.store.connection_pool
        connection: Any = None
        failing = False
        while not self._stop.is_set():
            try:
                if connection is None:
                    connection = pool.get_connection()
                connection.send_command("BLMOVE", self.queue, inflight, "RIGHT", "LEFT", POLL)
                raw = connection.read_response(timeout=POLL + READ_MARGIN)
                if failing:
                    log.warning("fast path reaches its queue %s again", self.queue)
                    failing = False
            except (redis.RedisError, OSError, ValueError) as exc:
                # ValueError: a Sentinel pool closed this connection while it was read (redis_clients.py).
                _drop(pool, connection)
                connection = None
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
                _drop(pool, connection)
                connection = None
                self._acknowledge(inflight)
        if connection is not None:
            pool.release(connection)

    def _acknowledge(self, inflight: str) -> None:
        """Empty this thread's in-flight list before it takes another call (retried while Redis is away:
        a call left there would be given back and run again once this instance is gone)."""
        while True:
            try:
                self.store.delete(inflight)
                return
            except redis.RedisError as exc:
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
        headers = message.headers
        handle = self.distribution.handlers.get(message.name)
        request = SizedRequest(
            headers,
            args=message.args,
            kwargs=message.kwargs,
            delivery_info={
                **(message.properties.get("delivery_info") or {}),
                "redelivered": bool(headers.get(HEADER_REDELIVERED)),
            },
            hostname=self.hostname,
            headers=headers,  # else Celery's context sifts its custom headers out of them on every call
        )
        request.envelope_size = message.size
        if handle is None:
            return self._finish(
                connection, inflight, request, self._unknown(request), received, received, None
            )
        if _expired(headers):
            log.info("call %s not started: it expired in the queue", message.id)
            return self._finish(connection, inflight, request, Answer(), received, received, "task-revoked")
        started = time.time()
        done = False

        def reply(answer: Answer) -> None:
            nonlocal done
            if answer.reply_to is None and not getattr(request, "ignore_result", False):
                self._store_result(request, answer)
            event = _outcome_event(answer)
            done = self._finish(connection, inflight, request, answer, received, started, event)

        serve(handle, request, tuple(message.args), dict(message.kwargs), reply)
        return done

    def _unknown(self, request: Any) -> Answer:
        # A call this worker does not serve (a newer caller, an older provider): answered at once.
        log.warning("fast path got the unknown task %s", request.task)
        error = unknown_task_error(str(request.task))
        answer = Answer(error=error)
        if getattr(request, HEADER_REPLY, None):
            answer.reply_to = reply_key(self.distribution.settings.registry_prefix, str(request.id))
            answer.body = json.dumps({"error": error.to_dict()})
            raw_deadline = getattr(request, HEADER_DEADLINE, None)
            answer.deadline = float(raw_deadline) if raw_deadline is not None else None
        return answer

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
        broker and replies share a Redis; whether it went through."""
        distribution = self.distribution
        self.served += 1
        commands: list[tuple[Any, ...]] = []
        push = None
        if answer.reply_to and answer.body is not None:
            push = distribution.replies.command(answer.reply_to, answer.body, answer.deadline)
        if push is not None and not self.same_store:
            if not distribution.replies.push(answer.reply_to or "", answer.body or "", answer.deadline):
                push = None  # logged by push
        elif push is not None:
            commands.append(push)
        commands.append(("DEL", inflight))
        if self.topics is not None and event is not None:
            payload = self._event(request, answer, received, started, event)
            commands += [("PUBLISH", topic, payload) for topic in self.topics[event]]
        try:
            connection.send_packed_command(connection.pack_commands(commands))
            results = [connection.read_response() for _ in commands]
        except (redis.RedisError, OSError, ValueError) as exc:
            # The reply may be lost with the connection (its caller then times out).
            log.warning("call %s answered but its reply or acknowledgement failed: %r", request.id, exc)
            return False
        if push is not None and self.same_store and not results[0]:
            log.info("reply %s not pushed: the call was already answered", answer.reply_to)
        return True

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

    def _event(self, request: Any, answer: Answer, received: float, started: float, kind: str) -> bytes:
        # One event per call, holding what the received, started and succeeded/failed events would:
        # Flower's state merges fields by task id, and shows the call's name, arguments, worker and runtime.
        now = time.time()
        fields: dict[str, Any] = {
            "uuid": str(request.id),
            "name": str(request.task),
            "args": str(getattr(request, "argsrepr", None) or request.args),
            "kwargs": str(getattr(request, "kwargsrepr", None) or request.kwargs),
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
            encoded = answer.encoded  # what the reply carries: no second rendering of a large result
            fields["result"] = encoded if len(encoded) <= RESULT_REPR else encoded[: RESULT_REPR - 3] + "..."
            fields["runtime"] = now - started
        elif kind == "task-failed":
            fields["exception"], fields["traceback"] = _failure(answer)
            fields["runtime"] = now - started
        else:
            fields["expired"] = True
        fields["type"] = kind
        return encode_event(fields, self.hostname)


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


def _drop(pool: Any, connection: Any) -> None:
    """Close a connection whose state is unknown (an error mid-exchange) and give it back to its pool."""
    if connection is not None:
        connection.disconnect()
        pool.release(connection)
