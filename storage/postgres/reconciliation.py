"""Bill reconciliation runs in PostgreSQL (migration 0011; rules in server/domain/bill_matching.py
and server/domain/settlement_file.py).

An import is one transaction under an advisory lock on its channel and day: the file's lines
are copied into a temporary table in batches as they are read, then that table (sorted by
authorization id) and the day's captures and refunds from ``ledger_events`` (sorted the same
way) are read through two cursors and merge-joined in Python, the results copied into
``reconciliation_lines`` in batches; nothing holds the day whole. A refused file (or a bad line
in mode ALL_OR_NOTHING) rolls the transaction back: nothing is stored. Re-importing the file
that is already the current run of its channel and day changes nothing; another file
supersedes the current run, which is kept.
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import hashlib
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import IO, Any

import asyncpg
import orjson

from server.domain.bill_matching import LedgerItem, Result, Summary, merge
from server.domain.settlement_file import BadLine, ChannelLine, ColumnMapping, LineError, SettlementReader
from storage.postgres.actions import Action, Scope, record

BATCH = 10_000
ERRORS_MAX = 10_000
# Result positions of ledger items the file lacks come after every file line.
LEDGER_ONLY_POSITION = 1 << 40
ALL_OR_NOTHING, GOOD_LINES = "ALL_OR_NOTHING", "GOOD_LINES"
RESULT_COLUMNS = (
    "run_id",
    "position",
    "status",
    "kind",
    "line_number",
    "channel_txn_id",
    "authorization_id",
    "ledger_event_id",
    "ledger_channel_reference",
    "merchant_id",
    "channel_subsidy_fen",
    "ledger_subsidy_fen",
    "channel_order_fen",
    "ledger_order_fen",
    "difference_fen",
    "order_difference_fen",
    "channel_time",
    "ledger_time",
    "error",
)
STAGING_COLUMNS = (
    "line_number",
    "kind",
    "channel_txn_id",
    "authorization_id",
    "order_fen",
    "subsidy_fen",
    "refund_fen",
    "channel_time",
    "error_column",
    "error",
)
RUN_COLUMNS = (
    "run_id, channel, business_date, file_name, file_sha256, mapping_name, mode, imported_by, imported_at,"
    " superseded_at, superseded_by_run_id, supersedes_run_id, file_lines, ignored_lines, ledger_items, counts,"
    " channel_net_subsidy_fen, ledger_net_subsidy_fen, day_starts_at, day_ends_at,"
    " (SELECT count(*) FROM operator_actions WHERE action = 'ResolveReconciliationLine'"
    " AND target_kind = 'reconciliation_line' AND target_id LIKE run_id::text || ':%') AS resolved_lines"
)


@dataclass(frozen=True)
class SettlementUpload:
    channel: str
    business_date: date
    day_starts_at: datetime
    day_ends_at: datetime
    file_name: str
    file_sha256: str
    mapping: ColumnMapping
    mode: str
    action: Action


@dataclass
class ImportOutcome:
    run: dict[str, Any] | None
    replayed: bool
    applied: bool
    errors: list[LineError] = field(default_factory=list)
    errors_truncated: bool = False
    lines_received: int = 0
    lines_rejected: int = 0


def file_rows(handle: IO[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number where the row starts, fields) of a text file read with ``csv``."""
    reader = csv.reader(handle)
    start = 1
    for values in reader:
        yield start, values
        start = reader.line_num + 1


def sha256_of(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while data := handle.read(1 << 20):
        digest.update(data)
    return digest.hexdigest()


async def current_run(connection: asyncpg.Connection, channel: str, day: date) -> dict[str, Any] | None:
    row = await connection.fetchrow(
        f"SELECT {RUN_COLUMNS} FROM reconciliation_runs"
        " WHERE channel = $1 AND business_date = $2 AND superseded_at IS NULL",
        channel,
        day,
    )
    return dict(row) if row else None


async def first_capture(connection: asyncpg.Connection, campaign_id: str) -> datetime | None:
    """When a campaign's first payment was captured (None: none yet)."""
    found: datetime | None = await connection.fetchval(
        "SELECT min(occurred_at) FROM ledger_events WHERE campaign_id = $1 AND event_type = 'CAPTURED'", campaign_id
    )
    return found


async def run_by_id(connection: asyncpg.Connection, run_id: str) -> dict[str, Any] | None:
    row = await connection.fetchrow(f"SELECT {RUN_COLUMNS} FROM reconciliation_runs WHERE run_id = $1", run_id)
    return dict(row) if row else None


async def list_runs(
    connection: asyncpg.Connection,
    channel: str,
    since: date | None,
    until: date | None,
    include_superseded: bool,
    limit: int,
) -> list[dict[str, Any]]:
    rows = await connection.fetch(
        f"SELECT {RUN_COLUMNS} FROM reconciliation_runs"
        " WHERE ($1 = '' OR channel = $1) AND ($2::date IS NULL OR business_date >= $2)"
        " AND ($3::date IS NULL OR business_date <= $3) AND ($4 OR superseded_at IS NULL)"
        " ORDER BY business_date DESC, channel, imported_at DESC LIMIT $5",
        channel,
        since,
        until,
        include_superseded,
        limit,
    )
    return [dict(row) for row in rows]


# A line's resolution is an operator action (who, when, why), kept in the audit trail: the
# results themselves never change.
RESOLVE_ACTION = "ResolveReconciliationLine"
LINE_COLUMNS = ", ".join(f"line.{column}" for column in RESULT_COLUMNS[1:])
RESOLUTION_JOIN = (
    " LEFT JOIN operator_actions AS resolved ON resolved.action = 'ResolveReconciliationLine'"
    " AND resolved.target_kind = 'reconciliation_line'"
    " AND resolved.target_id = line.run_id::text || ':' || line.position::text"
)
RESOLUTION_COLUMNS = (
    "coalesce(resolved.operator_id, '') AS resolved_by, resolved.acted_at AS resolved_at,"
    " coalesce(resolved.details->>'reason', '') AS resolution"
)


class NotResolvable(Exception):
    """The line cannot be marked resolved: ``state`` says why (MATCHED, RESOLVED, SUPERSEDED)."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


def line_target(run_id: Any, position: int) -> str:
    return f"{run_id}:{position}"


async def stream_lines(
    connection: asyncpg.Connection, run_id: Any, include_matched: bool
) -> AsyncIterator[dict[str, Any]]:
    """A run's result lines in position order (file lines, then ledger items the file lacks),
    with their resolution when one was recorded; only the exceptions unless ``include_matched``.
    Needs a transaction (a cursor)."""
    query = (
        f"SELECT {LINE_COLUMNS}, {RESOLUTION_COLUMNS} FROM reconciliation_lines AS line{RESOLUTION_JOIN}"
        " WHERE line.run_id = $1"
        + ("" if include_matched else " AND line.status <> 'MATCHED'")
        + " ORDER BY line.position"
    )
    async for row in connection.cursor(query, run_id, prefetch=2_000):
        yield dict(row)


async def resolve_line(
    connection: asyncpg.Connection, action: Action, run_id: Any, position: int, reason: str
) -> tuple[dict[str, Any], bool] | None:
    """Records the resolution of one exception line; returns (the line, whether this was a
    replay of the same request), or None when the run has no such line. Raises
    ``NotResolvable`` for a MATCHED line, one already resolved, or one of a superseded run."""
    async with connection.transaction():
        found = await connection.fetchrow(
            "SELECT line.status, run.superseded_at FROM reconciliation_lines AS line"
            " JOIN reconciliation_runs AS run USING (run_id) WHERE line.run_id = $1 AND line.position = $2"
            " FOR UPDATE OF line",
            run_id,
            position,
        )
        if found is None:
            return None
        details = {"run_id": str(run_id), "position": position, "reason": reason}
        replayed = await record(connection, action, details, Scope()) is None
        if not replayed:
            if found["status"] == "MATCHED":
                raise NotResolvable("MATCHED")
            if found["superseded_at"] is not None:
                raise NotResolvable("SUPERSEDED")
            earlier = await connection.fetchval(
                "SELECT count(*) FROM operator_actions WHERE action = $1 AND target_kind = 'reconciliation_line'"
                " AND target_id = $2",
                RESOLVE_ACTION,
                line_target(run_id, position),
            )
            if earlier > 1:
                raise NotResolvable("RESOLVED")
        line = await connection.fetchrow(
            f"SELECT {LINE_COLUMNS}, {RESOLUTION_COLUMNS} FROM reconciliation_lines AS line{RESOLUTION_JOIN}"
            " WHERE line.run_id = $1 AND line.position = $2 ORDER BY resolved.acted_at LIMIT 1",
            run_id,
            position,
        )
    return dict(line), replayed


def _staging_row(item: ChannelLine | BadLine) -> tuple[Any, ...]:
    if isinstance(item, BadLine):
        return (item.line_number, "", "", "", None, 0, 0, None, item.error.column, item.error.reason)
    return (
        item.line_number,
        item.kind,
        item.channel_txn_id,
        item.authorization_id,
        item.order_fen,
        item.subsidy_fen,
        item.refund_fen,
        item.time,
        "",
        "",
    )


async def _stage(
    connection: asyncpg.Connection, reader: SettlementReader, text: IO[str], outcome: ImportOutcome
) -> None:
    await connection.execute(
        "CREATE TEMPORARY TABLE settlement_staging (line_number bigint NOT NULL, kind text NOT NULL,"
        " channel_txn_id text NOT NULL, authorization_id text NOT NULL, order_fen bigint, subsidy_fen bigint NOT NULL,"
        " refund_fen bigint NOT NULL, channel_time timestamptz, error_column text NOT NULL, error text NOT NULL)"
        " ON COMMIT DROP"
    )
    items = reader.read(file_rows(text))

    def next_batch() -> list[tuple[Any, ...]]:
        # Reading and checking a batch of lines is CPU work: it runs in a worker thread, so the
        # gateway's event loop (authorizations) keeps being scheduled during a large import.
        rows = []
        for item in itertools.islice(items, BATCH):
            outcome.lines_received += 1
            if isinstance(item, BadLine):
                outcome.lines_rejected += 1
                if len(outcome.errors) < ERRORS_MAX:
                    outcome.errors.append(item.error)
                else:
                    outcome.errors_truncated = True
            rows.append(_staging_row(item))
        return rows

    while batch := await asyncio.to_thread(next_batch):
        await connection.copy_records_to_table("settlement_staging", records=batch, columns=STAGING_COLUMNS)


async def _channel_lines(connection: asyncpg.Connection) -> AsyncIterator[ChannelLine]:
    query = (
        "SELECT line_number, kind, channel_txn_id, authorization_id, order_fen, subsidy_fen, refund_fen, channel_time"
        " FROM settlement_staging WHERE error = '' ORDER BY authorization_id COLLATE \"C\", line_number"
    )
    async for row in connection.cursor(query, prefetch=BATCH):
        yield ChannelLine(*row)


async def ledger_items(connection: asyncpg.Connection, start: datetime, end: datetime) -> AsyncIterator[LedgerItem]:
    """The captures and refunds of [start, end), sorted by authorization id (a transaction's cursor)."""
    query = (
        "SELECT event_id, CASE event_type WHEN 'CAPTURED' THEN 'PAYMENT' ELSE 'REFUND' END, authorization_id,"
        " merchant_id, coalesce(channel_reference, ''), amount_fen,"
        " CASE event_type WHEN 'CAPTURED' THEN (SELECT coalesce(sum((line->>'p')::bigint), 0)"
        " FROM jsonb_array_elements(lines) AS line)::bigint ELSE 0 END, occurred_at"
        " FROM ledger_events WHERE event_type IN ('CAPTURED', 'REFUNDED') AND occurred_at >= $1 AND occurred_at < $2"
        ' ORDER BY authorization_id COLLATE "C", event_ms, event_seq'
    )
    async for row in connection.cursor(query, start, end, prefetch=BATCH):
        yield LedgerItem(*row)


async def _merge_results(connection: asyncpg.Connection, run_id: uuid.UUID, upload: SettlementUpload) -> Summary:
    """Merge-joins the staged lines with the ledger day; copies the results in batches."""
    summary = Summary()
    batch: list[tuple[Any, ...]] = []
    ledger_only = 0

    async def flush() -> None:
        nonlocal batch
        if batch:
            await connection.copy_records_to_table("reconciliation_lines", records=batch, columns=RESULT_COLUMNS)
            batch = []

    # The two sorted streams are read through cursors a chunk at a time; the merge itself is
    # the domain's, fed from buffers refilled between chunks.
    lines_cursor = _channel_lines(connection)
    items_cursor = ledger_items(connection, upload.day_starts_at, upload.day_ends_at)
    async for result in _async_merge(lines_cursor, items_cursor):
        summary.add(result)
        if result.line_number == 0:
            ledger_only += 1
            position = LEDGER_ONLY_POSITION + ledger_only
        else:
            position = result.line_number
        batch.append((run_id, position, *result))
        if len(batch) >= BATCH:
            await flush()
    bad = await connection.fetch(
        "SELECT line_number, error_column, error FROM settlement_staging WHERE error <> '' ORDER BY line_number"
    )
    for row in bad:
        text = f"{row['error_column']}: {row['error']}" if row["error_column"] else row["error"]
        result = Result("BAD_LINE", "", row["line_number"], "", "", "", "", "", 0, 0, 0, 0, 0, 0, None, None, text)
        summary.add(result)
        batch.append((run_id, row["line_number"], *result))
        if len(batch) >= BATCH:
            await flush()
    await flush()
    return summary


async def _async_merge(lines: AsyncIterator[ChannelLine], items: AsyncIterator[LedgerItem]) -> AsyncIterator[Result]:
    """``merge`` over two async streams, read in chunks of about ``BATCH``: each round merges
    both buffers up to the smaller of their last authorization ids (every line and item of that
    id read first) and keeps the rest, so memory stays about two chunks of each side."""
    line_buffer: list[ChannelLine] = []
    item_buffer: list[LedgerItem] = []
    lines_done = items_done = False
    line_next: ChannelLine | None = None
    item_next: LedgerItem | None = None

    async def take_lines(until: str | None) -> None:
        nonlocal lines_done, line_next
        while not lines_done:
            if line_next is None:
                line_next = await anext(lines, None)
                if line_next is None:
                    lines_done = True
                    return
            if until is not None and line_next.authorization_id > until:
                return
            line_buffer.append(line_next)
            line_next = None
            if until is None and len(line_buffer) >= BATCH:
                return

    async def take_items(until: str | None) -> None:
        nonlocal items_done, item_next
        while not items_done:
            if item_next is None:
                item_next = await anext(items, None)
                if item_next is None:
                    items_done = True
                    return
            if until is not None and item_next.authorization_id > until:
                return
            item_buffer.append(item_next)
            item_next = None
            if until is None and len(item_buffer) >= BATCH:
                return

    while True:
        await take_lines(None)
        await take_items(None)
        if not line_buffer and not item_buffer:
            return
        # Merge up to the smaller of the two buffers' last keys (a side that is done does not
        # bound it), with every line and item of that key read; keep the rest for the next round.
        bounds = [buffer[-1].authorization_id for buffer, done in ((line_buffer, lines_done), (item_buffer, items_done))
                  if buffer and not done]  # fmt: skip
        last = (
            min(bounds)
            if bounds
            else max(
                line_buffer[-1].authorization_id if line_buffer else "",
                item_buffer[-1].authorization_id if item_buffer else "",
            )
        )
        await take_lines(last)
        await take_items(last)
        line_cut = bisect.bisect_right([line.authorization_id for line in line_buffer], last)
        item_cut = bisect.bisect_right([item.authorization_id for item in item_buffer], last)
        for result in merge(line_buffer[:line_cut], item_buffer[:item_cut]):
            yield result
        del line_buffer[:line_cut]
        del item_buffer[:item_cut]


async def import_file(connection: asyncpg.Connection, upload: SettlementUpload, text: IO[str]) -> ImportOutcome:
    """Imports one file (``text``: the file as text, positioned at its start). Raises
    ``FileRefused`` (nothing stored) for a file that cannot be read whole."""
    async with connection.transaction():
        await connection.execute(
            "SELECT pg_advisory_xact_lock(hashtext('reconciliation:' || $1 || ':' || $2))",
            upload.channel,
            upload.business_date.isoformat(),
        )
        # The audit row first: the same request id with another file is IDEMPOTENCY_CONFLICT
        # (record raises it), with this very file a replay. A refused import rolls it back too.
        details = {
            "channel": upload.channel,
            "business_date": upload.business_date.isoformat(),
            "file_name": upload.file_name,
            "file_sha256": upload.file_sha256,
        }
        if await record(connection, upload.action, details, Scope()) is None:
            return ImportOutcome(run=await _run_of_file(connection, upload), replayed=True, applied=False)
        current = await current_run(connection, upload.channel, upload.business_date)
        if current is not None and current["file_sha256"] == upload.file_sha256:
            # This very file is the day's current run: nothing changes.
            return ImportOutcome(run=current, replayed=True, applied=False)
        reader = SettlementReader(upload.mapping)
        outcome = ImportOutcome(run=None, replayed=False, applied=False)
        await _stage(connection, reader, text, outcome)
        if outcome.lines_rejected and upload.mode == ALL_OR_NOTHING:
            # Nothing stored: the transaction's temporary table is dropped with it.
            raise _Refused(outcome)
        run_id = uuid.uuid4()
        summary = await _merge_results(connection, run_id, upload)
        if current is not None:
            await connection.execute(
                "UPDATE reconciliation_runs SET superseded_at = now(), superseded_by_run_id = $2 WHERE run_id = $1",
                current["run_id"],
                run_id,
            )
        await connection.execute(
            "INSERT INTO reconciliation_runs (run_id, channel, business_date, file_name, file_sha256, mapping_name,"
            " mapping, mode, request_id, imported_by, day_starts_at, day_ends_at, file_lines, ignored_lines,"
            " ledger_items, channel_net_subsidy_fen, ledger_net_subsidy_fen, counts, supersedes_run_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,"
            " $18::jsonb, $19)",
            run_id,
            upload.channel,
            upload.business_date,
            upload.file_name,
            upload.file_sha256,
            upload.mapping.name,
            orjson.dumps(upload.mapping.as_dict()).decode(),
            upload.mode,
            upload.action.request_id,
            upload.action.operator_id,
            upload.day_starts_at,
            upload.day_ends_at,
            reader.totals.lines - reader.totals.ignored,
            reader.totals.ignored,
            summary.ledger_items,
            summary.channel_net_subsidy_fen,
            summary.ledger_net_subsidy_fen,
            orjson.dumps(summary.counts).decode(),
            current["run_id"] if current else None,
        )
        outcome.run = await run_by_id(connection, str(run_id))
        outcome.applied = True
        return outcome


async def _run_of_file(connection: asyncpg.Connection, upload: SettlementUpload) -> dict[str, Any] | None:
    """The run an earlier import under this request id answered with: the one it created, or
    the run of the same file it found current."""
    run_id = await connection.fetchval(
        "SELECT run_id FROM reconciliation_runs WHERE request_id = $1"
        " UNION ALL (SELECT run_id FROM reconciliation_runs WHERE channel = $2 AND business_date = $3"
        " AND file_sha256 = $4 ORDER BY imported_at DESC LIMIT 1) LIMIT 1",
        upload.action.request_id,
        upload.channel,
        upload.business_date,
        upload.file_sha256,
    )
    return None if run_id is None else await run_by_id(connection, run_id)


class _Refused(Exception):
    def __init__(self, outcome: ImportOutcome) -> None:
        super().__init__("refused")
        self.outcome = outcome


async def import_or_refuse(connection: asyncpg.Connection, upload: SettlementUpload, text: IO[str]) -> ImportOutcome:
    """``import_file``; a refused ALL_OR_NOTHING import answers with its errors (nothing stored)."""
    try:
        return await import_file(connection, upload, text)
    except _Refused as refused:
        return refused.outcome
