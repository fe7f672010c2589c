"""Reference data in PostgreSQL: upserts from parsed files and reads for publishing."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from server.domain.reference import Campaign, ReferenceData


async def bump_reference_version(connection: asyncpg.Connection) -> int:
    """Called inside every transaction that changes reference data; the publisher brings Redis
    up to this version."""
    version: int = await connection.fetchval("UPDATE reference_version SET version = version + 1 RETURNING version")
    return version


async def current_reference_version(connection: asyncpg.Connection) -> int:
    version: int = await connection.fetchval("SELECT version FROM reference_version")
    return version


def issue_terminal_secret() -> str:
    """A new terminal credential: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


async def save_campaign(connection: asyncpg.Connection, campaign: Campaign) -> None:
    """Upserts one campaign and replaces its rules (budget counters live in Redis and the
    ledger, never here). Call inside a transaction."""
    await connection.execute(
        "INSERT INTO campaigns (campaign_id, name, status, starts_at, ends_at, region,"
        " qualification_validity_s, refund_policy, location_max_accuracy_m, location_max_age_s,"
        " redeem_in_region_only, per_merchant_daily_limit, reclaim_after_expiry,"
        " require_location_at_redemption, risk_limits)"
        " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13, $14, $15::jsonb)"
        " ON CONFLICT (campaign_id) DO UPDATE SET name = excluded.name,"
        " status = excluded.status, starts_at = excluded.starts_at,"
        " ends_at = excluded.ends_at, region = excluded.region,"
        " qualification_validity_s = excluded.qualification_validity_s,"
        " refund_policy = excluded.refund_policy,"
        " location_max_accuracy_m = excluded.location_max_accuracy_m,"
        " location_max_age_s = excluded.location_max_age_s,"
        " redeem_in_region_only = excluded.redeem_in_region_only,"
        " per_merchant_daily_limit = excluded.per_merchant_daily_limit,"
        " reclaim_after_expiry = excluded.reclaim_after_expiry,"
        " require_location_at_redemption = excluded.require_location_at_redemption,"
        " risk_limits = excluded.risk_limits, updated_at = now()",
        campaign.campaign_id,
        campaign.name,
        campaign.status,
        campaign.starts_at,
        campaign.ends_at,
        orjson.dumps(campaign.region).decode() if campaign.region is not None else None,
        campaign.qualification_validity_s,
        campaign.refund_policy,
        campaign.location_max_accuracy_m,
        campaign.location_max_age_s,
        campaign.redeem_in_region_only,
        campaign.per_merchant_daily_limit,
        campaign.reclaim_after_expiry,
        campaign.require_location_at_redemption,
        orjson.dumps(dict(campaign.risk_limits)).decode(),
    )
    await connection.execute("DELETE FROM campaign_rules WHERE campaign_id = $1", campaign.campaign_id)
    await connection.executemany(
        "INSERT INTO campaign_rules (campaign_id, category, kind, rates_bp, cap_fen,"
        " threshold_fen, off_fen, price_ceiling_fen, per_person_limit, budget_fen, tranches,"
        " qualification_quota, qualification_tranches, threshold_scope)"
        " VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13::jsonb, $14)",
        [
            (
                campaign.campaign_id,
                rule.category,
                rule.kind,
                orjson.dumps(dict(rule.rates_bp)).decode(),
                rule.cap_fen,
                rule.threshold_fen,
                rule.off_fen,
                rule.price_ceiling_fen,
                rule.per_person_limit,
                rule.budget_fen,
                orjson.dumps(
                    [{"release_at": moment.isoformat(), "amount_fen": amount} for moment, amount in rule.tranches]
                ).decode(),
                rule.qualification_quota,
                orjson.dumps(
                    [
                        {"release_at": moment.isoformat(), "count": count}
                        for moment, count in rule.qualification_tranches
                    ]
                ).decode(),
                rule.threshold_scope,
            )
            for rule in campaign.rules
        ],
    )
    # Voucher packs (migration 0018), kept in the document form parse_campaign reads.
    await connection.execute(
        "UPDATE campaigns SET voucher_packs = $2::jsonb WHERE campaign_id = $1",
        campaign.campaign_id,
        orjson.dumps(pack_documents(campaign)).decode(),
    )


def pack_documents(campaign: Campaign) -> list[dict[str, Any]]:
    """A campaign's voucher packs as reference-file records (examples/campaigns/*.yaml)."""
    return [
        {
            "pack_id": pack.pack_id,
            "vouchers": [
                {"category": voucher.category, "threshold_fen": voucher.threshold_fen, "off_fen": voucher.off_fen}
                for voucher in pack.vouchers
            ],
            "quota": pack.quota,
            "tranches": [{"release_at": moment.isoformat(), "count": count} for moment, count in pack.tranches],
        }
        for pack in campaign.packs
    ]


async def fetch_campaign(connection: asyncpg.Connection, campaign_id: str) -> tuple[Any, list[dict[str, Any]]] | None:
    """One campaign's row and its rules (by category), or None. The rules' JSON columns come
    decoded: ``rates_bp`` a mapping of energy grade (text) to basis points, ``tranches`` and
    ``qualification_tranches`` lists whose ``release_at`` is ISO 8601 text."""
    row = await connection.fetchrow("SELECT * FROM campaigns WHERE campaign_id = $1", campaign_id)
    if row is None:
        return None
    rules = await connection.fetch("SELECT * FROM campaign_rules WHERE campaign_id = $1 ORDER BY category", campaign_id)
    decoded = []
    for rule in rules:
        fields = dict(rule)
        for column in ("rates_bp", "tranches", "qualification_tranches"):
            fields[column] = orjson.loads(rule[column])
        decoded.append(fields)
    return row, decoded


async def lock_campaign(connection: asyncpg.Connection, campaign_id: str) -> bool:
    """Whether the campaign exists, locking its row until the transaction ends."""
    exists = await connection.fetchval("SELECT true FROM campaigns WHERE campaign_id = $1 FOR UPDATE", campaign_id)
    return bool(exists)


async def save_reference(connection: asyncpg.Connection, data: ReferenceData) -> dict[str, str]:
    """Upserts everything in one transaction; returns caller id -> secret for the terminals,
    operators and partners in ``data``. A caller keeps its existing secret unless the file sets
    one; a credential the API manages is left alone and not returned."""
    credentials: dict[str, str] = {}
    async with connection.transaction():
        for campaign in data.campaigns:
            await save_campaign(connection, campaign)
        await bump_reference_version(connection)
        await connection.executemany(
            "INSERT INTO products (gtin, brand, model, category, energy_grade,"
            " reference_price_fen, serial_required, active) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (gtin) DO UPDATE SET brand = excluded.brand, model = excluded.model,"
            " category = excluded.category, energy_grade = excluded.energy_grade,"
            " reference_price_fen = excluded.reference_price_fen,"
            " serial_required = excluded.serial_required, active = excluded.active, updated_at = now()",
            [
                (
                    product.gtin,
                    product.brand,
                    product.model,
                    product.category,
                    product.energy_grade,
                    product.reference_price_fen,
                    product.serial_required,
                    product.active,
                )
                for product in data.products
            ],
        )
        for merchant in data.merchants:
            await connection.execute(
                "INSERT INTO merchants (merchant_id, name, licence_number, status, categories)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (merchant_id) DO UPDATE SET"
                " name = excluded.name, licence_number = excluded.licence_number,"
                " status = excluded.status, categories = excluded.categories, updated_at = now()",
                merchant.merchant_id,
                merchant.name,
                merchant.licence_number,
                merchant.status,
                list(merchant.categories),
            )
            for terminal in merchant.terminals:
                secret = await connection.fetchval(
                    "INSERT INTO terminals (terminal_id, merchant_id, status, secret, require_client_certificate)"
                    " VALUES ($1, $2, $3, $4, $6) ON CONFLICT (terminal_id) DO UPDATE SET"
                    " merchant_id = excluded.merchant_id, status = excluded.status,"
                    " secret = CASE WHEN $5 THEN excluded.secret ELSE terminals.secret END,"
                    " require_client_certificate = excluded.require_client_certificate,"
                    " updated_at = now() RETURNING secret",
                    terminal.terminal_id,
                    merchant.merchant_id,
                    terminal.status,
                    terminal.secret or issue_terminal_secret(),
                    terminal.secret is not None,
                    terminal.require_client_certificate,
                )
                credentials[terminal.terminal_id] = secret
        # A credential the API manages (migration 0016, CredentialService) is left as the API
        # set it: a file must not reactivate a suspended credential nor restore a rotated secret.
        # Its secret is then not returned (the file did not issue it).
        for operator in data.operators:
            secret = await connection.fetchval(
                "INSERT INTO operators (operator_id, name, status, secret, role) VALUES ($1, $2, $3, $4, $6)"
                " ON CONFLICT (operator_id) DO UPDATE SET name = excluded.name, status = excluded.status,"
                " secret = CASE WHEN $5 THEN excluded.secret ELSE operators.secret END, role = excluded.role,"
                " updated_at = now() WHERE NOT operators.managed_by_api RETURNING secret",
                operator.operator_id,
                operator.name,
                operator.status,
                operator.secret or issue_terminal_secret(),
                operator.secret is not None,
                operator.role,
            )
            if secret is not None:
                credentials[operator.operator_id] = secret
        for partner in data.partners:
            secret = await connection.fetchval(
                "INSERT INTO partners (partner_id, name, kind, status, secret, require_client_certificate)"
                " VALUES ($1, $2, $3, $4, $5, $7)"
                " ON CONFLICT (partner_id) DO UPDATE SET name = excluded.name, kind = excluded.kind,"
                " status = excluded.status,"
                " secret = CASE WHEN $6 THEN excluded.secret ELSE partners.secret END,"
                " require_client_certificate = excluded.require_client_certificate, updated_at = now()"
                " WHERE NOT partners.managed_by_api RETURNING secret",
                partner.partner_id,
                partner.name,
                partner.kind,
                partner.status,
                partner.secret or issue_terminal_secret(),
                partner.secret is not None,
                partner.require_client_certificate,
            )
            if secret is not None:
                credentials[partner.partner_id] = secret
    return credentials


@dataclass(frozen=True)
class ReferenceSnapshot:
    """Every reference row, as published to Redis."""

    campaigns: list[dict[str, Any]]
    rules: list[dict[str, Any]]
    products: list[dict[str, Any]]
    merchants: list[dict[str, Any]]
    terminals: list[dict[str, Any]]
    operators: list[dict[str, Any]]
    partners: list[dict[str, Any]]
    # Campaigns with redeem_in_region_only (id, region text) and the stores to place in them.
    bound_campaigns: list[dict[str, Any]] = field(default_factory=list)
    stores: list[dict[str, Any]] = field(default_factory=list)
    # Each published campaign's voucher packs (pack_documents' form).
    packs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


async def fetch_reference(
    connection: asyncpg.Connection,
    *,
    campaign_ids: Sequence[str] | None = None,
    merchant_ids: Sequence[str] | None = None,
    gtins: Sequence[str] | None = None,
    operator_ids: Sequence[str] | None = None,
) -> ReferenceSnapshot:
    """Reads reference data in one repeatable-read snapshot, so a publication is consistent.
    Each filter limits one kind of row (terminals follow their merchants); None means all rows
    of that kind, an empty sequence none."""

    async def rows(query: str, column: str, values: Sequence[str] | None) -> list[asyncpg.Record]:
        # Two statements rather than "$1 IS NULL OR id = ANY($1)": that form lets PostgreSQL's
        # generic plan (after five runs) scan the whole table for every element of the array.
        if values is None:
            return list(await connection.fetch(query))
        return list(await connection.fetch(f"{query} WHERE {column} = ANY($1::text[])", list(values)))

    async with connection.transaction(isolation="repeatable_read", readonly=True):
        campaigns = await rows(
            "SELECT campaign_id, status, starts_at, ends_at, region, qualification_validity_s, refund_policy,"
            " location_max_accuracy_m, location_max_age_s, redeem_in_region_only, per_merchant_daily_limit,"
            " reclaim_after_expiry, require_location_at_redemption, risk_limits::text AS risk_limits FROM campaigns",
            "campaign_id",
            campaign_ids,
        )
        # Region-bound redemption (storage/redis/reference.py): every campaign that binds it, and
        # the physical stores to test against them: all of them when campaigns are published
        # (a region may have changed), else the published merchants' (a store may be new).
        bound_campaigns = await connection.fetch(
            "SELECT campaign_id, region::text AS region FROM campaigns WHERE redeem_in_region_only"
        )
        stores = await rows(
            "SELECT store_id, merchant_id, latitude, longitude FROM stores",
            "merchant_id",
            None if campaign_ids is None or campaign_ids else merchant_ids,
        )
        rules = await rows("SELECT * FROM campaign_rules", "campaign_id", campaign_ids)
        packs = await rows("SELECT campaign_id, voucher_packs FROM campaigns", "campaign_id", campaign_ids)
        products = await rows("SELECT * FROM products", "gtin", gtins)
        merchants = await rows("SELECT merchant_id, status, categories FROM merchants", "merchant_id", merchant_ids)
        terminals = await rows(
            "SELECT terminal_id, merchant_id, status, secret, require_client_certificate,"
            " coalesce(store_id, '') AS store_id FROM terminals",
            "merchant_id",
            merchant_ids,
        )
        operators = await rows("SELECT operator_id, status, secret, role FROM operators", "operator_id", operator_ids)
        # Few rows, changed only by reference loads: always published whole.
        partners = await rows(
            "SELECT partner_id, kind, status, secret, require_client_certificate FROM partners", "partner_id", None
        )
    return ReferenceSnapshot(
        campaigns=[dict(row) for row in campaigns],
        rules=[dict(row) for row in rules],
        products=[dict(row) for row in products],
        merchants=[dict(row) for row in merchants],
        terminals=[dict(row) for row in terminals],
        operators=[dict(row) for row in operators],
        partners=[dict(row) for row in partners],
        bound_campaigns=[dict(row) for row in bound_campaigns],
        stores=[dict(row) for row in stores],
        packs={row["campaign_id"]: orjson.loads(row["voucher_packs"]) for row in packs},
    )
