"""The demo chat page in real Chromium: streaming, cost, reload, SSE fallback."""

from __future__ import annotations

from decimal import Decimal

import httpx
from playwright.sync_api import Page, expect

from ..relay_clients import demo_answer
from .conftest import save_screenshot

ANSWER = '[data-testid=message][data-role=assistant]'


def send(page: Page, text: str) -> None:
    page.fill("[data-testid=message-input]", text)
    page.keyboard.press("Enter")


def saved_messages(server, conversation_id: str) -> list[dict]:
    return httpx.get(f"{server.url}/api/conversations/{conversation_id}/messages").json()["messages"]


def conversation_in_url(page: Page) -> str:
    page.wait_for_function("() => location.hash.startsWith('#c=')")
    return page.evaluate("location.hash.slice(3)")


def test_the_answer_appears_word_by_word_before_it_is_done(page, paced_server):
    page.goto(paced_server.url)
    send(page, "Stream to me")

    # The first words are on screen while the message is still streaming.
    page.wait_for_function(
        """() => { const m = document.querySelector('[data-testid=message][data-role=assistant]');
                   return m && m.querySelector('[data-testid=message-text]').textContent.length > 0; }""")
    first_seen = page.eval_on_selector(
        ANSWER, "m => [m.dataset.state, m.querySelector('[data-testid=message-text]').textContent]")
    assert first_seen[0] == "streaming"
    assert 0 < len(first_seen[1]) < len(demo_answer("Stream to me"))

    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=20_000)
    expect(page.locator(f"{ANSWER} [data-testid=message-text]")).to_have_text(demo_answer("Stream to me"))
    expect(page.locator("[data-testid=transport]")).to_have_text("websocket")
    save_screenshot(page, "chat-after-answer")


def test_the_cost_is_shown_per_message_and_for_the_conversation(page, paced_server):
    page.goto(paced_server.url)
    send(page, "What does this cost?")
    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=20_000)

    saved = saved_messages(paced_server, conversation_in_url(page))[-1]
    meta = page.locator(f"{ANSWER} [data-testid=message-meta]").text_content()
    assert f"{saved['inputTokens']} in" in meta and f"{saved['outputTokens']} out" in meta
    assert f"${Decimal(saved['totalCost'])}" in meta
    expect(page.locator("[data-testid=conversation-total]")).to_have_text(f"${Decimal(saved['totalCost'])}")
    assert page.locator("[data-testid=ttft]").text_content().endswith("ms")


def test_a_reload_shows_the_conversation_again_and_it_continues(page, paced_server):
    page.goto(paced_server.url)
    send(page, "Remember me")
    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=20_000)
    conversation_id = conversation_in_url(page)

    page.reload()

    expect(page.locator("[data-testid=message]")).to_have_count(2)
    expect(page.locator(f"{ANSWER} [data-testid=message-text]")).to_have_text(demo_answer("Remember me"))
    expect(page.locator(f"[data-testid=conversation-item][data-conversation-id='{conversation_id}']")).to_be_visible()
    send(page, "And again")
    expect(page.locator(ANSWER).nth(1)).to_have_attribute("data-state", "complete", timeout=20_000)
    assert [m["content"] for m in saved_messages(paced_server, conversation_id)] == [
        "Remember me", demo_answer("Remember me"), "And again", demo_answer("Remember me", "And again")]


def test_with_websockets_blocked_the_page_streams_over_sse(page, paced_server):
    # The upgrade fails as a proxy that blocks WebSockets would make it fail.
    page.route_web_socket("**/api/command-center/ws", lambda ws: ws.close())
    page.goto(paced_server.url)
    send(page, "No sockets here")

    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=20_000)
    expect(page.locator(f"{ANSWER} [data-testid=message-text]")).to_have_text(demo_answer("No sockets here"))
    expect(page.locator("[data-testid=transport]")).to_have_text("sse")
    expect(page.locator(f"{ANSWER} [data-testid=message-meta]")).to_contain_text("$")
    save_screenshot(page, "chat-over-sse")


def test_the_force_sse_control_switches_transport(page, paced_server):
    page.goto(paced_server.url)
    page.check("[data-testid=force-sse]")
    send(page, "Forced")
    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=20_000)
    expect(page.locator("[data-testid=transport]")).to_have_text("sse")


def test_the_stop_button_cancels_and_keeps_the_partial_answer(page, paced_server):
    page.goto(paced_server.url)
    send(page, "Stop me halfway")
    page.wait_for_function(
        "() => (document.querySelector('[data-testid=message][data-role=assistant] [data-testid=message-text]')"
        "?.textContent.length ?? 0) > 10")
    page.click("[data-testid=stop]")

    expect(page.locator(ANSWER)).to_have_attribute("data-state", "cancelled", timeout=20_000)
    shown = page.locator(f"{ANSWER} [data-testid=message-text]").text_content()
    saved = saved_messages(paced_server, conversation_in_url(page))[-1]
    assert (saved["status"], saved["content"]) == ("cancelled", shown)
    assert demo_answer("Stop me halfway").startswith(shown) and shown != demo_answer("Stop me halfway")


def test_model_and_user_text_are_shown_as_text_never_as_html(page, paced_server):
    page.goto(paced_server.url)
    hostile = '<img src=x onerror="window.pwned=1"><b>bold</b>'
    send(page, hostile)
    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=20_000)

    expect(page.locator("[data-testid=message][data-role=user] [data-testid=message-text]")).to_have_text(hostile)
    assert page.locator("[data-testid=messages] img, [data-testid=messages] b").count() == 0
    assert page.evaluate("window.pwned") is None


def test_the_page_fits_a_phone_screen(page, paced_server):
    page.set_viewport_size({"width": 375, "height": 740})
    page.goto(paced_server.url)
    send(page, "Small screen")
    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=20_000)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    save_screenshot(page, "chat-phone")
