"""The embedding app's tools: each call the model makes is POSTed, signed, to the agent's toolsUrl.

I/O lives here (httpx); the tool loop that uses it is in core.py. A call never raises for what the app
did: a status other than 200, a timeout, a refused connection or a malformed body become an error result
with a short message, which the model sees as an `is_error` tool_result. Nothing here logs the secret or the
app's body.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from .events import ToolResult
from .upstream.proxies import ProxyEnvironment

log = logging.getLogger("deltarelay.tools")

SIGNATURE_HEADER = "X-Deltarelay-Signature"
#: An app's answer to one call is read up to this many bytes; a longer one is an error result.
MAX_RESULT_BYTES = 1024 * 1024


def signature(body: bytes, secret: str) -> str:
    """The X-Deltarelay-Signature value of `body`: `sha256=` and the hex HMAC-SHA256 of the body under `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def call_body(conversation_id: str, message_id: str, user_id: str | None, user_name: str,
              call: dict[str, Any]) -> bytes:
    """The request body of one call, compact JSON: the bytes signed are the bytes sent."""
    return orjson.dumps({
        "conversationId": conversation_id, "messageId": message_id, "user": {"id": user_id, "name": user_name},
        "call": {"id": call["id"], "name": call["name"], "input": call["input"]},
    })


@dataclass(frozen=True, slots=True)
class ToolEndpoint:
    """Where an agent's tools run and how their calls are signed and bounded."""

    url: str
    secret: str
    timeout: float = 10.0
    proxies: ProxyEnvironment | None = None

    def client(self) -> httpx.AsyncClient:
        """A client for one round of calls (closed by the caller), through the proxy the environment names."""
        proxy = self.proxies.proxy_for(httpx.URL(self.url)) if self.proxies is not None else None
        return httpx.AsyncClient(proxy=proxy.httpx_proxy() if proxy is not None else None, trust_env=False,
                                 timeout=httpx.Timeout(self.timeout), follow_redirects=False)

    async def run(self, calls: list[dict[str, Any]], conversation_id: str, message_id: str,
                  user_id: str | None, user_name: str) -> list[ToolResult]:
        """The results of one round's calls, in the calls' order; the calls run concurrently.

        Cancelled (the answer was), every call still running is cancelled with it: its connection closed.
        """
        async with self.client() as client:
            return list(await asyncio.gather(*(
                self.call(client, call, conversation_id, message_id, user_id, user_name) for call in calls)))

    async def call(self, client: httpx.AsyncClient, call: dict[str, Any], conversation_id: str, message_id: str,
                   user_id: str | None, user_name: str) -> ToolResult:
        """One call's result: the app's `content` and `isError`, or an error result saying what went wrong."""
        body = call_body(conversation_id, message_id, user_id, user_name, call)
        headers = {"content-type": "application/json", SIGNATURE_HEADER: signature(body, self.secret)}
        name = call["name"]
        try:
            async with asyncio.timeout(self.timeout):
                async with client.stream("POST", self.url, content=body, headers=headers) as response:
                    if response.status_code != 200:
                        log.warning("tool %s: %s answered HTTP %d", name, self.url, response.status_code)
                        return _error(call, f"the tool {name} failed: its endpoint answered HTTP"
                                            f" {response.status_code}")
                    received = b""
                    async for part in response.aiter_bytes():
                        received += part
                        if len(received) > MAX_RESULT_BYTES:
                            return _error(call, f"the tool {name} answered more than {MAX_RESULT_BYTES} bytes")
        except TimeoutError:
            log.warning("tool %s: %s did not answer within %.1f s", name, self.url, self.timeout)
            return _error(call, f"the tool {name} did not answer within {self.timeout:g} seconds")
        except httpx.HTTPError as exc:
            log.warning("tool %s: %s could not be reached (%s)", name, self.url, type(exc).__name__)
            return _error(call, f"the tool {name} could not be reached ({type(exc).__name__})")
        return _parsed(call, received)


def _parsed(call: dict[str, Any], body: bytes) -> ToolResult:
    """The result in a 200 answer's body: `{"content": str | [blocks], "isError": bool}` (isError optional)."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    content = answer.get("content") if isinstance(answer, dict) else None
    is_error = answer.get("isError", False) if isinstance(answer, dict) else None
    well_formed = isinstance(content, str) or (
        isinstance(content, list) and all(isinstance(block, dict) and isinstance(block.get("type"), str)
                                          for block in content))
    if not well_formed or not isinstance(is_error, bool):
        log.warning("tool %s: its endpoint's answer is not {\"content\": string or blocks, \"isError\": bool}",
                    call["name"])
        return _error(call, f"the tool {call['name']} gave a malformed answer")
    assert isinstance(content, str | list)
    return ToolResult(call["id"], is_error, content)


def _error(call: dict[str, Any], message: str) -> ToolResult:
    return ToolResult(call["id"], True, message)


def tool_result_block(result: ToolResult) -> dict[str, Any]:
    """The tool_result content block that sends `result` back to the model."""
    return {"type": "tool_result", "tool_use_id": result.id, "content": result.content, "is_error": result.is_error}
