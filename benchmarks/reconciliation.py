"""Bill reconciliation on a large generated day (issue 12, section 3): how long importing and
matching a channel's settlement file of about 1,000,000 lines takes, and how much memory.

    make bench-recon                                              # about 1,000,000 lines
    .venv/bin/python -m benchmarks.reconciliation --lines 100000  # a quick run

Three phases, each in a process of its own so that its peak memory (ru_maxrss) is its own:

1. ``generate``: a fresh database (``subsidy_bench_recon`` on the PostgreSQL that
   storage/devenv.py finds or starts) and one business day of simulated traffic
   (server/domain/ledger_sim.py): its captures and refunds (whole and partial) copied into
   ``ledger_events`` as the writer stores them (payload, lines, channel reference on every
   second one). Matching reads only those rows, so the double entry and hash chain, which the
   daily-report benchmark measures, are not built here.
2. ``file``: the channel's file for that day in the documented standard format, one line per
   capture and refund (read back from the ledger), with deliberate exceptions: every 10,000th
   line's subsidy off by one fen, every 20,000th ledger item left out, an unknown
   authorization every 25,000 lines, every 50,000th line repeated.
3. ``import``: ``storage.postgres.reconciliation.import_file``, what ImportSettlementFile runs
   once the bytes have arrived: the SHA-256, the lines read and copied into the staging table,
   the day's ledger read in authorization order, the merge join, 1,000,000 result lines copied
   into ``reconciliation_lines``, the run committed. Wall time includes PostgreSQL's work.

Writes ``<output>/reconciliation-<UTC stamp>.json`` and prints a Markdown summary. The
database is dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from benchmarks import offline
from benchmarks.offline import peak_rss_mb
from server.domain.bill_matching import LedgerItem, mirror
from server.domain.daily_report import BusinessCalendar
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from server.domain.settlement_file import ColumnMapping, standard_line
from storage.postgres import reconciliation
from storage.postgres.actions import Action
from storage.postgres.migrate import migrate

ROOT = offline.ROOT
DATABASE = "subsidy_bench_recon"
CALENDAR = BusinessCalendar("Asia/Shanghai", "00:30")
DAY = date(2026, 3, 2)
BATCH = 20_000
CAMPAIGNS = (
    SimCampaign("bench-tradein", ("fridge", "washer", "tv"), rate_bp=1500, cap_fen=200_000),
    SimCampaign("bench-vouchers", ("general",), rate_bp=1000, cap_fen=500),
)
EVENT_COLUMNS = (
    "event_id",
    "event_ms",
    "event_seq",
    "event_type",
    "authorization_id",
    "campaign_id",
    "merchant_id",
    "terminal_id",
    "consumer_key",
    "request_id",
    "amount_fen",
    "occurred_at",
    "lines",
    "payload",
    "channel_reference",
)


TIME_ORDER = (
    "SELECT event_id, CASE event_type WHEN 'CAPTURED' THEN 'PAYMENT' ELSE 'REFUND' END, authorization_id,"
    " merchant_id, coalesce(channel_reference, ''), amount_fen, CASE event_type WHEN 'CAPTURED' THEN"
    " (SELECT coalesce(sum((line->>'p')::bigint), 0) FROM jsonb_array_elements(lines) AS line)::bigint ELSE 0 END,"
    " occurred_at FROM ledger_events WHERE event_type IN ('CAPTURED', 'REFUNDED') AND occurred_at >= $1"
    " AND occurred_at < $2 ORDER BY event_ms, event_seq"
)


def _row(entry_id: str, event: dict[str, Any], index: int) -> tuple[Any, ...]:
    milliseconds, sequence = (int(part) for part in entry_id.split("-"))
    reference = f"CH{index:012d}" if index % 2 == 0 else None
    if reference:
        event = {**event, "channel_reference": reference}
    return (
        entry_id,
        milliseconds,
        sequence,
        event["type"],
        event["authorization_id"],
        event["campaign"],
        event["merchant"],
        event["terminal"],
        event["consumer"],
        event["request_id"],
        event["amount_fen"],
        datetime.fromtimestamp(event["at_ms"] / 1000, UTC),
        orjson.dumps(event["lines"]).decode(),
        orjson.dumps(event).decode(),
        reference,
    )


async def generate(dsn: str, lines: int, merchants: int) -> dict[str, Any]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        await migrate(connection)
        start, end = CALENDAR.bounds(DAY)
        settings = SimSettings(
            campaigns=CAMPAIGNS, merchants=[f"m-bench-{index:05d}" for index in range(merchants)], seed=2026
        )
        started = time.perf_counter()
        # About 0.8 captures and refunds per payment within the day.
        stream = simulate(settings, int(start.timestamp() * 1000), int(end.timestamp() * 1000), int(lines / 0.8))
        batch: list[tuple[Any, ...]] = []
        written = 0
        for entry_id, event in stream:
            if event["type"] not in ("CAPTURED", "REFUNDED"):
                continue
            batch.append(_row(entry_id, event, written))
            written += 1
            if len(batch) >= BATCH:
                await connection.copy_records_to_table("ledger_events", records=batch, columns=EVENT_COLUMNS)
                batch = []
        if batch:
            await connection.copy_records_to_table("ledger_events", records=batch, columns=EVENT_COLUMNS)
        await connection.execute("ANALYZE ledger_events")
        seconds = time.perf_counter() - started
        refunds = await connection.fetchval("SELECT count(*) FROM ledger_events WHERE event_type = 'REFUNDED'")
    finally:
        await connection.close()
    return {"ledger_items": written, "refunds": refunds, "generate_s": round(seconds, 1)}


async def make_file(dsn: str, path: Path) -> dict[str, Any]:
    connection = await asyncpg.connect(dsn, timeout=10)
    start, end = CALENDAR.bounds(DAY)
    counts = {"mismatch": 0, "left_out": 0, "unknown": 0, "repeated": 0}
    number = 1
    try:
        with path.open("w", encoding="utf-8", newline="") as handle:
            handle.write("channel_txn_id,authorization_id,captured_fen,subsidy_fen,refund_fen,time,status\r\n")
            async with connection.transaction():
                index = 0
                # In time order, as a channel writes its bill (matching sorts it by authorization).
                async for row in connection.cursor(TIME_ORDER, start, end, prefetch=BATCH):
                    item = LedgerItem(*row)
                    index += 1
                    if index % 20_000 == 0:
                        counts["left_out"] += 1
                        continue
                    line = mirror(item, 0, f"CX{index:012d}")
                    if index % 10_000 == 0:
                        counts["mismatch"] += 1
                        line = line._replace(subsidy_fen=line.subsidy_fen + 1, refund_fen=line.refund_fen + 1)
                    handle.write(standard_line(line))
                    number += 1
                    if index % 25_000 == 0:
                        counts["unknown"] += 1
                        handle.write(standard_line(line._replace(authorization_id=uuid.uuid4().hex)))
                        number += 1
                    if index % 50_000 == 0:
                        counts["repeated"] += 1
                        handle.write(standard_line(line))
                        number += 1
            size = handle.tell()
    finally:
        await connection.close()
    return {"file_lines": number - 1, "file_bytes": size, **counts}


async def import_day(dsn: str, path: Path) -> dict[str, Any]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        started = time.perf_counter()
        with path.open("rb") as raw:
            sha256 = reconciliation.sha256_of(raw)
        hashed = time.perf_counter()
        start, end = CALENDAR.bounds(DAY)
        action = Action("op-bench", str(uuid.uuid4()), "ImportSettlementFile", "reconciliation", "bench", "0" * 64)
        upload = reconciliation.SettlementUpload(
            "bench-pay", DAY, start, end, path.name, sha256, ColumnMapping(), reconciliation.ALL_OR_NOTHING, action
        )
        with path.open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
            outcome = await reconciliation.import_or_refuse(connection, upload, text)
        seconds = time.perf_counter() - started
        assert outcome.applied and outcome.run is not None, outcome.errors[:3]
        stored = await connection.fetchval(
            "SELECT count(*) FROM reconciliation_lines WHERE run_id = $1", outcome.run["run_id"]
        )
    finally:
        await connection.close()
    counts = orjson.loads(outcome.run["counts"]) if isinstance(outcome.run["counts"], str) else outcome.run["counts"]
    return {
        "import_s": round(seconds, 1),
        "sha256_s": round(hashed - started, 2),
        "lines_received": outcome.lines_received,
        "result_lines": stored,
        "counts": counts,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def summary(results: dict[str, Any]) -> str:
    generated, made, imported = results["generate"], results["file"], results["import"]
    counts = ", ".join(f"{status} {lines:,}" for status, (lines, _) in sorted(imported["counts"].items()))
    return "\n".join(
        [
            f"| ledger captures and refunds in the day | {generated['ledger_items']:,} "
            f"({generated['refunds']:,} refunds) |",
            "|---|---|",
            f"| settlement file | {made['file_lines']:,} lines, {made['file_bytes']:,} bytes |",
            f"| **import and match (SHA-256, read, stage, merge, store)** | **{imported['import_s']} s**, "
            f"peak RSS {imported['peak_rss_mb']} MB |",
            f"| of which SHA-256 | {imported['sha256_s']} s |",
            f"| result lines stored | {imported['result_lines']:,} ({counts}) |",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000, help="captures and refunds in the day (about)")
    parser.add_argument("--merchants", type=int, default=2_000)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--phase", choices=("generate", "file", "import"), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.phase:
        path = (arguments.folder or Path(".")) / "settlement.csv"
        if arguments.phase == "generate":
            result = asyncio.run(generate(arguments.dsn, arguments.lines, arguments.merchants))
        elif arguments.phase == "file":
            result = asyncio.run(make_file(arguments.dsn, path))
        else:
            result = asyncio.run(import_day(arguments.dsn, path))
        print(json.dumps(result))
        return 0
    results = offline.run(
        "benchmarks.reconciliation",
        DATABASE,
        ("generate", "file", "import"),
        lambda folder: [
            "--lines",
            str(arguments.lines),
            "--merchants",
            str(arguments.merchants),
            "--folder",
            str(folder),
        ],
        arguments.keep,
    )
    offline.save(results, arguments.output, "reconciliation", summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
