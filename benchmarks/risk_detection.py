"""The offline risk detectors on a large generated day (issue 14, section 2): how long the five
detectors take over about 1,000,000 ledger events, and how much memory they need.

    .venv/bin/python -m benchmarks.risk_detection                    # 1,000,000 events, 2,000 merchants
    .venv/bin/python -m benchmarks.risk_detection --events 100000    # a quick run

1. ``generate``: a fresh database (``subsidy_bench_risk`` on the PostgreSQL that
   storage/devenv.py finds or starts), the daily-report benchmark's reference data (two
   campaigns, four categories, the merchants), a physical store and a terminal per merchant
   spread over Xiaoshan, then one business day of simulated traffic (server/domain/ledger_sim.py,
   as benchmarks/daily_report.py generates it). The events are inserted into ``ledger_events``
   with the ledger writer's own event insert, without the double-entry lines and hash chain
   (``write_batch`` would add about 500 s here, and the detectors never read ledger_entries).
2. ``detect``: ``storage.postgres.risk.detect`` over that day, in a process of its own so its
   peak memory (ru_maxrss) is its own: every detector, one snapshot, wall time including
   PostgreSQL's work.

Writes ``<output>/risk-detection-<UTC stamp>.json`` and prints a Markdown summary. The database
is dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from benchmarks import offline
from benchmarks.daily_report import CALENDAR, CAMPAIGNS, DAY, merchant_ids, reference_document
from benchmarks.offline import peak_rss_mb
from server.domain.ledger_sim import SimSettings, simulate
from server.domain.reference import parse_reference
from storage.postgres import risk
from storage.postgres.ledger import _insert_events, parse_event
from storage.postgres.migrate import migrate
from storage.postgres.reference import save_reference

ROOT = offline.ROOT
DATABASE = "subsidy_bench_risk"
BATCH = 5_000
CENTRE = (30.185, 120.264)


async def generate(dsn: str, events: int, merchants: int) -> dict[str, Any]:
    connection = await asyncpg.connect(dsn, timeout=10)
    rng = random.Random(14)
    try:
        await migrate(connection)
        await save_reference(connection, parse_reference(reference_document(merchants)))
        identifiers = merchant_ids(merchants)
        await connection.executemany(
            "INSERT INTO stores (store_id, merchant_id, kind, name, latitude, longitude)"
            " VALUES ('s-' || $1, $1, 'PHYSICAL', $1, $2, $3)",
            [
                (merchant, CENTRE[0] + rng.uniform(-0.15, 0.15), CENTRE[1] + rng.uniform(-0.15, 0.15))
                for merchant in identifiers
            ],
        )
        await connection.executemany(
            "INSERT INTO terminals (terminal_id, merchant_id, status, secret, store_id)"
            " VALUES ($1 || '-t1', $1, 'ACTIVE', 'x', 's-' || $1) ON CONFLICT (terminal_id) DO NOTHING",
            [(merchant,) for merchant in identifiers],
        )
        start, end = CALENDAR.bounds(DAY)
        settings = SimSettings(campaigns=CAMPAIGNS, merchants=identifiers, seed=2026)
        started = time.perf_counter()
        stream = simulate(settings, int(start.timestamp() * 1000), int(end.timestamp() * 1000), int(events / 2.05))
        written, pending = 0, []
        for entry_id, payload in stream:
            pending.append(parse_event(entry_id, {b"e": orjson.dumps(payload)}))
            if len(pending) >= BATCH:
                written += len(await _insert_events(connection, pending))
                pending = []
        if pending:
            written += len(await _insert_events(connection, pending))
        await connection.execute("ANALYZE ledger_events")
        seconds = time.perf_counter() - started
        captured = await connection.fetchval("SELECT count(*) FROM ledger_events WHERE event_type = 'CAPTURED'")
        size = await connection.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
    finally:
        await connection.close()
    return {
        "events": written,
        "captured": captured,
        "merchants": merchants,
        "write_s": round(seconds, 1),
        "database_size": size,
    }


async def detect(dsn: str) -> dict[str, Any]:
    connection = await asyncpg.connect(dsn, timeout=10)
    per_detector: dict[str, float] = {}
    try:
        window = risk.Window(*CALENDAR.bounds(DAY))
        started = time.perf_counter()
        found = await risk.detect(
            connection, window, progress=lambda name, _count, seconds: per_detector.__setitem__(name, round(seconds, 2))
        )
        seconds = time.perf_counter() - started
    finally:
        await connection.close()
    return {
        "detect_s": round(seconds, 2),
        "per_detector_s": per_detector,
        "findings": {name: len(items) for name, items in found.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def summary(results: dict[str, Any]) -> str:
    generated, detected = results["generate"], results["detect"]
    lines = [
        f"| ledger events in the day | {generated['events']:,} ({generated['captured']:,} captures, "
        f"{generated['merchants']:,} merchants, database {generated['database_size']}) |",
        "|---|---|",
        f"| **all five detectors** | **{detected['detect_s']} s**, peak RSS {detected['peak_rss_mb']} MB |",
    ]
    lines += [
        f"| {name} | {seconds} s, {detected['findings'][name]} findings |"
        for name, seconds in detected["per_detector_s"].items()
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="ledger events in the day (about)")
    parser.add_argument("--merchants", type=int, default=2_000)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--phase", choices=("generate", "detect"), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.phase:
        if arguments.phase == "generate":
            result = asyncio.run(generate(arguments.dsn, arguments.events, arguments.merchants))
        else:
            result = asyncio.run(detect(arguments.dsn))
        print(json.dumps(result))
        return 0
    results = offline.run(
        "benchmarks.risk_detection",
        DATABASE,
        ("generate", "detect"),
        lambda _folder: ["--events", str(arguments.events), "--merchants", str(arguments.merchants)],
        arguments.keep,
    )
    offline.save(results, arguments.output, "risk-detection", summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
