"""The Python work of one call, counted in instructions: the caller's and the fast path worker's.

Usage: ``python benchmarks/instructions.py [--calls N] [--backend URL] [--output FILE]``.

Timed benchmarks on a shared 2-core machine move 10-20% from run to run; instructions counted by valgrind's
callgrind move 1-2% at most (the worker's 354.0k and 355.0k a call in two runs of the same code, whatever
else the machine ran; between two trees whose caller code was the same, the caller's count moved 1.1%), and
with the CPU, so compare counts taken on one machine. A change of a few microseconds in a call's Python
shows here when ``calls.py`` cannot tell it from noise. Each side of a small ``articles.get(id)`` runs
``--calls`` times in-process under callgrind, with no network:

- the local call: ``app.service("articles").get(id)``, the baseline (a service's own work);
- the caller: the call decided and written as the caller ``LPUSH``es it (``Transport.prepare``,
  ``Transport.encode``, the ``LPUSH`` and ``BLPOP`` packed);
- the worker: those bytes served as a fast-path serving thread serves them once ``BLMOVE`` returned them
  (decoding, the handler and the service, the reply, the acknowledgement and Flower's task event, packed),
  its connection's writes and reads left out.

A count is (instructions of a run with N calls - those of a run with none) / N: start-up is left out. What
the sockets, the brokers and the scheduler cost is ``calls.py``'s to measure. Needs valgrind on ``PATH``,
and a Redis for ``distribute()`` (db 9 on 127.0.0.1:6379, else an embedded one); the run's keys expire.

Writes the table to ``benchmarks/results/instructions.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SIDES = {
    "local": "local call: app.service('articles').get(id)",
    "caller": "caller: prepare, encode, LPUSH + BLPOP packed",
    "worker": "fast path worker: decode, serve, reply + ack + task event packed",
}


def child(side: str, calls: int, url: str) -> None:
    """Run ``side`` ``calls`` times in this process (under callgrind, started by :func:`count`)."""
    from celery_services import App, DistributionSettings, MemoryService, distribute
    from celery_services.distribution.fastpath import EVENT_TYPES, EventTopics, RedisFastPath
    from celery_services.distribution.redis_clients import pack_commands

    key = f"bench-instr-{uuid.uuid4().hex[:8]}"
    app = App()
    app.use("articles", MemoryService(store={0: {"title": "An article", "body": "Its text"}}))
    settings = DistributionSettings(
        key=key, broker_url=url, result_backend=url, services=["*"], registry_prefix=key
    )
    distribution = distribute(app, settings)
    try:
        transport = distribution.transport
        topics = EventTopics("celeryev", {kind: [f"/9.celeryev/{kind}"] for kind in EVENT_TYPES})
        fast = RedisFastPath(distribution, 1, "bench@host", topics)
        connection = _Unsent()
        written = transport.encode(transport.prepare(key, "articles", "get", id=0, params={}))
        service = app.service("articles")
        for _ in range(calls):
            if side == "local":
                service.get(0)
            elif side == "caller":
                call = transport.prepare(key, "articles", "get", id=0, params={})
                message = transport.encode(call)
                pack_commands([("LPUSH", key, message), ("BLPOP", f"{key}:reply", 5.0)])
            elif side == "worker":
                fast._handle(written, f"{key}:inflight", connection)
        fast.store.close()
    finally:
        distribution.close()


class _Unsent:
    """A connection whose writes go nowhere and whose reads answer 1 (the worker's replies, unread)."""

    def send_packed_command(self, command: Any) -> None:
        pass

    def read_response(self, timeout: float | None = None) -> int:
        return 1


def count(side: str, calls: int, url: str) -> int:
    """The instructions callgrind counted for a child process running ``side`` ``calls`` times."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    command += [__file__, "--child", side, "--calls", str(calls), "--backend", url]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run of {side} failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls counted per side (default 2000)")
    parser.add_argument("--backend", default=None, help="Redis for distribute() (default as calls.py's)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "instructions.md")
    parser.add_argument("--child", choices=[*SIDES, "none"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls, args.backend)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian package valgrind)")
    from calls import redis_server  # this directory's: the same Redis as calls.py, or an embedded one

    console = Console()
    with redis_server(args.backend) as url:
        console.print("counting start-up alone ...")
        base = count("none", 0, url)
        per_call = {}
        for side in SIDES:
            console.print(f"counting {args.calls} calls: {SIDES[side]} ...")
            per_call[side] = (count(side, args.calls, url) - base) / args.calls
    rows = [
        (SIDES[side], f"{per_call[side] / 1000:,.1f}k", f"{per_call[side] / per_call['local']:.1f}")
        for side in SIDES
    ]
    table = Table(title="Instructions per call (callgrind, in-process)")
    for column in ("side", "instructions per call", "/ local call"):
        table.add_column(column, justify="left" if column == "side" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    lines = [
        "# Instructions per call",
        "",
        "Generated by `.venv/bin/python benchmarks/instructions.py`.",
        "",
        f"- **date**: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"- **machine**: {platform.machine()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores (instructions do not depend on their load)",
        f"- **code**: {commit.stdout.strip() or '?'}; {args.calls} calls per side, start-up subtracted",
        "",
        "| side | instructions per call | / local call |",
        "|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    console.print(f"written to {args.output}")


if __name__ == "__main__":
    main()
