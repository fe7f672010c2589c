"""The audit archive (issue 12, section 4): ``subsidyctl audit export`` and the verify.py it ships.

A ledger of several days: generated days (server/domain/ledger_sim.py) written by the ledger
writer's own ``write_batch``, their T+1 reports published, then real traffic through a gateway
drained by the ledger writer, and an operator action. The archive is exported by the real
command in a subprocess and checked by its own verify.py run by the bare interpreter (``-I
-S``: no site-packages, so none of this project's code can be imported): OK; one fen altered
in an entry (manifest re-hashed) is the first break, named; a file altered without fixing the
manifest is a SHA-256 mismatch, named.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
import zipfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from subsidy_client import RetryPolicy, SignedClient
from subsidy_client.v1 import campaign_pb2 as cpb

from server.domain.daily_report import BusinessCalendar
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from server.domain.posting import GENESIS_HASH
from server.processes.app import Application
from storage.devenv import Services
from storage.postgres import daily_reports
from storage.postgres.ledger import parse_event, write_batch
from storage.postgres.writer import LedgerWriter, WriterConfig
from tests.conftest import ROOT, Environment
from tests.integration.test_ledger import ledger_world, traffic

CALENDAR = BusinessCalendar("Asia/Shanghai", "00:30")
FIRST_DAY = date(2026, 3, 1)
DAYS = 3
# The bare interpreter under the virtualenv: the standard library and nothing else.
CAMPAIGNS = "/subsidy.v1.CampaignService/"
BARE_PYTHON = getattr(sys, "_base_executable", sys.executable)


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


async def generated_days(env: Environment) -> None:
    """DAYS generated days in c-main (its chain then continues with real traffic) and c-sim,
    their reports published, and an operator action on the second day."""
    settings = SimSettings(
        campaigns=(SimCampaign("c-main", ("fridge", "tv")), SimCampaign("c-sim", ("general",), rate_bp=1000)),
        merchants=("m-main", "m-other", "m-sim-1"),
        seed=12,
        refund_share=0.2,
        partial_refund_share=0.3,
    )
    start = CALENDAR.bounds(FIRST_DAY)[0]
    end = CALENDAR.bounds(FIRST_DAY + timedelta(days=DAYS - 1))[1]
    connection = await asyncpg.connect(env.pg_dsn, timeout=10)
    try:
        # As the ledger writer writes what it reads from the stream: parsed, then write_batch.
        events = [
            parse_event(entry_id, {b"e": orjson.dumps(payload)})
            for entry_id, payload in simulate(settings, ms(start), ms(end), 120)
        ]
        for index in range(0, len(events), 50):
            await write_batch(connection, events[index : index + 50])
        last = FIRST_DAY + timedelta(days=DAYS - 1)
        await daily_reports.publish_closed_days(
            connection, CALENDAR, CALENDAR.closes_at(last) + timedelta(minutes=1), "test", up_to=last
        )
        await connection.execute(
            "INSERT INTO operator_actions (operator_id, request_id, action, target_kind, target_id, payload_hash,"
            " details, acted_at) VALUES ('op-alice', 'r-1', 'UpdateCampaignRule', 'campaign', 'c-main', 'h',"
            ' \'{"category": "fridge", "rate_bp": 1500}\', $1)',
            CALENDAR.bounds(FIRST_DAY + timedelta(days=1))[0] + timedelta(hours=10),
        )
    finally:
        await connection.close()


async def real_traffic(env: Environment, gateway: Application, client: Any) -> None:
    """Sales through the gateway, drained by the ledger writer, and an operator's rule change
    over CampaignService (recorded in operator_actions as it happens)."""
    await traffic(client, 8)
    operator = SignedClient(
        f"127.0.0.1:{gateway.port}", "op-auditor", env.credentials["op-auditor"], retry=RetryPolicy(max_attempts=1)
    )
    try:
        found = await operator._call(
            CAMPAIGNS + "GetCampaign", cpb.GetCampaignRequest(campaign_id="c-main"), cpb.GetCampaignResponse
        )
        found.campaign.name = found.campaign.name + " (renamed)"
        request = cpb.UpdateCampaignRequest(request_id=str(uuid.uuid4()), campaign=found.campaign)
        await operator._call(CAMPAIGNS + "UpdateCampaign", request, cpb.UpdateCampaignResponse)
    finally:
        await operator.close()
    redis = Redis.from_url(env.redis_url)
    try:
        await LedgerWriter(WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), redis).drain()
    finally:
        await redis.aclose()


def export(env: Environment, first: date, last: date, out: Path) -> tuple[int, dict[str, Any], str]:
    """``subsidyctl audit export ... --json`` in a subprocess, as an operator runs it."""
    command = ["audit", "export", "--from", str(first), "--to", str(last), "--out", str(out), "--json"]
    process = subprocess.run(
        [sys.executable, "-c", "from server.ctl import main; main()", *command],
        cwd=ROOT,
        env={**os.environ, "SUBSIDY_PG_DSN": env.pg_dsn, "SUBSIDY_REPORT_TIMEZONE": CALENDAR.timezone},
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = json.loads(process.stdout) if process.stdout.strip() else {}
    return process.returncode, summary, process.stderr


def run_verify(archive: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """The shipped script, run where the archive is, by the bare interpreter in isolated mode."""
    return subprocess.run(
        [BARE_PYTHON, "-I", "-S", "verify.py", *arguments],
        cwd=archive,
        capture_output=True,
        text=True,
        timeout=120,
    )


def rewrite(path: Path, change: Any) -> int:
    """Applies ``change`` to the first JSON line it accepts (returns True); returns its index."""
    lines = path.read_bytes().splitlines(keepends=True)
    for index, line in enumerate(lines):
        row = json.loads(line)
        if change(row):
            lines[index] = orjson.dumps(row, option=orjson.OPT_SORT_KEYS) + b"\n"
            path.write_bytes(b"".join(lines))
            return index
    raise AssertionError("nothing to change")


def fix_manifest(archive: Path, name: str) -> None:
    manifest = json.loads((archive / "manifest.json").read_text())
    data = (archive / name).read_bytes()
    described = manifest["files"][name]
    manifest["files"][name] = {**described, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (archive / "manifest.json").write_text(json.dumps(manifest))


async def test_an_archive_verifies_without_the_project_and_finds_one_altered_fen(
    services: Services, tmp_path: Path
) -> None:
    async with ledger_world(services) as (env, gateway, client):
        await generated_days(env)
        await real_traffic(env, gateway, client)
        second, third = FIRST_DAY + timedelta(days=1), FIRST_DAY + timedelta(days=2)

        # Days 2-3: every chain starts mid-way; the hash before it is carried in the manifest.
        archive = tmp_path / "archive"
        status, summary, stderr = export(env, second, third, archive)
        assert status == 0, (stderr, summary.get("verification"))
        assert summary["ok"] and summary["kind"] == "directory", summary
        assert "writing ledger entries" in stderr  # progress on stderr
        manifest = json.loads((archive / "manifest.json").read_text())
        chain = manifest["chains"]["c-main"]
        assert chain["first_seq"] > 1 and chain["prev_hash"] != GENESIS_HASH
        assert set(manifest["chains"]) == {"c-main", "c-sim"}
        assert summary["files"]["operator_actions.jsonl"] == 1
        assert summary["files"]["daily_reports.jsonl"] == 2
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            before = await connection.fetchval(
                "SELECT entry_hash FROM ledger_entries WHERE campaign_id = 'c-main' AND entry_seq = $1",
                chain["first_seq"] - 1,
            )
            # The day totals tie out with the published reports' budget lines to the fen.
            for day in (second, third):
                captured = await connection.fetch(
                    "SELECT campaign_id, sum(captured_fen) AS captured, sum(refunded_fen) AS refunded"
                    " FROM daily_report_budgets WHERE business_date = $1 GROUP BY campaign_id",
                    day,
                )
                for row in captured:
                    figures = manifest["totals"][day.isoformat()].get(row["campaign_id"], {})
                    assert (figures.get("captured_fen", 0), figures.get("refunded_fen", 0)) == (
                        row["captured"],
                        row["refunded"],
                    )
        finally:
            await connection.close()
        assert chain["prev_hash"] == before
        script = (archive / "verify.py").read_bytes()
        assert manifest["files"]["verify.py"]["sha256"] == hashlib.sha256(script).hexdigest()

        verified = run_verify(archive)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert verified.stdout.startswith("OK: 2026-03-02..2026-03-03"), verified.stdout
        assert f"chain c-main: entries {chain['first_seq']}..{chain['last_seq']}, head {chain['last_hash']}" in (
            verified.stdout
        )

        # One fen more in one entry, the manifest re-hashed to match: the chain names the entry.
        entries = archive / "ledger_entries.jsonl"
        altered: dict[str, Any] = {}

        def one_fen(row: dict[str, Any]) -> bool:
            if row["campaign_id"] != "c-main" or row["debit_fen"] == 0 or row["entry_seq"] < chain["first_seq"] + 5:
                return False
            row["debit_fen"] += 1
            altered.update(row)
            return True

        original = entries.read_bytes()
        rewrite(entries, one_fen)
        fix_manifest(archive, "ledger_entries.jsonl")
        broken = run_verify(archive)
        assert broken.returncode == 1
        assert broken.stdout.startswith(f"BREAK: campaign c-main entry {altered['entry_seq']} "), broken.stdout
        assert "altered" in broken.stdout

        # The same fen without touching the manifest: the file's SHA-256 is named first.
        entries.write_bytes(original)
        assert run_verify(archive).returncode == 1  # the manifest still has the altered file's hash
        fix_manifest(archive, "ledger_entries.jsonl")
        assert run_verify(archive).returncode == 0
        rewrite(entries, one_fen)
        mismatch = run_verify(archive)
        assert mismatch.returncode == 1
        assert mismatch.stdout.startswith("BREAK: file ledger_entries.jsonl: SHA-256"), mismatch.stdout

        # An event's payload altered (a consumer swapped), its file re-hashed: its entries break.
        entries.write_bytes(original)
        fix_manifest(archive, "ledger_entries.jsonl")
        events = archive / "ledger_events.jsonl"
        swapped: dict[str, Any] = {}

        def other_consumer(row: dict[str, Any]) -> bool:
            if row["campaign_id"] != "c-sim" or row["event_type"] != "CAPTURED":
                return False
            row["payload"]["consumer"] = "someone-else"
            swapped.update(row)
            return True

        rewrite(events, other_consumer)
        fix_manifest(archive, "ledger_events.jsonl")
        broken = run_verify(archive)
        assert broken.returncode == 1
        assert broken.stdout.startswith("BREAK: campaign c-sim entry "), broken.stdout

        # Day 3 up to today, as a .zip: the real gateway traffic included, verified in the zip.
        today = CALENDAR.day_of(datetime.now(UTC))
        zipped = tmp_path / "out" / "audit.zip"
        status, summary, stderr = export(env, third, today, zipped)
        assert status == 0, (stderr, summary.get("verification"))
        assert summary["ok"] and summary["kind"] == "zip", summary
        assert summary["chains"]["c-main"]["last_seq"] == summary["chains"]["c-main"]["ledger_head_seq"]
        with zipfile.ZipFile(zipped) as opened:
            opened.extract("audit/verify.py", tmp_path / "script")
            actions = [json.loads(line) for line in opened.read("audit/operator_actions.jsonl").splitlines()]
        # The rule change made over the RPC today: who, what, which campaign, when.
        assert [(row["operator_id"], row["action"], row["target_id"]) for row in actions] == [
            ("op-auditor", "UpdateCampaign", "c-main")
        ]
        assert actions[0]["acted_at"].startswith(str(datetime.now(UTC).year))
        verified = run_verify(tmp_path / "script" / "audit", str(zipped))
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert verified.stdout.startswith("OK:"), verified.stdout

        # Days without any ledger entry: an archive with empty files that verifies.
        quiet = FIRST_DAY - timedelta(days=10)
        status, summary, stderr = export(env, quiet, quiet, tmp_path / "quiet")
        assert status == 0 and summary["chains"] == {} and summary["files"]["ledger_entries.jsonl"] == 0, stderr
        assert run_verify(tmp_path / "quiet").stdout.startswith("OK: 2026-02-19..2026-02-19"), summary

        # A path that exists is refused (exit 2); nothing is overwritten.
        status, _summary, stderr = export(env, third, today, archive)
        assert status == 2 and "exists already" in stderr


def test_without_a_database_it_is_one_line_and_its_exit_status(tmp_path: Path) -> None:
    """No SUBSIDY_PG_DSN and nothing recorded: a usage error (2); a PostgreSQL that does not
    answer: one line, exit status 3; nothing is written either way."""
    environ = {name: value for name, value in os.environ.items() if name != "SUBSIDY_PG_DSN"}
    command = [sys.executable, "-c", "from server.ctl import main; main()", "audit", "export"]
    arguments = ["--from", "2026-03-01", "--to", "2026-03-01", "--out", str(tmp_path / "a")]
    missing = subprocess.run(
        [*command, *arguments], cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "SUBSIDY_PG_DSN is not set" in missing.stderr, missing.stderr
    down = subprocess.run(
        [*command, *arguments],
        cwd=tmp_path,
        env={**environ, "SUBSIDY_PG_DSN": "postgresql://audit@127.0.0.1:1/none"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 3, down.stderr
    assert len(down.stderr.strip().splitlines()) == 1 and "PostgreSQL" in down.stderr, down.stderr
    backwards = subprocess.run(
        [*command, "--from", "2026-03-02", "--to", "2026-03-01", "--out", str(tmp_path / "b")],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert backwards.returncode == 2 and "before --from" in backwards.stderr, backwards.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
