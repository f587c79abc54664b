"""The HTTP gateway against a consumer app: a remote ``articles`` served by a real provider worker process,
local services beside it, a real uvicorn server for the streams, and the ASGI app in-process."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import socketio  # type: ignore[import-untyped]
import uvicorn

from celery_services import App, DistributionSettings, MemoryService, distribute, finalize
from celery_services.distribution.protocol import dumps
from celery_services.http import EventHub, asgi_app, make_server
from celery_services.testing import KitConfig, ProviderWorker, purge_queues, unique_name, wait_for

from .support import ROOT, cleanup, registered_provider

pytestmark = pytest.mark.timeout(60)

STANDARD = ["find", "get", "create", "update", "patch", "remove"]
#: A key registered with no worker behind it, consumed too (the healthcheck's failing case).
GHOST = f"ghost-{os.urandom(3).hex()}"


class Echo:
    """A local service answering what it was called with (no update / patch)."""

    def find(self, params: dict[str, Any]) -> Any:
        return params

    def get(self, id: Any, params: dict[str, Any]) -> Any:
        return {"id": id, "type": type(id).__name__}

    def create(self, data: Any, params: dict[str, Any]) -> Any:
        if isinstance(data, dict) and data.get("fail"):
            raise RuntimeError("secret-internal-detail")
        if isinstance(data, dict) and data.get("unserializable"):
            return {"value": object()}
        return {"data": data}

    def remove(self, id: Any, params: dict[str, Any]) -> None:
        return None

    def shout(self, data: Any, params: dict[str, Any]) -> Any:
        return {"shouted": str(data.get("text", "")).upper()}


# -- fixtures ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def provider_worker(kit: KitConfig, label: str) -> Iterator[ProviderWorker]:
    """``tests.apps.provider`` (``articles``, ``probe``) in a worker of a new key; its queue deleted after."""
    worker = ProviderWorker(
        "tests.apps.provider:app",
        kit,
        key=unique_name(label),
        pythonpath=[str(ROOT)],
        services=["*"],
        timeout=8,
    )
    try:
        with worker:
            yield worker
    finally:
        purge_queues(kit.broker_url, [worker.key])


def gateway_settings(kit: KitConfig, label: str, *remote_keys: str, **settings: Any) -> DistributionSettings:
    """A gateway app's settings: it exposes nothing and mounts the services of ``remote_keys``."""
    return kit.settings(
        unique_name(label), timeout=8, services=[], remote_services=list(remote_keys), **settings
    )


@pytest.fixture(scope="module")
def kit(redis_url: str) -> Iterator[KitConfig]:
    with KitConfig.isolated(redis_url, "cs-http") as config:
        yield config


@pytest.fixture(scope="module")
def registry_prefix(kit: KitConfig) -> str:
    return kit.registry_prefix


@pytest.fixture(scope="module")
def provider(kit: KitConfig) -> Iterator[ProviderWorker]:
    with provider_worker(kit, "http-prov") as worker:
        yield worker


@pytest.fixture(scope="module")
def api(kit: KitConfig, provider: ProviderWorker) -> Iterator[App]:
    app = App()
    distribution = distribute(
        app,
        gateway_settings(
            kit,
            "http-gw",
            provider.key,
            GHOST,
            distributed_methods=[*STANDARD, "publish_article", "boom"],
            distributed_events=["created", "updated", "patched", "removed", "article_published"],
        ),
    )
    distribution.wait_for("articles", timeout=10)
    distribution.wait_for("probe", timeout=10)
    app.use("notes", MemoryService(multi=True))
    app.use("echo", Echo(), methods=["shout"])
    try:
        yield app
    finally:
        finalize(app)


@dataclass
class Served:
    url: str
    port: int
    hub: EventHub
    server: uvicorn.Server


@pytest.fixture(scope="module")
def served(api: App) -> Iterator[Served]:
    server = make_server(api, port=0, log_level="warning", heartbeat=0.2, queue_size=8)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=10, what="uvicorn started")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Served(f"http://127.0.0.1:{port}", port, server.config.app.state.hub, server)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=15) as client:
        yield client


@pytest.fixture
def mount(api: App) -> Iterator[Any]:
    """``mount(path, service, **options)``: mounted for the test, unmounted after it."""
    mounted: list[str] = []

    def use(path: str, service: Any, **options: Any) -> Any:
        wrapper = api.use(path, service, **options)
        mounted.append(path)
        return wrapper

    yield use
    for path in mounted:
        if path in api.services:
            api.unuse(path)


class SSEReader:
    """Reads ``/events`` in a thread; stops at the next line (pings come every 0.2 s) once closed."""

    def __init__(self, url: str, query: str = "") -> None:
        self.url = f"{url}/events{'?' + query if query else ''}"
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.comments: list[str] = []
        self.headers: httpx.Headers | None = None
        self.connected = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sse-reader", daemon=True)
        self._thread.start()
        if not self.connected.wait(10):
            raise TimeoutError(f"no ': connected' from {self.url}: {self.error!r}")

    def _run(self) -> None:
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(10.0)) as client,
                client.stream("GET", self.url, headers={"Accept": "text/event-stream"}) as response,
            ):
                self.headers = response.headers
                event, data = "message", []
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith(":"):
                        self.comments.append(line)
                        if line == ": connected":
                            self.connected.set()
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif line == "" and data:
                        self.events.append((event, json.loads("\n".join(data))))
                        event, data = "message", []
        except BaseException as exc:  # reported by the test through .error
            self.error = exc

    def named(self, name: str) -> list[dict[str, Any]]:
        return [body for event, body in list(self.events) if event == name]

    def wait(self, name: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        return wait_for(lambda: len(self.named(name)) >= count and self.named(name), timeout, what=name)

    def ended(self) -> bool:
        """Whether the stream ended (the server closed it, or it failed: see ``error``)."""
        return not self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def sse(served: Served) -> Iterator[Any]:
    readers: list[SSEReader] = []

    def open_reader(query: str = "") -> SSEReader:
        reader = SSEReader(served.url, query)
        readers.append(reader)
        return reader

    yield open_reader
    for reader in readers:
        reader.close()


@contextlib.contextmanager
def socket_client(url: str) -> Iterator[Any]:
    """A Socket.IO client of the gateway, connected (its socket joined the event hub) until the block ends."""
    client = socketio.Client()
    client.connect(url, transports=["websocket"], wait_timeout=10)
    try:
        yield client
    finally:
        client.disconnect()


def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """One request on a raw socket (``Connection: close``): the status and the JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    header, _, content = received.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(content)


def error_of(response: httpx.Response, status: int, name: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["name"] == name
    assert body["code"] == status
    # As a Feathers server writes it: data and errors only when they hold something, never null.
    assert (
        {"name", "message", "code", "className"}
        <= set(body)
        <= {
            "name",
            "message",
            "code",
            "className",
            "data",
            "errors",
        }
    )
    assert body.get("data", {}) is not None and body.get("errors", {}) is not None
    assert "Traceback" not in response.text
    return body


# -- REST on the remote articles ---------------------------------------------------------------------------


def test_remote_rest_round_trip(http: httpx.Client) -> None:
    created = http.post("/articles", json={"title": "remote one"})
    assert created.status_code == 201
    article = created.json()
    id = article["id"]
    assert http.get(f"/articles/{id}").json() == article  # "3" → 3: the provider's ids are ints
    assert article in http.get("/articles", params={"title": "remote one"}).json()
    updated = http.put(f"/articles/{id}", json={"title": "replaced"})
    assert updated.status_code == 200 and updated.json() == {"id": id, "title": "replaced"}
    patched = http.patch(f"/articles/{id}", json={"tags": ["x"]})
    assert patched.json() == {"id": id, "title": "replaced", "tags": ["x"]}
    published = http.post("/articles", json={"id": id}, headers={"X-Service-Method": "publish_article"})
    assert published.status_code == 200 and published.json()["published"] is True
    removed = http.delete(f"/articles/{id}")
    assert removed.status_code == 200 and removed.json()["id"] == id
    body = error_of(http.get(f"/articles/{id}"), 404, "NotFound")  # the provider's error, rebuilt
    assert str(id) in body["message"]


def test_remote_query_string(http: httpx.Client) -> None:
    tag = os.urandom(3).hex()
    ids = [
        http.post("/articles", json={"title": f"{tag}-{n}", "n": n, "tag": tag}).json()["id"]
        for n in range(5)
    ]
    found = http.get(f"/articles?tag={tag}&n[$gte]=1&n[$lt]=4&$sort[n]=-1&$limit=2&$select[]=n")
    assert found.json() == [{"id": ids[3], "n": 3}, {"id": ids[2], "n": 2}]
    either = http.get(f"/articles?tag={tag}&$or[0][title]={tag}-0&$or[1][title]={tag}-4&$sort[n]=1")
    assert [a["n"] for a in either.json()] == [0, 4]
    chosen = http.get(f"/articles?title[$in][]={tag}-1&title[$in][]={tag}-2&$skip=1")
    assert [a["n"] for a in chosen.json()] == [2]
    assert http.get(f"/articles?tag={tag}&n=2").json() == []  # equality values stay strings
    assert http.get(f"/articles?tag={tag}&n[$in]=2").json()[0]["n"] == 2  # operator values are literals
    error_of(http.get("/articles?$sort=title"), 400, "BadRequest")  # the parser's
    error_of(http.get("/articles?title[$regex]=x"), 400, "BadRequest")  # the provider's
    # No multi patch on the provider's articles: its MethodNotAllowed comes back.
    error_of(http.patch(f"/articles?tag={tag}", json={"x": 1}), 405, "MethodNotAllowed")


def test_remote_params_travel_as_the_gateway_pattern_allows(http: httpx.Client) -> None:
    sent = {"X-Request-Id": "abc", "Authorization": "Bearer secret", "X-Api-Key": "k", "X-Trace": "t"}
    answer = http.get("/probe/7?a=1", headers=sent).json()
    assert answer["id"] == 7
    params = answer["params"]
    assert params["query"] == {"a": "1"}
    # forwarded_headers is an allow-list; authentication = false: identity and credentials stay home.
    assert params["headers"] == {
        "x-request-id": "abc",
        "accept": "*/*",
        "user-agent": params["headers"]["user-agent"],
    }
    assert "authentication" not in params and "user" not in params


def test_custom_method_errors(http: httpx.Client) -> None:
    error_of(http.post("/articles", json={}, headers={"X-Service-Method": "nope"}), 405, "MethodNotAllowed")
    error_of(http.post("/articles", json={}, headers={"X-Service-Method": "find"}), 405, "MethodNotAllowed")
    error_of(
        http.post("/articles/1", json={}, headers={"X-Service-Method": "publish_article"}),
        405,
        "MethodNotAllowed",
    )
    # A provider-side failure that is no ServiceError comes back as its GeneralError (500).
    error_of(http.post("/probe", json={}, headers={"X-Service-Method": "boom"}), 500, "GeneralError")
    error_of(http.post("/probe", json="notfound", headers={"X-Service-Method": "boom"}), 404, "NotFound")


# -- REST on local services ----------------------------------------------------------------------------------


def test_local_multi_methods_and_statuses(http: httpx.Client) -> None:
    tag = os.urandom(3).hex()
    created = http.post("/notes", json=[{"tag": tag, "n": n} for n in range(4)])
    assert created.status_code == 201 and len(created.json()) == 4
    patched = http.patch(f"/notes?tag={tag}&n[$gte]=2", json={"big": True})
    assert sorted(item["n"] for item in patched.json()) == [2, 3]
    assert all(item["big"] for item in patched.json())
    page = http.get(f"/notes?tag={tag}&$sort[n]=-1&$limit=3&$skip=1").json()
    assert [item["n"] for item in page] == [2, 1, 0]
    removed = http.delete(f"/notes?tag={tag}&big=true")  # "true" is a string: nothing matches
    assert removed.json() == []
    removed = http.delete(f"/notes?tag={tag}&big[$ne]=true")
    assert sorted(item["n"] for item in removed.json()) == [0, 1]
    assert [item["n"] for item in http.get(f"/notes?tag={tag}&$sort[n]=1").json()] == [2, 3]
    empty = http.post("/notes", content=b"")  # no body: {} as Feathers' body parser gives
    assert empty.status_code == 201 and set(empty.json()) == {"id"}
    assert http.delete("/echo/1").status_code == 204  # a None result
    assert http.post("/echo", json={"text": "hi"}, headers={"X-Service-Method": "shout"}).json() == {
        "shouted": "HI"
    }


def test_ids_and_nested_paths(api: App, http: httpx.Client, mount: Any) -> None:
    assert http.get("/echo/12").json() == {"id": 12, "type": "int"}
    assert http.get("/echo/-3").json() == {"id": -3, "type": "int"}
    assert http.get("/echo/007").json() == {"id": "007", "type": "str"}
    assert http.get("/echo/a%2Fb").json() == {"id": "a/b", "type": "str"}  # an encoded slash stays in the id
    assert http.get("/echo/caf%C3%A9").json() == {"id": "café", "type": "str"}
    assert http.get("/echo/12/").json() == {"id": 12, "type": "int"}
    error_of(http.get("/echo/12/more"), 404, "NotFound")
    error_of(http.get("/api/v1/users/5"), 404, "NotFound")
    mount("api/v1/users", Echo())  # mounted after start-up: served at once
    mount("api", Echo())
    assert http.get("/api/v1/users/5").json() == {"id": 5, "type": "int"}  # the longest path wins
    assert http.get("/api/v1").json() == {"id": "v1", "type": "str"}
    assert "query" in http.get("/api/v1/users").json()
    error_of(http.get("/api/v1/users/5/x"), 404, "NotFound")
    api.unuse("api/v1/users")  # removed: gone at once, and "api" cannot take three segments
    error_of(http.get("/api/v1/users/5"), 404, "NotFound")
    assert http.get("/api/v1").json() == {"id": "v1", "type": "str"}


def test_params_of_local_calls(http: httpx.Client) -> None:
    params = http.get(
        "/echo?title[$in][]=a&n[$gt]=2",
        headers={"Authorization": "Bearer tok.en-1", "X-Multi": "a", "Accept": "application/json"},
    ).json()
    assert params["provider"] == "rest"
    assert params["query"] == {"title": {"$in": ["a"]}, "n": {"$gt": 2}}
    assert params["headers"]["authorization"] == "Bearer tok.en-1"
    assert params["headers"]["x-multi"] == "a"
    assert all(name == name.lower() for name in params["headers"])
    assert params["authentication"] == {"strategy": "jwt", "accessToken": "tok.en-1"}
    assert "authentication" not in http.get("/echo").json()
    assert "authentication" not in http.get("/echo", headers={"Authorization": "Basic abc"}).json()


def test_errors(http: httpx.Client, served: Served) -> None:
    body = error_of(http.get("/nowhere/1"), 404, "NotFound")
    assert body["className"] == "not-found"
    error_of(http.put("/echo/1", json={}), 405, "MethodNotAllowed")  # no update on echo
    error_of(http.patch("/echo/1", json={}), 405, "MethodNotAllowed")
    error_of(http.request("OPTIONS", "/echo"), 405, "MethodNotAllowed")
    error_of(http.request("PROPFIND", "/echo"), 405, "MethodNotAllowed")
    error_of(http.post("/notes/1", json={}), 405, "MethodNotAllowed")
    error_of(http.post("/notes", content=b"{not json"), 400, "BadRequest")
    error_of(http.post("/notes", content=b'{"n": NaN}'), 400, "BadRequest")
    error_of(http.post("/notes", content=b"\xff\xfe\x00"), 400, "BadRequest")
    error_of(http.post("/notes", content=b"[" * 100_000), 400, "BadRequest")  # too deep for json
    # 413 from Content-Length, before anything is read.
    status, error = raw_request(
        served.port,
        "POST /notes HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: 1048577\n"
        "Connection: close\n",
    )
    assert status == 413 and error["name"] == "PayloadTooLarge"
    # 413 while reading a chunked body with no Content-Length.
    over = http.post("/notes", content=iter([b'{"a": "', b"x" * 1_048_576, b'"}']))
    error_of(over, 413, "PayloadTooLarge")
    error_of(http.get("/articles?$limit=ten"), 400, "BadRequest")
    error_of(http.get("/notes?t=%FF"), 400, "BadRequest")
    # Any other exception: a 500 that tells nothing of it.
    failed = error_of(http.post("/echo", json={"fail": True}), 500, "GeneralError")
    assert "secret" not in json.dumps(failed)
    error_of(http.post("/echo", json={"unserializable": True}), 500, "GeneralError")


def test_remote_timeout_is_408(api: App, http: httpx.Client, mount: Any, redis_url: str) -> None:
    assert api.distribution is not None
    key = f"nobody-{os.urandom(3).hex()}"  # no worker serves this key
    proxy = api.distribution.remote_service(key, "things", ["find"])
    wrapper = mount("ghost", proxy)
    hooked: list[float] = []

    def short_timeout(context: Any) -> None:
        # `wait`: sent although no instance is live, so the call times out rather than failing at once.
        context.params.update(timeout=0.3, wait=True)
        hooked.append(time.time())

    wrapper.hooks({"before": {"all": [short_timeout]}})
    try:
        body = error_of(http.get("/ghost"), 408, "Timeout")
        assert key in body["message"]
        # The call's own 0.3 s timeout, not the gateway's 8 s: the deadline its message carries (still queued,
        # nobody serves the key) is 0.3 s after the hook ran, not 8 s.
        [message] = redis.Redis.from_url(redis_url).lrange(key, 0, -1)
        assert 0.3 <= json.loads(message)["headers"]["cs_deadline"] - hooked[0] < 8
    finally:
        cleanup(redis_url, redis_url, key)


def test_dead_provider_is_503(
    api: App, http: httpx.Client, mount: Any, redis_url: str, registry_prefix: str
) -> None:
    assert api.distribution is not None
    departed = registered_provider(redis_url, registry_prefix, "departed")
    mount("departed", api.distribution.remote_service(departed.key, "articles", ["find"]))
    worker = departed.worker().start()
    try:
        wait_for(lambda: api.distribution.registry.has_key(departed.key), timeout=10, what="provider seen")
        assert http.get("/departed").status_code == 200
        worker.kill()  # SIGKILL: no withdrawal, the registry notices when its manifest expires
        wait_for(lambda: not api.distribution.registry.has_key(departed.key), timeout=10, what="death seen")
        error_of(http.get("/departed"), 503, "Unavailable")
    finally:
        worker.stop()
        cleanup(redis_url, redis_url, departed.key, departed.runs_key)


def test_healthcheck(
    api: App, http: httpx.Client, provider: ProviderWorker, redis_url: str, registry_prefix: str
) -> None:
    ok = http.get(f"/distribution/healthcheck/{provider.key}")
    assert ok.status_code == 200 and ok.json() == {"articles": True, "probe": True}
    assert http.get("/distribution/healthcheck").json() == {"articles": True, "probe": True}
    error_of(http.get("/distribution/healthcheck/nobody"), 404, "NotFound")
    # A registered app with no worker: 503 with the partial answer.
    ghost = GHOST
    store = redis.Redis.from_url(redis_url)
    manifest = {
        "key": ghost,
        "instance": "fake-1",
        "host": "nowhere",
        "pid": 1,
        "started_at": time.time(),
        "heartbeat": time.time(),
        "protocol": 1,
        "services": [{"path": "phantom", "methods": ["get"], "events": [], "options": {}}],
    }
    entry = f"{registry_prefix}:manifest:{ghost}:fake-1"
    store.set(entry, json.dumps(manifest), ex=60)
    store.publish(f"{registry_prefix}:registry", json.dumps({"op": "up", "key": ghost, "instance": "fake-1"}))
    try:
        wait_for(lambda: "phantom" in api.services, timeout=10, what="phantom mounted")
        down = http.get(f"/distribution/healthcheck/{ghost}")
        assert down.status_code == 503 and down.json() == {"phantom": False}
        partial = http.get("/distribution/healthcheck")
        assert partial.status_code == 503
        assert partial.json() == {"articles": True, "probe": True, "phantom": False}
    finally:
        store.delete(entry)
        store.publish(
            f"{registry_prefix}:registry", json.dumps({"op": "down", "key": ghost, "instance": "fake-1"})
        )
        wait_for(lambda: "phantom" not in api.services, timeout=10, what="phantom withdrawn")
        cleanup(redis_url, redis_url, ghost)
        store.close()


def test_page_and_assets(http: httpx.Client) -> None:
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<h1 id="heading">Articles</h1>' in page.text and 'role="status"' in page.text
    script = http.get("/static/app.js")
    assert script.status_code == 200 and 'socket.emit(method, "articles"' in script.text
    client = http.get("/static/socket.io.min.js")  # served locally, no CDN
    assert client.status_code == 200 and "Socket.IO v4" in client.text
    assert http.get("/static/style.css").headers["content-type"].startswith("text/css")
    error_of(http.get("/static/secret.py"), 404, "NotFound")


# -- in-process, through httpx's ASGI transport ------------------------------------------------------------


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


@pytest.fixture
def local_app() -> App:
    app = App()
    app.use("notes", MemoryService())
    return app


def test_asgi_transport_prefix_and_limits(local_app: App) -> None:
    application = asgi_app(local_app, prefix="/api/", max_body_bytes=64)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit is checked while reading
        for chunk in (b'{"title": "', b"y" * 40, b"z" * 40, b'"}'):
            yield chunk

    async def main() -> None:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url="http://gw"
        ) as c:
            created = await c.post("/api/notes", json={"title": "t"})
            assert created.status_code == 201 and created.json() == {"title": "t", "id": 0}
            assert (await c.get("/api/notes/0")).json() == {"title": "t", "id": 0}
            error_of(await c.get("/notes/0"), 404, "NotFound")  # outside the prefix
            assert (await c.get("/")).status_code == 200  # the page talks to the socket, at the root
            error_of(await c.post("/api/notes", content=b"x" * 65), 413, "PayloadTooLarge")
            error_of(await c.post("/api/notes", content=chunks()), 413, "PayloadTooLarge")
            assert (await c.post("/api/notes", content=b'{"title": "' + b"k" * 40 + b'"}')).status_code == 201
            assert (await c.get("/api/distribution/healthcheck")).json() == {}  # not distributed
            error_of(await c.get("/api/distribution/healthcheck/k"), 404, "NotFound")
            error_of(await c.delete("/api/notes"), 405, "MethodNotAllowed")  # no multi remove
            bad_length = await c.post("/api/notes", content=b"{}", headers={"Content-Length": "x"})
            error_of(bad_length, 400, "BadRequest")

    run(main())


def test_calls_run_in_threads_not_on_the_loop(local_app: App) -> None:
    together = threading.Barrier(8)

    class Slow:
        def find(self, params: Any) -> Any:
            # Each call waits here for the 8 of them: they only meet if they all run at once, each in its own
            # thread (calls run one after another, or on the loop, break the barrier after 10 s: a 500).
            together.wait(timeout=10)
            return threading.current_thread().name

    local_app.use("slow", Slow())
    application = asgi_app(local_app)

    async def main() -> None:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url="http://gw"
        ) as c:
            loop_thread = threading.current_thread().name
            answers = await asyncio.gather(*(c.get("/slow") for _ in range(8)))
            assert [answer.status_code for answer in answers] == [200] * 8, answers[0].text
            names = {answer.json() for answer in answers}
            assert len(names) == 8, names  # 8 threads at once
            assert loop_thread not in names
            assert all(name.startswith("celery-services-http") for name in names), names

    run(main())


def test_coerce_option_reaches_the_parser(local_app: App) -> None:
    local_app.service("notes").create({"id": 2, "n": 2})

    async def main() -> None:
        for coerce, expected in (("operators", []), ("all", [{"id": 2, "n": 2}]), ("none", [])):
            application = asgi_app(local_app, coerce=coerce)
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                assert (await c.get("/notes?id=2")).json() == expected, coerce
                gt = (await c.get("/notes?n[$gt]=1")).json()
                assert gt == ([] if coerce == "none" else [{"id": 2, "n": 2}]), coerce

    run(main())


def test_head_answers_as_get_without_a_body_and_a_405_says_what_is_allowed(local_app: App) -> None:
    local_app.service("notes").create({"title": "t"})
    local_app.use("echo", Echo(), methods=["shout"])  # find, get, create, remove and shout

    async def main() -> None:
        transport = httpx.ASGITransport(app=asgi_app(local_app))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            for path in ("/notes", "/notes/0"):
                got, head = await c.get(path), await c.head(path)
                assert head.status_code == 200 and head.content == b"", head.text
                for header in ("content-type", "content-length"):
                    assert head.headers[header] == got.headers[header], header
            missing = await c.head("/notes/9")
            assert missing.status_code == 404 and missing.content == b""
            for verb, path, allowed in (
                ("POST", "/notes/0", "GET, HEAD, PUT, PATCH, DELETE"),
                ("PUT", "/echo/1", "GET, HEAD, DELETE"),
                ("PATCH", "/echo", "GET, HEAD, POST, DELETE"),
                ("OPTIONS", "/echo", "GET, HEAD, POST, DELETE"),
                ("PROPFIND", "/echo/1", "GET, HEAD, DELETE"),
            ):
                refused = await c.request(verb, path, json={} if verb != "OPTIONS" else None)
                error_of(refused, 405, "MethodNotAllowed")
                assert refused.headers.get("allow") == allowed, (verb, path)
            unknown = await c.post("/echo", json={}, headers={"X-Service-Method": "whisper"})
            assert error_of(unknown, 405, "MethodNotAllowed")["data"] == {"method": "whisper"}
            assert unknown.headers.get("allow") == "GET, HEAD, POST, DELETE"

    run(main())


def test_head_over_the_server(http: httpx.Client) -> None:
    got, head = http.get("/notes"), http.head("/notes")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"]


def test_options_are_checked() -> None:
    app = App()
    for bad in (
        {"prefix": "/a b"},
        {"threads": 0},
        {"heartbeat": 0},
        {"max_body_bytes": -1},
        {"queue_size": 0},
    ):
        with pytest.raises(ValueError):
            asgi_app(app, **bad)


# -- Server-Sent Events ------------------------------------------------------------------------------------


def test_sse_local_events_filters_and_late_services(
    api: App, http: httpx.Client, served: Served, sse: Any, mount: Any
) -> None:
    everything = sse()
    created_notes = sse("path=notes&event=created")
    assert created_notes.headers is not None
    assert created_notes.headers["content-type"].startswith("text/event-stream")
    note = http.post("/notes", json={"title": "live"}).json()
    http.patch(f"/notes/{note['id']}", json={"seen": True})
    [message] = created_notes.wait("created")
    assert message == {"path": "notes", "event": "created", "data": note}
    everything.wait("patched")
    # A service mounted after the clients connected streams too; its removal detaches the hub.
    mount("later", MemoryService())
    assert "later" in served.hub.attached()
    later = http.post("/later", json={"x": 1}).json()
    assert everything.wait("created", 2)[-1] == {"path": "later", "event": "created", "data": later}
    api.unuse("later")
    assert "later" not in served.hub.attached()
    wait_for(lambda: any(c == ": ping" for c in everything.comments), timeout=5, what="heartbeat")
    assert created_notes.named("patched") == [] and len(created_notes.named("created")) == 1


def test_sse_listeners_removed_when_clients_leave(api: App, served: Served, sse: Any) -> None:
    wait_for(lambda: served.hub.clients == 0, timeout=10, what="earlier clients gone")
    assert api.service("notes").listeners("created") == []
    reader = sse("path=notes")
    assert len(api.service("notes").listeners("created")) == 1
    assert len(api.service("articles").listeners("article_published")) == 1  # proxies too
    reader.close()
    wait_for(lambda: served.hub.clients == 0, timeout=10, what="client gone")
    assert api.service("notes").listeners("created") == []
    assert api.service("articles").listeners("article_published") == []
    for event in ("service", "service-removed"):
        assert all(getattr(listener, "__self__", None) is not served.hub for listener in api.listeners(event))


def test_sse_remote_events(http: httpx.Client, sse: Any) -> None:
    reader = sse("path=articles")
    article = http.post("/articles", json={"title": "from afar"}).json()
    http.post("/articles", json={"id": article["id"]}, headers={"X-Service-Method": "publish_article"})
    # Emitted by the provider's worker process, carried by the event bus, re-emitted by the proxy.
    assert reader.wait("created", timeout=5)[0] == {"path": "articles", "event": "created", "data": article}
    assert reader.wait("article_published", timeout=5)[0]["data"] == {**article, "published": True}
    assert reader.named("patched") == []  # publish_article patches its store directly: no service event


def test_slow_client_never_blocks_others(
    api: App, served: Served, http: httpx.Client, sse: Any, mount: Any
) -> None:
    wait_for(lambda: served.hub.clients == 0, timeout=10, what="earlier clients gone")
    bulk = mount("bulk", MemoryService())
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
    slow.connect(("127.0.0.1", served.port))
    slow.sendall(b"GET /events?path=bulk HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        wait_for(lambda: served.hub.clients == 1, timeout=10, what="slow client connected")
        fast = sse("path=bulk")
        dropped_before = served.hub.dropped
        blob = "x" * 65536
        sent = answered = 0

        def emit_one() -> None:
            nonlocal sent, answered
            bulk.create({"i": sent, "blob": blob})  # emitted from this thread, like a worker thread
            sent += 1
            fast.wait("created", sent, timeout=5)  # the fast client keeps up, event by event
            if sent % 25 == 0:  # and other requests are answered (a blocked server would never answer)
                assert http.get("/notes?$limit=1").status_code == 200
                answered += 1

        while served.hub.dropped == dropped_before and sent < 600:
            emit_one()
        assert served.hub.dropped > dropped_before, f"no drop after {sent} events"
        answered_before_the_drop = answered
        for _ in range(30):  # the app keeps emitting while the slow client's queue stays full
            emit_one()
        assert [body["data"]["i"] for body in fast.named("created")] == list(range(sent))
        assert fast.named("dropped") == []
        # Requests were answered after the slow client's queue overflowed, while it still had read nothing.
        assert answered > answered_before_the_drop
        # Once it reads again, the slow client learns it missed events.
        slow.settimeout(10)
        seen = b""
        while b"event: dropped" not in seen:
            chunk = slow.recv(1 << 20)
            assert chunk, "stream closed before the dropped notice"
            seen = seen[-200:] + chunk
        notice = seen[seen.index(b"event: dropped") :].split(b"\n")[1]
        assert json.loads(notice[len(b"data: ") :])["data"]["dropped"] > 0
    finally:
        slow.close()
    wait_for(lambda: served.hub.clients == 1, timeout=10, what="slow client forgotten")


# -- what every transport carries: the JSON of the wire ----------------------------------------------------


class Stamped:
    """A local service whose items carry what an ORM row does: a datetime, a UUID, a decimal."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def find(self, params: dict[str, Any]) -> Any:
        return self.items

    def create(self, data: Any, params: dict[str, Any]) -> Any:
        at = dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)
        item = {
            **data,
            "id": len(self.items),
            "at": at,
            "uid": uuid.UUID(int=1),
            "price": decimal.Decimal("1.10"),
        }
        self.items.append(item)
        return item


def test_answers_and_events_carry_the_json_of_the_wire(
    served: Served, http: httpx.Client, sse: Any, mount: Any
) -> None:
    stamped = Stamped()
    mount("stamped", stamped)
    reader = sse("path=stamped")
    with socket_client(served.url) as client:
        heard: list[Any] = []
        client.on("stamped created", heard.append)
        created = http.post("/stamped", json={"text": "over REST"})
        assert created.status_code == 201, created.text
        wire = json.loads(dumps(stamped.items[0]))
        assert wire["at"] == "2024-05-01T12:00:00Z" and wire["price"] == "1.10"
        assert created.json() == wire
        assert http.get("/stamped").json() == [wire]
        answer = client.call("create", ("stamped", {"text": "over a socket"}, {}), timeout=10)
        assert answer == (None, json.loads(dumps(stamped.items[1])))
        both = [wire, answer[1]]
        assert [event["data"] for event in reader.wait("created", 2)] == both
        assert wait_for(lambda: len(heard) == 2 and heard, timeout=10, what="socket events") == both
    assert len(stamped.items) == 2  # each create answered once, as it happened


def test_a_value_of_no_json_form_is_a_typed_error_and_a_warning(
    served: Served, http: httpx.Client, sse: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_services.http")
    reader = sse("path=echo")
    with socket_client(served.url) as client:
        heard: list[Any] = []
        client.on("echo created", heard.append)
        error_of(http.post("/echo", json={"unserializable": True}), 500, "GeneralError")
        error = client.call("create", ("echo", {"unserializable": True}, {}), timeout=10)  # (error,)
        assert error["name"] == "GeneralError" and error["code"] == 500
        # Neither event was sent; the next one reaches both transports.
        fine = http.post("/echo", json={"text": "fine"}).json()
        assert [event["data"] for event in reader.wait("created")] == [fine]
        assert wait_for(lambda: heard, timeout=10, what="socket event") == [fine]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # Two answers, two events.
    assert sum("not JSON serializable" in message for message in warnings) == 4, warnings


def test_nan_and_the_infinities_answer_null_as_json_stringify_writes_them(local_app: App) -> None:
    class Ratios:
        def get(self, id: Any, params: dict[str, Any]) -> Any:
            return {"id": id, "ratio": float("nan"), "range": [float("-inf"), float("inf")]}

    local_app.use("ratios", Ratios())

    async def main() -> None:
        transport = httpx.ASGITransport(app=asgi_app(local_app))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            answer = await c.get("/ratios/1")  # JSON has no NaN: a browser's JSON.parse refuses it
            assert answer.status_code == 200
            assert answer.content == b'{"id":1,"ratio":null,"range":[null,null]}'

    run(main())
