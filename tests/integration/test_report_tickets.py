"""The complaints desk's day in the T+1 report (issue 14, section 3): tickets opened, resolved
(or rejected) and overdue, counted per business day in Asia/Shanghai, at its boundaries."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from server.domain.daily_report import BusinessCalendar
from storage.devenv import Services
from storage.postgres.daily_reports import ticket_counts
from tests.conftest import isolated_environment

CALENDAR = BusinessCalendar("Asia/Shanghai", "00:30")
DAY = date(2026, 3, 10)  # a Tuesday: [2026-03-09T16:00Z, 2026-03-10T16:00Z)
START, END = CALENDAR.bounds(DAY)
MS = timedelta(microseconds=1000)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def plant(
    connection: asyncpg.Connection,
    opened: datetime,
    first_reply_due: datetime,
    resolution_due: datetime,
    replied: datetime | None = None,
    closed: datetime | None = None,
    state: str = "OPEN",
) -> None:
    await connection.execute(
        "INSERT INTO tickets (ticket_id, submitter, opened_by, request_id, payload_hash, merchant_id, category,"
        " state, link_kind, link_id, body, opened_at, first_reply_due_at, resolution_due_at, first_replied_at,"
        " closed_at) VALUES ($1, 'MERCHANT', 't-main-01', $2, 'h', 'm-main', 'OTHER', $3, 'MERCHANT', 'm-main',"
        " 'a question', $4, $5, $6, $7, $8)",
        secrets.token_hex(16),
        str(uuid.uuid4()),
        state,
        opened,
        first_reply_due,
        resolution_due,
        replied,
        closed,
    )


@pytest.fixture
async def connection(services: Services) -> AsyncIterator[asyncpg.Connection]:
    async with isolated_environment(services) as env:
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            yield connection
        finally:
            await connection.close()


async def test_tickets_are_counted_on_their_business_day(connection: asyncpg.Connection) -> None:
    far = at("2026-03-30T00:00:00")
    assert await ticket_counts(connection, START, END) == (0, 0, 0)
    # Opened one millisecond before the day (23:59:59.999 on the 9th in Shanghai): the day
    # before's; its first reply fell due during the day and was never given: overdue at the end.
    await plant(connection, START - MS, END - MS, far)
    # Opened at the day's first and last millisecond: the day's; not yet due.
    await plant(connection, START, END + timedelta(days=1), far)
    await plant(connection, END - MS, END + timedelta(days=1), far)
    # Opened at the next day's first millisecond: not the day's.
    await plant(connection, END, END + timedelta(days=1), far)
    assert await ticket_counts(connection, START, END) == (2, 0, 1)
    # Resolved during the day (late, but closed by the end: not open, so not overdue at the end).
    old = at("2026-03-01T02:00:00")
    await plant(connection, old, old, old, replied=old, closed=START + timedelta(hours=10), state="RESOLVED")
    # Rejected at the next day's first millisecond: not the day's, and open at its end past
    # its resolution deadline.
    await plant(connection, old, far, at("2026-03-06T02:00:00"), replied=old, closed=END, state="REJECTED")
    # Answered on time, resolution due later: open, not overdue.
    await plant(connection, old, at("2026-03-02T02:00:00"), far, replied=at("2026-03-01T03:00:00"))
    # First reply given late (before the day): overdue, as GetTicketCounts counts it.
    await plant(connection, old, at("2026-03-02T02:00:00"), far, replied=at("2026-03-03T02:00:00"))
    # Resolution due exactly at the day's end: not yet past it.
    await plant(connection, old, far, END, replied=old)
    assert await ticket_counts(connection, START, END) == (2, 1, 3)
    previous_start, previous_end = CALENDAR.bounds(DAY - timedelta(days=1))
    opened, resolved, _ = await ticket_counts(connection, previous_start, previous_end)
    assert (opened, resolved) == (1, 0)
    next_start, next_end = CALENDAR.bounds(DAY + timedelta(days=1))
    opened, resolved, _ = await ticket_counts(connection, next_start, next_end)
    assert (opened, resolved) == (1, 1)
