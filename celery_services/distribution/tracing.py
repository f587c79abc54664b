"""OpenTelemetry spans of calls and events, and the W3C trace context their messages carry.

Only :mod:`.observability` calls this module, and only once it found tracing on (:func:`resolve`): every
function here may assume OpenTelemetry is importable and a tracer resolved. Without the ``otel`` extra,
:func:`resolve` says ``False`` and nothing else runs.

What travels: the global propagator's fields (by default W3C ``traceparent`` and ``tracestate``, and
``baggage``) as message headers of a call (a provider reads them as attributes of the task's request) and
of an event. Spans: a CLIENT span around a proxy call, a SERVER span around its serving on the provider
(child of the CLIENT span), a CONSUMER span around the listeners of a received event (child of the context
the event was emitted in). Attributes: :data:`KEY`, :data:`PATH`, :data:`METHOD` (or :data:`EVENT`),
:data:`CALL_ID`, and :data:`ERROR` (the error's name) on a failure, whose span status is ``ERROR``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

__all__ = [
    "CALL_ID",
    "ERROR",
    "EVENT",
    "KEY",
    "METHOD",
    "PATH",
    "available",
    "client_span",
    "consumer_span",
    "current_ids",
    "extract",
    "finish",
    "headers",
    "inject_call",
    "resolve",
    "server_span",
    "set_provider",
]

try:  # the ``otel`` extra
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    trace = None  # type: ignore[assignment]

#: Span attributes.
KEY = "celery_services.key"
PATH = "celery_services.path"
METHOD = "celery_services.method"
EVENT = "celery_services.event"
CALL_ID = "celery_services.call_id"
ERROR = "celery_services.error"

_INSTRUMENTATION = "celery_services"

#: A tracer provider given in code (:func:`set_provider`), preferred to OpenTelemetry's global one.
_provider: Any = None
_tracer: Any = None
#: The CLIENT span of the call being prepared in this context: the call id is known only once it is made.
_client: contextvars.ContextVar[Any] = contextvars.ContextVar("celery_services_client_span", default=None)


def available() -> bool:
    """Whether OpenTelemetry's API is installed (the ``otel`` extra)."""
    return trace is not None


def set_provider(provider: Any) -> None:
    """Trace with ``provider`` (a ``TracerProvider``) rather than OpenTelemetry's global one (``None``)."""
    global _provider
    _provider = provider


def resolve() -> bool:
    """Whether spans are made: a provider given to :func:`set_provider`, or a global one that is not
    OpenTelemetry's default (its proxy and no-op providers make nothing worth the cost of a span)."""
    global _tracer
    _tracer = None
    if trace is None:
        return False
    provider = _provider if _provider is not None else trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return False
    _tracer = provider.get_tracer(_INSTRUMENTATION)
    return True


@contextmanager
def client_span(key: str, path: str, method: str) -> Iterator[Any]:
    """A CLIENT span, current meanwhile; :func:`inject_call` puts it in the call's headers."""
    attributes = {KEY: key, PATH: path, METHOD: method}
    with _tracer.start_as_current_span(
        f"{key}.{path}.{method}",
        kind=SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,  # finish() names the error
    ) as span:
        token = _client.set(span)
        try:
            yield span
        finally:
            _client.reset(token)


def inject_call(headers: MutableMapping[str, Any], call_id: str) -> None:
    """Add the current trace context to a call's ``headers``, and its id to the CLIENT span preparing it."""
    span = _client.get()
    if span is not None:
        span.set_attribute(CALL_ID, call_id)
    propagate.inject(headers)


def headers() -> dict[str, str]:
    """The current trace context as message headers (an event's, taken when it is emitted)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract(source: Any) -> Any:
    """The trace context of a message: ``source`` is a task request (headers as attributes) or a headers
    mapping; an empty context (a new trace) when it carries none."""
    carrier: dict[str, str] = {}
    for name in propagate.get_global_textmap().fields:
        value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
        if value:
            carrier[name] = str(value)
    return propagate.extract(carrier) if carrier else otel_context.Context()


@contextmanager
def server_span(key: str, path: str, method: str, call_id: str, parent: Any) -> Iterator[Any]:
    """A SERVER span, child of ``parent`` (:func:`extract`), current meanwhile."""
    attributes = {KEY: key, PATH: path, METHOD: method, CALL_ID: call_id}
    with _tracer.start_as_current_span(
        f"{key}.{path}.{method}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
    ) as span:
        yield span


@contextmanager
def consumer_span(key: str, path: str, event: str, parent: Any) -> Iterator[Any]:
    """A CONSUMER span around an event's listeners, child of the context it was emitted in."""
    attributes = {KEY: key, PATH: path, EVENT: event}
    with _tracer.start_as_current_span(
        f"{key}.{path}.{event}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span


def finish(span: Any, error: str | None) -> None:
    """Mark ``span`` failed with the error's name, when there is one."""
    if error is not None:
        span.set_attribute(ERROR, error)
        span.set_status(Status(StatusCode.ERROR, error))


def current_ids() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` of the current span in hex, or ``None`` outside any recorded span."""
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
