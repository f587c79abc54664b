"""Real ``celery worker`` processes for tests, and polling with a deadline (never a blind sleep)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

__all__ = ["WorkerProcess", "wait_for"]

#: Signals that stop a program: held while a worker process is being created (see WorkerProcess.start).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; never a blind sleep.

    Raises:
        TimeoutError: the condition did not hold within ``timeout`` seconds (``what`` names it).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout}s: {what or predicate!r}")
        time.sleep(interval)


class WorkerProcess:
    """A real ``celery worker`` subprocess serving one key's queue, in its own process group.

    Args:
        module: the module (or ``module:attr``) holding the Celery app, as ``celery -A`` takes it.
        key: the queue to serve.
        env: environment variables added for the worker (``CELERY_SERVICES_*`` settings).
        pool: the worker pool (``solo`` is the quickest to start and to kill).
        concurrency: pool size.
        command: a full command to run instead of ``celery -A module worker …``.
        ready_timeout: seconds to wait for the worker to answer a ping.
    """

    def __init__(
        self,
        module: str,
        key: str,
        *,
        env: Mapping[str, str] | None = None,
        pool: str = "solo",
        concurrency: int = 1,
        command: Sequence[str] | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.key = key
        self.name = f"{key}-{uuid.uuid4().hex[:6]}@localhost"
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.command = list(command) if command else [
            sys.executable, "-m", "celery", "-A", module, "worker",
            "-Q", key, "-P", pool, "-c", str(concurrency), "-n", self.name,
            "--without-gossip", "--without-mingle", "-l", "info",
        ]  # fmt: skip
        self.ready_timeout = ready_timeout
        descriptor, log = tempfile.mkstemp(prefix="celery-services-worker-", suffix=".log")
        os.close(descriptor)  # reopened by start(); kept, it held the log's space after stop() unlinked it
        self.log_path = Path(log)
        # Removed by stop(), else once this object is gone: one made and never started, or killed and
        # dropped, leaves no file behind.
        weakref.finalize(self, self.log_path.unlink, missing_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The worker's main process id."""
        assert self.process is not None, "worker not started"
        return self.process.pid

    def log(self) -> str:
        """What the worker wrote so far."""
        return self.log_path.read_text(errors="replace")

    def start(self) -> WorkerProcess:
        """Start the worker and wait until it serves its queue (its log says ``ready``).

        A stop signal (SIGINT, SIGTERM) that arrives while the process is being created is held until this
        object knows its pid, then delivered: unwinding from inside ``Popen`` would leave the new process
        running with nobody to stop it. If starting fails or is interrupted, the process is stopped.
        """

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            return " ready." in self.log()

        try:
            with self.log_path.open("wb") as out, _signals_held():
                self.process = subprocess.Popen(
                    self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            wait_for(ready, self.ready_timeout, interval=0.05, what=f"worker {self.name} ready")
        except BaseException:  # a timeout, or Ctrl-C while it starts: no process is left behind
            self.kill()
            raise
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker's whole process group and reap it."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def stop(self) -> None:
        """Stop the worker warm, as ``docker stop`` does: SIGTERM to its main process, which lets the calls
        in flight end (a prefork pool's children, left on SIGTERM's default by Celery, died of it when it was
        sent to the whole group); then SIGKILL to the group if it lingers, or to what it left behind. Its log
        goes too."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=15)
        if process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # the group of its own session: its pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block, then deliver the first that came (main thread only: signals
    are handled there, and only there can handlers be swapped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in _STOP_SIGNALS
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])
