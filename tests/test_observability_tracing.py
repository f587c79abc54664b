"""Tracing across real processes: a proxy call's CLIENT span in the test process, its SERVER span in a real
``celery worker`` (tests/apps/traced.py, whose SDK exporter writes spans to a file), the provider's span a
child of the caller's, on the fast path and on Celery's consumer; an event's listeners run in the trace of
the call that emitted it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, get_current_span

from celery_services import NotFound, finalize
from celery_services.distribution import observability
from celery_services.distribution.tracing import CALL_ID, ERROR, KEY, METHOD, PATH
from celery_services.testing import WorkerProcess, wait_for

from .support import cleanup, fresh_prefix, make_caller, registered_provider


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    yield from fresh_prefix(redis_url, "traced")


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    """This process traces with an SDK provider of its own (not the global one), its spans kept in memory."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert observability.use_tracer_provider(provider).tracing
    try:
        yield provider
    finally:
        assert not observability.use_tracer_provider(None).tracing
        provider.shutdown()


def hexid(value: int) -> str:
    return f"0x{value:016x}"


def server_spans(path: Path, count: int) -> list[dict[str, Any]]:
    """The provider's SERVER spans, once ``count`` of them are in its file."""

    def read() -> list[dict[str, Any]]:
        if not path.exists():
            return []
        found = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        servers = [s for s in found if s["kind"] == "SpanKind.SERVER"]
        return servers if len(servers) >= count else []

    return wait_for(read, timeout=10, what=f"{count} server spans in {path}")


def by_call_id(spans: list[Any], kind: SpanKind) -> dict[str, ReadableSpan]:
    return {str(s.attributes[CALL_ID]): s for s in spans if s.kind == kind}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["fast-path", "celery-consumer"])
def test_the_provider_span_is_a_child_of_the_caller_span_and_events_carry_the_trace(
    redis_url: str, prefix: str, provider: TracerProvider, tmp_path: Path, fast_path: str
) -> None:
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    spans_file = tmp_path / "provider-spans.jsonl"
    prov = registered_provider(
        redis_url, prefix, "traced", TEST_SPANS_FILE=str(spans_file), CELERY_SERVICES_FAST_PATH=fast_path
    )
    worker = WorkerProcess("tests.apps.traced", prov.key, env=prov.env)
    caller, distribution = make_caller(
        prov,
        prefix,
        remote_services=[prov.key],
        distributed_methods=["find", "get", "create", "update", "patch", "remove", "boom"],
    )
    try:
        worker.start()
        echo, articles = distribution.wait_for("echo", 10), distribution.wait_for("articles", 10)
        heard: list[tuple[int, int]] = []
        articles.on("created", lambda data, context: heard.append(_ids()))
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("request") as root:
            answer = echo.get(1, {})
            with pytest.raises(NotFound):
                echo.boom({"why": "test"}, {})
            articles.create({"title": "traced"}, {})
        trace_id = root.get_span_context().trace_id

        # The provider ran the call in the caller's trace.
        assert answer["trace_id"] == f"{trace_id:032x}"
        clients = by_call_id(spans.get_finished_spans(), SpanKind.CLIENT)
        assert len(clients) == 3
        for client in clients.values():
            assert client.parent is not None and client.parent.span_id == root.get_span_context().span_id
            assert client.attributes[KEY] == prov.key
        servers = {s["attributes"][CALL_ID]: s for s in server_spans(spans_file, 3)}
        assert set(servers) == set(clients)  # one SERVER span per call, by call id
        for call_id, server in servers.items():
            client = clients[call_id]
            assert server["context"]["trace_id"] == f"0x{trace_id:032x}"
            assert server["parent_id"] == hexid(client.context.span_id)  # child of the CLIENT span
            assert (server["attributes"][PATH], server["attributes"][METHOD]) == (
                client.attributes[PATH],
                client.attributes[METHOD],
            )
        failed = next(c for c in clients.values() if c.attributes[METHOD] == "boom")
        assert failed.attributes[ERROR] == "NotFound" and not failed.status.is_ok
        assert servers[failed.attributes[CALL_ID]]["attributes"][ERROR] == "NotFound"
        assert servers[failed.attributes[CALL_ID]]["status"]["status_code"] == "ERROR"
        get = next(k for k, c in clients.items() if c.attributes[METHOD] == "get")
        assert f"0x{answer['span_id']}" == servers[get]["context"]["span_id"]  # the service ran in it

        # The listener of the event the create emitted ran in that trace, in a CONSUMER span whose parent
        # is the provider's SERVER span of the create.
        wait_for(lambda: heard, timeout=10, what="the created event")
        assert heard[0][0] == trace_id
        create = next(k for k, c in clients.items() if c.attributes[METHOD] == "create")
        consumer = wait_for(
            lambda: [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER],
            timeout=5,
            what="the CONSUMER span",
        )[0]
        assert hexid(consumer.parent.span_id) == servers[create]["context"]["span_id"]
        assert consumer.context.span_id == heard[0][1]
    finally:
        worker.stop()
        finalize(caller)
        cleanup(redis_url, redis_url, prov.key, prov.runs_key)


def _ids() -> tuple[int, int]:
    context = get_current_span().get_span_context()
    return context.trace_id, context.span_id
