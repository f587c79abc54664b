"""Apps trust only signed calls, callers are allowed by key, and what travels is an allow-list.

A real provider worker with ``signing_keys`` and ``allow_callers``, real callers on Redis and RabbitMQ.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_services import (
    App,
    BadGateway,
    DistributionSettings,
    Forbidden,
    NotAuthenticated,
    distribute,
    finalize,
)
from celery_services.distribution import Distribution
from celery_services.distribution.caller import Call
from celery_services.distribution.protocol import reply_key, safe_params
from celery_services.distribution.provider import health_task_name
from celery_services.testing import WorkerProcess, wait_for

from .support import Provider, cleanup, provider_env

OLD = "old-secret-of-32-characters-0001"
NEW = "new-secret-of-32-characters-0002"
SUFFIX = os.urandom(3).hex()
TRUSTED = f"trusted-{SUFFIX}"
READER = f"reader-{SUFFIX}"
STRANGER = f"stranger-{SUFFIX}"


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> str:
    if request.param == "redis":
        return redis_url
    return str(request.getfixturevalue("rabbitmq_url"))


@pytest.fixture(scope="module")
def signed(broker: str, redis_url: str) -> Iterator[tuple[Provider, WorkerProcess]]:
    """A provider that signs with NEW and accepts NEW and OLD (a rotation under way)."""
    key = f"signed-{os.urandom(4).hex()}"
    runs = f"test-runs:{key}"
    env = provider_env(
        key,
        broker,
        redis_url,
        runs,
        CELERY_SERVICES_SIGNING_KEYS=json.dumps({"*": [NEW, OLD]}),
        CELERY_SERVICES_ALLOW_CALLERS=json.dumps(
            {TRUSTED: ["probe.*", "articles.*"], READER: ["probe.get"], STRANGER: ["probe.get"]}
        ),
    )
    provider = Provider(key, broker, redis_url, runs, env)
    with provider.worker() as worker:
        yield provider, worker
    cleanup(broker, redis_url, key, runs)


def caller(provider: Provider, key: str, **options: Any) -> tuple[App, Distribution]:
    app = App()
    settings = DistributionSettings(
        key=key,
        broker_url=provider.broker,
        result_backend=provider.backend,
        services=[],
        remote_services=[],
        timeout=8,
        **options,
    )
    return app, distribute(app, settings)


@pytest.fixture
def trusted(signed: tuple[Provider, WorkerProcess]) -> Iterator[Distribution]:
    # Rotation, step 1 on this caller (OLD signs, NEW accepted); step 2 on the provider (NEW signs, OLD
    # accepted). Step 3 drops OLD everywhere.
    app, distribution = caller(signed[0], TRUSTED, signing_keys=[OLD, NEW])
    yield distribution
    finalize(app)


def runs_of(provider: Provider, what: str) -> int:
    return sum(1 for run in provider.runs() if run.startswith(f"{what}:"))


def test_signed_calls_are_served_during_a_key_rotation(
    signed: tuple[Provider, WorkerProcess], trusted: Distribution
) -> None:
    provider, _ = signed
    assert trusted.remote_service(provider.key, "probe", ["get"]).get(1, {})["id"] == 1
    app, rotated = caller(provider, TRUSTED, signing_keys=[NEW, OLD])
    try:
        assert rotated.remote_service(provider.key, "probe", ["get"]).get(2, {})["id"] == 2
        # The health task is signed too.
        health = rotated.transport.request(health_task_name(provider.key), provider.key, {}, time.time() + 8)
        assert health["probe"] is True
    finally:
        finalize(app)


@pytest.mark.parametrize("forged", [False, True], ids=["unsigned", "forged"])
def test_unsigned_and_forged_calls_are_refused_before_they_run(
    signed: tuple[Provider, WorkerProcess], forged: bool
) -> None:
    provider, _ = signed
    # The forger signs with a secret the provider does not know (and can check the provider's reply).
    options = {"signing_keys": {"*": ["a-secret-nobody-shares-000"], provider.key: [NEW]}} if forged else {}
    app, distribution = caller(provider, TRUSTED, **options)
    tag = os.urandom(4).hex()
    try:
        with pytest.raises(NotAuthenticated) as refused:
            distribution.remote_service(provider.key, "probe", ["get"]).get(tag, {})
        assert refused.value.code == 401
        assert set(refused.value.data) == {"call_id"}  # the reason is in the provider's log, not here
    finally:
        finalize(app)
    assert runs_of(provider, f"get-{tag}") == 0


def test_a_plain_celery_client_cannot_call_a_signing_provider(
    signed: tuple[Provider, WorkerProcess],
) -> None:
    provider, _ = signed
    plain = Celery(broker=provider.broker, backend=provider.backend, set_as_current=False)
    tag = os.urandom(4).hex()
    try:
        result = plain.send_task(f"{provider.key}.probe.get", kwargs={"id": tag}, queue=provider.key)
        with pytest.raises(Exception) as refused:
            result.get(timeout=10)
        assert type(refused.value).__name__ == "NotAuthenticated"
        result.forget()
    finally:
        plain.close()
    assert runs_of(provider, f"get-{tag}") == 0


def test_a_tampered_call_is_refused(
    signed: tuple[Provider, WorkerProcess], trusted: Distribution, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, _ = signed
    signer = trusted.signer
    assert signer is not None
    real = signer.sign_call
    # The signature of other arguments: what a broker-writer changing a call in flight would send.
    monkeypatch.setattr(
        signer,
        "sign_call",
        lambda name, call_id, deadline, kwargs: real(
            name, call_id, deadline, {**kwargs, "id": "what-was-signed"}
        ),
    )
    tag = os.urandom(4).hex()
    with pytest.raises(NotAuthenticated):
        trusted.remote_service(provider.key, "probe", ["get"]).get(tag, {})
    assert runs_of(provider, f"get-{tag}") == 0


def test_a_replayed_call_is_refused_and_does_not_answer(
    signed: tuple[Provider, WorkerProcess], trusted: Distribution, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, worker = signed
    sent: list[Call] = []
    transport = trusted.transport
    send = transport.send

    def remember(call: Call) -> Any:
        sent.append(call)
        return send(call)

    monkeypatch.setattr(transport, "send", remember)
    tag = os.urandom(4).hex()
    assert trusted.remote_service(provider.key, "probe", ["get"]).get(tag, {})["id"] == tag
    call = sent[0]
    call_id = call.call_id
    # The same call id, headers and signature once more, as an eavesdropper on the broker could send it.
    if transport._queue_store is not None:
        transport._queue_store.lpush(transport.queue_key(call.key), transport.encode(call))
    else:
        transport._publish(call)
    wait_for(
        lambda: any(call_id in line and "replayed" in line for line in worker.log().splitlines()),
        timeout=10,
        what="the provider refuses the replay",
    )
    assert runs_of(provider, f"get-{tag}") == 1
    store = redis.Redis.from_url(provider.backend)
    assert store.llen(reply_key("celery_services", call_id)) == 0  # the caller had its one reply


def test_a_reply_not_signed_by_the_provider_key_is_refused(signed: tuple[Provider, WorkerProcess]) -> None:
    provider, _ = signed
    # This caller holds its own key's secret, but believes the provider signs with another one.
    app, distribution = caller(
        provider, TRUSTED, signing_keys={"*": [OLD], provider.key: ["not-the-provider-secret-01"]}
    )
    try:
        with pytest.raises(BadGateway):
            distribution.remote_service(provider.key, "probe", ["get"]).get(1, {})
    finally:
        finalize(app)


def test_allow_callers_refuses_other_keys_and_methods(signed: tuple[Provider, WorkerProcess]) -> None:
    provider, _ = signed
    opened = []
    try:
        for key in (READER, f"unlisted-{SUFFIX}"):
            app, distribution = caller(provider, key, signing_keys=[NEW])
            opened.append(app)
            probe = distribution.remote_service(provider.key, "probe", ["get", "find"])
            articles = distribution.remote_service(provider.key, "articles", ["find"])
            if key == READER:
                assert probe.get(3, {})["id"] == 3
            else:
                with pytest.raises(Forbidden):
                    probe.get(3, {})
            with pytest.raises(Forbidden) as refused:
                probe.find({})
            assert refused.value.code == 403
            assert refused.value.data == {"caller": key, "method": "probe.find"}
            with pytest.raises(Forbidden):
                articles.find({})
    finally:
        for app in opened:
            finalize(app)


def test_only_listed_headers_travel_and_credentials_only_with_authentication() -> None:
    headers = {
        "Authorization": "Bearer t",
        "X-Api-Key": "k",
        "Cookie": "sid=s",
        "X-Request-Id": "r",
        "X-Other": "o",
    }
    plain = DistributionSettings(key="gw")
    sent = safe_params({"headers": headers}, authentication=False, headers=plain.resolved_forwarded_headers())
    assert sent == {"headers": {"X-Request-Id": "r"}}
    # A credential listed by mistake still stays home without authentication.
    assert safe_params({"headers": headers}, authentication=False, headers={"x-api-key"}) == {}
    auth = DistributionSettings(key="gw", authentication=True)
    sent = safe_params({"headers": headers}, authentication=True, headers=auth.resolved_forwarded_headers())
    assert sent == {"headers": {"Authorization": "Bearer t", "X-Request-Id": "r"}}  # what auth needs only
    with pytest.raises(ValueError, match="credential headers"):
        DistributionSettings(key="gw", forwarded_headers=["x-api-key"])
    with pytest.raises(ValueError, match="at least 16"):
        DistributionSettings(key="gw", signing_keys=["short"])
    assert "old-secret" not in repr(DistributionSettings(key="gw", signing_keys=[OLD]))
