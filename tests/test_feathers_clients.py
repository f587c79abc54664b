"""The official Feathers clients, unchanged, against the gateway: REST and Socket.IO, a remote ``articles``
on a real provider worker, JWT authentication, typed errors, events and per-user delivery.

The clients are the npm packages pinned in ``tests/feathers/package.json`` (installed by ``.ci/run`` with
``npm ci``), driven by ``tests/feathers/client.mjs``, which prints one JSON line per step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from celery_services import App, MemoryService, distribute, finalize
from celery_services.http import make_server
from celery_services.http.auth import JWTAuthentication, JWTSettings
from celery_services.testing import KitConfig, ProviderWorker, wait_for
from workers.services import guard

from .support import ROOT
from .test_http import gateway_settings, provider_worker

CLIENTS = ROOT / "tests" / "feathers"
NODE = shutil.which("node")
pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        NODE is None or not (CLIENTS / "node_modules" / "@feathersjs" / "feathers").is_dir(),
        reason="node or the Feathers clients are missing (.ci/run: npm ci --prefix tests/feathers)",
    ),
]
SECRET = "a-feathers-test-secret-of-32-chars-or-more"
METHODS = ["find", "get", "create", "update", "patch", "remove", "publish_article"]
EVENTS = ["created", "updated", "patched", "removed", "article_published"]


def token(sub: str, role: str = "editor") -> str:
    return jwt.encode({"sub": sub, "role": role, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def run_client(scenario: str, **options: Any) -> dict[str, Any]:
    """Run a scenario to its end: step name → its line (``ok`` or ``error``)."""
    done = subprocess.run(
        [str(NODE), "client.mjs", scenario, json.dumps(options)],
        cwd=CLIENTS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return {line["step"]: line for line in map(json.loads, done.stdout.splitlines())}


class Listener:
    """``client.mjs listen`` in the background: the events one socket client receives."""

    def __init__(self, url: str, user_token: str | None, count: int, timeout: int = 20000) -> None:
        options = {"url": url, "token": user_token, "count": count, "timeout": timeout}
        self.process = subprocess.Popen(
            [str(NODE), "client.mjs", "listen", json.dumps(options)],
            cwd=CLIENTS,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(
            lambda: self.step("ready") or self.process.poll() is not None, timeout=30, what="listener ready"
        )
        assert self.step("ready"), self.lines

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(json.loads(line))

    def step(self, name: str) -> list[dict[str, Any]]:
        return [line for line in list(self.lines) if line["step"] == name]

    def events(self) -> list[tuple[str, Any]]:
        return [(line["event"], line["data"]) for line in self.step("event")]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self._reader.join(10)


@pytest.fixture(scope="module")
def kit(redis_url: str) -> Iterator[KitConfig]:
    with KitConfig.isolated(redis_url, "cs-feathers") as config:
        yield config


@pytest.fixture(scope="module")
def provider(kit: KitConfig) -> Iterator[ProviderWorker]:
    with provider_worker(kit, "feathers-prov") as worker:
        yield worker


@contextlib.contextmanager
def serve_in_thread(api: App, **options: Any) -> Iterator[tuple[str, Any]]:
    """A real gateway of ``api`` on a free port: its URL and its Starlette application."""
    server = make_server(api, port=0, log_level="warning", **options)
    thread = threading.Thread(target=server.run, name="uvicorn-feathers", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10, what="uvicorn started")
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server.config.app
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def url(kit: KitConfig, provider: ProviderWorker) -> Iterator[str]:
    api = App()
    distribution = distribute(
        api,
        gateway_settings(
            kit, "feathers-gw", provider.key, distributed_methods=METHODS, distributed_events=EVENTS
        ),
    )
    guard(distribution.wait_for("articles", timeout=10))  # roles, owners, events to their owner only
    try:
        with serve_in_thread(api, authenticate=JWTAuthentication(JWTSettings(secret=SECRET))) as (served, _):
            yield served
    finally:
        finalize(api)


@pytest.mark.parametrize("transport", ["rest", "socketio"])
def test_every_method_query_operators_custom_method_and_typed_errors(url: str, transport: str) -> None:
    tag = uuid.uuid4().hex[:8]
    steps = run_client("methods", url=url, transport=transport, token=token("ada"), tag=tag)
    ok = {name: line.get("ok") for name, line in steps.items() if "ok" in line}
    if transport == "socketio":
        assert ok["authenticate"]["user"]["sub"] == "ada"
    created = ok["create"]
    assert (created["title"], created["owner"]) == (f"{tag}-1", "ada")  # the user reached the hooks
    assert ok["get"] == created
    assert ok["find"] == [created]  # $limit
    assert {item["title"] for item in ok["find-in"]} == {f"{tag}-1", f"{tag}-2"}  # $in
    assert ok["patch"]["draft"] is True
    assert ok["update"]["title"] == f"{tag}-1b"
    assert ok["publish_article"]["published"] is True
    assert ok["remove"]["id"] == created["id"]
    # Typed errors, rebuilt by the client: its class, name, code, className and data.
    not_found = steps["not-found"]["error"]
    assert (not_found["class"], not_found["code"], not_found["className"]) == ("NotFound", 404, "not-found")
    assert steps["bad-request"]["error"]["class"] == "BadRequest"
    unknown = steps["unknown-service"]["error"]
    assert unknown["class"] == "NotFound" and unknown["data"]["path"].startswith("nothing-here")


def test_authentication_accepted_and_refused(url: str) -> None:
    accepted = run_client("auth", url=url, token=token("bob", role="reader"))["authenticate"]["ok"]
    assert accepted["user"]["sub"] == "bob" and accepted["authentication"]["strategy"] == "jwt"
    forged = jwt.encode(
        {"sub": "eve", "exp": int(time.time()) + 60}, "another-secret-of-32-chars-or-more!!", "HS256"
    )
    refused = run_client("auth", url=url, token=forged)["authenticate"]["error"]
    assert (refused["class"], refused["code"]) == ("NotAuthenticated", 401)
    # A socket that did not authenticate may not call; REST without a token neither.
    anonymous = run_client("methods", url=url, transport="socketio", tag="anon")
    assert anonymous["create"]["error"]["class"] == "NotAuthenticated"
    assert run_client("methods", url=url, transport="rest", tag="anon")["get"]["error"]["code"] == 401
    # A reader is refused by the permission hook of the remote proxy, over the socket too.
    reader = run_client("methods", url=url, transport="socketio", token=token("rita", role="reader"), tag="r")
    assert reader["create"]["error"]["class"] == "Forbidden"


def test_events_of_a_remote_service_reach_each_user_for_its_own_articles(url: str) -> None:
    alice, bob = token("alice"), token("bob")
    listeners = [Listener(url, alice, count=2), Listener(url, bob, count=2), Listener(url, None, count=1)]
    # A client that stops reading (its process frozen, as a dead or stalled browser): it holds back no one.
    frozen = Listener(url, alice, count=2)
    frozen.process.send_signal(signal.SIGSTOP)
    listeners.append(frozen)
    try:
        for user_token, title in ((alice, "of alice"), (bob, "of bob")):
            headers = {"Authorization": f"Bearer {user_token}"}
            created = httpx.post(f"{url}/articles", json={"title": title}, headers=headers, timeout=10).json()
            published = httpx.post(
                f"{url}/articles",
                json={"id": created["id"]},
                headers={**headers, "X-Service-Method": "publish_article"},
                timeout=10,
            )
            assert published.status_code == 200, published.text
        wait_for(lambda: len(listeners[0].events()) >= 2 and len(listeners[1].events()) >= 2, timeout=20)
        for listener, owner in zip(listeners[:2], ("alice", "bob"), strict=True):
            events = listener.events()
            assert [name for name, _ in events] == ["created", "article_published"], events
            assert {data["owner"] for _, data in events} == {owner}
        # Each stream's own events came after the other user's were published: none of those was sent to it,
        # and the anonymous socket of an authenticated gateway hears nothing.
        assert listeners[2].events() == []
    finally:
        frozen.process.send_signal(signal.SIGCONT)
        for listener in listeners:
            listener.close()


def test_readme_shows_a_feathers_client() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "@feathersjs/socketio-client" in readme and "app.authenticate" in readme
    assert Path(CLIENTS / "package-lock.json").is_file()


def test_sockets_of_other_origins_are_refused(url: str) -> None:
    # A page of another site must not open a socket on the user's behalf (cross-site WebSocket hijacking).
    handshake = f"{url}/socket.io/?EIO=4&transport=polling"
    assert httpx.get(handshake, headers={"Origin": url}, timeout=5).status_code == 200
    assert httpx.get(handshake, headers={"Origin": "http://evil.example"}, timeout=5).status_code == 400


def stalled_socket(port: int) -> socket.socket:
    """A Socket.IO client over WebSocket that connects, then never reads (a tiny receive buffer, as a
    stalled browser whose kernel buffers are full)."""
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", port))
    stalled.sendall(
        b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    stalled.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = stalled.recv(4096)
        assert chunk, answer
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 101"), answer
    mask = os.urandom(4)  # a client's frames are masked: one text frame, "40" (Socket.IO connect to "/")
    stalled.sendall(bytes([0x81, 0x80 | 2]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"40")))
    return stalled


def test_a_stalled_socket_has_its_events_dropped_not_buffered_without_bound() -> None:
    # Socket.IO's own per-socket queue has no bound: the transport hands it an event only once it took the
    # previous ones, so the events of a client that stops reading stay in its bounded outbox, and the
    # overflow is dropped (counted), while the other clients get every event.
    api = App()
    articles = api.use("articles", MemoryService())
    with serve_in_thread(api, queue_size=8) as (url_, application):
        hub = application.state.hub
        live = Listener(url_, None, count=10_000, timeout=60_000)
        stalled = stalled_socket(int(url_.rsplit(":", 1)[1]))
        try:
            wait_for(lambda: hub.clients == 2, timeout=10, what="the stalled socket connected")
            blob = "x" * 65536
            sent = 0

            def emit_one() -> None:
                nonlocal sent
                articles.create({"i": sent, "blob": blob})  # emitted from this thread, as a worker's
                sent += 1
                wait_for(lambda: len(live.events()) >= sent, timeout=10, what=f"live event {sent}")

            while hub.dropped == 0 and sent < 600:
                emit_one()
            assert hub.dropped > 0, f"no drop after {sent} events to a socket that reads none"
            dropped = hub.dropped
            for _ in range(10):  # the stalled socket's outbox stays full: the live client keeps up
                emit_one()
            assert hub.dropped >= dropped + 10
            assert [data["i"] for _, data in live.events()] == list(range(sent))
        finally:
            stalled.close()
            live.close()
