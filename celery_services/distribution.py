"""Distribution: exposes an app's services as Celery tasks and gives it proxies of other apps' services.

``distribute(app, settings)`` builds (or adopts) the Celery app, registers a task per exposed method,
and returns the :class:`Distribution` that owns the parts: the call transport, the registry (manifest,
heartbeat, discovery of remote services) and the event bus; ``finalize(app)`` stops them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
import weakref
from typing import Any

import redis
from celery import Celery, signals

from .app import App
from .bootsteps import add_bootsteps
from .discovery import Discovery
from .emitter import Listener
from .errors import MethodNotAllowed, NotFound, ServiceError, Unavailable
from .events import EventBus, EventEnvelope, event_context
from .lease import LeaseKeeper
from .manifest import Manifest, ServiceManifest
from .protocol import HEADER_DEADLINE, HEADER_REPLY, reply_key, split_task_name
from .redis_transport import reuse_sync_clients
from .registry import Registry
from .remote import RemoteService, Transport
from .service import ServiceWrapper
from .settings import DistributionSettings
from .tasks import health_task_name, register_health, register_method

__all__ = ["Distribution", "distribute", "finalize", "make_celery"]

log = logging.getLogger("celery_services.distribution")

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

#: Pools whose tasks run in the worker's own process, where a service mounted later can still be served.
IN_PROCESS_POOLS = frozenset({"solo", "thread", "threads", "eventlet", "gevent"})


def make_celery(settings: DistributionSettings) -> Celery:
    """A Celery app configured for remote calls: JSON only, prefetch 1, late acks, task events on."""
    reuse_sync_clients()
    celery = Celery(
        settings.key,
        broker=settings.resolved_broker_url(),
        backend=settings.resolved_result_backend(),
        set_as_current=False,
    )
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue=settings.key,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=min(settings.timeout, 4.0),
        # Client timeouts are set here, never left to the client library. Nothing broker-wide is changed:
        # Celery's visibility timeout (shared by every app on a Redis database) keeps its default, and the
        # calls of a dead replica come back through the library's own leases (lease.py).
        broker_transport_options={
            "socket_connect_timeout": 2.0,
            # A publish never blocks longer than a call may last.
            "socket_timeout": settings.timeout,
        },
        redis_socket_connect_timeout=2.0,
        redis_socket_timeout=settings.timeout,
        worker_hijack_root_logger=False,
    )
    return celery


class Distribution:
    """The parts that make an app's services remote, and remote services local.

    Attributes:
        app: the distributed app.
        settings: its settings.
        celery: the Celery app carrying its calls.
        key: the app's key (its queue name).
        instance: this process's unique instance id.
    """

    def __init__(self, app: App, settings: DistributionSettings, celery: Celery | None = None) -> None:
        self.app = app
        self.settings = settings
        self.key = settings.key
        # Names a broadcast queue too: only [A-Za-z0-9_-].
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())
        self.instance = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.celery = celery if celery is not None else make_celery(settings)
        self.celery.celery_services_distribution = self
        add_bootsteps(self.celery)
        # Every command of this client is short (the reply wait sets its own read timeout).
        self.replies = redis.Redis.from_url(
            settings.resolved_result_backend(), socket_timeout=5.0, socket_connect_timeout=2.0
        )
        self._push = self.replies.register_script(_PUSH_REPLY)
        self.lease = _lease_keeper(self.celery, settings)
        self.exposed: dict[str, ServiceManifest] = {}
        self.started_at = time.time()
        self.registry = Registry(
            settings.resolved_registry_url(),
            prefix=settings.registry_prefix,
            heartbeat_interval=settings.heartbeat_interval,
            rescan_interval=settings.rescan_interval,
            ttl=settings.resolved_registry_ttl(),
        )
        self.discovery = Discovery(self)
        self.transport = Transport(
            self.celery, self.replies, settings, caller=self.key, is_live=self._is_live
        )
        self.events = EventBus(
            self.celery.conf.broker_url or settings.resolved_broker_url(),
            exchange=settings.events_exchange,
            consumer_key=self.key,
            instance=self.instance,
            delivery=settings.event_delivery,
            on_event=self._on_remote_event,
            # Queues are named in the registry's namespace: a sweep only judges instances it can see.
            queue_prefix=settings.events_queue_prefix(),
        )
        self._publishers: dict[str, list[tuple[ServiceWrapper, str, Listener]]] = {}
        self._proxies: dict[tuple[str, str], list[ServiceWrapper]] = {}
        self._hooked: weakref.WeakSet[ServiceWrapper] = weakref.WeakSet()
        self._worker_pool: str | None = None
        self._worker: Any = None
        self._lock = threading.RLock()
        self._closed = False
        self._started = False

    # -- exposing ---------------------------------------------------------------------------------------

    def start(self) -> Distribution:
        """Expose the app's selected services, publish its manifest, and mount the remote services."""
        register_health(self)
        # Registered before any event binding: a sweep that lists our queue must find us live.
        self.registry.publish(self.manifest())
        for wrapper in list(self.app.services.values()):
            self._on_service(wrapper)
        self.app.on("service", self._on_service)
        self.app.on("service-removed", self._on_service_removed)
        if self.exposed:
            self.registry.publish(self.manifest(), changed=True)
        self._started = True
        self.registry.start_heartbeat(self.manifest)
        self.registry.watch(self.discovery.on_view)
        # The first view is mounted before distribute() returns: no start-up delay, whatever the order.
        if not self.registry.wait_synced(timeout=max(self.settings.timeout, 5.0)):
            log.warning("the registry did not answer in time: remote services will appear when it does")
        signals.worker_init.connect(self._on_worker_init, weak=False)
        signals.worker_process_init.connect(self._on_worker_process_init, weak=False)
        signals.worker_ready.connect(self._on_worker_ready, weak=False)
        signals.task_received.connect(self._on_task_received, weak=False)
        signals.task_unknown.connect(self._on_task_unknown, weak=False)
        signals.worker_shutdown.connect(self._on_worker_shutdown, weak=False)
        return self

    def exposable_methods(self, wrapper: ServiceWrapper) -> tuple[str, ...]:
        """The methods of ``wrapper`` this app distributes (none for proxies or unselected services)."""
        if getattr(wrapper.service, "remote", False) or not self.settings.exposes(
            wrapper.service, wrapper.path
        ):
            return ()
        wanted = set(self.settings.distributed_methods) | set(wrapper.custom_methods)
        return tuple(method for method in wrapper.methods if method in wanted)

    def check_mount(self, wrapper: ServiceWrapper) -> None:
        """Refuse a service a running prefork worker could never serve (its children were forked before)."""
        pool = self._worker_pool
        if pool is None or pool.rsplit(".", 1)[-1] in IN_PROCESS_POOLS or not self.exposable_methods(wrapper):
            return
        raise RuntimeError(
            f"Cannot expose '{wrapper.path}' after the worker started: its {pool} pool runs calls in child "
            "processes that were forked before this service existed and would never serve it. Mount it at "
            "import of the app module (before the worker starts), or run the worker with "
            "`--pool threads` / `--pool solo` (or an embedded worker) to add services at run time."
        )

    def _on_service(self, wrapper: ServiceWrapper) -> None:
        if getattr(wrapper.service, "remote", False):
            self._follow_proxy(wrapper)
            return
        methods = self.exposable_methods(wrapper)
        if not methods:
            return
        for method in methods:
            register_method(self, wrapper.path, method)
        wanted = set(self.settings.distributed_events)
        entry = ServiceManifest(
            path=wrapper.path,
            methods=list(methods),
            events=[event for event in wrapper.events if event in wanted or event in wrapper.custom_events],
            options=self._service_options(wrapper.service),
        )
        with self._lock:
            self.exposed[wrapper.path] = entry
            consumer = getattr(self._worker, "consumer", None)
        self._publish_events_of(wrapper, entry.events)
        if consumer is not None:
            # A worker in this very process: let its consumer learn the new task names.
            consumer.update_strategies()
        if self._started:
            self.registry.publish(self.manifest(), changed=True)

    def _on_service_removed(self, wrapper: ServiceWrapper) -> None:
        if getattr(wrapper.service, "remote", False):
            self._unfollow_proxy(wrapper)
            return
        self._stop_publishing(wrapper.path)
        with self._lock:
            removed = self.exposed.pop(wrapper.path, None)
        if removed is not None and self._started:
            self.registry.publish(self.manifest(), changed=True)

    def _publish_events_of(self, wrapper: ServiceWrapper, events: list[str]) -> None:
        if not self.settings.publish_events:
            return
        extra = self.settings.event_context
        listeners = []
        for event in events:

            def publish(data: Any, context: Any = None, event: str = event) -> None:
                self.events.publish(self.key, wrapper.path, event, data, event_context(context, extra))

            wrapper.on(event, publish)
            listeners.append((wrapper, event, publish))
        with self._lock:
            self._publishers[wrapper.path] = listeners

    def _stop_publishing(self, path: str) -> None:
        with self._lock:
            listeners = self._publishers.pop(path, [])
        for wrapper, event, listener in listeners:
            wrapper.off(event, listener)

    def _follow_proxy(self, wrapper: ServiceWrapper) -> None:
        # A proxy, mounted by discovery or by hand: the settings' proxy hooks, and its events bound.
        # Several proxies may share a remote service (and its bindings): each gets every event.
        proxy: RemoteService = wrapper.service
        if self.settings.hooks and wrapper not in self._hooked:
            # Once per wrapper: a proxy mounted again (its provider came back) keeps the hooks it has.
            self._hooked.add(wrapper)
            wrapper.hooks(self.settings.hooks)
        with self._lock:
            sharing = self._proxies.setdefault((proxy.key, proxy.path), [])
            bound = {event for other in sharing for event in other.service.events}
            sharing.append(wrapper)
        for event in proxy.events:
            if event not in bound:
                self.events.bind(proxy.key, proxy.path, event)
        if proxy.events:
            self.events.start()

    def _unfollow_proxy(self, wrapper: ServiceWrapper) -> None:
        proxy: RemoteService = wrapper.service
        with self._lock:
            sharing = self._proxies.get((proxy.key, proxy.path), [])
            if wrapper in sharing:
                sharing.remove(wrapper)
            if not sharing:
                self._proxies.pop((proxy.key, proxy.path), None)
            still = {event for other in sharing for event in other.service.events}
        for event in proxy.events:
            if event in still:
                continue
            try:
                self.events.unbind(proxy.key, proxy.path, event)
            except Exception:  # the consumer thread re-applies its bindings when the broker is back
                log.warning("could not unbind %s/%s %s", proxy.key, proxy.path, event, exc_info=True)

    def _on_remote_event(self, envelope: EventEnvelope) -> None:
        # Re-emitted on the proxies: their listeners cannot tell a remote event from a local one.
        with self._lock:
            wrappers = list(self._proxies.get((envelope.key, envelope.path), ()))
        for wrapper in wrappers:
            if envelope.event in wrapper.events:
                wrapper.emit(envelope.event, envelope.data, envelope.context)

    def _service_options(self, service: Any) -> dict[str, Any]:
        names = self.settings.service_options(service)
        source = getattr(service, "options", None)
        options: dict[str, Any] = {}
        for name in names:
            value = source.get(name) if isinstance(source, dict) else getattr(service, name, None)
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                log.warning("service option %r of %r is not JSON-safe: not published", name, service)
                continue
            options[name] = value
        return options

    def manifest(self) -> Manifest:
        """This instance's manifest: what it exposes now."""
        with self._lock:
            services = list(self.exposed.values())
        return Manifest(
            key=self.key,
            instance=self.instance,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self.started_at,
            heartbeat=time.time(),
            services=services,
        )

    def _on_worker_init(self, sender: Any = None, **_: Any) -> None:
        if sender is not None and getattr(sender, "app", None) is self.celery:
            pool_cls = getattr(sender, "pool_cls", None)
            name = pool_cls if isinstance(pool_cls, str) else getattr(pool_cls, "__module__", "")
            self._worker_pool = str(name or "prefork")
            self._worker = sender  # its consumer learns the tasks of services mounted later

    def _on_worker_process_init(self, **_: Any) -> None:
        self._worker_pool = "prefork"

    def _on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        # The consumer's process (the parent of a prefork pool) leases and restores calls of the key.
        if self.lease is not None and getattr(sender, "app", None) is self.celery:
            self.lease.start()

    def _on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        # A worker stopping warmly withdraws at once; consumers need not wait for the TTL.
        if getattr(sender, "app", None) is self.celery and self.app.distribution is self:
            finalize(self.app)

    def _on_task_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        # The consumer holds the message (prefork children never see it): lease it from here. Only calls
        # of this key's queue: the restore gives a call back to that queue.
        if self.lease is None or request is None or getattr(sender, "app", None) is not self.celery:
            return
        message = getattr(request, "message", None)
        delivery = getattr(message, "delivery_info", None) or {}
        tag = getattr(message, "delivery_tag", None)
        if tag and delivery.get("routing_key") == self.key:
            self.lease.hold(str(tag))

    def _on_task_unknown(
        self, sender: Any = None, message: Any = None, name: str = "", id: str = "", **_: Any
    ) -> None:
        # A call this worker does not serve (a newer caller, an older provider): Celery drops it, so the
        # caller is answered here at once instead of waiting out its timeout.
        if getattr(sender, "app", None) is not self.celery or message is None:
            return
        headers = getattr(message, "headers", None) or {}
        if not headers.get(HEADER_REPLY):
            return
        key, path, method = split_task_name(name)
        deadline = headers.get(HEADER_DEADLINE)
        error = MethodNotAllowed(
            f"No instance of '{key}' serving this call offers '{path}.{method}' (task '{name}' unknown)",
            {"key": key, "path": path, "method": method},
        )
        self.push_reply(
            reply_key(self.settings.registry_prefix, str(id)),
            json.dumps({"error": error.to_dict()}),
            float(deadline) if deadline is not None else None,
        )

    def local_health(self) -> dict[str, bool]:
        """``{path: True}`` for each service this instance exposes and still has mounted."""
        return {path: path in self.app.services for path in self.exposed}

    def push_reply(self, key: str, body: str, deadline: float | None) -> bool:
        """Push a call's reply on its caller's list, once per call, while its caller still waits.

        Nothing is pushed after the deadline (nobody would pop it), nor a second time for the same call (a
        redelivered call that ran twice): the first reply wins. The list and its marker expire shortly after
        the deadline. Returns whether the reply was pushed.
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

    def _is_live(self, key: str) -> bool | None:
        """Whether some instance of ``key`` is in the registry (``None`` before its first answer)."""
        return self.registry.has_key(key)

    # -- consuming --------------------------------------------------------------------------------------

    def remote_service(
        self,
        key: str,
        path: str,
        methods: list[str] | tuple[str, ...] | None = None,
        events: list[str] | tuple[str, ...] | None = None,
        remote_options: dict[str, Any] | None = None,
    ) -> RemoteService:
        """A proxy of the service at ``path`` of the app ``key``; mount it with ``app.use(path, proxy)``.

        A proxy of this app's own key calls the local service directly: a call from a worker to its own
        queue could wait for itself.
        """
        offered = tuple(methods) if methods is not None else tuple(self.settings.distributed_methods)
        evts = tuple(events) if events is not None else tuple(self.settings.distributed_events)
        call = self._call_local if key == self.key else self.transport.call
        return RemoteService(call, key, path, offered, evts, remote_options)

    def _call_local(self, key: str, path: str, method: str, *, wait: bool = False, **fields: Any) -> Any:
        return self.app.service(path).call(method, **fields)

    def wait_for(self, path: str, timeout: float | None = None) -> ServiceWrapper:
        """The service at ``path`` once it is mounted (a remote one may still be on its way).

        Raises:
            Timeout: it did not appear within ``timeout`` seconds (default: the call timeout).
        """
        return self.discovery.wait_for(path, self.settings.timeout if timeout is None else timeout)

    def healthcheck(self, key: str | None = None, timeout: float = 2.0) -> dict[str, bool]:
        """Ask the providers whether each remote service (of ``key``, or all) is up: ``{path: bool}``.

        Raises:
            NotFound: no live app offers services under ``key``.
            Unavailable: some service is down; ``data`` carries the whole ``{path: bool}`` answer.
        """
        targets = {
            local: info for local, info in self.discovery.mounted.items() if key is None or info.key == key
        }
        if key is not None and not targets:
            raise NotFound(f"No remote services of key '{key}'", {"key": key})
        health: dict[str, bool] = {}
        for provider in sorted({info.key for info in targets.values()}):
            try:
                answer = self.transport.request(
                    health_task_name(provider), provider, {}, time.time() + timeout
                )
            except ServiceError:
                answer = {}
            for local, info in targets.items():
                if info.key == provider:
                    health[local] = bool(answer.get(info.path))
        if not all(health.values()):
            down = sorted(path for path, up in health.items() if not up)
            raise Unavailable(f"Unhealthy remote services: {', '.join(down)}", health)
        return health

    # -- lifecycle --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop following the app and release connections (parts stop in reverse order of start)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.app.off("service", self._on_service)
        self.app.off("service-removed", self._on_service_removed)
        for path in list(self._publishers):
            self._stop_publishing(path)
        # The event consumer stops before the manifest goes: other instances then sweep nothing of ours
        # that we would put back.
        self.events.close()
        try:
            self.registry.withdraw(self.key, self.instance)
        except redis.RedisError:
            log.warning("could not withdraw the manifest: it expires after its TTL", exc_info=True)
        self.registry.close()
        # Unmounted once the app is no longer followed, so nothing is unbound: a group queue keeps its
        # bindings while the app is down.
        self.discovery.unmount_all()
        signals.worker_init.disconnect(self._on_worker_init)
        signals.worker_process_init.disconnect(self._on_worker_process_init)
        signals.worker_ready.disconnect(self._on_worker_ready)
        signals.task_received.disconnect(self._on_task_received)
        signals.task_unknown.disconnect(self._on_task_unknown)
        signals.worker_shutdown.disconnect(self._on_worker_shutdown)
        if self.lease is not None:
            self.lease.stop()
        self.transport.close()
        self.replies.close()


def _lease_keeper(celery: Celery, settings: DistributionSettings) -> LeaseKeeper | None:
    broker = str(celery.conf.broker_url or "")
    if not broker.startswith(("redis://", "rediss://", "unix://")):
        return None  # AMQP brokers give a dead consumer's messages back at once
    return LeaseKeeper(
        broker,
        settings.key,
        settings.resolved_lease_timeout(),
        prefix=settings.registry_prefix,
        transport_options=dict(celery.conf.broker_transport_options or {}),
    )


def distribute(
    app: App,
    settings: DistributionSettings | None = None,
    *,
    celery: Celery | None = None,
    **options: Any,
) -> Distribution:
    """Distribute ``app``: expose its selected services and make remote ones usable.

    Args:
        app: the app to distribute.
        settings: its settings; when omitted they are loaded (file, environment) with ``options`` on top.
        celery: a Celery app of your own to carry the calls, instead of one built from the settings.
        **options: settings given as keywords (``key="my-app"``, ``timeout=5`` …).

    Returns:
        The app's :class:`Distribution`, also set as ``app.distribution``.
    """
    if app.distribution is not None:
        raise Unavailable("This app is already distributed: finalize(app) first")
    if settings is None:
        settings = DistributionSettings.load(**options)
    elif options:
        settings = settings.model_copy(update=options)
    distribution = Distribution(app, settings, celery)
    app.distribution = distribution
    return distribution.start()


def finalize(app: App) -> None:
    """Undo :func:`distribute`: withdraw, stop the parts and close their connections."""
    distribution = app.distribution
    if distribution is None:
        return
    app.distribution = None
    distribution.close()
