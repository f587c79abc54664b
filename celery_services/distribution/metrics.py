"""Prometheus metrics of calls, events and the registry, with ``prometheus_client`` (the ``metrics`` extra).

Only :mod:`.observability` records into them, once it found metrics on; without the extra,
:func:`available` says ``False`` and nothing else runs. Everything goes to ``prometheus_client``'s default
registry, beside the process and platform collectors it has and whatever metrics the app adds.

Calls are labelled ``side`` (``client``: a proxy call, as the caller saw it; ``server``: its serving on a
provider), ``key``, ``path`` and ``method``:

- ``celery_services_calls_total``: calls that ended, however they ended;
- ``celery_services_call_errors_total``: those that failed, by ``error`` (``NotFound``, ``Timeout`` …);
- ``celery_services_call_duration_seconds``: a histogram of their durations;
- ``celery_services_calls_in_flight``: calls begun and not ended.

Events (``key``, ``path``, ``event``): ``celery_services_events_published_total`` (the broker took them,
or nobody was bound for them: not sent, counted in ``EventBus.unheard`` too),
``celery_services_events_dropped_total`` (it could not), ``celery_services_events_delivered_total``
(handed to this process's proxies). The registry: ``celery_services_registry_instances`` (``key``), the
live instances of each key this process sees, read when scraped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "DURATION_BUCKETS",
    "CallMetrics",
    "available",
    "call",
    "done",
    "event",
    "exposition",
    "serve",
    "watch_registry",
]

try:  # the ``metrics`` extra
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    prometheus_client = None  # type: ignore[assignment]

log = logging.getLogger("celery_services.metrics")

#: Seconds: a fast-path call takes a fraction of a millisecond, a slow one up to its timeout (20 s).
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

_CALL_LABELS = ("side", "key", "path", "method")
_EVENT_LABELS = ("key", "path", "event")
_lock = threading.Lock()
_made: dict[str, Any] = {}
#: The labelled children of each (side, key, path, method): looking them up in prometheus_client costs a lock
#: and a tuple of strings per call.
_calls: dict[tuple[str, str, str, str], CallMetrics] = {}
_servers: dict[tuple[str, int], Any] = {}
_registry_watched = False


def available() -> bool:
    """Whether ``prometheus_client`` is installed (the ``metrics`` extra)."""
    return prometheus_client is not None


def _metrics() -> dict[str, Any]:
    """The metric objects, made once per process (a second registration would raise)."""
    if _made:
        return _made
    with _lock:
        if not _made:
            client = prometheus_client
            _made.update(
                calls=client.Counter(
                    "celery_services_calls",
                    "Remote calls that ended (client: made; server: served).",
                    _CALL_LABELS,
                ),
                errors=client.Counter(
                    "celery_services_call_errors",
                    "Remote calls that failed, by error name.",
                    (*_CALL_LABELS, "error"),
                ),
                duration=client.Histogram(
                    "celery_services_call_duration_seconds",
                    "Durations of remote calls.",
                    _CALL_LABELS,
                    buckets=DURATION_BUCKETS,
                ),
                in_flight=client.Gauge(
                    "celery_services_calls_in_flight", "Remote calls begun and not ended.", _CALL_LABELS
                ),
                published=client.Counter(
                    "celery_services_events_published", "Service events the broker took.", _EVENT_LABELS
                ),
                dropped=client.Counter(
                    "celery_services_events_dropped",
                    "Service events not published: the broker could not take them.",
                    _EVENT_LABELS,
                ),
                delivered=client.Counter(
                    "celery_services_events_delivered",
                    "Remote service events handed to this process's proxies.",
                    _EVENT_LABELS,
                ),
            )
    return _made


class CallMetrics:
    """The labelled metrics of one (side, key, path, method)."""

    __slots__ = ("calls", "duration", "errors", "in_flight", "labels")

    def __init__(self, labels: tuple[str, str, str, str]) -> None:
        made = _metrics()
        self.labels = labels
        self.calls = made["calls"].labels(*labels)
        self.duration = made["duration"].labels(*labels)
        self.in_flight = made["in_flight"].labels(*labels)
        self.errors: dict[str, Any] = {}


def call(side: str, key: str, path: str, method: str) -> CallMetrics:
    """Count a call in flight; give what :func:`done` records its end in."""
    labels = (side, key, path, method)
    metrics = _calls.get(labels)
    if metrics is None:
        metrics = _calls.setdefault(labels, CallMetrics(labels))
    metrics.in_flight.inc()
    return metrics


def done(metrics: CallMetrics, seconds: float, error: str | None) -> None:
    """Record the end of a call begun with :func:`call`: its duration, and its error's name if it failed."""
    metrics.in_flight.dec()
    metrics.calls.inc()
    metrics.duration.observe(seconds)
    if error is not None:
        counter = metrics.errors.get(error)
        if counter is None:
            counter = metrics.errors.setdefault(error, _metrics()["errors"].labels(*metrics.labels, error))
        counter.inc()


def event(kind: str, key: str, path: str, event: str) -> None:
    """Count one event ``published``, ``dropped`` or ``delivered``."""
    _metrics()[kind].labels(key, path, event).inc()


class _Instances:
    """``celery_services_registry_instances``, read from the registry views when scraped."""

    def __init__(self, views: Callable[[], Iterable[Mapping[str, Mapping[str, Any]]]]) -> None:
        self.views = views

    @staticmethod
    def _family() -> Any:
        return GaugeMetricFamily(
            "celery_services_registry_instances",
            "Live instances of each app key, as this process sees them.",
            labels=["key"],
        )

    def describe(self) -> Iterable[Any]:
        yield self._family()  # what registering asks: not a read of the views

    def collect(self) -> Iterable[Any]:
        family = self._family()
        live: dict[str, set[str]] = {}
        for view in self.views():
            for key, instances in view.items():
                live.setdefault(key, set()).update(instances)
        for key in sorted(live):
            family.add_metric([key], len(live[key]))
        yield family


def watch_registry(views: Callable[[], Iterable[Mapping[str, Mapping[str, Any]]]]) -> None:
    """Publish the live instances per key of the registry ``views`` (read when scraped); once per process."""
    global _registry_watched
    with _lock:
        if not _registry_watched:
            prometheus_client.REGISTRY.register(_Instances(views))
            _registry_watched = True


def exposition(accept: str | None = None) -> tuple[bytes, str]:
    """The metrics in Prometheus's text format (OpenMetrics if ``accept`` asks): body and content type."""
    encoder, content_type = prometheus_client.exposition.choose_encoder(accept or "")
    return encoder(prometheus_client.REGISTRY), content_type


def serve(port: int, host: str = "127.0.0.1") -> bool:
    """Serve the metrics over HTTP on ``host:port`` (``prometheus_client``'s server thread), once per
    process and address; returns whether it listens. A port taken is logged, not raised: the worker goes
    on."""
    with _lock:
        if (host, port) in _servers:
            return True
        try:
            _servers[(host, port)] = prometheus_client.start_http_server(port, addr=host)
        except OSError as exc:
            log.error("metrics not served on %s:%s: %s", host, port, exc)
            return False
    log.info("metrics served on http://%s:%s/metrics", host, port)
    return True
