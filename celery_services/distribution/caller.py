"""The caller's half of a remote call: the proxy service and the lean call path behind it.

A call is decided once (:meth:`Transport.prepare`: deadline, params allow-list, size, headers), then sent
as one Celery task message and answered on a reply list the provider fills (see :mod:`.provider`). On a
Redis broker the message is written as kombu's Redis transport writes it (:mod:`.messages`) and ``LPUSH``ed
in the same round trip as the ``BLPOP`` on the reply list; on RabbitMQ it goes through this thread's kombu
producer. Celery's own ``send_task().get()`` would also subscribe to a result channel, ``GET`` the meta key
and poll: not needed when the provider answers on a list.

One piece, past 300 lines: the call path is kept in one module so that its speed choices (the message
written by hand, one round trip, one read of the reply) stay local, as DESIGN §6 asks."""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from celery.utils.nodenames import anon_nodename
from kombu.exceptions import OperationalError

from ..core.aio import run_blocking
from ..core.errors import (
    BadGateway,
    BadRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    ServiceError,
    Timeout,
    Unavailable,
)
from ..core.service import SIGNATURES, method_attribute
from .events import Broker
from .logs import call_fields
from .messages import NO_EMBED, call_message, encode_task
from .observability import call_headers, client_call, hooks
from .protocol import (
    HEADER_CALLER,
    HEADER_DEADLINE,
    HEADER_REPLY,
    HEADER_SIGNATURE,
    clipped,
    dumps,
    is_secret_header,
    loads,
    mask_url,
    payload_size,
    reply_key,
    safe_params,
    task_name,
)
from .redis_clients import HeldConnection, connecting_by, pack_commands, send_by
from .signing import Signer, unsigned_body

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from .settings import DistributionSettings

__all__ = ["Call", "RemoteService", "Transport", "current_deadline"]

T = TypeVar("T")

log = logging.getLogger("celery_services.remote")

#: Seconds a reply read may take past the deadline the server's BLPOP itself honours (Redis answers a
#: timed-out BLPOP within its 0.1 s cron; network, scheduling). A Redis that stalls ends a call this late,
#: as Unavailable.
READ_MARGIN = 0.5
#: The longest timeout a call may have (a week): a call's deadline is written as a date, and its waits are
#: socket timeouts; a timeout of no finite number of seconds is a BadRequest, refused before it is sent.
MAX_TIMEOUT = 7 * 24 * 3600.0
#: Pauses between attempts to reach a Redis that refuses connections (restarting, failing over): doubling
#: from the first to the second, until the call's deadline. The RabbitMQ publish retries every 0.5 s too.
CONNECT_RETRY = (0.05, 0.5)

#: The deadline of the call being served in this context; nested calls never wait past it.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "celery_services_deadline", default=None
)


def current_deadline() -> float | None:
    """The epoch deadline of the remote call being served here, if any."""
    return _deadline.get()


def set_deadline(deadline: float | None) -> contextvars.Token[float | None]:
    """Make ``deadline`` the one nested calls inherit (the provider sets it while serving a call)."""
    return _deadline.set(deadline)


def reset_deadline(token: contextvars.Token[float | None]) -> None:
    """Undo :func:`set_deadline`."""
    _deadline.reset(token)


@dataclass(frozen=True, slots=True)
class Call:
    """One call, decided and ready to travel (:meth:`Transport.prepare`).

    Attributes:
        name: the task name, ``{key}.{path}.{method}``.
        key: the provider's key, which is also its queue.
        call_id: the call's id (Celery's task id).
        kwargs: the envelope: ``id``, ``data`` and the params that travel.
        deadline: epoch seconds after which nobody waits for the reply.
        headers: the call's message headers (caller, deadline, reply, signature).
        fields: its log fields.
        encoded: ``kwargs`` in JSON, serialized once for its size check and the message.
    """

    name: str
    key: str
    call_id: str
    kwargs: dict[str, Any]
    deadline: float
    headers: dict[str, Any]
    fields: dict[str, str]
    encoded: str


class Transport:
    """Sends calls to a key's queue and waits for their replies.

    Args:
        replies: the Redis of the reply lists.
        queues: the broker's Redis, when the broker is one: a call is then ``LPUSH``ed straight on its queue
            (in the same round trip as the reply wait when ``queues is replies``) instead of going through
            kombu; ``None`` (RabbitMQ) publishes through kombu.
    """

    def __init__(
        self,
        celery: Celery,
        replies: redis.Redis,
        settings: DistributionSettings,
        *,
        caller: str,
        is_live: Callable[[str], bool | None] | None = None,
        signer: Signer | None = None,
        queues: redis.Redis | None = None,
    ) -> None:
        self.celery = celery
        self._queue_store = queues
        options = dict(celery.conf.broker_transport_options or {})
        self._keyprefix = str(options.get("global_keyprefix") or "")
        self.signer = signer
        self.is_live = is_live
        self.replies = replies
        self.settings = settings
        self.caller = caller
        self._broker = mask_url(celery.conf.broker_url or settings.resolved_broker_url())
        self._headers = settings.resolved_forwarded_headers()
        self._origin = anon_nodename()  # the sender Celery names in a task's headers
        # One connection and producer per calling thread: kombu channels are not thread-safe, and
        # keeping one per thread spares a pool acquire on every call.
        self._local = threading.local()
        self._producers: list[Any] = []
        self._producers_lock = threading.Lock()

    def call(
        self,
        key: str,
        path: str,
        method: str,
        *,
        id: Any = None,
        data: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        wait: bool = False,
    ) -> Any:
        """Send one call and return its result, or raise the provider's error rebuilt by name.

        Args:
            wait: send the call even when no instance of ``key`` is live now, and wait for one until the
                deadline (default: fail at once, leaving nothing queued).

        Raises:
            Timeout: no reply within ``timeout`` (or the inherited deadline, when shorter).
            PayloadTooLarge: the envelope is over ``max_payload_bytes``; nothing is sent.
            BadRequest: the arguments have no JSON form, or ``timeout`` is not a number of seconds up to
                :data:`MAX_TIMEOUT` (a week); nothing is sent.
            Unavailable: the broker cannot be reached, or no instance of ``key`` is live (nothing is sent).
            MethodNotAllowed: the provider's workers do not serve ``path.method``.
            BadGateway: the reply is not one the protocol knows.
        """
        if hooks.on:  # tracing or metrics: the same call in a CLIENT span, counted (observability.py)
            send = partial(self._send_call, key, path, method, id, data, params, timeout, wait)
            return client_call(send, key, path, method)
        return self._send_call(key, path, method, id, data, params, timeout, wait)

    def _send_call(
        self,
        key: str,
        path: str,
        method: str,
        id: Any,
        data: Any,
        params: dict[str, Any] | None,
        timeout: float | None,
        wait: bool,
    ) -> Any:
        call = self.prepare(key, path, method, id=id, data=data, params=params, timeout=timeout, wait=wait)
        log.debug("call sent", extra=call.fields)
        try:
            return self.send(call)
        except ServiceError as exc:
            log.info("call failed: %s (%s) %s", exc.name, exc.code, exc.message, extra=call.fields)
            raise

    def prepare(
        self,
        key: str,
        path: str,
        method: str,
        *,
        id: Any = None,
        data: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        wait: bool = False,
    ) -> Call:
        """Decide what travels for one call: deadline, envelope, params allow-list, headers, size.

        The one place both the blocking and the asyncio transports (:mod:`.aio`) take a call from, so they
        cannot disagree on what is sent. Raises what :meth:`call` raises before anything is sent.
        """
        settings = self.settings
        name = task_name(key, path, method)
        seconds = timeout if timeout is not None else settings.timeout
        if not seconds <= MAX_TIMEOUT:  # NaN too: no deadline, no date for the message, no socket timeout
            raise BadRequest(
                f"Call to '{name}': its timeout ({seconds!r}) is not a number of seconds up to "
                f"{MAX_TIMEOUT:g}",
                {"timeout": str(seconds), "limit": MAX_TIMEOUT},
            )
        now = time.time()
        deadline = now + seconds
        inherited = _deadline.get()
        if inherited is not None:
            deadline = min(deadline, inherited)
        if deadline <= now:
            raise Timeout(f"No time left to call '{name}'", {"key": key, "path": path, "method": method})
        if not wait and self.is_live is not None and self.is_live(key) is False:
            # A rolling deploy or a typo must not cost a whole timeout, nor leave a message nobody takes.
            raise Unavailable(
                f"No live instance of '{key}' in the registry to call '{name}'",
                {"key": key, "path": path, "method": method},
            )
        kwargs = {
            "id": id,
            "data": data,
            "params": safe_params(
                params or {},
                authentication=settings.authentication,
                headers=self._headers,
                extra=settings.extra_params,
            ),
        }
        try:
            encoded = dumps(kwargs)
        except ValueError as exc:
            raise BadRequest(f"Call to '{name}' is not JSON serializable: {exc}") from None
        size = payload_size(encoded)
        if size > settings.max_payload_bytes:
            raise PayloadTooLarge(
                f"Call to '{name}' is {size} bytes, over the {settings.max_payload_bytes} byte limit",
                {"size": size, "limit": settings.max_payload_bytes},
            )
        return self._call(name, key, kwargs, deadline, call_fields(key, path, method, ""), encoded)

    def _call(
        self,
        name: str,
        queue: str,
        kwargs: dict[str, Any],
        deadline: float,
        fields: dict[str, str],
        encoded: str | None = None,
    ) -> Call:
        call_id = str(uuid.uuid4())
        headers: dict[str, Any] = {HEADER_CALLER: self.caller, HEADER_DEADLINE: deadline, HEADER_REPLY: True}
        if self.signer is not None:
            headers[HEADER_SIGNATURE] = self.signer.sign_call(name, call_id, deadline, kwargs)
        if hooks.on:
            call_headers(headers, call_id)  # the trace context (observability.py)
        encoded = dumps(kwargs) if encoded is None else encoded
        return Call(name, queue, call_id, kwargs, deadline, headers, {**fields, "call_id": call_id}, encoded)

    def request(self, name: str, queue: str, kwargs: dict[str, Any], deadline: float) -> Any:
        """Publish the task ``name`` on ``queue`` and wait for its reply until ``deadline`` (epoch)."""
        return self.send(self._call(name, queue, kwargs, deadline, {"task": name}))

    def send(self, call: Call) -> Any:
        """Send a prepared call and wait for its reply (one round trip on a Redis broker)."""
        store = self._queue_store
        if store is None:
            self._publish(call)
            raw = self._wait(call, None)
        elif store is self.replies:
            raw = self._wait(call, self.encode(call))  # queued and waited for in one round trip
        else:
            self._push(store, call)
            raw = self._wait(call, None)
        return self.open_reply(call, raw)

    def encode(self, call: Call) -> bytes:
        """The call as kombu's Redis transport queues a Celery task message (:mod:`.messages`).

        ``ignore_result``: the reply list carries the result, so the worker need not also store it in the
        backend; Flower follows the call from the worker's task events.
        """
        kwargsrepr = _kwargsrepr(call.kwargs, len(call.encoded))
        headers, properties = call_message(call.name, call.call_id, call.deadline, kwargsrepr, self._origin)
        body = f"[[], {call.encoded}, {NO_EMBED}]"  # (args, kwargs, embed)
        return encode_task({**headers, **call.headers}, properties, body, call.key)

    def queue_key(self, queue: str) -> str:
        """The Redis list of ``queue`` (kombu's ``global_keyprefix`` included)."""
        return f"{self._keyprefix}{queue}"

    def open_reply(self, call: Call, raw: bytes | None) -> Any:
        """The result of a call from its raw reply (``None``: none came), or its error rebuilt by name."""
        if raw is None:
            raise Timeout(
                f"Timeout of the call to '{call.name}' (no reply before its deadline)",
                {"task": call.name, "call_id": call.call_id},
            )
        raw = self.signer.open_reply(call.key, call.call_id, raw) if self.signer else unsigned_body(raw)
        return _decode_reply(call.name, call.call_id, raw)

    def _push(self, store: redis.Redis, call: Call) -> None:
        """``LPUSH`` the call on its queue, in a broker Redis apart from the reply store, by its deadline.

        On this thread's held connection to the broker, connected and read within what is left of the
        deadline, as the reply wait is: through the client, its own timeouts (5 s) held a 1 s call 5 s
        against a stalled broker. A pooled connection that died while idle is replaced once. An ``LPUSH``
        written but not answered by the deadline fails the call as not sent: if the broker takes it later,
        the call is past its deadline and is dropped unstarted.
        """
        import redis

        message = pack_commands([("LPUSH", self.queue_key(call.key), self.encode(call))])
        for attempt in (1, 2):
            held = self._held(store, "broker")
            try:
                with connecting_by(call.deadline):
                    connection = _connected(held, call.deadline)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("broker %s not reached while sending %s: %s", self._broker, call.name, exc)
                raise not_sent(call, exc) from None
            try:
                remaining = call.deadline - time.time()
                if remaining <= 0:
                    raise TimeoutError("no time left to queue the call")
                send_by(connection, message, call.deadline)
                connection.read_response(timeout=remaining)
                return
            except (redis.TimeoutError, TimeoutError) as exc:
                held.drop()  # an answer may still come on it
                log.warning("broker %s did not take %s by its deadline", self._broker, call.name)
                raise not_sent(call, exc) from None
            except redis.ResponseError as exc:  # refused: out of memory (noeviction)
                log.warning("broker %s refused %s: %s", self._broker, call.name, exc)
                raise not_sent(call, exc) from None
            except (redis.ConnectionError, OSError, ValueError) as exc:
                held.drop()
                if attempt == 2:
                    log.warning("broker %s not reached while sending %s: %s", self._broker, call.name, exc)
                    raise not_sent(call, exc) from None

    def _publish(self, call: Call) -> None:
        """Publish a call on RabbitMQ: the message Celery's ``send_task_message`` would send, its body the
        call's JSON as serialized once by :meth:`prepare`.

        Through the thread's kombu producer rather than Celery's ``send_task_message``, which cost half as
        much again (160 us against 104 per call, measured): it serialized the arguments again and bound and
        checked the queue's declaration on every call. Celery's ``before/after_task_publish`` signals are
        not sent, as on Redis (where the message is written by hand).
        """
        expires = max(call.deadline - time.time(), 0.001)
        kwargsrepr = _kwargsrepr(call.kwargs, len(call.encoded))
        headers, properties = call_message(call.name, call.call_id, call.deadline, kwargsrepr, self._origin)
        headers.update(call.headers)
        body = f"[[], {call.encoded}, {NO_EMBED}]"  # (args, kwargs, embed)
        # Celery's own declaration of the key's queue, which its workers consume: declared (once per
        # connection) before the first call, so a call sent before any worker started waits in it.
        queue = self.celery.amqp.queues[call.key]
        producer = self._producer()
        connection = producer.connection
        # kombu's own check of its declaration cache first copies and binds the queue, every call (a sixth
        # of a call's time here): asked of the same cache (hashes, emptied on each reconnection) instead.
        if hash(queue) in connection.declared_entities:
            try:
                # Straight on the producer's channel: through Producer.publish, which builds a retrying
                # closure and goes through its preparation layers on every call, a call cost 60 us to
                # publish against 24, and a call's p50 0.06-0.12 ms more (alternating runs). Its retries
                # are kept for a connection that failed.
                channel = producer.channel
                message = channel.prepare_message(
                    body.encode(),
                    None,
                    "application/json",
                    "utf-8",
                    headers,
                    {"delivery_mode": 2, **properties},
                )
                # Its write bounded by the deadline: a RabbitMQ under a resource alarm stops reading from
                # publishers, and the write waited for ever once the socket buffers were full.
                channel.basic_publish(
                    message,
                    exchange=queue.exchange.name,
                    routing_key=queue.routing_key,
                    timeout=max(call.deadline - time.time(), 0.001),
                )
                return
            except Exception as exc:  # a connection or channel gone: kombu's publish below revives it
                if not isinstance(
                    exc,
                    connection.recoverable_connection_errors
                    + connection.connection_errors
                    + connection.recoverable_channel_errors
                    + connection.channel_errors,
                ):
                    raise
                if time.time() >= call.deadline:  # its write cut at the deadline: nothing to retry
                    Broker.drop(connection)  # part of a frame may be on it
                    log.warning("broker %s did not take %s by its deadline: %r", self._broker, call.name, exc)
                    raise not_sent(call, TimeoutError(str(exc))) from None
                log.debug("publishing %s again on a revived connection: %r", call.name, exc)
        del properties["expiration"]  # kombu writes it from ``expiration`` (seconds) below
        # A bounded retry: an unreachable broker must fail the call within its deadline, not hang it. Each
        # attempt to connect may take what is left of the deadline at most: a thread's first call against
        # a broker that accepts connections and answers nothing waited the whole connect timeout (4 s).
        configured = self.celery.conf.broker_connection_timeout  # None (no limit) in a user's own app
        failures: list[BaseException] = []  # each attempt's: a refusal, if any, says unreachable

        def within_deadline(exc: BaseException, interval: float) -> None:
            failures.append(exc)
            left = call.deadline - time.time() - interval
            if left <= 0:
                raise TimeoutError(f"broker unreachable until the call's deadline: {exc!r}") from exc
            connection.connect_timeout = min(configured or left, left)

        policy: dict[str, Any] = {"max_retries": max(1, int(expires / 0.5)), "errback": within_deadline}
        policy |= {"interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}
        declared = hash(queue) in connection.declared_entities
        connection.connect_timeout = min(configured or expires, expires)  # the thread's own connection
        try:
            with connection._reraise_as_library_errors():
                producer.publish(
                    body,
                    exchange=queue.exchange,
                    routing_key=queue.routing_key,
                    declare=[] if declared else [queue],
                    headers=headers,
                    content_type="application/json",
                    content_encoding="utf-8",
                    delivery_mode=2,
                    expiration=expires,
                    timeout=expires,  # each write (the errback ends the retries at the deadline)
                    retry=True,
                    retry_policy=policy,
                    **properties,
                )
        except (OperationalError, OSError, ConnectionError) as exc:
            Broker.drop(connection)  # a write cut short may have left part of a frame on it
            # The broker's address and the library's message stay in the log: an error reaches HTTP clients.
            log.warning("broker %s not reached while sending %s: %s", self._broker, call.name, exc)
            refusal = next((failure for failure in failures if not timed_out(failure)), None)
            last = failures[-1] if failures else exc.__cause__ or exc  # kombu's OperationalError wraps it
            raise not_sent(call, refusal or last) from None
        finally:
            connection.connect_timeout = configured

    def _producer(self) -> Any:
        # Kept by pid (_kept): py-amqp would have a forked child publish on its parent's socket.
        return self._kept("producer", self._new_producer, self._forget)

    def _new_producer(self) -> Any:
        producer = self.celery.amqp.Producer(self.celery.connection_for_write(), auto_declare=False)
        with self._producers_lock:
            self._producers.append(producer)
        return producer

    def _forget(self, producer: Any) -> None:
        with self._producers_lock:
            if producer not in self._producers:
                return
            self._producers.remove(producer)
        _close_quietly(producer)

    def close(self) -> None:
        """Close the connections of every calling thread."""
        with self._producers_lock:
            producers, self._producers = self._producers, []
        for producer in producers:
            _close_quietly(producer)

    def _wait(self, call: Call, message: bytes | None) -> bytes | None:
        import redis

        key = reply_key(self.settings.registry_prefix, call.call_id)
        try:
            with connecting_by(call.deadline):  # a new connection's handshake too, not the client's timeouts
                return self._pop(key, call, message)
        except _NotQueued as exc:
            log.warning("broker %s not reached while sending %s", self._broker, call.name, exc_info=True)
            raise not_sent(call, exc.__cause__) from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise Unavailable(
                f"Reply store unreachable while waiting for '{call.name}': {type(exc).__name__}",
                {"task": call.name, "call_id": call.call_id},
            ) from None

    def _pop(self, key: str, call: Call, message: bytes | None) -> bytes | None:
        """``BLPOP key`` until the call's deadline, reading with a socket timeout set from that deadline.

        With ``message``, it is ``LPUSH``ed to the call's queue on the same connection first, and both
        replies are read in one round trip. The client's own socket timeout (redis-py 8 defaults to 5 s)
        would cut a longer call short; a Redis that stops answering must not hang the call either. A pooled
        connection that died while idle (a Redis restart) is replaced once: nothing sent on it arrived. A
        Redis that refuses connections is tried again until the deadline (:func:`_connected`): a call
        outlasting a short outage is answered, as on RabbitMQ, instead of failing at once.
        """
        import redis

        queued = message is None
        for attempt in (1, 2):
            remaining = call.deadline - time.time()
            if remaining <= 0:
                return None
            held = self._held(self.replies, "replies")
            try:
                connection = _connected(held, call.deadline)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if queued and timed_out(exc):
                    return None  # the deadline came while connecting: a Timeout, not a lost store
                lost = redis.ConnectionError if queued else _NotQueued
                raise lost(f"reply store unreachable until the deadline: {exc}") from exc
            remaining = call.deadline - time.time()  # less after an outage waited out
            if remaining <= 0:
                return None
            try:
                if queued:
                    connection.send_packed_command(pack_commands([("BLPOP", key, max(remaining, 0.001))]))
                else:
                    push = ("LPUSH", self.queue_key(call.key), message)
                    pop = ("BLPOP", key, max(remaining, 0.001))
                    send_by(connection, pack_commands([push, pop]), call.deadline)
                    connection.read_response(timeout=remaining + READ_MARGIN)
                    queued = True
                reply = connection.read_response(timeout=remaining + READ_MARGIN)
            except (redis.ConnectionError, OSError, ValueError) as exc:
                # ValueError ("I/O operation on closed file"): another thread dropped this connection while it
                # was read, as a pool does when Sentinel names a new master (redis_clients.py).
                held.drop()
                if attempt == 2:
                    lost = redis.ConnectionError if queued else _NotQueued
                    raise lost(f"reply connection lost: {exc}") from exc
                continue
            except redis.ResponseError as exc:  # refused: out of memory (noeviction), a foreign key's type
                held.drop()  # the BLPOP's answer may still be to come
                lost = redis.ConnectionError if queued else _NotQueued
                raise lost(f"refused: {exc}") from exc
            except BaseException:
                held.drop()  # a read cut short leaves a reply in flight on this connection
                raise
            return None if reply is None else reply[1]
        return None

    def _held(self, store: redis.Redis, slot: str) -> HeldConnection:
        """This thread's connection to ``store`` (its ``slot``: the replies, or a broker apart from them),
        held between its calls until one fails or the thread ends.

        Taken from the pool once, not per call: taking and returning it cost a call some 15 us, 6% of it
        (measured in alternating rounds). A forked child takes its own.
        """
        return self._kept(slot, lambda: HeldConnection(store.connection_pool), HeldConnection.release)

    def _kept(self, slot: str, make: Callable[[], T], release: Callable[[T], object]) -> T:
        """This thread's ``slot``: made by ``make`` on its first use in this process, given to ``release``
        once the thread ends (callers' threads come and go: thread pools). Kept by pid: a forking thread's
        locals live on in its child (a prefork pool's), which must not use its parent's sockets."""
        held = getattr(self._local, slot, None)
        if held is not None and held[0] == os.getpid():
            return held[1]  # type: ignore[no-any-return]
        value = make()
        weakref.finalize(threading.current_thread(), release, value)
        setattr(self._local, slot, (os.getpid(), value))
        return value


def connect_pauses(deadline: float) -> Iterator[float]:
    """The pauses between attempts to reach a Redis that refuses connections (:data:`CONNECT_RETRY`), the
    last one cut to end at ``deadline`` (epoch); none once it has passed. Both transports wait by them."""
    pause = CONNECT_RETRY[0]
    while (remaining := deadline - time.time()) > 0:
        yield min(pause, remaining)
        pause = min(pause * 2, CONNECT_RETRY[1])


def _connected(held: HeldConnection, deadline: float) -> Any:
    """``held``'s connection, connected; while Redis refuses, tried again (:func:`connect_pauses`) until
    ``deadline`` (epoch), then an error is raised: a refusal if there was one (the last attempt, cut to what
    was left, may have timed out instead), else the last timeout."""
    import redis

    pauses: Iterator[float] | None = None  # made on the first refusal only: this is every call's path
    refused: BaseException | None = None
    while True:
        try:
            return held.get()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            refused = refused if timed_out(exc) else exc
            pauses = pauses or connect_pauses(deadline)
            pause = next(pauses, None)
            if pause is None:
                raise refused or exc from None
            time.sleep(pause)


def timed_out(exc: BaseException | None) -> bool:
    """Whether reaching a server ended by a timeout rather than a refusal or a failure: every attempt to
    connect is cut to what is left of the call's deadline, so a timeout there is that deadline's."""
    import redis

    return isinstance(exc, TimeoutError | redis.TimeoutError)


def not_sent(call: Call, cause: BaseException | None = None) -> ServiceError:
    """The error of a call the broker never took. A :class:`Timeout` when the call's deadline came while
    the broker was being reached and nothing refused (``cause``: a stalled broker, or a connection slower
    than a short deadline on a loaded machine): the broker was not shown unreachable. Else
    :class:`Unavailable`: unreachable, or refused by an error reply (a Redis out of memory)."""
    # 10 ms: a socket's timeout, cut to what was left, ends by the monotonic clock, not by time.time().
    import redis

    if timed_out(cause) and call.deadline - time.time() < 0.01:
        return Timeout(
            f"Timeout of the call to '{call.name}' (not sent: no broker reached by its deadline)",
            {"task": call.name, "call_id": call.call_id},
        )
    if isinstance(cause, redis.ResponseError):  # named by its class: the log has Redis's words
        return Unavailable(
            f"Broker refused '{call.name}' ({type(cause).__name__}): it was not sent", {"task": call.name}
        )
    return Unavailable(f"Broker unreachable: '{call.name}' was not sent", {"task": call.name})


class _NotQueued(Exception):
    """The broker did not take the call (the connection was lost, or the broker refused): not sent."""


def _decode_reply(name: str, call_id: str, raw: bytes) -> Any:
    """The result of a reply, or its error rebuilt by name; anything else is a :class:`BadGateway`."""
    try:
        answer = loads(raw)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and "error" in answer and isinstance(answer["error"], dict):
        raise ServiceError.from_dict(answer["error"])
    if isinstance(answer, dict) and "result" in answer:
        return answer["result"]
    raise BadGateway(
        f"Malformed reply to '{name}': not a protocol reply ({len(raw)} bytes)",
        {"task": name, "call_id": call_id},
    )


def _close_quietly(producer: Any) -> None:
    try:
        producer.connection.close()
    except Exception:  # a connection that never opened
        log.debug("closing a producer connection failed", exc_info=True)


def _kwargsrepr(kwargs: dict[str, Any], size: int) -> str:
    # What Flower and worker logs show: never the identity or the credentials of the caller (``user``,
    # ``authentication``, protocol.is_secret_header's headers), and never a huge payload. The message
    # itself is untouched: what travels is decided by protocol.safe_params.
    params = kwargs.get("params") or {}
    masked = {k: ("***" if k in ("user", "authentication") else v) for k, v in params.items()}
    headers = masked.get("headers")
    if isinstance(headers, dict):
        masked["headers"] = {k: ("***" if is_secret_header(k) else v) for k, v in headers.items()}
    elif headers is not None:  # not a name → value map: nothing tells which part is a credential
        masked["headers"] = "***"
    shown = {**kwargs, "params": masked}
    if size > 1024:  # a large payload is never rendered whole only to be cut
        shown["data"] = f"<{size} bytes of JSON>"
    text = repr(shown) if kwargs else "{}"
    return clipped(text, 1024)


#: Guards the making of a proxy's methods against a change of its offer (discovery's thread): a method made
#: from the old offer and stored after the change would outlive it. Taken once per method and change only.
_OFFERING = threading.Lock()


class RemoteService:
    """A proxy for the service at ``path`` of the app ``key``: each method sends the call and waits.

    Mount it with ``app.use(path, proxy)``; the app's hooks and the distribution's proxy hooks then run
    around its calls like any service's. Only the methods in ``methods`` exist on it, so any other is
    refused with :class:`MethodNotAllowed` before anything is sent.

    Attributes:
        remote: always ``True``.
        key: the provider app's key.
        path: the service's path on the provider.
        methods: the methods offered (standard and custom).
        events: the events the provider publishes for it.
        remote_options: service options the provider put in its manifest.
    """

    remote = True

    def __init__(
        self,
        call: Callable[..., Any],
        key: str,
        path: str,
        methods: Sequence[str],
        events: Sequence[str] = (),
        remote_options: dict[str, Any] | None = None,
        *,
        call_async: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        self._call = call
        self._call_async = call_async
        self._bound: list[str] = []  # the attributes __getattr__ made, kept until the offer changes
        self.key = key
        self.path = path
        self.methods = tuple(methods)
        self.events = tuple(events)
        self.remote_options = dict(remote_options or {})

    def _offer(
        self, methods: Sequence[str], events: Sequence[str], remote_options: dict[str, Any] | None = None
    ) -> None:
        # What the provider offers now (discovery mounts a returning provider's proxy again). Private: any
        # public name could be one of the remote service's methods.
        with _OFFERING:
            for attribute in self._bound:
                self.__dict__.pop(attribute, None)
            self._bound = []
            self.methods = tuple(methods)
            self.events = tuple(events)
            self.remote_options = dict(remote_options or {})

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # The method offered under this attribute: publish_article is the Python spelling of publish-article.
        # Made once and kept as an instance attribute, so later lookups never reach here (a call looks its
        # method up three times: async or not, offered or not, then the call).
        with _OFFERING:
            offered = self.__dict__.get("methods", ())
            attribute = name
            name = next((m for m in offered if method_attribute(m) == name), name)
            if name.startswith("_") or name not in offered:
                raise AttributeError(name)
            method = self._method(name)
            self.__dict__[attribute] = method
            self._bound.append(attribute)
            return method

    def _method(self, name: str) -> Callable[..., Any]:
        names = SIGNATURES.get(name, ("data",))

        def method(*args: Any) -> Any:
            if len(args) != len(names) + 1:
                raise MethodNotAllowed(f"Method '{name}' of '{self.path}' takes {names} and params")
            params = dict(args[-1] or {})
            # Call controls, not params: they never travel.
            timeout = params.pop("timeout", None)
            wait = bool(params.pop("wait", False))
            fields = dict(zip(names, args[:-1], strict=True))
            return self._call(self.key, self.path, name, params=params, timeout=timeout, wait=wait, **fields)

        return method

    async def call_async(
        self, method: str, *, id: Any = None, data: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        """Send ``method`` and await its reply without blocking the event loop (what the wrapper's
        :meth:`~celery_services.ServiceWrapper.acall` does for a proxy): the same call as the blocking
        methods', sent by the distribution's asyncio transport (:mod:`.aio`)."""
        if method not in self.methods:
            raise MethodNotAllowed(f"Method '{method}' is not offered by remote service '{self.path}'")
        params = dict(params or {})
        # Call controls, not params: they never travel.
        controls = {"timeout": params.pop("timeout", None), "wait": bool(params.pop("wait", False))}
        names = SIGNATURES.get(method, ("data",))
        fields = {name: value for name, value in (("id", id), ("data", data)) if name in names}
        if self._call_async is None:  # a proxy built without one: its blocking call, off the loop
            call = partial(self._call, self.key, self.path, method, params=params, **controls, **fields)
            return await run_blocking(call)
        return await self._call_async(self.key, self.path, method, params=params, **controls, **fields)

    def __repr__(self) -> str:
        return f"<RemoteService {self.key}/{self.path} {list(self.methods)}>"
