"""make run's reconciliation demo (README, "Bill reconciliation"): the demo day of
server/commands/report_demo.py gets a settlement file from the demo wallet's acquirer
(channel ``demo-wallet-pay``) with four deliberate exceptions, imported at start, so
``subsidyctl recon show`` and the dashboard have something to show at once:

- one payment whose voucher (subsidy) the channel settled 5.00 yuan higher (AMOUNT_MISMATCH);
- one payment the channel has and the ledger does not (MISSING_IN_LEDGER);
- one captured payment missing from the file (MISSING_IN_CHANNEL);
- one refund line repeated (DUPLICATE_IN_FILE).

The file is written to ``.data/demo-settlement-<day>.csv`` in the documented standard format,
to look at or import again (nothing changes: same file, same SHA-256). It is made from the
ledger deterministically, so every later ``make run`` finds the run already there.
"""

from __future__ import annotations

import io
import uuid
from datetime import date
from pathlib import Path

import asyncpg

from server.commands.report_demo import DEMO_CAMPAIGN
from server.config import Config
from server.domain.bill_matching import LedgerItem, mirror
from server.domain.daily_report import BusinessCalendar
from server.domain.settlement_file import PAYMENT, REFUND, ChannelLine, ColumnMapping, standard_file
from storage.postgres import reconciliation
from storage.postgres.actions import Action

DEMO_CHANNEL = "demo-wallet-pay"
DEMO_OPERATOR = "op-demo-auditor"
MISMATCH_FEN = 500
EXTRA_SUBSIDY_FEN, EXTRA_ORDER_FEN = 30_000, 299_900
# The request id of the demo import of a day: the same every run, so a later run is a replay.
NAMESPACE = uuid.UUID("6f0e7d1c-5b2a-4c39-8e1f-2a9d3c4b5e60")


def demo_lines(items: list[LedgerItem], day: date) -> list[ChannelLine]:
    """The demo file's lines, in time order, numbered as in the file (header = line 1)."""
    ordered = sorted(items, key=lambda item: (item.occurred_at, item.event_id))
    lines = [mirror(item, 0, f"DEMO{day:%Y%m%d}{index:06d}") for index, item in enumerate(ordered)]
    payments = [index for index, line in enumerate(lines) if line.kind == PAYMENT]
    refunds = [index for index, line in enumerate(lines) if line.kind == REFUND]
    mismatch, dropped = payments[len(payments) // 3], payments[2 * len(payments) // 3]
    lines[mismatch] = lines[mismatch]._replace(subsidy_fen=lines[mismatch].subsidy_fen + MISMATCH_FEN)
    extra = ChannelLine(
        0,
        PAYMENT,
        f"DEMO{day:%Y%m%d}X00001",
        uuid.uuid5(NAMESPACE, f"unknown {day}").hex,
        EXTRA_ORDER_FEN,
        EXTRA_SUBSIDY_FEN,
        0,
        lines[len(lines) // 2].time,
    )
    kept = [line for index, line in enumerate(lines) if index != dropped]
    kept.insert(len(kept) // 2, extra)
    if refunds:
        repeated = lines[refunds[0]]
        kept.insert(kept.index(repeated) + 1, repeated)
    return [line._replace(line_number=number) for number, line in enumerate(kept, start=2)]


def write_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")


async def seed_demo_reconciliation(config: Config, data_dir: Path) -> tuple[date, bool] | None:
    """Imports the demo day's settlement file; returns (day, whether it was new), or None when
    there is no demo day."""
    calendar = BusinessCalendar(config.report_timezone, config.report_cutoff)
    connection = await asyncpg.connect(config.pg_dsn, timeout=10)
    try:
        first = await reconciliation.first_capture(connection, DEMO_CAMPAIGN)
        if first is None:
            return None
        day = calendar.day_of(first)
        start, end = calendar.bounds(day)
        async with connection.transaction():
            items = [item async for item in reconciliation.ledger_items(connection, start, end)]
        if not any(item.kind == PAYMENT for item in items):
            return None
        text = "".join(standard_file(demo_lines(items, day)))
        path = data_dir / f"demo-settlement-{day.isoformat()}.csv"
        write_file(path, text)
        raw = text.encode()
        sha256 = reconciliation.sha256_of(io.BytesIO(raw))
        action = Action(
            DEMO_OPERATOR,
            str(uuid.uuid5(NAMESPACE, f"{DEMO_CHANNEL} {day} {sha256}")),
            "ImportSettlementFile",
            "reconciliation",
            f"{DEMO_CHANNEL}:{day.isoformat()}",
            sha256,
        )
        upload = reconciliation.SettlementUpload(
            DEMO_CHANNEL, day, start, end, path.name, sha256, ColumnMapping(), reconciliation.ALL_OR_NOTHING, action
        )
        outcome = await reconciliation.import_or_refuse(connection, upload, io.StringIO(text, newline=""))
        return day, outcome.applied
    finally:
        await connection.close()
