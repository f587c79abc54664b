"""The gateway lets in only whom it should: JWT on REST and ``/events``, users in the hooks of remote proxies,
events to their owners only. A real provider worker, a consumer app, real uvicorn servers."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.requests import HTTPConnection

from celery_services import App, MemoryService, NotAuthenticated, distribute, finalize
from celery_services.http import make_server
from celery_services.http.auth import (
    Authenticate,
    JWTAuthentication,
    JWTSettings,
    bearer_token,
    warn_if_anonymous,
)
from celery_services.testing import KitConfig, ProviderWorker, wait_for
from workers.services import guard

from .test_http import SSEReader, gateway_settings, provider_worker, socket_client

pytestmark = pytest.mark.timeout(60)

SECRET = "a-gateway-secret-of-at-least-32-chars"


def token(
    sub: str, role: str = "editor", *, key: Any = SECRET, algorithm: str = "HS256", ttl: float = 60
) -> str:
    claims = {"sub": sub, "role": role, "exp": int(time.time() + ttl)}
    return jwt.encode(claims, key, algorithm=algorithm)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture(scope="module")
def kit(redis_url: str) -> Iterator[KitConfig]:
    with KitConfig.isolated(redis_url, "cs-auth") as config:
        yield config


@pytest.fixture(scope="module")
def provider(kit: KitConfig) -> Iterator[ProviderWorker]:
    with provider_worker(kit, "auth-prov") as worker:
        yield worker


#: What the hooks of the remote articles saw of each call: (method, provider, user's sub).
SEEN: list[tuple[str, Any, Any]] = []


@pytest.fixture(scope="module")
def api(kit: KitConfig, provider: ProviderWorker) -> Iterator[App]:
    app = App()
    distribution = distribute(app, gateway_settings(kit, "auth-gw", provider.key))
    articles = guard(distribution.wait_for("articles", timeout=10))

    def seen(context: Any) -> None:
        user = context.params.get("user")
        SEEN.append((context.method, context.params.get("provider"), user and user.get("sub")))

    articles.hooks({"before": {"all": [seen]}})
    try:
        yield app
    finally:
        finalize(app)


@contextlib.contextmanager
def served(app: App, authenticate: Authenticate | None) -> Iterator[str]:
    """``app`` served by uvicorn on a free port of loopback; yields its base URL."""
    server = make_server(app, port=0, log_level="warning", heartbeat=0.2, authenticate=authenticate)
    thread = threading.Thread(target=server.run, name="uvicorn-auth", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10, what="uvicorn started")
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def serve(api: App) -> Iterator[Callable[[Authenticate], str]]:
    """Serve ``api`` with an authenticate step; returns the base URL (servers stop at the module's end)."""
    with contextlib.ExitStack() as stack:
        yield lambda authenticate: stack.enter_context(served(api, authenticate))


@pytest.fixture(scope="module")
def hs256(serve: Callable[[Authenticate], str]) -> str:
    return serve(JWTAuthentication(JWTSettings(secret=SECRET)))


def authenticate(client: Any, access_token: str) -> Any:
    """Feathers' ``authenticate({strategy: 'jwt', accessToken})`` on a socket: ``(None, result)``, or the
    error."""
    return client.call(
        "create", ("authentication", {"strategy": "jwt", "accessToken": access_token}), timeout=5
    )


def socket_refused(answer: Any, message: str) -> None:
    """A socket call's error answer is Feathers' NotAuthenticated saying ``message`` (python-socketio
    gives an answer of one argument, an error, as that argument itself)."""
    error = answer if isinstance(answer, dict) else {}
    assert (error.get("name"), error.get("code"), error.get("message")) == ("NotAuthenticated", 401, message)


def refused(response: httpx.Response, message: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    body = response.json()
    assert (body["name"], body["code"], body["className"]) == ("NotAuthenticated", 401, "not-authenticated")
    assert body["message"] == message
    assert SECRET not in response.text


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # the HS512 token below
def test_rest_and_events_refuse_missing_forged_expired_and_foreign_tokens(hs256: str) -> None:
    refused(httpx.get(f"{hs256}/articles"), "Not authenticated: send Authorization: Bearer <token>")
    refused(httpx.get(f"{hs256}/events"), "Not authenticated: send Authorization: Bearer <token>")
    forged = token("mallory", key="another-secret-of-at-least-32-chars!")
    refused(httpx.get(f"{hs256}/articles", headers=bearer(forged)), "Invalid token")
    refused(httpx.get(f"{hs256}/articles", headers=bearer(token("ada", ttl=-10))), "Token expired")
    hs512 = jwt.encode({"sub": "ada", "exp": int(time.time() + 60)}, SECRET, algorithm="HS512")
    refused(httpx.get(f"{hs256}/articles", headers=bearer(hs512)), "Invalid token")
    unsigned = jwt.encode({"sub": "ada", "exp": int(time.time() + 60)}, None, algorithm="none")
    refused(httpx.get(f"{hs256}/articles", headers=bearer(unsigned)), "Invalid token")
    refused(httpx.get(f"{hs256}/events", params={"access_token": forged}), "Invalid token")
    # ?access_token= is read on /events only (EventSource cannot send headers), never on a REST call.
    valid = token("ada")
    refused(
        httpx.get(f"{hs256}/articles/events", params={"access_token": valid}),
        "Not authenticated: send Authorization: Bearer <token>",
    )
    # The healthcheck stays public.
    assert httpx.get(f"{hs256}/distribution/healthcheck").status_code == 200


def test_the_user_reaches_the_hooks_of_a_remote_proxy_which_judge_it(hs256: str) -> None:
    reader = token("rita", role="reader")
    assert httpx.get(f"{hs256}/articles", headers=bearer(reader)).status_code == 200
    assert SEEN[-1] == ("find", "rest", "rita")
    denied = httpx.post(f"{hs256}/articles", json={"title": "x"}, headers=bearer(reader))
    assert denied.status_code == 403, denied.text
    assert denied.json()["name"] == "Forbidden" and "Role 'reader' may not create" in denied.json()["message"]
    editor = token("eddie")
    created = httpx.post(f"{hs256}/articles", json={"title": "mine"}, headers=bearer(editor))
    assert created.status_code == 201, created.text
    assert created.json()["owner"] == "eddie"  # stamped from params["user"] at the gateway
    assert SEEN[-1] == ("create", "rest", "eddie")


def test_each_user_hears_only_the_events_of_its_own_articles(hs256: str) -> None:
    alice, bob = token("alice"), token("bob")
    readers = [SSEReader(hs256, f"path=articles&access_token={t}") for t in (alice, bob)]
    try:
        for name, owner_token in (("of-alice", alice), ("of-bob", bob)):
            answer = httpx.post(f"{hs256}/articles", json={"title": name}, headers=bearer(owner_token))
            assert answer.status_code == 201, answer.text
        got_alice = readers[0].wait("created", 1)
        got_bob = readers[1].wait("created", 1)
        # The next event of each stream would have arrived by now had it been sent: one more article each,
        # and each stream's second event is its own.
        for owner_token in (alice, bob):
            httpx.post(f"{hs256}/articles", json={"title": "again"}, headers=bearer(owner_token))
        got_alice, got_bob = readers[0].wait("created", 2), readers[1].wait("created", 2)
        assert {e["data"]["owner"] for e in got_alice} == {"alice"}, got_alice
        assert {e["data"]["owner"] for e in got_bob} == {"bob"}, got_bob
    finally:
        for reader in readers:
            reader.close()


def _pem(public_key: Any) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_public_key_tokens(serve: Callable[[Authenticate], str], algorithm: str) -> None:
    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    other: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    url = serve(JWTAuthentication(JWTSettings(algorithms=[algorithm], public_key=_pem(private.public_key()))))
    good = token("kim", key=private, algorithm=algorithm)
    assert httpx.get(f"{url}/articles", headers=bearer(good)).status_code == 200
    refused(
        httpx.get(f"{url}/articles", headers=bearer(token("kim", key=other, algorithm=algorithm))),
        "Invalid token",
    )
    # An HS256 token "signed" with the public key (the algorithm-confusion attack) is refused.
    with pytest.raises(jwt.InvalidKeyError):
        token("kim", key=_pem(private.public_key()), algorithm="HS256")


def test_a_custom_authenticate_step(serve: Callable[[Authenticate], str]) -> None:
    async def by_api_key(connection: HTTPConnection) -> dict[str, str]:
        if connection.headers.get("x-api-key") != "k-123":
            raise NotAuthenticated("Unknown API key")
        return {"sub": "service-account", "role": "reader"}

    url = serve(by_api_key)
    refused(httpx.get(f"{url}/articles"), "Unknown API key")
    assert httpx.get(f"{url}/articles", headers={"X-Api-Key": "k-123"}).status_code == 200
    assert SEEN[-1] == ("find", "rest", "service-account")


def test_jwt_settings_refuse_what_would_be_unsafe() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        JWTSettings(secret="short")
    with pytest.raises(ValueError, match="never 'none'"):
        JWTSettings(secret=SECRET, algorithms=["none"])
    with pytest.raises(ValueError, match="public_key"):
        JWTSettings(algorithms=["RS256"])
    with pytest.raises(ValueError, match="need a secret"):
        JWTSettings()
    assert SECRET not in repr(JWTSettings(secret=SECRET))


def test_a_misspelt_jwt_variable_is_refused_not_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # The distribution's variables refuse a typo; the JWT ones were skipped by that check and read by no
    # other: CELERY_SERVICES_JWT_AUDIENCES passed silently, and tokens of any audience were let in.
    monkeypatch.setenv("CELERY_SERVICES_JWT_AUDIENCES", "my-api")
    with pytest.raises(
        ValueError, match="CELERY_SERVICES_JWT_AUDIENCES; did you mean CELERY_SERVICES_JWT_AUDIENCE"
    ):
        JWTSettings(secret=SECRET)
    monkeypatch.delenv("CELERY_SERVICES_JWT_AUDIENCES")
    monkeypatch.setenv("CELERY_SERVICES_JWT_AUDIENCE", "my-api")
    assert JWTSettings(secret=SECRET).audience == "my-api"


def test_publish_filters_per_service_and_app_wide_and_a_failing_one_drops_only_its_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()
    notes = app.use("notes", MemoryService())
    app.use("memos", MemoryService())
    # App-wide: a memo addressed to someone goes to that user only.
    app.publish(lambda event, data, context, user: data.get("to") in (None, user["sub"]))

    def alice_only(event: str, data: Any, context: Any, user: Any) -> bool:
        if user["sub"] == "bob":
            raise RuntimeError("this filter breaks on bob")
        return True

    notes.publish(alice_only)  # a service's own filter overrides the app's
    alice, bob = token("alice"), token("bob")
    with served(app, JWTAuthentication(JWTSettings(secret=SECRET))) as url:
        readers = {who: SSEReader(url, f"access_token={t}") for who, t in (("alice", alice), ("bob", bob))}
        try:
            with caplog.at_level(logging.WARNING, logger="celery_services.service"):
                # The emitter is never broken by a filter: the call succeeds.
                assert (
                    httpx.post(f"{url}/notes", json={"text": "n1"}, headers=bearer(alice)).status_code == 201
                )
            assert "publish filter of 'notes' failed on 'created'" in caplog.text
            for body in ({"to": "bob"}, {"text": "for all"}):
                assert httpx.post(f"{url}/memos", json=body, headers=bearer(alice)).status_code == 201
            # Each stream's events come in the order of the calls: its last one says nothing came between.
            got = {who: reader.wait("created", 2) for who, reader in readers.items()}
            assert [(e["path"], e["data"].get("text")) for e in got["alice"]] == [
                ("notes", "n1"),
                ("memos", "for all"),
            ]
            assert [(e["path"], e["data"].get("to")) for e in got["bob"]] == [
                ("memos", "bob"),
                ("memos", None),
            ]
        finally:
            for reader in readers.values():
                reader.close()
    finalize(app)


def test_an_anonymous_gateway_off_loopback_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    jwt_auth = JWTAuthentication(JWTSettings(secret=SECRET))
    with caplog.at_level(logging.WARNING, logger="celery_services.http"):
        assert not any(
            warn_if_anonymous(host, None) for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost")
        )
        assert not warn_if_anonymous("0.0.0.0", jwt_auth)
        assert caplog.records == []
        assert all(
            warn_if_anonymous(host, None) for host in ("0.0.0.0", "::", "192.0.2.7", "gateway.example")
        )
        caplog.clear()
        server = make_server(App(), host="0.0.0.0", port=0)  # built, never run: the warning comes first
        server.config.app.state.executor.shutdown()
    assert [r.getMessage() for r in caplog.records] == [
        "the HTTP gateway listens on '0.0.0.0' without authentication: every client is anonymous and hears "
        "every event (asgi_app(authenticate=JWTAuthentication()), or serve --auth jwt)"
    ]


class SessionTokens:
    """An async authenticate step (as auth.py allows): tokens looked up in a session store."""

    sessions = {"ada-session": {"sub": "ada"}}

    async def verify(self, access_token: str) -> dict[str, str]:
        user = self.sessions.get(access_token)
        if user is None:
            raise NotAuthenticated("Unknown session")
        return user

    async def __call__(self, connection: HTTPConnection) -> dict[str, str]:
        return await self.verify(bearer_token(connection) or "")


def test_a_socket_is_refused_by_an_async_verify_and_let_in_by_what_it_returns() -> None:
    app = App()
    articles = app.use("articles", MemoryService())
    with served(app, SessionTokens()) as url, socket_client(url) as client:
        heard: list[Any] = []
        client.on("articles created", heard.append)
        socket_refused(authenticate(client, "forged"), "Unknown session")
        socket_refused(
            client.call("find", ("articles", {}), timeout=5),
            "Not authenticated: create on 'authentication' first",
        )
        articles.create({"title": "before login"})
        answer = authenticate(client, "ada-session")
        assert answer[0] is None and answer[1]["user"] == {"sub": "ada"}, answer
        found = client.call("find", ("articles", {}), timeout=5)
        assert found == (None, [{"title": "before login", "id": 0}])
        articles.create({"title": "after login"})
        # One socket's events come in order: the first it hears is the first published once it logged in.
        assert wait_for(lambda: heard, timeout=10, what="an event")[0]["title"] == "after login"


def expiry_of(short_lived: str) -> float:
    exp: float = jwt.decode(short_lived, options={"verify_signature": False})["exp"]
    return exp


def test_a_socket_authentication_ends_at_its_token_expiry() -> None:
    app = App()
    articles = app.use("articles", MemoryService())
    short_lived = token("ada", ttl=3)
    with served(app, JWTAuthentication(JWTSettings(secret=SECRET))) as url, socket_client(url) as client:
        heard: list[Any] = []
        client.on("articles created", heard.append)
        assert authenticate(client, short_lived)[0] is None
        assert client.call("find", ("articles", {}), timeout=5) == (None, [])
        wait_for(lambda: time.time() >= expiry_of(short_lived), timeout=10, what="the token's expiry")
        articles.create({"title": "after expiry"})
        socket_refused(client.call("find", ("articles", {}), timeout=5), "Token expired")
        socket_refused(client.call("create", ("articles", {"title": "x"}, {}), timeout=5), "Token expired")
        # A fresh token lets it in again; one socket's events come in order: the first it hears is the first
        # published since, none of those while its token had expired.
        assert authenticate(client, token("ada"))[0] is None
        articles.create({"title": "fresh"})
        assert wait_for(lambda: heard, timeout=10, what="an event")[0]["title"] == "fresh"


def test_an_events_stream_ends_at_its_token_expiry() -> None:
    app = App()
    articles = app.use("articles", MemoryService())
    short_lived = token("ada", ttl=3)
    with served(app, JWTAuthentication(JWTSettings(secret=SECRET))) as url:
        reader = SSEReader(url, f"access_token={short_lived}")
        try:
            articles.create({"title": "before expiry"})
            reader.wait("created", 1)
            wait_for(
                reader.ended, timeout=10, what="the stream's end"
            )  # the client reconnects with a fresh one
            assert time.time() >= expiry_of(short_lived) and reader.error is None
        finally:
            reader.close()


def crafted(header: Any) -> str:
    """A token of ``header`` (not checked by the client), valid claims and a bogus signature."""

    def part(value: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part({'sub': 'mallory', 'exp': int(time.time() + 60)})}.c2ln"


@pytest.mark.parametrize("alg", [["HS256"], {"HS256": True}], ids=["array", "object"])
def test_a_token_whose_header_names_no_algorithm_is_an_invalid_token(
    hs256: str, alg: Any, caplog: pytest.LogCaptureFixture
) -> None:
    forged = crafted({"alg": alg, "typ": "JWT"})
    with caplog.at_level(logging.ERROR, logger="celery_services.http"):
        refused(httpx.get(f"{hs256}/articles", headers=bearer(forged)), "Invalid token")
        refused(httpx.get(f"{hs256}/events", params={"access_token": forged}), "Invalid token")
        with socket_client(hs256) as client:
            socket_refused(authenticate(client, forged), "Invalid token")
    assert caplog.records == []  # a client's mistake, not the gateway's: no traceback
