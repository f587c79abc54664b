"""The guided demo (``celery-services demo``, ``make demo``): one app's services used by another, over Celery.

It runs the project's examples as they are deployed: provider replicas of ``my-app`` (``workers/articles.py``,
started with ``celery-services worker``) and the consumer ``gateway`` (``config/gateway.toml``, mounted in
this process), then shows discovery, calls, errors, events, a replica killed and the health check.

Without ``CELERY_SERVICES_BROKER_URL`` it starts an embedded Redis and stops it at the end. On a broker of
yours it keeps to a registry prefix and event exchange of its own, refuses to start beside a live ``my-app``,
and removes what it created (its registry and reply keys, the ``my-app`` queue and bindings, its workers'
control bindings) whatever happens, Ctrl-C included.

One piece, past 300 lines: a script of numbered steps told in order, which reads best as one file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.markup import escape

from ..core.app import App
from ..core.errors import NotFound, ServiceError
from ..core.service import ServiceWrapper
from ..distribution import Distribution, distribute, finalize
from ..distribution.settings import DistributionSettings
from ..testing import EmbeddedRedis, WorkerProcess

__all__ = ["Demo", "project_root", "run"]

PROVIDER = "my-app"
CONSUMER = "gateway"
EVENTS = ("created", "updated", "patched", "removed", "article_published")
HEARTBEAT = 1.0  # seconds: a killed replica leaves the registry within 2.5 heartbeats
CALL_TIMEOUT = 8.0  # also sets the visibility timeout that gives a killed replica's call to another one
CALLS_AFTER_KILL = 20
#: Binding tables of kombu's Redis transport, per exchange.
_BINDINGS = ("_kombu.binding", "_kombu.binding_permanent")
#: Exchanges every worker binds a queue of its own to (remote control, events).
_CONTROL_EXCHANGES = ("celery.pidbox", "celeryev")
_TASK_ID = re.compile(rf"Task {re.escape(PROVIDER)}\.[\w.]+\[([0-9a-f-]+)\]")
_SERVED = re.compile(rf"Task {re.escape(PROVIDER)}\.articles\.\w+\[[^\]]+\] (?:succeeded|raised)")


def project_root() -> Path:
    """The directory holding ``workers/`` and ``config/`` (the current one, else the package's checkout).

    Raises:
        FileNotFoundError: Neither holds the examples.
    """
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[2]):  # the checkout of an editable install
        if (candidate / "workers" / "articles.py").is_file() and (
            candidate / "config" / "gateway.toml"
        ).is_file():
            return candidate
    raise FileNotFoundError(
        "the demo runs the example apps of the project's repository (workers/ and config/), which a wheel "
        "does not carry: run it from a checkout of celery-services (git clone, then `make demo` or "
        "`pip install -e '.[http]' && celery-services demo` in it)"
    )


class Demo:
    """One run of the demo on a broker; :meth:`close` leaves the broker as it was.

    Args:
        console: Where the transcript goes.
        broker_url: A Redis broker (the demo's registry and replies live there too).
        root: The project root (see :func:`project_root`).
    """

    def __init__(self, console: Console, broker_url: str, root: Path) -> None:
        self.console = console
        self.broker_url = broker_url
        self.root = root
        if str(root) not in sys.path:  # the gateway here uses the examples' listener (workers/services.py)
            sys.path.insert(0, str(root))
        token = uuid.uuid4().hex[:8]
        self.prefix = f"celery_services.demo-{token}"
        self.exchange = f"{self.prefix}.events"
        self.store = redis.Redis.from_url(broker_url, socket_connect_timeout=2, socket_timeout=5)
        self.replicas: list[WorkerProcess] = []
        self.nodes: list[str] = []  # the replicas' Celery node names
        self.task_ids: set[str] = set()  # the calls they served, whose results the demo removes
        self.gateway: App | None = None
        self.discovered = threading.Event()
        self.discovered_at = 0.0
        self.events: list[tuple[str, Any]] = []
        self.events_changed = threading.Condition()
        self._existing: set[str] | None = None  # broker keys found before the demo, once checked
        self._step = 0
        #: Keep the gateway up at the last step until Ctrl-C (``celery-services demo --serve``).
        self.keep_serving = False

    # -- transcript ----------------------------------------------------------------------------------------

    def step(self, title: str, *lines: str) -> None:
        """Print the next numbered step and its explanation."""
        self._step += 1
        self.console.print(f"\n[bold cyan]{self._step:>2}[/] [bold]{title}[/]")
        for line in lines:
            self.console.print(f"   [dim]{line}[/]")

    def say(self, line: str) -> None:
        """Print one line of the current step."""
        self.console.print(f"   {line}")

    def call(self, label: str, work: Callable[[], Any]) -> Any:
        """Run one call, print it with its result and latency, and return the result."""
        started = time.perf_counter()
        result = work()
        elapsed = (time.perf_counter() - started) * 1000
        self.say(f"{escape(label):<46} → {escape(json.dumps(result))} [dim]{elapsed:.1f} ms[/]")
        return result

    # -- parts -----------------------------------------------------------------------------------------------

    @property
    def distribution(self) -> Distribution:
        """The gateway's distribution."""
        assert self.gateway is not None and self.gateway.distribution is not None
        return self.gateway.distribution

    def start_gateway(self) -> App:
        """The example consumer (``workers/gateway.py``): ``config/gateway.toml`` on the demo's broker."""
        settings = DistributionSettings.load(
            self.root / "config" / "gateway.toml",
            key=CONSUMER,
            broker_url=self.broker_url,
            result_backend=self.broker_url,
            registry_prefix=self.prefix,
            events_exchange=self.exchange,
            heartbeat_interval=HEARTBEAT,
            timeout=CALL_TIMEOUT,
        )
        self.gateway = api = App()
        api.on("service", self._decorate)
        distribute(api, settings)
        return api

    def _decorate(self, service: ServiceWrapper) -> None:
        # workers/gateway.py's listener (the KDK's decorateDistributedService), plus listening.
        from workers.services import decorate

        if not getattr(service, "remote", False) or service.key != PROVIDER:
            return
        decorate(service)
        for event in EVENTS:
            service.on(event, lambda data, *_, event=event: self._on_event(event, data))
        if service.path == "articles" and not self.discovered.is_set():
            self.discovered_at = time.time()
            self.discovered.set()

    def _on_event(self, event: str, data: Any) -> None:
        with self.events_changed:
            self.events.append((event, data))
            self.events_changed.notify_all()

    def start_replica(self, number: int) -> WorkerProcess:
        """Start replica ``number`` of ``my-app`` with the CLI, as ``docker/compose.yml`` does."""
        name = f"{PROVIDER}-{number}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        command = [
            sys.executable, "-m", "celery_services.cli", "--log-level", "info",
            "worker", "workers.articles:app", "-P", "solo", "-c", "1", "-n", name,
            "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        path = os.environ.get("PYTHONPATH")
        env = {
            "CELERY_SERVICES_CONFIG": str(self.root / "config" / "default.toml"),
            "CELERY_SERVICES_KEY": PROVIDER,
            "CELERY_SERVICES_BROKER_URL": self.broker_url,
            "CELERY_SERVICES_RESULT_BACKEND": self.broker_url,
            "CELERY_SERVICES_REGISTRY_PREFIX": self.prefix,
            "CELERY_SERVICES_EVENTS_EXCHANGE": self.exchange,
            "CELERY_SERVICES_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "CELERY_SERVICES_TIMEOUT": str(CALL_TIMEOUT),
            "PYTHONPATH": os.pathsep.join([str(self.root), *([path] if path else [])]),
        }
        replica = WorkerProcess("workers.articles", PROVIDER, env=env, command=command)
        self.replicas.append(replica)
        self.nodes.append(name)
        return replica.start()

    def served(self, replica: WorkerProcess) -> int:
        """How many calls ``replica`` has served so far (the calls its log says ended)."""
        return len(_SERVED.findall(replica.log()))

    def instances(self) -> int:
        """Live instances of ``my-app``, as the gateway's registry view has them."""
        return len(self.distribution.registry.view.get(PROVIDER, {}))

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Poll ``predicate`` until true or ``timeout`` seconds passed; returns its last value."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # -- broker hygiene --------------------------------------------------------------------------------------

    def _owned_keys(self) -> list[str]:
        """Broker keys the demo may create outside its prefix: my-app's queue, bindings, exchange tables."""
        tables = [f"{kind}.{name}" for kind in _BINDINGS for name in (PROVIDER, self.exchange)]
        return [PROVIDER, *tables]

    def check_broker(self) -> None:
        """Refuse a broker where a ``my-app`` already works: its workers would take the demo's calls.

        Raises:
            RuntimeError: a ``my-app`` is live in the default registry, or its queue holds messages.
        """
        settings = DistributionSettings(broker_url=self.broker_url)
        pattern = f"{settings.registry_prefix}:manifest:{PROVIDER}:*"
        if next(iter(self.store.scan_iter(match=pattern, count=1000)), None) is not None:
            raise RuntimeError(f"a '{PROVIDER}' app is running on {self.broker_url}: stop it, or unset "
                               "CELERY_SERVICES_BROKER_URL to run the demo on an embedded Redis")  # fmt: skip
        if self.store.llen(PROVIDER):
            raise RuntimeError(f"the '{PROVIDER}' queue of {self.broker_url} holds messages: not touching it")
        pipe = self.store.pipeline(transaction=False)
        for name in self._owned_keys():
            pipe.exists(name)
        found = pipe.execute()
        self._existing = {name for name, there in zip(self._owned_keys(), found, strict=True) if there}

    def leftovers(self) -> list[str]:
        """Keys of the demo still on the broker: its prefix, its results, what it created outside them."""
        found = [key.decode() for key in self.store.scan_iter(match=f"{self.prefix}*", count=1000)]
        existing = self._existing or set()
        candidates = [name for name in self._owned_keys() if name not in existing]
        candidates += [f"celery-task-meta-{task_id}" for task_id in sorted(self.task_ids)]
        pipe = self.store.pipeline(transaction=False)
        for name in candidates:
            pipe.exists(name)
        return found + [name for name, there in zip(candidates, pipe.execute(), strict=True) if there]

    def clean_broker(self) -> None:
        """Delete the demo's keys, and its workers' entries in the control tables workers share."""
        if self._existing is None:
            return  # the broker was refused (or never reached): nothing of ours is there
        for table in (f"{kind}.{exchange}" for kind in _BINDINGS for exchange in _CONTROL_EXCHANGES):
            members = [m for m in self.store.smembers(table) if any(n.encode() in m for n in self.nodes)]
            if members:
                self.store.srem(table, *members)
        # kombu's sweep does the same later: a binding table that is gone needs no deadline.
        for exchange in _CONTROL_EXCHANGES:
            if not any(self.store.exists(f"{kind}.{exchange}") for kind in _BINDINGS):
                self.store.zrem("_kombu.binding_deadlines", exchange)
        leftovers = self.leftovers()
        if leftovers:
            self.store.delete(*leftovers)

    # -- the story -------------------------------------------------------------------------------------------

    def run(self, where: str) -> None:
        """Tell the story, step by step."""
        self.step("Broker", where)
        self.check_broker()

        self.step(
            f"The consumer app '{CONSUMER}' starts (config/gateway.toml)",
            f"It exposes nothing and uses the services of '{PROVIDER}' (remote_services = ['{PROVIDER}']).",
            "Its 'service' listener decorates each remote service as it appears (hooks, permissions).",
        )
        api = self.start_gateway()
        self.say(f"services mounted on {CONSUMER}: {sorted(api.services) or 'none yet'}")

        self.step(
            f"A replica of the provider '{PROVIDER}' starts (workers/articles.py)",
            "$ celery-services worker workers.articles:app -P solo   (a Celery worker of the queue 'my-app')",
        )
        started = time.time()
        first = self.start_replica(1)
        if not self.discovered.wait(CALL_TIMEOUT):
            raise RuntimeError("the gateway never discovered the articles service")
        manifest = self.distribution.registry.view[PROVIDER]
        announced = min(m.started_at for m in manifest.values())
        self.say(
            f"[green]✓[/] 'service' event on {CONSUMER}: articles mounted and decorated "
            f"{self.discovered_at - started:.2f} s after the replica process started, "
            f"{(self.discovered_at - announced) * 1000:.0f} ms after its manifest was published"
        )
        self.say(f"worker ready (pid {first.pid}); registry prefix: {self.prefix}")

        articles = api.service("articles")
        self.step("Calls through the proxy, as if the service were local: api.service('articles')")
        created = self.call('create({"title": "Celery"})', lambda: articles.create({"title": "Celery"}))
        first_id = created["id"]
        self.call('create({"title": "Redis"})', lambda: articles.create({"title": "Redis"}))
        self.call("find()", lambda: articles.find())
        self.call(f"get({first_id})", lambda: articles.get(first_id))
        self.call(f'patch({first_id}, {{"draft": true}})', lambda: articles.patch(first_id, {"draft": True}))
        self.call(
            f'update({first_id}, {{"title": "Celery 5"}})',
            lambda: articles.update(first_id, {"title": "Celery 5"}),
        )
        second_id = first_id + 1 if isinstance(first_id, int) else first_id
        self.call(f"remove({second_id})", lambda: articles.remove(second_id))

        self.step("A custom method: publish_article (it emits the custom event 'article_published')")
        self.call(
            f'publish_article({{"id": {first_id}}})', lambda: articles.publish_article({"id": first_id})
        )

        self.step("A typed error crosses the wire: the same class, code and message as on the provider")
        try:
            articles.get(999)
        except NotFound as exc:
            self.say(f"get(999) → [bold red]{exc.name}[/] {exc.code}: {escape(exc.message)}")
        else:
            raise RuntimeError("get(999) should have raised NotFound")

        self.step("Events reach the consumer's listeners: articles.on('created', ...) on the gateway")
        expected = 6  # created x2, patched, updated, removed, article_published
        with self.events_changed:
            self.events_changed.wait_for(lambda: len(self.events) >= expected, timeout=2.0)
            received = list(self.events)
        for event, data in received:
            self.say(f"[magenta]{event}[/] {escape(json.dumps(data, default=str))}")
        if not received:
            self.say("[yellow](events arrive once the event bus is wired)[/]")

        self.step(
            "Scale out: a second replica joins; replicas compete for the calls of the queue",
            "Each replica keeps its own in-memory store here: a real app would share a database.",
        )
        second = self.start_replica(2)
        self.wait(lambda: self.instances() == 2, CALL_TIMEOUT)
        self.console.print(_table(self.distribution, self.console.width))
        before = (self.served(first), self.served(second))
        for _ in range(10):
            articles.find({"query": {"$limit": 1}})
        self.wait(lambda: self.served(first) + self.served(second) >= sum(before) + 10, 2.0)
        self.say(
            f"10 calls: replica 1 served {self.served(first) - before[0]}, "
            f"replica 2 served {self.served(second) - before[1]}"
        )

        self.step(
            "Failover: replica 1 is killed (SIGKILL) and the calls go on",
            "Calls wait in the queue 'my-app', so the surviving replica serves them; no retry is needed.",
        )
        first.kill()
        killed = time.time()
        served_before = self.served(second)
        ok = 0
        started_calls = time.perf_counter()
        for _ in range(CALLS_AFTER_KILL):
            articles.find({"query": {"$limit": 1}})
            ok += 1
        elapsed = (time.perf_counter() - started_calls) * 1000
        self.wait(lambda: self.served(second) >= served_before + CALLS_AFTER_KILL, 2.0)
        self.say(
            f"[green]✓[/] {ok}/{CALLS_AFTER_KILL} calls succeeded after the kill in {elapsed:.0f} ms, "
            f"{self.served(second) - served_before} served by replica 2"
        )
        ttl = self.distribution.settings.resolved_registry_ttl()
        if self.wait(lambda: self.instances() == 1, ttl + 2):
            self.say(
                f"the registry dropped the killed replica {time.time() - killed:.1f} s after the kill "
                f"(its manifest lives {ttl:g} s without heartbeat); articles stays mounted on {CONSUMER}"
            )

        self.step("Health check of my-app (also: celery-services health my-app)")
        self.say(f"healthcheck('{PROVIDER}') → {json.dumps(self.distribution.healthcheck(PROVIDER))}")

        self.step(
            "The gateway over HTTP, for web clients (celery-services serve workers.gateway:api --port 8000)",
            "REST with Feathers' conventions, /events (Server-Sent Events), and a live page at /.",
        )
        self.serve(keep=self.keep_serving)

    def serve(self, keep: bool) -> None:
        """Serve the gateway app on a free port, read the articles through it; with ``keep``, until Ctrl-C."""
        import threading
        import urllib.request

        try:
            from ..http import make_server
        except ImportError as exc:
            missing = "the HTTP gateway needs the http extra: pip install 'celery-services[http]'"
            if keep:
                raise RuntimeError(f"{missing} ({exc})") from None
            self.say(f"[yellow]skipped: {missing}[/]")
            return

        assert self.gateway is not None
        server = make_server(self.gateway, port=0, log_level="warning")
        thread = threading.Thread(target=server.run, name="demo-http", daemon=True)
        thread.start()
        try:
            if not self.wait(lambda: server.started, 5.0):
                self.say("[yellow]the HTTP server did not start[/]")
                return
            port = server.servers[0].sockets[0].getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            create = urllib.request.Request(
                f"{url}/articles",
                data=json.dumps({"title": "Over HTTP"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(create, timeout=5) as response:
                created = json.loads(response.read())
            with urllib.request.urlopen(f"{url}/articles/{created['id']}", timeout=5) as response:
                body = response.read().decode()
            self.say(f"serving on {url}")
            self.say(f"POST {url}/articles → 201, then GET /articles/{created['id']} → {escape(body)}")
            if keep:
                self.say(
                    f"[bold]open {url}/ in a browser[/]: the live page follows the articles. Ctrl-C stops."
                )
                try:
                    while thread.is_alive():
                        thread.join(0.5)
                except KeyboardInterrupt:
                    self.say("stopping the gateway")
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    def close(self) -> list[str]:
        """Stop everything the demo started and remove what it left on the broker (idempotent).

        Returns:
            The keys of the demo still on the broker afterwards (none, unless it could not be reached).
        """
        if self.gateway is not None:
            finalize(self.gateway)
        for replica in self.replicas:
            replica.kill(signal.SIGTERM)  # a warm shutdown withdraws its manifest at once
            if replica.log_path.exists():
                self.task_ids.update(_TASK_ID.findall(replica.log()))
            replica.stop()
        try:
            self.clean_broker()
            return self.leftovers() if self._existing is not None else []
        except redis.RedisError as exc:
            self.console.print(f"   [red]could not clean the broker: {escape(str(exc))}[/]")
            return ["?"]
        finally:
            self.store.close()


def _table(distribution: Distribution, width: int) -> Any:
    from .registry import registry_table

    rows = distribution.registry.list()
    return registry_table(rows, title="   registry (celery-services services)", width=width)


@contextmanager
def _interrupted_by_sigterm() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so ``finally`` blocks stop the workers and the embedded Redis."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(console: Console | None = None, serve: bool = False) -> int:
    """Run the demo; returns the process exit code (0 when every step worked).

    Args:
        console: Where the transcript goes (default: stdout).
        serve: keep the gateway and its live page up at the last step until Ctrl-C (or SIGTERM).

    Returns:
        0, or 1 when a step failed, 130 when interrupted.
    """
    if console is None:
        # Wide enough for the calls and the registry table when the transcript goes to a file or a pipe.
        console = Console(highlight=False)
        if not console.is_terminal:
            console = Console(highlight=False, width=120)
    console.print("[bold]celery-services demo[/]: the services of one app, used by another over Celery")
    started = time.monotonic()
    embedded: EmbeddedRedis | None = None
    demo: Demo | None = None
    with _interrupted_by_sigterm():
        try:
            root = project_root()
            url = os.environ.get("CELERY_SERVICES_BROKER_URL")
            if url:
                if not url.startswith(("redis://", "rediss://")):
                    raise RuntimeError(
                        f"the demo keeps its registry and replies on its broker: {url} is not Redis"
                    )
                where = f"Your broker {url} (CELERY_SERVICES_BROKER_URL); the demo cleans up after itself."
            else:
                embedded = EmbeddedRedis()
                url = embedded.start().url
                where = (
                    f"Embedded Redis on {url} (CELERY_SERVICES_BROKER_URL is not set); it stops at the end."
                )
            demo = Demo(console, url, root)
            demo.keep_serving = serve
            demo.run(where)
        except KeyboardInterrupt:
            console.print("\n[yellow]interrupted: stopping everything[/]")
            return 130
        except (ServiceError, RuntimeError, OSError, redis.RedisError) as exc:
            console.print(f"\n[bold red]demo failed:[/] {escape(str(exc))}")
            return 1
        finally:
            if demo is not None:
                demo.step("Shutdown: gateway finalized, replicas stopped, broker cleaned")
                left = demo.close()
                alive = [r.pid for r in demo.replicas if r.process is not None and r.process.poll() is None]
                demo.say(f"left behind: {len(left)} keys, {len(alive)} processes")
            if embedded is not None:
                embedded.stop()
                console.print("   embedded Redis stopped")
    console.print(f"\n[bold green]Done[/] in {time.monotonic() - started:.1f} s.")
    return 0
