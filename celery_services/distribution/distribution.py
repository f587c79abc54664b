"""Distribution: exposes an app's services as Celery tasks and gives it proxies of other apps' services.

``distribute(app, settings)`` builds (or adopts) the Celery app, registers a task per exposed method,
and returns the :class:`Distribution` that owns the parts: the call transport, the registry (manifest,
heartbeat, discovery of remote services) and the event bus; ``finalize(app)`` stops them.

One piece, past 300 lines, because it is the owner: the parts' construction, start order and reverse stop
order, and the wiring between them (exposed services → tasks, manifest and events; proxies → bindings) are the
one thing it knows; each part lives in its own module.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from functools import partial
from typing import Any

import redis
from celery import Celery

from ..core.app import App
from ..core.emitter import Listener
from ..core.errors import NotFound, ServiceError, Unavailable
from ..core.service import ServiceWrapper
from .aio import AsyncTransport
from .bootsteps import add_bootsteps
from .caller import RemoteService, Transport
from .celery_app import bus_connection, make_celery
from .discovery import Discovery
from .event_epoch import BindingEpoch
from .events import EventBus, EventEnvelope, event_context
from .fastpath import FastPath
from .lease import lease_keeper
from .manifest import Manifest, ServiceManifest
from .observability import event_headers, hooks, install
from .protocol import dumps
from .provider import (
    Handler,
    Replies,
    after_reply,
    health_task_name,
    register_health,
    register_method,
)
from .redis_clients import RedisOptions, is_redis, redis_client
from .registry import Registry
from .settings import DistributionSettings
from .signing import Signer
from .worker import WorkerSignals

__all__ = ["Distribution", "distribute", "finalize"]

log = logging.getLogger("celery_services.distribution")


class Distribution:
    """The parts that make an app's services remote, and remote services local.

    Attributes:
        app: the distributed app.
        settings: its settings.
        celery: the Celery app carrying its calls.
        key: the app's key (its queue name).
        instance: this process's unique instance id.
        transport: the caller's half of calls (:mod:`.caller`).
        aio: the same calls awaited on asyncio clients (:mod:`.aio`).
        replies: the provider's half of replies (:mod:`.provider`).
        lease: leases on the calls this worker holds (Redis broker; :mod:`.lease`).
        handlers: what serves each call task of this key, by task name (:mod:`.provider`).
        fastpath: the fast path serving this key's queue in this worker, if it runs (:mod:`.fastpath`).
        registry, discovery: manifests in Redis, and the proxies that follow them.
        pid: the process the distribution was made in, whose threads beat, watch and hear the events.
        events: the event bus.
        worker: what the distribution does inside a Celery worker (:mod:`.worker`).
    """

    def __init__(self, app: App, settings: DistributionSettings, celery: Celery | None = None) -> None:
        self.app = app
        self.settings = settings
        self.key = settings.key
        # Names a broadcast queue too: only [A-Za-z0-9_-].
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())
        self.pid = os.getpid()
        self.instance = f"{host}-{self.pid}-{uuid.uuid4().hex[:6]}"
        self.celery = celery if celery is not None else make_celery(settings)
        self.worker = WorkerSignals(self)
        install(self)  # metrics, a worker's log format and metrics server (observability.py)
        self.celery.celery_services_distribution = self
        add_bootsteps(self.celery)
        # Every command of this client is short (the reply wait sets its own read timeout).
        self.reply_store = redis_client(
            settings.resolved_result_backend(),
            RedisOptions.of(settings),
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
        )
        # On RabbitMQ, the binding epoch of the app's events (on Redis the bus reads kombu's binding set); a
        # call's reply reads it too, where the registry's Redis is the result backend's.
        broker = str(self.celery.conf.broker_url or settings.resolved_broker_url())
        epoch = None if is_redis(broker) else BindingEpoch.of(settings)
        shared = settings.resolved_registry_url() == settings.resolved_result_backend()
        self.replies = Replies(self.reply_store, epoch.key if epoch is not None and shared else None)
        self.signer = (
            Signer(self.key, settings.signing_secrets, self.reply_store, settings.registry_prefix)
            if settings.signing_keys
            else None
        )
        self.lease = lease_keeper(self.celery, settings)
        self.exposed: dict[str, ServiceManifest] = {}
        self.handlers: dict[str, Handler] = {}
        self.fastpath: FastPath | None = None  # set by the worker's FastCalls step (bootsteps.py)
        self.started_at = time.time()
        self.registry = Registry.from_settings(settings)  # manifest limits included
        self.discovery = Discovery(self)
        self.broker_store = _broker_store(self.celery, settings, self.reply_store)
        self.transport = Transport(
            self.celery,
            self.reply_store,
            settings,
            caller=self.key,
            is_live=self.registry.has_key,
            signer=self.signer,
            queues=self.broker_store,
        )
        # The same calls, awaited (``proxy.aio.get(1)``, the gateway): asyncio clients, one set per loop.
        self.aio = AsyncTransport(
            self.transport,
            settings.resolved_result_backend(),
            broker_url=broker if self.broker_store not in (None, self.reply_store) else None,
            options=RedisOptions.of(settings),
        )
        self.events = EventBus(
            broker,
            **bus_connection(self.celery),
            exchange=settings.events_exchange,
            consumer_key=self.key,
            instance=self.instance,
            delivery=settings.event_delivery,
            on_event=self._on_remote_event,
            # Queues are named in the registry's namespace: a sweep only judges instances it can see.
            queue_prefix=settings.events_queue_prefix(),
            epoch=epoch,
        )
        self._publishers: dict[str, list[tuple[ServiceWrapper, str, Listener]]] = {}
        self._proxies: dict[tuple[str, str], list[ServiceWrapper]] = {}
        self._hooked: weakref.WeakSet[ServiceWrapper] = weakref.WeakSet()
        self._bound: set[tuple[str, str, str]] = set()  # (key, path, event) bound for proxies
        self._binding = threading.RLock()  # guards _bound, held across the broker's (un)binding
        self._lock = threading.RLock()
        self._closed = False
        self._published = False  # the manifest, by start()
        self._started = False

    # -- exposing ---------------------------------------------------------------------------------------

    def start(self) -> Distribution:
        """Expose the app's selected services, publish its manifest, and mount the remote services."""
        register_health(self)
        mounted = list(self.app.services.values())
        for wrapper in mounted:  # local services first: the manifest lists them from the start
            if not getattr(wrapper.service, "remote", False):
                self._on_service(wrapper)
        # Registered before any event binding (proxies bind): a sweep that lists our queue must find us live.
        self.registry.publish(self.manifest())
        self._published = True
        for wrapper in mounted:
            if getattr(wrapper.service, "remote", False):
                self._on_service(wrapper)
        self.app.on("service", self._on_service)
        self.app.on("service-removed", self._on_service_removed)
        self.app.mount_checks.append(self.worker.check_mount)
        self._started = True
        self.registry.start_heartbeat(self.manifest)
        self.registry.watch(self.discovery.on_view)
        # The first view is mounted before distribute() returns: no start-up delay, whatever the order.
        if not self.registry.wait_synced(timeout=max(self.settings.timeout, 5.0)):
            log.warning("the registry did not answer in time: remote services will appear when it does")
        self.worker.connect()
        return self

    @property
    def forked(self) -> bool:
        """Whether this process is a fork of the one the distribution was made in (a prefork pool's child).

        Such a child leaves the events to its parent: the parent's consumer hears them for the whole worker,
        and its discovery, following the same registry, binds, unbinds and sweeps. The child would compete
        for the parent's queue, on connections and locks it inherited, maybe in use.
        """
        return os.getpid() != self.pid

    def follow_registry_after_fork(self) -> None:
        """Follow the registry again in a forked child (a prefork pool's: Celery's ``worker_process_init``).

        The registry's watcher is a thread, which a fork does not carry: the child kept the view of that
        moment for good, never mounting a provider that started later nor seeing one die. It watches on a
        registry of its own (its own connections and thread), which publishes nothing: the parent's
        instance is the one registered, and beats. Until its first snapshot it holds the view of the fork.
        """
        if not self.forked:  # a spawned child: the distribution was made there, and watches already
            return
        inherited, self.registry = self.registry, Registry.from_settings(self.settings)
        self.registry.inherit(inherited)
        self.transport.is_live = self.registry.has_key
        self.registry.watch(self.discovery.on_view)

    def exposable_methods(self, wrapper: ServiceWrapper) -> tuple[str, ...]:
        """The methods of ``wrapper`` this app distributes (none for proxies or unselected services)."""
        if getattr(wrapper.service, "remote", False) or not self.settings.exposes(
            wrapper.service, wrapper.path
        ):
            return ()
        wanted = set(self.settings.distributed_methods) | set(wrapper.custom_methods)
        return tuple(method for method in wrapper.methods if method in wanted)

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
        self._publish_events_of(wrapper, entry.events)
        self.worker.learn_tasks()
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
                send = partial(
                    self.events.publish,
                    self.key,
                    wrapper.path,
                    event,
                    data,
                    event_context(context, extra),
                    # The trace of the call emitting it: the event goes out after the call's reply.
                    headers=event_headers() if hooks.on else None,
                )
                if not after_reply(send):  # a remote call's events go out once its caller has its answer
                    send()

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
        # A proxy, mounted by discovery or by hand: the settings' proxy hooks, and its events followed.
        # Several proxies may share a remote service (and its bindings): each gets every event.
        proxy: RemoteService = wrapper.service
        if self.settings.hooks and wrapper not in self._hooked:
            # Once per wrapper: a proxy mounted again (its provider came back) keeps the hooks it has.
            self._hooked.add(wrapper)
            wrapper.hooks(self.settings.hooks)
        with self._lock:
            sharing = self._proxies.setdefault((proxy.key, proxy.path), [])
            if wrapper not in sharing:
                sharing.append(wrapper)
        wrapper.watch(self._listened)
        for event in proxy.events:
            if wrapper.listeners(event):  # listened to before this mount (a gateway, a remount)
                self._listened(wrapper, event)

    def _listened(self, wrapper: Any, event: str) -> None:
        """Bind the remote ``event`` of the proxy ``wrapper`` once something listens to it: a consumer that
        only calls a service, or listens to some of its events, is sent none of the others (each costs the
        provider a publish, the broker a copy and the consumer a decoding: 100 KB for a large ``created``).

        The watcher of every followed proxy, called before ``on()`` returns: the events published
        afterwards reach the listener. A binding lasts until its proxy is unmounted: an event whose last
        listener went stays bound, its events dropped on arrival.
        """
        if self.forked:
            return
        proxy: RemoteService = wrapper.service
        address = (proxy.key, proxy.path, event)
        with self._binding:  # held while binding: a second listener's on() returns once it is bound too
            if self._closed or event not in proxy.events or address in self._bound:
                return  # (closed: a proxy the app still holds binds nothing for a bus that is gone)
            self._bound.add(address)
            try:
                self.events.bind(*address)
            except Exception:  # still wanted: the consumer thread binds it when the broker answers
                log.warning("could not bind %s/%s %s yet", *address, exc_info=True)
        self.events.start()

    def _unfollow_proxy(self, wrapper: ServiceWrapper) -> None:
        proxy: RemoteService = wrapper.service
        wrapper.unwatch(self._listened)
        with self._lock:
            sharing = self._proxies.get((proxy.key, proxy.path), [])
            if wrapper in sharing:
                sharing.remove(wrapper)
            if not sharing:
                self._proxies.pop((proxy.key, proxy.path), None)
        self._unbind(proxy, proxy.events)

    def _events_reoffered(self, wrapper: ServiceWrapper, before: tuple[str, ...]) -> None:
        # Discovery changed the events a mounted proxy offers, in place: only those added or removed are
        # bound or unbound, so that the events kept never go unbound while they are published.
        proxy: RemoteService = wrapper.service
        for event in proxy.events:
            if event not in before and wrapper.listeners(event):
                self._listened(wrapper, event)
        self._unbind(proxy, [event for event in before if event not in proxy.events])

    def _unbind(self, proxy: RemoteService, events: Sequence[str]) -> None:
        # Unless another proxy of the same remote service still receives them (they share the bindings).
        if self.forked:
            return
        with self._lock:
            sharing = self._proxies.get((proxy.key, proxy.path), [])
            still = {event for other in sharing for event in other.service.events}
        with self._binding:
            for event in events:
                address = (proxy.key, proxy.path, event)
                if event in still or address not in self._bound:
                    continue
                self._bound.discard(address)
                try:
                    self.events.unbind(*address)
                except Exception:  # the consumer thread re-applies its bindings when the broker is back
                    log.warning("could not unbind %s/%s %s", *address, exc_info=True)

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
                dumps(value)  # the manifest is written by pydantic: what a call could carry, it carries
            except ValueError:
                log.warning("service option %r of %r has no JSON form: not published", name, service)
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

    def local_health(self) -> dict[str, bool]:
        """``{path: True}`` for each service this instance exposes and still has mounted."""
        return {path: path in self.app.services for path in self.exposed}

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
        if key == self.key:
            return RemoteService(
                self._call_local, key, path, offered, evts, remote_options, call_async=self._call_local_async
            )
        return RemoteService(
            self.transport.call, key, path, offered, evts, remote_options, call_async=self.aio.call
        )

    def _call_local(self, key: str, path: str, method: str, *, wait: bool = False, **fields: Any) -> Any:
        return self.app.service(path).call(method, **fields)

    async def _call_local_async(
        self, key: str, path: str, method: str, *, wait: bool = False, **fields: Any
    ) -> Any:
        return await self.app.service(path).acall(method, **fields)

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
        if self.worker.check_mount in self.app.mount_checks:
            self.app.mount_checks.remove(self.worker.check_mount)
        for path in list(self._publishers):
            self._stop_publishing(path)
        # The event consumer stops before the manifest goes: other instances then sweep nothing of ours
        # that we would put back.
        self.events.close()
        if self._published:  # a start that failed first (a broker unreachable) has nothing to withdraw
            try:
                self.registry.withdraw(self.key, self.instance)
            except redis.RedisError as exc:
                log.warning("could not withdraw the manifest (%r): it expires after its TTL", exc)
        self.registry.close()
        # Unmounted once the app is no longer followed, so nothing is unbound: a group queue keeps its
        # bindings while the app is down.
        self.discovery.unmount_all()
        self.worker.disconnect()
        if self.lease is not None:
            self.lease.stop()
        self.aio.close()
        self.transport.close()
        if self.broker_store is not None and self.broker_store is not self.reply_store:
            self.broker_store.close()
        self.reply_store.close()


def _broker_store(celery: Celery, settings: DistributionSettings, replies: redis.Redis) -> redis.Redis | None:
    """The broker's Redis, for the calls queued and served without kombu (``None`` for RabbitMQ).

    The reply store's own client when the broker is the same Redis database: a call is then queued and its
    reply awaited in one round trip.
    """
    broker = str(celery.conf.broker_url or settings.resolved_broker_url())
    if not is_redis(broker):
        return None
    if broker == str(celery.conf.result_backend or settings.resolved_result_backend()):
        return replies
    return redis_client(broker, RedisOptions.of(settings), socket_timeout=5.0, socket_connect_timeout=2.0)


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
    try:
        return distribution.start()
    except BaseException:
        # A failed start leaves the app as it was: not distributed, nothing registered, free to retry.
        app.distribution = None
        distribution.close()
        raise


def finalize(app: App) -> None:
    """Undo :func:`distribute`: withdraw, stop the parts and close their connections."""
    distribution = app.distribution
    if distribution is None:
        return
    app.distribution = None
    distribution.close()
