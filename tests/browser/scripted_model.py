"""A Messages API on 127.0.0.1 that answers what the test wrote for it: the browser tests' model.

The offline model only quotes the user's first words; a page that renders Markdown needs a model that says a
whole table, or an XSS corpus, word for word. ScriptedModel answers a prompt it has a script for with that
script's text, cut into small deltas sent a few milliseconds apart (so the page renders it while it streams,
over many frames); any other prompt gets "Answer N to: PROMPT", N counting the requests. A request that ends
with an assistant turn (a continue) gets CONTINUATION. Every request body is kept in `requests`.

A plain threaded HTTP/1.1 server, so the sync Playwright tests need no event loop for it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..fakes import anthropic_events

CONTINUATION = " and here the cut-off answer goes on to its end."


@dataclass(frozen=True)
class Scripted:
    """What the model says to one prompt, and why it stops ("max_tokens": an answer to continue)."""

    text: str
    stop_reason: str = "end_turn"


def text_of(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    return "".join(str(block.get("text", "")) for block in content if isinstance(block, dict))


def deltas(text: str, size: int = 4) -> list[str]:
    """`text` in pieces of `size` characters: a Markdown construct arrives split across many deltas."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


class ScriptedModel:
    """POST /v1/messages answered from `scripts` (prompt -> Scripted), at `delay_ms` per delta."""

    def __init__(self, scripts: dict[str, Scripted] | None = None, delay_ms: float = 3) -> None:
        self.scripts = dict(scripts or {})
        self.delay = delay_ms / 1000
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
                answer = owner.answer(body)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                events = anthropic_events(deltas(answer.text), stop_reason=answer.stop_reason)
                try:
                    for index, event in enumerate(events):
                        if 3 <= index < len(events) - 3:  # between the text deltas, as a model writes
                            time.sleep(owner.delay)
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the relay cancelled the answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="scripted-model", daemon=True)
        self.thread.start()

    def answer(self, request: dict[str, Any]) -> Scripted:
        with self._lock:
            self.requests.append(request)
            count = len(self.requests)
        messages = request.get("messages") or [{}]
        if messages[-1].get("role") == "assistant":
            return Scripted(CONTINUATION)
        prompt = text_of(messages[-1])
        return self.scripts.get(prompt) or Scripted(f"Answer {count} to: {prompt}")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
