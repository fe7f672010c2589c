"""Merchants, their stores and terminals in PostgreSQL: the reads and writes of the
MerchantService (server/services/merchants.py), each inside the caller's transaction.

A missing object raises ``NotFound`` and a duplicate ``AlreadyExists`` (server/domain/errors.py),
which the gRPC edge answers NOT_FOUND / ALREADY_EXISTS naming the kind and id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from server.domain.errors import AlreadyExists, NotFound
from storage.postgres.reference import issue_terminal_secret

MERCHANT_COLUMNS = "merchant_id, name, licence_number, status, categories"
STORE_COLUMNS = "store_id, merchant_id, kind, name, address, latitude, longitude, platform, shop_url"
TERMINAL_COLUMNS = "terminal_id, merchant_id, coalesce(store_id, '') AS store_id, status"


@dataclass(frozen=True)
class NewStore:
    """A store as stored: its kind's name, and a physical store's location in WGS-84."""

    store_id: str
    merchant_id: str
    kind: str
    name: str
    address: str
    latitude: float | None
    longitude: float | None
    platform: str
    shop_url: str


async def fetch_merchant(connection: asyncpg.Connection, merchant_id: str) -> tuple[Any, list[Any], list[Any]] | None:
    """The merchant's row with its stores' and terminals' rows (by id), or None."""
    row = await connection.fetchrow(f"SELECT {MERCHANT_COLUMNS} FROM merchants WHERE merchant_id = $1", merchant_id)
    if row is None:
        return None
    stores = await connection.fetch(
        f"SELECT {STORE_COLUMNS} FROM stores WHERE merchant_id = $1 ORDER BY store_id", merchant_id
    )
    terminals = await connection.fetch(
        f"SELECT {TERMINAL_COLUMNS} FROM terminals WHERE merchant_id = $1 ORDER BY terminal_id", merchant_id
    )
    return row, list(stores), list(terminals)


async def fetch_store(connection: asyncpg.Connection, store_id: str) -> Any:
    row = await connection.fetchrow(f"SELECT {STORE_COLUMNS} FROM stores WHERE store_id = $1", store_id)
    if row is None:
        raise NotFound("store", store_id)
    return row


async def fetch_terminal(connection: asyncpg.Connection, terminal_id: str, *, lock: bool = False) -> Any:
    """The terminal's row; with ``lock``, held until the transaction ends so that concurrent
    changes to one terminal apply one after the other."""
    suffix = " FOR UPDATE" if lock else ""
    row = await connection.fetchrow(
        f"SELECT {TERMINAL_COLUMNS} FROM terminals WHERE terminal_id = $1{suffix}", terminal_id
    )
    if row is None:
        raise NotFound("terminal", terminal_id)
    return row


async def campaign_regions(connection: asyncpg.Connection) -> list[str]:
    """The GeoJSON text of every campaign region (Polygon or MultiPolygon objects)."""
    rows = await connection.fetch(
        "SELECT region::text AS region FROM campaigns WHERE region IS NOT NULL AND jsonb_typeof(region) = 'object'"
    )
    return [row["region"] for row in rows]


async def insert_merchant(
    connection: asyncpg.Connection, merchant_id: str, name: str, licence_number: str, categories: Sequence[str]
) -> None:
    """A new ACTIVE merchant."""
    inserted = await connection.fetchval(
        "INSERT INTO merchants (merchant_id, name, licence_number, status, categories)"
        " VALUES ($1, $2, $3, 'ACTIVE', $4) ON CONFLICT (merchant_id) DO NOTHING RETURNING merchant_id",
        merchant_id,
        name,
        licence_number,
        list(categories),
    )
    if inserted is None:
        raise AlreadyExists("merchant", merchant_id)


async def require_merchant(connection: asyncpg.Connection, merchant_id: str) -> None:
    if await connection.fetchval("SELECT 1 FROM merchants WHERE merchant_id = $1", merchant_id) is None:
        raise NotFound("merchant", merchant_id)


async def insert_store(connection: asyncpg.Connection, store: NewStore) -> None:
    inserted = await connection.fetchval(
        "INSERT INTO stores (store_id, merchant_id, kind, name, address, latitude, longitude, platform, shop_url)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (store_id) DO NOTHING RETURNING store_id",
        store.store_id,
        store.merchant_id,
        store.kind,
        store.name,
        store.address,
        store.latitude,
        store.longitude,
        store.platform,
        store.shop_url,
    )
    if inserted is None:
        raise AlreadyExists("store", store.store_id)


async def insert_terminal(connection: asyncpg.Connection, terminal_id: str, merchant_id: str, store_id: str) -> str:
    """Creates an ACTIVE terminal bound to the store; returns its new secret."""
    # Terminals and operators share one credential namespace in Redis: a terminal named like an
    # operator would overwrite that operator's credential when published.
    if await connection.fetchval("SELECT 1 FROM operators WHERE operator_id = $1", terminal_id) is not None:
        raise AlreadyExists("operator", terminal_id)
    secret = issue_terminal_secret()
    inserted = await connection.fetchval(
        "INSERT INTO terminals (terminal_id, merchant_id, store_id, status, secret) VALUES ($1, $2, $3, 'ACTIVE', $4)"
        " ON CONFLICT (terminal_id) DO NOTHING RETURNING terminal_id",
        terminal_id,
        merchant_id,
        store_id,
        secret,
    )
    if inserted is None:
        raise AlreadyExists("terminal", terminal_id)
    return secret


async def rotate_terminal_secret(connection: asyncpg.Connection, terminal_id: str) -> str:
    """Replaces the terminal's secret; returns the new one."""
    secret = issue_terminal_secret()
    await connection.execute(
        "UPDATE terminals SET secret = $2, updated_at = now() WHERE terminal_id = $1",
        terminal_id,
        secret,
    )
    return secret


async def lock_merchant_status(connection: asyncpg.Connection, merchant_id: str) -> str | None:
    """The merchant's status (None when there is no such merchant), its row locked until the
    transaction ends."""
    status: str | None = await connection.fetchval(
        "SELECT status FROM merchants WHERE merchant_id = $1 FOR UPDATE", merchant_id
    )
    return status


async def set_merchant_status(connection: asyncpg.Connection, merchant_id: str, status: str) -> None:
    await connection.execute(
        "UPDATE merchants SET status = $2, updated_at = now() WHERE merchant_id = $1",
        merchant_id,
        status,
    )


async def set_terminal_status(connection: asyncpg.Connection, terminal_id: str, status: str) -> None:
    await connection.execute(
        "UPDATE terminals SET status = $2, updated_at = now() WHERE terminal_id = $1",
        terminal_id,
        status,
    )
