"""``mock_remote``: a fake remote service, discoverable and served in-process, to unit-test a consumer.

The fake is a real provider: a small :class:`~celery_services.App` holding the service, distributed under
the given key on the consumer's broker and registry, and served by an embedded Celery worker (a thread of
this process, ``celery.contrib.testing.worker``). Its manifest is in the registry, so the consumer's
discovery mounts it as it would a real one; calls cross the broker, so params are filtered, errors typed and
events published exactly as for a provider in its own process. Only the process boundary is missing.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from celery import _state as celery_state
from celery.contrib.testing.worker import start_worker

from ..core.app import App
from ..core.hooks import HookContext
from ..core.service import ServiceWrapper
from ..distribution.distribution import Distribution, distribute, finalize
from ..distribution.settings import DistributionSettings
from .cleanup import purge_queues
from .workers import wait_for

__all__ = ["MockCall", "MockRemote", "mock_remote"]

#: What the fake takes from the consumer's settings: where the broker and registry are, how they are named,
#: how calls are signed and how fast instances are seen to come and go.
_SHARED_SETTINGS = (
    "broker_url",
    "result_backend",
    "registry_url",
    "registry_prefix",
    "events_exchange",
    "heartbeat_interval",
    "registry_ttl",
    "rescan_interval",
    "sentinel_master",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "signing_keys",
    "timeout",
    "max_payload_bytes",
    "distributed_methods",
    "distributed_events",
)


@dataclass(frozen=True)
class MockCall:
    """One call the fake served, as its service saw it (after the wire: filtered params, ``from_remote``).

    Attributes:
        method: the method called.
        id: its id argument (``None`` for methods without one).
        data: its data argument (``None`` for methods without one).
        params: its params, as the provider received them.
    """

    method: str
    id: Any
    data: Any
    params: dict[str, Any]


class MockRemote:
    """A fake remote service of key ``key`` at ``path``; see :func:`mock_remote`.

    Attributes:
        consumer: the app under test.
        key: the fake provider's key.
        path: the service's path on the fake provider.
        app: the fake provider's own app (its service runs there: ``app.service(path)``).
        calls: every call the fake served, in order.
    """

    def __init__(
        self,
        consumer: App,
        key: str,
        path: str,
        service: Any,
        *,
        methods: Sequence[str] | None = None,
        events: Sequence[str] | None = None,
        timeout: float = 10.0,
        concurrency: int = 2,
        **settings: Any,
    ) -> None:
        if consumer.distribution is None:
            raise ValueError("mock_remote needs a distributed app: distribute(app, ...) first")
        if key == consumer.distribution.key:
            raise ValueError(f"the fake's key '{key}' is the app's own: a call to it would stay local")
        self.consumer = consumer
        self.key = key
        self.path = path.strip("/")
        self.timeout = timeout
        self.concurrency = concurrency
        self.app = App()
        self.app.use(self.path, service, methods=methods, events=events)
        self.calls: list[MockCall] = []
        self._calls_lock = threading.Lock()
        self.app.hooks({"before": {"all": [self._record]}})
        base = consumer.distribution.settings
        shared = {name: getattr(base, name) for name in _SHARED_SETTINGS}
        shared["broker_url"] = base.resolved_broker_url()
        shared["result_backend"] = base.resolved_result_backend()
        self.settings = DistributionSettings(
            **{**shared, "key": key, "services": [self.path], "remote_services": [], **settings}
        )
        self.distribution: Distribution | None = None
        self._worker: contextlib.ExitStack | None = None

    @property
    def service(self) -> ServiceWrapper:
        """The fake's service on its own app: call it to emit events as the provider would."""
        return self.app.service(self.path)

    def emit(self, event: str, data: Any, context: Any = None) -> None:
        """Emit ``event`` on the fake's service: published to the consumers, as a real provider's event."""
        self.service.emit(event, data, context)

    def _record(self, context: HookContext) -> None:
        if context.params.get("from_remote"):
            call = MockCall(context.method, context.id, context.data, copy.deepcopy(context.params))
            with self._calls_lock:
                self.calls.append(call)

    def _mounted(self) -> bool:
        distribution = self.consumer.distribution
        return distribution is not None and any(
            (info.key, info.path) == (self.key, self.path) for info in distribution.discovery.mounted.values()
        )

    def start(self) -> Self:
        """Distribute the fake, serve its queue in a worker thread, and return once the app mounted it.

        Raises:
            TimeoutError: the app did not mount the fake within ``timeout`` seconds (its ``remote_services``
                filter, or ``pins``, may leave the fake's key out).
        """
        self.distribution = distribute(self.app, self.settings)
        celery = self.distribution.celery
        # An embedded worker must leave the test process's logging and remote-control tables alone.
        celery.conf.update(worker_hijack_root_logger=False, worker_enable_remote_control=False)
        stack = contextlib.ExitStack()
        previous = (celery_state.default_app, celery_state.get_current_app())
        root = logging.getLogger()
        logging_before = (root.level, list(root.handlers))
        try:
            stack.enter_context(
                start_worker(
                    celery,
                    pool="threads",
                    concurrency=self.concurrency,
                    perform_ping_check=False,
                    queues=[self.key],
                    loglevel="WARNING",
                    shutdown_timeout=self.timeout,
                )
            )
            # Celery's logging set-up still sets the root logger's level (and may add a handler): undo it,
            # or the test's own records below WARNING vanish for the rest of the process.
            root.setLevel(logging_before[0])
            root.handlers[:] = logging_before[1]
            # start_worker makes the fake's Celery app the process's default: give the test its own back.
            stack.callback(_restore_current_app, *previous)
            self._worker = stack
            wait_for(self._mounted, self.timeout, interval=0.01, what=self._unmounted_reason())
        except BaseException:
            stack.close()
            self._worker = None
            self._withdraw()
            raise
        return self

    def _unmounted_reason(self) -> str:
        return (
            f"the app mounts the fake '{self.key}/{self.path}' (does its remote_services accept the key "
            f"'{self.key}', and its pins leave '{self.path}' free?)"
        )

    def close(self) -> None:
        """Stop serving, withdraw the fake, and remove its queue and its worker's traces from the broker.

        Returns once the app under test no longer has the fake mounted (or after ``timeout`` seconds).
        """
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()
        self._withdraw()
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not self._mounted(), self.timeout, interval=0.01, what="fake unmounted")

    def _withdraw(self) -> None:
        distribution, self.distribution = self.distribution, None
        finalize(self.app)
        if distribution is not None:
            purge_queues(distribution.settings.resolved_broker_url(), [self.key])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _restore_current_app(default: Any, current: Any) -> None:
    celery_state.default_app = default
    celery_state._set_current_app(current)


def mock_remote(
    app: App,
    key: str,
    path: str,
    service: Any,
    *,
    methods: Sequence[str] | None = None,
    events: Sequence[str] | None = None,
    timeout: float = 10.0,
    **settings: Any,
) -> MockRemote:
    """A fake remote service for ``app``: ``service`` offered at ``path`` by a provider of key ``key``.

    Use it as a context manager; on entry the fake's manifest is in the registry, its calls are served by
    a worker thread of this process, and ``app`` has mounted its proxy (the ``remote_services`` filter of
    ``app`` must accept ``key``). Calls and events cross the broker as a real provider's do: params filtered,
    errors typed (a ``NotFound`` raised by ``service`` reaches the caller as ``NotFound``), events delivered
    to the app's listeners. On exit the fake is withdrawn, its queue deleted, and the app has unmounted it.

    Args:
        app: the distributed app under test.
        key: the fake provider's key.
        path: where the fake provider mounts ``service`` (the app mounts it at its own local path).
        service: the stand-in (any service object, a ``MemoryService``, a class of your own …).
        methods: custom methods ``service`` offers beside the standard ones (as ``App.use`` takes them).
        events: custom events it emits.
        timeout: seconds to wait for the app to mount (and at exit, unmount) the fake.
        **settings: the fake provider's own settings (``authentication=True``, ``allow_callers=…``); the
            broker, registry, signing keys and method lists are the app's.

    Returns:
        The :class:`MockRemote`, not yet started: ``with mock_remote(...) as fake:``.
    """
    return MockRemote(app, key, path, service, methods=methods, events=events, timeout=timeout, **settings)
