"""The pure rules of the T+1 daily report: the business calendar and its cut-off, budget lines
and their identities, the streaming tie-out checks, the content hash, and the CSV and XLSX
files parsed back (server/domain/daily_report.py, report_files.py, ledger_sim.py)."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import openpyxl
import pytest

from server.domain.daily_report import (
    ADJUSTMENT,
    AHEAD_PART,
    CATEGORY_TOTAL,
    DAY,
    DAY_PART,
    DISTRICT_TOTAL,
    LATE_PART,
    MERCHANT,
    RANGE_PART,
    BudgetLine,
    BusinessCalendar,
    ChainHead,
    ContentHasher,
    Figures,
    Flows,
    ReportHeader,
    ReportRow,
    RowChecker,
    Rule,
    TieOutError,
    budget_line,
    parse_business_date,
    yuan,
)
from server.domain.errors import InvalidField
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from server.domain.report_files import BUDGET_COLUMNS, ROW_COLUMNS, ROW_COLUMNS_V2, XlsxReport, csv_lines

SHANGHAI = BusinessCalendar("Asia/Shanghai", "00:30")


def test_a_business_day_is_a_shanghai_calendar_day() -> None:
    start, end = SHANGHAI.bounds(date(2026, 3, 1))
    assert start == datetime(2026, 2, 28, 16, 0, tzinfo=UTC)
    assert end == datetime(2026, 3, 1, 16, 0, tzinfo=UTC)
    assert SHANGHAI.day_of(datetime(2026, 2, 28, 15, 59, 59, tzinfo=UTC)) == date(2026, 2, 28)
    assert SHANGHAI.day_of(datetime(2026, 2, 28, 16, 0, tzinfo=UTC)) == date(2026, 3, 1)


def test_a_day_closes_at_the_cutoff_of_the_next_day() -> None:
    assert SHANGHAI.closes_at(date(2026, 3, 1)) == datetime(2026, 3, 1, 16, 30, tzinfo=UTC)
    # 00:29 on 2 March in Shanghai: 1 March is not closed yet, 28 February is.
    assert SHANGHAI.last_closed_day(datetime(2026, 3, 1, 16, 29, tzinfo=UTC)) == date(2026, 2, 28)
    assert SHANGHAI.last_closed_day(datetime(2026, 3, 1, 16, 30, tzinfo=UTC)) == date(2026, 3, 1)
    late_cutoff = BusinessCalendar("Asia/Shanghai", "06:00")
    assert late_cutoff.last_closed_day(datetime(2026, 3, 1, 21, 59, tzinfo=UTC)) == date(2026, 2, 28)
    assert BusinessCalendar("UTC", "00:00").last_closed_day(datetime(2026, 3, 2, tzinfo=UTC)) == date(2026, 3, 1)


@pytest.mark.parametrize("cutoff", ["24:00", "7:00", "00:60", "noon", ""])
def test_a_bad_cutoff_or_zone_is_refused(cutoff: str) -> None:
    with pytest.raises(ValueError, match="cut-off"):
        BusinessCalendar("Asia/Shanghai", cutoff)


def test_an_unknown_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        BusinessCalendar("Mars/Olympus", "00:30")


@pytest.mark.parametrize("text", ["2026-3-1", "2026-02-30", "20260301", "", "2026-03-01T00:00"])
def test_a_bad_business_date_names_the_field(text: str) -> None:
    with pytest.raises(InvalidField) as raised:
        parse_business_date(text, "up_to_date")
    assert raised.value.field == "up_to_date"


def test_yuan_is_exact_from_integer_fen() -> None:
    assert [yuan(value) for value in (0, 5, 91_980, 100, -5, 123_456_789_012_345)] == [
        "0.00",
        "0.05",
        "919.80",
        "1.00",
        "-0.05",
        "1234567890123.45",
    ]


RULE = Rule("c1", "Trade-in", "fridge", 1_000_000)


def flows(*items: tuple[str, str, str, int, int]) -> Flows:
    result = Flows()
    for part, account, event_type, debit, credit in items:
        result.add(part, account, event_type, debit, credit)
    return result


def test_a_budget_line_ties_out_from_independent_balances() -> None:
    """Opening from the previous line; closing from the chain balance less later days' entries;
    the movements of the day and its adjustments in between."""
    previous = budget_line(
        RULE,
        flows(
            (DAY_PART, "PENDING", "AUTHORIZED", 500, 0),
            (DAY_PART, "PENDING", "CAPTURED", 0, 300),
            (DAY_PART, "MERCHANT_RECEIVABLE", "CAPTURED", 300, 0),
            (RANGE_PART, "PENDING", "AUTHORIZED", 500, 0),
            (RANGE_PART, "PENDING", "CAPTURED", 0, 300),
            (RANGE_PART, "MERCHANT_RECEIVABLE", "CAPTURED", 300, 0),
            # 100 authorized after midnight, already in the ledger at the cut: ahead.
            (RANGE_PART, "PENDING", "AUTHORIZED", 100, 0),
            (AHEAD_PART, "PENDING", "AUTHORIZED", 100, 0),
        ),
        None,
        0,
    )
    assert (previous.closing_spent_fen, previous.closing_held_fen) == (300, 200)
    assert (previous.chain_spent_fen, previous.chain_held_fen) == (300, 300)
    line = budget_line(
        RULE,
        flows(
            (DAY_PART, "PENDING", "AUTHORIZED", 100, 0),  # the one ahead last time
            (DAY_PART, "PENDING", "EXPIRED", 0, 200),
            (DAY_PART, "PENDING", "CAPTURED", 0, 100),
            (DAY_PART, "MERCHANT_RECEIVABLE", "CAPTURED", 100, 0),
            (DAY_PART, "MERCHANT_RECEIVABLE", "REFUNDED", 0, 50),
            (RANGE_PART, "PENDING", "EXPIRED", 0, 200),
            (RANGE_PART, "PENDING", "CAPTURED", 0, 100),
            (RANGE_PART, "MERCHANT_RECEIVABLE", "CAPTURED", 100, 0),
            (RANGE_PART, "MERCHANT_RECEIVABLE", "REFUNDED", 0, 50),
            # A late capture of an earlier day: an adjustment.
            (LATE_PART, "PENDING", "AUTHORIZED", 40, 0),
            (LATE_PART, "PENDING", "CAPTURED", 0, 40),
            (LATE_PART, "MERCHANT_RECEIVABLE", "CAPTURED", 40, 0),
        ),
        previous,
        0,
    )
    assert (line.opening_spent_fen, line.captured_fen, line.refunded_fen, line.closing_spent_fen) == (300, 140, 50, 390)
    assert (line.opening_held_fen, line.held_fen, line.released_hold_fen, line.closing_held_fen) == (200, 140, 200, 0)
    assert line.remaining_fen == 1_000_000 - 390


def test_a_budget_that_does_not_tie_out_is_refused() -> None:
    # A capture counted in the day but missing from the chain's balance.
    broken = flows(
        (DAY_PART, "PENDING", "AUTHORIZED", 500, 0),
        (DAY_PART, "PENDING", "CAPTURED", 0, 500),
        (DAY_PART, "MERCHANT_RECEIVABLE", "CAPTURED", 500, 0),
        (RANGE_PART, "PENDING", "AUTHORIZED", 500, 0),
    )
    with pytest.raises(TieOutError, match="opening 0 \\+ captured 500"):
        budget_line(RULE, broken, None, 0)
    with pytest.raises(TieOutError, match="posting rules"):
        budget_line(RULE, flows((DAY_PART, "MERCHANT_RECEIVABLE", "VOIDED", 5, 0)), None, 0)


def test_tranches_released_by_the_days_end() -> None:
    end_ms = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp() * 1000)
    rule = Rule("c1", "", "fridge", 1_000, ((end_ms - 1, 300), (end_ms, 700)))
    assert budget_line(rule, Flows(), None, end_ms).released_fen == 300


def merchant(category: str, merchant_id: str, sales: int, fen: int, consumers: int, kind: str = DAY) -> ReportRow:
    figures = Figures(consumers, sales, sales, fen, fen * 5, 0, 0, 1 if sales else 0)
    return ReportRow(kind, MERCHANT, None, "c1", "", category, merchant_id, "", figures)


def total(level: str, category: str, figures: Figures, kind: str = DAY) -> ReportRow:
    campaign = "c1" if level == CATEGORY_TOTAL else ""
    return ReportRow(kind, level, None, campaign, "", category, "", "", figures)


def checked_rows() -> list[ReportRow]:
    return [
        merchant("fridge", "m1", 2, 100, 2),
        merchant("fridge", "m2", 1, 50, 1),
        total(CATEGORY_TOTAL, "fridge", Figures(2, 3, 3, 150, 750, 0, 0, 2)),
        merchant("tv", "m1", 1, 30, 1),
        total(CATEGORY_TOTAL, "tv", Figures(1, 1, 1, 30, 150, 0, 0, 1)),
        total(DISTRICT_TOTAL, "", Figures(2, 4, 4, 180, 900, 0, 0, 2)),
    ]


def budgets_for(rows: list[ReportRow]) -> list[BudgetLine]:
    lines = []
    for row in rows:
        if row.level == CATEGORY_TOTAL:
            lines.append(
                BudgetLine(
                    "c1", "", row.category, 0, 0, 0, row.figures.redeemed_fen, 0, row.figures.redeemed_fen,
                    0, row.figures.redeemed_fen, 0, 0, -row.figures.redeemed_fen, 0, 0,
                )
            )  # fmt: skip
    return lines


def test_the_row_checker_accepts_rows_that_add_up() -> None:
    checker = RowChecker()
    rows = checked_rows()
    for row in rows:
        checker.add(row)
    checker.finish(budgets_for(rows))


@pytest.mark.parametrize(
    ("index", "change", "problem"),
    [
        (0, {"redeemed_fen": 101}, "redeemed_fen"),
        (2, {"merchants": 3}, "merchants"),
        (2, {"consumers": 4}, "distinct consumers"),
        (5, {"order_fen": 1}, "order_fen"),
        (5, {"consumers": 5}, "distinct consumers"),
    ],
)
def test_the_row_checker_refuses_rows_that_do_not(index: int, change: dict[str, int], problem: str) -> None:
    rows = checked_rows()
    rows[index] = replace(rows[index], figures=replace(rows[index].figures, **change))
    checker = RowChecker()
    with pytest.raises(TieOutError, match=problem):
        for row in rows:
            checker.add(row)


def test_the_row_checker_ties_rows_to_budgets_and_order() -> None:
    rows = checked_rows()
    checker = RowChecker()
    for row in rows:
        checker.add(row)
    lines = budgets_for(rows)
    with pytest.raises(TieOutError, match="budget captured"):
        checker.finish([replace(lines[0], captured_fen=149), lines[1]])
    with pytest.raises(TieOutError, match="without a budget line"):
        checker.finish(lines[:1])
    with pytest.raises(TieOutError, match="no district total"):
        RowChecker().finish([])
    shuffled = [rows[0], rows[3], rows[1]]
    checker = RowChecker()
    with pytest.raises(TieOutError, match=r"not together|apart"):
        for row in shuffled:
            checker.add(row)


def header(**changes: object) -> ReportHeader:
    base = ReportHeader(
        business_date=date(2026, 3, 1),
        timezone="Asia/Shanghai",
        cutoff="00:30",
        day_starts_at=datetime(2026, 2, 28, 16, tzinfo=UTC),
        day_ends_at=datetime(2026, 3, 1, 16, tzinfo=UTC),
        cut_at=datetime(2026, 3, 1, 16, 31, 2, 123456, tzinfo=UTC),
        published_by="scheduler",
        previous_date=None,
        previous_hash="0" * 64,
        chain_heads=(ChainHead("c1", 42, "ab" * 32),),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def digest(head: ReportHeader, rows: list[ReportRow]) -> str:
    hasher = ContentHasher(head)
    for row in rows:
        hasher.row(row)
    return hasher.hexdigest()


def test_the_content_hash_covers_header_rows_and_their_order() -> None:
    rows = checked_rows()
    reference = digest(header(), rows)
    assert digest(header(), rows) == reference
    assert digest(header(chain_heads=(ChainHead("c1", 43, "ab" * 32),)), rows) != reference
    assert digest(header(previous_hash="1" * 64), rows) != reference
    assert digest(header(), [rows[1], rows[0], *rows[2:]]) != reference
    assert digest(header(), rows[:-1]) != reference
    altered = replace(rows[0], merchant_name="a|b")
    assert digest(header(), [altered, *rows[1:]]) != digest(header(), [replace(rows[0], merchant_name="a"), *rows[1:]])
    # Counts and the hash itself are not part of the material (they are derived from it).
    assert digest(header(row_count=99, content_hash="x"), rows) == reference


def sample_rows() -> list[ReportRow]:
    return [
        ReportRow(DAY, MERCHANT, None, "c1", "以旧换新", "fridge", "m1", "杭州,电器\"店\"",
                  Figures(2, 2, 3, 91_980, 459_900, 1, 5, 1)),
        ReportRow(ADJUSTMENT, MERCHANT, date(2026, 2, 28), "c1", "以旧换新", "fridge", "m1", "店",
                  Figures(1, 1, 1, 1, 2, 0, 0, 1)),
    ]  # fmt: skip


def sample_budget() -> BudgetLine:
    return BudgetLine(
        "c1", "以旧换新", "fridge", 10_000_000_000_000 - 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 123_456_789_012_345, 0, 0
    )


def test_the_csv_has_a_bom_chinese_headers_and_exact_yuan() -> None:
    data = b"".join(csv_lines(header(), ROW_COLUMNS, sample_rows()))
    assert data.startswith(b"\xef\xbb\xbf")
    parsed = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    assert parsed[0] == ["业务日期", *(column.title for column in ROW_COLUMNS)]
    assert "核销金额（元）" in parsed[0] and "订单金额（元）" in parsed[0] and "核销退款金额（元）" in parsed[0]
    first = dict(zip(parsed[0], parsed[1], strict=True))
    assert first["业务日期"] == "2026-03-01"
    assert first["商户名称"] == '杭州,电器"店"'
    assert first["核销金额（元）"] == "919.80"
    assert first["订单金额（元）"] == "4599.00"
    assert first["核销退款金额（元）"] == "0.05"
    assert first["类型"] == "本日" and first["层级"] == "商户"
    second = dict(zip(parsed[0], parsed[2], strict=True))
    assert (second["类型"], second["原业务日期"]) == ("调整", "2026-02-28")
    budgets = list(
        csv.reader(io.StringIO(b"".join(csv_lines(header(), BUDGET_COLUMNS, [sample_budget()])).decode("utf-8-sig")))
    )
    line = dict(zip(budgets[0], budgets[1], strict=True))
    assert line["预算总额（元）"] == "99999999999.99"
    assert line["预算余额（元）"] == "1234567890123.45"


def test_the_xlsx_has_three_sheets_and_exact_yuan(tmp_path: object) -> None:
    report = XlsxReport(header(content_hash="f" * 64, row_count=2))
    report.budget(sample_budget())
    for row in sample_rows():
        report.row(row)
    buffer = io.BytesIO()
    report.save(buffer)
    book = openpyxl.load_workbook(io.BytesIO(buffer.getvalue()))
    assert book.sheetnames == ["日报", "预算", "说明"]
    rows = list(book["日报"].iter_rows(values_only=True))
    assert rows[0] == ("业务日期", *(column.title for column in ROW_COLUMNS_V2))  # a format-2 report
    record = dict(zip(rows[0], rows[1], strict=True))
    assert record["核销金额（元）"] == pytest.approx(919.80)
    assert book["日报"].cell(row=2, column=13).number_format == "#,##0.00"
    assert record["核销笔数"] == 2 and record["商户名称"] == '杭州,电器"店"'
    budgets = list(book["预算"].iter_rows(values_only=True))
    assert dict(zip(budgets[0], budgets[1], strict=True))["预算余额（元）"] == pytest.approx(1234567890123.45)
    about = dict(book["说明"].iter_rows(values_only=True))
    assert about["内容哈希 content SHA-256"] == "f" * 64
    assert about["账链头 chain head c1"] == f"42 {'ab' * 32}"
    # The numbers are written as exact decimal text (no binary-float digits such as
    # 919.7999999999), equal to the integer fen over 100.
    archive = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    numbers = re.findall(r"<v>([^<]*)</v>", archive.read("xl/worksheets/sheet1.xml").decode())
    assert [Decimal(text) for text in numbers[3:7]] == [Decimal("919.80"), Decimal("4599.00"), 1, Decimal("0.05")]
    assert all(len(text.partition(".")[2]) <= 2 for text in numbers)
    assert "<v>1234567890123.45</v>" in archive.read("xl/worksheets/sheet2.xml").decode()


def test_the_simulator_emits_every_lifecycle_in_time_order() -> None:
    settings = SimSettings(campaigns=(SimCampaign("c1", ("fridge", "tv")),), merchants=("m1", "m2", "m3"), seed=2,
                           refund_share=0.2, partial_refund_share=0.4)  # fmt: skip
    start = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp() * 1000)
    events = list(simulate(settings, start, start + 2 * 86_400_000, 2_000))
    assert [payload["at_ms"] for _, payload in events] == sorted(payload["at_ms"] for _, payload in events)
    assert len({entry_id for entry_id, _ in events}) == len(events)
    assert {payload["type"] for _, payload in events} == {"AUTHORIZED", "CAPTURED", "VOIDED", "EXPIRED", "REFUNDED"}
    states = {payload["state"] for _, payload in events if payload["type"] == "REFUNDED"}
    assert states == {"REFUNDED", "PARTIALLY_REFUNDED"}
    assert all(start <= payload["at_ms"] < start + 2 * 86_400_000 for _, payload in events)
    # Deterministic from its seed.
    assert list(simulate(settings, start, start + 86_400_000, 50)) == list(
        simulate(settings, start, start + 86_400_000, 50)
    )
    refunded = sum(payload["amount_fen"] for _, payload in events if payload["type"] == "REFUNDED")
    captured = sum(payload["amount_fen"] for _, payload in events if payload["type"] == "CAPTURED")
    assert 0 < refunded < captured
    assert timedelta(milliseconds=events[-1][1]["at_ms"] - events[0][1]["at_ms"]) > timedelta(days=1)
