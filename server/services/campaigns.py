"""CampaignService: create, update and read campaigns; live budget status.

The request's Campaign message becomes the same document a reference file holds and is
validated by the same pure rules (server.domain.reference), so a rule that cannot work is
refused with INVALID_ARGUMENT naming the field (``campaign.rules[0].cap_fen``) however it
arrives. Budget counters are never written here: they are money state (Redis and the ledger).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client.v1 import campaign_pb2, campaign_pb2_grpc, common_pb2

from server.domain.budget import released_by
from server.domain.geo import CoordinateSystem
from server.domain.reference import RISK_LIMIT_FIELDS, Campaign, ReferenceError, parse_campaign
from server.rpc.auth import OPERATOR, caller
from server.rpc.errors import invalid_field
from server.services.common import COORDINATE_SYSTEMS, checked_timestamp
from server.services.operations import OperatorDeps, already_exists, begin_action, not_found
from storage.postgres.actions import Scope, publish_scope, record
from storage.postgres.reference import fetch_campaign, lock_campaign, save_campaign
from storage.redis.budget import read_budget

pb = campaign_pb2
KINDS: dict[Any, str] = {pb.RULE_KIND_PERCENT: "PERCENT", pb.RULE_KIND_FIXED: "FIXED"}
STATUSES: dict[Any, str] = {pb.CAMPAIGN_STATUS_ACTIVE: "ACTIVE", pb.CAMPAIGN_STATUS_PAUSED: "PAUSED"}
POLICIES: dict[Any, str] = {
    pb.REFUND_POLICY_RESTORE_ON_FULL_REFUND: "RESTORE_ON_FULL_REFUND",
    pb.REFUND_POLICY_COUNT_AS_USED: "COUNT_AS_USED",
}
# UNSPECIFIED is LINE, the threshold's meaning before the field; answers say LINE or BASKET.
SCOPES: dict[Any, str] = {pb.THRESHOLD_SCOPE_LINE: "LINE", pb.THRESHOLD_SCOPE_BASKET: "BASKET"}


def _time(stamp: Timestamp, present: bool, field: str) -> str | None:
    return checked_timestamp(stamp, field).ToDatetime(tzinfo=UTC).isoformat() if present else None


def _enum(value: int, names: dict[Any, str], field: str, default: str | None = None) -> str:
    if value in names:
        return names[value]
    if value == 0 and default is not None:
        return default
    raise invalid_field(field, "must be one of " + ", ".join(sorted(names.values())))


def _region_system(value: int) -> CoordinateSystem:
    """The region's system; UNSPECIFIED is WGS-84, the region's contract before the field."""
    if value == common_pb2.COORDINATE_SYSTEM_UNSPECIFIED:
        return CoordinateSystem.WGS84
    if value in COORDINATE_SYSTEMS:
        return COORDINATE_SYSTEMS[value]
    raise invalid_field(
        "campaign.region_coordinate_system", "must be COORDINATE_SYSTEM_WGS84 or COORDINATE_SYSTEM_GCJ02"
    )


def campaign_document(message: campaign_pb2.Campaign) -> dict[str, Any]:
    """The Campaign message as a reference-file record (see examples/campaigns/*.yaml)."""
    rules = []
    for index, rule in enumerate(message.rules):
        path = f"campaign.rules[{index}]"
        grades = [rate.energy_grade for rate in rule.rates]
        if len(set(grades)) != len(grades):
            raise invalid_field(f"{path}.rates", "each energy grade may appear once")
        rules.append(
            {
                "category": rule.category,
                "kind": _enum(rule.kind, KINDS, f"{path}.kind"),
                "rates_bp": {str(rate.energy_grade): rate.rate_bp for rate in rule.rates},
                "cap_fen": rule.cap_fen,
                "threshold_fen": rule.threshold_fen,
                "off_fen": rule.off_fen,
                "price_ceiling_fen": rule.price_ceiling_fen,
                "per_person_limit": rule.per_person_limit,
                "budget_fen": rule.budget_fen,
                "tranches": [
                    {
                        "release_at": _time(
                            tranche.release_at, tranche.HasField("release_at"), f"{path}.tranches[{number}].release_at"
                        ),
                        "amount_fen": tranche.amount_fen,
                    }
                    for number, tranche in enumerate(rule.tranches)
                ],
                "qualification_quota": rule.qualification_quota,
                "qualification_tranches": [
                    {
                        "release_at": _time(
                            tranche.release_at,
                            tranche.HasField("release_at"),
                            f"{path}.qualification_tranches[{number}].release_at",
                        ),
                        "count": tranche.count,
                    }
                    for number, tranche in enumerate(rule.qualification_tranches)
                ],
                "threshold_scope": _enum(rule.threshold_scope, SCOPES, f"{path}.threshold_scope", default="LINE"),
            }
        )
    document: dict[str, Any] = {
        "id": message.campaign_id,
        "name": message.name or message.campaign_id,
        "status": _enum(message.status, STATUSES, "campaign.status", default="ACTIVE"),
        "starts_at": _time(message.starts_at, message.HasField("starts_at"), "campaign.starts_at"),
        "ends_at": _time(message.ends_at, message.HasField("ends_at"), "campaign.ends_at"),
        "region": message.region_geojson or None,
        "region_coordinate_system": _region_system(message.region_coordinate_system).value,
        "rules": rules,
        "packs": pack_documents(message),
        "qualification_validity_s": message.qualification_validity_s,
        "refund_policy": _enum(message.refund_policy, POLICIES, "campaign.refund_policy", default="COUNT_AS_USED"),
    }
    # 0 in the message means "the default" (proto3 has no absent scalars).
    if message.location_max_accuracy_m:
        document["location_max_accuracy_m"] = message.location_max_accuracy_m
    if message.location_max_age_s:
        document["location_max_age_s"] = message.location_max_age_s
    # Redemption-side rules: the flags are false when not set; the per-day limit is optional,
    # so an explicit 0 reaches the domain's check and is refused naming the field.
    document["redeem_in_region_only"] = message.redeem_in_region_only
    document["reclaim_after_expiry"] = message.reclaim_after_expiry
    document["require_location_at_redemption"] = message.require_location_at_redemption
    if message.HasField("per_merchant_daily_limit"):
        document["per_merchant_daily_limit"] = message.per_merchant_daily_limit
    # Hot-path risk rules: every field of the message (0: none), validated by the domain.
    if message.HasField("risk_limits"):
        document["risk_limits"] = {name: getattr(message.risk_limits, name) for name in RISK_LIMIT_FIELDS}
    return document


def pack_documents(message: campaign_pb2.Campaign) -> list[dict[str, Any]]:
    """The message's voucher packs as reference-file records, validated by parse_campaign."""
    return [
        {
            "pack_id": pack.pack_id,
            "vouchers": [
                {"category": v.category, "threshold_fen": v.threshold_fen, "off_fen": v.off_fen} for v in pack.vouchers
            ],
            "quota": pack.quota,
            "tranches": [
                {
                    "release_at": _time(
                        tranche.release_at,
                        tranche.HasField("release_at"),
                        f"campaign.packs[{index}].tranches[{number}].release_at",
                    ),
                    "count": tranche.count,
                }
                for number, tranche in enumerate(pack.tranches)
            ],
        }
        for index, pack in enumerate(message.packs)
    ]


def parse_request_campaign(message: campaign_pb2.Campaign) -> Campaign:
    try:
        return parse_campaign(campaign_document(message), "campaign")
    except ReferenceError as error:
        raise invalid_field(error.field.replace("campaign.id", "campaign.campaign_id"), error.reason) from None


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def risk_limits_message(stored: Any) -> campaign_pb2.RiskLimits | None:
    """The risk_limits column (JSON text of the non-zero limits) as the message; None for none."""
    limits = orjson.loads(stored) if isinstance(stored, str | bytes) else (stored or {})
    return pb.RiskLimits(**limits) if limits else None


def campaign_message(row: Any, rules: list[dict[str, Any]]) -> campaign_pb2.Campaign:
    kinds = {name: value for value, name in KINDS.items()}
    region = row["region"]
    return pb.Campaign(
        campaign_id=row["campaign_id"],
        name=row["name"],
        status=next(value for value, name in STATUSES.items() if name == row["status"]),
        starts_at=_stamp(row["starts_at"]),
        ends_at=_stamp(row["ends_at"]),
        region_geojson=region if isinstance(region, str) else (orjson.dumps(region).decode() if region else ""),
        region_coordinate_system=(
            common_pb2.COORDINATE_SYSTEM_WGS84 if region else common_pb2.COORDINATE_SYSTEM_UNSPECIFIED
        ),
        qualification_validity_s=row["qualification_validity_s"],
        refund_policy=next(value for value, name in POLICIES.items() if name == row["refund_policy"]),
        location_max_accuracy_m=row["location_max_accuracy_m"],
        location_max_age_s=row["location_max_age_s"],
        redeem_in_region_only=row["redeem_in_region_only"],
        per_merchant_daily_limit=row["per_merchant_daily_limit"],
        reclaim_after_expiry=row["reclaim_after_expiry"],
        require_location_at_redemption=row["require_location_at_redemption"],
        risk_limits=risk_limits_message(row["risk_limits"]),
        rules=[
            pb.CategoryRule(
                category=rule["category"],
                kind=kinds[rule["kind"]],
                rates=[
                    pb.GradeRate(energy_grade=int(grade), rate_bp=rate)
                    for grade, rate in sorted(rule["rates_bp"].items())
                ],
                cap_fen=rule["cap_fen"],
                threshold_fen=rule["threshold_fen"],
                off_fen=rule["off_fen"],
                price_ceiling_fen=rule["price_ceiling_fen"],
                per_person_limit=rule["per_person_limit"],
                budget_fen=rule["budget_fen"],
                tranches=[
                    pb.BudgetTranche(
                        release_at=_stamp(datetime.fromisoformat(tranche["release_at"])),
                        amount_fen=tranche["amount_fen"],
                    )
                    for tranche in rule["tranches"]
                ],
                qualification_quota=rule["qualification_quota"],
                qualification_tranches=[
                    pb.QualificationTranche(
                        release_at=_stamp(datetime.fromisoformat(tranche["release_at"])), count=tranche["count"]
                    )
                    for tranche in rule["qualification_tranches"]
                ],
                threshold_scope=next(value for value, name in SCOPES.items() if name == rule["threshold_scope"]),
            )
            for rule in rules
        ],
        packs=pack_messages(orjson.loads(row["voucher_packs"])),
    )


def pack_messages(packs: list[dict[str, Any]]) -> list[campaign_pb2.VoucherPack]:
    """The stored voucher packs (storage/postgres/reference.py's pack_documents) as messages."""
    return [
        pb.VoucherPack(
            pack_id=pack["pack_id"],
            vouchers=[
                pb.PackVoucher(category=v["category"], threshold_fen=v["threshold_fen"], off_fen=v["off_fen"])
                for v in pack["vouchers"]
            ],
            quota=pack["quota"],
            tranches=[
                pb.QualificationTranche(
                    release_at=_stamp(datetime.fromisoformat(tranche["release_at"])), count=tranche["count"]
                )
                for tranche in pack["tranches"]
            ],
        )
        for pack in packs
    ]


class CampaignService(campaign_pb2_grpc.CampaignServiceServicer):
    def __init__(self, deps: OperatorDeps) -> None:
        self._deps = deps

    async def _read(self, campaign_id: str) -> campaign_pb2.Campaign:
        pool = await self._deps.pool.get()
        async with pool.acquire() as connection:
            found = await fetch_campaign(connection, campaign_id)
        if found is None:
            raise not_found("campaign", campaign_id)
        return campaign_message(*found)

    async def _save(self, method: str, request: Any, must_exist: bool) -> tuple[campaign_pb2.Campaign, int]:
        action = begin_action(method, request, "campaign", request.campaign.campaign_id)
        campaign = parse_request_campaign(request.campaign)
        pool = await self._deps.pool.get()
        async with pool.acquire() as connection, connection.transaction():
            exists = await lock_campaign(connection, campaign.campaign_id)
            version = await record(
                connection, action, campaign_document(request.campaign), Scope(campaign_ids=(campaign.campaign_id,))
            )
            if version is not None:
                if must_exist and not exists:
                    raise not_found("campaign", campaign.campaign_id)
                if not must_exist and exists:
                    raise already_exists("campaign", campaign.campaign_id)
                await save_campaign(connection, campaign)
        published = await publish_scope(
            pool, self._deps.store.redis, self._deps.store.keys, Scope(campaign_ids=(campaign.campaign_id,)), version
        )
        return await self._read(campaign.campaign_id), published

    async def CreateCampaign(
        self, request: campaign_pb2.CreateCampaignRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.CreateCampaignResponse:
        campaign, version = await self._save("CreateCampaign", request, must_exist=False)
        return pb.CreateCampaignResponse(campaign=campaign, reference_version=version)

    async def UpdateCampaign(
        self, request: campaign_pb2.UpdateCampaignRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.UpdateCampaignResponse:
        campaign, version = await self._save("UpdateCampaign", request, must_exist=True)
        return pb.UpdateCampaignResponse(campaign=campaign, reference_version=version)

    async def GetCampaign(
        self, request: campaign_pb2.GetCampaignRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.GetCampaignResponse:
        caller(OPERATOR)
        return pb.GetCampaignResponse(campaign=await self._read(request.campaign_id))

    async def GetBudgetStatus(
        self, request: campaign_pb2.GetBudgetStatusRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.GetBudgetStatusResponse:
        caller(OPERATOR)
        campaign = await self._read(request.campaign_id)
        counters = await read_budget(self._deps.store.redis, self._deps.store.keys, request.campaign_id)
        now_ms = counters.as_of_ms
        categories = []
        for rule in campaign.rules:
            released = released_by(
                [(t.release_at.ToMilliseconds(), t.amount_fen) for t in rule.tranches], rule.budget_fen, now_ms
            )
            qualifications_released = released_by(
                [(t.release_at.ToMilliseconds(), t.count) for t in rule.qualification_tranches],
                rule.qualification_quota,
                now_ms,
            )
            category = counters.category(rule.category)
            reserved, spent = category.reserved_fen, category.spent_fen
            categories.append(
                pb.CategoryBudget(
                    category=rule.category,
                    budget_fen=rule.budget_fen,
                    released_fen=released,
                    reserved_fen=reserved,
                    spent_fen=spent,
                    refunded_fen=category.refunded_fen,
                    available_fen=released - reserved - spent,
                    qualification_quota=rule.qualification_quota,
                    qualifications_released=qualifications_released,
                    qualifications_claimed=category.qualifications_claimed,
                )
            )
        packs = [
            pb.PackBudget(
                pack_id=pack.pack_id,
                quota=pack.quota,
                released=released_by(
                    [(t.release_at.ToMilliseconds(), t.count) for t in pack.tranches], pack.quota, now_ms
                ),
                claimed=counters.quota.get(f"pack:{pack.pack_id}:claimed", 0),
            )
            for pack in campaign.packs
        ]
        as_of = Timestamp()
        as_of.FromMilliseconds(now_ms)
        return pb.GetBudgetStatusResponse(
            campaign_id=request.campaign_id, categories=categories, as_of=as_of, packs=packs
        )
