"""Traces and metrics around calls and events: the hooks the call path runs only when they are on.

Whether anything is observed is decided once, not per call: :func:`refresh` (run when a distribution is
made, and by :func:`use_tracer_provider` / :func:`enable_metrics`) sets :data:`hooks`, and the call path reads
one attribute of it, ``hooks.on``, before taking the observed way:

- the caller (:meth:`.Transport.call`, :meth:`.AsyncTransport.call`) runs the call in :func:`client_call` /
  :func:`client_acall`, and :meth:`.Transport.prepare` adds the trace context to the call's headers;
- the provider's :func:`.provider.serve`, which every call goes through whichever way it came (Celery's
  consumer or the fast path, which runs calls outside Celery's task signals), runs the handler in
  :func:`server`;
- the event bus publishes through :func:`publish` and hands received events over through :func:`deliver`.

Tracing is on when OpenTelemetry is installed (the ``otel`` extra) and a tracer provider is set (globally,
or for this library with :func:`use_tracer_provider`); metrics when ``prometheus_client`` is installed (the
``metrics`` extra) and a distribution of the process asks for them (``metrics`` / ``metrics_port``). Log
lines are another matter (:mod:`.logs`): their call fields cost one context variable per call, always.

In a Celery worker, :func:`install` also configures the worker's log lines (``log_format``) through Celery's
logging signals, and starts the metrics server on ``metrics_port`` when the worker starts: a plain
``celery -A module worker`` gets both, as ``celery-services worker`` does.

One piece, past 300 lines: the switch (``hooks``) and every hook it guards are read together, so that what
the call path pays when observability is off stays visible in one place.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from celery import signals

from . import logs, metrics, tracing
from .protocol import split_task_name

if TYPE_CHECKING:
    from .distribution import Distribution
    from .event_publisher import Payload
    from .events import EventEnvelope
    from .provider import Answer

__all__ = [
    "Hooks",
    "client_acall",
    "client_call",
    "deliver",
    "enable_metrics",
    "event_headers",
    "hooks",
    "call_headers",
    "install",
    "log_format",
    "publish",
    "refresh",
    "server",
    "serve_metrics",
    "use_tracer_provider",
]

log = logging.getLogger("celery_services.observability")

T = TypeVar("T")


@dataclass(slots=True)
class Hooks:
    """What is observed in this process; the call path reads ``on`` and nothing else when it is off.

    Attributes:
        on: ``tracing or metrics``.
        tracing: spans are made and the trace context travels.
        metrics: calls and events are counted.
    """

    on: bool = False
    tracing: bool = False
    metrics: bool = False


#: The one instance the call path reads.
hooks = Hooks()

_lock = threading.Lock()
_metrics_wanted = False
_log_format: logs.LogFormat = "text"
_signals_connected = False
_distributions: weakref.WeakSet[Distribution] = weakref.WeakSet()


def refresh() -> Hooks:
    """Decide again what is observed (after a tracer provider was set, say); returns :data:`hooks`."""
    hooks.tracing = tracing.resolve()
    hooks.metrics = _metrics_wanted and metrics.available()
    hooks.on = hooks.tracing or hooks.metrics
    return hooks


def use_tracer_provider(provider: Any) -> Hooks:
    """Trace with ``provider`` (an OpenTelemetry ``TracerProvider``) rather than the global one; ``None``
    goes back to the global one. Returns :data:`hooks`.

    Raises:
        RuntimeError: OpenTelemetry is not installed (``pip install 'celery-services[otel]'``).
    """
    if provider is not None and not tracing.available():
        raise RuntimeError("tracing needs OpenTelemetry: pip install 'celery-services[otel]'")
    tracing.set_provider(provider)
    return refresh()


def enable_metrics(on: bool = True) -> Hooks:
    """Count calls and events in this process (``on=False``: stop); returns :data:`hooks`.

    Without ``prometheus_client`` a warning says so and nothing is counted.
    """
    global _metrics_wanted
    _metrics_wanted = on
    if on and not metrics.available():
        log.warning(
            "metrics asked for, but prometheus_client is missing: pip install 'celery-services[metrics]'"
        )
    if on and metrics.available():
        metrics.watch_registry(_registry_views)
    return refresh()


def serve_metrics(port: int, host: str = "127.0.0.1") -> bool:
    """Serve this process's metrics over HTTP on ``host:port`` (once per address); whether it listens.

    Without ``prometheus_client`` a warning says so and nothing listens.
    """
    if not metrics.available():
        log.warning("no metrics served: prometheus_client is missing: pip install 'celery-services[metrics]'")
        return False
    return metrics.serve(port, host)


def log_format() -> logs.LogFormat:
    """The format of a worker's log lines in this process: ``json`` once a distribution asked for it."""
    return _log_format


def install(distribution: Distribution) -> None:
    """What a new distribution switches on: metrics if its settings ask, the worker's log format and
    metrics server through Celery's signals (connected once per process), and the hooks decided anew."""
    global _log_format
    settings = distribution.settings
    _distributions.add(distribution)
    if settings.log_format == "json":
        _log_format = "json"
    _connect_signals()
    if settings.metrics or settings.metrics_port is not None:
        enable_metrics()
    else:
        refresh()


def _registry_views() -> list[Mapping[str, Mapping[str, Any]]]:
    live = [d for d in list(_distributions) if not getattr(d, "_closed", False)]
    return [d.registry.view for d in live if hasattr(d, "registry")]  # a distribution being made has none


# -- Celery's signals ------------------------------------------------------------------------------------


def _connect_signals() -> None:
    global _signals_connected
    with _lock:
        if _signals_connected:
            return
        _signals_connected = True
    # Celery configures a worker's logging (a plain `celery worker` too): keep its handlers, format them.
    signals.after_setup_logger.connect(_format_worker_logs, weak=False)
    signals.after_setup_task_logger.connect(_format_worker_logs, weak=False)
    signals.worker_init.connect(_start_metrics_server, weak=False)


def _format_worker_logs(logger: Any = None, **_: Any) -> None:
    if logger is not None:
        logs.decorate(logger.handlers, _log_format)


def _start_metrics_server(sender: Any = None, **_: Any) -> None:
    # In the worker's main process, where the fast path serves (a prefork pool's children are not counted).
    for distribution in list(_distributions):
        settings = distribution.settings
        ours = getattr(sender, "app", None) is distribution.celery
        if ours and settings.metrics_port is not None:
            serve_metrics(settings.metrics_port, settings.metrics_host)


# -- calls -----------------------------------------------------------------------------------------------


def _error_name(exc: BaseException) -> str:
    return str(getattr(exc, "name", None) or type(exc).__name__)


@contextmanager
def _timed(side: str, key: str, path: str, method: str) -> Iterator[list[str | None]]:
    """Count a call in flight and its end; the caller puts its error's name in the yielded list."""
    outcome: list[str | None] = [None]
    counted = metrics.call(side, key, path, method) if hooks.metrics else None
    started = time.perf_counter()
    try:
        yield outcome
    except BaseException as exc:
        outcome[0] = outcome[0] or _error_name(exc)
        raise
    finally:
        if counted is not None:
            metrics.done(counted, time.perf_counter() - started, outcome[0])


def _client_scope(key: str, path: str, method: str) -> AbstractContextManager[Any]:
    return tracing.client_span(key, path, method) if hooks.tracing else nullcontext()


def client_call(send: Callable[[], T], key: str, path: str, method: str) -> T:
    """Run ``send`` (one proxy call) in a CLIENT span, counted and timed as the caller sees it."""
    with _client_scope(key, path, method) as span, _timed("client", key, path, method) as outcome:
        try:
            return send()
        except BaseException as exc:
            _failed(span, outcome, exc)
            raise


async def client_acall(send: Callable[[], Awaitable[T]], key: str, path: str, method: str) -> T:
    """:func:`client_call` for an awaited call."""
    with _client_scope(key, path, method) as span, _timed("client", key, path, method) as outcome:
        try:
            return await send()
        except BaseException as exc:
            _failed(span, outcome, exc)
            raise


def _failed(span: Any, outcome: list[str | None], exc: BaseException) -> None:
    outcome[0] = _error_name(exc)
    if span is not None:
        tracing.finish(span, outcome[0])


def server(
    handle: Callable[[Any, tuple[Any, ...], dict[str, Any]], Answer],
    request: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Answer:
    """Serve one call with ``handle`` in a SERVER span (child of the caller's), counted and timed."""
    key, path, method = split_task_name(str(request.task))
    scope: AbstractContextManager[Any] = nullcontext()
    if hooks.tracing:
        scope = tracing.server_span(key, path, method, str(request.id), tracing.extract(request))
    with scope as span, _timed("server", key, path, method) as outcome:
        answer = handle(request, args, kwargs)
        outcome[0] = answer.error.name if answer.error is not None else None
        if span is not None:
            tracing.finish(span, outcome[0])
    return answer


def call_headers(headers: dict[str, Any], call_id: str) -> None:
    """Add the trace context to a call's message ``headers`` (when tracing is on)."""
    if hooks.tracing:
        tracing.inject_call(headers, call_id)


# -- events ----------------------------------------------------------------------------------------------


def event_headers() -> dict[str, str] | None:
    """The trace context an event emitted now carries (``None`` when tracing is off): taken when the event
    is emitted, in the call that emitted it, since it is published after that call's reply."""
    return tracing.headers() if hooks.tracing else None


def publish(
    send: Callable[..., bool],
    routing_key: str,
    payload: Payload,
    address: tuple[str, str, str],
    headers: dict[str, Any] | None,
) -> bool:
    """Publish one event with ``send`` (the bus's publisher), its trace context in its headers; count it."""
    if headers is None and hooks.tracing:
        headers = tracing.headers()
    published = send(routing_key, payload, headers=headers)
    if hooks.metrics:
        metrics.event("published" if published else "dropped", *address)
    return published


def deliver(on_event: Callable[[EventEnvelope], None], envelope: EventEnvelope, headers: Any) -> None:
    """Hand a received event to ``on_event`` in a CONSUMER span, child of the context it was emitted in."""
    if hooks.metrics:
        metrics.event("delivered", envelope.key, envelope.path, envelope.event)
    if not hooks.tracing:
        on_event(envelope)
        return
    parent = tracing.extract(dict(headers or {}))
    with tracing.consumer_span(envelope.key, envelope.path, envelope.event, parent):
        on_event(envelope)
