"""Campaign.risk_limits as the domain parses it and as Redis carries it to authorize.lua."""

from __future__ import annotations

from typing import Any

import pytest

from server.domain.reference import RISK_LIMIT_MAX, ReferenceError, parse_risk_limits
from storage.redis.reference import risk_field


@pytest.mark.parametrize(
    ("record", "parsed"),
    [
        (None, {}),
        ({}, {}),
        ({"terminal_sales_per_minute": 0, "merchant_sales_per_day": 0}, {}),
        ({"terminal_sales_per_minute": 1}, {"terminal_sales_per_minute": 1}),
        ({"consumer_sales_per_hour": RISK_LIMIT_MAX}, {"consumer_sales_per_hour": RISK_LIMIT_MAX}),
        (
            {"price_flag_min_sales": 1, "price_flag_ratio_percent": 101},
            {"price_flag_min_sales": 1, "price_flag_ratio_percent": 101},
        ),
    ],
)
def test_limits_parsed(record: Any, parsed: dict[str, int]) -> None:
    assert parse_risk_limits(record, "campaign.risk_limits") == parsed


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"terminal_sales_per_hour": RISK_LIMIT_MAX + 1}, "terminal_sales_per_hour"),
        ({"merchant_sales_per_day": -1}, "merchant_sales_per_day"),
        ({"merchant_sales_per_day": True}, "merchant_sales_per_day"),
        ({"merchant_sales_per_day": "5"}, "merchant_sales_per_day"),
        ({"terminal_sales_per_day": 5}, "terminal_sales_per_day"),
        ({"price_flag_min_sales": 5}, "price_flag_ratio_percent"),
        ({"price_flag_min_sales": 5, "price_flag_ratio_percent": 100}, "price_flag_ratio_percent"),
        ({"price_flag_ratio_percent": 300}, "price_flag_min_sales"),
    ],
)
def test_bad_limits_name_their_field(record: Any, field: str) -> None:
    with pytest.raises(ReferenceError) as refused:
        parse_risk_limits(record, "campaign.risk_limits")
    assert refused.value.field == f"campaign.risk_limits.{field}"


def test_not_a_mapping() -> None:
    with pytest.raises(ReferenceError) as refused:
        parse_risk_limits([1, 2], "campaign.risk_limits")
    assert refused.value.field == "campaign.risk_limits"


def test_the_field_authorize_reads() -> None:
    assert risk_field(None) == risk_field({}) == risk_field("{}") == ""
    assert risk_field('{"consumer_sales_per_hour": 2}') == "0,0,0,2,0,0"
    assert risk_field({"terminal_sales_per_minute": 1, "price_flag_ratio_percent": 300}) == "1,0,0,0,0,300"
