"""The operator's block lists in PostgreSQL, the record the hot path's hash is published from.

Each change is one transaction: the operator_actions audit row (idempotent on the operator and
request id: a retry acts once, the same id with another payload raises IdempotencyConflict)
and the block's row, whose ``change_seq`` takes the next value of ``risk_block_changes``. After
the commit the caller publishes the blocks in force to Redis (``publish``); the ledger writer's
publisher does the same whenever Redis's version is not PostgreSQL's (``sync``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from server.domain.errors import NotFound
from storage.postgres.actions import Action, Scope, record
from storage.postgres.ledger import to_ms
from storage.redis.blocks import LiveBlock, publish_blocks, published_version
from storage.redis.keys import Keys

KINDS = ("CONSUMER", "DEVICE", "MERCHANT", "TERMINAL", "PARTNER_APP")

IN_FORCE = "removed_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
COLUMNS = "kind, subject_id, reason, expires_at, created_by, created_at"


@dataclass(frozen=True)
class Block:
    kind: str
    subject_id: str
    reason: str
    expires_at: datetime | None
    created_by: str
    created_at: datetime


def _block(row: Any) -> Block:
    return Block(row["kind"], row["subject_id"], row["reason"], row["expires_at"], row["created_by"], row["created_at"])


async def _current(connection: asyncpg.Connection, kind: str, subject_id: str) -> Block:
    row = await connection.fetchrow(
        f"SELECT {COLUMNS} FROM risk_blocks WHERE kind = $1 AND subject_id = $2", kind, subject_id
    )
    if row is None:
        raise NotFound("block", f"{kind}:{subject_id}")
    return _block(row)


async def add(
    connection: asyncpg.Connection, action: Action, kind: str, subject_id: str, reason: str, expires_at: datetime | None
) -> Block:
    """Blocks the subject, or replaces its block's reason and expiry (a lifted or expired block
    is set again). A replayed request id returns the block as it stands and changes nothing."""
    async with connection.transaction():
        details = {"kind": kind, "subject_id": subject_id, "reason": reason, "expires_at": expires_at}
        if await record(connection, action, details, Scope()) is None:
            return await _current(connection, kind, subject_id)
        row = await connection.fetchrow(
            "INSERT INTO risk_blocks (kind, subject_id, reason, expires_at, created_by)"
            " VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (kind, subject_id) DO UPDATE SET reason = excluded.reason,"
            " expires_at = excluded.expires_at, created_by = excluded.created_by, created_at = now(),"
            " removed_by = NULL, removed_at = NULL, change_seq = nextval('risk_block_changes')"
            f" RETURNING {COLUMNS}",
            kind,
            subject_id,
            reason,
            expires_at,
            action.operator_id,
        )
        return _block(row)


async def remove(connection: asyncpg.Connection, action: Action, kind: str, subject_id: str) -> Block:
    """Lifts the subject's block in force; NotFound when it has none (nothing is written, not even
    the audit row). A replayed request id returns the block as it was and changes nothing."""
    async with connection.transaction():
        if await record(connection, action, {"kind": kind, "subject_id": subject_id}, Scope()) is None:
            return await _current(connection, kind, subject_id)
        row = await connection.fetchrow(
            "UPDATE risk_blocks SET removed_at = now(), removed_by = $3,"
            " change_seq = nextval('risk_block_changes')"
            f" WHERE kind = $1 AND subject_id = $2 AND {IN_FORCE} RETURNING {COLUMNS}",
            kind,
            subject_id,
            action.operator_id,
        )
        if row is None:
            # Raising rolls the audit row back with the transaction.
            raise NotFound("block", f"{kind}:{subject_id}")
        return _block(row)


async def list_in_force(connection: asyncpg.Connection, kind: str | None = None) -> list[Block]:
    rows = await connection.fetch(
        f"SELECT {COLUMNS} FROM risk_blocks WHERE {IN_FORCE} AND ($1::text IS NULL OR kind = $1)"
        " ORDER BY created_at DESC, kind, subject_id",
        kind,
    )
    return [_block(row) for row in rows]


async def version(connection: asyncpg.Connection) -> int:
    """The latest change to any block (0: none ever)."""
    return int(await connection.fetchval("SELECT coalesce(max(change_seq), 0) FROM risk_blocks"))


async def publish(connection: asyncpg.Connection, redis: Redis, keys: Keys) -> bool:
    """Writes the blocks in force to Redis at PostgreSQL's current version (read in one
    snapshot); returns whether it wrote (False: Redis already had this version or a newer one)."""
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        current = await version(connection)
        blocks = await list_in_force(connection)
    live = [
        LiveBlock(block.kind, block.subject_id, to_ms(block.expires_at) if block.expires_at else 0) for block in blocks
    ]
    return await publish_blocks(redis, keys, live, current)


async def sync(connection: asyncpg.Connection, redis: Redis, keys: Keys) -> bool:
    """Publishes when Redis does not hold PostgreSQL's version (lost, or a publication missed)."""
    if await published_version(redis, keys) == await version(connection):
        return False
    return await publish(connection, redis, keys)
