"""Claw-back (issue 14, section 2): RiskCaseService.ClawBack reverses the subsidy of a captured
sale of a CONFIRMED case's subject through clawback.lua, and the ledger, reconcile and the
counters account for it. Real Redis and PostgreSQL; one gateway for the module, a campaign of
its own per test so its counters are exact."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest
import yaml
from click.testing import CliRunner, Result
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, RetryPolicy, SignedClient
from subsidy_client.errors import FailedPrecondition, IdempotencyConflict, InvalidArgument, NotFound, PermissionDenied
from subsidy_client.v1 import authorization_pb2 as pb
from subsidy_client.v1 import risk_pb2

from server.ctl import main as subsidyctl
from server.domain.daily_report import MERCHANT, BusinessCalendar
from storage.devenv import Services
from storage.postgres import daily_reports, risk_cases
from storage.postgres.audit import rebuild, reconcile, redis_counters, verify
from storage.postgres.exchange import subsidised_between
from storage.postgres.reference import fetch_reference
from storage.postgres.writer import LedgerWriter, WriterConfig
from storage.redis.reference import publish_reference
from tests.conftest import (
    REFERENCE_FILE,
    Environment,
    consumer_key,
    isolated_environment,
    load_document,
    running_gateway,
)
from tests.conftest import serial as new_serial
from tests.integration.test_audit_archive import export, run_verify

FRIDGE_G1 = "6970000000017"  # serial required
WASHER = "6970000000093"
BUDGET_FEN = 10_000_000
SERVICE = "/subsidy.v1.RiskCaseService/"
GOVERNMENT = {"id": "gov-bureau", "name": "萧山区商务局 (read-only)", "role": "government"}


@dataclass
class World:
    env: Environment
    till: AuthorizationClient  # t-main-01 of m-main
    operator: SignedClient  # op-auditor
    government: SignedClient
    redis: Redis
    pool: asyncpg.Pool
    target: str
    credentials: dict[str, str]

    async def campaign(self) -> str:
        campaign_id = "c-claw-" + secrets.token_hex(4)
        rule = {"kind": "PERCENT", "rates_bp": {"1": 2000}, "cap_fen": 200_000, "budget_fen": BUDGET_FEN}
        await load_document(
            self.env,
            {
                "campaigns": [
                    {
                        "id": campaign_id,
                        "starts_at": "2020-01-01T00:00:00+00:00",
                        "ends_at": "2099-01-01T00:00:00+00:00",
                        "rules": [
                            {**rule, "category": "fridge", "per_person_limit": 1},
                            {**rule, "category": "washer", "per_person_limit": 1},
                        ],
                    }
                ]
            },
        )
        return campaign_id

    async def sale(self, campaign: str, person: str, device: str) -> str:
        """A captured payment of a fridge (60,000 fen subsidy) and a washer (30,000 fen)."""
        lines = [Line("f", FRIDGE_G1, 300_000, device), Line("w", WASHER, 150_000)]
        approved = await self.till.authorize(campaign_id=campaign, consumer_key=person, lines=lines)
        assert approved.decision == pb.DECISION_APPROVED
        return approved.authorization_id

    async def counters(self, campaign: str, person: str) -> dict[str, int]:
        keys = self.env.keys
        budget = await self.redis.hgetall(keys.budget(campaign))
        usage = await self.redis.hgetall(keys.usage(campaign, person))
        found = {f"budget.{key.decode()}": int(value) for key, value in budget.items() if not key.endswith(b":total")}
        found.update({f"usage.{key.decode()}": int(value) for key, value in usage.items()})
        return {key: value for key, value in found.items() if value}

    async def case(self, subject_kind: str = "MERCHANT", subject_id: str = "m-main", confirm: bool = True) -> int:
        """A risk case on the subject, moved to CONFIRMED (or left REVIEWING)."""
        start = datetime(2026, 1, 1, tzinfo=UTC)
        case_id: int = await self.pool.fetchval(
            "INSERT INTO risk_cases (detector, subject_kind, subject_id, window_start, window_end, score, evidence,"
            " dedup_key, detected_by) VALUES ('CAPPED_SHARE', $1, $2, $3, $4, 5.0, '{}'::jsonb, $5, 'test')"
            " RETURNING case_id",
            subject_kind,
            subject_id,
            start,
            start + timedelta(days=1),
            secrets.token_hex(16),
        )
        async with self.pool.acquire() as connection:
            await risk_cases.move(connection, case_id, "REVIEWING", "", "op-risk", str(uuid.uuid4()))
            if confirm:
                await risk_cases.move(
                    connection, case_id, "CONFIRMED", "fabricated sales", "op-risk", str(uuid.uuid4())
                )
        return case_id

    async def claw_back(
        self,
        case_id: int,
        authorization_id: str,
        line_ids: tuple[str, ...] = (),
        request_id: str = "",
        note: str = "fabricated sale",
        client: SignedClient | None = None,
    ) -> risk_pb2.ClawBackResponse:
        request = risk_pb2.ClawBackRequest(
            request_id=request_id or str(uuid.uuid4()),
            case_id=case_id,
            authorization_id=authorization_id,
            line_ids=line_ids,
            note=note,
        )
        return await (client or self.operator)._call(SERVICE + "ClawBack", request, risk_pb2.ClawBackResponse)

    async def drain_ledger(self) -> None:
        config = WriterConfig(pg_dsn=self.env.pg_dsn, redis_url=self.env.redis_url, prefix=self.env.prefix)
        writer = LedgerWriter(config, self.redis)
        try:
            await writer.drain()
        finally:
            await writer.close()

    async def stream_events(self, authorization_id: str) -> list[dict[str, object]]:
        entries = await self.redis.xrange(self.env.keys.ledger)
        events = [orjson.loads(fields[b"e"]) for _, fields in entries]
        return [event for event in events if event["authorization_id"] == authorization_id]

    async def audit_rows(self, case_id: int) -> int:
        found: int = await self.pool.fetchval(
            "SELECT count(*) FROM operator_actions WHERE action = 'risk.clawback' AND target_id = $1", str(case_id)
        )
        return found


@asynccontextmanager
async def made_world(services: Services) -> AsyncIterator[World]:
    async with isolated_environment(services) as env:
        document = yaml.safe_load(REFERENCE_FILE.read_text())
        document["operators"] = [*document["operators"], GOVERNMENT]
        credentials = {**env.credentials, **await load_document(env, document)}
        async with running_gateway(env.config()) as gateway:
            target = f"127.0.0.1:{gateway.port}"
            once = RetryPolicy(max_attempts=1)
            till = AuthorizationClient(target, "t-main-01", credentials["t-main-01"], retry=once)
            operator = SignedClient(target, "op-auditor", credentials["op-auditor"], retry=once)
            government = SignedClient(target, "gov-bureau", credentials["gov-bureau"], retry=once)
            redis = Redis.from_url(env.redis_url)
            pool = await asyncpg.create_pool(env.pg_dsn, min_size=1, max_size=2)
            try:
                yield World(env, till, operator, government, redis, pool, target, credentials)
            finally:
                await pool.close()
                await redis.aclose()
                for client in (till, operator, government):
                    await client.close()


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[World]:
    async with made_world(services) as made:
        yield made


async def test_a_claw_back_keeps_the_ledger_verified_and_reconciled(world: World) -> None:
    """Clawing back a captured sale: the subsidy is no longer owed to the merchant (the ledger's
    MERCHANT_RECEIVABLE), it is recovered (RECOVERED, Redis clawed_back) and stays used in the
    budget (spent unchanged: not granted again); the consumer's quota and the device serial
    stay used; one CLAWED_BACK event carrying the case; the chain verifies and Redis reconciles
    with the ledger to the fen."""
    campaign, person, device = await world.campaign(), consumer_key(), new_serial()
    authorization_id = await world.sale(campaign, person, device)
    await world.till.capture(authorization_id)
    captured = await world.counters(campaign, person)
    assert captured == {
        "budget.fridge:spent": 60_000,
        "budget.washer:spent": 30_000,
        "usage.fridge": 1,
        "usage.washer": 1,
    }
    case_id = await world.case()
    answer = await world.claw_back(case_id, authorization_id)
    assert answer.clawed_back_fen == 90_000 and sorted(answer.line_ids) == ["f", "w"]
    assert sorted(answer.clawed_back_line_ids) == ["f", "w"] and answer.merchant_id == "m-main"
    assert not answer.replayed
    assert await world.counters(campaign, person) == {
        **captured,
        "budget.fridge:clawed_back": 60_000,
        "budget.washer:clawed_back": 30_000,
    }
    assert await world.redis.get(world.env.keys.serial(device)) == authorization_id.encode()
    got = await world.till.get_authorization(authorization_id)
    assert got.state == pb.AUTHORIZATION_STATE_CAPTURED
    assert [(line.refunded, line.clawed_back) for line in got.lines] == [(False, True), (False, True)]
    assert got.clawed_back_fen == 90_000 and got.refunded_subsidy_fen == 0
    events = await world.stream_events(authorization_id)
    assert [event["type"] for event in events] == ["AUTHORIZED", "CAPTURED", "CLAWED_BACK"]
    clawed = events[-1]
    assert clawed["amount_fen"] == 90_000 and clawed["risk_case"] == case_id
    assert clawed["terminal"] == "operator:op-auditor"

    await world.drain_ledger()
    async with world.pool.acquire() as connection:
        report = await verify(connection)
        assert report.ok and report.debit_fen == report.credit_fen
        balances = {
            (row["account"], row["category"]): int(row["balance"])
            for row in await connection.fetch(
                "SELECT account, category, sum(debit_fen) - sum(credit_fen) AS balance FROM ledger_entries"
                " WHERE campaign_id = $1 GROUP BY account, category",
                campaign,
            )
        }
        assert balances == {
            ("AVAILABLE", "fridge"): -60_000,
            ("AVAILABLE", "washer"): -30_000,
            ("PENDING", "fridge"): 0,
            ("PENDING", "washer"): 0,
            ("MERCHANT_RECEIVABLE", "fridge"): 0,
            ("MERCHANT_RECEIVABLE", "washer"): 0,
            ("RECOVERED", "fridge"): 60_000,
            ("RECOVERED", "washer"): 30_000,
        }
        assert await reconcile(connection, world.redis, world.env.keys) == []
    assert await world.audit_rows(case_id) == 1
    # The case lists its claw-back, read from the ledger (for the bureau's read-only users too).
    got_case = await world.government._call(
        SERVICE + "GetRiskCase", risk_pb2.GetRiskCaseRequest(case_id=case_id), risk_pb2.GetRiskCaseResponse
    )
    [listed] = got_case.risk_case.clawbacks
    assert (listed.authorization_id, sorted(listed.line_ids), listed.clawed_back_fen) == (
        authorization_id,
        ["f", "w"],
        90_000,
    )
    assert listed.operator_id == "op-auditor" and listed.merchant_id == "m-main"

    # The same person cannot buy another fridge: the right was used by the fraudulent sale.
    again = await world.till.authorize(
        campaign_id=campaign, consumer_key=person, lines=[Line("f", FRIDGE_G1, 300_000, new_serial())]
    )
    assert again.decision == pb.DECISION_DECLINED
    assert again.decline_reason == pb.DECLINE_REASON_CONSUMER_LIMIT_REACHED


async def test_a_retried_claw_back_acts_once(world: World) -> None:
    """The same request id: the same answer (replayed), one ledger event, one audit row; the
    same request id with another payload is ALREADY_EXISTS and changes nothing."""
    campaign, person = await world.campaign(), consumer_key()
    authorization_id = await world.sale(campaign, person, new_serial())
    await world.till.capture(authorization_id)
    case_id = await world.case()
    request_id = str(uuid.uuid4())
    first = await world.claw_back(case_id, authorization_id, ("w",), request_id=request_id)
    second = await world.claw_back(case_id, authorization_id, ("w",), request_id=request_id)
    assert (first.clawed_back_fen, list(first.line_ids)) == (second.clawed_back_fen, list(second.line_ids))
    assert first.clawed_back_fen == 30_000 and not first.replayed and second.replayed
    before = await world.counters(campaign, person)
    with pytest.raises(IdempotencyConflict):
        await world.claw_back(case_id, authorization_id, ("f",), request_id=request_id)
    assert await world.counters(campaign, person) == before
    assert before["budget.washer:clawed_back"] == 30_000 and "budget.fridge:clawed_back" not in before
    # A request id the operator used for another action is refused before any money moves.
    moved = str(uuid.uuid4())
    other_case = await world.case(confirm=False)
    async with world.pool.acquire() as connection:
        await risk_cases.assign(connection, other_case, "op-lee", "op-auditor", moved)
    with pytest.raises(IdempotencyConflict):
        await world.claw_back(case_id, authorization_id, ("f",), request_id=moved)
    assert await world.counters(campaign, person) == before
    types = [event["type"] for event in await world.stream_events(authorization_id)]
    assert types.count("CLAWED_BACK") == 1
    await world.drain_ledger()
    assert await world.audit_rows(case_id) == 1


async def test_refused_claw_backs_write_nothing(world: World) -> None:
    """Each refusal is a precise status with its reason, and nothing changes in Redis, the
    stream or the audit trail: a pending, voided or fully refunded authorization; a case not
    CONFIRMED; unknown case, authorization and line; a sale of another subject; no note; a
    government user (read only)."""
    campaign, person = await world.campaign(), consumer_key()
    pending = await world.sale(campaign, person, new_serial())
    voided = await world.sale(campaign, consumer_key(), new_serial())
    await world.till.void(voided)
    refunded = await world.sale(campaign, consumer_key(), new_serial())
    await world.till.capture(refunded)
    await world.till.refund(refunded)
    captured = await world.sale(campaign, consumer_key(), new_serial())
    await world.till.capture(captured)
    confirmed, reviewing = await world.case(), await world.case(confirm=False)
    other_subject = await world.case("MERCHANT", "m-other")
    stream_before = await world.redis.xlen(world.env.keys.ledger)
    budget_before = await world.redis.hgetall(world.env.keys.budget(campaign))

    for authorization_id, state in ((pending, "PENDING"), (voided, "VOIDED"), (refunded, "REFUNDED")):
        with pytest.raises(FailedPrecondition) as refused:
            await world.claw_back(confirmed, authorization_id)
        assert refused.value.reason == "INVALID_STATE"
        assert refused.value.metadata["state"] == "AUTHORIZATION_STATE_" + state
    with pytest.raises(FailedPrecondition) as refused:
        await world.claw_back(reviewing, captured)
    assert refused.value.reason == "INVALID_STATE"
    assert refused.value.metadata["state"] == "RISK_CASE_STATE_REVIEWING"
    with pytest.raises(NotFound):
        await world.claw_back(999_999_999, captured)
    with pytest.raises(NotFound) as missing:
        await world.claw_back(confirmed, "0" * 32)
    assert missing.value.reason == "AUTHORIZATION_NOT_FOUND"
    with pytest.raises(InvalidArgument) as invalid:
        await world.claw_back(confirmed, captured, ("nope",))
    assert invalid.value.metadata["field"] == "line_ids"
    with pytest.raises(InvalidArgument) as invalid:
        await world.claw_back(other_subject, captured)
    assert invalid.value.metadata["field"] == "authorization_id"
    with pytest.raises(InvalidArgument) as invalid:
        await world.claw_back(confirmed, captured, note=" ")
    assert invalid.value.metadata["field"] == "note"
    with pytest.raises(InvalidArgument) as invalid:
        await world.claw_back(confirmed, captured, note="x" * 2_001)
    assert invalid.value.metadata["field"] == "note"
    with pytest.raises(InvalidArgument) as invalid:
        await world.claw_back(0, captured)
    assert invalid.value.metadata["field"] == "case_id"
    with pytest.raises(InvalidArgument) as invalid:
        await world.claw_back(confirmed, "not-an-id")
    assert invalid.value.metadata["field"] == "authorization_id"
    with pytest.raises(PermissionDenied):
        await world.claw_back(confirmed, captured, client=world.government)

    assert await world.redis.xlen(world.env.keys.ledger) == stream_before
    assert await world.redis.hgetall(world.env.keys.budget(campaign)) == budget_before
    for case_id in (confirmed, reviewing, other_subject):
        assert await world.audit_rows(case_id) == 0
    # The longest note allowed is accepted.
    done = await world.claw_back(confirmed, captured, note="x" * 2_000)
    assert done.clawed_back_fen == 90_000


async def test_partial_refund_then_claw_back_then_refund_refused(world: World) -> None:
    """A partial refund, then the claw-back of the rest (no line named: every line neither
    refunded nor clawed back); a refund after it is refused, by line and whole, and a second
    claw-back too; the ledger still verifies and reconciles."""
    campaign, person, device = await world.campaign(), consumer_key(), new_serial()
    authorization_id = await world.sale(campaign, person, device)
    await world.till.capture(authorization_id)
    await world.till.refund(authorization_id, ["w"])
    case_id = await world.case()
    clawed = await world.claw_back(case_id, authorization_id)
    assert list(clawed.line_ids) == ["f"] and clawed.clawed_back_fen == 60_000
    assert await world.counters(campaign, person) == {
        "budget.fridge:spent": 60_000,
        "budget.fridge:clawed_back": 60_000,
        "budget.washer:refunded": 30_000,
        "usage.fridge": 1,
    }
    with pytest.raises(FailedPrecondition) as refused:
        await world.till.refund(authorization_id, ["f"])
    assert refused.value.reason == "INVALID_STATE" and refused.value.metadata["line_id"] == "f"
    with pytest.raises(FailedPrecondition) as refused:
        await world.till.refund(authorization_id)
    assert refused.value.reason == "INVALID_STATE"
    with pytest.raises(FailedPrecondition) as refused:
        await world.claw_back(case_id, authorization_id)
    assert refused.value.reason == "INVALID_STATE" and refused.value.metadata["line_id"] == "f"
    with pytest.raises(FailedPrecondition) as refused:
        await world.claw_back(case_id, authorization_id, ("w",))
    assert refused.value.reason == "LINE_ALREADY_REFUNDED"
    # The serial stays with the clawed-back sale.
    assert await world.redis.get(world.env.keys.serial(device)) == authorization_id.encode()
    await world.drain_ledger()
    async with world.pool.acquire() as connection:
        assert (await verify(connection)).ok
        assert await reconcile(connection, world.redis, world.env.keys) == []


def line_marks(authorization: pb.Authorization) -> dict[str, tuple[bool, bool]]:
    """Each line's (refunded, clawed_back) as the public view shows them."""
    return {line.line_id: (line.refunded, line.clawed_back) for line in authorization.lines}


async def test_get_authorization_shows_what_was_clawed_back(world: World) -> None:
    """The public read (GetAuthorization, a till's) shows a claw-back: the state stays CAPTURED
    (AuthorizationState has no value for it) but each clawed-back line says so and
    Authorization.clawed_back_fen sums their subsidy. A sale never clawed back shows zero and no
    line; one line clawed back shows that line and its subsidy, the other line not; the claw-back
    of the rest shows both. A line refunded before a claw-back stays refunded, not clawed back,
    and its subsidy stays in refunded_subsidy_fen only; a fully refunded sale shows zero."""
    campaign = await world.campaign()
    authorization_id = await world.sale(campaign, consumer_key(), new_serial())
    await world.till.capture(authorization_id)
    never = await world.till.get_authorization(authorization_id)
    assert line_marks(never) == {"f": (False, False), "w": (False, False)}
    assert never.clawed_back_fen == 0 and never.subsidy_fen == 90_000

    case_id = await world.case()
    await world.claw_back(case_id, authorization_id, ("f",))
    one = await world.till.get_authorization(authorization_id)
    assert one.state == pb.AUTHORIZATION_STATE_CAPTURED
    assert line_marks(one) == {"f": (False, True), "w": (False, False)}
    assert one.clawed_back_fen == 60_000 and one.refunded_subsidy_fen == 0
    # What was granted at the sale is still shown as granted: the claw-back is told apart.
    assert [(line.subsidy_fen, line.payable_fen) for line in one.lines] == [(60_000, 240_000), (30_000, 120_000)]
    assert one.subsidy_fen == 90_000

    await world.claw_back(case_id, authorization_id)
    both = await world.till.get_authorization(authorization_id)
    assert both.state == pb.AUTHORIZATION_STATE_CAPTURED
    assert line_marks(both) == {"f": (False, True), "w": (False, True)}
    assert both.clawed_back_fen == 90_000

    # Refunded first, then the rest clawed back: the refund is not shown as a claw-back.
    partly = await world.sale(campaign, consumer_key(), new_serial())
    await world.till.capture(partly)
    await world.till.refund(partly, ["w"])
    await world.claw_back(case_id, partly)
    mixed = await world.till.get_authorization(partly)
    assert mixed.state == pb.AUTHORIZATION_STATE_PARTIALLY_REFUNDED
    assert line_marks(mixed) == {"f": (False, True), "w": (True, False)}
    assert (mixed.clawed_back_fen, mixed.refunded_subsidy_fen) == (60_000, 30_000)

    refunded = await world.sale(campaign, consumer_key(), new_serial())
    await world.till.capture(refunded)
    whole = (await world.till.refund(refunded)).authorization
    assert line_marks(whole) == {"f": (True, False), "w": (True, False)}
    assert whole.clawed_back_fen == 0
    read = await world.till.get_authorization(refunded)
    assert line_marks(read) == line_marks(whole) and read.clawed_back_fen == 0


async def test_subsidyctl_risk_clawback(world: World) -> None:
    """`subsidyctl risk clawback CASE AUTHORIZATION --note ... [--line ...]` over the gateway with
    the operator's credential; a refusal exits 1 with the gateway's reason."""
    campaign, person = await world.campaign(), consumer_key()
    authorization_id = await world.sale(campaign, person, new_serial())
    await world.till.capture(authorization_id)
    confirmed, reviewing = await world.case(), await world.case(confirm=False)

    async def ctl(*arguments: str) -> Result:
        environment = {"SUBSIDYCTL_OPERATOR": "op-auditor", "SUBSIDYCTL_SECRET": world.credentials["op-auditor"]}
        return await asyncio.to_thread(
            CliRunner().invoke, subsidyctl, ["--target", world.target, *arguments], env=environment
        )

    refused = await ctl("risk", "clawback", str(reviewing), authorization_id, "--note", "n")
    assert refused.exit_code == 1 and "INVALID_STATE" in refused.output, refused.output
    done = await ctl("risk", "clawback", str(confirmed), authorization_id, "--note", "n", "--line", "w", "--json")
    assert done.exit_code == 0, done.output
    answer = json.loads(done.output)
    assert answer["clawed_back_fen"] == 30_000 and answer["lines"] == ["w"] and answer["merchant"] == "m-main"
    assert (await world.counters(campaign, person))["budget.washer:clawed_back"] == 30_000
    await world.drain_ledger()
    local = {
        "SUBSIDY_PG_DSN": world.env.pg_dsn,
        "SUBSIDY_REDIS_URL": world.env.redis_url,
        "SUBSIDY_REPORT_TIMEZONE": "Asia/Shanghai",
    }
    shown = await asyncio.to_thread(
        CliRunner().invoke, subsidyctl, ["--json", "risk", "show", str(confirmed)], env=local
    )
    assert shown.exit_code == 0, shown.output
    [clawed] = json.loads(shown.output)["clawbacks"]
    assert (clawed["authorization"], clawed["lines"], clawed["clawed_back_fen"]) == (authorization_id, ["w"], 30_000)


async def test_the_daily_report_shows_the_merchant_owed_less(world: World, tmp_path: Path) -> None:
    """Runs last in the module: publishes today's report (as if its cut-off had passed). The
    merchant's row carries the claw-back and the subsidy it is still owed is the capture less
    it; the budget line ties out (opening + captured - refunded - clawed back = closing spent,
    clawed back = closing recovered) and the remaining budget leaves the recovered money out;
    the report is format 2, its content hash verifies, and it counts a ticket opened today."""
    campaign, person = await world.campaign(), consumer_key()
    authorization_id = await world.sale(campaign, person, new_serial())
    await world.till.capture(authorization_id)
    await world.claw_back(await world.case(), authorization_id, ("f",))
    await world.drain_ledger()
    calendar = BusinessCalendar("Asia/Shanghai", "00:30")
    now = datetime.now(UTC)
    today = calendar.day_of(now)
    await world.pool.execute(
        "INSERT INTO tickets (ticket_id, submitter, opened_by, request_id, payload_hash, merchant_id, category,"
        " state, link_kind, link_id, body, opened_at, first_reply_due_at, resolution_due_at)"
        " VALUES ($1, 'MERCHANT', 't-main-01', $2, 'h', 'm-main', 'OTHER', 'OPEN', 'MERCHANT', 'm-main',"
        " 'a question', $3, $4, $5)",
        secrets.token_hex(16),
        str(uuid.uuid4()),
        now,
        now + timedelta(days=1),
        now + timedelta(days=5),
    )
    async with world.pool.acquire() as connection:
        result = await daily_reports.publish_closed_days(
            connection, calendar, calendar.closes_at(today) + timedelta(minutes=1), "test", up_to=today
        )
        header = result.published[-1]
        assert header.business_date == today and header.format_version == 2
        assert header.tickets_opened >= 1
        assert await daily_reports.verify(connection, today) is True
        budgets = {
            line.category: line
            async for line in daily_reports.stream_budgets(connection, today)
            if line.campaign_id == campaign
        }
        async with daily_reports.reading(connection):
            rows = [
                row
                async for row in daily_reports.stream_rows(connection, today)
                if row.campaign_id == campaign and row.level == MERCHANT
            ]
    fridge = budgets["fridge"]
    assert (fridge.captured_fen, fridge.clawed_back_fen, fridge.closing_spent_fen) == (60_000, 60_000, 0)
    assert fridge.closing_recovered_fen == 60_000
    assert fridge.remaining_fen == BUDGET_FEN - 0 - 0 - 60_000
    washer = budgets["washer"]
    assert (washer.captured_fen, washer.clawed_back_fen, washer.closing_spent_fen) == (30_000, 0, 30_000)
    by_category = {row.category: row.figures for row in rows}
    assert by_category["fridge"].redeemed_fen == 60_000
    assert (by_category["fridge"].clawbacks, by_category["fridge"].clawed_back_fen) == (1, 60_000)
    # The audit archive of the day verifies with its own script, the claw-back counted apart.
    status, summary, stderr = export(world.env, today, today, tmp_path / "archive")
    assert status == 0 and summary["ok"], (stderr, summary.get("verification"))
    manifest = json.loads((tmp_path / "archive" / "manifest.json").read_text())
    figures = manifest["totals"][today.isoformat()][campaign]
    assert (figures["captured_fen"], figures["refunded_fen"], figures["clawed_back_fen"]) == (90_000, 0, 60_000)
    verified = run_verify(tmp_path / "archive")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    owed = {
        category: item.redeemed_fen - item.refunded_fen - item.clawed_back_fen for category, item in by_category.items()
    }
    assert owed == {"fridge": 0, "washer": 30_000}


async def test_a_redis_loss_after_a_claw_back_is_rebuilt_from_the_ledger(services: Services) -> None:
    """On a world of its own (a rebuild rewrites every counter): after a partial claw-back, the
    Redis money state is lost and rebuilt from the ledger: the same counters (clawed_back,
    spent, quota, serial), the clawed-back line still refused a refund while the other line
    refunds; the day's exchange file still reports the clawed-back line's consumer and device."""
    async with made_world(services) as world:
        campaign, person, device = await world.campaign(), consumer_key(), new_serial()
        authorization_id = await world.sale(campaign, person, device)
        await world.till.capture(authorization_id)
        await world.claw_back(await world.case(), authorization_id, ("f",))
        await world.drain_ledger()
        before = await redis_counters(world.redis, world.env.keys)
        for pattern in ("usage", "serial", "budget", "auth", "holds"):
            doomed = [key async for key in world.redis.scan_iter(match=f"{world.env.keys.tag}:{pattern}*")]
            if doomed:
                await world.redis.delete(*doomed)
        async with world.pool.acquire() as connection:
            assert await reconcile(connection, world.redis, world.env.keys) != []
            await publish_reference(world.redis, world.env.keys, await fetch_reference(connection))
            await rebuild(connection, world.redis, world.env.keys)
            assert (await redis_counters(world.redis, world.env.keys)).nonzero() == before.nonzero()
            assert await reconcile(connection, world.redis, world.env.keys) == []
            now = datetime.now(UTC)
            exported = await subsidised_between(connection, now - timedelta(days=1), now + timedelta(minutes=1))
        assert (await world.counters(campaign, person))["budget.fridge:clawed_back"] == 60_000
        with pytest.raises(FailedPrecondition) as refused:
            await world.till.refund(authorization_id, ["f"])
        assert refused.value.metadata["line_id"] == "f"
        rest = await world.till.refund(authorization_id)
        assert rest.refunded_subsidy_fen == 30_000
        # The rebuilt hash still marks the clawed-back line, as the public view shows it.
        assert line_marks(rest.authorization) == {"f": (False, True), "w": (True, False)}
        assert rest.authorization.clawed_back_fen == 60_000
        assert device in {record.serial for record in exported.serials}
        assert (person, "fridge") in {(record.consumer_key, record.category) for record in exported.consumers}
