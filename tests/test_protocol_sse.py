"""SSEDecoder and encode_event: pure, no event loop. Feed bytes, check the events."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import ProtocolError
from server.protocol.sse import SSEDecoder, SSEEvent, encode_comment, encode_entry, encode_event

DATA = Path(__file__).parent / "data"
VECTORS: list[dict[str, Any]] = json.loads((DATA / "sse-vectors.json").read_text("utf-8"))["vectors"]
STREAMS = sorted((DATA / "anthropic-streams").glob("*.sse"))


def decode_chunks(chunks: Iterable[bytes], decoder: SSEDecoder | None = None) -> list[SSEEvent]:
    decoder = decoder or SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.decode(chunk))
    events.extend(decoder.flush())
    return events


def decode(data: bytes) -> list[SSEEvent]:
    return decode_chunks([data])


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def as_expected(events: list[SSEEvent], expected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events in the vector's shape: only the keys the vector gives."""
    return [
        {key: (event.event if key == "event" else getattr(event, key)) for key in want}
        for event, want in zip(events, expected, strict=False)
    ] + [{"extra": event} for event in events[len(expected) :]]


def normalized(expected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**want, "event": want["event"] or "message"} for want in expected]


# The vectors, under every chunking.


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_decodes_as_given_whole_and_byte_by_byte(vector: dict[str, Any]) -> None:
    chunks = [base64.b64decode(c) for c in vector["chunks_b64"]]
    data = b"".join(chunks)
    expected = normalized(vector["expected"])
    for chunking in (chunks, [data], byte_by_byte(data)):
        assert as_expected(decode_chunks(chunking), expected) == expected


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_decodes_the_same_split_at_every_position(vector: dict[str, Any]) -> None:
    data = b"".join(base64.b64decode(c) for c in vector["chunks_b64"])
    expected = normalized(vector["expected"])
    for i in range(len(data) + 1):
        got = as_expected(decode_chunks([data[:i], data[i:]]), expected)
        assert got == expected, f"split at byte {i}"


def test_all_22_vectors_are_loaded() -> None:
    assert len(VECTORS) == 22


# Line ends.


def test_decoder_treats_a_lone_cr_as_a_line_end() -> None:
    assert decode(b"data: a\rdata: b\r\r") == [SSEEvent("message", "a\nb", None)]


def test_decoder_joins_crlf_split_across_chunks() -> None:
    events = decode_chunks([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert events == [SSEEvent("message", "a\nb", None)]


def test_decoder_waits_through_empty_chunks_between_cr_and_lf() -> None:
    decoder = SSEDecoder()
    assert decoder.decode(b"data: a\r") == []
    assert decoder.decode(b"") == []
    assert decoder.decode(b"\n") == []  # the LF of the CRLF, not a blank line
    assert decoder.decode(b"\n") == [SSEEvent("message", "a", None)]


def test_decoder_treats_cr_then_lf_in_later_chunk_after_text_as_two_line_ends() -> None:
    # The CR is followed by text, so the next chunk's LF is a line end of its own.
    assert decode_chunks([b"data: a\rdata: b", b"\n", b"\n"]) == [SSEEvent("message", "a\nb", None)]


@pytest.mark.parametrize(
    "char",
    ["\u2028", "\u2029", "\u0085", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e"],
    ids=["U+2028", "U+2029", "U+0085", "form-feed", "vertical-tab", "FS", "GS", "RS"],
)
def test_decoder_keeps_unicode_line_separators_inside_data(char: str) -> None:
    data = f"data: one{char}two\n\n".encode()
    for chunking in ([data], byte_by_byte(data)):
        assert decode_chunks(chunking) == [SSEEvent("message", f"one{char}two", None)]


# Byte-order mark.


def test_decoder_strips_a_bom_at_the_start_of_the_stream() -> None:
    assert decode(b"\xef\xbb\xbfdata: x\n\n") == [SSEEvent("message", "x", None)]


def test_decoder_strips_a_bom_split_across_the_first_chunks() -> None:
    for chunks in (
        [b"\xef", b"\xbb", b"\xbfdata: x\n\n"],
        [b"\xef\xbb", b"\xbfdata: x\n\n"],
        [b"", b"\xef", b"", b"\xbb\xbf", b"data: x\n\n"],
    ):
        assert decode_chunks(chunks) == [SSEEvent("message", "x", None)], chunks


def test_decoder_strips_the_bom_only_once() -> None:
    # The second BOM makes the field name "\ufeffdata", which is unknown and ignored.
    assert decode(b"\xef\xbb\xbf\xef\xbb\xbfdata: 1\n\ndata: 2\n\n") == [SSEEvent("message", "2", None)]


def test_decoder_keeps_a_bom_after_the_start() -> None:
    assert decode(b"data: 1\n\n\xef\xbb\xbfdata: 2\n\ndata: \xef\xbb\xbf3\n\n") == [
        SSEEvent("message", "1", None),
        SSEEvent("message", "\ufeff3", None),
    ]


def test_decoder_passes_short_non_bom_first_chunk_through() -> None:
    assert decode_chunks([b"d", b"ata: x\n\n"]) == [SSEEvent("message", "x", None)]
    assert decode_chunks([b"\xef", b"data: x\n\n"]) == []  # "\ufffddata" is an unknown field


# Fields.


def test_decoder_joins_multi_line_data_with_lf() -> None:
    assert decode(b"data: a\ndata:\ndata:  b\n\n") == [SSEEvent("message", "a\n\n b", None)]


def test_decoder_ignores_comments_and_unknown_fields() -> None:
    assert decode(b": hi\nfoo: bar\ndata: x\nnocolon\n:\n\n") == [SSEEvent("message", "x", None)]


def test_decoder_reads_a_line_without_colon_as_a_field_with_empty_value() -> None:
    assert decode(b"data\ndata\n\n") == [SSEEvent("message", "\n", None)]


def test_decoder_does_not_dispatch_an_event_without_data_but_resets_its_type() -> None:
    assert decode(b"event: ping\n\ndata: x\n\n") == [SSEEvent("message", "x", None)]


def test_decoder_keeps_the_last_event_id_across_events() -> None:
    decoder = SSEDecoder()
    events = decode_chunks([b"id: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\n"], decoder)
    assert [e.id for e in events] == ["7", "7", ""]
    assert decoder.last_event_id == ""


def test_decoder_gives_no_id_when_the_stream_never_set_one() -> None:
    decoder = SSEDecoder()
    assert decode_chunks([b"data: a\n\n"], decoder) == [SSEEvent("message", "a", None)]
    assert decoder.last_event_id == ""


def test_decoder_ignores_an_id_containing_nul() -> None:
    decoder = SSEDecoder()
    events = decode_chunks([b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n"], decoder)
    assert [e.id for e in events] == ["1", "1"]
    assert decoder.last_event_id == "1"


def test_decoder_updates_last_event_id_at_the_blank_line() -> None:
    decoder = SSEDecoder()
    decoder.decode(b"id: 5\n")
    assert decoder.last_event_id == ""
    decoder.decode(b"\n")  # no data: nothing dispatched, but the id is committed
    assert decoder.last_event_id == "5"


def test_decoder_reads_retry_of_ascii_digits_only() -> None:
    decoder = SSEDecoder()
    assert decoder.retry is None
    events = decode_chunks([b"retry: 1500\ndata: a\n\ndata: b\n\n"], decoder)
    assert events == [SSEEvent("message", "a", None, retry=1500), SSEEvent("message", "b", None)]
    assert decoder.retry == 1500
    for bad in (b"retry: 1.5\n\n", b"retry: -1\n\n", b"retry: \xd9\xa3\n\n", b"retry:\n\n", b"retry: 1 \n\n"):
        decoder.decode(bad)
        assert decoder.retry == 1500, bad
    decoder.decode(b"retry:20\n\n")
    assert decoder.retry == 20


def test_decoder_replaces_invalid_utf8() -> None:
    assert decode(b"data: a\xffb\n\n") == [SSEEvent("message", "a\ufffdb", None)]


def test_decoder_joins_a_character_split_across_chunks() -> None:
    data = "data: 🙂 é 我\n\n".encode()
    for i in range(len(data) + 1):
        assert decode_chunks([data[:i], data[i:]]) == [SSEEvent("message", "🙂 é 我", None)]
    assert decode_chunks(byte_by_byte(data)) == [SSEEvent("message", "🙂 é 我", None)]


# End of stream.


def test_decoder_discards_an_event_without_a_closing_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.decode(b"data: a\n\ndata: b\n") == [SSEEvent("message", "a", None)]
    assert decoder.flush() == []
    assert decoder.decode(b"data: c") == []
    assert decoder.flush() == []


def test_decoder_starts_clean_after_flush() -> None:
    decoder = SSEDecoder()
    decoder.decode(b"id: 3\nretry: 10\ndata: a\n\nevent: x\ndata: half")
    decoder.flush()
    assert decoder.decode(b"\xef\xbb\xbfdata: b\n\n") == [SSEEvent("message", "b", "3")]
    assert (decoder.last_event_id, decoder.retry) == ("3", 10)


# Line length cap.


def test_decoder_rejects_a_pending_line_over_the_cap() -> None:
    decoder = SSEDecoder(max_line_bytes=100)
    decoder.decode(b"data: " + b"x" * 50)
    with pytest.raises(ProtocolError, match="upstream SSE line longer than 100 bytes"):
        decoder.decode(b"x" * 50)


def test_decoder_rejects_a_long_line_however_it_is_chunked() -> None:
    line = b"data: " + b"x" * 95 + b"\n\n"
    for chunks in ([line], [line[:50], line[50:]], byte_by_byte(line)):
        with pytest.raises(ProtocolError):
            decode_chunks(chunks, SSEDecoder(max_line_bytes=100))


def test_decoder_accepts_a_long_line_under_the_cap_in_many_chunks() -> None:
    decoder = SSEDecoder(max_line_bytes=1000)
    events: list[SSEEvent] = []
    line = b"data: " + b"y" * 994
    for i in range(0, len(line), 7):
        events.extend(decoder.decode(line[i : i + 7]))
    events.extend(decoder.decode(b"\r"))
    events.extend(decoder.decode(b"\n\n"))
    assert events == [SSEEvent("message", "y" * 994, None)]


def test_decoder_default_cap_is_one_mebibyte() -> None:
    decoder = SSEDecoder()
    chunk = b"z" * 65536
    decoder.decode(b"data: ")
    for _ in range(15):
        decoder.decode(chunk)
    with pytest.raises(ProtocolError, match=f"longer than {1 << 20} bytes"):
        decoder.decode(chunk)


# Recorded Anthropic streams.


@pytest.mark.parametrize("path", STREAMS, ids=[p.stem for p in STREAMS])
def test_recorded_stream_decodes_the_same_split_at_every_position(path: Path) -> None:
    data = path.read_bytes()
    whole = decode(data)
    assert whole, "a recording holds events"
    for event in whole:
        # Every Anthropic event repeats its type inside the JSON data.
        assert json.loads(event.data)["type"] == event.event
    for i in range(len(data) + 1):
        assert decode_chunks([data[:i], data[i:]]) == whole, f"split at byte {i}"
    assert decode_chunks(byte_by_byte(data)) == whole


@pytest.mark.parametrize("path", STREAMS, ids=[p.stem for p in STREAMS])
def test_recorded_stream_round_trips_through_encode_event(path: Path) -> None:
    whole = decode(path.read_bytes())
    reencoded = b"".join(encode_event(e.event, e.data) for e in whole)
    assert decode(reencoded) == whole


# encode_event.


def test_encode_event_frames_id_event_and_data() -> None:
    assert encode_event("chunk", '{"t":"hi"}', id=3) == b'id: 3\nevent: chunk\ndata: {"t":"hi"}\n\n'
    assert encode_event(None, "x") == b"data: x\n\n"
    assert encode_event(None, b"raw") == b"data: raw\n\n"


@pytest.mark.parametrize(
    "data",
    ["a\nb", "a\r\nb", "a\rb", "\n", "\r\n\r\n", "a\n", "\nb", "a\r\n\rb\n\r", " lead", "  two", ""],
    ids=repr,
)
def test_encode_event_round_trips_every_kind_of_line_break(data: str) -> None:
    frame = encode_event("x", data, id="9")
    want = data.replace("\r\n", "\n").replace("\r", "\n")
    assert decode(frame) == [SSEEvent("x", want, "9")]


def test_encode_event_round_trips_unicode() -> None:
    data = "🙂 我 \u2028 \u2029 \u0085 \x0c é \ufeff"
    assert decode(encode_event("ünï", data, id=1)) == [SSEEvent("ünï", data, "1")]
    assert decode(encode_event(None, data.encode())) == [SSEEvent("message", data, None)]


def test_encode_event_round_trips_empty_data() -> None:
    assert decode(encode_event(None, "")) == [SSEEvent("message", "", None)]
    assert decode(encode_event("", b"")) == [SSEEvent("message", "", None)]


def test_encode_event_rejects_line_breaks_in_name_and_id() -> None:
    for bad_name in ("a\nb", "a\rb"):
        with pytest.raises(ValueError):
            encode_event(bad_name, "x")
    for bad_id in ("1\n", "1\r2", "1\x002"):
        with pytest.raises(ValueError):
            encode_event(None, "x", id=bad_id)


def test_encode_comment_is_ignored_by_the_decoder() -> None:
    assert encode_comment("keepalive") == b": keepalive\n\n"
    stream = encode_comment("") + encode_comment("a\r\nb") + encode_event(None, "x") + encode_comment("ok")
    assert decode(stream) == [SSEEvent("message", "x", None)]


no_line_breaks = st.text().filter(lambda s: "\n" not in s and "\r" not in s)


@given(name=no_line_breaks, data=st.text(), id=st.none() | st.integers(min_value=0) | no_line_breaks)
def test_encode_event_round_trips_any_text(name: str, data: str, id: int | str | None) -> None:
    if isinstance(id, str) and "\0" in id:
        id = id.replace("\0", "")
    frame = encode_event(name, data, id=id)
    want = SSEEvent(name or "message", data.replace("\r\n", "\n").replace("\r", "\n"), None if id is None else str(id))
    assert decode(frame) == [want]
    for i in range(len(frame) + 1):
        assert decode_chunks([frame[:i], frame[i:]]) == [want]


@given(events=st.lists(st.tuples(no_line_breaks, st.text()), max_size=5), cut=st.integers(min_value=0))
def test_encoded_streams_decode_the_same_however_they_are_cut(events: list[tuple[str, str]], cut: int) -> None:
    stream = b"".join(encode_event(name, data) for name, data in events)
    cut %= len(stream) + 1
    want = [SSEEvent(name or "message", data.replace("\r\n", "\n").replace("\r", "\n"), None) for name, data in events]
    assert decode_chunks([stream[:cut], stream[cut:]]) == want


@given(name=no_line_breaks, data=st.text(), id=st.integers(min_value=0))
def test_encode_entry_frames_bytes_exactly_as_encode_event_frames_text(name: str, data: str, id: int) -> None:
    """encode_entry is what the relay's SSE responses write for every event (transports/sse.frame_event)."""
    frame = encode_entry(id, name, data.encode())
    assert frame == encode_event(name, data, id=id)
    assert decode(frame) == [SSEEvent(name or "message", data.replace("\r\n", "\n").replace("\r", "\n"), str(id))]


def test_the_sse_transport_frames_events_with_the_tested_encoder() -> None:
    from server.transports.sse import frame_event

    assert frame_event is encode_entry
    assert frame_event(7, "chunk", b'{"text":"\xc3\xa9"}') == b'id: 7\nevent: chunk\ndata: {"text":"\xc3\xa9"}\n\n'
    with pytest.raises(ValueError):
        encode_entry(1, "bad\nname", b"{}")
