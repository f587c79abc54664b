"""A stop signal that lands while a worker process is being started must not orphan that process.

Found late (a flaky ``test_demo_interrupted_stops_everything[sigterm]``): the demo turns SIGTERM into
``KeyboardInterrupt``; raised inside ``subprocess.Popen`` after the fork, it left the child running while
``WorkerProcess`` knew no pid to stop. Here the signal is sent at exactly that moment, every time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from celery_services.testing import WorkerProcess, wait_for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(30)
def test_a_signal_while_a_worker_starts_leaves_no_process_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    children: list[int] = []
    execute_child: Any = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def forked_then_signalled(self: subprocess.Popen[bytes], *args: Any, **kwargs: Any) -> None:
        execute_child(self, *args, **kwargs)
        children.append(self.pid)
        os.kill(os.getpid(), signal.SIGTERM)  # the demo's Ctrl-C, just after the fork

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess.Popen, "_execute_child", forked_then_signalled)
    previous = signal.signal(signal.SIGTERM, interrupt)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    worker = WorkerProcess("unused", "unused", command=sleeper)
    try:
        with pytest.raises(KeyboardInterrupt):
            worker.start()
    finally:
        signal.signal(signal.SIGTERM, previous)
        monkeypatch.undo()
    assert children, "the scenario did not run"
    wait_for(lambda: not _alive(children[0]), timeout=10, what="the interrupted start's process stopped")
