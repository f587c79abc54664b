"""A real browser on the gateway's page: headless Chromium driven by Selenium through the system chromedriver.

The whole chain is real: the page is served by uvicorn from a consumer app whose ``articles`` is a proxy of
a provider worker process; what the test creates through the gateway is created on the provider, whose
event comes back through the event bus to the proxy, then to the page over the gateway's Socket.IO transport.
The gateway authenticates its clients with JWTs, as the example deployment does: the page gets its token from
its URL's fragment (``/#access_token=...``), which never reaches the server.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from celery_services import App, DistributionSettings, distribute, finalize
from celery_services.http import JWTAuthentication, JWTSettings, make_server
from celery_services.testing import wait_for

from .support import ROOT, cleanup, purge_prefix, registered_provider

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1000,800",
)
ARTIFACT = ROOT / "artifacts" / "browser.png"
SECRET = "the-browser-test-gateway-secret-32+"

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="chromium / chromedriver not installed (apt-get install -y chromium chromium-driver)",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[tuple[App, str]]:
    """A consumer app proxying a real provider worker's ``articles``, served by uvicorn on a free port."""
    prefix = f"cs-browser-{os.urandom(4).hex()}"
    provider = registered_provider(redis_url, prefix, "browser-prov")
    key, runs = provider.key, provider.runs_key
    worker = provider.worker()
    worker.start()
    api = App()
    server = None
    thread = None
    try:
        distribution = distribute(
            api,
            DistributionSettings(
                key=f"browser-gw-{os.urandom(3).hex()}",
                broker_url=redis_url,
                result_backend=redis_url,
                registry_prefix=prefix,
                heartbeat_interval=0.5,
                timeout=8,
                services=[],
                remote_services=[key],
                distributed_methods=["find", "get", "create", "patch", "remove", "publish_article"],
                distributed_events=["created", "patched", "removed", "article_published"],
            ),
        )
        distribution.wait_for("articles", timeout=10)
        authenticate = JWTAuthentication(JWTSettings(secret=SECRET))
        server = make_server(api, port=0, log_level="warning", authenticate=authenticate)
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        wait_for(lambda: server is not None and server.started, timeout=10, what="uvicorn started")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield api, f"http://127.0.0.1:{port}"
    finally:
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout=15)
        finalize(api)
        worker.stop()
        cleanup(redis_url, redis_url, key, runs)
        purge_prefix(redis_url, prefix)


@pytest.fixture
def browser() -> Iterator[Any]:
    options = Options()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


SHOWN = """
return [...document.querySelectorAll("#articles li")].map((li) => [
  li.dataset.id,
  [...li.querySelectorAll("span")].map((span) => span.textContent).join(" | "),
]);
"""


def shown(driver: Any) -> dict[str, str]:
    """Article id → what its list item shows (``"#3 | Title | published"``), read in one go."""
    return dict(driver.execute_script(SHOWN))


def until(driver: Any, condition: Any, what: str, timeout: float = 10) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def test_page_lists_articles_and_follows_the_provider_live(gateway: tuple[App, str], browser: Any) -> None:
    api, url = gateway
    articles = api.service("articles")
    first = articles.create({"title": "First from the provider"})
    second = articles.create({"title": "Second from the provider"})

    token = jwt.encode({"sub": "page", "role": "editor", "exp": int(time.time() + 300)}, SECRET)
    browser.get(f"{url}/#access_token={token}")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Articles"
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("role") == "status" and status.get_attribute("aria-live") == "polite"
    until(browser, lambda d: str(second["id"]) in shown(d), "the initial list")
    listed = shown(browser)
    assert listed[str(first["id"])] == f"#{first['id']} | First from the provider"
    until(browser, lambda d: d.find_element(By.ID, "status").text.startswith("Live:"), "live status")
    assert token not in browser.current_url  # taken out of the address bar (and its history)

    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=10, headers=headers) as http:
        # Created through the page's backend (the gateway), on the provider: the page learns it by event.
        live = http.post("/articles", json={"title": "Live from the provider"}).json()
        until(browser, lambda d: str(live["id"]) in shown(d), "the created article")
        assert shown(browser)[str(live["id"])] == f"#{live['id']} | Live from the provider"
        http.post("/articles", json={"id": live["id"]}, headers={"X-Service-Method": "publish_article"})
        until(browser, lambda d: shown(d)[str(live["id"])].endswith(" | published"), "the published badge")
        until(browser, lambda d: "published" in d.find_element(By.ID, "status").text, "status line")

        # A user of the page creates one with its form.
        field = browser.find_element(By.ID, "title")
        field.send_keys("Typed in the page")
        browser.find_element(By.CSS_SELECTOR, "#new-article button[type=submit]").click()
        until(browser, lambda d: any("Typed in the page" in text for text in shown(d).values()), "form")
        assert any(article["title"] == "Typed in the page" for article in http.get("/articles").json())

        http.delete(f"/articles/{first['id']}")
        until(browser, lambda d: str(first["id"]) not in shown(d), "the removed article")

    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACT))
    assert Path(ARTIFACT).stat().st_size > 1000
