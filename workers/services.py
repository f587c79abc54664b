"""The example services, free of side effects so tests and other apps can import them."""

from __future__ import annotations

import logging
from typing import Any

from celery_services import HookContext, MemoryService, ServiceWrapper

log = logging.getLogger("workers")


class Articles(MemoryService):
    """Articles, with the custom method ``publish_article`` emitting ``article_published``."""

    def publish_article(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """Mark the article ``data["id"]`` published and announce it."""
        article = self.patch(data["id"], {"published": True}, params)
        self.emit("article_published", article)
        return article


def decorate(service: ServiceWrapper) -> None:
    """Make a remote service of ``my-app`` look like one of ours (the KDK's decorateDistributedService).

    The gateway's ``service`` listener: the place to register permissions for the service.
    """
    if getattr(service, "remote", False) and service.key == "my-app":
        service.hooks({"before": {"all": [_mark_gateway]}})
        log.info("remote service %s decorated: permissions registered", service.path)


def _mark_gateway(context: HookContext) -> None:
    context.params.setdefault("headers", {})["x-gateway"] = "gateway"
