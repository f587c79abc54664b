"""Fixtures of the fault-injection suite: private brokers a test may restart or cut, unique prefixes.

``private_redis`` is one ``redis-server`` per test (it starts in milliseconds); ``private_rabbitmq`` is one
RabbitMQ node per test session (it takes seconds), started the first time a test asks for it. A node that
cannot be started fails the test under CI (``CI=true``) and skips it elsewhere, with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .brokers import BrokerUnavailable, PrivateRabbitMQ, RedisServer


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A ``redis-server`` of this test's own (empty, loopback, free port); stopped and removed after."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of this session's own (loopback, free ports, own ``epmd``); stopped and removed after.

    Tests that restart it leave it running (or start it again) for the next one.
    """
    try:
        node = PrivateRabbitMQ()
        node.start()
    except BrokerUnavailable as exc:
        reason = f"no private RabbitMQ node: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def rabbitmq(private_rabbitmq: PrivateRabbitMQ) -> PrivateRabbitMQ:
    """The session's private RabbitMQ node, running (a previous test may have stopped it)."""
    return private_rabbitmq.start()
