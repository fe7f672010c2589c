"""Publishes reference data from PostgreSQL into the Redis hot-path cache.

Budget counters (reserved, spent, refunded) and consumer usage are money state and are never
touched here; only each category's released total is set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

import orjson
from redis.asyncio import Redis

from server.domain import budget, geo
from storage.postgres.reference import ReferenceSnapshot
from storage.redis.keys import Keys

BATCH_SIZE = 1000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _batches(rows: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    iterator = iter(rows)
    while batch := list(islice(iterator, BATCH_SIZE)):
        yield batch


# The order of a campaign's "risk" field: the RiskLimits fields authorize.lua reads by position.
RISK_FIELD_ORDER = (
    "terminal_sales_per_minute",
    "terminal_sales_per_hour",
    "merchant_sales_per_day",
    "consumer_sales_per_hour",
    "price_flag_min_sales",
    "price_flag_ratio_percent",
)


def risk_field(limits: Any) -> str:
    """A campaign's risk limits (the risk_limits column: JSON text or a mapping) as the
    comma-separated integers authorize.lua reads, in RISK_FIELD_ORDER; "" when none is set, so
    a campaign without risk rules costs the script one empty field."""
    if isinstance(limits, str | bytes):
        limits = orjson.loads(limits)
    values = [int((limits or {}).get(name, 0)) for name in RISK_FIELD_ORDER]
    return ",".join(str(value) for value in values) if any(values) else ""


def _region_text(region: Any) -> str:
    if region is None:
        return ""
    return region if isinstance(region, str) else orjson.dumps(region).decode()


def _epoch_ms(value: Any) -> int:
    return int(value.timestamp() * 1000)


def rule_json(row: dict[str, Any]) -> bytes:
    rates = row["rates_bp"]
    if isinstance(rates, str):
        rates = orjson.loads(rates)
    return orjson.dumps(
        {
            "kind": row["kind"],
            "rates_bp": rates,
            "cap_fen": row["cap_fen"],
            "threshold_fen": row["threshold_fen"],
            "off_fen": row["off_fen"],
            "price_ceiling_fen": row["price_ceiling_fen"],
            "per_person_limit": row["per_person_limit"],
            "tranches": tranche_schedule(row.get("tranches")),
            "q_quota": row.get("qualification_quota", 0),
            "q_tranches": tranche_schedule(row.get("qualification_tranches"), "count"),
            # FIXED rules: "BASKET" takes the amount off the payment's lines of the category
            # together (authorize.lua); "LINE" (and rows from before the column) each line.
            "threshold_scope": row.get("threshold_scope") or "LINE",
        }
    )


def tranche_schedule(raw: Any, amount_key: str = "amount_fen") -> list[list[int]]:
    """Tranches as the scripts read them (released in _lib.lua): [release ms, cumulative amount
    released], in order (server/domain/budget.py's schedule)."""
    tranches = orjson.loads(raw) if isinstance(raw, str | bytes) else list(raw or [])
    timed = [
        ((datetime.fromisoformat(item["release_at"]) - EPOCH) // timedelta(milliseconds=1), int(item[amount_key]))
        for item in tranches
    ]
    return [list(step) for step in budget.schedule(timed)]


def pack_json(packs: list[dict[str, Any]]) -> bytes:
    """A campaign's packs as claim_qualification.lua reads them: pack id -> {v: the vouchers as
    [category, threshold_fen, off_fen] in the pack's order, q: the quota of packs, qt: its
    tranches as [release ms, cumulative count] (released in _lib.lua)}."""
    return orjson.dumps(
        {
            pack["pack_id"]: {
                "v": [
                    [voucher["category"], voucher["threshold_fen"], voucher["off_fen"]] for voucher in pack["vouchers"]
                ],
                "q": pack["quota"],
                "qt": tranche_schedule(pack.get("tranches") or [], "count"),
            }
            for pack in packs
        }
    )


@dataclass(frozen=True)
class StorePlacement:
    """Region-bound redemption, precomputed from a snapshot (once, also on a cluster where it is
    written into each shard): the published campaigns whose store set goes (they no longer bind
    redemption), each bound campaign's stores inside its region, and every store of the snapshot."""

    unbound: frozenset[str]
    inside: dict[str, set[str]]
    stores: frozenset[str]


def store_placement(snapshot: ReferenceSnapshot) -> StorePlacement:
    published = {campaign["campaign_id"] for campaign in snapshot.campaigns}
    bound = {row["campaign_id"]: row["region"] for row in snapshot.bound_campaigns}
    stores = [(row["store_id"], row["latitude"], row["longitude"]) for row in snapshot.stores]
    return StorePlacement(
        frozenset(published - set(bound)),
        {campaign_id: geo.stores_inside(region, stores) for campaign_id, region in bound.items()},
        frozenset(store_id for store_id, _, _ in stores),
    )


def _place_stores(pipe: Any, keys: Keys, snapshot: ReferenceSnapshot, placement: StorePlacement) -> None:
    """Each campaign with redeem_in_region_only gets the set of stores inside its region. A
    published campaign's set is replaced whole (its region may have changed; the snapshot then
    holds every store); for the others, only the published merchants' stores are placed in or
    taken out. A published campaign that does not bind redemption has no set."""
    published = {campaign["campaign_id"] for campaign in snapshot.campaigns}
    for campaign_id in placement.unbound:
        pipe.delete(keys.region_stores(campaign_id))
    for campaign_id, inside in placement.inside.items():
        key = keys.region_stores(campaign_id)
        if campaign_id in published:
            pipe.delete(key)
        outside = placement.stores - inside
        if inside:
            pipe.sadd(key, *sorted(inside))
        if outside and campaign_id not in published:
            pipe.srem(key, *sorted(outside))


def rules_by_campaign(snapshot: ReferenceSnapshot, tranches: bool) -> dict[str | bytes, Any]:
    rules: dict[str | bytes, Any] = {}
    for row in snapshot.rules:
        if not tranches:
            row = {**row, "tranches": []}
        rules.setdefault(row["campaign_id"], {})[row["category"]] = rule_json(row)
    return rules


def write_sale_reference(
    pipe: Any,
    keys: Keys,
    snapshot: ReferenceSnapshot,
    rules_by_campaign: dict[str | bytes, Any],
    placement: StorePlacement,
) -> None:
    """What the scripts read for a sale or a claim: campaigns, rules, packs, merchants, the
    region-bound stores, terminals (one Redis: the deployment's keys; a cluster: each shard's)."""
    for campaign in snapshot.campaigns:
        campaign_id = campaign["campaign_id"]
        pipe.hset(
            keys.campaign(campaign_id),
            mapping={
                "status": campaign["status"],
                "starts_ms": _epoch_ms(campaign["starts_at"]),
                "ends_ms": _epoch_ms(campaign["ends_at"]),
                # Qualifications: validity (0: the campaign issues none), what a full refund
                # does, and the claim's location rules and region (read by the service).
                "q_validity_s": campaign.get("qualification_validity_s", 0),
                "q_refund": campaign.get("refund_policy", "COUNT_AS_USED"),
                "loc_accuracy_m": campaign.get("location_max_accuracy_m", 100),
                "loc_age_s": campaign.get("location_max_age_s", 300),
                "region": _region_text(campaign.get("region")),
                # Redemption-side rules, read by authorize.lua (region_bound, day_limit: 0
                # for none, loc_redeem) and claim_qualification.lua (q_reclaim).
                "region_bound": "1" if campaign.get("redeem_in_region_only") else "0",
                "day_limit": campaign.get("per_merchant_daily_limit") or 0,
                "q_reclaim": "1" if campaign.get("reclaim_after_expiry") else "0",
                "loc_redeem": "1" if campaign.get("require_location_at_redemption") else "0",
                # Hot-path risk rules, read by authorize.lua: "" for none.
                "risk": risk_field(campaign.get("risk_limits")),
                # Voucher packs, read by claim_qualification.lua; replaced whole ("{}": none).
                "packs": pack_json(snapshot.packs.get(campaign_id, [])),
            },
        )
        # Replace the rule set whole, so a category removed from the campaign disappears.
        pipe.delete(keys.rules(campaign_id))
        if rules_by_campaign.get(campaign_id):
            pipe.hset(keys.rules(campaign_id), mapping=rules_by_campaign[campaign_id])
    for merchant in snapshot.merchants:
        scope = "," + ",".join(merchant["categories"]) + "," if merchant["categories"] else ""
        pipe.hset(keys.merchant(merchant["merchant_id"]), mapping={"status": merchant["status"], "categories": scope})
    _place_stores(pipe, keys, snapshot, placement)
    for terminal in snapshot.terminals:
        pipe.hset(
            keys.terminal(terminal["terminal_id"]),
            # The store: where the terminal sells, for region-bound campaigns ("" for none).
            mapping={
                "status": terminal["status"],
                "merchant": terminal["merchant_id"],
                "store": terminal.get("store_id") or "",
            },
        )


def write_credentials(pipe: Any, keys: Keys, snapshot: ReferenceSnapshot) -> None:
    """Every caller's credential, in the deployment's own keys (one copy, also on a cluster)."""
    for terminal in snapshot.terminals:
        pipe.hset(
            keys.credentials,
            terminal["terminal_id"],
            orjson.dumps(
                {
                    "role": "terminal",
                    "merchant": terminal["merchant_id"],
                    "secret": terminal["secret"],
                    # Mutual TLS required (server/rpc/tls.py); absent means not required.
                    "mtls": bool(terminal.get("require_client_certificate", False)),
                }
            ),
        )
    for operator in snapshot.operators:
        # A suspended operator's credential is withdrawn; a suspended terminal's is kept so
        # that its calls get the TERMINAL_INACTIVE decline.
        if operator["status"] == "ACTIVE":
            # operator, government or auditor (migration 0010; server/rpc/auth.py)
            record = {"role": operator.get("role", "operator"), "merchant": "", "secret": operator["secret"]}
            pipe.hset(keys.credentials, operator["operator_id"], orjson.dumps(record))
        else:
            pipe.hdel(keys.credentials, operator["operator_id"])
    for partner in snapshot.partners:
        if partner["status"] == "ACTIVE":
            role = "partner" if partner["kind"] == "APP" else "provider"
            record = {
                "role": role,
                "merchant": "",
                "secret": partner["secret"],
                "mtls": bool(partner.get("require_client_certificate", False)),
            }
            pipe.hset(keys.credentials, partner["partner_id"], orjson.dumps(record))
        else:
            pipe.hdel(keys.credentials, partner["partner_id"])


def queue_products(pipe: Any, keys: Keys, products: Iterable[dict[str, Any]]) -> None:
    for product in products:
        pipe.hset(
            keys.product(product["gtin"]),
            mapping={
                "active": "1" if product["active"] else "0",
                "category": product["category"],
                "grade": str(product["energy_grade"]),
                "reference_price_fen": product["reference_price_fen"],
                "serial_required": "1" if product["serial_required"] else "0",
            },
        )


async def write_products(redis: Any, keys: Keys, snapshot: ReferenceSnapshot) -> None:
    for batch in _batches(snapshot.products):
        async with redis.pipeline(transaction=False) as pipe:
            queue_products(pipe, keys, batch)
            await pipe.execute()


async def publish_reference(redis: Redis, keys: Keys, snapshot: ReferenceSnapshot) -> int:
    """Writes the snapshot into Redis; returns the new reference version."""
    async with redis.pipeline(transaction=True) as pipe:
        write_sale_reference(pipe, keys, snapshot, rules_by_campaign(snapshot, True), store_placement(snapshot))
        for row in snapshot.rules:
            pipe.hset(keys.budget(row["campaign_id"]), f"{row['category']}:total", row["budget_fen"])
        write_credentials(pipe, keys, snapshot)
        await pipe.execute()
    await write_products(redis, keys, snapshot)
    version: int = await redis.incr(keys.reference_version)
    return version
