"""subsidyctl campaign / budget: apply campaign files, read campaigns and budget status."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import click
import orjson
import yaml
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client import SignedClient, SubsidyError
from subsidy_client.v1 import campaign_pb2 as pb
from subsidy_client.v1 import common_pb2

from server.ctl.common import GATEWAY, Settings, emit, json_option, pass_settings, run
from server.domain.reference import ReferenceError, parse_campaign
from server.services.campaigns import KINDS, POLICIES, SCOPES, STATUSES

SERVICE = "/subsidy.v1.CampaignService/"


def _stamp(moment: Any) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def campaigns_from_file(path: Path) -> list[pb.Campaign]:
    """The campaigns of a YAML file (one campaign, or a ``campaigns:`` list; the reference-file
    format, see examples/campaigns/), validated locally first so a mistake is reported with its
    field before anything is sent."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    records = document["campaigns"] if isinstance(document, dict) and "campaigns" in document else [document]
    return [campaign_message(record, path) for record in records]


def campaign_message(record: Any, path: Path) -> pb.Campaign:
    try:
        campaign = parse_campaign(record, "campaign")
    except ReferenceError as error:
        raise click.ClickException(f"{path}: {error}") from None
    by_name = {name: value for value, name in KINDS.items()}
    return pb.Campaign(
        campaign_id=campaign.campaign_id,
        name=campaign.name,
        status={name: value for value, name in STATUSES.items()}[campaign.status],
        starts_at=_stamp(campaign.starts_at),
        ends_at=_stamp(campaign.ends_at),
        # parse_campaign has already converted a GCJ-02 region (region_coordinate_system in the
        # file) with the server's own code; what is sent is WGS-84, and says so.
        region_geojson=orjson.dumps(campaign.region).decode() if campaign.region else "",
        region_coordinate_system=(
            common_pb2.COORDINATE_SYSTEM_WGS84 if campaign.region else common_pb2.COORDINATE_SYSTEM_UNSPECIFIED
        ),
        qualification_validity_s=campaign.qualification_validity_s,
        refund_policy={name: value for value, name in POLICIES.items()}[campaign.refund_policy],
        location_max_accuracy_m=campaign.location_max_accuracy_m,
        location_max_age_s=campaign.location_max_age_s,
        redeem_in_region_only=campaign.redeem_in_region_only,
        per_merchant_daily_limit=campaign.per_merchant_daily_limit,
        reclaim_after_expiry=campaign.reclaim_after_expiry,
        require_location_at_redemption=campaign.require_location_at_redemption,
        risk_limits=pb.RiskLimits(**campaign.risk_limits) if campaign.risk_limits else None,
        rules=[
            pb.CategoryRule(
                category=rule.category,
                kind=by_name[rule.kind],
                rates=[pb.GradeRate(energy_grade=int(grade), rate_bp=rate) for grade, rate in rule.rates_bp.items()],
                cap_fen=rule.cap_fen,
                threshold_fen=rule.threshold_fen,
                off_fen=rule.off_fen,
                price_ceiling_fen=rule.price_ceiling_fen,
                per_person_limit=rule.per_person_limit,
                budget_fen=rule.budget_fen,
                tranches=[
                    pb.BudgetTranche(release_at=_stamp(moment), amount_fen=amount) for moment, amount in rule.tranches
                ],
                qualification_quota=rule.qualification_quota,
                qualification_tranches=[
                    pb.QualificationTranche(release_at=_stamp(moment), count=count)
                    for moment, count in rule.qualification_tranches
                ],
                threshold_scope={name: value for value, name in SCOPES.items()}[rule.threshold_scope],
            )
            for rule in campaign.rules
        ],
        packs=[
            pb.VoucherPack(
                pack_id=pack.pack_id,
                vouchers=[
                    pb.PackVoucher(category=v.category, threshold_fen=v.threshold_fen, off_fen=v.off_fen)
                    for v in pack.vouchers
                ],
                quota=pack.quota,
                tranches=[
                    pb.QualificationTranche(release_at=_stamp(moment), count=count) for moment, count in pack.tranches
                ],
            )
            for pack in campaign.packs
        ],
    )


def rule_rows(campaign: pb.Campaign) -> list[dict[str, Any]]:
    return [
        {
            "category": rule.category,
            "kind": pb.RuleKind.Name(rule.kind).removeprefix("RULE_KIND_"),
            "rates": ",".join(f"g{rate.energy_grade}:{rate.rate_bp / 100:g}%" for rate in rule.rates),
            "cap_yuan": rule.cap_fen / 100,
            "off_yuan/min_yuan": f"{rule.off_fen / 100:g}/{rule.threshold_fen / 100:g}" if rule.off_fen else "",
            "min_of": "basket" if rule.threshold_scope == pb.THRESHOLD_SCOPE_BASKET else "",
            "ceiling_yuan": rule.price_ceiling_fen / 100 if rule.price_ceiling_fen else "",
            "per_person": rule.per_person_limit,
            "budget_yuan": rule.budget_fen / 100,
            "tranches": len(rule.tranches),
        }
        for rule in campaign.rules
    ]


@click.group()
def campaign() -> None:
    """Campaigns: window, region, rules, budgets."""


@campaign.command("apply", short_help="Create or update the campaigns of a YAML file.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@pass_settings
def apply(settings: Settings, file: Path) -> None:
    """Create each campaign in FILE, or update it if it exists (request ids are derived from the
    content, so applying the same file twice is a harmless replay)."""
    for message in campaigns_from_file(file):

        async def action(client: SignedClient, message: pb.Campaign = message) -> Any:
            return await apply_one(client, message)

        response = run(settings, action)
        emit(settings, response, rule_rows(response.campaign))


def content_request_id(method: str, message: pb.Campaign) -> str:
    """The same file applied again sends the same request id, so the gateway replays."""
    digest = hashlib.sha256(method.encode() + message.SerializeToString(deterministic=True)).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


async def apply_one(client: SignedClient, message: pb.Campaign) -> Any:
    try:
        await client._call(
            SERVICE + "GetCampaign", pb.GetCampaignRequest(campaign_id=message.campaign_id), pb.GetCampaignResponse
        )
    except SubsidyError as error:
        if error.reason != "NOT_FOUND":
            raise
        request = pb.CreateCampaignRequest(request_id=content_request_id("Create", message), campaign=message)
        return await client._call(SERVICE + "CreateCampaign", request, pb.CreateCampaignResponse)
    update = pb.UpdateCampaignRequest(request_id=content_request_id("Update", message), campaign=message)
    return await client._call(SERVICE + "UpdateCampaign", update, pb.UpdateCampaignResponse)


@campaign.command("show")
@click.argument("campaign_id")
@json_option
@pass_settings
def show(settings: Settings, campaign_id: str) -> None:
    """Show a campaign and its rules."""

    async def action(client: SignedClient) -> pb.GetCampaignResponse:
        return await client._call(
            SERVICE + "GetCampaign", pb.GetCampaignRequest(campaign_id=campaign_id), pb.GetCampaignResponse
        )

    response = run(settings, action)
    emit(settings, response, rule_rows(response.campaign))


@click.group()
def budget() -> None:
    """Budget status of a campaign."""


@budget.command("status", short_help="Budget use of a campaign per category.")
@click.argument("campaign_id")
@json_option
@pass_settings
def status(settings: Settings, campaign_id: str) -> None:
    """Budget use per category, live from the hot path (amounts in yuan in the table, fen in JSON)."""

    async def action(client: SignedClient) -> pb.GetBudgetStatusResponse:
        request = pb.GetBudgetStatusRequest(campaign_id=campaign_id)
        return await client._call(SERVICE + "GetBudgetStatus", request, pb.GetBudgetStatusResponse)

    response = run(settings, action)
    rows = [
        {
            "category": item.category,
            "budget": f"{item.budget_fen / 100:.2f}",
            "released": f"{item.released_fen / 100:.2f}",
            "reserved": f"{item.reserved_fen / 100:.2f}",
            "spent": f"{item.spent_fen / 100:.2f}",
            "refunded": f"{item.refunded_fen / 100:.2f}",
            "available": f"{item.available_fen / 100:.2f}",
            # Qualifications (vouchers): claimed / released of the quota; "-" when none issued.
            "vouchers": (
                f"{item.qualifications_claimed}/{item.qualifications_released} of {item.qualification_quota}"
                if item.qualification_quota
                else "-"
            ),
        }
        for item in response.categories
    ]
    # Voucher packs: claimed / released of the quota, counted in packs (their vouchers'
    # discounts are spent from the categories' budgets above).
    rows += [
        {
            "category": f"pack {pack.pack_id}",
            **dict.fromkeys(("budget", "released", "reserved", "spent", "refunded", "available"), "-"),
            "vouchers": f"{pack.claimed}/{pack.released} of {pack.quota} packs",
        }
        for pack in response.packs
    ]
    emit(settings, response, rows)


SECTION = GATEWAY
COMMANDS = (campaign, budget)
