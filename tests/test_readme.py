"""Every ```python block of README.md runs as written, against real workers.

The blocks are read from README.md when the tests run, so a change of the README's API that the code does
not follow (or the other way round) fails here. The README presents them as fragments of programs:

- the **provider** block, ``workers/articles.py`` "in twenty lines": a module a worker runs. It is run as
  a real worker (``celery -A <module> worker -Q my-app``), and serves the consumer block below;
- the **consumer** block, ``workers/gateway.py`` "in another process": a program, run in a subprocess
  against a worker of the real ``workers/articles.py`` and against a worker of the provider block;
- the **Payments** block (Delivery): a service class, served by a real worker and called through a proxy.

Stubs the blocks need and the README implies without showing (kept minimal, each explained where it is
defined): the provider block uses ``Articles`` (defined in ``workers/services.py``, which the real
``workers/articles.py`` imports); the consumer block uses ``App`` and ``distribute`` without importing them
(it continues the provider's imports "in another process"); the Payments block uses ``Service`` without
importing it, and ``charge(...)`` and ``self.ledger`` that it never defines.

Everything runs on a ``redis-server`` of the test's own (broker, backend and registry), with a registry
prefix of its own, from the project's directory (where ``config/default.toml`` is, as for the README's
``celery-services worker workers.articles:app``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_services import App, DistributionSettings, distribute, finalize
from celery_services.testing import RedisServer, WorkerProcess

from .support import ROOT

README = ROOT / "README.md"

#: The provider block names ``Articles``, the example service that workers/articles.py imports from
#: workers/services.py: the README's "workers/articles.py" with that import.
PROVIDER_PREAMBLE = """\
from workers.services import Articles  # stub: the example service the README's provider module uses
"""

#: The consumer block is "a consumer in another process": it uses App and distribute, which the provider
#: block imported, without importing them itself.
CONSUMER_PREAMBLE = """\
from celery_services import App, distribute  # stub: the imports the README shows in the provider block
"""

#: The Payments block uses ``Service`` without importing it, and ``charge(data)`` and ``self.ledger``
#: (a store with ``get(key)`` / ``set(key, value)``) without defining them. Both stubs keep their state in
#: Redis, so that the test sees what a worker did.
PAYMENTS_PREAMBLE = """\
import json
import os
import uuid

import redis

from celery_services import App, Service, distribute

_store = redis.Redis.from_url(os.environ["CELERY_SERVICES_BROKER_URL"])


def charge(data):  # stub: the payment provider's call; records every charge
    receipt = {"receipt": uuid.uuid4().hex, "amount": data["amount"]}
    _store.rpush(os.environ["README_CHARGES_KEY"], json.dumps(receipt))
    return receipt


class Ledger:  # stub: what `self.ledger` is, a store of receipts by idempotency key
    def __init__(self, name):
        self.name = name

    def get(self, key):
        raw = _store.hget(self.name, key)
        return None if raw is None else json.loads(raw)

    def set(self, key, value):
        _store.hset(self.name, key, json.dumps(value))
"""

#: How the Payments class is served: mounted on an app distributed under a key of the test's own.
PAYMENTS_SERVED = """
payments = Payments()
payments.ledger = Ledger(os.environ["README_LEDGER_KEY"])
api = App()
api.use("payments", payments)
distribution = distribute(api, key=os.environ["README_PAYMENTS_KEY"], services=["payments"])
app = distribution.celery
"""

#: Runs the consumer program (``argv[1]``) in this process, then reports to ``argv[2]`` (JSON): what it
#: printed, the service error its last line raised, and what it left behind. ``print`` is the program's
#: own (it prints as usual) recorded on the way, so that the harness can wait for the event listener's
#: line: the event arrives on the bus's thread after the block's last line.
HARNESS = """\
import json
import sys

from celery_services import ServiceError, finalize
from celery_services.testing import wait_for

program, report = sys.argv[1], sys.argv[2]
printed = []


def recording_print(*args, sep=" ", end="\\n", **kwargs):
    printed.append(sep.join(str(a) for a in args))
    print(*args, sep=sep, end=end, flush=True, **kwargs)


namespace = {"__name__": "__main__", "print": recording_print}
outcome = {"raised": None, "printed": printed}
try:
    try:
        exec(compile(open(program).read(), "README.md consumer block", "exec"), namespace)
    except ServiceError as exc:
        outcome["raised"] = exc.to_dict()
    outcome["article"] = namespace.get("article")
    wait_for(lambda: any(p.startswith("created ") for p in printed), 15, what="the created event printed")
    outcome["published"] = namespace["articles"].get(namespace["article"]["id"])
finally:
    if namespace.get("api") is not None:
        finalize(namespace["api"])
    with open(report, "w") as out:
        json.dump(outcome, out)
"""


def python_blocks() -> dict[str, str]:
    """The README's ```python blocks by role; fails when one is added, removed or cannot be told apart."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    roles: dict[str, str] = {}
    for block in blocks:
        if "asyncio.run(" in block:
            role = "async"  # the Async section's program: run by tests/test_async_readme.py
        elif "class Payments(" in block:
            role = "payments"
        elif "remote_services=" in block:
            role = "consumer"
        elif "distribute(api, key=" in block:
            role = "provider"
        else:
            raise AssertionError(f"a README python block this test does not know how to run:\n{block}")
        assert role not in roles, f"two README blocks look like the {role} block"
        roles[role] = block
    assert sorted(roles) == ["async", "consumer", "payments", "provider"], sorted(roles)
    return roles


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as private:
        yield private


@pytest.fixture
def env(server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of the README's processes: the private Redis, a registry prefix of the test's own,
    generated modules importable, and no CELERY_SERVICES_* of this process leaking in."""
    monkeypatch.chdir(ROOT)  # workers inherit it: config/default.toml, as the README's commands run
    for name in [n for n in os.environ if n.startswith("CELERY_SERVICES_")]:
        monkeypatch.delenv(name)
    return {
        "CELERY_SERVICES_BROKER_URL": server.url,
        "CELERY_SERVICES_REGISTRY_PREFIX": f"cs-readme-{uuid.uuid4().hex[:8]}",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }


def module(tmp_path: Path, label: str, source: str) -> str:
    """Write ``source`` as an importable module in ``tmp_path``; returns its name."""
    name = f"readme_{label}_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source)
    return name


def run_consumer(env: dict[str, str], tmp_path: Path) -> tuple[dict[str, Any], str]:
    program, harness, report = tmp_path / "consumer.py", tmp_path / "harness.py", tmp_path / "report.json"
    program.write_text(CONSUMER_PREAMBLE + python_blocks()["consumer"])
    harness.write_text(HARNESS)
    done = subprocess.run(
        [sys.executable, str(harness), str(program), str(report)],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert report.exists(), f"the consumer program failed:\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return json.loads(report.read_text()), done.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("provider", ["workers/articles.py", "README provider block"])
def test_readme_consumer_block_runs_against_a_real_provider(
    provider: str, env: dict[str, str], tmp_path: Path
) -> None:
    if provider == "workers/articles.py":
        target = "workers.articles"
    else:
        target = module(tmp_path, "provider", PROVIDER_PREAMBLE + python_blocks()["provider"])
    # Plainly `celery -A <module> worker -Q my-app`, as the README says its workers can be run.
    with WorkerProcess(target, "my-app", env=env):
        outcome, stdout = run_consumer(env, tmp_path)

    printed = outcome["printed"]
    assert printed[0] == "remote service ready: articles", printed  # the `service` listener
    article = outcome["article"]
    assert article == {"title": "Hello", "id": article["id"]} and isinstance(article["id"], int)
    assert f"created {article}" in printed  # the listener on the proxy heard the provider's event
    assert outcome["published"] == {**article, "published": True}  # publish_article ran remotely
    # The last line: `articles.get(999)  # raises NotFound (404), message and data intact`.
    raised = outcome["raised"]
    assert (raised["name"], raised["code"]) == ("NotFound", 404), raised
    assert raised["message"] == "No record found for id '999'"
    assert stdout.splitlines()[: len(printed)] == printed  # the program's own prints went out too


@pytest.mark.timeout(120)
def test_readme_payments_block_serves_calls_and_is_idempotent_by_call_id(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: RedisServer
) -> None:
    block = python_blocks()["payments"]
    token = uuid.uuid4().hex[:8]
    env = {
        **env,
        "README_PAYMENTS_KEY": f"payments-{token}",
        "README_CHARGES_KEY": f"readme-charges-{token}",
        "README_LEDGER_KEY": f"readme-ledger-{token}",
    }
    store = redis.Redis.from_url(server.url)

    # Served by a real worker and called through a proxy: the block's create runs with the call's params.
    target = module(tmp_path, "payments", PAYMENTS_PREAMBLE + block + PAYMENTS_SERVED)
    with WorkerProcess(target, env["README_PAYMENTS_KEY"], env=env):
        app = App()
        distribute(
            app,
            DistributionSettings(
                key=f"readme-caller-{token}",
                broker_url=server.url,
                registry_prefix=env["CELERY_SERVICES_REGISTRY_PREFIX"],
                services=[],
                remote_services=[env["README_PAYMENTS_KEY"]],
                timeout=10,
            ),
        )
        try:
            assert app.distribution is not None
            payments = app.distribution.wait_for("payments", timeout=15)
            receipt = payments.create({"request_id": "r-1", "amount": 5})
        finally:
            finalize(app)
    charges = [json.loads(c) for c in store.lrange(env["README_CHARGES_KEY"], 0, -1)]
    assert charges == [receipt] and receipt["amount"] == 5
    ledger = {k.decode(): json.loads(v) for k, v in store.hgetall(env["README_LEDGER_KEY"]).items()}
    [(key, kept)] = ledger.items()
    assert kept == receipt
    assert str(uuid.UUID(key)) == key  # keyed by the call id the provider gave the call, not request_id

    # The block's logic on its own: the same call id (a redelivery) charges once and answers the same.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    namespace: dict[str, Any] = {"__name__": f"readme_payments_{token}"}
    exec(compile(PAYMENTS_PREAMBLE + block, "README.md Payments block", "exec"), namespace)
    local = namespace["Payments"]()
    local.ledger = namespace["Ledger"](f"{env['README_LEDGER_KEY']}-local")
    first = local.create({"request_id": "r-2", "amount": 7}, {"call_id": "call-1", "redelivered": False})
    again = local.create({"request_id": "r-2", "amount": 7}, {"call_id": "call-1", "redelivered": True})
    assert again == first
    by_request = local.create({"request_id": "r-3", "amount": 9}, {})  # no call id: the request id
    assert local.create({"request_id": "r-3", "amount": 9}, {}) == by_request
    assert len(store.lrange(env["README_CHARGES_KEY"], 0, -1)) == 3  # 1 remote + 2 local, no double charge
    namespace["_store"].close()
    store.close()
