"""Operator actions in PostgreSQL: the append-only audit trail with its idempotency on
(operator, request_id), the reference version each change bumps, and publishing committed
changes to the Redis hot path.

An operator call runs one PostgreSQL transaction that makes the change, records the action in
``operator_actions`` (append-only) and increments ``reference_version``; after the commit it
publishes the changed objects to Redis and clears the change's ``unpublished_changes`` mark.
A change whose publication did not complete keeps its mark; ``catch_up`` publishes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from server.domain.errors import IdempotencyConflict
from storage.postgres.reference import bump_reference_version, current_reference_version, fetch_reference
from storage.redis.keys import Keys
from storage.redis.reference import publish_reference

log = logging.getLogger("subsidy.reference")


@dataclass(frozen=True)
class Action:
    """One operator action: who, which request, what, on what."""

    operator_id: str
    request_id: str
    action: str
    target_kind: str
    target_id: str
    payload_hash: str


@dataclass(frozen=True)
class Scope:
    """The reference objects a change touched, to publish after its commit."""

    campaign_ids: tuple[str, ...] = ()
    merchant_ids: tuple[str, ...] = ()
    gtins: tuple[str, ...] = ()


async def record(connection: asyncpg.Connection, action: Action, details: dict[str, Any], scope: Scope) -> int | None:
    """Writes the audit row in the caller's transaction, bumps the reference version and notes
    the scope as unpublished. Returns the new version, or None when this (operator, request_id)
    already acted with the same payload (a replay: answer with the current state, change
    nothing); raises IdempotencyConflict when it acted with a different payload.

    An action whose scope is empty changed no reference object (a catalog re-imported
    unchanged, an all-or-nothing import refused): it is audited, but the version stays and the
    current one is returned, so no process reloads anything for it."""
    inserted = await connection.fetchval(
        "INSERT INTO operator_actions (operator_id, request_id, action, target_kind, target_id, payload_hash, details)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) ON CONFLICT (operator_id, request_id) DO NOTHING"
        " RETURNING action_id",
        action.operator_id,
        action.request_id,
        action.action,
        action.target_kind,
        action.target_id,
        action.payload_hash,
        orjson.dumps(details, default=str).decode(),
    )
    if inserted is None:
        earlier = await connection.fetchval(
            "SELECT payload_hash FROM operator_actions WHERE operator_id = $1 AND request_id = $2",
            action.operator_id,
            action.request_id,
        )
        if earlier != action.payload_hash:
            raise IdempotencyConflict
        return None
    if not (scope.campaign_ids or scope.merchant_ids or scope.gtins):
        return await current_reference_version(connection)
    version = await bump_reference_version(connection)
    await connection.execute(
        "INSERT INTO unpublished_changes (version, campaign_ids, merchant_ids, gtins) VALUES ($1, $2, $3, $4)",
        version,
        list(scope.campaign_ids),
        list(scope.merchant_ids),
        list(scope.gtins),
    )
    return version


async def publish_scope(pool: asyncpg.Pool, redis: Redis, keys: Keys, scope: Scope, version: int | None) -> int:
    """Publishes just the named objects after their transaction committed, then clears the
    change's unpublished mark; returns the Redis reference version."""
    async with pool.acquire() as connection:
        snapshot = await fetch_reference(
            connection,
            campaign_ids=list(scope.campaign_ids),
            merchant_ids=list(scope.merchant_ids),
            gtins=list(scope.gtins),
            operator_ids=[],
        )
        published = await publish_reference(redis, keys, snapshot)
        if version is not None:
            await connection.execute("DELETE FROM unpublished_changes WHERE version = $1", version)
    return published


@dataclass(frozen=True)
class CatchUp:
    """One pass of ``catch_up``: changes published now, changes whose publication failed again
    (left marked for the next pass), and the oldest mark's age in seconds (0 when none is left)."""

    published: int = 0
    failed: int = 0
    oldest_age_s: float = 0.0


async def catch_up(pool: asyncpg.Pool, redis: Redis, keys: Keys, older_than_s: float = 0.5) -> CatchUp:
    """Publishes changes whose own publication did not complete (the call failed between commit
    and publish), oldest first. A change that fails again keeps its mark and does not stop the
    ones after it (a poison change never stalls the others); it is counted in ``failed``."""
    async with pool.acquire() as connection:
        rows = await connection.fetch(
            "SELECT * FROM unpublished_changes WHERE created_at < now() - make_interval(secs => $1) ORDER BY version",
            older_than_s,
        )
    published = failed = 0
    for row in rows:
        scope = Scope(tuple(row["campaign_ids"]), tuple(row["merchant_ids"]), tuple(row["gtins"]))
        try:
            await publish_scope(pool, redis, keys, scope, row["version"])
        except Exception as error:
            failed += 1
            log.warning("publishing reference version %s failed again: %s", row["version"], type(error).__name__)
        else:
            published += 1
    async with pool.acquire() as connection:
        oldest = await connection.fetchval(
            "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM unpublished_changes"
        )
    return CatchUp(published, failed, float(oldest))


async def earlier_details(connection: asyncpg.Connection, action: Action) -> dict[str, Any] | None:
    """The stored details of this operator's earlier call with the same request_id, or None.
    Checked before writing so that a replayed import does not redo its work."""
    row = await connection.fetchrow(
        "SELECT payload_hash, details FROM operator_actions WHERE operator_id = $1 AND request_id = $2",
        action.operator_id,
        action.request_id,
    )
    if row is None:
        return None
    if row["payload_hash"] != action.payload_hash:
        raise IdempotencyConflict
    # asyncpg returns jsonb as text unless a codec is set; record() writes it with orjson.
    details: dict[str, Any] = orjson.loads(row["details"])
    return details


async def unpublished_versions(connection: asyncpg.Connection, merchant_id: str) -> list[int]:
    """Committed changes of exactly this merchant whose publication has not been confirmed,
    including the caller's own. Publishing the merchant's current state covers them all, so a
    retry after a failed publication (the client retries UNAVAILABLE with the same request_id,
    which is then a replay) brings Redis up to date instead of leaving it to the catch-up."""
    rows = await connection.fetch(
        "SELECT version FROM unpublished_changes WHERE merchant_ids = ARRAY[$1]::text[]"
        " AND cardinality(campaign_ids) = 0 AND cardinality(gtins) = 0 ORDER BY version",
        merchant_id,
    )
    return [row["version"] for row in rows]
