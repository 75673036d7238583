"""A real explorer for the browser tests: a planted demo-style store mined into a real SQLite
database by `app.services.mining.mine_run`, served by uvicorn on 127.0.0.1 in a thread, and
Debian's Chromium driven through Playwright. Built once per module (about 15 s), so the whole
browser suite stays around a minute.

Every page a test opens is watched: console errors, uncaught exceptions, failed requests and
HTTP errors are collected, and a test fails if any appear that it did not expect.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
LAPTOP = {"width": 1366, "height": 768}
ANALYST, PASSWORD = "alice", "correct horse battery"
SCREENSHOTS = os.environ.get("USAE_SCREENSHOTS")
"""Folder to save a screenshot of every crawled page into (for reviewing the design)."""

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@dataclass
class Site:
    base: str
    run_id: int
    concept: int
    """The planted concept: fires on known images in every model."""
    n_concepts: int
    models: list[str]
    data_dir: Path
    db_url: str


def record_backbone(site: Site, model: str) -> None:
    """Mark one model of the site's run as extracted by a backbone (the planted store was
    imported), as `usae extract` records it; no worker runs here, so it is never loaded."""
    from app.db import session_factory
    from app.models import Run

    with session_factory(site.db_url)() as session:
        for run_model in session.get(Run, site.run_id).models:
            if run_model.name == model:
                run_model.info = {**run_model.info, "registry_name": "torchvision:mobilenet_v2"}
        session.commit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    import uvicorn

    from app.db import get_engine, session_factory
    from app.main import create_app
    from app.migrations import upgrade_database
    from app.services.mining import mine_run
    from app.services.users import create_user
    from app.settings import Settings
    from tests.core.planted_concept import build_planted
    from usae_core.mining import MiningConfig

    root = tmp_path_factory.mktemp("browser-site")
    settings = Settings(data_dir=root / "usae-data", secret_key="browser-test-secret", database_url=None)
    upgrade_database(settings.db_url)
    with session_factory(settings.db_url)() as session:
        create_user(session, username=ANALYST, password=PASSWORD)
        session.commit()
    planted = build_planted(root, image_files=(96, 128), demo_set=True, n_concepts=12)
    run_dir = root / "runs" / "planted"
    planted.model.save_pretrained(run_dir)
    # A training log, as `usae train` writes it, so the overview draws its training charts.
    with open(run_dir / "metrics.jsonl", "w") as log:
        for step in range(50, 650, 50):
            log.write(json.dumps({"step": step, "loss": 1.0 / step ** 0.3,
                                  "r2": {m: 0.9 - 40 / (step + 40 * i) for i, m in enumerate(planted.store.model_names)}})
                      + "\n")
    # Four top images per concept and model keep the rendering part of the mine to a few seconds.
    outcome = mine_run(settings.db_url, settings.media_dir, run_dir, planted.store, planted.model,
                       cfg=MiningConfig(top_n=4))

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the explorer did not start")
        time.sleep(0.05)
    try:
        yield Site(f"http://127.0.0.1:{port}", outcome.run_id, planted.concept, outcome.n_concepts,
                   list(planted.model.names), settings.data_dir, settings.db_url)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        get_engine(settings.db_url).dispose()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Watch:
    """Problems seen on the pages of one browser context."""

    problems: list[str] = field(default_factory=list)
    expected_statuses: set[int] = field(default_factory=set)

    def attach(self, context) -> None:
        context.on("console", lambda m: m.type == "error" and not self._expected(m.text)
                   and self.problems.append(f"console error: {m.text}"))
        context.on("weberror", lambda e: self.problems.append(f"page error: {e.error}"))
        # ERR_ABORTED is the browser dropping loads of a page it navigated away from.
        context.on("requestfailed", lambda r: r.failure != "net::ERR_ABORTED"
                   and self.problems.append(f"request failed: {r.url} {r.failure}"))
        context.on("response", lambda r: r.status >= 400 and r.status not in self.expected_statuses
                   and self.problems.append(f"HTTP {r.status}: {r.url}"))

    def _expected(self, text: str) -> bool:
        # Chromium logs every error response as a console error too; expected ones are fine.
        return any(f"status of {code}" in text for code in self.expected_statuses)


@pytest.fixture
def watch() -> Watch:
    return Watch()


@pytest.fixture
def new_context(browser, watch):
    """Fresh browser contexts (no cookies) at laptop size, all watched; checked at the end."""
    contexts = []

    def make(viewport: dict | None = None, storage_state: dict | None = None):
        context = browser.new_context(viewport=viewport or LAPTOP, storage_state=storage_state)
        watch.attach(context)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        context.close()
    assert watch.problems == []


@pytest.fixture(scope="module")
def analyst_state(browser, site) -> dict:
    """Cookies of one sign-in through the form, reused by later tests (argon2 is slow on purpose)."""
    context = browser.new_context(viewport=LAPTOP)
    sign_in(context.new_page(), site)
    state = context.storage_state()
    context.close()
    return state


@pytest.fixture
def analyst(new_context, analyst_state, site):
    """A page of a signed-in analyst, on the runs list."""
    page = new_context(storage_state=analyst_state).new_page()
    page.goto(site.base + "/runs")
    return page


def sign_in(page, site: Site) -> None:
    page.goto(site.base + "/")
    page.wait_for_url("**/login**")
    page.fill("#username", ANALYST)
    page.fill("#password", PASSWORD)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(site.base + "/runs")


def images_all_loaded(page) -> list[str]:
    """Sources of <img> elements that failed to load (empty when all are fine). Lazy images
    (off screen, or in closed lightboxes) are switched to eager first so every one is checked."""
    page.eval_on_selector_all("img[loading=lazy]", "imgs => imgs.forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    return page.eval_on_selector_all(
        "img", "imgs => imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.currentSrc || i.src)")


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)
