"""What a distribution does inside a Celery worker, through Celery's signals.

- ``worker_init``: remembers the pool (a prefork pool cannot serve a service mounted after it forked, so
  :meth:`WorkerSignals.check_mount` refuses it) and the worker controller (its consumer learns the tasks of
  services mounted later);
- ``worker_process_init``: in a prefork pool's child, follows the registry again (the parent's watcher
  thread did not survive the fork);
- ``worker_ready``: starts the lease keeper in the consumer's process (the parent of a prefork pool), and the
  watch that bounds the worker's stop (:data:`STOP_GRACE`);
- ``task_received``: leases each call of the key's queue (:mod:`.lease`);
- ``task_unknown``: answers at once a call the worker does not serve, instead of letting Celery drop it;
- ``task_revoked``: tells a revoked call's caller at once, instead of leaving it to time out;
- ``worker_shutting_down`` (the stop signal): sets that watch going;
- ``worker_shutdown``: finalizes the app, so a warm stop withdraws the manifest at once, and stands the watch
  down.

Each handler ignores workers of other Celery apps in the same process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.worker import state as worker_state

from ..core.service import ServiceWrapper
from .protocol import HEADER_DEADLINE, HEADER_REPLY
from .provider import revoked_call, unknown_task

if TYPE_CHECKING:
    from .distribution import Distribution

__all__ = ["IN_PROCESS_POOLS", "STOP_GRACE", "WorkerSignals"]

log = logging.getLogger("celery_services.worker")

#: Pools whose tasks run in the worker's own process, where a service mounted later can still be served.
IN_PROCESS_POOLS = frozenset({"solo", "thread", "threads", "eventlet", "gevent"})

#: Seconds a worker told to stop may still take once no call runs (a healthy stop takes 0.1-2 s), before it
#: exits as it stands. What is left then is bookkeeping with the broker, and a broker that answers nothing
#: (its host down, cut off, frozen) held the stop for ever: Celery's worker heartbeat retries its publish
#: for ever (kombu's ``ensure``, no limit given), py-amqp waits for the answer to the remote-control
#: consumer's cancel for ever, and each later step (worker-offline event, closes, the fast path leaving,
#: the manifest's withdrawal) waits out a timeout of its own: 15 s with every RabbitMQ wait of Celery's
#: connections cut to 1 s. The calls the worker held are delivered again, as a killed worker's are.
STOP_GRACE = 5.0


class WorkerSignals:
    """The Celery worker signals of one distribution, connected by :meth:`connect`.

    Attributes:
        pool: the pool of the worker running in this process (``None`` outside a worker).
        controller: that worker's controller, once it started.
    """

    def __init__(self, distribution: Distribution) -> None:
        self.distribution = distribution
        self.pool: str | None = None
        self.controller: Any = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._exitcode = 0

    def connect(self) -> None:
        """Connect the handlers (strongly: the distribution owns them)."""
        for signal, handler in self._handlers():
            signal.connect(handler, weak=False)

    def disconnect(self) -> None:
        """Disconnect the handlers."""
        for signal, handler in self._handlers():
            signal.disconnect(handler)

    def _handlers(self) -> list[tuple[Any, Any]]:
        return [
            (signals.worker_init, self._on_worker_init),
            (signals.worker_process_init, self._on_worker_process_init),
            (signals.worker_ready, self._on_worker_ready),
            (signals.worker_shutting_down, self._on_worker_shutting_down),
            (signals.task_received, self._on_task_received),
            (signals.task_unknown, self._on_task_unknown),
            (signals.task_revoked, self._on_task_revoked),
            (signals.worker_shutdown, self._on_worker_shutdown),
        ]

    def _ours(self, sender: Any) -> bool:
        return getattr(sender, "app", None) is self.distribution.celery

    def check_mount(self, wrapper: ServiceWrapper) -> None:
        """Refuse a service a running prefork worker could never serve (its children were forked before)."""
        pool = self.pool
        if (
            pool is None
            or pool.rsplit(".", 1)[-1] in IN_PROCESS_POOLS
            or not self.distribution.exposable_methods(wrapper)
        ):
            return
        raise RuntimeError(
            f"Cannot expose '{wrapper.path}' after the worker started: its {pool} pool runs calls in child "
            "processes that were forked before this service existed and would never serve it. Mount it at "
            "import of the app module (before the worker starts), or run the worker with "
            "`--pool threads` / `--pool solo` (or an embedded worker) to add services at run time."
        )

    def learn_tasks(self) -> None:
        """Let the consumer of a worker in this very process learn the tasks registered since it started."""
        consumer = getattr(self.controller, "consumer", None)
        if consumer is not None:
            consumer.update_strategies()

    def _on_worker_init(self, sender: Any = None, **_: Any) -> None:
        if sender is not None and self._ours(sender):
            pool_cls = getattr(sender, "pool_cls", None)
            name = pool_cls if isinstance(pool_cls, str) else getattr(pool_cls, "__module__", "")
            self.pool = str(name or "prefork")
            self.controller = sender

    def _on_worker_process_init(self, **_: Any) -> None:
        # Sent with a hostname only: every distribution of the child needs its own view, whatever its app.
        self.pool = "prefork"
        self.distribution.follow_registry_after_fork()

    def _on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        if not self._ours(sender):
            return
        lease = self.distribution.lease
        if lease is not None:
            lease.start()
        # Started now, not by the stop signal: its handler interrupts the main thread wherever it is, and
        # starting a thread there could wait on a lock that thread holds. (Only a `celery worker` program,
        # the kind a signal stops, is sent worker_ready: a worker embedded in a test has no watch.)
        threading.Thread(target=self._watch_stop, name="celery-services-stop", daemon=True).start()

    def _on_worker_shutting_down(self, sender: Any = None, exitcode: Any = 0, **_: Any) -> None:
        # Sent from Celery's handler of the stop signal, in the main thread: sets the watch going and wakes
        # the worker's loop. Celery's handler only sets a flag, which the loop reads between two polls, and
        # the signal does not end a poll (Python resumes it): the stop began at the loop's next timer, 2 s
        # later, 9 s on RabbitMQ without worker heartbeats (a healthy stop the watch then cut).
        if self.controller is not None and sender == getattr(self.controller, "hostname", None):
            self._exitcode = int(exitcode or 0)
            self._stopping.set()
            waker = getattr(getattr(self.controller, "hub", None), "_waker", None)
            if waker is not None:  # none in a loop that never ran, or under gevent / eventlet
                waker.wake()

    def _watch_stop(self) -> None:
        """Once the worker is told to stop, exit :data:`STOP_GRACE` after its last call ended, unless its stop
        is over by then (the process that ran it may live on: ``worker_main`` returns).

        Running calls hold it up to the call timeout, as the fast path waits for them (a prefork pool's
        results are read by the main thread, which a silent broker may hold: a call seen running may be
        over).
        """
        self._stopping.wait()
        told = time.monotonic()
        calls_until = told + self.distribution.settings.timeout
        quiet_since = told
        while time.monotonic() - quiet_since < STOP_GRACE:
            if self._stopped.wait(0.1):
                return
            if time.monotonic() < calls_until and self._calls_running():
                quiet_since = time.monotonic()
        log.warning(
            "still stopping %.0f s after the last call ended (a broker that does not answer?): exiting; "
            "the calls this worker held are delivered again",
            STOP_GRACE,
        )
        os._exit(self._exitcode)

    def _calls_running(self) -> bool:
        fast = self.distribution.fastpath
        return bool(worker_state.active_requests) or (fast is not None and fast.busy)

    def _on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        distribution = self.distribution
        if not self._ours(sender):
            return
        try:
            if distribution.app.distribution is distribution:
                from .distribution import finalize  # the module that imports this one

                finalize(distribution.app)
        finally:
            # The stop is over (Celery sends this last): the watch stands down, set going or not.
            self._stopped.set()
            self._stopping.set()

    def _on_task_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        # The consumer holds the message (prefork children never see it): lease it from here. Only calls
        # of this key's queue: the restore gives a call back to that queue.
        lease = self.distribution.lease
        if lease is None or request is None or not self._ours(sender):
            return
        message = getattr(request, "message", None)
        delivery = getattr(message, "delivery_info", None) or {}
        tag = getattr(message, "delivery_tag", None)
        if tag and delivery.get("routing_key") == self.distribution.key:
            lease.hold(str(tag))

    def _on_task_unknown(
        self, sender: Any = None, message: Any = None, name: str = "", id: str = "", **_: Any
    ) -> None:
        # A call this worker does not serve (a newer caller, an older provider): Celery drops it, so the
        # caller is answered here at once instead of waiting out its timeout.
        if not self._ours(sender) or message is None:
            return
        headers = getattr(message, "headers", None) or {}
        self.distribution.replies.push_answer(unknown_task(self.distribution, name, str(id), headers))

    def _on_task_revoked(
        self,
        sender: Any = None,
        request: Any = None,
        terminated: bool = False,
        expired: bool = False,
        **_: Any,
    ) -> None:
        # A revoked call (`celery control revoke`, Flower's "Revoke"): Celery skips it, or stops it with
        # --terminate, and marks it REVOKED in the result backend, which a proxy caller does not read. An
        # expired call's caller has given up (its deadline is the call's expiry): nobody to tell.
        if expired or request is None or not self._ours(sender):
            return
        headers = {name: getattr(request, name, None) for name in (HEADER_REPLY, HEADER_DEADLINE)}
        answer = revoked_call(self.distribution, str(sender.name), str(request.id), headers, terminated)
        self.distribution.replies.push_answer(answer)
