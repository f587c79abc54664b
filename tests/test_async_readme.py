"""The README's Async block runs as written, against a real worker of ``workers/articles.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from celery_services.testing import WorkerProcess

from .support import ROOT
from .test_readme import env, python_blocks, server  # noqa: F401 - the README tests' fixtures

#: The block is a program: finalized at its end here (the README leaves that to the process's exit).
EPILOGUE = """
from celery_services import finalize

finalize(api)
"""


@pytest.mark.timeout(120)
def test_readme_async_block_runs_against_a_real_provider(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    program = tmp_path / "async_block.py"
    program.write_text(python_blocks()["async"] + EPILOGUE)
    with WorkerProcess("workers.articles", "my-app", env=env):
        done = subprocess.run(
            [sys.executable, str(program)],
            env={**os.environ, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert lines[0].startswith("got {'title': 'Async', 'id': ") and lines[0].endswith("[{'tick': 1}]"), lines
    assert lines[1] == "200 calls were in flight at once, on one thread"
