"""The Celery app of a distribution: how calls travel (JSON, late acks, prefetch 1, task events, timeouts).

:func:`make_celery` builds it from the settings; a user's own Celery app can be given to ``distribute``
instead, and is then used as configured.
"""

from __future__ import annotations

from celery import Celery

from .redis_transport import reuse_sync_clients
from .settings import DistributionSettings

__all__ = ["make_celery"]


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
