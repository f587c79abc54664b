"""What one test's apps and workers share: a broker and a registry prefix of the test's own."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..distribution.settings import DistributionSettings
from .cleanup import purge_prefix

__all__ = ["KitConfig", "unique_name"]


def unique_name(label: str) -> str:
    """``label`` and a random suffix: keys, queues and prefixes no other test (or xdist worker) uses."""
    return f"{label}-{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class KitConfig:
    """A test's broker and registry prefix, given to its apps (:meth:`settings`) and workers (:meth:`env`).

    Two tests with different prefixes never see each other's services, replies or event queues, even on one
    broker; app keys (queue names) must differ too: :func:`unique_name` makes them.

    Attributes:
        broker_url: the broker (Redis, or RabbitMQ with a Redis ``result_backend``).
        registry_prefix: the registry namespace of the test.
        result_backend: the Redis of replies and manifests (default: the broker when it is Redis).
        heartbeat_interval: seconds between manifest heartbeats: short, so a stopped worker is seen to go
            within a couple of seconds.
    """

    broker_url: str
    registry_prefix: str
    result_backend: str | None = None
    heartbeat_interval: float = 0.5

    @classmethod
    @contextmanager
    def isolated(cls, broker_url: str, label: str = "cs-test", **options: Any) -> Iterator[KitConfig]:
        """A config with a new registry prefix, whose keys are deleted on exit: for fixtures of any scope
        (``with KitConfig.isolated(url, "cs-http") as config: yield config`` in a module-scoped one).

        Args:
            broker_url: the broker.
            label: the start of the prefix (a random suffix follows).
            **options: the other fields (``result_backend``, ``heartbeat_interval``).
        """
        config = cls(broker_url, unique_name(label), **options)
        try:
            yield config
        finally:
            purge_prefix(config.redis_url, config.registry_prefix)

    @property
    def redis_url(self) -> str:
        """The Redis of the registry and the replies."""
        return self.result_backend or self.broker_url

    def settings(self, key: str | None = None, **overrides: Any) -> DistributionSettings:
        """Settings of an app on this broker and registry.

        Args:
            key: the app's key (default: a unique ``app-…``).
            **overrides: any other setting (``services=[]``, ``remote_services=["my-app"]``, ``timeout=5`` …).
        """
        values: dict[str, Any] = {
            "key": key or unique_name("app"),
            "broker_url": self.broker_url,
            "registry_prefix": self.registry_prefix,
            "heartbeat_interval": self.heartbeat_interval,
        }
        if self.result_backend:
            values["result_backend"] = self.result_backend
        return DistributionSettings(**{**values, **overrides})

    def env(self, key: str | None = None, **settings: Any) -> dict[str, str]:
        """``CELERY_SERVICES_*`` variables for a worker process on this broker and registry.

        Args:
            key: the app's key (``CELERY_SERVICES_KEY``); default: none set (the module's own).
            **settings: more settings, by their name (``timeout=8`` → ``CELERY_SERVICES_TIMEOUT=8``); lists
                and tables are written as JSON.
        """
        values: dict[str, Any] = {
            "broker_url": self.broker_url,
            "registry_prefix": self.registry_prefix,
            "heartbeat_interval": self.heartbeat_interval,
        }
        if self.result_backend:
            values["result_backend"] = self.result_backend
        if key:
            values["key"] = key
        values.update(settings)
        return {
            f"CELERY_SERVICES_{name.upper()}": value if isinstance(value, str) else json.dumps(value)
            for name, value in values.items()
        }
