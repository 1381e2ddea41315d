"""The demo page with an agent that searches the web, calls the app's tool and sees images (issue 19), in Chromium.

The relay's offline model answers "[search]" with a web search and citations and "[tool]" with a call of the
agent's first tool, which the relay posts to this test's tool endpoint. The page must show each step live and
again after a reload, from the saved message's blocks.
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import Page, expect

from ..conftest import RelayServer, assert_no_traceback
from .conftest import save_screenshot

ANSWER = "[data-testid=message][data-role=assistant]"
USER = "[data-testid=message][data-role=user]"
TOOL_ANSWER = "It is 4 °C and raining in Oslo."
# The 2x2 PNG sent, decoded and shown in the user's message.
THUMBNAIL_LOADED = ("() => document.querySelector('[data-role=user] [data-testid=attachment-thumbnail]')"
                    "?.naturalWidth === 2")


def tiny_png() -> bytes:
    """A valid 2x2 PNG: the server reads the media type from the bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"\xd0\x50\x28" * 2 for _ in range(2))
    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class ToolEndpoint(BaseHTTPRequestHandler):
    """The app's toolsUrl: answers every call with TOOL_ANSWER and keeps the calls it got."""

    calls: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append(json.loads(body))
        answer = json.dumps({"content": TOOL_ANSWER, "isError": False}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def tool_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ToolEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/tools"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def rich_server(tmp_path_factory, tool_endpoint) -> Iterator[RelayServer]:
    """The page's default agent thinks, searches the web and has one tool of the app's."""
    tmp = tmp_path_factory.mktemp("rich")
    agents = tmp / "agents.json"
    agents.write_text(json.dumps({"agents": [{
        "id": "default",
        "system": "Answer with the tools you have.",
        "maxTokens": 4096,
        "thinking": {"budgetTokens": 1024},
        "serverTools": [{"type": "web_search", "maxUses": 3}],
        "tools": [{
            "name": "get_weather",
            "description": "The weather in a city now.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }],
        "toolsUrl": tool_endpoint,
    }]}))
    relay = RelayServer(tmp, {"RELAY_AGENTS_FILE": str(agents), "RELAY_TOOLS_SECRET": "browser-tests",
                              "RELAY_OFFLINE_DELAY_MS": "10"})
    yield relay
    relay.stop()
    assert_no_traceback(relay)


def send(page: Page, text: str) -> None:
    page.fill("[data-testid=message-input]", text)
    page.keyboard.press("Enter")


def check_search_and_citations(page: Page, answer) -> None:
    search = answer.locator("[data-testid=search-step]")
    expect(search).to_have_count(1)
    expect(search.locator("summary")).to_contain_text("Searched the web for")
    sources = search.locator("[data-testid=search-sources] a")
    assert sources.count() > 0
    hrefs = set(sources.evaluate_all("links => links.map((a) => a.href)"))
    citations = answer.locator("[data-testid=message-text] [data-testid=citation]")
    assert citations.count() > 0
    texts = citations.all_text_contents()
    assert texts == [f"[{n}]" for n in range(1, len(texts) + 1)], texts
    # Each citation links to one of the sources (hrefs as the browser resolved them), its title the tooltip.
    links = citations.locator("a").evaluate_all("links => links.map((a) => [a.href, a.title])")
    assert links, "no citation is a link"
    for href, tooltip in links:
        assert href in hrefs, (href, hrefs)
        assert tooltip


def check_tool_call(page: Page, answer) -> None:
    tool = answer.locator("[data-testid=tool-call]")
    expect(tool).to_have_count(1)
    expect(tool.locator("[data-testid=tool-name]")).to_have_text("get_weather")
    call = ToolEndpoint.calls[-1]["call"]
    assert json.loads(tool.locator("[data-testid=tool-input]").text_content()) == call["input"]
    result = tool.locator("[data-testid=tool-result]")
    expect(result).to_have_text(TOOL_ANSWER)
    expect(result).to_have_attribute("data-error", "false")


def test_the_page_shows_search_sources_citations_a_tool_call_and_an_image_thumbnail(page, rich_server, tmp_path):
    image = tmp_path / "dot.png"
    image.write_bytes(tiny_png())
    page.goto(rich_server.url)

    # Attached with the button's file input: a thumbnail waits in the composer, then goes with the message.
    page.set_input_files("[data-testid=attach-input]", str(image))
    expect(page.locator("[data-testid=composer-attachments] [data-testid=attachment-thumbnail]")).to_have_count(1)
    send(page, "[search] What is in this picture, and where is it from?")
    first = page.locator(ANSWER).nth(0)
    expect(first).to_have_attribute("data-state", "complete", timeout=20_000)
    expect(page.locator("[data-testid=composer-attachments]")).to_be_hidden()
    expect(page.locator(f"{USER} [data-testid=attachment-thumbnail]")).to_have_count(1)
    page.wait_for_function(THUMBNAIL_LOADED)
    expect(first.locator("[data-testid=message-thinking]")).to_be_visible()
    check_search_and_citations(page, first)

    send(page, "[tool] And the weather in Oslo?")
    second = page.locator(ANSWER).nth(1)
    expect(second).to_have_attribute("data-state", "complete", timeout=20_000)
    check_tool_call(page, second)
    save_screenshot(page, "rich-live")

    # A reload shows the conversation from the REST API's blocks, as the stream showed it.
    page.reload()
    expect(page.locator(ANSWER)).to_have_count(2, timeout=20_000)
    check_search_and_citations(page, page.locator(ANSWER).nth(0))
    check_tool_call(page, page.locator(ANSWER).nth(1))
    expect(page.locator(f"{USER} [data-testid=attachment-thumbnail]")).to_have_count(1)
    page.wait_for_function(THUMBNAIL_LOADED)
    save_screenshot(page, "rich-reloaded")
