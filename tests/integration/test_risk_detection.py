"""Offline risk detectors (issue 14, section 2) over a real PostgreSQL ledger.

Two ledgers are built through the ledger writer's own ``write_batch``: a clean one (a simulated
day, server/domain/ledger_sim.py, of ordinary sales, voids, expiries and refunds at 30 merchants
whose stores are spread over the district, plus voucher refunds made inside the voucher's
validity) and the same day with one planted pattern per detector. Each detector finds nothing
on the clean ledger and exactly the planted subject on the other.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import yaml
from click.testing import CliRunner, Result
from redis.asyncio import Redis
from subsidy_client import RetryPolicy, SignedClient
from subsidy_client.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from subsidy_client.v1 import risk_pb2

from server.ctl import main as subsidyctl
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from server.domain.risk_detection import (
    BURST_MIN_CONSUMERS,
    CAPPED_SHARE,
    CONFIRMED,
    DETECTORS,
    DISMISSED,
    IMPOSSIBLE_TRAVEL,
    LATE_REFUND,
    REVIEWING,
    TERMINAL_BURST,
    THRESHOLD_CLUSTER,
    Finding,
)
from server.processes.report_scheduler import ReportScheduler
from storage.devenv import Services
from storage.postgres import daily_reports, risk, risk_cases
from tests.conftest import REFERENCE_FILE, Environment, isolated_environment, load_document, running_gateway

DAY_START = datetime(2026, 3, 1, 16, 0, tzinfo=UTC)  # 2026-03-02 00:00 in Shanghai
WINDOW = risk.Window(DAY_START, DAY_START + timedelta(days=1))
TRADEIN_CAP_FEN = 150_000
VOUCHER_THRESHOLD_FEN = 8_000
CAMPAIGNS = (
    SimCampaign("r-tradein", ("fridge",), rate_bp=2000, cap_fen=TRADEIN_CAP_FEN),
    SimCampaign("r-voucher", ("general",), rate_bp=1000, cap_fen=2_000),
)
SIM_MERCHANTS = tuple(f"m-{index:03d}" for index in range(30))
PLANTED_MERCHANTS = ("m-capper", "m-padder", "m-broker", "m-late", "m-ontime")
# Xiaoshan's centre; stores within about 15 km of it.
CENTRE = (30.185, 120.264)


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@dataclass
class Ledger:
    """Planted events, shaped like the Lua scripts' (and ledger_sim's)."""

    events: list[tuple[str, dict[str, Any]]]
    sequence: int = 0

    def _event(self, kind: str, auth: dict[str, Any], at: datetime, amount: int, qualification: str) -> None:
        self.sequence += 1
        at_ms = ms(at)
        payload = {
            "type": kind,
            "authorization_id": auth["id"],
            "campaign": auth["campaign"],
            "merchant": auth["merchant"],
            "terminal": auth["terminal"],
            "authorization_terminal": auth["terminal"],
            "consumer": auth["consumer"],
            "request_id": f"req{self.sequence:029d}",
            "payload_hash": "",
            "amount_fen": amount,
            "at_ms": at_ms,
            "lines": [dict(line) for line in auth["lines"]],
            "state": {"AUTHORIZED": "PENDING", "CAPTURED": "CAPTURED", "REFUNDED": "REFUNDED"}[kind],
            "channel": 1,
            "total_fen": sum(line["p"] for line in auth["lines"]),
            "subsidy_fen": amount,
            "refunded_fen": amount if kind == "REFUNDED" else 0,
            "created_ms": auth["created_ms"],
            "expires_ms": auth["created_ms"] + 900_000,
            "all_lines": [dict(line) for line in auth["lines"]],
            "qualification": qualification,
        }
        # Sequence numbers far above the simulator's keep the stream ids unique.
        self.events.append((f"{at_ms}-{1_000 + self.sequence}", payload))

    def sale(
        self,
        merchant: str,
        consumer: str,
        at: datetime,
        campaign: str,
        category: str,
        price_fen: int,
        subsidy_fen: int,
        terminal: str = "",
        qualification: str = "",
    ) -> dict[str, Any]:
        auth = {
            "id": f"auth-{self.sequence + 1:08d}-{merchant}",
            "campaign": campaign,
            "merchant": merchant,
            "terminal": terminal or f"{merchant}-t1",
            "consumer": consumer,
            "created_ms": ms(at),
            "lines": [
                {"l": "1", "g": "6901234000016", "c": category, "p": price_fen, "s": subsidy_fen, "sn": "", "r": 0}
            ],
        }
        self._event("AUTHORIZED", auth, at, subsidy_fen, qualification)
        self._event("CAPTURED", auth, at + timedelta(seconds=5), subsidy_fen, qualification)
        return auth

    def refund(self, auth: dict[str, Any], at: datetime, qualification: str) -> None:
        auth["lines"][0]["r"] = 1
        self._event("REFUNDED", auth, at, auth["lines"][0]["s"], qualification)


def consumer(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def code(index: int) -> str:
    return f"VQ{index:014d}"


async def reference(connection: asyncpg.Connection) -> None:
    """Campaigns with a capped PERCENT rule and a FIXED voucher rule; merchants, stores (spread
    over the district) and terminals."""
    rng = random.Random(3)
    await connection.execute(
        "INSERT INTO campaigns (campaign_id, name, status, starts_at, ends_at)"
        " VALUES ('r-tradein', 'trade-in', 'ACTIVE', '2026-01-01', '2027-01-01'),"
        " ('r-voucher', 'vouchers', 'ACTIVE', '2026-01-01', '2027-01-01')"
    )
    await connection.execute(
        "INSERT INTO campaign_rules (campaign_id, category, kind, rates_bp, cap_fen, threshold_fen, off_fen,"
        " per_person_limit, budget_fen) VALUES"
        " ('r-tradein', 'fridge', 'PERCENT', '{\"0\": 2000}', $1, 0, 0, 1, 900000000000),"
        " ('r-voucher', 'general', 'FIXED', '{}', 0, $2, 2000, 2, 900000000000)",
        TRADEIN_CAP_FEN,
        VOUCHER_THRESHOLD_FEN,
    )
    for merchant in (*SIM_MERCHANTS, *PLANTED_MERCHANTS):
        await connection.execute(
            "INSERT INTO merchants (merchant_id, name, licence_number, status) VALUES ($1, $1, 'L', 'ACTIVE')", merchant
        )
        await store(
            connection,
            merchant,
            f"{merchant}-t1",
            CENTRE[0] + rng.uniform(-0.12, 0.12),
            CENTRE[1] + rng.uniform(-0.12, 0.12),
        )


async def store(
    connection: asyncpg.Connection, merchant: str, terminal: str, latitude: float, longitude: float
) -> None:
    await connection.execute(
        "INSERT INTO stores (store_id, merchant_id, kind, name, latitude, longitude)"
        " VALUES ($1, $2, 'PHYSICAL', $1, $3, $4)",
        f"s-{terminal}",
        merchant,
        latitude,
        longitude,
    )
    await connection.execute(
        "INSERT INTO terminals (terminal_id, merchant_id, status, secret, store_id) VALUES ($1, $2, 'ACTIVE', 'x', $3)",
        terminal,
        merchant,
        f"s-{terminal}",
    )


async def qualification(connection: asyncpg.Connection, redemption_code: str, owner: str, expires_at: datetime) -> None:
    await connection.execute(
        "INSERT INTO qualifications (redemption_code, state, campaign_id, category, consumer_key, partner_id,"
        " issued_at, expires_at, updated_at, authorization_id, refund_policy, masked_id_number,"
        " masked_phone_number, location_cell, request_id, last_event_ms, last_event_seq)"
        " VALUES ($1, 'REDEEMED', 'r-voucher', 'general', $2, 'p', $3, $4, $4, '', 'COUNT_AS_USED',"
        " '', '', '', 'r', 0, 0)",
        redemption_code,
        owner,
        expires_at - timedelta(days=7),
        expires_at,
    )


async def clean_day(connection: asyncpg.Connection) -> None:
    """The simulated day, and voucher refunds inside validity at m-ontime (not late)."""
    settings = SimSettings(campaigns=CAMPAIGNS, merchants=SIM_MERCHANTS, seed=11, refund_share=0.1)
    # The simulator's lazily sorted uniform moments bunch up in the last minutes of its range
    # (21 captures in 5 minutes at the busiest merchant, a burst by this detector's measure), so
    # the range runs two hours past the window and events after the window are left out.
    events = list(simulate(settings, ms(DAY_START), ms(WINDOW.end + timedelta(hours=2)), 3_250, ms(WINDOW.end)))
    ledger = Ledger([])
    for index in range(6):
        owner = consumer(f"ontime{index}")
        at = DAY_START + timedelta(hours=2 + index)
        await qualification(connection, code(100 + index), owner, at + timedelta(hours=6))
        auth = ledger.sale(
            "m-ontime", owner, at, "r-voucher", "general", 25_000, 2_000, qualification=code(100 + index)
        )
        ledger.refund(auth, at + timedelta(hours=3), code(100 + index))
    await daily_reports.write_simulated(connection, sorted(events + ledger.events, key=stamp_order), batch=1_000)


def stamp_order(item: tuple[str, dict[str, Any]]) -> tuple[int, int]:
    at_ms, seq = item[0].split("-")
    return int(at_ms), int(seq)


async def planted(connection: asyncpg.Connection) -> None:
    """One pattern per detector, on top of the clean day."""
    ledger = Ledger([])
    # CAPPED_SHARE: 40 trade-in sales at m-capper, every one at the cap.
    for index in range(40):
        ledger.sale(
            "m-capper",
            consumer(f"cap{index}"),
            DAY_START + timedelta(minutes=20 * index + 7),
            "r-tradein",
            "fridge",
            760_000 + index * 100,
            TRADEIN_CAP_FEN,
        )
    # THRESHOLD_CLUSTER: 40 voucher sales at m-padder, 30 of them priced 80.00 to 83.00 yuan.
    for index in range(40):
        price = VOUCHER_THRESHOLD_FEN + index * 10 if index < 30 else 45_000 + index * 100
        ledger.sale(
            "m-padder",
            consumer(f"pad{index}"),
            DAY_START + timedelta(minutes=20 * index + 11),
            "r-voucher",
            "general",
            price,
            2_000,
        )
    # TERMINAL_BURST: a broker redeems 12 consumers' vouchers at one terminal, 20 s apart.
    burst_start = DAY_START + timedelta(hours=10)
    for index in range(BURST_MIN_CONSUMERS + 2):
        ledger.sale(
            "m-broker",
            consumer(f"broker{index}"),
            burst_start + timedelta(seconds=20 * index),
            "r-voucher",
            "general",
            30_000 + index * 1_000,
            2_000,
        )
    # IMPOSSIBLE_TRAVEL: one consumer at three stores about 20 km apart, 6 minutes between sales.
    traveller = consumer("traveller")
    spots = ((30.33, 120.26, "m-000"), (30.15, 120.30, "m-001"), (30.30, 120.45, "m-002"))
    for index, (latitude, longitude, merchant) in enumerate(spots):
        terminal = f"{merchant}-far"
        await store(connection, merchant, terminal, latitude, longitude)
        ledger.sale(
            merchant,
            traveller,
            DAY_START + timedelta(hours=14, minutes=6 * index),
            "r-voucher",
            "general",
            50_000,
            2_000,
            terminal=terminal,
        )
    # LATE_REFUND: four voucher sales at m-late refunded within hours after the voucher expired.
    for index in range(4):
        owner = consumer(f"late{index}")
        expires = DAY_START + timedelta(hours=3 + index)
        await qualification(connection, code(index), owner, expires)
        auth = ledger.sale(
            "m-late",
            owner,
            expires - timedelta(hours=1),
            "r-voucher",
            "general",
            20_000,
            2_000,
            qualification=code(index),
        )
        ledger.refund(auth, expires + timedelta(hours=2), code(index))
    await daily_reports.write_simulated(connection, sorted(ledger.events, key=stamp_order), batch=1_000)


@pytest.fixture(scope="module")
async def clean(services: Services) -> AsyncIterator[asyncpg.Connection]:
    async with isolated_environment(services) as env:
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            await reference(connection)
            await clean_day(connection)
            yield connection
        finally:
            await connection.close()


@pytest.fixture(scope="module")
async def dirty_world(services: Services) -> AsyncIterator[tuple[Environment, asyncpg.Connection]]:
    async with isolated_environment(services) as env:
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            await reference(connection)
            await clean_day(connection)
            await planted(connection)
            yield env, connection
        finally:
            await connection.close()


@pytest.fixture
def dirty(dirty_world: tuple[Environment, asyncpg.Connection]) -> asyncpg.Connection:
    return dirty_world[1]


def subjects(findings: list[Finding]) -> set[str]:
    return {finding.subject_id for finding in findings}


async def test_the_clean_ledger_has_no_findings(clean: asyncpg.Connection) -> None:
    """A day of ordinary sales, refunds inside validity and stores spread over the district:
    no detector flags anything (its thresholds are not met by chance)."""
    results = await risk.detect(clean, WINDOW)
    assert set(results) == set(DETECTORS)
    assert {name: subjects(found) for name, found in results.items()} == {name: set() for name in DETECTORS}
    # The clean day is not empty: the share detectors had figures to judge.
    lines = await clean.fetchval("SELECT count(*) FROM ledger_events WHERE event_type = 'CAPTURED'")
    assert lines > 1_500


@pytest.mark.parametrize(
    ("detector", "subject"),
    [
        (CAPPED_SHARE, "m-capper"),
        (THRESHOLD_CLUSTER, "m-padder"),
        (TERMINAL_BURST, "m-broker-t1"),
        (IMPOSSIBLE_TRAVEL, consumer("traveller")),
        (LATE_REFUND, "m-late"),
    ],
)
async def test_each_detector_finds_its_planted_pattern_and_nothing_else(
    dirty: asyncpg.Connection, detector: str, subject: str
) -> None:
    """With one pattern planted per detector, each detector finds exactly its own subject (the
    clean merchants, m-ontime's in-validity refunds and the other patterns' subjects stay out)."""
    results = await risk.detect(dirty, WINDOW, (detector,))
    assert subjects(results[detector]) == {subject}


async def test_evidence_names_the_figures(dirty: asyncpg.Connection) -> None:
    """Each finding carries the figures a reviewer needs, and stays outside a window that does
    not hold the pattern (the day before)."""
    results = await risk.detect(dirty, WINDOW)
    capped = results[CAPPED_SHARE][0].evidence
    assert capped["lines"] == 40 and capped["hits"] == 40 and capped["share"] == 1.0
    assert capped["category_norm"] < 0.5
    burst = results[TERMINAL_BURST][0].evidence
    assert burst["distinct_consumers"] == BURST_MIN_CONSUMERS + 2 and burst["sales"] == BURST_MIN_CONSUMERS + 2
    travel = results[IMPOSSIBLE_TRAVEL][0].evidence
    assert travel["impossible_hops"] == 2 and travel["merchants"] == ["m-000", "m-001", "m-002"]
    assert all(hop["speed_kmh"] > 80 for hop in travel["hops"])
    late = results[LATE_REFUND][0].evidence
    assert late["late_refunds"] == 4 and len(late["refunds"]) == 4
    before = risk.Window(WINDOW.start - timedelta(days=1), WINDOW.start)
    assert all(not found for found in (await risk.detect(dirty, before)).values())


async def invoke(env: Environment, *arguments: str) -> Result:
    """subsidyctl runs its own event loop; run it in a thread so this test's loop keeps serving."""
    environ = {
        "SUBSIDY_PG_DSN": env.pg_dsn,
        "SUBSIDY_REDIS_URL": env.redis_url,
        "SUBSIDY_REPORT_TIMEZONE": "Asia/Shanghai",
    }
    return await asyncio.to_thread(CliRunner().invoke, subsidyctl, list(arguments), env=environ)


async def audit_rows(connection: asyncpg.Connection, case_id: int) -> list[str]:
    rows = await connection.fetch(
        "SELECT action FROM operator_actions WHERE target_kind = 'RISK_CASE' AND target_id = $1 ORDER BY action_id",
        str(case_id),
    )
    return [row["action"] for row in rows]


async def test_cases_from_detection_and_their_lifecycle(dirty_world: tuple[Environment, asyncpg.Connection]) -> None:
    """subsidyctl risk detect records one case per finding and none again on a re-run of the
    same day; a case moves NEW -> REVIEWING -> CONFIRMED, a move its state does not allow is
    FAILED_PRECONDITION INVALID_STATE (exit 1) and changes nothing, not even the audit trail;
    every change is one operator action, a retried request id acts once."""
    env, connection = dirty_world
    first = await invoke(env, "--json", "risk", "detect", "--from", "2026-03-02", "--to", "2026-03-02")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output)
    assert summary["days"][0]["found"] == {name: 1 for name in DETECTORS}
    assert len(summary["days"][0]["new_cases"]) == 5 and summary["already_cases"] == 0
    again = await invoke(env, "--json", "risk", "detect", "--from", "2026-03-02", "--to", "2026-03-02")
    assert again.exit_code == 0, again.output
    assert (json.loads(again.output)["new_cases"], json.loads(again.output)["already_cases"]) == (0, 5)
    assert await connection.fetchval("SELECT count(*) FROM risk_cases") == 5
    assert await connection.fetchval("SELECT count(*) FROM operator_actions WHERE action = 'risk.detect'") == 2

    listed = await invoke(env, "--json", "risk", "cases", "--state", "new")
    assert listed.exit_code == 0, listed.output
    by_detector = {row["detector"]: row for row in json.loads(listed.output)}
    assert set(by_detector) == set(DETECTORS)
    capped = by_detector[CAPPED_SHARE]["case"]
    assert by_detector[CAPPED_SHARE]["subject"] == "merchant:m-capper"
    table = await invoke(env, "risk", "cases")
    assert table.exit_code == 0 and "m-capper" in table.output and "TERMINAL_BURST" in table.output

    no_operator = await invoke(env, "risk", "review", str(capped))
    assert no_operator.exit_code == 2, no_operator.output
    reviewed = await invoke(env, "--operator", "op-risk", "--json", "risk", "review", str(capped), "--request-id", "r1")
    assert reviewed.exit_code == 0, reviewed.output
    assert (json.loads(reviewed.output)["state"], json.loads(reviewed.output)["assignee"]) == (REVIEWING, "op-risk")
    replay = await invoke(env, "--operator", "op-risk", "--json", "risk", "review", str(capped), "--request-id", "r1")
    assert replay.exit_code == 0 and json.loads(replay.output)["state"] == REVIEWING
    confirmed = await invoke(
        env, "--operator", "op-risk", "--json", "risk", "confirm", str(capped), "--note", "all capped"
    )
    assert confirmed.exit_code == 0, confirmed.output
    assert json.loads(confirmed.output)["state"] == CONFIRMED
    refused = await invoke(env, "--operator", "op-risk", "risk", "dismiss", str(capped), "--note", "changed my mind")
    assert refused.exit_code == 1 and "FAILED_PRECONDITION (INVALID_STATE)" in refused.output, refused.output
    assert await audit_rows(connection, capped) == ["risk.reviewing", "risk.confirmed"]

    burst = by_detector[TERMINAL_BURST]["case"]
    skipped = await invoke(env, "--operator", "op-risk", "risk", "confirm", str(burst), "--note", "too fast")
    assert skipped.exit_code == 1 and "INVALID_STATE" in skipped.output
    assigned = await invoke(env, "--operator", "op-lead", "--json", "risk", "assign", str(burst), "op-risk")
    assert assigned.exit_code == 0 and json.loads(assigned.output)["assignee"] == "op-risk"
    dismissed = await invoke(env, "--operator", "op-risk", "--json", "risk", "dismiss", str(burst), "--note", "a queue")
    assert dismissed.exit_code == 0 and json.loads(dismissed.output)["state"] == DISMISSED
    assert await audit_rows(connection, burst) == ["risk.assign", "risk.dismissed"]

    shown = await invoke(env, "--json", "risk", "show", str(capped))
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.output)
    assert document["note"] == "all capped" and document["evidence"]["hits"] == 40
    missing = await invoke(env, "risk", "show", "999999")
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output


async def test_the_daily_report_scheduler_runs_the_detectors_after_each_report(services: Services) -> None:
    """When the writer's scheduler publishes a day's report, the detectors run over that day and
    its findings become cases (detected by the scheduler); the next tick publishes nothing and
    adds no case."""
    async with isolated_environment(services) as env:
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        redis = Redis.from_url(env.redis_url)
        try:
            await reference(connection)
            await clean_day(connection)
            await planted(connection)
            scheduler = ReportScheduler(env.config(), redis, env.keys)
            closes = scheduler.calendar.closes_at(date(2026, 3, 2))
            assert "2026-03-02" in (await scheduler.tick(closes + timedelta(minutes=1))).published
            rows = await connection.fetch("SELECT detector, subject_id, detected_by FROM risk_cases")
            assert sorted(row["detector"] for row in rows) == sorted(DETECTORS)
            assert {row["detected_by"] for row in rows} == {"scheduler"}
            assert (await scheduler.tick(closes + timedelta(minutes=2))).published == ()
            assert await connection.fetchval("SELECT count(*) FROM risk_cases") == len(DETECTORS)
        finally:
            await redis.aclose()
            await connection.close()


SERVICE = "/subsidy.v1.RiskCaseService/"
STAFF = [
    {"id": "gov-bureau", "name": "萧山区商务局 (read-only)", "role": "government"},
    {"id": "aud-bureau", "name": "区审计局", "role": "auditor"},
]


async def test_risk_cases_over_the_gateway(services: Services) -> None:
    """RiskCaseService: government users list and read cases (with the evidence) but cannot
    change them; auditors are refused; operators move a case, a move its state does not allow is
    FAILED_PRECONDITION INVALID_STATE, a retried request id acts once, and bad fields are
    INVALID_ARGUMENT naming the field; an unknown case is NOT_FOUND."""
    async with isolated_environment(services) as env:
        document = yaml.safe_load(REFERENCE_FILE.read_text())
        document["operators"] = [*document["operators"], *STAFF]
        credentials = {**env.credentials, **await load_document(env, document)}
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            await reference(connection)
            await clean_day(connection)
            await planted(connection)
            await risk_cases.record_findings(connection, WINDOW, await risk.detect(connection, WINDOW), "scheduler")
        finally:
            await connection.close()
        async with running_gateway(env.config()) as gateway:
            target = f"127.0.0.1:{gateway.port}"

            def signed(caller_id: str) -> SignedClient:
                return SignedClient(target, caller_id, credentials[caller_id], retry=RetryPolicy(max_attempts=1))

            government, auditor, operator = signed("gov-bureau"), signed("aud-bureau"), signed("op-auditor")
            try:
                listed = await government._call(
                    SERVICE + "ListRiskCases", risk_pb2.ListRiskCasesRequest(), risk_pb2.ListRiskCasesResponse
                )
                assert sorted(case.detector for case in listed.cases) == sorted(DETECTORS)
                capped = next(case for case in listed.cases if case.detector == CAPPED_SHARE)
                assert capped.subject_id == "m-capper" and not capped.evidence.fields
                got = await government._call(
                    SERVICE + "GetRiskCase",
                    risk_pb2.GetRiskCaseRequest(case_id=capped.case_id),
                    risk_pb2.GetRiskCaseResponse,
                )
                assert got.risk_case.evidence["hits"] == 40
                move = risk_pb2.TransitionRiskCaseRequest(
                    request_id=str(uuid.uuid4()),
                    case_id=capped.case_id,
                    to_state=risk_pb2.RISK_CASE_STATE_REVIEWING,
                )
                with pytest.raises(PermissionDenied):
                    await government._call(SERVICE + "TransitionRiskCase", move, risk_pb2.TransitionRiskCaseResponse)
                with pytest.raises(PermissionDenied):
                    await auditor._call(
                        SERVICE + "ListRiskCases", risk_pb2.ListRiskCasesRequest(), risk_pb2.ListRiskCasesResponse
                    )

                skip = risk_pb2.TransitionRiskCaseRequest(
                    request_id=str(uuid.uuid4()),
                    case_id=capped.case_id,
                    to_state=risk_pb2.RISK_CASE_STATE_CONFIRMED,
                    note="skip review",
                )
                with pytest.raises(FailedPrecondition) as refused:
                    await operator._call(SERVICE + "TransitionRiskCase", skip, risk_pb2.TransitionRiskCaseResponse)
                assert refused.value.reason == "INVALID_STATE"
                first = await operator._call(SERVICE + "TransitionRiskCase", move, risk_pb2.TransitionRiskCaseResponse)
                again = await operator._call(SERVICE + "TransitionRiskCase", move, risk_pb2.TransitionRiskCaseResponse)
                assert first.risk_case.state == again.risk_case.state == risk_pb2.RISK_CASE_STATE_REVIEWING
                assert first.risk_case.assignee == "op-auditor"
                no_note = risk_pb2.TransitionRiskCaseRequest(
                    request_id=str(uuid.uuid4()), case_id=capped.case_id, to_state=risk_pb2.RISK_CASE_STATE_CONFIRMED
                )
                with pytest.raises(InvalidArgument) as invalid:
                    await operator._call(SERVICE + "TransitionRiskCase", no_note, risk_pb2.TransitionRiskCaseResponse)
                assert invalid.value.metadata["field"] == "note"
                bad_assignee = risk_pb2.AssignRiskCaseRequest(
                    request_id=str(uuid.uuid4()), case_id=capped.case_id, assignee="李 四"
                )
                with pytest.raises(InvalidArgument) as invalid:
                    await operator._call(SERVICE + "AssignRiskCase", bad_assignee, risk_pb2.AssignRiskCaseResponse)
                assert invalid.value.metadata["field"] == "assignee"
                with pytest.raises(NotFound):
                    await government._call(
                        SERVICE + "GetRiskCase",
                        risk_pb2.GetRiskCaseRequest(case_id=999_999),
                        risk_pb2.GetRiskCaseResponse,
                    )
            finally:
                for client in (government, auditor, operator):
                    await client.close()
