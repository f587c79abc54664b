"""Beyond one Redis: a Sentinel failover under load, and calls, manifests and events over TLS.

Real processes of the test's own on loopback ports (:mod:`tests.faults.brokers`): Redis servers, a Sentinel
(``redis-server --sentinel``), ``celery worker`` processes of ``tests.apps.provider``, and a consumer app in
this process. Each provider records its runs on a plain Redis of its own (``TEST_REPLY_STORE``), outside the
topology under test, so that the record survives the failover.

- ``test_sentinel_failover_under_load``: broker, result backend and registry on ``sentinel://`` URLs; two
  threads call ``probe.get`` while ``SENTINEL FAILOVER`` promotes the replica. Calls fail only typed
  (``Unavailable`` / ``Timeout``), succeed again within 5 s of the new master being named (and so do an
  event loop's, through the asyncio transport's own pool), and again within
  5 s of the old master being turned into a replica (about 10 s later: until then it is a second, writable
  master, and the library's Redis clients must already have left it); no call that returned a result is
  missing from the provider's run log; a provider started after the failover is discovered and called; an
  event published after the failover reaches the consumer.
- ``test_tls``: a Redis with a TLS port and a CA made by the test: a call, a manifest and an event over
  ``rediss://`` with ``tls_ca_file``; every connection of the consumer is on the TLS port; a wrong CA fails
  ``distribute()`` at once with a connection error naming the certificate check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_services import App, DistributionSettings, distribute
from celery_services.distribution.redis_clients import RedisOptions, redis_client, sentinel_nodes
from celery_services.testing import wait_for

from ..support import Provider, provider_env
from .brokers import (
    HEARTBEAT,
    Consumer,
    Load,
    RedisServer,
    SentinelGroup,
    first_success_after,
    free_port,
    overran,
    running,
    summary,
    tls_files,
    untyped,
)

CALL_TIMEOUT = 2.0
SLACK = 2.0
RECOVERY = 5.0  # the promise: calls work again within this many seconds of the switch


def provider(url: str, runlog: str, prefix: str, key: str, **extra: str) -> Provider:
    """A provider key on ``url`` (broker, results, registry) its runs logged on the plain Redis ``runlog``."""
    runs = f"test-runs:{key}"
    env = provider_env(
        key,
        url,
        url,
        runs,
        CELERY_SERVICES_REGISTRY_PREFIX=prefix,
        CELERY_SERVICES_HEARTBEAT_INTERVAL=str(HEARTBEAT),
        TEST_REPLY_STORE=runlog,
        **extra,
    )
    return Provider(key, url, runlog, runs, env)  # runs() reads the run log


def by_key(info: Any) -> str:
    return f"{info.key}/{info.path}"


def report(label: str, **values: Any) -> None:
    print(
        f"\n[{label}] "
        + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    )


def subscribers(server: RedisServer, channel: str) -> int:
    client = server.client(socket_timeout=1)
    try:
        return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
    finally:
        client.close()


def heard(consumer: Consumer, path: str, article: Any, timeout: float) -> bool:
    try:
        wait_for(lambda: article in consumer.heard_of(path, "created"), timeout, what="event heard")
        return True
    except TimeoutError:
        return False


@pytest.mark.timeout(120)
def test_sentinel_failover_under_load() -> None:
    label, prefix = f"sent{os.urandom(3).hex()}", f"cs-fault-{os.urandom(4).hex()}"
    with SentinelGroup() as group, RedisServer() as runlog:
        url, master = group.url, group.name
        first = provider(url, runlog.url, prefix, f"{label}-a", CELERY_SERVICES_SENTINEL_MASTER=master)
        later = provider(url, runlog.url, prefix, f"{label}-b", CELERY_SERVICES_SENTINEL_MASTER=master)
        loop = asyncio.new_event_loop()
        with first.worker():
            consumer = Consumer(
                url,
                url,
                prefix,
                f"{label}-*",
                timeout=CALL_TIMEOUT,
                sentinel_master=master,
                remote_service_path=by_key,
            )
            try:
                probe = consumer.distribution.wait_for(f"{first.key}/probe", timeout=10)
                articles = consumer.distribution.wait_for(f"{first.key}/articles", timeout=10)
                assert probe.get("warm-up")["id"] == "warm-up"
                # An event loop whose asyncio transport holds a connection to the master from before.
                assert loop.run_until_complete(probe.aio.get("warm-up-async"))["id"] == "warm-up-async"
                before = articles.create({"title": "before"})
                assert heard(consumer, f"{first.key}/articles", before, 10)
                load = Load(
                    lambda i: probe.get(i, {"timeout": CALL_TIMEOUT}), threads=2, timeout=CALL_TIMEOUT
                )
                with running(load, slack=SLACK):
                    load.wait_calls(20, timeout=15)
                    old = group.master()
                    switched = time.monotonic()
                    group.failover()
                    named = time.monotonic()
                    _, errors_named = first_success_after(
                        lambda: probe.get("after-named", {"timeout": 1.0}), named + RECOVERY
                    )
                    back_named = time.monotonic()
                    # The asyncio transport (another pool, held by its event loop) follows within the
                    # bound too, though the old master stays writable until Sentinel demotes it.
                    _, errors_async = first_success_after(
                        lambda: loop.run_until_complete(probe.aio.get("after-named-async", {"timeout": 1.0})),
                        named + RECOVERY,
                    )
                    back_async = time.monotonic()
                    # The registry watchers (the consumer's and the provider's) resubscribed on the new
                    # master, within the bound, long before the old one drops its clients.
                    new = group.master()
                    wait_for(
                        lambda: subscribers(new, f"{prefix}:registry") >= 2,
                        named + RECOVERY - time.monotonic(),
                        interval=0.05,
                        what="registry watchers subscribed on the new master",
                    )
                    resubscribed = time.monotonic()
                    # Sentinel turns the old master into a replica (dropping its clients) ~10 s later.
                    wait_for(lambda: group.role(old) == "slave", 30, interval=0.05, what="old master demoted")
                    demoted = time.monotonic()
                    _, errors_demoted = first_success_after(
                        lambda: probe.get("after-demoted", {"timeout": 1.0}), demoted + RECOVERY
                    )
                    recovered = time.monotonic()
                    load.wait_calls(30, timeout=20)
                outcomes = load.snapshot()

                assert not untyped(outcomes), untyped(outcomes)
                assert not overran(outcomes, SLACK), overran(outcomes, SLACK)
                assert all(o.ok for o in outcomes if o.ended < switched), summary(outcomes)
                after = [o for o in outcomes if o.started >= recovered]
                assert len(after) >= 20 and all(o.ok for o in after), [str(o) for o in after if not o.ok]
                # Nothing acknowledged is lost: every call that returned a result ran, as the run log says.
                ran = {entry.rsplit(":", 1)[0] for entry in first.runs()}
                answered = {f"get-{o.result['id']}" for o in outcomes if o.ok}
                assert answered <= ran, sorted(answered - ran)[:5]

                # Discovery follows the new master: a provider registering now is mounted and called.
                with later.worker():
                    fresh = consumer.distribution.wait_for(f"{later.key}/probe", timeout=10)
                    assert fresh.get("fresh", {"timeout": CALL_TIMEOUT})["id"] == "fresh"
                # Events follow it too: one published now reaches the consumer's listener.
                article = articles.create({"title": "after"}, {"timeout": CALL_TIMEOUT})
                assert heard(consumer, f"{first.key}/articles", article, 10)
                assert all(consumer.thread_health().values()), consumer.thread_health()
                failed = [o for o in outcomes if not o.ok]
                report(
                    "sentinel failover",
                    load=summary(outcomes),
                    failed=summary(failed),
                    failover_named_after_s=named - switched,
                    first_success_after_named_s=back_named - named,
                    first_async_success_after_named_s=back_async - named,
                    watchers_resubscribed_after_named_s=resubscribed - named,
                    old_master_demoted_after_named_s=demoted - named,
                    first_success_after_demoted_s=recovered - demoted,
                    errors_while_recovering=len(errors_named) + len(errors_async) + len(errors_demoted),
                )
            finally:
                consumer.close()
                loop.close()


def test_clients_of_each_url_kind_have_explicit_timeouts() -> None:
    url = "sentinel://:pw@127.0.0.1:26379;sentinel://127.0.0.1:26380/3"
    assert sentinel_nodes(url) == ([("127.0.0.1", 26379), ("127.0.0.1", 26380)], 3, None, "pw")
    with pytest.raises(ValueError, match="sentinel_master"):
        redis_client(url, socket_timeout=1.5, socket_connect_timeout=0.5)
    client = redis_client(url, RedisOptions("m"), socket_timeout=1.5, socket_connect_timeout=0.5)
    sentinel_manager: Any = getattr(client.connection_pool, "sentinel_manager")  # noqa: B009
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"], kwargs["db"]) == (1.5, 0.5, 3)
    assert kwargs["password"] == "pw"
    assert sentinel_manager.sentinel_kwargs == {"socket_timeout": 1.5, "socket_connect_timeout": 0.5}
    client.close()
    tls = redis_client(
        "rediss://127.0.0.1:6380/0",
        RedisOptions(tls_ca_file="/ca"),
        socket_timeout=1,
        socket_connect_timeout=1,
    )
    kwargs = tls.connection_pool.connection_kwargs
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"]) == ("/ca", "required")
    tls.close()


def tls_server(directory: Path) -> tuple[RedisServer, int, Any]:
    files = tls_files(directory)
    port = free_port()
    server = RedisServer(
        args=[
            "--tls-port", str(port), "--tls-cert-file", str(files.cert), "--tls-key-file", str(files.key),
            "--tls-ca-cert-file", str(files.ca), "--tls-auth-clients", "no",
        ]
    )  # fmt: skip
    return server, port, files


@pytest.mark.timeout(60)
def test_tls(tmp_path: Path) -> None:
    server, port, files = tls_server(tmp_path)
    prefix = f"cs-fault-{os.urandom(4).hex()}"
    with server:
        url = f"rediss://127.0.0.1:{port}/0"
        prov = provider(
            url, server.url, prefix, f"tls{os.urandom(3).hex()}", CELERY_SERVICES_TLS_CA_FILE=str(files.ca)
        )
        with prov.worker():
            consumer = Consumer(url, url, prefix, prov.key, tls_ca_file=str(files.ca))
            try:
                probe = consumer.distribution.wait_for("probe", timeout=10)
                articles = consumer.distribution.wait_for("articles", timeout=10)
                assert probe.get("over-tls", {"timeout": 5})["id"] == "over-tls"
                assert any(entry.startswith("get-over-tls:") for entry in prov.runs())
                article = articles.create({"title": "tls"}, {"timeout": 5})
                assert heard(consumer, "articles", article, 10)
                admin = server.client()  # the plain port: the test's own look at the server
                try:
                    assert admin.keys(f"{prefix}:manifest:{prov.key}:*")  # the provider's manifest
                    names = {f"{prefix}:registry", f"{prefix}:registry-watch"}
                    listed: Any = admin.client_list()
                    registry = [c for c in listed if c.get("name") in names]
                    assert registry and all(c["laddr"].endswith(f":{port}") for c in registry), registry
                finally:
                    admin.close()
            finally:
                consumer.close()

        # A CA that did not sign the server's certificate: refused at start, at once, saying why.
        started = time.monotonic()
        settings = DistributionSettings(
            key=f"wrongca-{os.urandom(3).hex()}",
            broker_url=url,
            registry_prefix=prefix,
            tls_ca_file=str(files.wrong_ca),
            services=[],
        )
        app = App()
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            distribute(app, settings)
        took = time.monotonic() - started
        assert took < 10, took
        assert app.distribution is None
        report("tls", wrong_ca_refused_after_s=took)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("topology", ["sentinel", "tls"])
def test_cli_events_follows_on_a_sentinel_or_tls_broker(topology: str, tmp_path: Path) -> None:
    # `celery-services events` made its bus of the broker URL alone: on a Sentinel broker kombu refused it
    # ("'master_name' transport option must be specified", reported as a bad KEY --path --event, exit 2),
    # and over TLS it dropped the CA (found by a review). It follows an event there as the apps do.
    from typer.testing import CliRunner

    from celery_services.cli import app as cli
    from celery_services.distribution.events import EventBus

    prefix, key = f"cs-fault-{os.urandom(4).hex()}", f"clievents{os.urandom(3).hex()}"
    with contextlib.ExitStack() as stack:
        if topology == "sentinel":
            group = stack.enter_context(SentinelGroup())
            url, extra = group.url, {"CELERY_SERVICES_SENTINEL_MASTER": group.name}
            bus_options: dict[str, Any] = {"transport_options": {"master_name": group.name}}
        else:
            server, port, files = tls_server(tmp_path)
            stack.enter_context(server)
            url, extra = f"rediss://127.0.0.1:{port}/0", {"CELERY_SERVICES_TLS_CA_FILE": str(files.ca)}
            bus_options = {"ssl": {"ssl_ca_certs": str(files.ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}}
        publisher = EventBus(url, **bus_options)
        stack.callback(publisher.close)
        done = threading.Event()

        def publish() -> None:  # until the follower has heard one, whenever it starts listening
            n = 0
            while not done.wait(0.05):
                publisher.publish(key, "articles", "created", {"n": n})
                n += 1

        thread = threading.Thread(target=publish, name="publisher")
        thread.start()
        stack.callback(thread.join, 10)
        stack.callback(done.set)
        env = {
            "CELERY_SERVICES_BROKER_URL": url,
            "CELERY_SERVICES_RESULT_BACKEND": url,
            "CELERY_SERVICES_REGISTRY_PREFIX": prefix,
            **extra,
        }
        args = ["events", key, "--path", "articles", "--event", "created", "--count", "1", "--timeout", "20"]
        result = CliRunner().invoke(cli, args, env=env)
        assert result.exit_code == 0, result.output
        assert f"{key} articles created" in result.stdout
