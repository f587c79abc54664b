"""Helpers of the fault-injection suite: private brokers to restart, a consumer app that records, a load.

- :class:`RedisServer` and :class:`PrivateRabbitMQ` run a broker process of the test's own, on free loopback
  ports (of this xdist worker's own range: tests/support.py), so that restarting it or killing its clients
  never disturbs anyone else's tests. They signal only the processes they started (by PID or by the process
  group they created), never a process found by name.
- :class:`RedisSentinel` and :class:`SentinelGroup` (a master, a replica and one Sentinel, quorum 1, fast to
  fail over), and :func:`tls_files` (a CA and a server certificate made for the test) run the Redis
  topologies of ``test_sentinel.py``.
- :class:`Consumer` is a real consumer app (``distribute(App(), ...)``) that records its ``service`` /
  ``service-removed`` events and the events its proxies hear.
- :class:`Load` makes a bounded number of calls from a few threads and records how each one ended.
- :class:`Cuttable` relays TCP to a broker and cuts its connections silently.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

from celery_services import (
    App,
    Distribution,
    DistributionSettings,
    ServiceError,
    Timeout,
    Unavailable,
    distribute,
    finalize,
)
from celery_services.testing import wait_for
from celery_services.testing.brokers import (
    BrokerProcess,
    BrokerUnavailable,
    RedisServer,
    _tail,
    _wait_exit,
)

from ..support import free_port

__all__ = [
    "EVENTS",
    "HEARTBEAT",
    "METHODS",
    "TYPED",
    "BrokerUnavailable",
    "Consumer",
    "Cuttable",
    "Load",
    "Outcome",
    "PrivateRabbitMQ",
    "RedisSentinel",
    "RedisServer",
    "SentinelGroup",
    "TLSFiles",
    "first_success_after",
    "free_port",
    "overran",
    "running",
    "summary",
    "threads_named",
    "tls_files",
    "untyped",
]

#: Heartbeat of every app in this suite: a dead instance leaves the registry within 3 of them.
HEARTBEAT = 0.5
#: Methods and events the consumers use (a proxy only offers what its consumer lists).
METHODS = ["find", "get", "create", "update", "patch", "remove", "slow"]
EVENTS = ["created"]
#: The only errors a call may end with when a broker, a connection or a replica fails under it.
TYPED = (Unavailable, Timeout)


def _rabbitmq_server() -> Path:
    """The real ``rabbitmq-server`` script (Debian's ``/usr/sbin`` one only switches to the rabbitmq user)."""
    candidates = [os.environ.get("CS_FAULT_RABBITMQ_SERVER", ""), "/usr/lib/rabbitmq/bin/rabbitmq-server"]
    candidates.append(shutil.which("rabbitmq-server") or "")
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            with contextlib.suppress(OSError):
                if "su rabbitmq" in path.read_text(errors="replace"):
                    continue  # the wrapper: it would run the node as another user, with the system's files
            return path
    raise BrokerUnavailable("no rabbitmq-server found (tried /usr/lib/rabbitmq/bin and PATH)")


_APP_DIR = re.compile(r"(.+?)-(\d[\w.+-]*?)(\.ez)?")


def _app_resource(entry: Path, name: str) -> str:
    """The text of the ``.app`` file of the plugin directory (or ``.ez`` archive) ``entry``."""
    if entry.suffix == ".ez":
        with zipfile.ZipFile(entry) as archive:
            member = next(n for n in archive.namelist() if n.endswith(f"/ebin/{name}.app"))
            return archive.read(member).decode(errors="replace")
    return (entry / "ebin" / f"{name}.app").read_text(errors="replace")


def _trimmed_plugins(server: Path, into: Path) -> Path | None:
    """A plugins directory holding only what the broker itself needs (``rabbit`` and the applications it
    depends on, as their ``.app`` files say), as symbolic links; ``None`` if the layout is not the one known.

    A node scans every module of its plugins directory while it boots: with the 50-odd plugins left out it
    boots on about a third less CPU (on a shared 2-core machine: 6 s instead of 9).
    """
    plugins = server.resolve().parent.parent / "plugins"
    try:
        entries = {m.group(1): e for e in plugins.iterdir() if (m := _APP_DIR.fullmatch(e.name))}
        needed: dict[str, Path] = {}
        todo = ["rabbit", "rabbitmq_prelaunch"]
        while todo:
            name = todo.pop()
            if name in needed or name not in entries:
                continue  # an OTP application (kernel, ssl, mnesia …): not a plugin
            needed[name] = entries[name]
            text = _app_resource(entries[name], name)
            for listed in re.finditer(r"\{\s*(?:included_|optional_)?applications\s*,\s*\[([^\]]*)\]", text):
                todo += [dep.strip().strip("'") for dep in listed.group(1).split(",") if dep.strip()]
        if "rabbit" not in needed:
            return None
        into.mkdir(exist_ok=True)
        for entry in needed.values():
            link = into / entry.name
            if not link.exists():
                link.symlink_to(entry)
        return into
    except (OSError, StopIteration, zipfile.BadZipFile):
        return None


def _epmd() -> Path:
    found = shutil.which("epmd")
    if found:
        return Path(found)
    for path in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd")):
        return path
    raise BrokerUnavailable("no epmd found (Erlang is not installed)")


def _tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class PrivateRabbitMQ(BrokerProcess):
    """A RabbitMQ node of the test's own: its own node name, ports, data, logs and ``epmd``.

    Nothing of the system's RabbitMQ is used or touched: the node reads no system configuration file,
    enables no plugin, listens on loopback only, and registers with an ``epmd`` this object starts on a
    port of its own (a shared ``epmd`` is never started, so none is left behind). :meth:`stop` signals only
    the process groups this object created. Data survive :meth:`restart` (durable queues stay).

    Args:
        start_timeout: seconds the node may take to accept AMQP connections.
    """

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.server = _rabbitmq_server()
        self.epmd_binary = _epmd()
        self.start_timeout = start_timeout
        self.node = f"cs-fault-{os.urandom(4).hex()}@localhost"
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cs-fault-rabbitmq-"))
        self.log_path = self.dir / "node.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        #: Seconds each start took until the node accepted an AMQP connection.
        self.start_seconds: list[float] = []
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            "loopback_users.guest = true\ndisk_free_limit.absolute = 10MB\nlog.console = false\n"
        )

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:PORT//``."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        d = str(self.dir)
        env.update(
            HOME=d,  # the Erlang cookie is written there, not in the user's home
            RABBITMQ_CONF_ENV_FILE=f"{d}/rabbitmq-env.conf",  # never /etc/rabbitmq/rabbitmq-env.conf
            RABBITMQ_CONFIG_FILE=f"{d}/rabbitmq.conf",
            RABBITMQ_ADVANCED_CONFIG_FILE=f"{d}/advanced.config",
            RABBITMQ_ENABLED_PLUGINS_FILE=f"{d}/enabled_plugins",
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=f"{d}/mnesia",
            RABBITMQ_LOG_BASE=f"{d}/log",
            RABBITMQ_PID_FILE=f"{d}/node.pid",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        plugins = _trimmed_plugins(self.server, self.dir / "plugins")
        if plugins is not None:
            env["RABBITMQ_PLUGINS_DIR"] = str(plugins)
        return env

    def _start_epmd(self, deadline: float) -> None:
        if self.epmd is not None and self.epmd.poll() is None:
            return
        self.epmd = subprocess.Popen(
            [str(self.epmd_binary), "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        epmd = self.epmd

        def listening() -> bool:
            if epmd.poll() is not None:
                raise BrokerUnavailable(f"epmd on port {self.epmd_port} exited with {epmd.returncode}")
            return _tcp_answers(self.epmd_port)

        wait_for(listening, max(deadline - time.monotonic(), 0.1), interval=0.02, what="private epmd")

    def _amqp_answers(self) -> bool:
        import amqp  # type: ignore[import-untyped]

        connection = amqp.Connection(
            host=f"127.0.0.1:{self.port}", userid="guest", password="guest", connect_timeout=1
        )
        try:
            connection.connect()
        except Exception:
            with contextlib.suppress(Exception):
                connection.collect()
            return False
        with contextlib.suppress(Exception):
            connection.close()
        return True

    def start(self) -> Self:
        """Start ``epmd`` and the node; return once the node accepts an AMQP connection.

        Raises:
            BrokerUnavailable: the node exited, or did not answer within ``start_timeout`` seconds.
        """
        if self.process is not None and self.process.poll() is None:
            return self
        started = time.monotonic()
        deadline = started + self.start_timeout
        try:
            self._start_epmd(deadline)
        except TimeoutError as exc:
            self.stop()
            raise BrokerUnavailable(str(exc)) from None
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [str(self.server)],
                env=self._env(),
                cwd=self.dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: beam.smp and its helpers, nothing else
            )
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise BrokerUnavailable(
                    f"RabbitMQ node {self.node} exited with {process.returncode}:\n{_tail(self.log_path)}"
                )
            return _tcp_answers(self.port) and self._amqp_answers()

        try:
            wait_for(ready, max(deadline - time.monotonic(), 0.1), interval=0.1, what=f"node {self.node}")
        except TimeoutError:
            self.stop()
            raise BrokerUnavailable(
                f"RabbitMQ node {self.node} did not accept AMQP connections within {self.start_timeout}s:\n"
                f"{_tail(self.log_path)}"
            ) from None
        except BrokerUnavailable:
            self.stop()
            raise
        self.start_seconds.append(time.monotonic() - started)
        return self

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl args`` against this node (its environment: cookie, ``epmd`` port); its output.

        Raises:
            subprocess.CalledProcessError: the command failed.
        """
        ctl = self.server.parent / "rabbitmqctl"
        done = subprocess.run(
            [str(ctl), "-n", self.node, *args],
            env=self._env(),
            cwd=self.dir,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=True,
        )
        return done.stdout.decode(errors="replace").strip()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the node (SIGTERM to its process group: a clean shutdown), then its ``epmd``.

        Whatever of either group lingers past ``timeout`` is SIGKILLed; both are reaped.
        """
        process, self.process = self.process, None
        if process is not None:
            _stop_group(process, timeout)
        epmd, self.epmd = self.epmd, None
        if epmd is not None:
            _stop_group(epmd, 5.0)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a group we created is ours to signal
        return True


def _stop_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process group ``process`` leads (we created it), SIGKILL what lingers, reap the leader."""
    pgid = process.pid  # start_new_session: the leader's PID is the group's id
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        if not _wait_exit(process, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            process.wait(timeout=5)
    # Helpers of the leader (erl_child_setup, inet_gethost) go with it; make sure none is left.
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not _group_alive(pgid), 3.0, interval=0.05, what="process group gone")
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


class RedisSentinel(RedisServer):
    """A Sentinel of the test's own (``redis-server FILE --sentinel``: no ``redis-sentinel`` package needed),
    monitoring one master with quorum 1 and short timeouts, so that a failover takes about a second."""

    def __init__(self, name: str, master_port: int, *, down_after_ms: int = 1000, failover_ms: int = 3000):
        super().__init__()
        self.name = name
        self.conf_path = self.dir / "sentinel.conf"
        # Written once: Sentinel rewrites it with what it learns (replicas, a failover's new master).
        self.conf_path.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile {self.log_path}\n"
            f"sentinel monitor {name} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
            f"sentinel failover-timeout {name} {failover_ms}\n"
        )

    def command(self) -> list[str]:
        """``redis-server sentinel.conf --sentinel``."""
        return [self.binary(), str(self.conf_path), "--sentinel"]

    def master_port(self) -> int | None:
        """The port of the master this Sentinel names now (``None`` if it names none)."""
        client = self.client(socket_timeout=1)
        try:
            address = client.sentinel_get_master_addr_by_name(self.name)
        finally:
            client.close()
        return int(address[1]) if isinstance(address, tuple | list) else None


class SentinelGroup:
    """A master, its replica and one Sentinel, each a process of the test's own on a free loopback port.

    Attributes:
        name: the master's name (the ``sentinel_master`` setting).
        servers: the two Redis servers, by port (the first one starts as master).
    """

    def __init__(self, name: str = "cs-master") -> None:
        self.name = name
        first = RedisServer()
        second = RedisServer(args=["--replicaof", "127.0.0.1", str(first.port)])
        self.servers = {first.port: first, second.port: second}
        self.sentinel = RedisSentinel(name, first.port)

    @property
    def url(self) -> str:
        """``sentinel://127.0.0.1:PORT/0``: what the settings take."""
        return f"sentinel://127.0.0.1:{self.sentinel.port}/0"

    def start(self, timeout: float = 15.0) -> Self:
        """Start the servers and the Sentinel; return once the Sentinel knows a replica it can promote."""
        for server in self.servers.values():
            server.start()
        self.sentinel.start()

        def replica_known() -> bool:
            client = self.sentinel.client(socket_timeout=1)
            try:
                replicas = client.sentinel_slaves(self.name)
            finally:
                client.close()
            return any(r.get("master-link-status") == "ok" and not r.get("is_sdown") for r in replicas)

        wait_for(replica_known, timeout, interval=0.1, what="the Sentinel knowing the replica")
        return self

    def master(self) -> RedisServer:
        """The server the Sentinel names master now."""
        port = self.sentinel.master_port()
        assert port in self.servers, port
        return self.servers[port]

    def role(self, server: RedisServer) -> str:
        """``master`` or ``slave``, as ``server`` reports itself."""
        client = server.client(socket_timeout=1)
        try:
            role: Any = client.execute_command
            return str(role("ROLE")[0].decode())
        finally:
            client.close()

    def failover(self, timeout: float = 10.0) -> RedisServer:
        """``SENTINEL FAILOVER``; return the new master once the Sentinel names it (retried while the
        Sentinel answers that no replica is ready yet)."""
        old = self.master()
        client = self.sentinel.client(socket_timeout=2)
        try:
            wait_for(
                lambda: _accepted(lambda: client.sentinel_failover(self.name)),
                timeout,
                interval=0.1,
                what="SENTINEL FAILOVER accepted",
            )
        finally:
            client.close()
        wait_for(lambda: self.sentinel.master_port() != old.port, timeout, interval=0.02, what="a new master")
        return self.master()

    def close(self) -> None:
        """Stop the Sentinel and the servers (only the processes this group started); remove their files."""
        self.sentinel.close()
        for server in self.servers.values():
            server.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _accepted(command: Callable[[], Any]) -> bool:
    import redis

    try:
        command()
        return True
    except redis.ResponseError:  # NOGOODSLAVE: the Sentinel has not judged the replica yet
        return False


@dataclass(frozen=True)
class TLSFiles:
    """A CA, a server certificate it signed for 127.0.0.1, and a CA that signed nothing (a wrong one)."""

    ca: Path
    cert: Path
    key: Path
    wrong_ca: Path


def tls_files(directory: Path) -> TLSFiles:
    """Write a CA, a server key and certificate (``IP:127.0.0.1``, 1 day) and a wrong CA in ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def certificate(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    def write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        return path

    pem = serialization.Encoding.PEM
    ca_key, wrong_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = certificate("cs-test-ca", ca_key, "cs-test-ca", ca_key, True)
    wrong = certificate("cs-wrong-ca", wrong_key, "cs-wrong-ca", wrong_key, True)
    server = certificate("127.0.0.1", server_key, "cs-test-ca", ca_key, False)
    key_bytes = server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return TLSFiles(
        ca=write(directory / "ca.crt", ca.public_bytes(pem)),
        cert=write(directory / "server.crt", server.public_bytes(pem)),
        key=write(directory / "server.key", key_bytes),
        wrong_ca=write(directory / "wrong-ca.crt", wrong.public_bytes(pem)),
    )


def threads_named(prefix: str) -> list[threading.Thread]:
    """The live threads of this process whose name starts with ``prefix``."""
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


class Consumer:
    """A consumer app distributed on real brokers, mounting the proxies of ``remote_key`` by discovery.

    Records the ``service`` / ``service-removed`` events of the app (``mounts``) and what the proxies'
    listeners hear (``heard``); listeners are attached to each proxy wrapper when it is mounted.
    """

    def __init__(
        self, broker: str, backend: str, prefix: str, remote_key: str, *, timeout: float = 3.0, **options: Any
    ) -> None:
        self.app = App()
        self.mounts: list[tuple[str, str, float]] = []
        self.heard: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()
        self._attached: list[Any] = []  # wrappers given listeners (kept: a re-mounted one keeps them)
        self.app.on("service", lambda svc: self._record("service", svc))
        self.app.on("service-removed", lambda svc: self._record("service-removed", svc))
        settings = DistributionSettings(
            key=options.pop("key", f"consumer-{os.urandom(3).hex()}"),
            broker_url=broker,
            result_backend=backend,
            registry_prefix=prefix,
            heartbeat_interval=HEARTBEAT,
            services=[],
            remote_services=[remote_key],
            distributed_methods=METHODS,
            distributed_events=EVENTS,
            timeout=timeout,
            **options,
        )
        self.distribution: Distribution = distribute(self.app, settings)

    def _record(self, what: str, svc: Any) -> None:
        with self._lock:
            self.mounts.append((what, svc.path, time.monotonic()))
            first = not any(known is svc for known in self._attached)
            if first:
                self._attached.append(svc)
        if what == "service" and first:  # a wrapper mounted again keeps its listeners
            for event in EVENTS:
                svc.on(event, lambda data, ctx=None, p=svc.path, e=event: self._hear(p, e, data))

    def _hear(self, path: str, event: str, data: Any) -> None:
        with self._lock:
            self.heard.append((path, event, data))

    def events_of(self, path: str) -> list[str]:
        """``service`` / ``service-removed`` in the order the app emitted them for ``path``."""
        with self._lock:
            return [what for what, p, _ in self.mounts if p == path]

    def heard_of(self, path: str, event: str) -> list[Any]:
        with self._lock:
            return [data for p, e, data in self.heard if (p, e) == (path, event)]

    def thread_health(self) -> dict[str, bool]:
        """Whether the registry watcher, the heartbeat and the event consumer threads are alive."""
        queue = self.distribution.events.queue_name
        return {
            "celery_services.registry.watch": bool(threads_named("celery_services.registry.watch")),
            "celery_services.registry.heartbeat": bool(threads_named("celery_services.registry.heartbeat")),
            f"events:{queue}": bool(threads_named(f"events:{queue}")),
        }

    def close(self) -> None:
        finalize(self.app)


@dataclass
class Outcome:
    """How one call ended: its result or its error, when it started and ended (monotonic), its timeout."""

    label: str
    started: float
    ended: float
    timeout: float
    result: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def took(self) -> float:
        return self.ended - self.started

    def __str__(self) -> str:
        end = "ok" if self.error is None else f"{type(self.error).__name__}: {self.error}"
        return f"{self.label} [{self.took:.2f}s of {self.timeout}s] {end}"


@dataclass
class Load:
    """A bounded load: ``threads`` threads call ``call(index)`` until :meth:`stop`, ``max_calls`` calls in
    all or ``max_seconds``, whichever comes first; each call is recorded as an :class:`Outcome`.

    ``call`` must make one call with the timeout ``timeout`` (the load only records it to judge hangs).
    """

    call: Callable[[int], Any]
    threads: int = 3
    timeout: float = 3.0
    max_calls: int = 3000
    max_seconds: float = 60.0
    pause: float = 0.01  # between two calls of a thread: a load, not a CPU hog on a shared machine
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._workers: list[threading.Thread] = []

    def start(self) -> Self:
        until = time.monotonic() + self.max_seconds
        for n in range(self.threads):
            thread = threading.Thread(target=self._run, args=(until,), name=f"fault-load-{n}", daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def _run(self, until: float) -> None:
        while not self._stop.is_set() and time.monotonic() < until:
            with self._lock:
                if self._next >= self.max_calls:
                    return
                index, self._next = self._next, self._next + 1
            started = time.monotonic()
            try:
                result, error = self.call(index), None
            except BaseException as exc:  # recorded: the test judges every type
                result, error = None, exc
            outcome = Outcome(f"call {index}", started, time.monotonic(), self.timeout, result, error)
            with self._lock:
                self.outcomes.append(outcome)
            self._stop.wait(self.pause)

    def stop(self, slack: float = 3.0) -> None:
        """Stop the load and wait for the calls in flight; raise if any is still running after its
        timeout plus ``slack`` (a hang)."""
        self._stop.set()
        deadline = time.monotonic() + self.timeout + slack
        for thread in self._workers:
            thread.join(max(deadline - time.monotonic(), 0.0))
        hung = [t.name for t in self._workers if t.is_alive()]
        assert not hung, f"calls still running {self.timeout + slack:.1f}s after the load stopped: {hung}"

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_calls(self, more: int, timeout: float) -> None:
        """Wait until ``more`` calls beyond those recorded now have ended."""
        target = self.count() + more
        wait_for(lambda: self.count() >= target, timeout, interval=0.02, what=f"{more} more calls")


class Cuttable:
    """A TCP relay to ``host:port`` on a free loopback port (:attr:`port`), whose connections of the moment
    :meth:`cut` silently cuts: their bytes are dropped both ways and neither end is told, not even when the
    other closes (a host cut off, a middlebox that lost its state). Connections made after relay again.

    A thread per direction of each connection; :meth:`close` stops them all.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.port = self.listener.getsockname()[1]
        self._cut: set[int] = set()  # ids of the connections cut
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        threading.Thread(target=self._accept, name="cuttable-accept", daemon=True).start()

    @classmethod
    def to(cls, url: str) -> tuple[Cuttable, str]:
        """A relay to the broker of ``url``, and ``url`` through it (same credentials and path)."""
        parts = urlsplit(url)
        relay = cls(parts.hostname or "127.0.0.1", parts.port or 5672)
        userinfo = parts.netloc.rpartition("@")[0]
        return relay, urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{relay.port}"))

    @property
    def connections(self) -> int:
        """How many connections were relayed so far."""
        return len(self._pairs)

    @property
    def upstream_ports(self) -> set[int]:
        """The local ports of the relayed connections to the broker (as the broker names its clients)."""
        return {server.getsockname()[1] for _, server in self._pairs}

    def cut(self) -> None:
        """Cut every connection open now."""
        self._cut.update(id(pair) for pair in self._pairs)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = (client, server)
            self._pairs.append(pair)
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._relay, args=(pair, source, target), daemon=True).start()

    def _relay(
        self, pair: tuple[socket.socket, socket.socket], source: socket.socket, target: socket.socket
    ) -> None:
        try:
            while data := source.recv(65536):
                if id(pair) not in self._cut:
                    target.sendall(data)
        except OSError:
            pass
        if id(pair) not in self._cut:  # a cut connection's other end is never told
            for end in pair:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop relaying; every connection is closed."""
        self._closed = True
        self.listener.close()
        for pair in self._pairs:
            for end in pair:
                with contextlib.suppress(OSError):
                    end.close()


@contextlib.contextmanager
def stalled(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """The broker process (its whole group) stopped: it accepts connections and answers nothing."""
    group = os.getpgid(process.pid)
    assert group != os.getpgrp(), "the broker must run in a process group of its own"
    os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(group, signal.SIGCONT)


def untyped(outcomes: Iterable[Outcome]) -> list[str]:
    """The outcomes that failed with anything but :class:`Unavailable` or :class:`Timeout`."""
    return [str(o) for o in outcomes if o.error is not None and not isinstance(o.error, TYPED)]


def overran(outcomes: Iterable[Outcome], slack: float) -> list[str]:
    """The outcomes that took longer than their timeout plus ``slack`` (a call must end by its deadline)."""
    return [str(o) for o in outcomes if o.took > o.timeout + slack]


def summary(outcomes: list[Outcome]) -> str:
    """``N calls: ok, Unavailable, Timeout …`` counts, for assertion messages and reports."""
    counts: dict[str, int] = {}
    for outcome in outcomes:
        name = "ok" if outcome.error is None else type(outcome.error).__name__
        counts[name] = counts.get(name, 0) + 1
    return f"{len(outcomes)} calls: " + ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))


def first_success_after(
    call: Callable[[], Any], deadline: float, *, interval: float = 0.05
) -> tuple[Any, list[str]]:
    """Call ``call`` until it returns (its result) or ``deadline`` (monotonic) passes (AssertionError).

    Every failure on the way must be a typed :class:`ServiceError`; they are returned, as text, with it.
    """
    seen: list[str] = []
    while True:
        try:
            return call(), seen
        except ServiceError as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"no call succeeded by the deadline; last errors: {seen[-3:]}")
        time.sleep(interval)


@contextlib.contextmanager
def running(load: Load, slack: float = 3.0) -> Iterator[Load]:
    """Run ``load`` for the duration of the block; stop it (checking for hangs) on the way out."""
    load.start()
    try:
        yield load
    except BaseException:
        with contextlib.suppress(AssertionError):  # the block's own failure is the one to report
            load.stop(slack)
        raise
    load.stop(slack)
