"""The example provider: key ``my-app``, an ``articles`` service with a custom method and a custom event.

Run its workers with either command (both serve the queue ``my-app``)::

    celery-services worker workers.articles:app
    celery -A workers.articles worker -Q my-app

``app`` is the Celery app carrying the calls (the name plain ``celery -A`` looks for); ``api`` is the
services app, the counterpart of a Feathers app.
"""

from __future__ import annotations

from celery_services import App, distribute
from celery_services.distribution.settings import DistributionSettings
from workers.services import Articles


def build() -> App:
    """The provider app, not yet distributed (tests build their own with other settings)."""
    api = App()
    api.use("articles", Articles(), methods=["publish_article"], events=["article_published"])
    return api


settings = DistributionSettings.load()
api = build()
distribution = distribute(api, settings)
app = celery = distribution.celery
