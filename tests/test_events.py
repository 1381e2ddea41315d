"""Event encoding helpers."""

import tracemalloc

from server.events import kept_json


def test_a_kept_json_value_holds_only_its_own_bytes():
    """A WebSocket pump keeps its stream id as JSON for as long as it runs. Fails if kept_json returns orjson's
    result itself: orjson 3.12 and later allocate at least 4 KB for each result, and a kept one keeps it all."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [kept_json("0123456789abcdef0123456789abcdef") for _ in range(100)]
        per_value = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert kept[0] == b'"0123456789abcdef0123456789abcdef"'
    assert per_value < 200
