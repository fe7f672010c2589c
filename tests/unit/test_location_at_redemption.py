"""Location at redemption (issue 13, item 2) as pure rules: how a campaign file says it, what
contradicts it, and the verdicts Authorize passes to its script."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from subsidy_client.v1 import authorization_pb2 as apb

from server.domain import location
from server.domain.reference import ReferenceError, parse_campaign, parse_reference

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "campaigns"
XIAOSHAN = yaml.safe_load((ROOT / "examples" / "merchants" / "xiaoshan-region.geojson.yaml").read_text())


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


def test_off_by_default_and_on_when_the_file_says_so() -> None:
    assert not parse_campaign(voucher_campaign(), "campaign").require_location_at_redemption
    assert parse_campaign(voucher_campaign(require_location_at_redemption=True), "c").require_location_at_redemption


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"region": None, "require_location_at_redemption": True}, "has none"),
        ({"require_location_at_redemption": "yes"}, "true or false"),
        ({"require_location_at_redemption": 1}, "true or false"),
    ],
)
def test_contradictions_are_refused_naming_the_field(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(ReferenceError) as raised:
        parse_reference({"campaigns": [voucher_campaign(**fields)]})
    assert raised.value.field == "campaigns[0].require_location_at_redemption"
    assert reason in raised.value.reason


def test_the_yantai_example_requires_location_at_redemption() -> None:
    yantai = parse_campaign(yaml.safe_load((EXAMPLES / "yantai-vouchers.yaml").read_text()), "campaign")
    assert yantai.require_location_at_redemption and yantai.region is not None
    assert yantai.issues_qualifications


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda path: path.name)
def test_every_example_campaign_file_parses(path: Path) -> None:
    """Each file of examples/campaigns/ is a valid campaign (or a campaigns: list)."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    records = document["campaigns"] if "campaigns" in document else [document]
    assert [parse_campaign(record, "campaign").campaign_id for record in records]


def test_verdicts_answer_the_decline_reasons_in_their_order() -> None:
    """Every verdict has its reason, ACCEPTED is 0, the declines keep the domain's precedence
    and come right after LOCATION_REQUIRED, which a payment without a location gets."""
    from server.services.authorization import LOCATION_REQUIRED, LOCATION_VERDICTS

    assert set(LOCATION_VERDICTS) == set(location.Verdict)
    assert LOCATION_VERDICTS[location.Verdict.ACCEPTED] == 0
    assert LOCATION_REQUIRED == apb.DECLINE_REASON_LOCATION_REQUIRED
    declines = [verdict for verdict in location.Verdict if verdict is not location.Verdict.ACCEPTED]
    for verdict in declines:
        assert apb.DeclineReason.Name(LOCATION_VERDICTS[verdict]) == f"DECLINE_REASON_LOCATION_{verdict.name}"
    assert [LOCATION_VERDICTS[verdict] for verdict in declines] == list(range(LOCATION_REQUIRED + 1, 29))
