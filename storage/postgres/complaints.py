"""The complaints desk in PostgreSQL (migration 0013_complaints.sql): tickets, their
append-only replies, the daily limit counted in the opening transaction, the queue and the
daily counts. Staff actions are audited through storage/postgres/actions.py (``record``) in the
same transaction as the change they make.

Why the daily limit is a count in PostgreSQL rather than a Redis counter: a ticket is rare
(not the hot path), the count and the insert sit in one transaction under a per-submitter
advisory lock, so the limit is exact under concurrent calls, a refused or failed call counts
nothing, and a retried request id is answered before it is counted; a Redis counter would be a
second store to keep in step with the tickets and would count attempts that never became one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg

from server.domain.complaints import CLOSED, CONSUMER, RateLimited
from server.domain.errors import IdempotencyConflict
from storage.postgres.actions import Action, Scope, record
from storage.postgres.pool import Connection

__all__ = ["Connection"]


@dataclass(frozen=True)
class NewTicket:
    ticket_id: str
    submitter: str
    opened_by: str
    request_id: str
    payload_hash: str
    partner_id: str
    merchant_id: str
    consumer_key: str
    category: str
    link_kind: str
    link_id: str
    body: str
    contact_phone_sealed: str
    opened_at: datetime
    first_reply_due_at: datetime
    resolution_due_at: datetime


@dataclass(frozen=True)
class TicketRow:
    ticket_id: str
    submitter: str
    opened_by: str
    partner_id: str
    merchant_id: str
    consumer_key: str
    category: str
    state: str
    link_kind: str
    link_id: str
    body: str
    contact_phone_sealed: str
    assignee: str
    opened_at: datetime
    first_reply_due_at: datetime
    resolution_due_at: datetime
    first_replied_at: datetime | None
    closed_at: datetime | None


@dataclass(frozen=True)
class ReplyRow:
    author: str
    body: str
    from_state: str
    to_state: str
    refund_request_id: str
    refunded_subsidy_fen: int
    created_at: datetime


@dataclass(frozen=True)
class DayCount:
    business_date: date
    opened: int
    resolved: int
    rejected: int
    overdue: int


TICKET_COLUMNS = (
    "ticket_id, submitter, opened_by, partner_id, merchant_id, consumer_key, category, state, link_kind, link_id,"
    " body, contact_phone_sealed, assignee, opened_at, first_reply_due_at, resolution_due_at, first_replied_at,"
    " closed_at"
)
# A ticket past a deadline as of $now: the work done late, or not done and the deadline passed.
OVERDUE = "(coalesce(first_replied_at, {now}) > first_reply_due_at OR coalesce(closed_at, {now}) > resolution_due_at)"


def _ticket(row: Any) -> TicketRow:
    return TicketRow(**dict(row))


async def open_ticket(
    connection: asyncpg.Connection, ticket: NewTicket, limit: int, day_start: datetime
) -> tuple[TicketRow, bool]:
    """Inserts the ticket unless its submitter's request id was seen (then the earlier ticket
    and True; IdempotencyConflict when its payload differed) or the submitter already opened
    ``limit`` tickets since ``day_start`` (RateLimited; nothing written)."""
    consumer = ticket.submitter == CONSUMER
    scope, scope_id = ("consumer", ticket.consumer_key) if consumer else ("merchant", ticket.merchant_id)
    async with connection.transaction():
        # One submitter's openings queue here, so the count below cannot be raced past.
        await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 13))", f"ticket:{scope}:{scope_id}")
        earlier = await connection.fetchrow(
            f"SELECT payload_hash, {TICKET_COLUMNS} FROM tickets WHERE opened_by = $1 AND request_id = $2",
            ticket.opened_by,
            ticket.request_id,
        )
        if earlier is not None:
            if earlier["payload_hash"] != ticket.payload_hash:
                raise IdempotencyConflict
            fields = dict(earlier)
            del fields["payload_hash"]
            return TicketRow(**fields), True
        column = "consumer_key" if consumer else "merchant_id"
        extra = "" if consumer else " AND submitter = 'MERCHANT'"
        opened = await connection.fetchval(
            f"SELECT count(*) FROM tickets WHERE {column} = $1 AND opened_at >= $2{extra}", scope_id, day_start
        )
        if opened >= limit:
            raise RateLimited(scope, limit)
        row = await connection.fetchrow(
            "INSERT INTO tickets (ticket_id, submitter, opened_by, request_id, payload_hash, partner_id, merchant_id,"
            " consumer_key, category, state, link_kind, link_id, body, contact_phone_sealed, opened_at,"
            " first_reply_due_at, resolution_due_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'OPEN', $10, $11, $12, $13, $14, $15, $16)"
            f" RETURNING {TICKET_COLUMNS}",
            ticket.ticket_id,
            ticket.submitter,
            ticket.opened_by,
            ticket.request_id,
            ticket.payload_hash,
            ticket.partner_id,
            ticket.merchant_id,
            ticket.consumer_key,
            ticket.category,
            ticket.link_kind,
            ticket.link_id,
            ticket.body,
            ticket.contact_phone_sealed,
            ticket.opened_at,
            ticket.first_reply_due_at,
            ticket.resolution_due_at,
        )
    return _ticket(row), False


async def get_ticket(connection: asyncpg.Connection, ticket_id: str, *, lock: bool = False) -> TicketRow | None:
    """The ticket; with ``lock``, held FOR UPDATE until the caller's transaction ends."""
    row = await connection.fetchrow(
        f"SELECT {TICKET_COLUMNS} FROM tickets WHERE ticket_id = $1" + (" FOR UPDATE" if lock else ""), ticket_id
    )
    return _ticket(row) if row is not None else None


async def replies(connection: asyncpg.Connection, ticket_id: str) -> list[ReplyRow]:
    rows = await connection.fetch(
        "SELECT author, body, from_state, to_state, refund_request_id, refunded_subsidy_fen, created_at"
        " FROM ticket_replies WHERE ticket_id = $1 ORDER BY reply_id",
        ticket_id,
    )
    return [ReplyRow(**dict(row)) for row in rows]


async def list_tickets(
    connection: asyncpg.Connection,
    *,
    state: str,
    category: str,
    assignee: str,
    overdue_at: datetime | None,
    limit: int,
) -> list[TicketRow]:
    """The queue, oldest first; "" filters nothing; ``overdue_at``: only tickets overdue then."""
    conditions: list[str] = []
    arguments: list[Any] = []
    for column, value in (("state", state), ("category", category), ("assignee", assignee)):
        if value:
            arguments.append(value)
            conditions.append(f"{column} = ${len(arguments)}")
    if overdue_at is not None:
        arguments.append(overdue_at)
        conditions.append(OVERDUE.format(now=f"${len(arguments)}::timestamptz"))
    arguments.append(limit)
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    rows = await connection.fetch(
        f"SELECT {TICKET_COLUMNS} FROM tickets{where} ORDER BY opened_at, ticket_id LIMIT ${len(arguments)}",
        *arguments,
    )
    return [_ticket(row) for row in rows]


async def audit(connection: asyncpg.Connection, action: Action, details: dict[str, Any]) -> bool:
    """Records a staff action in the operator audit trail (in the caller's transaction); False
    when this operator's request id already acted with the same payload (a replay)."""
    return await record(connection, action, details, Scope()) is not None


async def is_staff(connection: asyncpg.Connection, operator_id: str) -> bool:
    """Whether ``operator_id`` is an active operator (not a government user or auditor)."""
    found = await connection.fetchval(
        "SELECT 1 FROM operators WHERE operator_id = $1 AND status = 'ACTIVE' AND role = 'operator'", operator_id
    )
    return found is not None


async def assign(connection: asyncpg.Connection, ticket_id: str, assignee: str) -> None:
    await connection.execute("UPDATE tickets SET assignee = $2 WHERE ticket_id = $1", ticket_id, assignee)


async def add_reply(
    connection: asyncpg.Connection,
    ticket: TicketRow,
    *,
    author: str,
    body: str,
    to_state: str,
    at: datetime,
    refund_request_id: str = "",
    refunded_subsidy_fen: int = 0,
) -> None:
    """Appends a reply and moves the ticket to ``to_state`` (the caller checked the move): the
    first reply stops the first-reply clock, a closing state the resolution clock."""
    await connection.execute(
        "INSERT INTO ticket_replies (ticket_id, author, body, from_state, to_state, refund_request_id,"
        " refunded_subsidy_fen, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        ticket.ticket_id,
        author,
        body,
        ticket.state,
        to_state,
        refund_request_id,
        refunded_subsidy_fen,
        at,
    )
    await connection.execute(
        "UPDATE tickets SET state = $2, first_replied_at = coalesce(first_replied_at, $3),"
        " closed_at = CASE WHEN $4 THEN $3 ELSE closed_at END WHERE ticket_id = $1",
        ticket.ticket_id,
        to_state,
        at,
        to_state in CLOSED,
    )


async def day_counts(
    connection: asyncpg.Connection, first: date, last: date, timezone: str, now: datetime
) -> list[DayCount]:
    """Per business date in ``timezone`` from ``first`` to ``last``: tickets opened, closed as
    RESOLVED / REJECTED, and of those opened that day how many are (or were) overdue at ``now``."""
    rows = await connection.fetch(
        "WITH days AS (SELECT generate_series($1::date, $2::date, interval '1 day')::date AS day),"
        " opened AS (SELECT (opened_at AT TIME ZONE $3)::date AS day, count(*) AS opened,"
        f"   count(*) FILTER (WHERE {OVERDUE.format(now='$4::timestamptz')}) AS overdue"
        "   FROM tickets WHERE (opened_at AT TIME ZONE $3)::date BETWEEN $1 AND $2 GROUP BY 1),"
        " closed AS (SELECT (closed_at AT TIME ZONE $3)::date AS day,"
        "   count(*) FILTER (WHERE state = 'RESOLVED') AS resolved,"
        "   count(*) FILTER (WHERE state = 'REJECTED') AS rejected"
        "   FROM tickets WHERE closed_at IS NOT NULL AND (closed_at AT TIME ZONE $3)::date BETWEEN $1 AND $2"
        "   GROUP BY 1)"
        " SELECT days.day, coalesce(opened.opened, 0) AS opened, coalesce(closed.resolved, 0) AS resolved,"
        " coalesce(closed.rejected, 0) AS rejected, coalesce(opened.overdue, 0) AS overdue"
        " FROM days LEFT JOIN opened USING (day) LEFT JOIN closed USING (day) ORDER BY days.day",
        first,
        last,
        timezone,
        now,
    )
    return [DayCount(row["day"], row["opened"], row["resolved"], row["rejected"], row["overdue"]) for row in rows]


async def open_counts(connection: asyncpg.Connection, now: datetime) -> tuple[int, int]:
    """(tickets not closed, of those overdue at ``now``)."""
    row = await connection.fetchrow(
        f"SELECT count(*) AS open, count(*) FILTER (WHERE {OVERDUE.format(now='$1::timestamptz')}) AS overdue"
        " FROM tickets WHERE closed_at IS NULL",
        now,
    )
    return int(row["open"]), int(row["overdue"])
