"""The example consumer: key ``gateway``, exposing nothing and using the services of ``my-app``.

It follows the seed's gateway scenario (``authentication = false``: it authenticates its own clients, and
its calls run as internal calls on the provider) and its KDK step: a ``service`` listener decorates each
remote service as it appears, the place to register permissions for it.

Serve it over HTTP (REST with Feathers' conventions, ``/events``, the healthcheck, the page at ``/``)::

    celery-services serve workers.gateway:api --port 8000
"""

from __future__ import annotations

import logging
from typing import Any

from celery_services import App, ServiceWrapper, distribute
from celery_services.settings import DistributionSettings

log = logging.getLogger("workers.gateway")

#: Paths of the remote services decorated so far (what a permissions registry would record).
decorated: list[str] = []


def decorate(service: ServiceWrapper) -> None:
    """Make a remote service of ``my-app`` look like one of ours (the KDK's decorateDistributedService)."""
    if getattr(service, "remote", False) and service.key == "my-app":
        service.hooks({"before": {"all": [_mark_gateway]}})
        decorated.append(service.path)
        log.info("remote service %s decorated: permissions registered", service.path)


def _mark_gateway(context: Any) -> None:
    context.params.setdefault("headers", {})["x-gateway"] = "gateway"


settings = DistributionSettings.load("config/gateway.toml")
api = App()
api.on("service", decorate)
distribution = distribute(api, settings)
app = celery = distribution.celery
