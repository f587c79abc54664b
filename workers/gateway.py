"""The example consumer: key ``gateway``, exposing nothing and using the services of ``my-app``.

It follows the seed's gateway scenario (``authentication = false``: it authenticates its own clients, and
its calls run as internal calls on the provider) and its KDK step: a ``service`` listener decorates each
remote service as it appears, the place to register permissions for it (``workers.services.guard``: what
each role may do, each article owned by its creator, its events published to its owner only).

Serve it over HTTP (REST with Feathers' conventions, ``/events``, the healthcheck, the page at ``/``), to
clients holding a JWT signed with ``CELERY_SERVICES_JWT_SECRET`` (claims ``sub`` and ``role``)::

    CELERY_SERVICES_JWT_SECRET=... celery-services serve workers.gateway:api --port 8000 --auth jwt
"""

from __future__ import annotations

from celery_services import App, distribute
from celery_services.distribution.settings import DistributionSettings
from workers.services import decorate

settings = DistributionSettings.load("config/gateway.toml")
api = App()
api.on("service", decorate)
distribution = distribute(api, settings)
app = celery = distribution.celery
