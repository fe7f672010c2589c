"""DailyReportService over a real gateway, the bureau's roles, and `subsidyctl report`.

Roles (issue 12, "Roles and bad input"): a ``government`` credential reads reports (list,
stream, export) and nothing else; an ``auditor`` credential is refused here too (the audit
archive is its only door); terminals, partner apps and providers cannot read reports; only
operators publish. Every RPC of every other service refuses government and auditor callers
with PERMISSION_DENIED, and nothing they try changes a thing. Exports are parsed back.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import openpyxl
import pytest
import yaml
from click.testing import CliRunner, Result
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from subsidy_client import RetryPolicy, SignedClient
from subsidy_client.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, SubsidyError
from subsidy_client.reports import DailyReportClient
from subsidy_client.v1 import daily_report_pb2 as pb

from server.ctl import main as subsidyctl
from server.domain.daily_report import BusinessCalendar
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from server.processes.app import SERVICE_NAMES, Application
from storage.devenv import Services
from storage.postgres import daily_reports
from tests.conftest import REFERENCE_FILE, Environment, isolated_environment, load_document, running_gateway

CALENDAR = BusinessCalendar("Asia/Shanghai", "00:30")
OPERATOR, GOVERNMENT, AUDITOR = "op-auditor", "gov-bureau", "aud-bureau"
TERMINAL, PARTNER, PROVIDER = "t-main-01", "p-wallet-01", "p-peer-01"
STAFF = [
    {"id": GOVERNMENT, "name": "萧山区商务局 (read-only)", "role": "government"},
    {"id": AUDITOR, "name": "区审计局", "role": "auditor"},
]
READS = ("ListDailyReports", "StreamDailyReport", "ExportDailyReport")


@dataclass
class World:
    env: Environment
    gateway: Application
    credentials: dict[str, str]
    days: list[date]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def reports(self, caller_id: str) -> DailyReportClient:
        return DailyReportClient(
            self.target, caller_id, self.credentials[caller_id], deadline_s=30.0, retry=RetryPolicy(max_attempts=1)
        )

    def signed(self, caller_id: str) -> SignedClient:
        return SignedClient(self.target, caller_id, self.credentials[caller_id], retry=RetryPolicy(max_attempts=1))


@asynccontextmanager
async def report_world(services: Services) -> AsyncIterator[World]:
    """A gateway over a ledger holding two generated days (ten and nine days ago), with the
    bureau's government and auditor credentials loaded beside the test reference data."""
    async with isolated_environment(services) as env:
        document = yaml.safe_load(REFERENCE_FILE.read_text())
        document["operators"] = [*document["operators"], *STAFF]
        credentials = {**env.credentials, **await load_document(env, document)}
        first = CALENDAR.day_of(datetime.now(UTC)) - timedelta(days=10)
        start = CALENDAR.bounds(first)[0]
        settings = SimSettings(
            campaigns=(SimCampaign("c-main", ("fridge", "tv")), SimCampaign("c-voucher", ("general",), 1000, 500)),
            merchants=("m-main", "m-other", "m-scoped"),
            seed=4,
            refund_share=0.2,
            partial_refund_share=0.3,
        )
        start_ms = int(start.timestamp() * 1000)
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            await daily_reports.write_simulated(
                connection, simulate(settings, start_ms, start_ms + 2 * 86_400_000, 600)
            )
        finally:
            await connection.close()
        async with running_gateway(env.config()) as gateway:
            yield World(env, gateway, credentials, [first, first + timedelta(days=1)])


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[World]:
    async with report_world(services) as made:
        async with made.reports(OPERATOR) as operator:
            await operator.publish((made.days[-1]).isoformat())
        yield made


async def test_operators_publish_and_a_day_not_closed_is_refused(world: World) -> None:
    async with world.reports(OPERATOR) as operator:
        again = await operator.publish(world.days[-1].isoformat())
        assert list(again.published) == []
        assert again.last_published_date == world.days[-1].isoformat()
        today = CALENDAR.day_of(datetime.now(UTC))
        with pytest.raises(FailedPrecondition) as raised:
            await operator.publish(today.isoformat())
        assert raised.value.reason == "INVALID_STATE" and raised.value.metadata["state"] == "OPEN"
        with pytest.raises(InvalidArgument) as invalid:
            await operator.publish("2026-02-30")
        assert invalid.value.metadata["field"] == "up_to_date"


@pytest.mark.parametrize("caller_id", [OPERATOR, GOVERNMENT])
async def test_operators_and_government_read_reports(world: World, caller_id: str) -> None:
    day = world.days[0].isoformat()
    async with world.reports(caller_id) as reader:
        listed = await reader.list()
        assert [header.business_date for header in listed][-2:] == [
            world.days[1].isoformat(),
            world.days[0].isoformat(),
        ]
        parts = [part async for part in reader.stream(day)]
        header = parts[0].header
        assert header.business_date == day and len(header.content_hash) == 64
        assert [head.campaign_id for head in header.chain_heads] == ["c-main", "c-voucher"]
        budgets = list(parts[1].budgets)
        rows = [row for part in parts[2:] for row in part.rows]
        assert len(rows) == header.row_count
        district = [row for row in rows if row.level == pb.DAILY_REPORT_ROW_LEVEL_DISTRICT_TOTAL]
        assert district[0].figures == header.day_total
        assert sum(line.captured_fen for line in budgets) == header.day_total.redeemed_fen
        for line in budgets:
            assert line.opening_spent_fen + line.captured_fen - line.refunded_fen == line.closing_spent_fen
        totals = [part async for part in reader.stream(day, [pb.DAILY_REPORT_ROW_LEVEL_DISTRICT_TOTAL])]
        assert [row.level for part in totals[2:] for row in part.rows] == [pb.DAILY_REPORT_ROW_LEVEL_DISTRICT_TOTAL]
        with pytest.raises(NotFound):
            [part async for part in reader.stream("2001-01-01")]
        with pytest.raises(InvalidArgument) as invalid:
            [part async for part in reader.stream("yesterday")]
        assert invalid.value.metadata["field"] == "business_date"


async def download(reader: DailyReportClient, day: str, file_format: int, table: int = pb.EXPORT_TABLE_ROWS) -> tuple[
    pb.ExportDailyReportResponse, bytes
]:  # fmt: skip
    parts = [part async for part in reader.export(day, file_format, table)]
    return parts[0], b"".join(part.chunk for part in parts)


async def test_exports_parse_back_to_the_streamed_report(world: World) -> None:
    """CSV (BOM, Chinese headers, yuan) and XLSX (three sheets, yuan numbers) carry exactly the
    streamed rows and budgets, to the fen."""
    day = world.days[0].isoformat()
    async with world.reports(GOVERNMENT) as reader:
        parts = [part async for part in reader.stream(day)]
        rows = [row for part in parts[2:] for row in part.rows]
        budgets = list(parts[1].budgets)
        first, data = await download(reader, day, pb.EXPORT_FORMAT_CSV)
        assert first.file_name == f"daily-report-{day}.csv" and first.content_type.startswith("text/csv")
        assert first.content_hash == parts[0].header.content_hash
        assert data.startswith("\ufeff".encode())
        records = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
        assert len(records) == len(rows)
        for record, row in zip(records, rows, strict=True):
            assert record["业务日期"] == day
            assert record["商户编号"] == row.merchant_id and record["品类"] == row.category
            assert fen(record["核销金额（元）"]) == row.figures.redeemed_fen
            assert fen(record["订单金额（元）"]) == row.figures.order_fen
            assert fen(record["核销退款金额（元）"]) == row.figures.refunded_fen
            assert int(record["补贴人数"]) == row.figures.consumers
            assert int(record["核销商家数"]) == row.figures.merchants
        _, budget_data = await download(reader, day, pb.EXPORT_FORMAT_CSV, pb.EXPORT_TABLE_BUDGETS)
        budget_records = list(csv.DictReader(io.StringIO(budget_data.decode("utf-8-sig"))))
        assert [fen(record["期末已核销（元）"]) for record in budget_records] == [
            line.closing_spent_fen for line in budgets
        ]
        first, data = await download(reader, day, pb.EXPORT_FORMAT_XLSX)
        assert first.file_name == f"daily-report-{day}.xlsx"
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True)
        assert book.sheetnames == ["日报", "预算", "说明"]
        sheet = list(book["日报"].iter_rows(values_only=True))
        titles = sheet[0]
        assert len(sheet) - 1 == len(rows)
        for values, row in zip(sheet[1:], rows, strict=True):
            record = dict(zip(titles, values, strict=True))
            assert round(record["核销金额（元）"] * 100) == row.figures.redeemed_fen
            assert round(record["订单金额（元）"] * 100) == row.figures.order_fen
        about = dict(book["说明"].iter_rows(values_only=True))
        assert about["内容哈希 content SHA-256"] == parts[0].header.content_hash
        with pytest.raises(InvalidArgument) as invalid:
            await download(reader, day, pb.EXPORT_FORMAT_UNSPECIFIED)
        assert invalid.value.metadata["field"] == "format"


def fen(text: str) -> int:
    whole, _, cents = text.partition(".")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole)) * 100 + int(cents))


@pytest.mark.parametrize("caller_id", [AUDITOR, TERMINAL, PARTNER, PROVIDER])
async def test_other_callers_cannot_read_reports(world: World, caller_id: str) -> None:
    day = world.days[0].isoformat()
    async with world.reports(caller_id) as reader:
        with pytest.raises(PermissionDenied):
            await reader.list()
        with pytest.raises(PermissionDenied):
            [part async for part in reader.stream(day)]
        with pytest.raises(PermissionDenied):
            await download(reader, day, pb.EXPORT_FORMAT_CSV)


@pytest.mark.parametrize("caller_id", [GOVERNMENT, AUDITOR, TERMINAL, PARTNER, PROVIDER])
async def test_only_operators_publish(world: World, caller_id: str) -> None:
    async with world.reports(caller_id) as caller:
        with pytest.raises(PermissionDenied):
            await caller.publish()


def well_formed(request_type: Any) -> Any:
    """A request that passes the field checks a servicer may run before it looks at the caller
    (the authorization hot path validates first), so what decides is the caller's role."""
    request = request_type()
    names = {field.name for field in request.DESCRIPTOR.fields}
    values = {
        "request_id": str(uuid.uuid4()),
        "authorization_id": uuid.uuid4().hex,
        "consumer_key": "ab" * 32,
        "campaign_id": "c-main",
        "merchant_id": "m-main",
        "terminal_id": "t-main-01",
        "gtin": "6970000000017",
        "serial_number": "SN1",
    }
    for name, value in values.items():
        if name in names:
            setattr(request, name, value)
    if request.DESCRIPTOR.name == "AuthorizeRequest":
        request.channel = 1
        request.lines.add(line_id="1", gtin="6970000000017", unit_price_fen=300_000, serial_number="SN1")
    return request


GOVERNMENT_READS = (
    "/subsidy.v1.ComplaintService/GetTicketCounts",
    "/subsidy.v1.RiskCaseService/ListRiskCases",
    "/subsidy.v1.RiskCaseService/GetRiskCase",
)


def other_methods() -> list[tuple[str, Any]]:
    """Every RPC of every service but the daily reports' and the reconciliation's (which
    government users read: tests/integration/test_reconciliation.py) and the diagnostics echo,
    which answers any authenticated caller and changes nothing."""
    pool = descriptor_pool.Default()
    methods = []
    for name in SERVICE_NAMES:
        if name.endswith(("DailyReportService", "ReconciliationService", "DiagnosticsService", "SupervisionService")):
            continue
        for method in pool.FindServiceByName(name).methods:
            # The complaints desk's counts are for government users too (test_complaints.py,
            # every method against every kind of caller).
            # So are the risk cases' reads (test_risk_detection.py, read only for government).
            if f"/{name}/{method.name}" not in GOVERNMENT_READS:
                methods.append((f"/{name}/{method.name}", method))
    return methods


@pytest.mark.parametrize("caller_id", [GOVERNMENT, AUDITOR])
async def test_government_and_auditors_are_refused_by_every_other_rpc(world: World, caller_id: str) -> None:
    """Each RPC of the authorization, qualification, campaign, catalog, merchant, reporting and
    exchange services, called with a well-signed government or auditor credential, is refused
    PERMISSION_DENIED; the audit trail and the reference version are unchanged after all of them."""
    connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
    try:
        before = await connection.fetchval("SELECT count(*) FROM operator_actions")
        version = await connection.fetchval("SELECT version FROM reference_version")
        methods = other_methods()
        assert len(methods) >= 25
        refused = []
        async with world.signed(caller_id) as client:
            for path, method in methods:
                request_type = GetMessageClass(method.input_type)
                response_type = GetMessageClass(method.output_type)
                with pytest.raises(SubsidyError) as raised:
                    if method.client_streaming:
                        await client._stream_call(path, [well_formed(request_type)], response_type, 10.0)
                    else:
                        await client._call(path, well_formed(request_type), response_type)
                if not isinstance(raised.value, PermissionDenied):
                    refused.append((path, raised.value))
        assert refused == []
        assert await connection.fetchval("SELECT count(*) FROM operator_actions") == before
        assert await connection.fetchval("SELECT version FROM reference_version") == version
    finally:
        await connection.close()


async def test_government_credentials_are_replay_protected(world: World) -> None:
    """A government call's nonce is recorded like an operator's: the same signed call sent
    twice is refused the second time."""
    from subsidy_client import signing
    from subsidy_client.errors import Unauthenticated

    method = "/subsidy.v1.DailyReportService/ListDailyReports"
    body = pb.ListDailyReportsRequest(limit=1).SerializeToString()
    metadata = signing.signed_metadata(world.credentials[GOVERNMENT], method, GOVERNMENT, body)
    async with world.signed(GOVERNMENT) as client:
        await client.call_raw(method, body, metadata)
        with pytest.raises(Unauthenticated):
            await client.call_raw(method, body, metadata)


async def ctl(world: World, caller_id: str, *arguments: str) -> Result:
    environment = {"SUBSIDYCTL_OPERATOR": caller_id, "SUBSIDYCTL_SECRET": world.credentials[caller_id]}
    return await asyncio.to_thread(
        CliRunner().invoke, subsidyctl, ["--target", world.target, *arguments], env=environment, catch_exceptions=False
    )


async def test_subsidyctl_report_commands(world: World, tmp_path: Path) -> None:
    """`subsidyctl report list|show|export|publish`, tables and --json, as a government user
    (publish refused, exit status 1) and as an operator."""
    day = world.days[0].isoformat()
    listed = await ctl(world, GOVERNMENT, "report", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [item["business_date"] for item in json.loads(listed.stdout)][-2:] == [world.days[1].isoformat(), day]
    table = await ctl(world, GOVERNMENT, "report", "list")
    assert table.exit_code == 0 and day in table.stdout and "REDEEMED" in table.stdout

    shown = await ctl(world, GOVERNMENT, "--json", "report", "show", day)
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.stdout)
    assert document["header"]["business_date"] == day
    assert len(document["rows"]) == int(document["header"]["row_count"])
    assert document["budgets"] and all("closing_spent_fen" in line for line in document["budgets"])
    human = await ctl(world, GOVERNMENT, "report", "show", "latest")
    assert human.exit_code == 0 and "content SHA-256" in human.stdout and "district" in human.stdout

    target = tmp_path / "day.xlsx"
    exported = await ctl(world, GOVERNMENT, "report", "export", day, "--format", "xlsx", "--out", str(target), "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["content_hash"] == document["header"]["content_hash"]
    assert openpyxl.load_workbook(target).sheetnames == ["日报", "预算", "说明"]
    csv_file = tmp_path / "day.csv"
    exported = await ctl(world, GOVERNMENT, "report", "export", day, "--format", "csv", "--out", str(csv_file))
    assert exported.exit_code == 0 and csv_file.read_bytes().startswith("\ufeff".encode())

    refused = await ctl(world, GOVERNMENT, "report", "publish")
    assert refused.exit_code == 1 and "PERMISSION_DENIED" in refused.output
    published = await ctl(world, OPERATOR, "report", "publish", "--json")
    assert published.exit_code == 0, published.output
    answer = json.loads(published.stdout)
    assert answer["last_published_date"] == answer["last_closed_date"]


async def test_reports_published_over_rpc_match_storage(world: World) -> None:
    """What the RPC streams is what PostgreSQL holds, and the stored report still verifies."""
    connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
    try:
        for day in world.days:
            assert await daily_reports.verify(connection, day) is True
            stored = await daily_reports.header(connection, day)
            assert stored is not None
            async with world.reports(OPERATOR) as reader:
                parts = [part async for part in reader.stream(day.isoformat())]
            assert parts[0].header.content_hash == stored.content_hash
            assert parts[0].header.published_by == OPERATOR
    finally:
        await connection.close()
