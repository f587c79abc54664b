"""A provider with the seed's own names: the custom method ``publish-article`` and the event
``article-published`` (configured by CELERY_SERVICES_* variables)."""

from __future__ import annotations

from typing import Any

from celery_services import App, MemoryService, distribute
from celery_services.distribution.settings import DistributionSettings


class Articles(MemoryService):
    def publish_article(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """``publish-article``: its Python spelling."""
        article = self.patch(data["id"], {"published": True}, params)
        self.emit("article-published", article)
        return article


api = App()
api.use("articles", Articles(), methods=["publish-article"], events=["article-published"])
distribution = distribute(api, DistributionSettings.load())
app = distribution.celery
