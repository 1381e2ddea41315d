"""Hypothesis against a real server: every HTTP endpoint and WebSocket frame type with hostile input.

Whatever arrives — malformed JSON, wrong types, huge or deeply nested values, unicode edge
cases, unknown fields — the answer is a 4xx JSON body or an `error` event, never a 5xx or a
traceback; a rejected request saves nothing; and the server keeps answering.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from .conftest import RelayServer, assert_no_traceback

FRAME_LIMIT = 65536
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = ["message", "agentId", "conversationId", "requestId", "type", "streamId", "lastEventId", "token", "extra"]
FRAME_TYPES = ["message", "resume", "cancel", "ping", "Message", "", "unknown"]

# Text with the awkward parts of unicode: astral characters, combining marks, RTL and zero-width
# characters, line separators, NUL; lone surrogates come in through the raw-bytes strategy below.
edge_text = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from(
        ["\u2028", "\u2029", "\u0085", "\x00", "\ufeff", "\u200b", "\u202e", "\U0001f600", "\u0301", "\r", "\n"])),
    max_size=40,
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False), edge_text, st.text(min_size=3000, max_size=5000),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | edge_text, inner, max_size=4)),
    max_leaves=12)
objects = st.dictionaries(st.sampled_from(KEYS) | edge_text, json_values, max_size=6)
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b"[]", b"null", b'"x"', b'{"message": "\\ud800"}', b"\xff\xfe{}",
                     b'{"message": "a", "message": 5}', b"[" * 5000 + b"]" * 5000,
                     b'{"a":' * 2000 + b"1" + b"}" * 2000, b'{"message": "' + b"x" * 300_000 + b'"}']),
)


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


bodies = st.one_of(objects.map(encode), json_values.map(encode), raw_bodies)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayServer]:
    server = RelayServer(tmp_path_factory.mktemp("fuzz"), {
        "RELAY_OFFLINE_WORDS": "3", "RELAY_LIMIT_REQUESTS_PER_MINUTE": "0", "RELAY_MAX_MESSAGE_BYTES": "4096",
        "RELAY_WS_MAX_FRAME_BYTES": str(FRAME_LIMIT),
    })
    yield server
    assert httpx.get(server.url + "/healthz").status_code == 200
    server.stop()
    assert_no_traceback(server)


@pytest.fixture(scope="module")
def http(target: RelayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=target.url, timeout=30) as client:
        yield client


def saved(server: RelayServer) -> int:
    return server.count("SELECT COUNT(*) FROM messages")


def check(res: httpx.Response, server: RelayServer, before: int) -> None:
    assert res.status_code < 500, res.text
    if res.status_code >= 400:
        error = res.json()["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)
        assert saved(server) == before, "a rejected request saved something"


@FUZZ
@given(body=bodies, content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form"]))
def test_post_message_with_any_body(http, target, body, content_type):
    before = saved(target)
    res = http.post("/api/command-center/message", content=body,
                    headers={"Content-Type": content_type, "Accept": "application/json"})
    check(res, target, before)
    if res.status_code == 202:
        assert saved(target) == before + 2


@FUZZ
@given(stream_id=edge_text | st.text(min_size=150, max_size=400), cursor=edge_text | st.integers().map(str),
       accept=st.sampled_from(["application/json", "text/event-stream", "*/*"]))
def test_read_cancel_and_list_with_any_ids(http, target, stream_id, cursor, accept):
    before = saved(target)
    safe_id = quote(stream_id, safe="") or "x"
    headers = {"Accept": accept}
    # Any value HTTP allows in a header (others are the HTTP parser's business, answered before the app).
    if cursor.isascii() and cursor.isprintable() and cursor.strip() == cursor:
        headers["Last-Event-ID"] = cursor
    for method, path in (
        ("GET", f"/api/command-center/streams/{safe_id}"),
        ("GET", f"/api/command-center/streams/{safe_id}?lastEventId={quote(cursor, safe='')}"),
        ("POST", f"/api/command-center/streams/{safe_id}/cancel"),
        ("GET", f"/api/conversations/{safe_id}/messages"),
        ("GET", f"/api/conversations?all={quote(cursor, safe='')}"),
    ):
        check(http.request(method, path, headers=headers), target, before)


@FUZZ
@given(body=bodies)
def test_sign_in_with_any_body(http, target, body):
    res = http.post("/api/session", content=body, headers={"Content-Type": "application/json"})
    check(res, target, saved(target))
    assert "set-cookie" not in res.headers


class Sockets:
    """The fuzzing socket; a new one when the server closed the last (an oversized frame)."""

    def __init__(self, url: str, stack: ExitStack) -> None:
        self.url = url
        self.stack = stack
        self.current = self.open()

    def open(self) -> ClientConnection:
        self.current = self.stack.enter_context(connect(self.url, max_size=None))
        return self.current


@pytest.fixture(scope="module")
def socket(target: RelayServer) -> Iterator[Sockets]:
    with ExitStack() as stack:
        yield Sockets(target.ws_url + "/api/command-center/ws", stack)


def frames() -> st.SearchStrategy[str | bytes]:
    typed = st.builds(lambda kind, rest: {**rest, "type": kind}, st.sampled_from(FRAME_TYPES) | json_values, objects)
    return st.one_of(typed.map(lambda v: encode(v).decode("utf-8", "surrogatepass")),
                     objects.map(lambda v: encode(v).decode("utf-8", "surrogatepass")),
                     raw_bodies.map(lambda b: b.decode("utf-8", "replace")), st.binary(max_size=100))


@FUZZ
@given(frame=frames())
def test_websocket_frames_of_every_type(target, socket, frame):
    before = saved(target)
    ws = socket.current
    try:
        size = len(frame if isinstance(frame, bytes) else frame.encode("utf-8"))
    except UnicodeEncodeError:
        return  # a lone surrogate cannot be sent as text by a conforming client
    ws.send(frame)
    if size > FRAME_LIMIT:
        # Over the frame limit: that socket is closed with 1009 ("message too big"), nothing else happens.
        socket.open()  # the next example gets a fresh socket whatever happens here
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(10_000):  # frames of earlier examples' streams may still be on their way
                ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert saved(target) == before
        return
    # A ping after the frame: every answer to the frame comes first, then the pong.
    ws.send('{"type": "ping"}')
    answers = []
    while True:
        answer = json.loads(ws.recv(timeout=30))
        if answer.get("event") == "pong":
            break
        answers.append(answer)
    errors = [a for a in answers if a["event"] == "error" and a.get("id") is None]
    started = [a for a in answers if a["event"] == "start"]
    for error in errors:
        assert isinstance(error["data"]["code"], str) and error["data"]["code"] != "internal_error"
    if errors and not started:
        assert saved(target) == before, "a rejected frame saved something"


def test_the_server_still_answers_after_the_fuzzing(target):
    res = httpx.post(target.url + "/api/command-center/message", json={"message": "still fine?"},
                     headers={"Accept": "application/json"})
    assert res.status_code == 202
