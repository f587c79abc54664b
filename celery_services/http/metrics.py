"""``GET /metrics``: the process's Prometheus metrics (see :mod:`celery_services.distribution.metrics`).

Served when metrics are on in the gateway's process (``metrics = true``, and ``prometheus_client``, the
``metrics`` extra); otherwise a 404 says how to turn them on. Like ``/health``, it needs no credentials:
scrapers reach it on the network the gateway listens on.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ..distribution import metrics
from ..distribution.observability import hooks

__all__ = ["metrics_endpoint"]


async def metrics_endpoint(request: Request) -> Response:
    """The metrics in Prometheus's text format (OpenMetrics when the scraper asks for it)."""
    if not hooks.metrics:
        return PlainTextResponse(
            "metrics are off: set metrics = true (CELERY_SERVICES_METRICS=true) and install "
            "'celery-services[metrics]'",
            status_code=404,
        )
    body, content_type = metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)
