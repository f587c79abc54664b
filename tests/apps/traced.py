"""A provider app that traces, for the observability tests, configured by CELERY_SERVICES_* variables.

With ``TEST_SPANS_FILE`` set, it installs an OpenTelemetry SDK ``TracerProvider`` (before distributing, as an
app would) whose exporter appends each finished span to that file, one JSON object per line, for the test
process to read. Services:

- ``echo``: ``get`` logs a line of its own (``echo 1``) and answers what the provider saw of the trace;
  ``boom`` raises ``NotFound``;
- ``articles``: a ``MemoryService`` whose ``created`` events are distributed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from celery_services import App, MemoryService, NotFound, Service, distribute
from celery_services.distribution.settings import DistributionSettings

log = logging.getLogger("tests.apps.traced")

SPANS_FILE = os.environ.get("TEST_SPANS_FILE", "")

if SPANS_FILE:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class JsonLinesExporter(SpanExporter):
        """Appends finished spans to a file, one JSON line each (what the SDK's in-memory exporter keeps,
        made readable by another process)."""

        def __init__(self, path: str) -> None:
            self.path = path

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            with open(self.path, "a", encoding="utf-8") as out:
                for span in spans:
                    out.write(json.dumps(json.loads(span.to_json(indent=None))) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider(resource=Resource.create({"service.name": "traced-provider"}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(SPANS_FILE)))
    trace.set_tracer_provider(provider)


def _trace_ids() -> dict[str, Any]:
    if not SPANS_FILE:
        return {}
    context = trace.get_current_span().get_span_context()
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


class Echo(Service):
    def get(self, id: Any, params: dict[str, Any]) -> Any:
        log.warning("echo %s", id)  # a line of the service's own: it carries the call's fields
        return {"id": id, "pid": os.getpid(), **_trace_ids()}

    def boom(self, data: Any, params: dict[str, Any]) -> Any:
        raise NotFound("No echo here", {"data": data})


settings = DistributionSettings.load()
api = App()
api.use("echo", Echo(), methods=["boom"])
api.use("articles", MemoryService())
distribution = distribute(api, settings)
app = distribution.celery
