"""The same answer gives identical events over SSE and WebSocket."""

from __future__ import annotations

from .relay_clients import sse_stream, ws_stream

_IDS = {"streamId", "conversationId", "messageId", "parentId", "userMessageId"}


def _normalised(events):
    return [(event_id, name, {k: ("<id>" if k in _IDS else v) for k, v in data.items()})
            for event_id, name, data in events]


async def test_sse_and_websocket_carry_identical_events(server):
    over_sse = await sse_stream(server.url, {"message": "parity check"})
    over_ws = await ws_stream(server.ws_url, {"message": "parity check"})

    assert _normalised(over_sse) == _normalised(over_ws)
    assert len(over_sse) > 10
