"""The project's declared dependencies admit no release the code cannot run on: pip would install it, and
the library would fail at its first call."""

from __future__ import annotations

import inspect
import tomllib

import redis.connection
from packaging.requirements import Requirement

from .support import ROOT


def requirement(name: str) -> Requirement:
    """The project's own requirement on the distribution ``name``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return next(r for r in map(Requirement, project["dependencies"]) if r.name == name)


def test_the_redis_floor_reads_with_a_timeout_per_read() -> None:
    # Both transports and the fast path read each answer with read_response(timeout=...), which redis-py's
    # blocking connections take from 8.0 on. The floor said 5.0 (kombu's, 6.4): with redis-py 7.4 installed,
    # every call failed with an untyped TypeError.
    assert "timeout" in inspect.signature(redis.connection.AbstractConnection.read_response).parameters
    specifier = requirement("redis").specifier
    assert not specifier.contains("7.4.0") and specifier.contains("8.0.0")
