"""The examples run as their READMEs say: examples/tools (an agent that thinks, searches the web and calls the
app's get_weather at tools_app.py, the offline model answering)."""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from .conftest import free_port
from .relay_clients import sse_stream, ws_stream

EXAMPLE = Path(__file__).parent.parent / "examples" / "tools"
SECRET = "examples-secret"


@pytest.fixture
def tools_app() -> Iterator[str]:
    """examples/tools/tools_app.py on a free port: its tools URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(EXAMPLE / "tools_app.py"), "--port", str(port)],
                               env={"RELAY_TOOLS_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("tools on http://127.0.0.1:")  # listening
        yield f"http://127.0.0.1:{port}/tools"
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_the_tools_example_thinks_searches_and_calls_get_weather(tmp_path, make_server, tools_app, transport):
    """The example's agents file, its toolsUrl pointed at the running tools_app.py: `[search] [tool]` gives
    thinking, a search with results and citations, the tool's forecast (its signature checked by the app: a
    bad one would be a 401 and an error result) and an answer that quotes it."""
    document = orjson.loads((EXAMPLE / "agents.json").read_bytes())
    document["agents"][0]["toolsUrl"] = tools_app
    agents = tmp_path / "agents.json"
    agents.write_bytes(orjson.dumps(document))
    server = make_server({"RELAY_AGENTS_FILE": str(agents), "RELAY_TOOLS_SECRET": SECRET})
    body = {"message": "[search] [tool] Oslo"}
    events = await (sse_stream(server.url, body) if transport == "sse" else ws_stream(server.ws_url, body))
    names = [name for _, name, _ in events]
    for name in ("thinking", "search", "search_results", "citation", "tool_use", "tool_result"):
        assert name in names, (name, names)
    result = next(data for _, name, data in events if name == "tool_result")
    assert result["isError"] is False and result["content"] == "25 degrees and cloudy in Oslo", result
    assert result["content"] in "".join(data["text"] for _, name, data in events if name == "chunk")
    assert events[-1][1] == "done" and events[-1][2]["stopReason"] == "end_turn"


async def test_the_tools_example_refuses_a_call_without_the_signature(tools_app):
    body = orjson.dumps({"call": {"id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}})
    async with httpx.AsyncClient() as client:
        unsigned = await client.post(tools_app, content=body, headers={"X-Deltarelay-Signature": "sha256=00"})
        good = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        signed = await client.post(tools_app, content=body, headers={"X-Deltarelay-Signature": good})
    assert unsigned.status_code == 401
    assert signed.status_code == 200 and signed.json()["content"].endswith("in Oslo")
