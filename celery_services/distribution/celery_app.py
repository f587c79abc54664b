"""The Celery app of a distribution: how calls travel (JSON, late acks, prefetch 1, task events, timeouts).

Over Redis Sentinel (``sentinel://`` URLs) the master's name, ``sentinel_master``, is given to Celery as the
transport option ``master_name`` of the broker and of the result backend; over TLS (``rediss://``) the
settings' CA and client certificate become ``broker_use_ssl`` / ``redis_backend_use_ssl``, with the server's
certificate always verified.

:func:`make_celery` builds it from the settings; a user's own Celery app can be given to ``distribute``
instead, and is then used as configured.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.connection import Connection

from .redis_clients import RedisOptions, is_sentinel, is_tls
from .redis_transport import reuse_sync_clients
from .settings import DistributionSettings

__all__ = ["PromptReconnection", "bus_connection", "make_celery"]

#: Seconds between a worker's attempts to reach its broker again (kombu's own: 2 s, then 4, 6 … up to 30).
RECONNECT_INTERVAL = 0.5


class PromptReconnection(Connection):
    """A kombu connection whose reconnection, when the caller sets no intervals, retries every 0.5 s.

    Celery's worker reconnects to a lost broker through ``ensure_connection`` with kombu's defaults, so a
    worker came back 3-8 s after a restarted RabbitMQ answered again (measured in
    ``tests/faults/test_broker_restart.py``). Only this app's connections use it: nothing broker-wide.
    """

    def _ensure_connection(
        self,
        errback: Any = None,
        max_retries: Any = None,
        interval_start: Any = RECONNECT_INTERVAL,
        interval_step: Any = 0.0,
        interval_max: Any = RECONNECT_INTERVAL,
        callback: Any = None,
        reraise_as_library_errors: Any = True,
        timeout: Any = None,
    ) -> Any:
        ensure: Any = super()._ensure_connection
        return ensure(
            errback,
            max_retries,
            interval_start,
            interval_step,
            interval_max,
            callback=callback,
            reraise_as_library_errors=reraise_as_library_errors,
            timeout=timeout,
        )


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
        # Retried for as long as the broker is away: Celery's limit (100 attempts) was most of an hour at
        # kombu's pace, 50 s at the library's (PromptReconnection), after which the worker exited.
        broker_connection_max_retries=None,
        broker_connection_timeout=min(settings.timeout, 4.0),
        # Client timeouts are set here, never left to the client library. Nothing broker-wide is changed:
        # Celery's visibility timeout (shared by every app on a Redis database) keeps its default, and the
        # calls of a dead replica come back through the library's own leases (lease.py).
        broker_transport_options={
            "socket_connect_timeout": 2.0,
            # Redis: a publish never blocks longer than a call may last. (py-amqp ignores both options: a
            # call's publish on RabbitMQ is bounded by its deadline where it is written, caller.py.)
            "socket_timeout": settings.timeout,
            **_sentinel_options(settings.resolved_broker_url(), settings, "broker_url"),
        },
        result_backend_transport_options=_sentinel_options(
            settings.resolved_result_backend(), settings, "result_backend"
        ),
        redis_socket_connect_timeout=2.0,
        redis_socket_timeout=settings.timeout,
        worker_hijack_root_logger=False,
    )
    tls = RedisOptions.of(settings).ssl_options()
    if is_tls(settings.resolved_broker_url()):
        celery.conf.broker_use_ssl = tls
    if is_tls(settings.resolved_result_backend()):
        celery.conf.redis_backend_use_ssl = tls
    celery.amqp.Connection = PromptReconnection
    return celery


def bus_connection(celery: Celery) -> dict[str, Any]:
    """What an event bus (:class:`.EventBus`) takes of ``celery``'s broker settings for its own kombu
    connections: the Sentinel part of ``broker_transport_options`` (the rest is Celery's business) and TLS."""
    options = celery.conf.broker_transport_options or {}
    names = ("master_name", "sentinel_kwargs", "min_other_sentinels")
    return {
        "transport_options": {name: options[name] for name in names if name in options},
        "ssl": celery.conf.broker_use_ssl,
    }


def _sentinel_options(url: str, settings: DistributionSettings, setting: str) -> dict[str, Any]:
    """Celery's transport options for a ``sentinel://`` URL: the master's name, and the Sentinels asked with
    explicit timeouts (Celery's result backend would otherwise ask them with none)."""
    if not is_sentinel(url):
        return {}
    if not settings.sentinel_master:  # the settings refuse it; a copy made without validation does not
        raise ValueError(f"{setting} is a sentinel:// URL: set sentinel_master (the name of the master)")
    return {
        "master_name": settings.sentinel_master,
        "sentinel_kwargs": {"socket_timeout": settings.timeout, "socket_connect_timeout": 2.0},
    }
