"""Basket vouchers (issue 13, item 6): the largest-remainder apportioning of a basket's amount
off to its lines, as a pure function (server/domain/basket.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.domain.basket import apportion
from server.domain.reference import ReferenceError, parse_rule

PRICE_MAX = 10_000_000_000 - 1  # PRICE_FEN_MAX - 1: the dearest line a request may carry
LINES_MAX = 100  # SUBSIDY_MAX_LINES' upper bound


def test_equal_lines_share_evenly_and_the_extra_fen_goes_to_the_first() -> None:
    assert apportion(1000, [3000, 3000, 3000]) == [334, 333, 333]
    assert apportion(1001, [3000, 3000, 3000]) == [334, 334, 333]
    assert apportion(999, [3000, 3000, 3000]) == [333, 333, 333]


def test_the_largest_remainder_gets_the_fen_whatever_its_place() -> None:
    # 50 * 100 / 301 = 16.61..., the same, 50 * 101 / 301 = 16.77...: two fen are left; the
    # third line's remainder is the largest, then the first's and second's tie: the first wins.
    assert apportion(50, [100, 100, 101]) == [17, 16, 17]
    # Ties between the two largest go by line order.
    assert apportion(2, [1, 1, 1]) == [1, 1, 0]


def test_one_line_takes_everything_and_nothing_off_is_nothing_each() -> None:
    assert apportion(5000, [20_000]) == [5000]
    assert apportion(20_000, [20_000]) == [20_000]
    assert apportion(0, [100, 200]) == [0, 0]


def test_a_cheap_line_in_a_dear_basket_may_get_no_fen() -> None:
    assert apportion(50, [1, 10_000]) == [0, 50]


def test_the_largest_basket_is_exact() -> None:
    prices = [PRICE_MAX] * LINES_MAX
    shares = apportion(PRICE_MAX, prices)
    assert sum(shares) == PRICE_MAX
    assert shares == [PRICE_MAX // LINES_MAX + (1 if index < PRICE_MAX % LINES_MAX else 0) for index in range(100)]


@pytest.mark.parametrize(
    ("off", "prices"),
    [(1, []), (1, [0, 100]), (1, [-1, 100]), (101, [100]), (-1, [100])],
)
def test_impossible_baskets_are_refused(off: int, prices: list[int]) -> None:
    with pytest.raises(ValueError):
        apportion(off, prices)


@st.composite
def baskets(draw: st.DrawFn) -> tuple[int, list[int]]:
    prices = draw(st.lists(st.integers(1, PRICE_MAX), min_size=1, max_size=LINES_MAX))
    return draw(st.integers(0, min(sum(prices), PRICE_MAX))), prices


@given(baskets())
def test_shares_add_up_stay_within_a_fen_of_the_exact_share_and_never_exceed_a_price(
    basket: tuple[int, list[int]],
) -> None:
    off, prices = basket
    total = sum(prices)
    shares = apportion(off, prices)
    assert sum(shares) == off
    for share, price in zip(shares, prices, strict=True):
        # The exact share is off * price / total: each line gets its floor or its ceiling.
        assert share * total - off * price > -total
        assert share * total - off * price < total
        assert 0 <= share <= price


@given(baskets())
def test_a_line_with_a_larger_remainder_never_gets_less_rounding(basket: tuple[int, list[int]]) -> None:
    """Largest remainder: a line rounded down never has a larger remainder than a line rounded
    up, nor an equal one earlier in the basket."""
    off, prices = basket
    total = sum(prices)
    shares = apportion(off, prices)
    up = [share * total > off * price for share, price in zip(shares, prices, strict=True)]
    remainders = [off * price % total for price in prices]
    for down_index in (index for index, rounded in enumerate(up) if not rounded):
        for up_index in (index for index, rounded in enumerate(up) if rounded):
            assert remainders[down_index] <= remainders[up_index]
            if remainders[down_index] == remainders[up_index]:
                assert up_index < down_index


def basket_rule(**fields: object) -> dict[str, object]:
    record: dict[str, object] = {
        "category": "general",
        "kind": "FIXED",
        "threshold_fen": 20_000,
        "off_fen": 5_000,
        "per_person_limit": 1,
        "budget_fen": 1_000_000,
    }
    record.update(fields)
    return record


def test_a_rule_is_per_line_unless_it_says_basket() -> None:
    assert parse_rule(basket_rule(), "rule").threshold_scope == "LINE"
    assert parse_rule(basket_rule(threshold_scope="LINE"), "rule").threshold_scope == "LINE"
    assert parse_rule(basket_rule(threshold_scope="BASKET"), "rule").threshold_scope == "BASKET"


@pytest.mark.parametrize(
    "fields",
    [
        {"threshold_scope": "basket"},
        {"threshold_scope": ""},
        {"threshold_scope": 2},
        {"threshold_scope": "BASKET", "kind": "PERCENT", "rates_bp": {"0": 1500}, "cap_fen": 50_000},
    ],
    ids=["lower case", "empty", "a number", "basket on a percent rule"],
)
def test_a_scope_that_cannot_work_is_refused_naming_it(fields: dict[str, object]) -> None:
    with pytest.raises(ReferenceError) as refused:
        parse_rule(basket_rule(**fields), "rule")
    assert refused.value.field == "rule.threshold_scope"
