"""Non-terminal credentials in PostgreSQL (CredentialService): staff rows in ``operators``,
partner apps and providers in ``partners``, read and written as one kind of record, and each
change published to the Redis credential hash after its commit.

Secrets are kept as the reference loader keeps them (the gateway verifies an HMAC, so it needs
the secret itself, not a hash of it); they leave this module only towards Redis and in the
answer of the call that issued them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis

from server.domain.credentials import PARTNER_KINDS
from server.domain.errors import AlreadyExists, NotFound
from server.domain.reference import STAFF_ROLES
from storage.postgres.reference import ReferenceSnapshot, issue_terminal_secret
from storage.redis.keys import Keys
from storage.redis.reference import publish_reference

# One row shape for both tables; ``role`` is the caller role (server/rpc/auth.py).
_SELECT = (
    "SELECT operator_id AS credential_id, role, name, status, managed_by_api, 'operators' AS source"
    " FROM operators WHERE operator_id = $1"
    " UNION ALL SELECT partner_id, CASE kind WHEN 'APP' THEN 'partner' ELSE 'provider' END, name, status,"
    " managed_by_api, 'partners' FROM partners WHERE partner_id = $1"
)


@dataclass(frozen=True)
class CredentialRow:
    credential_id: str
    role: str
    name: str
    status: str
    managed_by_api: bool

    @property
    def table(self) -> str:
        return "operators" if self.role in STAFF_ROLES else "partners"


def _row(record: Any) -> CredentialRow:
    return CredentialRow(
        record["credential_id"], record["role"], record["name"], record["status"], record["managed_by_api"]
    )


async def fetch_credential(connection: asyncpg.Connection, credential_id: str, *, lock: bool = False) -> CredentialRow:
    """The credential, locking its row until the transaction ends with ``lock``; NotFound otherwise."""
    if lock:
        # Lock in a fixed order (operators, then partners); at most one of them has the id.
        await connection.execute("SELECT 1 FROM operators WHERE operator_id = $1 FOR UPDATE", credential_id)
        await connection.execute("SELECT 1 FROM partners WHERE partner_id = $1 FOR UPDATE", credential_id)
    record = await connection.fetchrow(_SELECT, credential_id)
    if record is None:
        raise NotFound("credential", credential_id)
    return _row(record)


async def list_credentials(connection: asyncpg.Connection) -> list[CredentialRow]:
    records = await connection.fetch(
        "SELECT operator_id AS credential_id, role, name, status, managed_by_api FROM operators"
        " UNION ALL SELECT partner_id, CASE kind WHEN 'APP' THEN 'partner' ELSE 'provider' END, name, status,"
        " managed_by_api FROM partners ORDER BY credential_id"
    )
    return [_row(record) for record in records]


async def insert_credential(connection: asyncpg.Connection, credential_id: str, role: str, name: str) -> str:
    """Creates an ACTIVE credential managed by the API; returns its new secret. The id must be
    free among terminals, staff and partners: they share one credential hash in Redis, so a
    second holder would overwrite the first one's secret when published."""
    for kind, query in (
        ("terminal", "SELECT 1 FROM terminals WHERE terminal_id = $1"),
        ("credential", "SELECT 1 FROM operators WHERE operator_id = $1"),
        ("credential", "SELECT 1 FROM partners WHERE partner_id = $1"),
    ):
        if await connection.fetchval(query, credential_id) is not None:
            raise AlreadyExists(kind, credential_id)
    secret = issue_terminal_secret()
    if role in STAFF_ROLES:
        inserted = await connection.fetchval(
            "INSERT INTO operators (operator_id, name, status, secret, role, managed_by_api)"
            " VALUES ($1, $2, 'ACTIVE', $3, $4, true) ON CONFLICT (operator_id) DO NOTHING RETURNING operator_id",
            credential_id,
            name,
            secret,
            role,
        )
    else:
        inserted = await connection.fetchval(
            "INSERT INTO partners (partner_id, name, kind, status, secret, managed_by_api)"
            " VALUES ($1, $2, $3, 'ACTIVE', $4, true) ON CONFLICT (partner_id) DO NOTHING RETURNING partner_id",
            credential_id,
            name,
            PARTNER_KINDS[role],
            secret,
        )
    if inserted is None:  # created concurrently since the checks above
        raise AlreadyExists("credential", credential_id)
    return secret


def _key_column(row: CredentialRow) -> str:
    return "operator_id" if row.table == "operators" else "partner_id"


async def rotate_secret(connection: asyncpg.Connection, row: CredentialRow) -> str:
    """Replaces the secret (the old one stops working once published); returns the new one."""
    secret = issue_terminal_secret()
    await connection.execute(
        f"UPDATE {row.table} SET secret = $2, managed_by_api = true, updated_at = now() WHERE {_key_column(row)} = $1",
        row.credential_id,
        secret,
    )
    return secret


async def set_status(connection: asyncpg.Connection, row: CredentialRow, status: str) -> None:
    await connection.execute(
        f"UPDATE {row.table} SET status = $2, managed_by_api = true, updated_at = now() WHERE {_key_column(row)} = $1",
        row.credential_id,
        status,
    )


async def lock_active_operators(connection: asyncpg.Connection) -> frozenset[str]:
    """The active operator-role credentials, locked until the transaction ends, so that two
    operators suspending each other at once cannot leave none."""
    records = await connection.fetch(
        "SELECT operator_id FROM operators WHERE role = 'operator' AND status = 'ACTIVE'"
        " ORDER BY operator_id FOR UPDATE"
    )
    return frozenset(record["operator_id"] for record in records)


async def publish_credential(pool: asyncpg.Pool, redis: Redis, keys: Keys, credential_id: str) -> int:
    """Publishes the credential's committed state to the Redis credential hash (its secret, or
    its removal when suspended) and bumps the Redis reference version, which makes every
    gateway's credential cache reload; returns that version."""
    async with pool.acquire() as connection:
        operators = await connection.fetch(
            "SELECT operator_id, status, secret, role FROM operators WHERE operator_id = $1", credential_id
        )
        partners = await connection.fetch(
            "SELECT partner_id, kind, status, secret, require_client_certificate FROM partners WHERE partner_id = $1",
            credential_id,
        )
    snapshot = ReferenceSnapshot(
        campaigns=[],
        rules=[],
        products=[],
        merchants=[],
        terminals=[],
        operators=[dict(row) for row in operators],
        partners=[dict(row) for row in partners],
    )
    return await publish_reference(redis, keys, snapshot)
