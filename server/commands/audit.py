"""The audit archive (issue 12, section 4): ``subsidyctl audit export --from D --to D --out PATH``.

Writes, for the business days D..D (the report calendar, SUBSIDY_REPORT_TIMEZONE), a
self-contained archive: a directory, or a .zip of the same files when PATH ends in ``.zip``:

- ``ledger_entries.jsonl``: each campaign's chain over the days (a contiguous run of entries,
  in sequence order), every column, ``occurred_ms`` as hashed;
- ``ledger_events.jsonl``: the events of those entries and of those days, with their payloads;
- ``operator_actions.jsonl``: who changed what (campaigns, rules, budgets, merchants...), when;
- ``daily_reports.jsonl``, ``daily_report_budgets.jsonl``, ``daily_report_rows.jsonl``: the
  published T+1 reports of those days (when the database has the reports' tables);
- ``verify.py``: the verification script (standard library only; server/commands/audit_verify.py)
  and ``README.txt``;
- ``manifest.json``: the days' bounds, each chain's run (``first_seq``, ``prev_hash``: the hash
  before it, ``last_seq``, ``last_hash``) and the ledger's head at export, the totals per day and
  campaign summed by the database, and the SHA-256 and size of every other file.

Everything is read in one snapshot; the archive is verified by its own script before the
command answers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import asyncpg
import orjson

from server.commands import audit_verify
from server.domain.daily_report import BusinessCalendar
from server.domain.posting import GENESIS_HASH
from storage.postgres import audit_archive
from storage.postgres.ledger import to_ms

FORMAT_VERSION = 1
ENTRIES, EVENTS, ACTIONS = "ledger_entries.jsonl", "ledger_events.jsonl", "operator_actions.jsonl"
RECONCILIATION_FILES = {"runs": "reconciliation_runs.jsonl", "lines": "reconciliation_lines.jsonl"}
REPORT_FILES = {
    "daily_reports": "daily_reports.jsonl",
    "daily_report_budgets": "daily_report_budgets.jsonl",
    "daily_report_rows": "daily_report_rows.jsonl",
}
VERIFY_SCRIPT = Path(audit_verify.__file__)
README = """\
Subsidy gateway audit archive, business days {first} to {last} ({timezone}).

Verify it with any Python 3.11 or later, nothing else installed:

    python3 verify.py            (in this directory; or: python3 verify.py ARCHIVE.zip)

It prints "OK: ..." or the first break ("BREAK: ..."), and says at its top what it checks:
every file's SHA-256 (manifest.json), each campaign's hash chain recomputed entry by entry
from the hash before the first exported entry, that each event's entries post what its payload
says (debits = credits), the totals per day, the published daily reports' chain heads, and
that each bill reconciliation run's counts and net subsidy add up from its result lines.

Then compare the chain heads in manifest.json ("chains": last_seq, last_hash) with heads you
hold independently (a published daily report's chain_heads, or the live ledger).

Files (JSON Lines, one object per line, amounts in integer fen):
  {entries}  double-entry ledger lines, hash-chained per campaign
  {events}   the events (authorizations, captures, voids, expiries, refunds)
  {actions}  operator actions: who changed which rule, budget or merchant, when
  daily_report*.jsonl  the published T+1 daily reports of these days (when published)
  reconciliation_*.jsonl  bill reconciliation runs of these days (superseded ones too) and
                          their result lines (status, fen difference), when there are any
"""

Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


class _Writer:
    """One JSON Lines file, hashed as it is written."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.handle: IO[bytes] = (directory / name).open("wb")
        self.digest = hashlib.sha256()
        self.size = 0
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        data = orjson.dumps(row, option=orjson.OPT_SORT_KEYS) + b"\n"
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)
        self.rows += 1

    def close(self) -> dict[str, Any]:
        self.handle.close()
        return {"sha256": self.digest.hexdigest(), "bytes": self.size, "rows": self.rows}


def _file_entry(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


async def _drain(rows: AsyncIterator[dict[str, Any]], writer: _Writer, progress: Progress, what: str) -> None:
    async for row in rows:
        writer.write(row)
        if writer.rows % 50_000 == 0:
            progress(f"{what}: {writer.rows}")


async def export(
    connection: asyncpg.Connection,
    first: date,
    last: date,
    out: Path,
    calendar: BusinessCalendar,
    progress: Progress = _quiet,
) -> dict[str, Any]:
    """Writes the archive of business days first..last to ``out`` (a directory that must not
    exist yet, or a .zip); returns the summary (the manifest without its file list, and the
    verification's answer)."""
    if last < first:
        raise ValueError(f"--to {last} is before --from {first}")
    work, directory = _prepare(out)
    try:
        manifest = await _write_files(connection, first, last, directory, calendar, progress)
        verified = _finish(work, directory, out, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    as_zip = _is_zip(out)
    summary = {key: value for key, value in manifest.items() if key not in ("files", "days")}
    summary["files"] = {name: described["rows"] for name, described in manifest["files"].items() if "rows" in described}
    summary["archive"] = str(out)
    summary["kind"] = "zip" if as_zip else "directory"
    summary["ok"] = verified.startswith("OK")
    summary["verification"] = verified
    return summary


def _is_zip(out: Path) -> bool:
    return out.suffix.lower() == ".zip"


def _prepare(out: Path) -> tuple[Path, Path]:
    """A work directory beside ``out`` (so the final rename stays on one file system), and the
    archive's directory in it."""
    if out.exists():
        raise ValueError(f"{out} exists already: the archive is written to a new path")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".audit-", dir=out.parent))
    directory = work / (out.stem if _is_zip(out) else out.name)
    directory.mkdir()
    return work, directory


def _finish(work: Path, directory: Path, out: Path, progress: Progress) -> str:
    """Verifies the archive with its own script, then moves it (or its zip) to ``out``."""
    progress("verifying the archive with its own verify.py")
    try:
        verified = audit_verify.verify(directory)
    except audit_verify.Break as problem:
        verified = f"BREAK: {problem}"
    if _is_zip(out):
        progress(f"zipping into {out}")
        partial = work / out.name
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(directory.iterdir()):
                archive.write(path, f"{directory.name}/{path.name}")
        os.replace(partial, out)
    else:
        os.replace(directory, out)
    return verified


async def _write_files(
    connection: asyncpg.Connection,
    first: date,
    last: date,
    directory: Path,
    calendar: BusinessCalendar,
    progress: Progress,
) -> dict[str, Any]:
    days = []
    day = first
    while day <= last:
        start, end = calendar.bounds(day)
        days.append((day, start, end))
        day += timedelta(days=1)
    start, end = days[0][1], days[-1][2]
    files: dict[str, Any] = {}
    async with audit_archive.snapshot(connection):
        progress("reading the chain ranges")
        chains = await audit_archive.chain_ranges(connection, start, end)
        progress("writing ledger entries")
        writer = _Writer(directory, ENTRIES)
        try:
            for chain in chains:
                await _drain(audit_archive.entries(connection, chain), writer, progress, "ledger entries")
        finally:
            files[ENTRIES] = writer.close()
        progress(f"ledger entries: {files[ENTRIES]['rows']}; writing ledger events")
        writer = _Writer(directory, EVENTS)
        try:
            await _drain(audit_archive.events(connection, start, end, chains), writer, progress, "ledger events")
        finally:
            files[EVENTS] = writer.close()
        progress(f"ledger events: {files[EVENTS]['rows']}; summing the days")
        totals = await audit_archive.day_totals(connection, days)
        writer = _Writer(directory, ACTIONS)
        try:
            await _drain(audit_archive.operator_actions(connection, start, end), writer, progress, "operator actions")
        finally:
            files[ACTIONS] = writer.close()
        reports: dict[str, str] | None = None
        if await audit_archive.has_daily_reports(connection):
            progress("writing the published daily reports")
            for table, name in REPORT_FILES.items():
                writer = _Writer(directory, name)
                try:
                    await _drain(audit_archive.report_rows(connection, table, first, last), writer, progress, name)
                finally:
                    files[name] = writer.close()
            reports = {
                "headers": REPORT_FILES["daily_reports"],
                "budgets": REPORT_FILES["daily_report_budgets"],
                "rows": REPORT_FILES["daily_report_rows"],
            }
        reconciliation: dict[str, str] | None = None
        if await audit_archive.has_reconciliation(connection):
            progress("writing the bill reconciliation runs")
            for key, rows in (
                ("runs", audit_archive.reconciliation_runs(connection, first, last)),
                ("lines", audit_archive.reconciliation_lines(connection, first, last)),
            ):
                name = RECONCILIATION_FILES[key]
                writer = _Writer(directory, name)
                try:
                    await _drain(rows, writer, progress, name)
                finally:
                    files[name] = writer.close()
            reconciliation = dict(RECONCILIATION_FILES)
    _static_files(directory, first, last, calendar, files)
    manifest = {
        "format": "subsidy-audit-archive",
        "format_version": FORMAT_VERSION,
        "from": first.isoformat(),
        "to": last.isoformat(),
        "timezone": calendar.timezone,
        "exported_at": datetime.now(UTC).isoformat(),
        "days": [
            {
                "date": day.isoformat(),
                "start_ms": to_ms(day_start),
                "end_ms": to_ms(day_end),
            }
            for day, day_start, day_end in days
        ],
        "hash": {
            "genesis": GENESIS_HASH,
            "entry": "sha256(prev_hash|campaign_id|entry_seq|event_id|authorization_id|category|account|"
            "merchant_id|debit_fen|credit_fen|occurred_ms|event_digest)",
            "event_digest": "sha256(payload as compact JSON, keys sorted, UTF-8)",
        },
        "chains": {
            chain.campaign_id: {key: value for key, value in asdict(chain).items() if key != "campaign_id"}
            for chain in chains
        },
        "totals": totals,
        "layout": {
            "entries": ENTRIES,
            "events": EVENTS,
            "operator_actions": ACTIONS,
            "daily_reports": reports,
            "reconciliation": reconciliation,
        },
        "files": files,
    }
    _write_manifest(directory, manifest)
    return manifest


def _static_files(directory: Path, first: date, last: date, calendar: BusinessCalendar, files: dict[str, Any]) -> None:
    (directory / "verify.py").write_bytes(VERIFY_SCRIPT.read_bytes())
    (directory / "README.txt").write_text(
        README.format(
            first=first, last=last, timezone=calendar.timezone, entries=ENTRIES, events=EVENTS, actions=ACTIONS
        ),
        encoding="utf-8",
    )
    for name in ("verify.py", "README.txt"):
        files[name] = _file_entry(directory / name)


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / audit_verify.MANIFEST).write_bytes(
        orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    )
