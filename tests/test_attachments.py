"""Attachments (issue 19): images and PDFs checked from their bytes, stored once, owned, sent as blocks.

Pure checks first, then a real Relay with a fake upstream that records each request body (what the API
would receive), then real server processes on both transports.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from server.attachments import (
    IMAGE_MAX_BYTES,
    IMAGE_TOKENS,
    PDF,
    PDF_PAGE_TOKENS,
    InlineAttachment,
    checked_media_type,
    decode_base64,
    detect_media_type,
    parse_inline,
)
from server.auth import User
from server.context import estimate_message
from server.errors import BadRequestError, ConflictError, NotFoundError, TooLargeError, UnsupportedMediaTypeError
from server.protocol.frames import Regenerate, SendMessage, parse_send_message
from server.store import Query

from .fakes import FakeUpstream, SSEAnswer, anthropic_events, collect, relay_in_process
from .relay_clients import sse_stream, ws_read_until_end
from .test_access import add_user, bearer
from .test_store import url  # noqa: F401  (the database fixture: SQLite, and PostgreSQL per TEST_DATABASE_URLS)


def png() -> bytes:
    """A valid 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def gif() -> bytes:
    """A valid 1x1 GIF89a."""
    return (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
            b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


def webp() -> bytes:
    """A RIFF/WEBP container with a lossless 1x1 bitstream."""
    vp8l = b"\x2f\x00\x00\x00\x00\x07\x10\x11\x11\x88\x88\xfe\x07\x00"
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg() -> bytes:
    """The start of a JFIF file (SOI, APP0) and its end (EOI): the magic number is what is checked."""
    return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"


def pdf(pages: int = 1) -> bytes:
    """A small valid PDF of `pages` empty pages."""
    kids = " ".join(f"{3 + n} 0 R" for n in range(pages))
    objects = [b"<</Type /Catalog /Pages 2 0 R>>", f"<</Type /Pages /Kids [{kids}] /Count {pages}>>".encode()]
    objects += [b"<</Type /Page /Parent 2 0 R /MediaBox [0 0 3 3]>>"] * pages
    out = b"%PDF-1.4\n"
    for number, body in enumerate(objects, 1):
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    return out + b"trailer\n<</Root 1 0 R>>\n%%EOF\n"


FILES = {"image/png": png, "image/jpeg": jpeg, "image/gif": gif, "image/webp": webp, PDF: pdf}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- checks from the bytes -----------------------------------------------------------------------------


@pytest.mark.parametrize("media_type", list(FILES))
def test_each_media_type_is_told_from_its_bytes(media_type: str) -> None:
    data = FILES[media_type]()
    assert detect_media_type(data) == media_type
    assert checked_media_type(data, media_type, 1 << 20) == media_type
    assert checked_media_type(data, None, 1 << 20) == media_type  # no claim: the bytes decide


def test_bytes_that_do_not_match_the_claim_are_refused_naming_what_they_are() -> None:
    with pytest.raises(UnsupportedMediaTypeError) as refused:
        checked_media_type(png(), "application/pdf", 1 << 20)
    assert refused.value.status == 415 and refused.value.details == {"detectedType": "image/png",
                                                                      "claimedType": "application/pdf"}
    with pytest.raises(UnsupportedMediaTypeError) as other:
        checked_media_type(b"GIF8 not really\x00", "image/gif", 1 << 20)
    assert other.value.to_json()["error"]["detectedType"] is None
    with pytest.raises(UnsupportedMediaTypeError):
        checked_media_type(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", 1 << 20)


def test_sizes_are_limited_per_file_per_message_and_by_the_apis_own_limits() -> None:
    with pytest.raises(TooLargeError):
        checked_media_type(pdf() + b"\x00" * 2000, PDF, 1000)
    with pytest.raises(TooLargeError) as image:  # the API takes no image over 5 MB of base64
        checked_media_type(png() + b"\x00" * IMAGE_MAX_BYTES, "image/png", 1 << 30)
    assert image.value.status == 413 and image.value.code == "too_large"
    with pytest.raises(TooLargeError) as pages:
        checked_media_type(pdf(101), PDF, 1 << 30)
    assert pages.value.details == {"pages": 101, "limit": 100}
    one = {"name": "a.png", "mediaType": "image/png", "data": b64(png())}
    assert len(parse_inline([one, one], 2 * len(png()))) == 2
    with pytest.raises(TooLargeError):  # each fits; together they do not
        parse_inline([one, one], 2 * len(png()) - 1)


@pytest.mark.parametrize("bad", ["not base64!", "aGVsbG8", "aGVs\nbG8=", 12, "aGVsbG8=="])
def test_base64_is_decoded_strictly(bad: Any) -> None:
    with pytest.raises(BadRequestError):
        decode_base64(bad, "data")
    assert decode_base64("aGVsbG8=", "data") == b"hello"


def test_a_message_frame_takes_files_without_text() -> None:
    command = parse_send_message({"attachments": [{"name": "../x.png", "mediaType": "image/png",
                                                   "data": b64(png())}]}, 1000)
    assert command.message == "" and command.attachments[0].name == "x.png"
    assert parse_send_message({"attachmentIds": ["att_1"]}, 1000).attachment_ids == ("att_1",)
    with pytest.raises(BadRequestError):
        parse_send_message({"message": " "}, 1000)


def test_the_context_estimate_counts_an_image_by_its_pixels_and_a_pdf_by_its_pages() -> None:
    big_png = png() + b"\x00" * 3_000_000
    image = {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": b64(big_png)}}]}
    assert estimate_message(image) < 2000  # not a million tokens of base64
    document = {"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": PDF, "data": b64(pdf(7))}, "title": "t.pdf"}]}
    assert estimate_message(document) >= 7 * PDF_PAGE_TOKENS


# --- a real Relay, its requests recorded --------------------------------------------------------------


def answer(text: str = "seen") -> SSEAnswer:
    return SSEAnswer(anthropic_events([text]))


async def until_done(relay: Any, command: SendMessage, user: User) -> list[Any]:
    stream = await relay.start(command, user)
    events = await collect(relay.hub, stream.id)
    assert events[-1][1] == "done", events
    return events


def user_blocks(request_body: dict[str, Any], index: int) -> list[dict[str, Any]]:
    content = request_body["messages"][index]["content"]
    assert isinstance(content, list), content
    return [{key: value for key, value in block.items() if key != "cache_control"} for block in content]


async def test_files_are_sent_upstream_as_blocks_on_every_turn_and_deleted_with_the_conversation(
        tmp_path: Path, url: str) -> None:  # noqa: F811
    async with FakeUpstream() as upstream:
        upstream.answer(answer(), answer(), answer())
        async with relay_in_process(tmp_path, upstream, database_url=url, prompt_cache="5m",
                                    system_prompt="s" * 20_000) as relay:
            store = relay.store
            alice = User(await store.add_user("alice", "h1"), "alice")
            uploaded = await store.add_attachment(alice.id, InlineAttachment("report.pdf", PDF, pdf(2)))
            first = SendMessage("what is in these?", attachment_ids=(uploaded["id"],),
                                attachments=(InlineAttachment("dot.png", "image/png", png()),))
            await until_done(relay, first, alice)
            sent = upstream.requests[0].json()
            assert user_blocks(sent, 0) == [
                {"type": "document", "source": {"type": "base64", "media_type": PDF, "data": b64(pdf(2))},
                 "title": "report.pdf"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(png())}},
                {"type": "text", "text": "what is in these?"},
            ]
            # Prompt caching: the newest user message's mark is on its last block, after the files, so the
            # next turn reads them from the cache.
            assert "cache_control" in sent["messages"][0]["content"][-1]
            assert all("cache_control" not in block for block in sent["messages"][0]["content"][:-1])
            conversation_id = (await store.list_conversations(alice.id))[0]["id"]
            messages = await store.list_messages(conversation_id)
            stored = json.loads(messages[0]["blocks"])[0]["content"]
            assert stored[0] == {"type": "document", "source": {"type": "attachment", "id": uploaded["id"]}}
            assert stored[1]["type"] == "image" and stored[1]["source"]["type"] == "attachment"

            await until_done(relay, SendMessage("and now?", conversation_id=conversation_id), alice)
            second = upstream.requests[1].json()
            assert user_blocks(second, 0) == user_blocks(sent, 0)  # the same prefix, byte for byte
            assert "cache_control" not in second["messages"][0]["content"][-1]
            assert "cache_control" in second["messages"][2]["content"][-1]

            # Regenerating the first answer sends the same message with its files.
            first_answer = messages[1]["id"]
            regenerated = await relay.start(Regenerate(first_answer), alice)
            assert (await collect(relay.hub, regenerated.id))[-1][1] == "done"
            assert user_blocks(upstream.requests[2].json(), 0) == user_blocks(sent, 0)

            rows = await store._fetch_all("SELECT id, message_id FROM attachments")
            assert len(rows) == 2 and all(row[1] == messages[0]["id"] for row in rows)
            await relay.delete_conversation(conversation_id)
            assert await store._fetch_val("SELECT COUNT(*) FROM attachments") == 0


async def test_another_users_or_a_used_attachment_is_refused_with_nothing_saved(
        tmp_path: Path, url: str) -> None:  # noqa: F811
    async with FakeUpstream() as upstream:
        upstream.answer(answer())
        async with relay_in_process(tmp_path, upstream, database_url=url) as relay:
            store = relay.store
            alice = User(await store.add_user("alice", "h1"), "alice")
            bob = User(await store.add_user("bob", "h2"), "bob")
            theirs = await store.add_attachment(alice.id, InlineAttachment("a.png", "image/png", png()))
            with pytest.raises(NotFoundError):
                await relay.start(SendMessage("look", attachment_ids=(theirs["id"],)), bob)
            with pytest.raises(NotFoundError):
                await store.get_attachment(theirs["id"], bob.id)
            # What budgets count for it: its estimate for its owner, nothing for another user.
            assert await store.attachment_tokens((theirs["id"],), alice.id) == IMAGE_TOKENS
            assert await store.attachment_tokens((theirs["id"],), bob.id) == 0
            with pytest.raises(NotFoundError):  # an inline file with it: not saved either
                await relay.start(SendMessage("look", attachment_ids=(theirs["id"],), attachments=(
                    InlineAttachment("b.png", "image/png", png()),)), bob)
            assert await store._fetch_val("SELECT COUNT(*) FROM messages") == 0
            assert await store._fetch_val("SELECT COUNT(*) FROM attachments") == 1
            await until_done(relay, SendMessage("look", attachment_ids=(theirs["id"],)), alice)
            with pytest.raises(ConflictError) as used:
                await relay.start(SendMessage("again", attachment_ids=(theirs["id"],)), alice)
            assert used.value.code == "attachment_used"
            assert await store._fetch_val("SELECT COUNT(*) FROM messages") == 2
            assert len(upstream.requests) == 1


async def test_a_pdf_too_big_for_the_context_window_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    async with FakeUpstream() as upstream, relay_in_process(tmp_path, upstream) as relay:
        alice = User(await relay.store.add_user("alice", "h1"), "alice")
        with pytest.raises(TooLargeError) as refused:  # 100 pages: the API's limit, over a 200k window
            await relay.start(SendMessage("summarise", attachments=(InlineAttachment("big.pdf", PDF, pdf(100)),)),
                              alice)
        assert refused.value.status == 413
        assert await relay.store._fetch_val("SELECT COUNT(*) FROM attachments") == 0
        assert upstream.requests == []


# --- real servers, both transports ---------------------------------------------------------------------


async def upload(client: httpx.AsyncClient, name: str, data: bytes, media_type: str) -> httpx.Response:
    return await client.post("/api/attachments", files={"file": (name, data, media_type)})


async def test_upload_then_reference_by_id_on_both_transports(make_server: Any) -> None:
    server = make_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        res = await upload(client, "dot.png", png(), "image/png")
        assert res.status_code == 201, res.text
        image = res.json()
        assert image == {"id": image["id"], "name": "dot.png", "mediaType": "image/png", "size": len(png())}
        got = await client.get(f"/api/attachments/{image['id']}")
        assert got.status_code == 200 and got.content == png()
        assert got.headers["content-type"] == "image/png" and "private" in got.headers["cache-control"]

        lying = await upload(client, "x.pdf", png(), "application/pdf")
        assert lying.status_code == 415 and lying.json()["error"]["detectedType"] == "image/png"
        assert (await upload(client, "x.txt", b"plain text", "text/plain")).status_code == 415
        assert server.count("SELECT COUNT(*) FROM attachments") == 1
        assert (await client.get("/api/attachments/att_nothing")).status_code == 404

        document = (await upload(client, "doc.pdf", pdf(), "application/pdf")).json()
        bad = await client.post("/api/command-center/message", json={
            "message": "hi", "attachments": [{"name": "a.png", "mediaType": "image/png", "data": "%%%"}]})
        assert bad.status_code == 400

    events = await sse_stream(server.url, {"message": "what is this?", "attachmentIds": [image["id"]]})
    assert events[-1][1] == "done", events
    async with websockets.connect(server.ws_url + "/api/command-center/ws") as socket:
        await socket.send(json.dumps({"type": "message", "message": "and this?", "attachmentIds": [document["id"]]}))
        ws_events = await ws_read_until_end(socket)
        assert ws_events[-1][1] == "done", ws_events
        # A used attachment again: an error event, and the socket keeps serving.
        await socket.send(json.dumps({"type": "message", "message": "again", "attachmentIds": [document["id"]]}))
        async with asyncio.timeout(30):
            refused = json.loads(await socket.recv())
        assert refused["event"] == "error" and refused["data"]["code"] == "attachment_used"
        await socket.send(json.dumps({"type": "message", "message": "inline", "attachments": [
            {"name": "g.gif", "mediaType": "image/gif", "data": b64(gif())}]}))
        inline = await ws_read_until_end(socket)
        assert inline[-1][1] == "done", inline
    used = server.rows("SELECT media_type, message_id IS NOT NULL FROM attachments ORDER BY media_type")
    assert used == [("application/pdf", 1), ("image/gif", 1), ("image/png", 1)]


async def test_a_big_inline_file_passes_the_text_limits_and_a_big_text_does_not(make_server: Any) -> None:
    server = make_server({"RELAY_MAX_MESSAGE_BYTES": "1024", "RELAY_WS_MAX_FRAME_BYTES": "4096",
                          "RELAY_MAX_ATTACHMENT_BYTES": "300000"})
    big = pdf() + b"%" + b"x" * 200_000 + b"\n"
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        res = await client.post("/api/command-center/message", headers={"Accept": "application/json"}, json={
            "message": "read it", "attachments": [{"name": "big.pdf", "mediaType": PDF, "data": b64(big)}]})
        assert res.status_code == 202, res.text
        too_big = await client.post("/api/command-center/message", json={
            "message": "read it", "attachments": [{"name": "big.pdf", "mediaType": PDF,
                                                   "data": b64(big + b"x" * 200_000)}]})
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "too_large"
        text = await client.post("/api/command-center/message", json={"message": "x", "padding": "y" * 20_000})
        assert text.status_code == 413
    async with websockets.connect(server.ws_url + "/api/command-center/ws") as socket:
        await socket.send(json.dumps({"type": "message", "message": "x", "padding": "y" * 8000}))
        with pytest.raises(websockets.ConnectionClosed) as closed:  # a text frame over its limit, as before
            await asyncio.wait_for(socket.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    async with websockets.connect(server.ws_url + "/api/command-center/ws") as socket:
        await socket.send(json.dumps({"type": "message", "message": "read", "attachments": [
            {"name": "big.pdf", "mediaType": PDF, "data": b64(big)}]}))
        events = await ws_read_until_end(socket)
        assert events[-1][1] == "done", events
    assert server.count("SELECT COUNT(*) FROM attachments") == 2


async def test_another_users_attachment_is_not_found_on_every_route(make_server: Any) -> None:
    server = make_server({"RELAY_AUTH_CACHE_SECONDS": "0"})
    alice, bob = add_user(server.database_url, "alice"), add_user(server.database_url, "bob")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        assert (await client.post("/api/attachments", files={"file": ("a.png", png(), "image/png")})
                ).status_code == 401
        res = await client.post("/api/attachments", files={"file": ("a.png", png(), "image/png")},
                                headers=bearer(alice))
        assert res.status_code == 201, res.text
        theirs = res.json()["id"]
        assert (await client.get(f"/api/attachments/{theirs}", headers=bearer(bob))).status_code == 404
        assert (await client.get(f"/api/attachments/{theirs}", headers=bearer(alice))).content == png()
        sent = await client.post("/api/command-center/message", headers=bearer(bob),
                                 json={"message": "look", "attachmentIds": [theirs]})
        assert sent.status_code == 404 and sent.json()["error"]["code"] == "not_found"
    async with websockets.connect(server.ws_url + "/api/command-center/ws", additional_headers=bearer(bob)) as ws:
        await ws.send(json.dumps({"type": "message", "message": "look", "attachmentIds": [theirs]}))
        async with asyncio.timeout(30):
            refused = json.loads(await ws.recv())
        assert refused["event"] == "error" and refused["data"]["code"] == "not_found"
    assert server.count("SELECT COUNT(*) FROM messages") == 0
    assert server.rows("SELECT message_id FROM attachments") == [(None,)]


async def test_uploads_no_message_used_for_a_day_are_removed_by_the_next_upload(tmp_path: Path) -> None:
    async with relay_in_process(tmp_path) as relay:
        store = relay.store
        old = await store.add_attachment(None, InlineAttachment("old.png", "image/png", png()))
        kept = await store.add_attachment(None, InlineAttachment("kept.png", "image/png", png()))
        await give_to_a_message(store, kept["id"])
        yesterday = "2000-01-01T00:00:00.000000Z"
        await store.write(_set_created(yesterday))
        await store.add_attachment(None, InlineAttachment("new.gif", "image/gif", gif()))
        names = sorted(row[0] for row in await store._fetch_all("SELECT name FROM attachments"))
        assert names == ["kept.png", "new.gif"]  # the unused old one went; the one a message uses stayed
        with pytest.raises(NotFoundError):
            await store.get_attachment(old["id"], None)


async def give_to_a_message(store: Any, attachment_id: str) -> None:
    """Give an attachment to a message (a turn that is begun, not answered)."""
    await store.begin_turn(conversation_id=None, agent_id="default", user_text="x", model="m", stream_id="s1",
                           task_trace_id="t", user_blocks=[{"type": "image", "source": {
                               "type": "attachment", "id": attachment_id}}])


def _set_created(stamp: str) -> Any:
    def operation() -> Any:
        yield Query("UPDATE attachments SET created_at = :t", {"t": stamp})
    return operation()
