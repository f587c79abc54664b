"""JSON log lines and the cost-free default: ``celery-services worker --log-format json`` writes one JSON
object per line with the call fields (and the trace ids of a traced call); the formatters on their own;
the library without the ``otel`` and ``metrics`` extras; hooks off unless asked."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_services import NotFound, finalize
from celery_services.distribution import logs, observability
from celery_services.testing import WorkerProcess, wait_for

from .support import BROKERS, broker_provider, cleanup, fresh_prefix, make_caller, registered_provider


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    yield from fresh_prefix(redis_url, "jsonlogs")


@pytest.mark.timeout(60)
def test_celery_services_worker_writes_json_lines_with_the_call_fields(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    prov = registered_provider(redis_url, prefix, "jsonlog", TEST_SPANS_FILE=str(tmp_path / "spans.jsonl"))
    command = [
        sys.executable, "-m", "celery_services.cli", "--log-level", "info",
        "worker", "tests.apps.traced:app", "--log-format", "json", "-P", "threads", "-c", "2",
        "-n", f"{prov.key}@localhost", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    worker = WorkerProcess("tests.apps.traced", prov.key, env=prov.env, command=command)
    caller, distribution = make_caller(prov, prefix, remote_services=[prov.key])
    try:
        worker.start()
        answer = distribution.wait_for("echo", 10).get(7, {})
        found = wait_for(
            lambda: [line for line in worker.log().splitlines() if '"echo 7"' in line],
            timeout=5,
            what="the service's JSON line",
        )
        lines = [json.loads(line) for line in worker.log().splitlines() if line.strip()]  # all JSON
        assert any(line["message"].endswith(" ready.") for line in lines)
        own = json.loads(found[0])
        assert (own["key"], own["path"], own["method"], own["level"]) == (prov.key, "echo", "get", "WARNING")
        assert own["call_id"] and own["logger"] == "tests.apps.traced"
        # The provider traces (tests/apps/traced.py): the line names the call's span.
        assert (own["trace_id"], own["span_id"]) == (answer["trace_id"], answer["span_id"])
    finally:
        worker.stop()
        finalize(caller)
        cleanup(redis_url, redis_url, prov.key, prov.runs_key)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["fast-path", "celery-consumer"])
def test_a_worker_logs_each_call_in_celerys_words_whichever_path_serves_it(
    request: pytest.FixtureRequest, redis_url: str, prefix: str, broker: str, fast_path: str
) -> None:
    # Operators read a worker's log for the tasks it ran (and the demo counts each replica's calls there):
    # the fast path writes the line Celery's tracer writes when a task ends, as Celery's consumer does.
    prov = broker_provider(request, broker, redis_url, prefix, "tasklines")
    worker = WorkerProcess(
        "tests.apps.provider", prov.key, env={**prov.env, "CELERY_SERVICES_FAST_PATH": fast_path}
    )
    app, distribution = make_caller(prov, prefix)
    try:
        worker.start()
        assert ("fast path serving queue" in worker.log()) is (fast_path == "true")
        probe = distribution.remote_service(prov.key, "probe", ["get", "boom"])
        answer = probe.get("logged", {})
        call_id = answer["params"]["call_id"]
        with pytest.raises(NotFound):
            probe.boom("notfound", {})
        name = re.escape(f"{prov.key}.probe")
        succeeded = re.compile(rf"Task {name}\.get\[{call_id}\] succeeded in [0-9.e-]+s: .*logged")
        raised = re.compile(rf"Task {name}\.boom\[[0-9a-f-]+\] raised expected: NotFound\(")
        wait_for(
            lambda: succeeded.search(worker.log()) and raised.search(worker.log()),
            timeout=5,
            what="the worker's lines of both calls",
        )
    finally:
        worker.stop()
        finalize(app)
        cleanup(prov.broker, redis_url, prov.key, prov.runs_key)


def test_json_formatter_writes_one_line_with_the_fields_of_the_call_being_served() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logs.decorate([handler], "json")
    logger = logging.getLogger("tests.json-formatter")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)  # not the root's, which an embedded worker earlier in the process may set
    try:
        token = logs.enter_call(logs.call_fields("my-app", "articles", "get", "c-1"))
        try:
            logger.warning("inside %s", "a call")
            try:
                raise KeyError("detail")
            except KeyError:
                logger.exception("failed\nover lines")
        finally:
            logs.leave_call(token)
        logger.warning("outside", extra=logs.call_fields("other", "p", "m", "c-2"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # a traceback stays inside its line
    inside, failed, outside = (json.loads(line) for line in lines)
    assert (
        inside["message"] == "inside a call" and inside["call_id"] == "c-1" and inside["path"] == "articles"
    )
    assert "KeyError: 'detail'" in failed["exception"] and failed["key"] == "my-app"
    assert (outside["key"], outside["call_id"]) == ("other", "c-2")  # the record's own fields
    assert "trace_id" not in inside  # no span current


def test_text_lines_get_the_fields_of_the_call_being_served() -> None:
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(message)s"))
    logs.decorate([handler])
    logs.decorate([handler], "text")  # idempotent
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "served", None, None)
    assert handler.format(record) == "served"
    token = logs.enter_call(logs.call_fields("k", "p", "get", "c-3"))
    try:
        assert handler.format(record) == "served [key=k path=p method=get call=c-3]"
    finally:
        logs.leave_call(token)


def test_nothing_is_observed_unless_asked() -> None:
    hooks = observability.refresh()
    assert not (hooks.on or hooks.tracing or hooks.metrics)


def test_the_library_runs_without_the_otel_and_metrics_extras() -> None:
    # The extras hidden from a fresh interpreter: importing and calling a local service still work, and
    # asking for metrics says what to install instead of failing.
    script = """
import sys
sys.modules["opentelemetry"] = None
sys.modules["prometheus_client"] = None
from celery_services import App, MemoryService
from celery_services.distribution import observability, tracing, metrics
assert not tracing.available() and not metrics.available()
assert not observability.enable_metrics().on
assert not observability.refresh().on
api = App().use("articles", MemoryService())
print(api.create({"title": "x"})["id"])
try:
    observability.use_tracer_provider(object())
except RuntimeError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "0",
        "tracing needs OpenTelemetry: pip install 'celery-services[otel]'",
    ]
