"""The demo page's context meter and its "not sent to the model" note, in real Chromium, against a relay whose
mock upstream holds only 300 tokens (`--context-window 300`): the relay learns that window from the first
refusal, retries shorter, and leaves the oldest turns out from then on."""

from __future__ import annotations

import httpx
from playwright.sync_api import expect

from .conftest import save_screenshot
from .test_chat_page import ANSWER, conversation_in_url, saved_messages, send


def test_the_context_meter_shows_the_requests_tokens_and_the_note_counts_the_messages_left_out(
        page, make_server, make_upstream):
    """The meter's figures are the request's own token count (the saved answer's input tokens, which the
    emulated model reports as the request's count) over the model's window; after the refusal the window is
    the one learned, and the note says how many messages were not sent.

    Mutation: showContext ignoring cost.truncatedMessages leaves the note hidden after the second answer (its
    start said 0); the meter using inputTokens of another answer shows other figures."""
    upstream = make_upstream("--context-window", "300", "--words", "5", "--delay-ms", "0")
    server = make_server({"ANTHROPIC_API_KEY": "sk-browser-tests", "ANTHROPIC_BASE_URL": upstream.url,
                          "RELAY_MAX_TOKENS": "100"})
    page.goto(server.url)
    meter, figures, note = (page.locator(f"[data-testid={name}]")
                            for name in ("context-meter", "context-figures", "context-note"))
    expect(meter).to_be_hidden()

    send(page, "1 " + "x" * 400)
    expect(page.locator(ANSWER).nth(0)).to_have_attribute("data-state", "complete", timeout=20_000)
    conversation_id = conversation_in_url(page)
    first = saved_messages(server, conversation_id)[-1]
    expect(figures).to_have_text(f"{first['inputTokens']} / 200,000 tokens")
    expect(note).to_be_hidden()

    send(page, "2 " + "x" * 400)
    expect(page.locator(ANSWER).nth(1)).to_have_attribute("data-state", "complete", timeout=20_000)
    second = saved_messages(server, conversation_id)[-1]
    assert second["role"] == "assistant" and second["status"] == "complete"
    expect(figures).to_have_text(f"{second['inputTokens']} / 300 tokens")
    expect(note).to_have_text("2 earlier messages are not sent to the model.")
    used = page.eval_on_selector("[data-testid=context-used]", "m => m.value")
    assert abs(used - second["inputTokens"] / 300) < 1e-9
    assert httpx.get(f"{upstream.url}/stats").json()["refused"] == 1
    save_screenshot(page, "chat-context-meter")

    send(page, "3 " + "x" * 400)
    expect(page.locator(ANSWER).nth(2)).to_have_attribute("data-state", "complete", timeout=20_000)
    expect(note).to_have_text("4 earlier messages are not sent to the model.")
    assert httpx.get(f"{upstream.url}/stats").json()["refused"] == 1  # planned up front: no second refusal
