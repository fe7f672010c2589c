"""The claim's location rules (server/domain/location.py) and the qualification settings of
campaigns (server/domain/reference.py): pure functions, no I/O."""

from __future__ import annotations

import math

import pytest

from server.domain import location
from server.domain.geo import CoordinateError, Point, Region
from server.domain.reference import ReferenceError, parse_campaign

RULE = location.LocationRule(max_accuracy_m=100, max_age_s=300)
NOW_MS = 1_800_000_000_000
XIAOSHAN_BOX = Region(
    {"type": "Polygon", "coordinates": [[[120.1, 29.8], [120.6, 29.8], [120.6, 30.3], [120.1, 30.3], [120.1, 29.8]]]}
)
INSIDE = Point(30.18, 120.26)
OUTSIDE = Point(30.25, 119.9)


def test_an_accurate_recent_real_fix_inside_the_region_is_accepted() -> None:
    assert location.verdict(INSIDE, 30.0, NOW_MS - 1000, False, NOW_MS, RULE, XIAOSHAN_BOX) == location.Verdict.ACCEPTED
    assert location.verdict(OUTSIDE, 30.0, NOW_MS, False, NOW_MS, RULE, None) == location.Verdict.ACCEPTED  # no region


def test_the_limits_are_inclusive() -> None:
    assert (
        location.verdict(INSIDE, 100.0, NOW_MS - 300_000, False, NOW_MS, RULE, XIAOSHAN_BOX)
        == location.Verdict.ACCEPTED
    )
    assert location.verdict(INSIDE, 100.01, NOW_MS, False, NOW_MS, RULE, XIAOSHAN_BOX) == location.Verdict.INACCURATE
    assert location.verdict(INSIDE, 10.0, NOW_MS - 300_001, False, NOW_MS, RULE, XIAOSHAN_BOX) == location.Verdict.STALE


def test_declines_follow_the_enum_precedence() -> None:
    """Mock, then stale, then inaccurate, then outside: a spoofed fix is reported as such even
    when it is also old, vague and elsewhere."""
    old = NOW_MS - 3_600_000
    assert location.verdict(OUTSIDE, 9_999, old, True, NOW_MS, RULE, XIAOSHAN_BOX) == (location.Verdict.MOCKED)
    assert location.verdict(OUTSIDE, 9_999, old, False, NOW_MS, RULE, XIAOSHAN_BOX) == (location.Verdict.STALE)
    assert location.verdict(OUTSIDE, 9_999, NOW_MS, False, NOW_MS, RULE, XIAOSHAN_BOX) == (location.Verdict.INACCURATE)
    assert location.verdict(OUTSIDE, 10, NOW_MS, False, NOW_MS, RULE, XIAOSHAN_BOX) == (location.Verdict.OUTSIDE_REGION)


@pytest.mark.parametrize(
    ("accuracy_m", "fix_ms", "field"),
    [
        (0.0, NOW_MS, "accuracy_m"),
        (-1.0, NOW_MS, "accuracy_m"),
        (math.nan, NOW_MS, "accuracy_m"),
        (math.inf, NOW_MS, "accuracy_m"),
        (2e6, NOW_MS, "accuracy_m"),
        (10.0, 0, "fix_time"),
        (10.0, NOW_MS + 60_001, "fix_time"),
    ],
)
def test_impossible_fixes_are_errors_naming_the_field(accuracy_m: float, fix_ms: int, field: str) -> None:
    with pytest.raises(CoordinateError) as refused:
        location.check_fix(accuracy_m, fix_ms, NOW_MS)
    assert refused.value.field == field


def test_a_clock_a_minute_fast_is_tolerated() -> None:
    location.check_fix(10.0, NOW_MS + 60_000, NOW_MS)


def test_the_kept_cell_is_coarse() -> None:
    assert location.coarse_cell(Point(30.184321, 120.264987)) == "30.18,120.26"
    assert location.coarse_cell(Point(-0.004, -0.006)) == "-0.00,-0.01"


def campaign(validity_s: int, **rule: object) -> dict[str, object]:
    return {
        "id": "c",
        "starts_at": "2026-01-01T00:00:00+08:00",
        "ends_at": "2027-01-01T00:00:00+08:00",
        "qualification_validity_s": validity_s,
        "rules": [
            {
                "category": "general",
                "kind": "FIXED",
                "threshold_fen": 2000,
                "off_fen": 500,
                "per_person_limit": 1,
                "budget_fen": 1_000_000,
                **rule,
            }
        ],
    }


def test_the_quota_defaults_to_what_the_budget_funds() -> None:
    assert parse_campaign(campaign(3600), "c").rules[0].qualification_quota == 2000  # 1,000,000 / 500
    assert parse_campaign(campaign(3600, qualification_quota=7), "c").rules[0].qualification_quota == 7
    assert parse_campaign(campaign(0), "c").rules[0].qualification_quota == 0  # issues none


def test_qualification_tranches_must_fit_the_quota_and_be_ordered() -> None:
    tranches = [
        {"release_at": "2026-01-01T20:00:00+08:00", "count": 5},
        {"release_at": "2026-01-02T20:00:00+08:00", "count": 5},
    ]
    parsed = parse_campaign(campaign(86_400, qualification_quota=10, qualification_tranches=tranches), "c")
    assert [count for _, count in parsed.rules[0].qualification_tranches] == [5, 5]
    with pytest.raises(ReferenceError) as too_many:
        parse_campaign(campaign(86_400, qualification_quota=9, qualification_tranches=tranches), "c")
    assert too_many.value.field == "c.rules[0].qualification_tranches"
    with pytest.raises(ReferenceError) as unordered:
        parse_campaign(campaign(86_400, qualification_tranches=list(reversed(tranches))), "c")
    assert unordered.value.field == "c.rules[0].qualification_tranches"
    with pytest.raises(ReferenceError) as uncounted:
        parse_campaign(campaign(3600, qualification_tranches=[{"release_at": "2026-01-01T20:00:00+08:00"}]), "c")
    assert uncounted.value.field == "c.rules[0].qualification_tranches[0].count"


def test_a_validity_shorter_than_the_release_interval_is_refused_naming_the_field() -> None:
    """Issue 13: a voucher claimed at one release must still be valid when the next opens. The
    shortest interval of each release plan counts: one second short is refused, the interval
    itself is accepted; one release (or none) has no interval; pack tranches are held to it too."""
    daily = [
        {"release_at": "2026-01-01T20:00:00+08:00", "count": 5},
        {"release_at": "2026-01-02T20:00:00+08:00", "count": 5},
        {"release_at": "2026-01-30T20:00:00+08:00", "count": 5},  # a longer gap: the shortest counts
    ]
    assert parse_campaign(campaign(86_400, qualification_tranches=daily), "c").qualification_validity_s == 86_400
    with pytest.raises(ReferenceError) as short:
        parse_campaign(campaign(86_399, qualification_tranches=daily), "c")
    assert short.value.field == "c.qualification_validity_s"
    assert "86400 s between two releases of c.rules[0].qualification_tranches" in short.value.reason
    assert parse_campaign(campaign(1, qualification_tranches=daily[:1]), "c").qualification_validity_s == 1
    assert parse_campaign(campaign(1), "c").qualification_validity_s == 1
    pack = {
        "pack_id": "p",
        "quota": 10,
        "vouchers": [{"category": "general", "threshold_fen": 2000, "off_fen": 500}],
        "tranches": [
            {"release_at": "2026-01-01T20:00:00+08:00", "count": 5},
            {"release_at": "2026-01-08T20:00:00+08:00", "count": 5},
        ],
    }
    assert parse_campaign({**campaign(7 * 86_400), "packs": [pack]}, "c").packs[0].quota == 10
    with pytest.raises(ReferenceError) as short_pack:
        parse_campaign({**campaign(7 * 86_400 - 1), "packs": [pack]}, "c")
    assert short_pack.value.field == "c.qualification_validity_s"
    assert "c.packs[0].tranches" in short_pack.value.reason


def test_location_limits_are_bounded() -> None:
    parsed = parse_campaign({**campaign(3600), "location_max_accuracy_m": 50, "location_max_age_s": 60}, "c")
    assert (parsed.location_max_accuracy_m, parsed.location_max_age_s) == (50, 60)
    with pytest.raises(ReferenceError) as refused:
        parse_campaign({**campaign(3600), "location_max_accuracy_m": 0}, "c")
    assert refused.value.field == "c.location_max_accuracy_m"


def test_every_verdict_is_answered_with_its_claim_decline_reason() -> None:
    """The servicer turns the domain's verdict into the number the claim script answers with:
    0 for accepted, else the ClaimDeclineReason of the same name, in the same precedence."""
    from subsidy_client.v1 import qualification_pb2 as qpb

    from server.services.qualification import LOCATION_VERDICTS

    assert set(LOCATION_VERDICTS) == set(location.Verdict)
    assert LOCATION_VERDICTS[location.Verdict.ACCEPTED] == 0
    declines = [verdict for verdict in location.Verdict if verdict is not location.Verdict.ACCEPTED]
    for verdict in declines:
        assert (
            qpb.ClaimDeclineReason.Name(LOCATION_VERDICTS[verdict]) == f"CLAIM_DECLINE_REASON_LOCATION_{verdict.name}"
        )
    numbers = [LOCATION_VERDICTS[verdict] for verdict in declines]
    assert numbers == sorted(numbers)
