"""``distribute()`` either distributes the app or leaves it as it was."""

from __future__ import annotations

import os
import socket

import pytest
import redis

from celery_services import App, DistributionSettings, distribute, finalize
from celery_services.distribution.manifest import ManifestLimitError


class Echo:
    def get(self, id: object, params: dict[str, object]) -> object:
        return id


def test_a_failed_distribute_leaves_the_app_as_it_was(redis_url: str) -> None:
    app = App()
    app.use("one", Echo())
    app.use("two", Echo())
    prefix = f"cs-distribute-{os.urandom(4).hex()}"
    settings = DistributionSettings(
        key=f"atomic-{os.urandom(3).hex()}",
        broker_url=redis_url,
        registry_prefix=prefix,
        remote_services=[],
        max_manifest_services=1,  # two services: its own manifest is over the limit
    )
    with pytest.raises(ManifestLimitError, match="max_manifest_services"):
        distribute(app, settings)
    assert app.distribution is None
    store = redis.Redis.from_url(redis_url)
    assert not list(store.scan_iter(f"{prefix}*"))
    # Free to retry (it used to say "already distributed"), and the retry works.
    distribution = distribute(app, settings.model_copy(update={"max_manifest_services": 2}))
    try:
        assert app.distribution is distribution
        assert distribution.registry.has_key(settings.key)
    finally:
        finalize(app)
        for key in store.scan_iter(f"{prefix}*"):
            store.delete(key)


def test_an_unreachable_registry_fails_distribute_and_leaves_nothing_set() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = App()
    app.use("one", Echo())
    with pytest.raises(redis.ConnectionError):
        distribute(app, key="nowhere", broker_url=f"redis://127.0.0.1:{port}/0", remote_services=[])
    assert app.distribution is None
    assert not app.mount_checks
