"""The T+1 daily report on a large generated day (issue 12, section 1): how long the cut and the
exports take, and how much memory they need.

    .venv/bin/python -m benchmarks.daily_report                     # 1,000,000 events, 2,000 merchants
    .venv/bin/python -m benchmarks.daily_report --events 100000     # a quick run

Three phases, each in a process of its own so that its peak memory (ru_maxrss) is its own:

1. ``generate``: a fresh database (``subsidy_bench_report`` on the PostgreSQL that
   storage/devenv.py finds or starts), reference data (two campaigns, four categories, the
   merchants with Chinese names), then one business day of simulated traffic
   (server/domain/ledger_sim.py: authorizations, captures, voids, expiries, whole and partial
   refunds) written through the ledger writer's own ``write_batch`` (double entry, hash
   chain), about ``--events`` ledger events in all.
2. ``cut``: ``publish_closed_days`` for that day, exactly what the writer's scheduler runs:
   the snapshot, the budget sums, the rows aggregated and streamed into the report, the
   tie-out checks, the content hash. Wall time includes PostgreSQL's work.
3. ``export``: the published report streamed back into a CSV (rows), a CSV (budgets) and an
   XLSX, as the export RPC builds them.

Writes ``<output>/daily-report-<UTC stamp>.json`` and prints a Markdown summary. The database
is dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks import offline
from benchmarks.offline import peak_rss_mb
from server.domain.daily_report import BusinessCalendar
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from server.domain.reference import parse_reference
from server.domain.report_files import BUDGET_COLUMNS, ROW_COLUMNS, XlsxReport, csv_head, csv_line
from storage.postgres import daily_reports
from storage.postgres.migrate import migrate
from storage.postgres.reference import save_reference

ROOT = offline.ROOT
DATABASE = "subsidy_bench_report"
CALENDAR = BusinessCalendar("Asia/Shanghai", "00:30")
DAY = date(2026, 3, 2)
BATCH = 5_000
CAMPAIGNS = (
    SimCampaign("bench-tradein", ("fridge", "washer", "tv"), rate_bp=1500, cap_fen=200_000),
    SimCampaign("bench-vouchers", ("general",), rate_bp=1000, cap_fen=500),
)


def reference_document(merchants: int) -> dict[str, Any]:
    window = {"status": "ACTIVE", "starts_at": "2026-01-01T00:00:00+08:00", "ends_at": "2026-12-31T00:00:00+08:00"}
    budget = 9_000_000_000_000
    return {
        "campaigns": [
            {
                "id": "bench-tradein",
                "name": "以旧换新（基准测试）",
                **window,
                "rules": [
                    {"category": category, "kind": "PERCENT", "rates_bp": {"0": 1500}, "cap_fen": 200_000,
                     "per_person_limit": 1, "budget_fen": budget}
                    for category in ("fridge", "washer", "tv")
                ],
            },
            {
                "id": "bench-vouchers",
                "name": "萧山消费券（基准测试）",
                **window,
                "rules": [{"category": "general", "kind": "FIXED", "threshold_fen": 2_000, "off_fen": 500,
                           "per_person_limit": 2, "budget_fen": budget}],
            },
        ],
        "products": [],
        "merchants": [
            {"id": merchant_id, "name": f"萧山第{index}号家电卖场", "licence_number": f"91330109B{index:05d}"}
            for index, merchant_id in enumerate(merchant_ids(merchants))
        ],
    }  # fmt: skip


def merchant_ids(merchants: int) -> list[str]:
    return [f"m-bench-{index:05d}" for index in range(merchants)]


async def generate(dsn: str, events: int, merchants: int) -> dict[str, Any]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        await migrate(connection)
        await save_reference(connection, parse_reference(reference_document(merchants)))
        start, end = CALENDAR.bounds(DAY)
        settings = SimSettings(campaigns=CAMPAIGNS, merchants=merchant_ids(merchants), seed=2026)
        started = time.perf_counter()
        # About 2.05 events per payment within the day (its authorization, its outcome, some refunds).
        stream = simulate(settings, int(start.timestamp() * 1000), int(end.timestamp() * 1000), int(events / 2.05))
        written = await daily_reports.write_simulated(connection, stream, batch=BATCH)
        # What autovacuum does after a load like this one (a production ledger's statistics are
        # kept current the same way); without it the planner guesses a day's rows as a handful.
        await connection.execute("ANALYZE ledger_entries")
        await connection.execute("ANALYZE ledger_events")
        seconds = time.perf_counter() - started
        entries = await connection.fetchval("SELECT count(*) FROM ledger_entries")
        size = await connection.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
    finally:
        await connection.close()
    return {
        "events": written,
        "entries": entries,
        "merchants": merchants,
        "write_s": round(seconds, 1),
        "events_per_s": round(written / seconds),
        "database_size": size,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


async def cut(dsn: str) -> dict[str, Any]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        started = time.perf_counter()
        result = await daily_reports.publish_closed_days(
            connection, CALENDAR, CALENDAR.closes_at(DAY) + timedelta(minutes=1), "benchmark", up_to=DAY
        )
        seconds = time.perf_counter() - started
        header = result.published[0]
        totals = (await daily_reports.district_totals(connection, [DAY]))[DAY]["DAY"]
        verified_at = time.perf_counter()
        assert await daily_reports.verify(connection, DAY)
        verify_s = time.perf_counter() - verified_at
    finally:
        await connection.close()
    return {
        "cut_s": round(seconds, 2),
        "verify_s": round(verify_s, 2),
        "rows": header.row_count,
        "budgets": header.budget_count,
        "sales": totals.sales,
        "consumers": totals.consumers,
        "redeemed_fen": totals.redeemed_fen,
        "refunded_fen": totals.refunded_fen,
        "merchants_with_sales": totals.merchants,
        "content_hash": header.content_hash,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


async def export(dsn: str, folder: Path) -> dict[str, Any]:
    connection = await asyncpg.connect(dsn, timeout=10)
    measured: dict[str, Any] = {}
    try:
        async with daily_reports.reading(connection):
            header = await daily_reports.header(connection, DAY)
            assert header is not None
            started = time.perf_counter()
            rows_csv = folder / "rows.csv"
            with rows_csv.open("wb") as handle:
                handle.write(csv_head(ROW_COLUMNS))
                async for row in daily_reports.stream_rows(connection, DAY):
                    handle.write(csv_line(header, ROW_COLUMNS, row))
            budgets_csv = folder / "budgets.csv"
            with budgets_csv.open("wb") as handle:
                handle.write(csv_head(BUDGET_COLUMNS))
                async for line in daily_reports.stream_budgets(connection, DAY):
                    handle.write(csv_line(header, BUDGET_COLUMNS, line))
            measured["csv_s"] = round(time.perf_counter() - started, 2)
            measured["csv_bytes"] = rows_csv.stat().st_size + budgets_csv.stat().st_size
            started = time.perf_counter()
            report = XlsxReport(header)
            async for line in daily_reports.stream_budgets(connection, DAY):
                report.budget(line)
            async for row in daily_reports.stream_rows(connection, DAY):
                report.row(row)
            target = folder / "report.xlsx"
            report.save(str(target))
            measured["xlsx_s"] = round(time.perf_counter() - started, 2)
            measured["xlsx_bytes"] = target.stat().st_size
    finally:
        await connection.close()
    measured["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return measured


def summary(results: dict[str, Any]) -> str:
    generated, cut_result, exported = results["generate"], results["cut"], results["export"]
    return "\n".join(
        [
            f"| ledger events in the day | {generated['events']:,} ({generated['entries']:,} entries, "
            f"{generated['merchants']:,} merchants, database {generated['database_size']}) |",
            "|---|---|",
            f"| writing them (write_batch, {BATCH:,} per batch) | {generated['write_s']} s "
            f"({generated['events_per_s']:,} events/s) |",
            f"| **cut and publish the day** | **{cut_result['cut_s']} s**, peak RSS {cut_result['peak_rss_mb']} MB |",
            f"| report | {cut_result['rows']:,} rows, {cut_result['budgets']} budget lines, "
            f"{cut_result['sales']:,} sales, {cut_result['merchants_with_sales']:,} merchants with sales |",
            f"| verify the stored report's hash | {cut_result['verify_s']} s |",
            f"| export CSV (rows + budgets) | {exported['csv_s']} s, {exported['csv_bytes']:,} bytes |",
            f"| export XLSX | {exported['xlsx_s']} s, {exported['xlsx_bytes']:,} bytes, "
            f"peak RSS {exported['peak_rss_mb']} MB |",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="ledger events in the day (about)")
    parser.add_argument("--merchants", type=int, default=2_000)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--phase", choices=("generate", "cut", "export"), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.phase:
        if arguments.phase == "generate":
            result = asyncio.run(generate(arguments.dsn, arguments.events, arguments.merchants))
        elif arguments.phase == "cut":
            result = asyncio.run(cut(arguments.dsn))
        else:
            result = asyncio.run(export(arguments.dsn, arguments.folder))
        print(json.dumps(result))
        return 0
    results = offline.run(
        "benchmarks.daily_report",
        DATABASE,
        ("generate", "cut", "export"),
        lambda folder: [
            "--events",
            str(arguments.events),
            "--merchants",
            str(arguments.merchants),
            "--folder",
            str(folder),
        ],
        arguments.keep,
    )
    offline.save(results, arguments.output, "daily-report", summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
