"""The audit archive carries bill reconciliation (issue 12, sections 3 and 4): the runs of the
exported days (a superseded one too) and their result lines, checked by the archive's own
verify.py under the bare interpreter: OK; one fen altered in a result line's difference (the
manifest re-hashed) is a break naming the run and the line; a run's counts altered likewise."""

from __future__ import annotations

import io
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

from server.domain.bill_matching import mirror
from server.domain.settlement_file import ColumnMapping, standard_file
from storage.devenv import Services
from storage.postgres import reconciliation
from storage.postgres.actions import Action
from tests.integration.test_audit_archive import (
    CALENDAR,
    FIRST_DAY,
    export,
    fix_manifest,
    generated_days,
    rewrite,
    run_verify,
)
from tests.integration.test_ledger import ledger_world


async def import_text(connection: asyncpg.Connection, day: Any, text: str) -> dict[str, Any]:
    start, end = CALENDAR.bounds(day)
    sha256 = reconciliation.sha256_of(io.BytesIO(text.encode()))
    action = Action("op-auditor", str(uuid.uuid4()), "ImportSettlementFile", "reconciliation", "archive-pay", sha256)
    upload = reconciliation.SettlementUpload(
        "archive-pay", day, start, end, "bill.csv", sha256, ColumnMapping(), reconciliation.ALL_OR_NOTHING, action
    )
    outcome = await reconciliation.import_or_refuse(connection, upload, io.StringIO(text, newline=""))
    assert outcome.applied and outcome.run is not None
    return outcome.run


async def test_the_archive_holds_reconciliation_and_verify_finds_an_altered_fen(
    services: Services, tmp_path: Path
) -> None:
    async with ledger_world(services) as (env, _gateway, _client):
        await generated_days(env)
        day = FIRST_DAY + timedelta(days=1)
        start, end = CALENDAR.bounds(day)
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            async with connection.transaction():
                items = [item async for item in reconciliation.ledger_items(connection, start, end)]
            lines = [mirror(item, 0, f"AR{index:06d}") for index, item in enumerate(items)]
            first_file = list(standard_file(lines[1:]))  # one capture or refund missing
            first = await import_text(connection, day, "".join(first_file))
            second = await import_text(connection, day, "".join(standard_file(lines)))
        finally:
            await connection.close()
        assert first["run_id"] != second["run_id"]

        archive = tmp_path / "archive"
        status, summary, stderr = export(env, day, day, archive)
        assert status == 0, (stderr, summary.get("verification"))
        manifest = json.loads((archive / "manifest.json").read_text())
        assert manifest["layout"]["reconciliation"] == {
            "runs": "reconciliation_runs.jsonl",
            "lines": "reconciliation_lines.jsonl",
        }
        runs = [json.loads(line) for line in (archive / "reconciliation_runs.jsonl").read_text().splitlines()]
        assert {run["run_id"] for run in runs} == {str(first["run_id"]), str(second["run_id"])}
        assert [run["superseded_by_run_id"] for run in runs if run["run_id"] == str(first["run_id"])] == [
            str(second["run_id"])
        ]
        verified = run_verify(archive)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "2 reconciliation runs" in verified.stdout

        # One fen more in a matched line's difference, the manifest re-hashed: named by run and line.
        lines_file = archive / "reconciliation_lines.jsonl"

        def one_fen(row: dict[str, Any]) -> bool:
            if row["status"] != "MATCHED":
                return False
            row["difference_fen"] += 1
            return True

        index = rewrite(lines_file, one_fen)
        fix_manifest(archive, "reconciliation_lines.jsonl")
        broken = run_verify(archive)
        assert broken.returncode == 1, broken.stdout
        assert f"reconciliation_lines.jsonl line {index + 1}" in broken.stdout and "BREAK" in broken.stdout

        # A run's counts altered instead (lines restored): the run is named.
        rewrite(lines_file, lambda row: row["status"] == "MATCHED" and row["difference_fen"] == 1 and _undo(row))
        fix_manifest(archive, "reconciliation_lines.jsonl")
        assert run_verify(archive).returncode == 0

        def more_matched(row: dict[str, Any]) -> bool:
            row["counts"]["MATCHED"][0] += 1
            return True

        rewrite(archive / "reconciliation_runs.jsonl", more_matched)
        fix_manifest(archive, "reconciliation_runs.jsonl")
        broken = run_verify(archive)
        assert broken.returncode == 1 and "its counts are not those of its lines" in broken.stdout, broken.stdout


def _undo(row: dict[str, Any]) -> bool:
    row["difference_fen"] -= 1
    return True
