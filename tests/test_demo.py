"""``celery-services demo`` as ``make demo`` runs it: the story's milestones, and nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import redis

from celery_services.testing import wait_for

from .support import ROOT
from .test_cli import CLI

MILESTONES = [
    "'service' event on gateway: articles mounted and decorated",
    'create({"title": "Celery"})',
    "find()",
    "get(0)",
    'patch(0, {"draft": true})',
    'update(0, {"title": "Celery 5"})',
    "remove(1)",
    'publish_article({"id": 0})',
    '"published": true',
    "get(999) → NotFound 404: No record found for id '999'",
    "10 calls: replica 1 served",
    "20/20 calls succeeded after the kill",
    "the registry dropped the killed replica",
    "healthcheck('my-app') → {\"articles\": true}",
    'articles → 201, then GET /articles/0 → {"title":"Over HTTP","id":0}',
    "left behind: 0 keys, 0 processes",
    "Done in",
]


def demo_env(marker: str, **extra: str) -> dict[str, str]:
    """The caller's environment without any celery-services setting, plus a marker every child inherits."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CELERY_SERVICES_")}
    return {**env, "CELERY_SERVICES_TEST_DEMO_MARK": marker, **extra}


def marked_processes(marker: str) -> list[int]:
    """Processes whose environment carries ``marker``: the demo, its workers, its redis-server."""
    needle = f"CELERY_SERVICES_TEST_DEMO_MARK={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile, or not ours to read
    return found


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def run_demo(env: dict[str, str]) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run([CLI, "demo"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=100)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def embedded_port(transcript: str) -> int:
    found = re.search(r"Embedded Redis on redis://127\.0\.0\.1:(\d+)/0", transcript)
    assert found is not None, transcript
    return int(found.group(1))


#: Step 7's lines: every event the calls of steps 4 and 5 emitted, with its data, in the order emitted.
EVENT_LINES = [
    'created {"title": "Celery", "id": 0}',
    'created {"title": "Redis", "id": 1}',
    'patched {"title": "Celery", "id": 0, "draft": true}',
    'updated {"title": "Celery 5", "id": 0}',
    'removed {"title": "Redis", "id": 1}',
    'article_published {"title": "Celery 5", "id": 0, "published": true}',
]


def served_counts(transcript: str) -> tuple[int, int, int]:
    """What the scale-out and failover steps say each replica served: (replica 1 of the 10 calls, replica 2
    of the 10 calls, replica 2 of the calls after the kill)."""
    shared = re.search(r"10 calls: replica 1 served (\d+), replica 2 served (\d+)", transcript)
    after = re.search(r"calls succeeded after the kill in \d+ ms, (\d+) served by replica 2", transcript)
    assert shared is not None and after is not None, transcript
    return int(shared.group(1)), int(shared.group(2)), int(after.group(1))


def registry_row(transcript: str) -> str:
    """The registry table's first row (the demo's console is 120 columns wide when not a terminal)."""
    found = re.search(
        r"^.*registry \(celery-services services\) *\n(.*?)\n\s*10 calls", transcript, re.M | re.S
    )
    assert found is not None, transcript
    rows = [line for line in found.group(1).splitlines() if "my-app" in line]
    assert rows, f"no row of my-app in the registry table:\n{found.group(1)}"
    return rows[0]


def events_shown(transcript: str) -> list[str]:
    """The event lines of the step "Events reach the consumer's listeners", in order."""
    found = re.search(r"^ ?\d+ Events reach the consumer's listeners.*?\n(.*?)\n\n", transcript, re.M | re.S)
    assert found is not None, transcript
    return [line.strip() for line in found.group(1).splitlines()]


@pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="needs /proc to find the demo's processes"
)
@pytest.mark.timeout(120)
def test_demo_on_an_embedded_redis_tells_the_story_and_leaves_nothing() -> None:
    marker = uuid.uuid4().hex
    code, transcript, _ = run_demo(demo_env(marker))
    assert code == 0, transcript
    for milestone in MILESTONES:
        assert milestone in transcript, f"{milestone!r} missing from:\n{transcript}"
    assert events_shown(transcript) == EVENT_LINES, transcript
    # Every call is counted where it ran: each replica's worker log has Celery's line for each task it ran.
    first, second, after_kill = served_counts(transcript)
    assert first + second == 10 and after_kill == 20, transcript
    # The registry table fits the console: key, path and methods whole, on the key's first line.
    row = registry_row(transcript)
    assert "articles" in row and "find, get" in row, transcript
    steps = [int(n) for n in re.findall(r"^ ?(\d+) [A-Z]", transcript, flags=re.M)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 10, steps
    port = embedded_port(transcript)
    assert "embedded Redis stopped" in transcript
    assert not answers(port), "the embedded redis-server is still running"
    assert marked_processes(marker) == []


@pytest.mark.timeout(120)
def test_demo_on_a_shared_broker_removes_what_it_created(redis_url: str) -> None:
    store = redis.Redis.from_url(redis_url)
    if next(iter(store.scan_iter("celery_services:manifest:my-app:*")), None) is not None:
        pytest.skip("a my-app runs on the test broker: the demo refuses to start beside it (shown below)")
    before = {name for name in ("my-app", "_kombu.binding.my-app") if store.exists(name)}
    marker = uuid.uuid4().hex
    code, transcript, _ = run_demo(demo_env(marker, CELERY_SERVICES_BROKER_URL=redis_url))
    assert code == 0, transcript
    assert f"Your broker {redis_url}" in transcript
    assert "left behind: 0 keys, 0 processes" in transcript
    found = re.search(r"registry prefix: (\S+)", transcript)
    assert found is not None, transcript
    assert list(store.scan_iter(f"{found.group(1)}*")) == []
    assert {name for name in ("my-app", "_kombu.binding.my-app") if store.exists(name)} <= before
    members = [str(m) for m in store.smembers("_kombu.binding.celery.pidbox")]
    assert [m for m in members if re.search(r"my-app-\d-[0-9a-f]{6}@", m)] == []
    assert marked_processes(marker) == []
    store.close()


@pytest.mark.timeout(120)
def test_demo_refuses_a_broker_where_my_app_runs(redis_url: str) -> None:
    store = redis.Redis.from_url(redis_url)
    name = f"celery_services:manifest:my-app:demo-test-{uuid.uuid4().hex[:6]}"
    store.set(name, "{}", ex=30)  # what a live my-app looks like from the demo's check
    try:
        code, transcript, _ = run_demo(demo_env(uuid.uuid4().hex, CELERY_SERVICES_BROKER_URL=redis_url))
    finally:
        store.delete(name)
        store.close()
    assert code == 1
    assert "a 'my-app' app is running on" in transcript


@pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="needs /proc to find the demo's processes"
)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_interrupted_stops_everything(sig: signal.Signals) -> None:
    marker = uuid.uuid4().hex
    with tempfile.NamedTemporaryFile(prefix="demo-", suffix=".log") as log:
        demo = subprocess.Popen(
            [CLI, "demo"], env=demo_env(marker), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for(
                lambda: b"worker ready (pid" in Path(log.name).read_bytes(), timeout=60, what="a replica up"
            )
            assert len(marked_processes(marker)) >= 2  # the demo and a worker
            port = embedded_port(Path(log.name).read_text())
            assert answers(port)
            demo.send_signal(sig)
            assert demo.wait(timeout=60) == 130
        finally:
            if demo.poll() is None:  # SIGTERM unwinds like Ctrl-C; SIGKILL would orphan its workers
                demo.terminate()
                try:
                    demo.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    demo.kill()
                    demo.wait()
        transcript = Path(log.name).read_text()
    assert "interrupted: stopping everything" in transcript
    assert "embedded Redis stopped" in transcript
    assert marked_processes(marker) == [], transcript
    assert not answers(port), "the embedded redis-server is still running"


@pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="needs /proc to find the demo's processes"
)
@pytest.mark.timeout(120)
def test_demo_serve_keeps_the_live_page_up_until_ctrl_c() -> None:
    import httpx

    marker = uuid.uuid4().hex
    with tempfile.NamedTemporaryFile(prefix="demo-serve-", suffix=".log") as log:
        process = subprocess.Popen(
            [CLI, "demo", "--serve"],
            env=demo_env(marker),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:

            def url() -> str | None:
                assert process.poll() is None, Path(log.name).read_text()
                found = re.search(r"open (http://127\.0\.0\.1:\d+)/ in a browser", Path(log.name).read_text())
                return found.group(1) if found else None

            base = wait_for(url, timeout=90, interval=0.2, what="the demo serves its gateway")
            # Still up after the step that used to stop it: the page and the REST routes answer.
            page = httpx.get(f"{base}/", timeout=5)
            assert page.status_code == 200 and "<html" in page.text.lower()
            assert httpx.get(f"{base}/articles", timeout=5).status_code == 200
            process.send_signal(signal.SIGINT)  # Ctrl-C
            assert process.wait(timeout=30) == 0, Path(log.name).read_text()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        transcript = Path(log.name).read_text()
    assert "stopping the gateway" in transcript
    assert "left behind: 0 keys, 0 processes" in transcript
    assert not answers(embedded_port(transcript))
    assert marked_processes(marker) == []


def test_the_demo_finds_its_examples_from_anywhere_or_says_where_to_run_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from celery_services.cli import demo

    monkeypatch.chdir(tmp_path)
    assert demo.project_root() == ROOT  # an editable install: the checkout beside the package
    monkeypatch.setattr(
        demo, "__file__", str(tmp_path / "site-packages" / "celery_services" / "cli" / "demo.py")
    )
    with pytest.raises(FileNotFoundError, match="run it from a checkout of celery-services"):
        demo.project_root()  # a wheel: no examples anywhere
