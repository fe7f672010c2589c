"""Queries of the cross-provider exchange: what we subsidised on a day (for our file), what
other providers reported (from theirs), and where a consumer's usage can be."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from server.domain.exchange_file import ConsumerRecord, ExchangeFile, SerialRecord

# A capture's lines as they stand now: a line refunded since is no longer a subsidy to report;
# a line clawed back (r = 2) still is: the consumer's right and the device stay used.
SUBSIDISED_LINES = """
    SELECT DISTINCT a.consumer_key, line->>'c' AS category, line->>'g' AS gtin, line->>'sn' AS serial
    FROM ledger_events AS e
    JOIN authorizations AS a ON a.authorization_id = e.authorization_id
    CROSS JOIN jsonb_array_elements(a.lines) AS line
    WHERE e.event_type = 'CAPTURED' AND e.occurred_at >= $1 AND e.occurred_at < $2
      AND (line->>'r')::int <> 1
"""

CREATE_STAGING = """
    CREATE TEMPORARY TABLE exchange_staging (
        kind text NOT NULL, first text NOT NULL, second text NOT NULL
    ) ON COMMIT DROP
"""

INSERT_CONSUMERS = """
    INSERT INTO exchange_consumers (consumer_key, category, provider_id, file_date)
    SELECT first, second, $1, $2 FROM exchange_staging WHERE kind = 'consumer'
    ON CONFLICT DO NOTHING
"""

INSERT_SERIALS = """
    INSERT INTO exchange_serials (gtin, serial, provider_id, file_date)
    SELECT first, second, $1, $2 FROM exchange_staging WHERE kind = 'serial'
    ON CONFLICT DO NOTHING
"""


@dataclass(frozen=True)
class Subsidised:
    consumers: list[ConsumerRecord]
    serials: list[SerialRecord]


@dataclass(frozen=True)
class Recorded:
    """What an import added: a re-imported file adds nothing."""

    new_file: bool
    new_consumers: int
    new_serials: int


async def subsidised_between(connection: asyncpg.Connection, start: datetime, end: datetime) -> Subsidised:
    """Consumers (per category) and serials of the authorizations captured in [start, end)
    whose lines are not refunded now."""
    rows = await connection.fetch(SUBSIDISED_LINES, start, end)
    return Subsidised(
        consumers=sorted({ConsumerRecord(row["consumer_key"], row["category"]) for row in rows}),
        serials=sorted({SerialRecord(row["gtin"], row["serial"]) for row in rows if row["serial"]}),
    )


async def campaign_ids(connection: asyncpg.Connection) -> list[str]:
    """Every campaign, the places a consumer's usage can be."""
    return [row["campaign_id"] for row in await connection.fetch("SELECT campaign_id FROM campaigns ORDER BY 1")]


async def usage_scope(connection: asyncpg.Connection, category: str) -> tuple[list[str], bool]:
    """(every campaign, whether any campaign's rules cover the category), in one query."""
    row = await connection.fetchrow(
        "SELECT array(SELECT campaign_id FROM campaigns ORDER BY 1) AS campaigns,"
        " EXISTS (SELECT 1 FROM campaign_rules WHERE category = $1) AS known",
        category,
    )
    return list(row["campaigns"]), bool(row["known"])


async def record_file(connection: asyncpg.Connection, parsed: ExchangeFile, digest: str) -> Recorded:
    """Records a verified file and its records in one transaction; what is already known (from
    this file or an earlier one of the same provider) is left as it is."""
    async with connection.transaction():
        new_file = await connection.fetchval(
            "INSERT INTO exchange_files (provider_id, file_date, digest, consumers, serials)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING true",
            parsed.provider_id,
            parsed.day,
            digest,
            len(parsed.consumers),
            len(parsed.serials),
        )
        await connection.execute(CREATE_STAGING)
        staged = [("consumer", *record) for record in parsed.consumers]
        staged += [("serial", *record) for record in parsed.serials]
        await connection.copy_records_to_table("exchange_staging", records=staged, columns=["kind", "first", "second"])
        consumers = await connection.execute(INSERT_CONSUMERS, parsed.provider_id, parsed.day)
        serials = await connection.execute(INSERT_SERIALS, parsed.provider_id, parsed.day)
    return Recorded(new_file=bool(new_file), new_consumers=_inserted(consumers), new_serials=_inserted(serials))


async def imported_consumers(
    connection: asyncpg.Connection, batch_size: int
) -> AsyncIterator[Sequence[asyncpg.Record]]:
    """Every imported consumer record, first reported first, in batches (a server-side cursor,
    so a large table is never held in memory). Call inside a transaction."""
    cursor = await connection.cursor(
        "SELECT consumer_key, category, provider_id FROM exchange_consumers ORDER BY imported_at, provider_id"
    )
    while batch := await cursor.fetch(batch_size):
        yield batch


async def imported_serials(connection: asyncpg.Connection, batch_size: int) -> AsyncIterator[Sequence[asyncpg.Record]]:
    cursor = await connection.cursor(
        "SELECT gtin, serial, provider_id FROM exchange_serials ORDER BY imported_at, provider_id"
    )
    while batch := await cursor.fetch(batch_size):
        yield batch


async def imported_counts(connection: asyncpg.Connection) -> tuple[int, int]:
    row = await connection.fetchrow(
        "SELECT (SELECT count(*) FROM exchange_consumers) AS consumers,"
        " (SELECT count(*) FROM exchange_serials) AS serials"
    )
    return int(row["consumers"]), int(row["serials"])


def _inserted(status: str) -> int:
    """The row count of an ``INSERT 0 <n>`` command status."""
    return int(status.rsplit(" ", 1)[1])
