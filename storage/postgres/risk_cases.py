"""Risk cases in PostgreSQL (issue 14, section 2; table of migration 0014): findings of the
offline detectors (storage/postgres/risk.py) stored once per (detector, subject, window), and
the risk team's work on them.

Every change of a case (created by a detection run, assigned, moved to REVIEWING, CONFIRMED or
DISMISSED) is recorded in the operator audit trail (``operator_actions`` through
storage/postgres/actions.py ``record``) in the same transaction as the change, with the
operator's request id: a retried call with the same request id changes nothing and answers
the case as it stands; the same request id with another payload is IdempotencyConflict. A move
the case's state does not allow raises InvalidCaseTransition (FAILED_PRECONDITION,
INVALID_STATE) and writes nothing, not even the audit row.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from server.domain.errors import NotFound
from server.domain.risk_detection import (
    CASE_STATES,
    CLOSED_CASE_STATES,
    DISMISSED,
    REVIEWING,
    Finding,
    InvalidCaseTransition,
    check_case_transition,
)
from storage.postgres.actions import Action, Scope, record
from storage.postgres.risk import Window

COLUMNS = (
    "case_id, detector, subject_kind, subject_id, window_start, window_end, score, evidence, state, assignee,"
    " note, detected_by, created_at, updated_at"
)
LIST_LIMIT_MAX = 1_000


@dataclass(frozen=True)
class RiskCase:
    case_id: int
    detector: str
    subject_kind: str
    subject_id: str
    window_start: datetime
    window_end: datetime
    score: float
    evidence: dict[str, Any]
    state: str
    assignee: str
    note: str
    detected_by: str
    created_at: datetime
    updated_at: datetime

    def summary(self) -> dict[str, Any]:
        return {
            "case": self.case_id,
            "state": self.state,
            "detector": self.detector,
            "subject": f"{self.subject_kind.lower()}:{self.subject_id}",
            "score": self.score,
            "window": f"{self.window_start.isoformat()} .. {self.window_end.isoformat()}",
            "assignee": self.assignee or "-",
        }

    def document(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "note": self.note,
            "detected_by": self.detected_by,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "evidence": self.evidence,
        }


def _case(record_: asyncpg.Record) -> RiskCase:
    values = dict(record_)
    evidence = values["evidence"]
    values["evidence"] = orjson.loads(evidence) if isinstance(evidence, str | bytes) else evidence
    return RiskCase(**values)


def _scope(finding: Finding) -> str:
    """What distinguishes two findings of one detector on one subject in one window."""
    return "|".join(str(finding.evidence.get(key, "")) for key in ("campaign_id", "category"))


@dataclass(frozen=True)
class Recorded:
    created: list[int]
    already: int  # findings whose case existed from an earlier run over the same window


async def record_findings(
    connection: asyncpg.Connection, window: Window, findings: Mapping[str, Sequence[Finding]], detected_by: str
) -> Recorded:
    """One case per finding not yet a case, in one transaction; the run itself is an audited
    action of ``detected_by`` (an operator, or the scheduler)."""
    created: list[int] = []
    already = 0
    async with connection.transaction():
        for found in findings.values():
            for finding in found:
                case_id = await connection.fetchval(
                    "INSERT INTO risk_cases (detector, subject_kind, subject_id, window_start, window_end, score,"
                    " evidence, dedup_key, detected_by) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9)"
                    " ON CONFLICT (dedup_key) DO NOTHING RETURNING case_id",
                    finding.detector,
                    finding.subject_kind,
                    finding.subject_id,
                    window.start,
                    window.end,
                    finding.score,
                    orjson.dumps(finding.evidence).decode(),
                    finding.dedup_key(window.start, window.end, _scope(finding)),
                    detected_by,
                )
                if case_id is None:
                    already += 1
                else:
                    created.append(case_id)
        details = {
            "window_start": window.start.isoformat(),
            "window_end": window.end.isoformat(),
            "found": {name: len(found) for name, found in findings.items()},
            "created": created,
        }
        request_id = str(uuid.uuid4())  # each run is its own action
        await _audit(
            connection, detected_by, request_id, "risk.detect", "RISK_WINDOW", window.start.isoformat(), details
        )
    return Recorded(created, already)


async def _audit(
    connection: asyncpg.Connection,
    operator_id: str,
    request_id: str,
    action: str,
    target_kind: str,
    target_id: str,
    details: dict[str, Any],
) -> bool:
    """Records the action; False when this (operator, request id) already did exactly this."""
    payload_hash = hashlib.sha256(orjson.dumps([action, target_id, details], option=orjson.OPT_SORT_KEYS)).hexdigest()
    audited = Action(operator_id, request_id, action, target_kind, target_id, payload_hash)
    return await record(connection, audited, details, Scope()) is not None


async def get(connection: asyncpg.Connection, case_id: int) -> RiskCase:
    found = await connection.fetchrow(f"SELECT {COLUMNS} FROM risk_cases WHERE case_id = $1", case_id)
    if found is None:
        raise NotFound("risk case", str(case_id))
    return _case(found)


async def list_cases(
    connection: asyncpg.Connection,
    state: str | None = None,
    detector: str | None = None,
    assignee: str | None = None,
    limit: int = 100,
) -> list[RiskCase]:
    if state is not None and state not in CASE_STATES:
        raise ValueError(f"unknown case state {state}")
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise ValueError(f"limit must be 1 to {LIST_LIMIT_MAX}")
    rows = await connection.fetch(
        f"SELECT {COLUMNS} FROM risk_cases WHERE ($1::text IS NULL OR state = $1)"
        " AND ($2::text IS NULL OR detector = $2) AND ($3::text IS NULL OR assignee = $3)"
        " ORDER BY case_id DESC LIMIT $4",
        state,
        detector,
        assignee,
        limit,
    )
    return [_case(row) for row in rows]


async def _locked(connection: asyncpg.Connection, case_id: int) -> RiskCase:
    found = await connection.fetchrow(f"SELECT {COLUMNS} FROM risk_cases WHERE case_id = $1 FOR UPDATE", case_id)
    if found is None:
        raise NotFound("risk case", str(case_id))
    return _case(found)


async def assign(
    connection: asyncpg.Connection, case_id: int, assignee: str, operator_id: str, request_id: str
) -> RiskCase:
    """Gives an open case to ``assignee``; a closed case cannot be reassigned."""
    async with connection.transaction():
        case = await _locked(connection, case_id)
        details = {"assignee": assignee}
        if not await _audit(connection, operator_id, request_id, "risk.assign", "RISK_CASE", str(case_id), details):
            return case
        if case.state in CLOSED_CASE_STATES:
            raise InvalidCaseTransition(case.state, case.state)
        await connection.execute(
            "UPDATE risk_cases SET assignee = $2, updated_at = now() WHERE case_id = $1", case_id, assignee
        )
    return await get(connection, case_id)


async def move(
    connection: asyncpg.Connection, case_id: int, to_state: str, note: str, operator_id: str, request_id: str
) -> RiskCase:
    """Moves the case (REVIEWING: taken by ``operator_id`` when nobody has it; CONFIRMED /
    DISMISSED: with the reviewer's note)."""
    if len(note) > 2_000:
        raise ValueError("a note is at most 2,000 characters")
    async with connection.transaction():
        case = await _locked(connection, case_id)
        details = {"to_state": to_state, "note": note}
        action = f"risk.{to_state.lower()}"
        if not await _audit(connection, operator_id, request_id, action, "RISK_CASE", str(case_id), details):
            return case
        check_case_transition(case.state, to_state)
        assignee = case.assignee or (operator_id if to_state in (REVIEWING, DISMISSED) else "")
        await connection.execute(
            "UPDATE risk_cases SET state = $2, note = CASE WHEN $3 = '' THEN note ELSE $3 END, assignee = $4,"
            " updated_at = now() WHERE case_id = $1",
            case_id,
            to_state,
            note,
            assignee,
        )
    return await get(connection, case_id)


@dataclass(frozen=True)
class ClawBack:
    """A CLAWED_BACK ledger event of a case."""

    authorization_id: str
    merchant_id: str
    line_ids: list[str]
    clawed_back_fen: int
    operator_id: str
    clawed_back_at: datetime

    def document(self) -> dict[str, Any]:
        return {
            "authorization": self.authorization_id,
            "merchant": self.merchant_id,
            "lines": self.line_ids,
            "clawed_back_fen": self.clawed_back_fen,
            "operator": self.operator_id,
            "at": self.clawed_back_at.isoformat(),
        }


async def clawbacks(connection: asyncpg.Connection, case_id: int) -> list[ClawBack]:
    """The case's claw-backs from the ledger (index ledger_events_risk_case, migration 0022)."""
    rows = await connection.fetch(
        "SELECT authorization_id, merchant_id, terminal_id, amount_fen, lines, occurred_at FROM ledger_events"
        " WHERE event_type = 'CLAWED_BACK' AND payload->>'risk_case' = $1 ORDER BY event_ms, event_seq",
        str(case_id),
    )
    return [
        ClawBack(
            authorization_id=row["authorization_id"],
            merchant_id=row["merchant_id"],
            line_ids=[line["l"] for line in orjson.loads(row["lines"])],
            clawed_back_fen=int(row["amount_fen"]),
            operator_id=row["terminal_id"].removeprefix("operator:"),
            clawed_back_at=row["occurred_at"],
        )
        for row in rows
    ]


async def request_taken(connection: asyncpg.Connection, operator_id: str, request_id: str, case_id: int) -> bool:
    """Whether the operator's request id already acted as something other than a claw-back on
    this case: checked before a claw-back moves money, so that a request id reused for another
    action is refused (IdempotencyConflict) before the money moves, not after."""
    found = await connection.fetchrow(
        "SELECT action, target_id FROM operator_actions WHERE operator_id = $1 AND request_id = $2",
        operator_id,
        request_id,
    )
    return found is not None and (found["action"], found["target_id"]) != ("risk.clawback", str(case_id))


async def audit_clawback(
    connection: asyncpg.Connection, operator_id: str, request_id: str, case_id: int, details: dict[str, Any]
) -> bool:
    """Records a claw-back on ``case_id`` (the money moved through clawback.lua and the ledger;
    this is who did it and why); False when this request id recorded it already."""
    return await _audit(connection, operator_id, request_id, "risk.clawback", "RISK_CASE", str(case_id), details)
