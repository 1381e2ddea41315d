"""In Chromium: the browser's own EventSource (not the bundled client) against the relay, through a proxy that
cuts the connection mid-answer. Its automatic reconnect resumes with Last-Event-ID; after `done`, and for a
stream it cannot have, it stops instead of reconnecting every few seconds for as long as the page is open.
"""

from __future__ import annotations

import json

from ..proxy import TcpProxy

STREAMS = "GET /api/command-center/streams/"

# The page's EventSource: every event it dispatches, and its connection failures with the state they left.
OPEN_EVENTSOURCE = """(path) => {
  window.seen = [];
  const source = window.source = new EventSource(path);
  for (const name of ['start', 'chunk', 'cost', 'done']) {
    source.addEventListener(name, (e) => window.seen.push([name, e.lastEventId, e.data]));
  }
  // A server `error` event has data; a failed or refused connection has none.
  source.addEventListener('error', (e) => window.seen.push(
    e.data != null ? ['error', e.lastEventId, e.data] : ['failed', String(source.readyState), null]));
}"""


def test_a_native_eventsource_cut_mid_answer_gets_the_saved_answer_and_stops_after_done(page, make_server):
    """Fails without the 204 at the end of a finished stream (sse.get_stream): the EventSource reconnects after
    `done` every few seconds, gets an empty 200 each time and never reaches CLOSED."""
    server = make_server({"RELAY_OFFLINE_DELAY_MS": "50", "RELAY_OFFLINE_WORDS": "40"})

    def cut_the_first_stream_after_ten_chunks(number: int, requests: list[str], answered: bytes) -> bool:
        return proxy.cuts == 0 and any(r.startswith(STREAMS) for r in requests) \
            and answered.count(b"event: chunk") >= 10

    with TcpProxy(server.port, cut_rule=cut_the_first_stream_after_ten_chunks) as proxy:
        page.goto(proxy.url + "/healthz")  # any page of the relay's origin
        started = page.evaluate("""async () => (await fetch('/api/command-center/message', {method: 'POST',
            headers: {'Content-Type': 'application/json', Accept: 'application/json'},
            body: JSON.stringify({message: 'Cut my EventSource'})})).json()""")
        page.evaluate(OPEN_EVENTSOURCE, f"/api/command-center/streams/{started['streamId']}")

        # CLOSED: the browser will not connect again. The guard covers the cut, its reconnect and the one after done.
        page.wait_for_function("() => window.source.readyState === 2", timeout=60_000)
        seen = page.evaluate("window.seen")
        requests = [line for line in proxy.requests if line.startswith(STREAMS)]
        cuts = proxy.cuts

    events = [(name, int(event_id), json.loads(data)) for name, event_id, data in seen if name != "failed"]
    ids = [event_id for _, event_id, _ in events]
    assert ids == list(range(1, len(ids) + 1)), "every event once, in order, across the cut"
    assert [name for name, _, _ in events][-2:] == ["cost", "done"]
    text = "".join(data["text"] for name, _, data in events if name == "chunk")
    saved = server.rows("SELECT status, content FROM messages WHERE id = ?", events[-1][2]["messageId"])
    assert saved == [("complete", text)]
    assert cuts == 1
    # The first request, its reconnect after the cut, and one after done (a 204), which closed it: the cut and
    # the end of the second response had it reconnect (CONNECTING, 0), the 204 did not (CLOSED, 2).
    assert len(requests) == 3, requests
    assert [entry[1] for entry in seen if entry[0] == "failed"] == ["0", "0", "2"]


def test_a_native_eventsource_for_an_unknown_stream_makes_one_request_and_stops(page, make_server):
    """Fails if an unknown stream answers 200 (before: one `error` event framed `id: 0`, after which the
    browser reconnected every few seconds, with a Last-Event-ID of 0)."""
    server = make_server()
    with TcpProxy(server.port) as proxy:
        page.goto(proxy.url + "/healthz")
        page.evaluate(OPEN_EVENTSOURCE, "/api/command-center/streams/0123456789abcdef")
        page.wait_for_function("() => window.source.readyState === 2", timeout=30_000)
        assert page.evaluate("window.seen") == [["failed", "2", None]]
        assert [line for line in proxy.requests if line.startswith(STREAMS)] == [
            "GET /api/command-center/streams/0123456789abcdef"]
