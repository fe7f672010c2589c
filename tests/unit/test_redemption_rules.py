"""The redemption-side campaign rules (issue 13, items 1, 3 and 4) as pure rules: how a
campaign file says them, what contradicts, which stores a region covers, and the programme
day's offset."""

from __future__ import annotations

import zoneinfo
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.domain.geo import stores_inside
from server.domain.reference import ReferenceError, parse_campaign, parse_reference
from storage.redis.store import StoreLimits

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "campaigns"
XIAOSHAN = yaml.safe_load((ROOT / "examples" / "merchants" / "xiaoshan-region.geojson.yaml").read_text())
XIAOSHAN_TEXT = '{"type": "Polygon", "coordinates": ' + str(XIAOSHAN["coordinates"]).replace("'", '"') + "}"


BOWTIE = [[120.1, 30.1], [120.3, 30.3], [120.3, 30.1], [120.1, 30.3], [120.1, 30.1]]  # self-intersecting


def voucher_campaign(**fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": "c-v",
        "starts_at": "2026-01-01T00:00:00+08:00",
        "ends_at": "2027-01-01T00:00:00+08:00",
        "qualification_validity_s": 604_800,
        "region": XIAOSHAN,
        "rules": [
            {"category": "general", "kind": "FIXED", "threshold_fen": 2000, "off_fen": 500, "per_person_limit": 1,
             "budget_fen": 1_000_000},
        ],
    }  # fmt: skip
    record.update(fields)
    return record


def test_defaults_leave_running_campaigns_as_they_were() -> None:
    """Without the fields: redemption anywhere, no daily limit, claim once per round."""
    campaign = parse_campaign(voucher_campaign(), "campaign")
    assert (campaign.redeem_in_region_only, campaign.per_merchant_daily_limit, campaign.reclaim_after_expiry) == (
        False,
        None,
        False,
    )


def test_the_example_files_say_the_published_rules() -> None:
    hangzhou = parse_campaign(yaml.safe_load((EXAMPLES / "hangzhou-voucher-pack.yaml").read_text()), "campaign")
    assert hangzhou.per_merchant_daily_limit == 2 and not hangzhou.reclaim_after_expiry
    hubei = parse_campaign(yaml.safe_load((EXAMPLES / "hubei-vouchers.yaml").read_text()), "campaign")
    assert hubei.redeem_in_region_only and hubei.region is not None and not hubei.reclaim_after_expiry


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"per_merchant_daily_limit": 0}, "campaigns[0].per_merchant_daily_limit", "between 1 and 1000"),
        ({"per_merchant_daily_limit": -2}, "campaigns[0].per_merchant_daily_limit", "between 1 and 1000"),
        ({"per_merchant_daily_limit": "2"}, "campaigns[0].per_merchant_daily_limit", "integer"),
        ({"region": None, "redeem_in_region_only": True}, "campaigns[0].redeem_in_region_only", "has none"),
        ({"redeem_in_region_only": "yes"}, "campaigns[0].redeem_in_region_only", "true or false"),
        ({"qualification_validity_s": 0, "reclaim_after_expiry": True}, "campaigns[0].reclaim_after_expiry",
         "issues no"),
        ({"region": {"type": "Polygon", "coordinates": [BOWTIE]}}, "campaigns[0].region", "not a valid polygon"),
    ],
)  # fmt: skip
def test_contradictions_are_refused_naming_the_field(fields: dict[str, Any], field: str, reason: str) -> None:
    """The same pure rules serve reference files and CampaignService."""
    with pytest.raises(ReferenceError) as raised:
        parse_reference({"campaigns": [voucher_campaign(**fields)]})
    assert raised.value.field == field and reason in raised.value.reason


def test_stores_inside_a_region_include_its_boundary_and_exclude_shops_without_a_location() -> None:
    stores = [
        ("xiaoshan-government", 30.18, 120.26),
        ("on-a-vertex", 30.225, 120.25),
        ("binjiang-government", 30.208, 120.212),
        ("west-lake", 30.25, 120.14),
        ("online", None, None),
    ]
    assert stores_inside(XIAOSHAN_TEXT, stores) == {"xiaoshan-government", "on-a-vertex"}


def test_the_programme_day_offset_comes_from_the_zone() -> None:
    """Asia/Shanghai is UTC+8 all year; the zone is checked when the limits are built."""
    limits = StoreLimits(hold_ttl_s=1, idempotency_ttl_s=1, nonce_ttl_s=1)
    assert limits.day_offset_ms() == 8 * 3_600_000
    assert StoreLimits(1, 1, 1, programme_timezone="Etc/GMT+12").day_offset_ms() == -12 * 3_600_000
    with pytest.raises(zoneinfo.ZoneInfoNotFoundError):
        StoreLimits(1, 1, 1, programme_timezone="Mars/Olympus")
