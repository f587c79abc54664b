"""The example services, free of side effects so tests and other apps can import them."""

from __future__ import annotations

from typing import Any

from celery_services import MemoryService


class Articles(MemoryService):
    """Articles, with the custom method ``publish_article`` emitting ``article_published``."""

    def publish_article(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """Mark the article ``data["id"]`` published and announce it."""
        article = self.patch(data["id"], {"published": True}, params)
        self.emit("article_published", article)
        return article
