"""Signing in on the demo page in real Chromium: the token once, then an HttpOnly cookie for every transport."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page, expect

from ..conftest import RelayServer, assert_no_traceback
from ..relay_clients import demo_answer
from ..test_access import add_user
from .conftest import save_screenshot

ANSWER = '[data-testid=message][data-role=assistant]'


@pytest.fixture(scope="module")
def signed_server(tmp_path_factory) -> Iterator[tuple[RelayServer, str]]:
    relay = RelayServer(tmp_path_factory.mktemp("signin"), {"RELAY_AUTH_CACHE_SECONDS": "0"})
    token = add_user(relay.database_url, "erin")
    yield relay, token
    relay.stop()
    assert_no_traceback(relay)


def csp_reports(page: Page) -> list[str]:
    reports: list[str] = []
    page.on("console", lambda message: reports.append(message.text)
            if "Content Security Policy" in message.text else None)
    return reports


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_signing_in_with_a_token_opens_the_chat_and_answers_stream_on_the_cookie(page, signed_server, transport):
    server, token = signed_server
    violations = csp_reports(page)
    page.goto(server.url)
    expect(page.get_by_test_id("sign-in")).to_be_visible()
    expect(page.get_by_test_id("composer")).to_be_hidden()

    page.fill("[data-testid=token-input]", "drt_not_a_real_token")
    page.click("[data-testid=sign-in-submit]")
    expect(page.get_by_test_id("sign-in-error")).to_contain_text("not valid")

    page.fill("[data-testid=token-input]", token)
    page.click("[data-testid=sign-in-submit]")
    expect(page.get_by_test_id("account-name")).to_have_text("erin")
    assert token not in page.url
    # Scripts cannot read the session: the cookie is HttpOnly.
    assert "deltarelay_session" not in page.evaluate("() => document.cookie")
    cookie = next(c for c in page.context.cookies() if c["name"] == "deltarelay_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    if transport == "sse":
        page.check("[data-testid=force-sse]")
    page.fill("[data-testid=message-input]", f"Signed in over {transport}")
    page.keyboard.press("Enter")
    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=20_000)
    expect(page.locator(f"{ANSWER} [data-testid=message-text]")).to_have_text(
        demo_answer(f"Signed in over {transport}"))
    expect(page.get_by_test_id("transport")).to_have_text(transport)
    save_screenshot(page, f"signed-in-{transport}")

    # The conversation is erin's: anonymous requests cannot read it.
    assert httpx.get(server.url + "/api/conversations").status_code == 401

    page.click("[data-testid=sign-out]")
    expect(page.get_by_test_id("sign-in")).to_be_visible()
    assert violations == []
