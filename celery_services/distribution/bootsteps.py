"""Worker bootsteps the distribution adds to its Celery app.

:class:`FastCalls` hands the key's queue from Celery's consumer to the fast path (:mod:`.fastpath`) in a
worker that consumes it.

Celery's remote control of the key's queue reaches the fast path (:func:`_follow_remote_control`):
``celery control cancel_consumer {key}`` pauses it (the worker takes no more calls; a deploy drains it so),
``add_consumer {key}`` resumes it, ``celery inspect active_queues`` lists the key's queue while it serves,
and ``celery inspect active`` the calls it runs.

:class:`ReadyCallbacks` mends kombu's event loop for Celery's own consumer: a callback scheduled with
``call_soon`` during a turn of the loop, from the loop's thread, waited until the loop's next timer (up to
2 s), since the loop sleeps for its timers without looking for ready callbacks first. That is how a solo
worker acknowledges a late-acknowledged call, and with prefetch 1 the broker sends the next call only
after the acknowledgement: on RabbitMQ 18% of sequential calls waited up to 2 s (a 50 ms no-op timer,
which this replaces, bounded it to 50 ms: p99 50 ms). Workers on a pool of child processes or threads
acknowledge otherwise and were not affected.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

from celery import Celery, bootsteps
from celery.worker.control import Panel, ok
from kombu.entity import Exchange

from .fastpath import EVENT_TYPES, AmqpFastPath, EventTopics, FastPath, RedisFastPath
from .worker import IN_PROCESS_POOLS

__all__ = ["FastCalls", "ReadyCallbacks", "add_bootsteps", "wake_while_ready"]

log = logging.getLogger("celery_services.fastpath")


class ReadyCallbacks(bootsteps.StartStopStep):  # type: ignore[misc]
    """Keeps the worker's event loop from sleeping while callbacks scheduled during its turn wait."""

    requires = {"celery.worker.components:Hub"}

    def start(self, worker: Any) -> None:
        """Hook the worker's hub (workers without one, e.g. gevent, need nothing)."""
        if getattr(worker, "hub", None) is not None:
            wake_while_ready(worker.hub)


def wake_while_ready(hub: Any) -> None:
    """Make kombu's ``hub`` poll without sleeping while callbacks are ready, so its next turn runs them.

    Its ``on_tick`` callbacks run right before the poll: one of them, finding callbacks ready, wakes the
    hub as ``call_soon`` from another thread does (its waker socket), and the poll returns at once. The
    callbacks still run where the hub runs them, first in its next turn, in its order.
    """
    if not hasattr(hub, "_ready") or not hasattr(hub, "_waker"):  # a kombu without them: nothing to mend
        return

    def wake_if_ready() -> None:
        waker = hub._waker
        if hub._ready and waker is not None:
            waker.wake()

    hub.on_tick.add(wake_if_ready)


class FastCalls(bootsteps.StartStopStep):  # type: ignore[misc]
    """Serves the key's queue on the fast path instead of Celery's consumer (``fast_path``), in a worker whose
    pool runs calls in its own process (``solo``, ``threads``, ``gevent``, ``eventlet``).

    A consumer step: it runs again after each reconnection of the consumer, and each time takes the key's
    queue away from kombu's task consumer; the fast path itself starts once and keeps its own connections.
    """

    requires = ("celery.worker.consumer.tasks:Tasks", "celery.worker.consumer.events:Events")

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.fast: FastPath | None = None

    def start(self, c: Any) -> None:
        """Start the fast path once, and stop kombu consuming the key's queue."""
        distribution = getattr(c.app, "celery_services_distribution", None)
        if distribution is None or not distribution.settings.fast_path:
            return
        key = distribution.key
        consumed = {queue.name for queue in getattr(c.task_consumer, "queues", ())}
        if self.fast is None:
            if key not in consumed:
                return  # a worker of other queues (-Q): the key's calls are not this worker's to take
            pool = type(c.pool).__module__.rsplit(".", 1)[-1]
            if pool not in IN_PROCESS_POOLS:
                # Its calls run in child processes (isolation, several cores): Celery's consumer feeds them.
                log.info("fast path off: the %s pool runs calls in child processes", pool)
                return
            exchange = _event_exchange(c)
            if distribution.broker_store is not None:
                self.fast = RedisFastPath(distribution, _slots(c), c.hostname, _topics(c, exchange))
            else:
                self.fast = AmqpFastPath(distribution, _slots(c), c.hostname, exchange)
            _freeze_start_up()
            self.fast.start()
            distribution.fastpath = self.fast
        if key in consumed:
            c.cancel_task_queue(key)

    def shutdown(self, c: Any) -> None:
        """Let the running calls finish and stop serving."""
        if self.fast is not None:
            self.fast.stop()
            self.fast = None


def _freeze_start_up() -> None:
    """Take the worker's start-up objects out of the cyclic collector's way, in a worker process.

    A worker holds some 90,000 objects from its start (Celery, kombu, pydantic, the app) that live as long
    as it does; the first full collection after it starts serving scanned them all: a 20 to 55 ms pause that
    the call in flight waited through (``benchmarks/calls.py``'s p99 showed it). Frozen (``gc.freeze``), the
    collections that follow scan only what serving makes; the cyclic garbage of the start is collected
    first. Only where the worker owns the process (its consumer runs on the main thread): a worker embedded
    in a test session or an app (``celery.contrib.testing``) leaves that process's collector alone.
    """
    if threading.current_thread() is threading.main_thread():
        gc.collect()
        gc.freeze()
        log.info("fast path: %d start-up objects frozen out of the collector's scans", gc.get_freeze_count())


def _slots(c: Any) -> int:
    """How many tasks the worker's pool runs at once (solo: one)."""
    limit = getattr(c.pool, "limit", None) or getattr(c.controller, "concurrency", None)
    return int(limit or 1)


def _event_exchange(c: Any) -> Exchange | None:
    """The exchange the worker sends its task events to (Celery's ``event_exchange``), ``None`` when it
    sends none."""
    dispatcher = getattr(c, "event_dispatcher", None)
    if dispatcher is None or not dispatcher.enabled:
        return None
    if dispatcher.groups and "task" not in dispatcher.groups:
        return None
    exchange: Exchange = dispatcher.exchange
    return exchange


def _topics(c: Any, exchange: Exchange | None) -> EventTopics | None:
    """The pub/sub channels of each task event the fast path sends on Redis (``None``: it sends none)."""
    if exchange is None:
        return None
    # The channel of the worker's own dispatcher knows the transport's fanout prefix and patterns; kombu's
    # client puts global_keyprefix before each channel it publishes or subscribes to (Flower's included),
    # which the fast path, writing PUBLISH itself, must do too.
    channel = c.event_dispatcher.producer.channel
    keyprefix = str(getattr(channel, "global_keyprefix", "") or "")
    topics = channel._get_publish_topics
    channels = {
        kind: [keyprefix + topic for topic in topics(exchange.name, kind.replace("-", "."))]
        for kind in EVENT_TYPES
    }
    return EventTopics(exchange.name, channels)


_following = False  # whether Celery's commands are wrapped in this process


def _fast_path(state: Any, queue: str | None = None) -> FastPath | None:
    """The fast path of the worker a control command reached, if it serves ``queue`` (any, when None)."""
    distribution = getattr(state.consumer.app, "celery_services_distribution", None)
    if distribution is None or (queue is not None and queue != distribution.key):
        return None
    fast: FastPath | None = distribution.fastpath
    return fast


def _follow_remote_control() -> None:
    """Make Celery's ``cancel_consumer``, ``add_consumer``, ``active_queues`` and ``active`` commands see
    the fast path.

    The fast path took the key's queue from Celery's consumer, so Celery's own commands no longer reached
    it: ``cancel_consumer`` answered "no longer consuming" and the worker went on serving. Celery keeps one
    registry of commands per process: each is wrapped (once), and a worker without a fast path, or a queue
    other than its key, gets Celery's own command unchanged.
    """
    global _following
    if _following:
        return
    _following = True
    names = ("cancel_consumer", "add_consumer", "active_queues", "active")
    cancel, add, active_queues_of, active_of = (Panel.data[name] for name in names)

    def cancel_consumer(state: Any, queue: str, **kwargs: Any) -> Any:
        fast = _fast_path(state, queue)
        if fast is not None:
            fast.pause()
            log.info("fast path paused: no longer taking calls from %s", queue)
        return cancel(state, queue, **kwargs)

    def add_consumer(state: Any, queue: str, *args: Any, **kwargs: Any) -> Any:
        fast = _fast_path(state, queue)
        if fast is None:
            return add(state, queue, *args, **kwargs)
        fast.resume()  # not Celery's consumer as well: the fast path serves this queue
        log.info("fast path resumed: taking calls from %s", queue)
        return ok(f"add consumer {queue}")

    def active_queues(state: Any) -> Any:
        queues = active_queues_of(state)
        fast = _fast_path(state)
        if fast is not None and fast.taking:
            key = state.consumer.app.celery_services_distribution.key
            queue = state.consumer.app.amqp.queues.get(key)
            if queue is not None and key not in {each["name"] for each in queues}:
                queues.append(dict(queue.as_dict(recurse=True)))
        return queues

    def active(state: Any, **kwargs: Any) -> Any:
        fast = _fast_path(state)
        return active_of(state, **kwargs) + (fast.running() if fast is not None else [])

    wrappers: dict[str, Any] = {
        "cancel_consumer": cancel_consumer,
        "add_consumer": add_consumer,
        "active_queues": active_queues,
        "active": active,
        "dump_active": active,  # Celery's alias of it
    }
    Panel.data.update(wrappers)  # Celery's help and arguments of each (Panel.meta) stay as they were


def add_bootsteps(celery: Celery) -> None:
    """Add the bootsteps its broker needs to ``celery``'s workers (idempotent)."""
    if ReadyCallbacks not in celery.steps["worker"]:
        celery.steps["worker"].add(ReadyCallbacks)
    if FastCalls not in celery.steps["consumer"]:
        celery.steps["consumer"].add(FastCalls)
    _follow_remote_control()
