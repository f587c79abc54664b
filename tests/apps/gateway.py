"""A consumer app for tests, configured by CELERY_SERVICES_* variables: it exposes nothing and proxies the
services of the keys ``CELERY_SERVICES_REMOTE_SERVICES`` lists; serve it with
``celery-services serve tests.apps.gateway:api``."""

from __future__ import annotations

from celery_services import App, distribute
from celery_services.distribution.settings import DistributionSettings

settings = DistributionSettings.load(services=[])
api = App()
distribution = distribute(api, settings)
app = distribution.celery
