"""The gateway awaits its calls (no thread per remote call in flight), and the FastAPI example
(workers/fastapi_app.py) mounts it and awaits a remote service from its own route; over httpx, against a
real worker."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from celery_services import App, DistributionSettings, distribute, finalize
from celery_services.http import asgi_app

from .support import Provider, cleanup, fresh_prefix, registered_provider

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def provider(redis_url: str) -> Iterator[Provider]:
    """tests/apps/provider.py with 16 serving threads: 16 slow calls at once."""
    prefix_iter = fresh_prefix(redis_url, "async-http")
    prefix = next(prefix_iter)
    provider = registered_provider(redis_url, prefix, "aio-http")
    with provider.worker(pool="threads", concurrency=16):
        yield provider
    cleanup(redis_url, redis_url, provider.key, provider.runs_key)
    next(prefix_iter, None)


def settings_for(provider: Provider, **options: object) -> DistributionSettings:
    return DistributionSettings(
        key=f"gw-{os.urandom(3).hex()}",
        broker_url=provider.broker,
        result_backend=provider.backend,
        registry_prefix=provider.env["CELERY_SERVICES_REGISTRY_PREFIX"],
        heartbeat_interval=0.5,
        services=[],
        remote_services=[provider.key],
        timeout=8,
        **options,
    )


def test_slow_remote_calls_in_flight_hold_no_gateway_thread(provider: Provider) -> None:
    api = App()
    methods = ["find", "get", "create", "update", "patch", "remove", "slow"]
    distribution = distribute(api, settings_for(provider, distributed_methods=methods))
    try:
        distribution.wait_for("probe", timeout=10)
        application = asgi_app(api, threads=2)  # 2 threads: 16 calls of 0.5 s would take 4 s in them
        threads_before = threading.active_count()

        async def main() -> float:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=10) as client:
                started = time.monotonic()
                answers = await asyncio.gather(
                    *(
                        client.post(
                            "/probe",
                            json={"tag": f"h{n}", "seconds": 0.5},
                            headers={"X-Service-Method": "slow"},
                        )
                        for n in range(16)
                    )
                )
                elapsed = time.monotonic() - started
                assert [answer.status_code for answer in answers] == [200] * 16, answers[0].text
                assert {answer.json()["tag"] for answer in answers} == {f"h{n}" for n in range(16)}
                return elapsed

        elapsed = asyncio.run(main())
        assert elapsed < 2.5, elapsed  # together, not 2 at a time
        assert threading.active_count() <= threads_before + 4  # no thread per call (publishers aside)
        application.state.executor.shutdown(wait=False)
    finally:
        finalize(api)


def test_fastapi_example_mounts_the_gateway_and_awaits_a_remote_service(provider: Provider) -> None:
    pytest.importorskip("fastapi")
    from workers.fastapi_app import create

    web = create(settings_for(provider))
    tag = os.urandom(3).hex()

    async def main() -> None:
        async with web.router.lifespan_context(web):  # httpx's ASGI transport runs no lifespan
            api: App = web.state.api
            assert api.distribution is not None
            await asyncio.to_thread(api.distribution.wait_for, "articles", 10)
            transport = httpx.ASGITransport(app=web)
            async with httpx.AsyncClient(transport=transport, base_url="http://web", timeout=10) as client:
                created = await client.post("/articles", json={"title": f"fast-{tag}"})  # the gateway's
                assert created.status_code == 201, created.text
                summaries = await asyncio.gather(*(client.get("/summary?limit=50") for _ in range(10)))
                for summary in summaries:  # the app's own route, awaiting the remote service
                    assert summary.status_code == 200, summary.text
                    assert f"fast-{tag}" in summary.json()["latest"]
                assert (await client.get("/health")).json() == {"status": "ok"}
                docs = await client.get("/openapi.json")
                assert "/summary" in docs.json()["paths"]

    asyncio.run(main())
    assert web.state.api.distribution is None  # finalized on shutdown
