#!/usr/bin/env python3
"""Verify a subsidy-gateway audit archive, with nothing but the Python standard library.

    python3 verify.py [ARCHIVE]        ARCHIVE: the archive's directory or .zip
                                       (default: the directory this script is in)

Prints ``OK: ...`` and each chain's head (to compare with heads held independently) and exits
0, or prints the first break (``BREAK: ...``) and exits 1
(2: the archive cannot be read at all). It checks, in this order:

1. files: every file the manifest lists has the SHA-256 and size the manifest gives;
2. chains: each campaign's ledger entries, in sequence, from the manifest's ``prev_hash`` (the
   hash of the entry before the first one exported: the genesis hash of 64 zeros when the
   chain starts in the archive) to its ``last_hash``: no sequence number missing, each entry's
   ``prev_hash`` the previous entry's hash, and each entry's hash recomputed as
   SHA-256 over ``prev_hash|campaign|seq|event_id|authorization_id|category|account|merchant|
   debit_fen|credit_fen|occurred_ms|event_digest`` (UTF-8, joined by ``|``), where
   ``event_digest`` is SHA-256 of the event's payload as compact JSON with sorted keys
   (UTF-8, not ASCII-escaped);
3. events: each event's entries post exactly what its payload says (per category, the sum of
   its lines' subsidy ``s`` from the debit account to the credit account of its type), so
   debits = credits per event, and the event's columns agree with its payload;
4. totals: per business day (the manifest's day bounds) and campaign, the number of entries,
   debits, credits, captured and refunded fen recomputed from the entries equal the manifest's
   totals (computed separately by the database at export), and debits = credits every day;
5. daily reports, when the archive has them: each report's recorded chain head, where it falls
   in the exported range, is that entry's hash; each budget line's spent balance (opening +
   captured - refunded = closing) and held balance (opening + held - captured - released =
   closing) tie out;
6. bill reconciliation, when the archive has it: each result line's difference is what its
   status says (paired: channel - ledger; in the file only: the channel's amount; in the
   ledger only: minus the ledger's), a paired line's ledger amount is its event's when the
   event is in the archive, and each run's counts per status (lines, sum of differences) and
   its channel and ledger net subsidy (payments minus refunds) add up from its lines.

The chain heads themselves are the anchor: compare the manifest's ``chains`` (``last_seq``,
``last_hash``) with a head obtained independently (a published daily report's ``chain_heads``,
or ``subsidyctl ledger verify`` on the live ledger). Whoever can rewrite every hash after an
altered entry and the manifest can forge a consistent archive, but not the published heads.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GENESIS_HASH = "0" * 64
FLOWS = {
    "AUTHORIZED": ("PENDING", "AVAILABLE"),
    "CAPTURED": ("MERCHANT_RECEIVABLE", "PENDING"),
    "VOIDED": ("AVAILABLE", "PENDING"),
    "EXPIRED": ("AVAILABLE", "PENDING"),
    "REFUNDED": ("AVAILABLE", "MERCHANT_RECEIVABLE"),
    "CLAWED_BACK": ("RECOVERED", "MERCHANT_RECEIVABLE"),
}
MANIFEST = "manifest.json"


class Break(Exception):
    """The first thing found wrong."""


class Archive:
    """The archive's files, from a directory or a .zip."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        self.prefix = ""
        if path.is_file():
            self.zip = zipfile.ZipFile(path)
            names = [name for name in self.zip.namelist() if name.endswith(MANIFEST)]
            if not names:
                raise Break(f"{path}: no {MANIFEST} in the zip")
            self.prefix = min(names, key=len)[: -len(MANIFEST)]

    def open(self, name: str) -> io.BufferedIOBase:
        if "/" in name or "\\" in name or name.startswith("."):
            raise Break(f"manifest names a file outside the archive: {name!r}")
        try:
            if self.zip is not None:
                return self.zip.open(self.prefix + name)  # type: ignore[return-value]
            return (self.path / name).open("rb")
        except (KeyError, OSError) as error:
            raise Break(f"file {name}: missing ({error})") from None

    def lines(self, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
        with self.open(name) as handle:
            for number, line in enumerate(handle, 1):
                try:
                    row = json.loads(line)
                except ValueError:
                    raise Break(f"file {name} line {number}: not JSON") from None
                if not isinstance(row, dict):
                    raise Break(f"file {name} line {number}: not a JSON object")
                yield number, row


def canonical_digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def entry_hash(entry: dict[str, Any], event_digest: str) -> str:
    material = "|".join(
        (
            str(entry["prev_hash"]),
            str(entry["campaign_id"]),
            str(entry["entry_seq"]),
            str(entry["event_id"]),
            str(entry["authorization_id"]),
            str(entry["category"]),
            str(entry["account"]),
            str(entry["merchant_id"]),
            str(entry["debit_fen"]),
            str(entry["credit_fen"]),
            str(entry["occurred_ms"]),
            event_digest,
        )
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def expected_postings(event_type: str, lines: Any) -> list[tuple[str, str, int, int]]:
    """(category, account, debit, credit) in the ledger's order: by category, debit first."""
    if event_type not in FLOWS or not isinstance(lines, list):
        raise ValueError("unknown type or no lines")
    debit_account, credit_account = FLOWS[event_type]
    sums: dict[str, int] = {}
    for line in lines:
        category, amount = line["c"], line["s"]
        if not isinstance(category, str) or not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
            raise ValueError("a line without category or subsidy")
        sums[category] = sums.get(category, 0) + amount
    result: list[tuple[str, str, int, int]] = []
    for category, amount in sorted(sums.items()):
        if amount:
            result.append((category, debit_account, amount, 0))
            result.append((category, credit_account, 0, amount))
    return result


def check_files(archive: Archive, manifest: dict[str, Any]) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise Break("manifest lists no files")
    for name, described in sorted(files.items()):
        digest, size = hashlib.sha256(), 0
        with archive.open(name) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
        if digest.hexdigest() != described.get("sha256"):
            raise Break(f"file {name}: SHA-256 {digest.hexdigest()} is not the manifest's {described.get('sha256')}")
        if size != described.get("bytes"):
            raise Break(f"file {name}: {size} bytes, the manifest says {described.get('bytes')}")


def load_events(archive: Archive, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    events: dict[str, dict[str, Any]] = {}
    name = manifest["layout"]["events"]
    for number, row in archive.lines(name):
        event_id, payload = row.get("event_id"), row.get("payload")
        where = f"file {name} line {number} (event {event_id})"
        if not isinstance(event_id, str) or not isinstance(payload, dict):
            raise Break(f"{where}: no event id or payload")
        if event_id in events:
            raise Break(f"{where}: the event appears twice")
        agreed = (
            row.get("event_type") == payload.get("type")
            and row.get("authorization_id") == payload.get("authorization_id")
            and row.get("campaign_id") == payload.get("campaign")
            and row.get("merchant_id") == payload.get("merchant")
            and row.get("amount_fen") == payload.get("amount_fen")
            and row.get("occurred_ms") == payload.get("at_ms")
        )
        if not agreed:
            raise Break(f"{where}: its columns do not agree with its payload")
        try:
            postings = expected_postings(str(payload.get("type")), payload.get("lines"))
        except (ValueError, KeyError, TypeError):
            raise Break(f"{where}: its payload has no valid type and lines") from None
        events[event_id] = {
            "digest": canonical_digest(payload),
            "postings": postings,
            "posted": [],
            "row": row,
            "where": where,
        }
    return events


def check_chains(archive: Archive, manifest: dict[str, Any], events: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Recomputes every chain; returns the entries (without hashes) for the totals."""
    chains: dict[str, Any] = manifest.get("chains") or {}
    name = manifest["layout"]["entries"]
    state: dict[str, tuple[int, str]] = {}
    kept: list[dict[str, Any]] = []
    order: list[str] = []
    for number, entry in archive.lines(name):
        campaign = entry.get("campaign_id")
        where = f"campaign {campaign} entry {entry.get('entry_seq')} (file {name} line {number})"
        if campaign not in chains:
            raise Break(f"{where}: a campaign the manifest has no chain for")
        if campaign not in state:
            if campaign in order:
                raise Break(f"{where}: the campaign's entries are not together")
            order.append(campaign)
            chain = chains[campaign]
            state[campaign] = (int(chain["first_seq"]) - 1, str(chain["prev_hash"]))
        last_seq, last_hash = state[campaign]
        if entry.get("entry_seq") != last_seq + 1:
            raise Break(f"{where}: expected entry {last_seq + 1} (an entry is missing, added or out of order)")
        if entry.get("prev_hash") != last_hash:
            raise Break(f"{where}: prev_hash is not the previous entry's hash")
        event = events.get(str(entry.get("event_id")))
        if event is None:
            raise Break(f"{where}: its event {entry.get('event_id')} is not in the archive")
        if entry_hash(entry, event["digest"]) != entry.get("entry_hash"):
            raise Break(f"{where}: the entry or its event does not match its hash (altered)")
        row = event["row"]
        if (entry.get("event_type"), entry.get("authorization_id"), entry.get("occurred_ms")) != (
            row.get("event_type"),
            row.get("authorization_id"),
            row.get("occurred_ms"),
        ) or entry.get("campaign_id") != row.get("campaign_id"):
            raise Break(f"{where}: does not agree with its event {entry.get('event_id')}")
        event["posted"].append((entry["category"], entry["account"], entry["debit_fen"], entry["credit_fen"]))
        state[campaign] = (int(entry["entry_seq"]), str(entry["entry_hash"]))
        kept.append(
            {
                "campaign_id": campaign,
                "entry_seq": entry["entry_seq"],
                "account": entry["account"],
                "event_type": entry["event_type"],
                "debit_fen": entry["debit_fen"],
                "credit_fen": entry["credit_fen"],
                "occurred_ms": entry["occurred_ms"],
                "entry_hash": entry["entry_hash"],
            }
        )
    for campaign, chain in sorted(chains.items()):
        last_seq, last_hash = state.get(campaign, (int(chain["first_seq"]) - 1, str(chain["prev_hash"])))
        if (last_seq, last_hash) != (chain["last_seq"], chain["last_hash"]):
            raise Break(
                f"campaign {campaign}: the chain ends at entry {last_seq}, the manifest's head is entry"
                f" {chain['last_seq']} {chain['last_hash']} (entries missing at the end, or the head altered)"
            )
    return kept


def check_events(events: dict[str, dict[str, Any]]) -> None:
    for event in events.values():
        posted = event["posted"]
        if posted and sum(item[2] for item in posted) != sum(item[3] for item in posted):
            raise Break(f"{event['where']}: debits do not equal credits")
        if posted != event["postings"]:
            raise Break(f"{event['where']}: its entries are not the postings its payload calls for")


def check_totals(manifest: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    days = [(day["date"], int(day["start_ms"]), int(day["end_ms"])) for day in manifest["days"]]
    totals: dict[str, dict[str, dict[str, int]]] = {}
    for entry in entries:
        for day, start, end in days:
            if start <= entry["occurred_ms"] < end:
                figures = totals.setdefault(day, {}).setdefault(
                    entry["campaign_id"],
                    {"entries": 0, "debit_fen": 0, "credit_fen": 0, "captured_fen": 0, "refunded_fen": 0},
                )
                figures["entries"] += 1
                figures["debit_fen"] += entry["debit_fen"]
                figures["credit_fen"] += entry["credit_fen"]
                if entry["account"] == "MERCHANT_RECEIVABLE":
                    figures["captured_fen"] += entry["debit_fen"]
                    # A claw-back's credit is counted apart, and only when there is one.
                    name = "clawed_back_fen" if entry.get("event_type") == "CLAWED_BACK" else "refunded_fen"
                    figures[name] = figures.get(name, 0) + entry["credit_fen"]
                break
    expected: dict[str, Any] = manifest.get("totals") or {}
    for day, _start, _end in days:
        mine, theirs = totals.get(day, {}), expected.get(day, {})
        for campaign in sorted(set(mine) | set(theirs)):
            if mine.get(campaign) != theirs.get(campaign):
                raise Break(
                    f"totals of {day} campaign {campaign}: the entries add up to {mine.get(campaign)},"
                    f" the manifest says {theirs.get(campaign)}"
                )
        debits = sum(figures["debit_fen"] for figures in mine.values())
        credits = sum(figures["credit_fen"] for figures in mine.values())
        if debits != credits:
            raise Break(f"totals of {day}: debits {debits} fen, credits {credits} fen")


def check_reports(archive: Archive, manifest: dict[str, Any], entries: list[dict[str, Any]]) -> int:
    names = manifest["layout"].get("daily_reports")
    if not names:
        return 0
    hashes = {(entry["campaign_id"], entry["entry_seq"]): entry["entry_hash"] for entry in entries}
    chains: dict[str, Any] = manifest.get("chains") or {}
    reports = 0
    for _number, header in archive.lines(names["headers"]):
        reports += 1
        for campaign, head in sorted((header.get("chain_heads") or {}).items()):
            seq = head.get("seq")
            chain = chains.get(campaign)
            if chain is None or not chain["first_seq"] <= seq <= chain["last_seq"]:
                continue
            if hashes.get((campaign, seq)) != head.get("hash"):
                raise Break(
                    f"daily report {header.get('business_date')}: its chain head of campaign {campaign}"
                    f" (entry {seq}) is not that entry's hash in the archive"
                )
    for number, line in archive.lines(names["budgets"]):
        # Format-2 reports carry claw-backs (absent, 0, in format 1).
        spent = line["opening_spent_fen"] + line["captured_fen"] - line["refunded_fen"] - line.get("clawed_back_fen", 0)
        held = line["opening_held_fen"] + line["held_fen"] - line["captured_fen"] - line["released_hold_fen"]
        if spent != line["closing_spent_fen"] or held != line["closing_held_fen"]:
            raise Break(
                f"daily report {line.get('business_date')} budget {line.get('campaign_id')}/{line.get('category')}"
                f" (file {names['budgets']} line {number}): opening + movements is not the closing balance"
            )
    return reports


def _line_break(names: dict[str, str], number: int, line: dict[str, Any], what: str) -> Break:
    return Break(f"reconciliation run {line.get('run_id')} ({names['lines']} line {number}): {what}")


def check_reconciliation(archive: Archive, manifest: dict[str, Any], events: dict[str, dict[str, Any]]) -> int:
    names = manifest["layout"].get("reconciliation")
    if not names:
        return 0
    sums: dict[str, dict[str, Any]] = {}
    for number, line in archive.lines(names["lines"]):
        status = line["status"]
        channel, ledger = line["channel_subsidy_fen"], line["ledger_subsidy_fen"]
        expected = {
            "MATCHED": channel - ledger,
            "AMOUNT_MISMATCH": channel - ledger,
            "MISSING_IN_LEDGER": channel,
            "DUPLICATE_IN_FILE": channel,
            "MISSING_IN_CHANNEL": -ledger,
            "BAD_LINE": 0,
        }.get(status)
        if expected is None:
            raise _line_break(names, number, line, f"unknown status {status!r}")
        if line["difference_fen"] != expected or (status == "MATCHED" and expected != 0):
            raise _line_break(names, number, line, f"difference {line['difference_fen']} fen is not what {status} says")
        event = events.get(line["ledger_event_id"]) if line["ledger_event_id"] else None
        if event is not None and status in ("MATCHED", "AMOUNT_MISMATCH", "MISSING_IN_CHANNEL"):
            if event["row"]["amount_fen"] != ledger:
                raise _line_break(
                    names, number, line, f"ledger amount {ledger} fen, its event says {event['row']['amount_fen']}"
                )
        run = sums.setdefault(line["run_id"], {"counts": {}, "channel": 0, "ledger": 0})
        count = run["counts"].setdefault(status, [0, 0])
        count[0] += 1
        count[1] += line["difference_fen"]
        sign = -1 if line["kind"] == "REFUND" else 1
        if status in ("MATCHED", "AMOUNT_MISMATCH", "MISSING_IN_LEDGER"):
            run["channel"] += sign * channel
        if status in ("MATCHED", "AMOUNT_MISMATCH", "MISSING_IN_CHANNEL"):
            run["ledger"] += sign * ledger
    runs = 0
    for number, run in archive.lines(names["runs"]):
        runs += 1
        found = sums.pop(run["run_id"], {"counts": {}, "channel": 0, "ledger": 0})
        where = f"reconciliation run {run['run_id']} ({names['runs']} line {number})"
        if found["counts"] != run["counts"]:
            raise Break(f"{where}: its counts are not those of its lines")
        if (found["channel"], found["ledger"]) != (run["channel_net_subsidy_fen"], run["ledger_net_subsidy_fen"]):
            raise Break(f"{where}: its net subsidy is not that of its lines")
    if sums:
        raise Break(f"{names['lines']}: lines of a run not in {names['runs']}: {sorted(sums)[0]}")
    return runs


def verify(path: Path) -> str:
    """Returns the OK line; raises Break at the first break."""
    archive = Archive(path)
    with archive.open(MANIFEST) as handle:
        try:
            manifest = json.load(handle)
        except ValueError:
            raise Break(f"{MANIFEST}: not JSON") from None
    if manifest.get("format") != "subsidy-audit-archive":
        raise Break(f"{MANIFEST}: not a subsidy audit archive manifest")
    check_files(archive, manifest)
    events = load_events(archive, manifest)
    entries = check_chains(archive, manifest, events)
    check_events(events)
    check_totals(manifest, entries)
    reports = check_reports(archive, manifest, entries)
    runs = check_reconciliation(archive, manifest, events)
    debits = sum(entry["debit_fen"] for entry in entries)
    heads = [
        f"  chain {campaign}: entries {chain['first_seq']}..{chain['last_seq']}, head {chain['last_hash']}"
        for campaign, chain in sorted(manifest["chains"].items())
    ]
    return "\n".join(
        [
            f"OK: {manifest['from']}..{manifest['to']}: {len(manifest['files'])} files, {len(manifest['chains'])}"
            f" chains, {len(entries)} entries, {len(events)} events, debits = credits = {debits} fen,"
            f" {reports} daily reports, {runs} reconciliation runs; compare these heads with ones held"
            " independently:",
            *heads,
        ]
    )


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[0]) if argv else Path(__file__).resolve().parent
    try:
        print(verify(path))
    except Break as problem:
        print(f"BREAK: {problem}")
        return 1
    except (OSError, zipfile.BadZipFile, KeyError, TypeError, ValueError) as error:
        print(f"BREAK: the archive is malformed: {type(error).__name__}: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
