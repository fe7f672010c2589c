"""Authorize against real Redis: the subsidy each rule gives, and every decline reason."""

from __future__ import annotations

import pytest
from subsidy_client import AuthorizationClient, Line
from subsidy_client.v1 import authorization_pb2 as pb

from tests.conftest import Environment, consumer_key, load_document, serial

FRIDGE_G1 = "6970000000017"  # grade 1, reference price 20,000 yuan, serial required
FRIDGE_G2 = "6970000000024"  # grade 2
FRIDGE_G0 = "6970000000031"  # no grade
PHONE = "6970000000048"  # serial required
TV_G3 = "6970000000055"  # grade 3: the rule has no rate for it
FRIDGE_INACTIVE = "6970000000062"
DISHWASHER = "6970000000079"  # no rule in c-main
GENERAL = "6970000000086"  # voucher goods
WASHER = "6970000000093"
AIR_CONDITIONER = "6970000000116"
UNKNOWN_GTIN = "6970000000109"  # valid check digit, not in the catalog


async def authorize(client: AuthorizationClient, *lines: Line, campaign: str = "c-main") -> pb.AuthorizeResponse:
    return await client.authorize(campaign_id=campaign, consumer_key=consumer_key(), lines=list(lines))


@pytest.mark.parametrize(
    ("gtin", "price_fen", "expected_subsidy_fen"),
    [
        (FRIDGE_G1, 459_900, 91_980),  # 20% for grade 1
        (FRIDGE_G2, 459_900, 68_985),  # 15% for grade 2
        (FRIDGE_G0, 459_900, 68_985),  # ungraded: the grade-2 rate
        (FRIDGE_G1, 1_500_000, 200_000),  # 20% would be 3,000 yuan: capped at 2,000
        (FRIDGE_G2, 12_345, 1_851),  # 1,851.75 fen floors to 1,851
        (PHONE, 599_900, 50_000),  # 15% of 5,999 yuan is 899.85: capped at 500
        (PHONE, 300_000, 45_000),
    ],
)
async def test_percent_rules_give_the_published_subsidy(
    client: AuthorizationClient, gtin: str, price_fen: int, expected_subsidy_fen: int
) -> None:
    """Percent-with-cap rules: rate by energy grade, cap, floor to the fen; payable adds up."""
    response = await authorize(client, Line("1", gtin, price_fen, serial()))
    assert response.decision == pb.DECISION_APPROVED
    assert response.subsidy_fen == expected_subsidy_fen
    assert response.lines[0].subsidy_fen == expected_subsidy_fen
    assert response.payable_fen == price_fen - expected_subsidy_fen
    assert response.total_price_fen == price_fen
    assert len(response.authorization_id) == 32
    assert response.hold_expires_at.seconds > 0


async def test_fixed_voucher_takes_the_amount_off_at_the_threshold(client: AuthorizationClient) -> None:
    """A FIXED "5 off 20" rule: exactly 500 fen off at or above 2,000 fen, declined below."""
    approved = await authorize(client, Line("1", GENERAL, 2_000), campaign="c-voucher")
    assert (approved.decision, approved.subsidy_fen, approved.payable_fen) == (pb.DECISION_APPROVED, 500, 1_500)
    below = await authorize(client, Line("1", GENERAL, 1_999), campaign="c-voucher")
    assert below.decline_reason == pb.DECLINE_REASON_PRICE_BELOW_THRESHOLD


async def test_several_lines_are_summed_per_line(client: AuthorizationClient) -> None:
    """Each line gets its own subsidy; totals are the sums."""
    response = await authorize(
        client,
        Line("a", FRIDGE_G1, 300_000, serial()),
        Line("b", WASHER, 200_000),
        Line("c", AIR_CONDITIONER, 400_000, serial()),
        Line("d", AIR_CONDITIONER, 400_000, serial()),
    )
    assert response.decision == pb.DECISION_APPROVED
    assert [line.subsidy_fen for line in response.lines] == [60_000, 40_000, 80_000, 80_000]
    assert response.subsidy_fen == 260_000
    assert response.total_price_fen == 1_300_000


@pytest.mark.parametrize(
    ("terminal", "campaign", "line", "reason"),
    [
        ("t-main-off", "c-main", Line("1", FRIDGE_G2, 100_000), pb.DECLINE_REASON_TERMINAL_INACTIVE),
        ("t-susp-01", "c-main", Line("1", FRIDGE_G2, 100_000), pb.DECLINE_REASON_MERCHANT_INACTIVE),
        ("t-main-01", "c-nonexistent", Line("1", FRIDGE_G2, 100_000), pb.DECLINE_REASON_CAMPAIGN_NOT_FOUND),
        ("t-main-01", "c-paused", Line("1", FRIDGE_G2, 100_000), pb.DECLINE_REASON_CAMPAIGN_NOT_FOUND),
        ("t-main-01", "c-future", Line("1", FRIDGE_G2, 100_000), pb.DECLINE_REASON_CAMPAIGN_NOT_ACTIVE),
        ("t-main-01", "c-main", Line("1", UNKNOWN_GTIN, 100_000), pb.DECLINE_REASON_PRODUCT_NOT_ELIGIBLE),
        ("t-main-01", "c-main", Line("1", FRIDGE_INACTIVE, 100_000), pb.DECLINE_REASON_PRODUCT_NOT_ELIGIBLE),
        ("t-main-01", "c-main", Line("1", DISHWASHER, 100_000), pb.DECLINE_REASON_CATEGORY_NOT_COVERED),
        ("t-scoped-01", "c-main", Line("1", WASHER, 100_000), pb.DECLINE_REASON_MERCHANT_CATEGORY_NOT_ALLOWED),
        ("t-main-01", "c-main", Line("1", TV_G3, 100_000), pb.DECLINE_REASON_GRADE_NOT_ELIGIBLE),
        ("t-main-01", "c-main", Line("1", PHONE, 600_001, "IMEI1"), pb.DECLINE_REASON_PRICE_ABOVE_CEILING),
        ("t-main-01", "c-main", Line("1", FRIDGE_G1, 2_000_001, "SNX"), pb.DECLINE_REASON_PRICE_ABOVE_CEILING),
        ("t-main-01", "c-main", Line("1", FRIDGE_G1, 300_000), pb.DECLINE_REASON_SERIAL_REQUIRED),
    ],
)
async def test_each_decline_reason(
    clients: dict[str, AuthorizationClient], terminal: str, campaign: str, line: Line, reason: int
) -> None:
    """Each rule violation is a normal response: DECLINED with its reason and the line."""
    response = await authorize(clients[terminal], line, campaign=campaign)
    assert response.decision == pb.DECISION_DECLINED
    assert pb.DeclineReason.Name(response.decline_reason) == pb.DeclineReason.Name(reason)  # type: ignore[arg-type]
    assert response.authorization_id == ""
    assert response.subsidy_fen == 0


async def test_scoped_merchant_still_sells_its_own_category(clients: dict[str, AuthorizationClient]) -> None:
    """The category scope declines only categories outside it."""
    response = await authorize(clients["t-scoped-01"], Line("1", FRIDGE_G2, 100_000))
    assert response.decision == pb.DECISION_APPROVED


async def test_serial_already_subsidised(client: AuthorizationClient) -> None:
    """A device serial is subsidised once: a second sale of it is declined, naming the line."""
    device = serial()
    first = await authorize(client, Line("1", PHONE, 300_000, device))
    assert first.decision == pb.DECISION_APPROVED
    second = await authorize(client, Line("x", PHONE, 300_000, device))
    assert second.decline_reason == pb.DECLINE_REASON_SERIAL_ALREADY_SUBSIDISED
    assert second.declined_line_id == "x"


async def test_consumer_limit_counts_across_terminals(clients: dict[str, AuthorizationClient]) -> None:
    """One fridge per person: the second, from another terminal, is declined; air conditioners allow 3."""
    person = consumer_key()
    first = await clients["t-main-01"].authorize(
        campaign_id="c-main", consumer_key=person, lines=[Line("1", FRIDGE_G2, 100_000)]
    )
    assert first.decision == pb.DECISION_APPROVED
    second = await clients["t-main-02"].authorize(
        campaign_id="c-main", consumer_key=person, lines=[Line("1", FRIDGE_G0, 100_000)]
    )
    assert second.decline_reason == pb.DECLINE_REASON_CONSUMER_LIMIT_REACHED
    three = [Line(str(index), AIR_CONDITIONER, 300_000, serial()) for index in range(3)]
    assert (await clients["t-main-01"].authorize(campaign_id="c-main", consumer_key=person, lines=three)).decision == (
        pb.DECISION_APPROVED
    )
    fourth = await clients["t-main-01"].authorize(
        campaign_id="c-main", consumer_key=person, lines=[Line("4", AIR_CONDITIONER, 300_000, serial())]
    )
    assert fourth.decline_reason == pb.DECLINE_REASON_CONSUMER_LIMIT_REACHED


async def test_budget_exhausted_declines_what_the_budget_cannot_cover(
    environment: Environment, client: AuthorizationClient
) -> None:
    """A category budget of 50,000 fen admits two 20,000-fen subsidies, not a third."""
    await load_document(
        environment,
        {
            "campaigns": [
                {
                    "id": "c-tight-budget",
                    "starts_at": "2020-01-01T00:00:00+00:00",
                    "ends_at": "2099-01-01T00:00:00+00:00",
                    "rules": [
                        {
                            "category": "fridge",
                            "kind": "PERCENT",
                            "rates_bp": {"2": 2000},
                            "cap_fen": 200_000,
                            "per_person_limit": 1,
                            "budget_fen": 50_000,
                        }
                    ],
                }
            ]
        },
    )
    decisions = [
        (await authorize(client, Line("1", FRIDGE_G2, 100_000), campaign="c-tight-budget")).decline_reason
        for _ in range(3)
    ]
    assert decisions == [
        pb.DECLINE_REASON_UNSPECIFIED,
        pb.DECLINE_REASON_UNSPECIFIED,
        pb.DECLINE_REASON_BUDGET_EXHAUSTED,
    ]


async def test_reason_precedence_over_lines(client: AuthorizationClient) -> None:
    """With several violations the reason listed first in DeclineReason wins, whichever line has it."""
    response = await authorize(
        client,
        Line("first", PHONE, 900_000, serial()),  # PRICE_ABOVE_CEILING (9)
        Line("second", UNKNOWN_GTIN, 100_000),  # PRODUCT_NOT_ELIGIBLE (5)
        Line("third", TV_G3, 100_000),  # GRADE_NOT_ELIGIBLE (8)
    )
    assert response.decline_reason == pb.DECLINE_REASON_PRODUCT_NOT_ELIGIBLE
    assert response.declined_line_id == "second"


async def test_a_declined_request_reserves_nothing(client: AuthorizationClient) -> None:
    """All or nothing: a request with one bad line reserves neither the good line's serial nor quota."""
    device = serial()
    declined = await authorize(client, Line("ok", FRIDGE_G1, 300_000, device), Line("bad", UNKNOWN_GTIN, 100_000))
    assert declined.decision == pb.DECISION_DECLINED
    again = await authorize(client, Line("ok", FRIDGE_G1, 300_000, device))
    assert again.decision == pb.DECISION_APPROVED
