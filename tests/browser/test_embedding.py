"""In Chromium: the embedding example (examples/embedding) streams from a JWT relay with tokens its backend
signs, on 3-second tokens refreshed on the open socket, through a socket cut during a refresh and a token
endpoint that fails once during one."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import jwt
import pytest
from playwright.sync_api import Page, WebSocketRoute, expect

from ..conftest import ROOT, SERVER_PYTHON, Process, RelayServer, _clean_env, assert_no_traceback, free_port
from ..relay_clients import expected_words
from .conftest import save_screenshot

SECRET = "browser-embedding-tests-secret-of-32-bytes-or-more"
ANSWER = "[data-testid=answer]"
EXAMPLE = ROOT / "examples" / "embedding" / "app.py"
WORDS = 60  # at 100 ms a word: about 6 s of answer
ANSWER_TEXT = expected_words(WORDS)


@pytest.fixture(scope="module")
def embedding(tmp_path_factory) -> Iterator[tuple[RelayServer, Process]]:
    """A relay taking HS256 JWTs (no leeway) with answers of about 6 s, and the example app (its tokens live
    3 s) on another origin, which the relay allows for its WebSocket."""
    tmp = tmp_path_factory.mktemp("embedding")
    app_port = free_port()
    relay = RelayServer(tmp, {
        "RELAY_JWT_SECRET": SECRET, "RELAY_JWT_LEEWAY_SECONDS": "0", "RELAY_OFFLINE_DELAY_MS": "100",
        "RELAY_OFFLINE_WORDS": str(WORDS), "RELAY_ALLOWED_ORIGINS": f"http://127.0.0.1:{app_port}",
    })
    try:
        app = Process([SERVER_PYTHON, str(EXAMPLE)], _clean_env({
            "RELAY_JWT_SECRET": SECRET, "RELAY_URL": relay.url, "TOKEN_SECONDS": "3", "PORT": str(app_port),
        }), tmp / "example.log", app_port, "/")
    except BaseException:
        relay.stop()
        raise
    yield relay, app
    app.stop()
    relay.stop()
    assert_no_traceback(relay)
    assert_no_traceback(app)


def saved_answer(relay: RelayServer) -> str:
    """The demo user's latest answer as the relay saved it, read with a token of that user."""
    now = int(time.time())
    token = jwt.encode({"sub": "demo-user-1", "name": "Demo User", "iat": now, "exp": now + 60}, SECRET,
                       algorithm="HS256")
    headers = {"Authorization": f"Bearer {token}"}
    conversations = httpx.get(f"{relay.url}/api/conversations", headers=headers).json()["conversations"]
    messages = httpx.get(f"{relay.url}/api/conversations/{conversations[0]['id']}/messages",
                         headers=headers).json()["messages"]
    return str(messages[-1]["content"])


def ask(page: Page, app: Process, question: str) -> str:
    """Load the example page, ask, and wait for the whole answer: the text shown."""
    page.goto(app.url)
    page.fill("[data-testid=question]", question)
    page.click("[data-testid=send]")
    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=30_000)
    return page.locator(ANSWER).text_content() or ""


def test_the_example_page_streams_with_its_backends_tokens_refreshed_on_the_open_socket(page, embedding):
    relay, app = embedding
    tokens: list[str] = []
    sockets: list[str] = []
    auth_frames: list[str] = []
    page.on("request", lambda request: request.url.endswith("/token") and tokens.append(request.url))

    def watch(ws):
        sockets.append(ws.url)
        ws.on("framesent", lambda payload: '"type":"auth"' in str(payload) and auth_frames.append(str(payload)))

    page.on("websocket", watch)
    shown = ask(page, app, "Stream past my token")
    assert shown == ANSWER_TEXT
    assert saved_answer(relay) == shown
    # About 6 s of answer on 3-second tokens: refreshed on the one socket, ahead of each exp.
    assert len(tokens) >= 3, tokens
    assert len(sockets) == 1
    assert len(auth_frames) == len(tokens)
    save_screenshot(page, "embedding-example")


def test_a_socket_cut_during_a_refresh_resumes_with_the_new_token_and_the_same_answer(page, embedding):
    relay, app = embedding
    sockets: list[WebSocketRoute] = []
    resumed: list[str] = []

    def cut_at_the_first_refresh(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        sockets.append(ws)
        first = len(sockets) == 1
        auths = 0

        def to_server(message: str | bytes) -> None:
            nonlocal auths
            if '"type":"resume"' in str(message):
                resumed.append(str(message))
            if first and '"type":"auth"' in str(message):
                auths += 1
                if auths == 2:  # the network goes away as the refreshed token is sent
                    ws.close(code=4000)
                    server.close()
                    return
            server.send(message)

        ws.on_message(to_server)
        server.on_message(ws.send)

    page.route_web_socket("**/api/command-center/ws", cut_at_the_first_refresh)
    shown = ask(page, app, "Cut my refresh")
    assert shown == ANSWER_TEXT
    assert saved_answer(relay) == shown
    assert len(sockets) == 2
    assert len(resumed) == 1


def test_a_token_endpoint_failing_during_a_refresh_is_tried_again_on_the_same_socket(page, embedding):
    relay, app = embedding
    asked: list[str] = []
    sockets: list[str] = []

    def fail_the_second(route):
        asked.append(route.request.url)
        if len(asked) == 2:
            route.abort("internetdisconnected")
        else:
            route.continue_()

    page.route("**/token", fail_the_second)
    page.on("websocket", lambda ws: sockets.append(ws.url))
    shown = ask(page, app, "Retry my refresh")
    assert shown == ANSWER_TEXT
    assert saved_answer(relay) == shown
    assert len(asked) >= 3
    assert len(sockets) == 1
