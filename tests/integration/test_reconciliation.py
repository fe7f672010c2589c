"""Bill reconciliation over a real gateway (issue 12, section 3): a generated ledger day (captures,
full and partial refunds, voids, expiries) and a settlement file made from it with deliberate
exceptions; every line ends in exactly one status with its fen difference; re-importing the same
file changes nothing; a corrected file supersedes the run with the old one kept; malformed files
are refused whole (line and column named) or imported with per-line errors; a WeChat-Pay-style
bill (Chinese headers, backticks, yuan, a summary trailer) is read through a column mapping;
exports parse back to the fen; roles.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import openpyxl
import pytest
import yaml
from click.testing import CliRunner, Result
from subsidy_client import RetryPolicy
from subsidy_client.errors import FailedPrecondition, IdempotencyConflict, InvalidArgument, NotFound, PermissionDenied
from subsidy_client.reconciliation import ReconciliationClient
from subsidy_client.v1 import reconciliation_pb2 as pb

from server.ctl import main as subsidyctl
from server.domain.bill_matching import LedgerItem, mirror
from server.domain.daily_report import BusinessCalendar, yuan
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from server.domain.settlement_file import PAYMENT, REFUND, ChannelLine, standard_file
from server.processes.app import Application
from storage.devenv import Services
from storage.postgres import daily_reports, reconciliation
from tests.conftest import REFERENCE_FILE, ROOT, Environment, isolated_environment, load_document, running_gateway

CALENDAR = BusinessCalendar("Asia/Shanghai", "00:30")
OPERATOR, GOVERNMENT, AUDITOR = "op-auditor", "gov-recon", "aud-recon"
TERMINAL, PARTNER = "t-main-01", "p-wallet-01"
STAFF = [
    {"id": GOVERNMENT, "name": "区商务局 (read-only)", "role": "government"},
    {"id": AUDITOR, "name": "区审计局", "role": "auditor"},
]
CHANNEL = "wechat-pay"
STATUS = pb.ReconciliationStatus


@dataclass
class World:
    env: Environment
    gateway: Application
    credentials: dict[str, str]
    day: date
    items: list[LedgerItem]

    def client(self, caller_id: str) -> ReconciliationClient:
        return ReconciliationClient(
            f"127.0.0.1:{self.gateway.port}",
            caller_id,
            self.credentials[caller_id],
            deadline_s=30.0,
            retry=RetryPolicy(max_attempts=1),
        )


async def day_items(env: Environment, day: date) -> list[LedgerItem]:
    start, end = CALENDAR.bounds(day)
    connection = await asyncpg.connect(env.pg_dsn, timeout=10)
    try:
        async with connection.transaction():
            return [item async for item in reconciliation.ledger_items(connection, start, end)]
    finally:
        await connection.close()


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[World]:
    async with isolated_environment(services) as env:
        document = yaml.safe_load(REFERENCE_FILE.read_text())
        document["operators"] = [*document["operators"], *STAFF]
        credentials = {**env.credentials, **await load_document(env, document)}
        first = CALENDAR.day_of(datetime.now(UTC)) - timedelta(days=5)
        start_ms = int(CALENDAR.bounds(first)[0].timestamp() * 1000)
        settings = SimSettings(
            campaigns=(SimCampaign("c-main", ("fridge", "tv")), SimCampaign("c-voucher", ("general",), 1000, 500)),
            merchants=("m-main", "m-other", "m-scoped"),
            seed=12,
            refund_share=0.2,
            partial_refund_share=0.3,
        )
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            await daily_reports.write_simulated(
                connection, simulate(settings, start_ms, start_ms + 2 * 86_400_000, 500)
            )
            counts = dict(await connection.fetch("SELECT event_type, count(*) FROM ledger_events GROUP BY 1"))
        finally:
            await connection.close()
        # The generated days hold every kind of event the matching must see or ignore.
        assert {"CAPTURED", "REFUNDED", "VOIDED", "EXPIRED"} <= set(counts)
        day = first + timedelta(days=1)
        async with running_gateway(env.config()) as gateway:
            yield World(env, gateway, credentials, day, await day_items(env, day))


def mirrored(items: list[LedgerItem]) -> list[ChannelLine]:
    return [mirror(item, 0, f"CH{index:08d}") for index, item in enumerate(items)]


def numbered(lines: list[ChannelLine]) -> list[ChannelLine]:
    """Line numbers as the file will have them (the header is line 1)."""
    return [line._replace(line_number=index) for index, line in enumerate(lines, start=2)]


def encode(lines: list[ChannelLine]) -> bytes:
    return "".join(standard_file(lines)).encode()


@dataclass
class Exceptions:
    file: bytes
    mismatch: ChannelLine
    mismatch_ledger: LedgerItem
    missing_in_channel: LedgerItem
    extra: ChannelLine
    duplicate: ChannelLine


def with_exceptions(world: World) -> Exceptions:
    """The day's file with one amount mismatch (+123 fen), one payment dropped, one line of an
    authorization the ledger never saw, and one line repeated."""
    payments = [index for index, item in enumerate(world.items) if item.kind == PAYMENT]
    refunds = [index for index, item in enumerate(world.items) if item.kind == REFUND]
    assert len(payments) > 10 and len(refunds) > 3
    lines = mirrored(world.items)
    mismatch_index, dropped_index, duplicate_index = payments[1], payments[3], refunds[0]
    lines[mismatch_index] = lines[mismatch_index]._replace(subsidy_fen=lines[mismatch_index].subsidy_fen + 123)
    extra = ChannelLine(0, PAYMENT, "CHEXTRA0001", secrets.token_hex(16), 99_900, 4_567, 0, lines[0].time)
    kept = [line for index, line in enumerate(lines) if index != dropped_index]
    kept.insert(5, extra)
    kept.append(lines[duplicate_index])
    final = numbered(kept)
    return Exceptions(
        file=encode(final),
        mismatch=next(line for line in final if line.authorization_id == lines[mismatch_index].authorization_id),
        mismatch_ledger=world.items[mismatch_index],
        missing_in_channel=world.items[dropped_index],
        extra=next(line for line in final if line.channel_txn_id == "CHEXTRA0001"),
        duplicate=final[-1],
    )


async def import_bytes(client: ReconciliationClient, data: bytes, **options: Any) -> pb.ImportSettlementFileResponse:
    options.setdefault("channel", CHANNEL)
    options.setdefault("file_name", "settlement.csv")
    return await client.import_file(io.BytesIO(data), **options)


async def results(
    client: ReconciliationClient, run_id: str, include_matched: bool = True
) -> list[pb.ReconciliationLine]:
    parts = [part async for part in client.results(run_id, include_matched=include_matched)]
    assert parts[0].run.run_id == run_id
    return [line for part in parts[1:] for line in part.lines]


async def count_rows(world: World, table: str) -> int:
    connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
    try:
        return int(await connection.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await connection.close()


async def test_each_status_with_its_fen_difference(world: World) -> None:
    """Every file line and every ledger item of the day ends in exactly one status; the
    differences are the fen the two sides disagree by; the run's counts and nets add up."""
    case = with_exceptions(world)
    async with world.client(OPERATOR) as client:
        answer = await import_bytes(client, case.file, business_date=world.day.isoformat(), channel="exceptions-day")
        assert answer.applied and not answer.replayed and list(answer.errors) == []
        lines = await results(client, answer.run.run_id)
    by_status: dict[int, list[pb.ReconciliationLine]] = {}
    for line in lines:
        by_status.setdefault(line.status, []).append(line)
    # One result per file line (header excluded) plus the dropped payment.
    file_lines = case.file.decode().count("\r\n") - 1
    assert len(lines) == file_lines + 1
    assert len(by_status[STATUS.RECONCILIATION_STATUS_MATCHED]) == len(world.items) - 2

    [mismatch] = by_status[STATUS.RECONCILIATION_STATUS_AMOUNT_MISMATCH]
    assert mismatch.line_number == case.mismatch.line_number
    assert mismatch.ledger_event_id == case.mismatch_ledger.event_id
    assert mismatch.difference_fen == 123 and mismatch.order_difference_fen == 0
    assert mismatch.channel_subsidy_fen - mismatch.ledger_subsidy_fen == 123

    [missing_ledger] = by_status[STATUS.RECONCILIATION_STATUS_MISSING_IN_LEDGER]
    assert missing_ledger.line_number == case.extra.line_number and missing_ledger.ledger_event_id == ""
    assert missing_ledger.difference_fen == 4_567 and missing_ledger.order_difference_fen == 99_900

    [missing_channel] = by_status[STATUS.RECONCILIATION_STATUS_MISSING_IN_CHANNEL]
    assert missing_channel.line_number == 0
    assert missing_channel.ledger_event_id == case.missing_in_channel.event_id
    assert missing_channel.difference_fen == -case.missing_in_channel.subsidy_fen
    assert missing_channel.order_difference_fen == -case.missing_in_channel.order_fen

    [duplicate] = by_status[STATUS.RECONCILIATION_STATUS_DUPLICATE_IN_FILE]
    assert duplicate.line_number == case.duplicate.line_number
    assert duplicate.kind == pb.RECONCILIATION_KIND_REFUND
    assert duplicate.difference_fen == case.duplicate.refund_fen > 0

    run = answer.run
    counts = {count.status: (count.lines, count.difference_fen) for count in run.counts}
    assert counts[STATUS.RECONCILIATION_STATUS_AMOUNT_MISMATCH] == (1, 123)
    assert counts[STATUS.RECONCILIATION_STATUS_MISSING_IN_LEDGER] == (1, 4_567)
    assert counts[STATUS.RECONCILIATION_STATUS_MISSING_IN_CHANNEL] == (1, -case.missing_in_channel.subsidy_fen)
    assert run.exception_lines == 4
    assert run.ledger_items == len(world.items)
    ledger_net = sum(item.subsidy_fen if item.kind == PAYMENT else -item.subsidy_fen for item in world.items)
    assert run.ledger_net_subsidy_fen == ledger_net
    assert run.channel_net_subsidy_fen - run.ledger_net_subsidy_fen == 123 + 4_567 - case.missing_in_channel.subsidy_fen
    exceptions_only = await results(world.client(GOVERNMENT), run.run_id, include_matched=False)
    assert sorted(line.status for line in exceptions_only) == sorted(
        [
            STATUS.RECONCILIATION_STATUS_AMOUNT_MISMATCH,
            STATUS.RECONCILIATION_STATUS_MISSING_IN_LEDGER,
            STATUS.RECONCILIATION_STATUS_MISSING_IN_CHANNEL,
            STATUS.RECONCILIATION_STATUS_DUPLICATE_IN_FILE,
        ]
    )


async def test_reimport_changes_nothing_and_a_corrected_file_supersedes(world: World) -> None:
    """The same file again (another request id) is a replay: same run, no new rows. A corrected
    file becomes the current run; the first is kept, marked superseded, its lines intact."""
    case = with_exceptions(world)
    day = world.day.isoformat()
    async with world.client(OPERATOR) as client:
        first = await import_bytes(client, case.file, business_date=day, channel="supersede-day")
        runs_before, lines_before = (
            await count_rows(world, "reconciliation_runs"),
            await count_rows(world, "reconciliation_lines"),
        )
        again = await import_bytes(client, case.file, business_date=day, channel="supersede-day")
        assert again.replayed and not again.applied and again.run.run_id == first.run.run_id
        same_id = str(uuid.uuid4())
        await import_bytes(client, case.file, business_date=day, channel="supersede-day", request_id=same_id)
        # The same request id with another file is a conflict, not a replay.
        with pytest.raises(IdempotencyConflict):
            await import_bytes(client, b"other", business_date=day, channel="supersede-day", request_id=same_id)
        assert await count_rows(world, "reconciliation_runs") == runs_before
        assert await count_rows(world, "reconciliation_lines") == lines_before

        corrected = encode(numbered(mirrored(world.items)))
        second = await import_bytes(client, corrected, business_date=day, channel="supersede-day")
        assert second.applied and second.run.supersedes_run_id == first.run.run_id
        assert second.run.exception_lines == 0
        current = await client.list(channel="supersede-day")
        assert [run.run_id for run in current] == [second.run.run_id]
        history = await client.list(channel="supersede-day", include_superseded=True)
        assert {run.run_id for run in history} == {first.run.run_id, second.run.run_id}
        old = next(run for run in history if run.run_id == first.run.run_id)
        assert old.superseded_by_run_id == second.run.run_id and old.superseded_at.seconds > 0
        # The superseded run's results are still there, as they were.
        assert len(await results(client, first.run.run_id, include_matched=False)) == 4
        # By channel and day: the current run.
        parts = [part async for part in client.results(channel="supersede-day", business_date=day)]
        assert parts[0].run.run_id == second.run.run_id
    connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute("DELETE FROM reconciliation_runs")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute("UPDATE reconciliation_lines SET difference_fen = 0")
    finally:
        await connection.close()


async def test_malformed_files_are_refused_whole_or_imported_with_line_errors(world: World) -> None:
    """All-or-nothing: a bad amount and a bad id are reported by line and column, nothing is
    stored. Good lines: the rest is matched, the bad lines stored as BAD_LINE. A missing column
    or a line after the summary refuses the file whole, naming line and column."""
    lines = numbered(mirrored(world.items[:20]))
    text = "".join(standard_file(lines)).splitlines(keepends=True)
    text[4] = text[4].replace(f",{lines[3].authorization_id},", ",not-an-id,")
    fields = text[6].split(",")
    fields[3] = "12.5"
    text[6] = ",".join(fields)
    data = "".join(text).encode()
    runs_before = await count_rows(world, "reconciliation_runs")
    async with world.client(OPERATOR) as client:
        refused = await import_bytes(client, data, business_date=world.day.isoformat(), channel="malformed")
        assert not refused.applied and refused.run.run_id == ""
        assert [(error.line_number, error.column) for error in refused.errors] == [
            (5, "authorization_id"),
            (7, "subsidy_fen"),
        ]
        assert refused.lines_rejected == 2 and refused.lines_received == 20
        assert await count_rows(world, "reconciliation_runs") == runs_before

        partial = await import_bytes(
            client,
            data,
            business_date=world.day.isoformat(),
            channel="malformed",
            mode=pb.SETTLEMENT_IMPORT_MODE_GOOD_LINES,
        )
        assert partial.applied and partial.lines_rejected == 2
        bad = [
            line
            for line in await results(client, partial.run.run_id)
            if line.status == STATUS.RECONCILIATION_STATUS_BAD_LINE
        ]
        assert [(line.line_number, line.error.split(":")[0]) for line in bad] == [
            (5, "authorization_id"),
            (7, "subsidy_fen"),
        ]

        no_column = b"channel_txn_id,authorization_id,subsidy_fen,time\r\nA,B,1,2\r\n"
        with pytest.raises(InvalidArgument) as missing:
            await import_bytes(client, no_column, business_date=world.day.isoformat(), channel="malformed")
        assert missing.value.metadata["line"] == "1" and missing.value.metadata["column"] == "status"
        with pytest.raises(InvalidArgument) as not_utf8:
            await import_bytes(client, b"channel_txn_id\r\n\xff\xfe\r\n", business_date=world.day.isoformat())
        assert not_utf8.value.metadata["field"] == "file"
        with pytest.raises(InvalidArgument) as bad_day:
            await import_bytes(client, data, business_date="2026-02-30")
        assert bad_day.value.metadata["field"] == "header.business_date"


WECHAT_COLUMNS = (
    "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,"
    "应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,商品名称,商户数据包,"
    "手续费,费率,订单金额,申请退款金额,费率备注"
)


def wechat_bill(items: list[LedgerItem], trailer_count: int | None = None) -> bytes:
    """A WeChat-Pay-style bill: Chinese headers, a backtick before every value, yuan with two
    decimals, SUCCESS / REFUND / REVOKED lines, then the summary header and line."""
    rows = [WECHAT_COLUMNS]
    count = 0
    refund_total = 0
    for index, item in enumerate(items):
        moment = item.occurred_at.astimezone(CALENDAR.zone).strftime("%Y-%m-%d %H:%M:%S")
        payment = item.kind == PAYMENT
        refund_fen = 0 if payment else item.subsidy_fen
        refund_total += refund_fen
        values = [
            moment, "wx0000", "1900000001", "1900000002", "POS1", f"42000{index:010d}", item.authorization_id,
            "oUSER", "MICROPAY", "SUCCESS" if payment else "REFUND", "CMB_DEBIT", "CNY",
            yuan(item.order_fen - item.subsidy_fen) if payment else "0.00",
            yuan(item.subsidy_fen) if payment else "0.00",
            "" if payment else f"50300{index:010d}", "", yuan(refund_fen), yuan(refund_fen), "", "",
            "家电", "", "0.00", "0.60%", yuan(item.order_fen) if payment else "0.00", "0.00", "",
        ]  # fmt: skip
        rows.append(",".join(f"`{value}" for value in values))
        count += 1
    # A payment cancelled after success: listed, not matched (the mapping ignores REVOKED).
    rows.append(
        ",".join(
            f"`{value}"
            for value in [moment, "", "", "", "", "42999", items[0].authorization_id, "", "", "REVOKED", *[""] * 17]
        )
    )
    count += 1
    rows.append("总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额")
    rows.append(
        f"`{trailer_count if trailer_count is not None else count},`0.00,`0.00,`{yuan(refund_total)},`0.00,`0.00,`0.00"
    )
    return ("\r\n".join(rows) + "\r\n").encode()


WECHAT_MAPPING = pb.SettlementColumnMapping(
    name="wechat-style",
    channel_txn_id="微信订单号",
    refund_txn_id="微信退款单号",
    authorization_id="商户订单号",
    order_amount="订单金额",
    subsidy_amount="代金券金额",
    refund_amount="充值券退款金额",
    time="交易时间",
    status="交易状态",
    payment_status_values=["SUCCESS"],
    refund_status_values=["REFUND"],
    ignore_status_values=["REVOKED"],
    amount_unit="YUAN",
    trailer_marker="总交易单数",
    trailer_count="总交易单数",
    trailer_refund_total="充值券退款总金额",
    time_format="%Y-%m-%d %H:%M:%S",
    time_zone="Asia/Shanghai",
)


async def test_a_wechat_style_bill_through_a_column_mapping(world: World) -> None:
    """Backticks stripped, yuan converted exactly to fen, the summary checked and told apart
    from transactions, REVOKED ignored: every line matches. A summary that disagrees with the
    lines refuses the file, naming the summary's line and column."""
    day = world.day.isoformat()
    async with world.client(OPERATOR) as client:
        answer = await import_bytes(
            client, wechat_bill(world.items), business_date=day, channel="wechat-style", mapping=WECHAT_MAPPING
        )
        assert answer.applied, list(answer.errors)
        assert answer.run.exception_lines == 0 and answer.run.ignored_lines == 1
        assert answer.run.file_lines == len(world.items) and answer.run.mapping_name == "wechat-style"
        assert answer.run.channel_net_subsidy_fen == answer.run.ledger_net_subsidy_fen
        with pytest.raises(InvalidArgument) as refused:
            await import_bytes(
                client,
                wechat_bill(world.items, trailer_count=3),
                business_date=day,
                channel="wechat-style",
                mapping=WECHAT_MAPPING,
            )
        assert refused.value.metadata["column"] == "总交易单数"
        assert refused.value.metadata["line"] == str(len(world.items) + 4)


def fen(text: str) -> int:
    whole, _, cents = text.partition(".")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole)) * 100 + int(cents))


async def test_exports_parse_back_to_the_fen(world: World) -> None:
    """CSV with a BOM and Chinese headers, XLSX with yuan numbers: the exceptions, exactly."""
    case = with_exceptions(world)
    async with world.client(OPERATOR) as operator:
        answer = await import_bytes(operator, case.file, business_date=world.day.isoformat(), channel="export-day")
    async with world.client(GOVERNMENT) as reader:
        lines = await results(reader, answer.run.run_id, include_matched=False)
        parts = [part async for part in reader.export(answer.run.run_id)]
        assert parts[0].file_name.endswith("-exceptions.csv") and parts[0].run_id == answer.run.run_id
        data = b"".join(part.chunk for part in parts)
        assert data.startswith("\ufeff".encode())
        records = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
        assert [fen(record["补贴差额(元)"]) for record in records] == [line.difference_fen for line in lines]
        assert [record["状态"] for record in records] == [
            "金额不符",
            "渠道有、台账无",
            "渠道文件重复",
            "台账有、渠道无",
        ]
        parts = [
            part async for part in reader.export(answer.run.run_id, file_format=pb.RECONCILIATION_EXPORT_FORMAT_XLSX)
        ]
        book = openpyxl.load_workbook(io.BytesIO(b"".join(part.chunk for part in parts)), read_only=True)
        assert book.sheetnames == ["异常明细", "说明"]
        sheet = list(book["异常明细"].iter_rows(values_only=True))
        titles = sheet[0]
        assert [round(dict(zip(titles, row, strict=True))["补贴差额(元)"] * 100) for row in sheet[1:]] == [
            line.difference_fen for line in lines
        ]
        with pytest.raises(NotFound):
            [part async for part in reader.export(str(uuid.uuid4()))]


@pytest.mark.parametrize("caller_id", [AUDITOR, TERMINAL, PARTNER])
async def test_other_callers_are_refused(world: World, caller_id: str) -> None:
    async with world.client(caller_id) as client:
        with pytest.raises(PermissionDenied):
            await client.list()
        with pytest.raises(PermissionDenied):
            [part async for part in client.results(channel=CHANNEL, business_date=world.day.isoformat())]
        with pytest.raises(PermissionDenied):
            [part async for part in client.export(channel=CHANNEL, business_date=world.day.isoformat())]
        with pytest.raises(PermissionDenied):
            await import_bytes(client, b"x", business_date=world.day.isoformat())


async def test_government_reads_but_does_not_import(world: World) -> None:
    before = await count_rows(world, "reconciliation_runs")
    async with world.client(GOVERNMENT) as client:
        await client.list(include_superseded=True)
        with pytest.raises(PermissionDenied):
            await import_bytes(client, encode(numbered(mirrored(world.items))), business_date=world.day.isoformat())
    assert await count_rows(world, "reconciliation_runs") == before


async def ctl(world: World, caller_id: str, *arguments: str) -> Result:
    environment = {"SUBSIDYCTL_OPERATOR": caller_id, "SUBSIDYCTL_SECRET": world.credentials[caller_id]}
    target = f"127.0.0.1:{world.gateway.port}"
    return await asyncio.to_thread(
        CliRunner().invoke, subsidyctl, ["--target", target, *arguments], env=environment, catch_exceptions=False
    )


async def test_subsidyctl_recon_commands(world: World, tmp_path: Path) -> None:
    """`subsidyctl recon import|show|export`: the WeChat-style bill through the example mapping
    (examples/reconciliation/wechat-style.yaml) imports clean (exit 0); a file with exceptions
    is a finding (exit 1) shown as a table and as JSON; the export is written; a government
    user cannot import (exit 1, PERMISSION_DENIED)."""
    day = world.day.isoformat()
    bill = tmp_path / "wechat.csv"
    bill.write_bytes(wechat_bill(world.items))
    mapping = str(ROOT / "examples" / "reconciliation" / "wechat-style.yaml")
    clean = await ctl(
        world, OPERATOR, "recon", "import", str(bill), "--channel", "cli-wechat", "--date", day, "--mapping", mapping
    )
    assert clean.exit_code == 0, clean.output
    assert "imported: run" in clean.stdout

    exceptions = tmp_path / "exceptions.csv"
    exceptions.write_bytes(with_exceptions(world).file)
    imported = await ctl(
        world, OPERATOR, "--json", "recon", "import", str(exceptions), "--channel", "cli-std", "--date", day
    )
    assert imported.exit_code == 1, imported.output
    run_id = json.loads(imported.stdout)["run"]["run_id"]
    again = await ctl(world, OPERATOR, "recon", "import", str(exceptions), "--channel", "cli-std", "--date", day)
    assert "already imported: nothing changed" in again.stdout

    shown = await ctl(world, GOVERNMENT, "recon", "show", "--channel", "cli-std", "--date", day)
    assert shown.exit_code == 1 and "AMOUNT_MISMATCH" in shown.stdout and "金额不符" in shown.stdout
    assert "1.23" in shown.stdout  # the 123 fen difference, in yuan
    as_json = await ctl(world, GOVERNMENT, "recon", "show", "--run", run_id, "--json")
    document = json.loads(as_json.stdout)
    assert document["run"]["run_id"] == run_id
    assert sorted(line["status"] for line in document["lines"]) == sorted(
        [
            "RECONCILIATION_STATUS_AMOUNT_MISMATCH",
            "RECONCILIATION_STATUS_MISSING_IN_LEDGER",
            "RECONCILIATION_STATUS_MISSING_IN_CHANNEL",
            "RECONCILIATION_STATUS_DUPLICATE_IN_FILE",
        ]
    )
    listed = await ctl(world, GOVERNMENT, "recon", "show", "--json")
    assert {item["channel"] for item in json.loads(listed.stdout)} >= {"cli-std", "cli-wechat"}

    out = tmp_path / "exceptions.xlsx"
    exported = await ctl(world, GOVERNMENT, "recon", "export", "--run", run_id, "--format", "xlsx", "--out", str(out))
    assert exported.exit_code == 0, exported.output
    assert openpyxl.load_workbook(out, read_only=True).sheetnames == ["异常明细", "说明"]

    position = next(line["position"] for line in document["lines"] if "MISSING_IN_LEDGER" in line["status"])
    resolved = await ctl(
        world, OPERATOR, "recon", "resolve", "--run", run_id, "--position", str(position), "--reason", "not ours"
    )
    assert resolved.exit_code == 0 and f"resolved by {OPERATOR}: not ours" in resolved.stdout, resolved.output
    refused = await ctl(world, GOVERNMENT, "recon", "import", str(exceptions), "--channel", "cli-gov", "--date", day)
    assert refused.exit_code == 1 and "PERMISSION_DENIED" in refused.output


async def test_exceptions_are_resolved_by_operators_with_who_when_why(world: World) -> None:
    """An operator resolves an exception with a reason: the line then carries who, when and
    why (the results themselves unchanged), the run counts it, the export shows it; the same
    request again is a replay; a second resolution, a MATCHED line, a superseded run's line or
    a government user are refused, and an unknown line is NOT_FOUND."""
    case = with_exceptions(world)
    day = world.day.isoformat()
    async with world.client(OPERATOR) as operator:
        answer = await import_bytes(operator, case.file, business_date=day, channel="resolve-day")
        run_id = answer.run.run_id
        lines = await results(operator, run_id)
        mismatch = next(line for line in lines if line.status == STATUS.RECONCILIATION_STATUS_AMOUNT_MISMATCH)
        matched = next(line for line in lines if line.status == STATUS.RECONCILIATION_STATUS_MATCHED)
        request_id = str(uuid.uuid4())
        resolved = await operator.resolve(run_id, mismatch.position, "渠道已于次日冲正 1.23 元", request_id=request_id)
        assert not resolved.replayed and resolved.line.resolved_by == OPERATOR
        assert resolved.line.resolution == "渠道已于次日冲正 1.23 元" and resolved.line.resolved_at.seconds > 0
        assert resolved.line.difference_fen == 123  # the result itself is as it was
        again = await operator.resolve(run_id, mismatch.position, "渠道已于次日冲正 1.23 元", request_id=request_id)
        assert again.replayed and again.line.resolved_at == resolved.line.resolved_at
        with pytest.raises(FailedPrecondition) as twice:
            await operator.resolve(run_id, mismatch.position, "again")
        assert twice.value.metadata["state"] == "RESOLVED"
        with pytest.raises(FailedPrecondition) as not_exception:
            await operator.resolve(run_id, matched.position, "nothing to do")
        assert not_exception.value.metadata["state"] == "MATCHED"
        with pytest.raises(NotFound):
            await operator.resolve(run_id, 10**9, "no such line")
        with pytest.raises(InvalidArgument) as no_reason:
            await operator.resolve(run_id, mismatch.position, "  ")
        assert no_reason.value.metadata["field"] == "reason"
        [listed] = await operator.list(channel="resolve-day")
        assert listed.resolved_lines == 1 and listed.exception_lines == 4
        shown = {line.position: line for line in await results(operator, run_id, include_matched=False)}
        assert shown[mismatch.position].resolved_by == OPERATOR
        parts = [part async for part in operator.export(run_id)]
        records = list(csv.DictReader(io.StringIO(b"".join(part.chunk for part in parts).decode("utf-8-sig"))))
        assert [record["处理说明"] for record in records if record["状态"] == "金额不符"] == [
            "渠道已于次日冲正 1.23 元"
        ]

        corrected = await import_bytes(
            operator, encode(numbered(mirrored(world.items))), business_date=day, channel="resolve-day"
        )
        assert corrected.run.supersedes_run_id == run_id
        missing = next(line for line in lines if line.status == STATUS.RECONCILIATION_STATUS_MISSING_IN_LEDGER)
        with pytest.raises(FailedPrecondition) as superseded:
            await operator.resolve(run_id, missing.position, "too late")
        assert superseded.value.metadata["state"] == "SUPERSEDED"
    async with world.client(GOVERNMENT) as government:
        with pytest.raises(PermissionDenied):
            await government.resolve(run_id, missing.position, "not mine to say")
