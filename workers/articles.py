"""The example provider: key ``my-app``, an ``articles`` service with a custom method and a custom event.

Run its workers with either command (both serve the queue ``my-app``)::

    celery-services worker workers.articles:app
    celery -A workers.articles worker -Q my-app

``app`` is the Celery app carrying the calls (the name plain ``celery -A`` looks for); ``api`` is the
services app, the counterpart of a Feathers app.
"""

from __future__ import annotations

from typing import Any

from celery_services import App, MemoryService, distribute
from celery_services.settings import DistributionSettings


class Articles(MemoryService):
    """Articles, with the custom method ``publish_article`` emitting ``article_published``."""

    def publish_article(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        article = self.patch(data["id"], {"published": True}, params)
        self.emit("article_published", article)
        return article


def build() -> App:
    """The provider app, not yet distributed (tests build their own with other settings)."""
    api = App()
    api.use("articles", Articles(), methods=["publish_article"], events=["article_published"])
    return api


settings = DistributionSettings.load()
api = build()
distribution = distribute(api, settings)
app = celery = distribution.celery
