"""The emulated tokenizer's rule: the figures every emulated answer reports are computed from it."""

from server.protocol.tokens import MESSAGE_OVERHEAD, block_tokens, prefix_tokens, request_tokens, text_tokens


def test_a_text_is_one_token_per_four_utf8_bytes_rounded_up() -> None:
    assert [text_tokens(t) for t in ("", "a", "abcd", "abcde", "é" * 2, "日本")] == [0, 1, 1, 2, 1, 2]


def test_a_request_counts_its_system_prompt_each_message_overhead_and_blocks() -> None:
    request = {
        "system": "x" * 40,  # 10
        "messages": [
            {"role": "user", "content": "y" * 8},  # 4 + 2
            {"role": "assistant",
             "content": [{"type": "text", "text": "z" * 12, "cache_control": {"type": "ephemeral"}}]},  # 4 + 3
            {"role": "user", "content": [{"type": "text", "text": "w"}]},  # 4 + 1
        ],
    }
    assert request_tokens(request) == 10 + (MESSAGE_OVERHEAD + 2) + (MESSAGE_OVERHEAD + 3) + (MESSAGE_OVERHEAD + 1)
    totals = [total for _, total in prefix_tokens(request)]
    assert totals == [10, 16, 23, 28]
    assert totals[-1] == request_tokens(request)


def test_a_non_text_block_costs_its_json_without_its_cache_marker() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    marked = {**image, "cache_control": {"type": "ephemeral"}}
    assert block_tokens(image) == block_tokens(marked) > 0
