"""Real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, against a real server.

A missing browser fails the run: `scripts/test` installs it with apt-get; nothing here downloads one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, sync_playwright

from ..conftest import ROOT, RelayServer, assert_no_traceback
from .scripted_model import ScriptedModel

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", ROOT / "test-artifacts"))


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[object]:
    # Module scope: the sync API runs an event loop of its own, which must be gone before async tests run.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (scripts/test does)"
    with sync_playwright() as driver:
        yield driver


@pytest.fixture
def context(playwright_driver, tmp_path) -> Iterator[BrowserContext]:
    """A fresh browser profile (--user-data-dir) per test."""
    browser_context = playwright_driver.chromium.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
        viewport={"width": 1200, "height": 850},
    )
    yield browser_context
    browser_context.close()


@pytest.fixture
def page(context) -> Iterator[Page]:
    page = context.pages[0] if context.pages else context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    assert errors == [], f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="module")
def paced_server(tmp_path_factory) -> Iterator[RelayServer]:
    """The offline model at a human pace: an answer takes about two seconds."""
    relay = RelayServer(tmp_path_factory.mktemp("browser"), {"RELAY_OFFLINE_DELAY_MS": "40"})
    yield relay
    relay.stop()
    assert_no_traceback(relay)


@pytest.fixture(scope="module")
def scripted_model() -> Iterator[ScriptedModel]:
    """The model the scripted server talks to: a test puts what it must say in `scripted_model.scripts`."""
    model = ScriptedModel()
    yield model
    model.stop()


@pytest.fixture(scope="module")
def scripted_server(tmp_path_factory, scripted_model) -> Iterator[RelayServer]:
    """A relay whose upstream is `scripted_model`: the page shows what the test made the model say."""
    relay = RelayServer(tmp_path_factory.mktemp("scripted"), {
        "ANTHROPIC_API_KEY": "sk-browser-tests", "ANTHROPIC_BASE_URL": scripted_model.url})
    yield relay
    relay.stop()
    assert_no_traceback(relay)


def save_screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
