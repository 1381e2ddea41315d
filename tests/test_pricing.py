"""Prices and cost_of: exact Decimal money, model ids, cache-write rules."""

from __future__ import annotations

import logging
import uuid
from dataclasses import fields
from datetime import date
from decimal import Decimal

import pytest

from server.pricing import MILLION, PRICES, PRICES_AS_OF, THOUSAND, Usage, cost_of, resolve_model
from server.store.records import cost_nanos

# The derived_cache_pricing test vector (tests/data/anthropic-streams/).
CACHE_VECTOR = Usage(
    input_tokens=3,
    output_tokens=1,
    cache_creation_input_tokens=3,
    cache_read_input_tokens=7,
    cache_creation_5m_input_tokens=1,
    cache_creation_1h_input_tokens=2,
)


def test_haiku_4_5_prices_are_the_published_ones() -> None:
    price = PRICES["claude-haiku-4-5"]
    assert (price.input, price.cache_write_5m, price.cache_write_1h, price.cache_read, price.output) == (
        Decimal("1"),
        Decimal("1.25"),
        Decimal("2"),
        Decimal("0.10"),
        Decimal("5"),
    )


def test_every_price_is_a_decimal_never_a_float() -> None:
    for price in PRICES.values():
        for field in fields(price):
            assert type(getattr(price, field.name)) is Decimal


def test_cache_prices_follow_the_published_multipliers() -> None:
    # 5-minute write 1.25x, 1-hour write 2x, cache hit 0.1x the base input price.
    # Claude Haiku 3 is the exception: its table row says $0.30 and $0.03, not
    # $0.3125 and $0.025, and the table is what Anthropic bills.
    for model, price in PRICES.items():
        if model == "claude-3-haiku":
            continue
        assert price.cache_write_5m == price.input * Decimal("1.25"), model
        assert price.cache_write_1h == price.input * 2, model
        assert price.cache_read == price.input / 10, model


def test_prices_say_when_they_were_taken() -> None:
    assert isinstance(PRICES_AS_OF, date)


def test_offline_demo_model_costs_the_same_as_haiku_4_5() -> None:
    assert PRICES["deltarelay-offline"] == PRICES["claude-haiku-4-5"]
    assert cost_of(CACHE_VECTOR, "deltarelay-offline") == cost_of(CACHE_VECTOR, "claude-haiku-4-5")


def test_derived_cache_pricing_vector_costs_exactly_its_expected_value() -> None:
    cost = cost_of(CACHE_VECTOR, "claude-haiku-4-5")
    assert cost == Decimal("0.00001395")
    assert format(cost, "f") == "0.00001395"


def test_a_million_summed_costs_stay_exact() -> None:
    cost = cost_of(CACHE_VECTOR, "claude-haiku-4-5")
    assert cost is not None
    assert sum([cost] * 1_000_000, Decimal(0)) == Decimal("13.95")
    assert cost * 1_000_000 == Decimal("13.95")
    # A float would drift here: 1e6 additions of 0.00001395 is not 13.95.
    assert sum([0.00001395] * 1_000_000) != 13.95


def test_costs_of_many_different_usages_sum_exactly() -> None:
    total = sum(
        (cost_of(Usage(input_tokens=n, output_tokens=n), "claude-3-5-haiku") or Decimal(0) for n in range(1, 1001)),
        Decimal(0),
    )
    # (0.80 + 4) dollars per million, times 1 + 2 + ... + 1000 = 500500 tokens each.
    assert total == Decimal("4.80") * 500500 / 1_000_000 == Decimal("2.4024")


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        ("claude-haiku-4-5", "claude-haiku-4-5"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-20240620", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-latest", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet", "claude-3-5-sonnet"),
        ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet"),
        ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-sonnet-4-0", "claude-sonnet-4"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-opus-4-0", "claude-opus-4"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-3-haiku-20240307", "claude-3-haiku"),
        ("claude-3-opus-20240229", "claude-3-opus"),
        ("claude-3-opus-latest", "claude-3-opus"),
        ("claude-haiku-3-5", "claude-3-5-haiku"),
        ("deltarelay-offline", "deltarelay-offline"),
    ],
)
def test_model_ids_resolve_to_their_priced_model(model_id: str, expected: str) -> None:
    assert resolve_model(model_id) == expected


@pytest.mark.parametrize("model_id", ["claude-test", "gpt-4o", "", "claude-haiku-4-5-2025", "claude-haiku"])
def test_unknown_model_ids_resolve_to_none(model_id: str) -> None:
    assert resolve_model(model_id) is None


def test_unknown_model_costs_none_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    model = f"claude-unreleased-{uuid.uuid4().hex}"
    with caplog.at_level(logging.WARNING, logger="server.pricing"):
        assert cost_of(CACHE_VECTOR, model) is None
        assert cost_of(Usage(), model) is None
    warnings = [record for record in caplog.records if model in record.getMessage()]
    assert len(warnings) == 1


def test_cache_writes_use_the_5m_and_1h_split_when_known() -> None:
    usage = Usage(
        cache_creation_input_tokens=3_000_000,
        cache_creation_5m_input_tokens=1_000_000,
        cache_creation_1h_input_tokens=2_000_000,
    )
    assert cost_of(usage, "claude-haiku-4-5") == Decimal("1.25") + 2 * Decimal("2")


def test_cache_writes_without_a_split_are_priced_at_the_5m_rate() -> None:
    usage = Usage(cache_creation_input_tokens=1_000_000)
    assert cost_of(usage, "claude-sonnet-4-5") == Decimal("3.75")


def test_cache_writes_beyond_the_split_are_priced_at_the_5m_rate() -> None:
    # sdk_message_delta_usage_fields: the split says 10 (5m), a later total says 12.
    usage = Usage(cache_creation_input_tokens=12, cache_creation_5m_input_tokens=10)
    assert cost_of(usage, "claude-sonnet-4-5") == 12 * Decimal("3.75") / 1_000_000


def test_web_search_costs_ten_dollars_per_thousand_requests() -> None:
    assert cost_of(Usage(web_search_requests=1), "claude-opus-4-1") == Decimal("0.01")
    assert cost_of(Usage(web_search_requests=1000), "claude-haiku-4-5") == Decimal("10")


def test_usage_defaults_to_zero_and_is_frozen() -> None:
    usage = Usage()
    assert all(getattr(usage, field.name) == 0 for field in fields(usage))
    assert cost_of(usage, "claude-opus-4-5") == 0
    with pytest.raises(AttributeError):
        usage.input_tokens = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("model", "input_price", "output_price"),
    [
        ("claude-opus-4-5", "5", "25"),
        ("claude-opus-4-1", "15", "75"),
        ("claude-opus-4", "15", "75"),
        ("claude-sonnet-4-5", "3", "15"),
        ("claude-sonnet-4", "3", "15"),
        ("claude-3-7-sonnet", "3", "15"),
        ("claude-haiku-4-5", "1", "5"),
        ("claude-3-5-haiku", "0.80", "4"),
        ("claude-3-haiku", "0.25", "1.25"),
        ("claude-3-opus", "15", "75"),
        ("claude-3-5-sonnet", "3", "15"),
    ],
)
def test_a_million_input_and_output_tokens_cost_the_published_price(
    model: str, input_price: str, output_price: str
) -> None:
    assert cost_of(Usage(input_tokens=1_000_000), model) == Decimal(input_price)
    assert cost_of(Usage(output_tokens=1_000_000), model) == Decimal(output_price)


def test_every_price_is_a_whole_number_of_nano_dollars_per_token():
    """SQLite stores costs as whole nano-dollars (migration 0005) and the budget counts in them: a price with
    a fourth decimal per million tokens (or a web search price finer than a nano-dollar) fails this, before
    any save could refuse a cost."""
    for model, price in PRICES.items():
        for name in ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read"):
            per_token = getattr(price, name) / MILLION
            assert cost_nanos(per_token) * Decimal("1e-9") == per_token, (model, name)
        assert cost_nanos(price.web_search / THOUSAND) > 0, model
