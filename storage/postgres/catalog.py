"""The product catalog in PostgreSQL: an import's rows written in one statement per kind of
row, and the reads and the deactivation of the CatalogService.

An import writes in one short transaction: COPY into a temporary table, then one
``INSERT ... SELECT ... ON CONFLICT DO UPDATE ... WHERE ... IS DISTINCT FROM`` per kind of row,
so a row equal to what is stored is not touched (its ``updated_at`` stays) and re-importing a
file changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from server.domain.catalog_import import ProductRecord

PRODUCT_COLUMNS = ProductRecord._fields
# Compared to decide whether a stored row changes; ``active`` only when the file states it.
CONTENT_COLUMNS = ("brand", "model", "category", "energy_grade", "reference_price_fen", "serial_required")


def _upsert_sql(with_active: bool) -> str:
    """One statement writes every row of a kind: rows that state ``active`` set it; rows that
    do not keep an existing product's state (new products are active). Ordered by GTIN so that
    concurrent imports lock rows in the same order and cannot deadlock."""
    compared = (*CONTENT_COLUMNS, "active") if with_active else CONTENT_COLUMNS
    assignments = ", ".join(f"{column} = excluded.{column}" for column in compared)
    stored = ", ".join(f"p.{column}" for column in compared)
    incoming = ", ".join(f"excluded.{column}" for column in compared)
    return (
        f"INSERT INTO products AS p ({', '.join(PRODUCT_COLUMNS)})"
        f" SELECT gtin, {', '.join(CONTENT_COLUMNS)}, coalesce(active, true)"
        f" FROM catalog_import WHERE active IS {'NOT NULL' if with_active else 'NULL'} ORDER BY gtin"
        f" ON CONFLICT (gtin) DO UPDATE SET {assignments}, updated_at = now()"
        f" WHERE ({stored}) IS DISTINCT FROM ({incoming})"
        # xmax is 0 on a freshly inserted row version and the locking transaction on an update.
        " RETURNING p.gtin, (p.xmax = 0) AS created"
    )


UPSERT_STATING_ACTIVE = _upsert_sql(with_active=True)
UPSERT_KEEPING_ACTIVE = _upsert_sql(with_active=False)
CREATE_IMPORT_TABLE = (
    "CREATE TEMPORARY TABLE catalog_import (gtin text, brand text, model text, category text,"
    " energy_grade smallint, reference_price_fen bigint, serial_required boolean, active boolean)"
    " ON COMMIT DROP"
)


@dataclass(frozen=True)
class Written:
    created: int
    updated: int
    unchanged: int
    changed_gtins: tuple[str, ...]


async def write_products(connection: asyncpg.Connection, products: Sequence[ProductRecord]) -> Written:
    await connection.execute(CREATE_IMPORT_TABLE)
    await connection.copy_records_to_table("catalog_import", records=products, columns=list(PRODUCT_COLUMNS))
    changed = [
        *await connection.fetch(UPSERT_STATING_ACTIVE),
        *await connection.fetch(UPSERT_KEEPING_ACTIVE),
    ]
    created = sum(1 for row in changed if row["created"])
    return Written(
        created=created,
        updated=len(changed) - created,
        unchanged=len(products) - len(changed),
        changed_gtins=tuple(row["gtin"] for row in changed),
    )


async def fetch_product(connection: asyncpg.Connection, gtin: str, *, lock: bool = False) -> Any:
    """The product's row, or None; with ``lock``, held until the transaction ends."""
    suffix = " FOR UPDATE" if lock else ""
    return await connection.fetchrow(f"SELECT * FROM products WHERE gtin = $1{suffix}", gtin)


async def list_products(
    connection: asyncpg.Connection, after: str, category: str, brand: str, include_inactive: bool, limit: int
) -> list[Any]:
    """Up to ``limit`` products after the GTIN ``after``, in GTIN order. Keyset paging on the
    primary key: each page is one index range scan, and a change between pages cannot make a
    later page skip or repeat a product (offsets would)."""
    rows: list[Any] = await connection.fetch(
        "SELECT * FROM products WHERE gtin > $1 AND ($2 = '' OR category = $2)"
        " AND ($3 = '' OR brand = $3) AND ($4 OR active) ORDER BY gtin LIMIT $5",
        after,
        category,
        brand,
        include_inactive,
        limit,
    )
    return rows


async def deactivate_product(connection: asyncpg.Connection, gtin: str) -> Any:
    """Marks the product inactive (its ``updated_at`` moves only when it was active); returns
    the row as it is now."""
    return await connection.fetchrow(
        "UPDATE products SET active = false,"
        " updated_at = CASE WHEN active THEN now() ELSE updated_at END"
        " WHERE gtin = $1 RETURNING *",
        gtin,
    )
