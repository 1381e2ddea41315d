"""RelayApp takes POST /api/command-center/message before Starlette's middleware: same outcomes, in-process."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from server.app import create_app
from server.auth import ANONYMOUS
from server.config import Settings, load_settings
from server.errors import NotFoundError


class FakeRelay:
    def __init__(self, failure: Exception) -> None:
        self.failure = failure
        self.settings = SimpleNamespace(max_message_bytes=1000, cancel_on_disconnect=False,
                                        max_attachment_bytes=Settings().max_attachment_bytes)
        self.limits = SimpleNamespace(take_connection=lambda user: None, give_connection=lambda user: None)

    async def admit(self, scope: Any) -> Any:
        return ANONYMOUS

    async def start(self, command: Any, user: Any = ANONYMOUS) -> Any:
        raise self.failure


async def call(app: Any, method: str, body: bytes = b'{"message": "hi"}',
               messages: list | None = None) -> tuple[int, dict[str, Any], list]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": "/api/command-center/message", "raw_path": b"/api/command-center/message", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8000)}
    messages = [] if messages is None else messages
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return response_of(messages)


def response_of(messages: list) -> tuple[int, dict[str, Any], list]:
    start = next(m for m in messages if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], json.loads(payload), messages


@pytest.fixture
def app(tmp_path):
    return create_app(load_settings({}, database_url=f"sqlite:///{tmp_path}/app.db"))


async def test_a_relay_error_is_its_json_error(app):
    app.state.relay = FakeRelay(NotFoundError("agent nobody not found"))
    status, payload, _ = await call(app, "POST")
    assert status == 404 and payload["error"]["code"] == "not_found"


async def test_bad_input_is_a_400_before_the_relay_is_asked(app):
    app.state.relay = FakeRelay(AssertionError("not reached"))
    status, payload, _ = await call(app, "POST", b'{"nomessage": 1}')
    assert status == 400 and payload["error"]["code"] == "invalid_request"


async def test_any_other_failure_is_a_logged_500_and_is_raised_to_the_server(app, caplog):
    app.state.relay = FakeRelay(RuntimeError("boom"))
    messages: list = []
    with pytest.raises(RuntimeError, match="boom"):
        await call(app, "POST", messages=messages)
    status, payload, _ = response_of(messages)  # the 500 went out before the exception reached the server
    assert status == 500 and payload["error"]["code"] == "internal_error"
    assert "unhandled error on POST /api/command-center/message" in caplog.text


async def test_other_methods_still_go_through_the_router(app):
    status, payload, _ = await call(app, "GET")
    assert status == 405 and payload["error"]["code"] == "method_not_allowed"
