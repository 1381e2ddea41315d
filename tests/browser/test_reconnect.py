"""In Chromium: the page finishes the same answer after its connection drops mid-answer."""

from __future__ import annotations

import httpx
from playwright.sync_api import Page, expect

from ..relay_clients import demo_answer

ANSWER = "[data-testid=message][data-role=assistant]"

# Records every data-state the answer goes through, however brief.
WATCH_STATES = """() => {
  window.answerStates = [];
  new MutationObserver(() => {
    const m = document.querySelector('[data-testid=message][data-role=assistant]');
    if (m && window.answerStates[window.answerStates.length - 1] !== m.dataset.state) {
      window.answerStates.push(m.dataset.state);
    }
  }).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['data-state']});
}"""


def saved_answer(server, page: Page) -> dict:
    page.wait_for_function("() => location.hash.startsWith('#c=')")
    conversation_id = page.evaluate("location.hash.slice(3)")
    return httpx.get(f"{server.url}/api/conversations/{conversation_id}/messages").json()["messages"][-1]


def test_a_websocket_cut_mid_answer_resumes_and_finishes_the_same_answer(page, paced_server):
    sockets = []

    def cut_the_first_socket_after_eight_chunks(ws):
        server = ws.connect_to_server()
        sockets.append(ws)
        first = len(sockets) == 1
        chunks = 0

        def to_page(message):
            nonlocal chunks
            ws.send(message)
            if first and '"event":"chunk"' in message:
                chunks += 1
                if chunks == 8:  # the network goes away mid-answer
                    ws.close(code=4000)
                    server.close()

        server.on_message(to_page)

    page.route_web_socket("**/api/command-center/ws", cut_the_first_socket_after_eight_chunks)
    page.goto(paced_server.url)
    page.evaluate(WATCH_STATES)
    page.fill("[data-testid=message-input]", "Survive the drop")
    page.keyboard.press("Enter")

    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=30_000)
    shown = page.locator(f"{ANSWER} [data-testid=message-text]").text_content()
    assert shown == demo_answer("Survive the drop")
    assert saved_answer(paced_server, page)["content"] == shown
    assert "reconnecting" in page.evaluate("window.answerStates")
    assert len(sockets) == 2


def test_an_sse_response_cut_mid_answer_resumes_with_last_event_id(page, paced_server):
    resumed_from = []

    def cut_after_ten_events(route):
        response = route.fetch()
        events = response.text().split("\n\n")
        route.fulfill(response=response, body="\n\n".join(events[:10]) + "\n\n")

    page.route("**/api/command-center/message", cut_after_ten_events)
    page.on("request", lambda request: "/streams/" in request.url and resumed_from.append(
        request.headers.get("last-event-id") or request.url))
    page.goto(paced_server.url)
    page.check("[data-testid=force-sse]")
    page.evaluate(WATCH_STATES)
    page.fill("[data-testid=message-input]", "Cut my SSE")
    page.keyboard.press("Enter")

    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=30_000)
    shown = page.locator(f"{ANSWER} [data-testid=message-text]").text_content()
    assert shown == demo_answer("Cut my SSE")
    assert saved_answer(paced_server, page)["content"] == shown
    assert resumed_from[0] == "10"


def test_the_network_going_down_mid_answer_is_noticed_and_the_answer_finishes_when_it_is_back(
        page, make_server):
    # Keepalives every second, and the page's stall watchdog told so: a dead link shows within ~2.5 s.
    server = make_server({"RELAY_OFFLINE_DELAY_MS": "60", "RELAY_KEEPALIVE_SECONDS": "1"})
    page.goto(server.url + "/?keepaliveMs=1000")
    page.evaluate(WATCH_STATES)
    page.fill("[data-testid=message-input]", "Going through a tunnel")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => (document.querySelector('[data-testid=message][data-role=assistant] [data-testid=message-text]')"
        "?.textContent.length ?? 0) > 20")

    page.context.set_offline(True)
    page.wait_for_function("() => window.answerStates.includes('reconnecting')", timeout=15_000)
    expect(page.locator(f"{ANSWER} [data-testid=message-status]")).to_contain_text("Reconnecting")
    page.context.set_offline(False)

    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=30_000)
    shown = page.locator(f"{ANSWER} [data-testid=message-text]").text_content()
    assert shown == demo_answer("Going through a tunnel")
    assert saved_answer(server, page)["content"] == shown
