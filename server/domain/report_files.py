"""A daily report as files for people: CSV (UTF-8 with a BOM, so Excel opens the Chinese
headers correctly) and XLSX, with Chinese column headers. Pure: rows in, bytes out.

Money is integer fen in the report; the files show yuan with two decimals, converted exactly
from the integers (``yuan``: 91980 fen -> "919.80"; in the XLSX a decimal number written as
that exact text, formatted ``#,##0.00``), never through a float. Both writers take the rows
one at a time, so a large report never sits in memory whole: the CSV is produced line by
line, the XLSX through openpyxl's write-only mode (rows go to a temporary file as they come).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import IO, Any

import openpyxl
from openpyxl.cell import WriteOnlyCell
from openpyxl.styles import Font

from server.domain.daily_report import (
    ADJUSTMENT,
    CATEGORY_TOTAL,
    DAY,
    DISTRICT_TOTAL,
    MERCHANT,
    BudgetLine,
    ReportHeader,
    ReportRow,
    yuan,
)

BOM = "\ufeff"
KIND_NAMES = {DAY: "本日", ADJUSTMENT: "调整"}
LEVEL_NAMES = {MERCHANT: "商户", CATEGORY_TOTAL: "活动品类合计", DISTRICT_TOTAL: "全区合计"}
ROWS_SHEET, BUDGETS_SHEET, ABOUT_SHEET = "日报", "预算", "说明"
MONEY_FORMAT = "#,##0.00"


@dataclass(frozen=True)
class Column:
    title: str  # the Chinese header
    key: str  # the English name (the JSON field)
    value: Callable[[Any], Any]
    money: bool = False
    width: int = 14


def _figure(name: str) -> Callable[[ReportRow], int]:
    return lambda row: int(getattr(row.figures, name))


ROW_COLUMNS: tuple[Column, ...] = (
    Column("类型", "kind", lambda row: KIND_NAMES[row.kind], width=8),
    Column("层级", "level", lambda row: LEVEL_NAMES[row.level], width=14),
    Column(
        "原业务日期", "original_date", lambda row: row.original_date.isoformat() if row.original_date else "", width=12
    ),
    Column("活动编号", "campaign_id", lambda row: row.campaign_id, width=22),
    Column("活动名称", "campaign_name", lambda row: row.campaign_name, width=28),
    Column("品类", "category", lambda row: row.category, width=16),
    Column("商户编号", "merchant_id", lambda row: row.merchant_id, width=18),
    Column("商户名称", "merchant_name", lambda row: row.merchant_name, width=28),
    Column("补贴人数", "consumers", _figure("consumers"), width=10),
    Column("核销笔数", "sales", _figure("sales"), width=10),
    Column("核销件数", "units", _figure("units"), width=10),
    Column("核销金额（元）", "redeemed_fen", _figure("redeemed_fen"), money=True, width=16),
    Column("订单金额（元）", "order_fen", _figure("order_fen"), money=True, width=16),
    Column("退款笔数", "refunds", _figure("refunds"), width=10),
    Column("核销退款金额（元）", "refunded_fen", _figure("refunded_fen"), money=True, width=18),
    Column("核销商家数", "merchants", _figure("merchants"), width=10),
)
# Format 2 (claw-backs): the same columns, then these. A format-1 report's file is as it was.
ROW_COLUMNS_V2: tuple[Column, ...] = (
    *ROW_COLUMNS,
    Column("追回笔数", "clawbacks", _figure("clawbacks"), width=10),
    Column("追回金额（元）", "clawed_back_fen", _figure("clawed_back_fen"), money=True, width=16),
)


def _budget(name: str) -> Callable[[BudgetLine], Any]:
    return lambda line: getattr(line, name)


BUDGET_COLUMNS: tuple[Column, ...] = (
    Column("活动编号", "campaign_id", _budget("campaign_id"), width=22),
    Column("活动名称", "campaign_name", _budget("campaign_name"), width=28),
    Column("品类", "category", _budget("category"), width=16),
    Column("预算总额（元）", "budget_fen", _budget("budget_fen"), money=True, width=18),
    Column("已下达预算（元）", "released_fen", _budget("released_fen"), money=True, width=18),
    Column("期初已核销（元）", "opening_spent_fen", _budget("opening_spent_fen"), money=True, width=18),
    Column("本期核销（元）", "captured_fen", _budget("captured_fen"), money=True, width=16),
    Column("本期核销退款（元）", "refunded_fen", _budget("refunded_fen"), money=True, width=18),
    Column("期末已核销（元）", "closing_spent_fen", _budget("closing_spent_fen"), money=True, width=18),
    Column("期初冻结（元）", "opening_held_fen", _budget("opening_held_fen"), money=True, width=16),
    Column("本期冻结（元）", "held_fen", _budget("held_fen"), money=True, width=16),
    Column("本期解冻（元）", "released_hold_fen", _budget("released_hold_fen"), money=True, width=16),
    Column("期末冻结（元）", "closing_held_fen", _budget("closing_held_fen"), money=True, width=16),
    Column("预算余额（元）", "remaining_fen", _budget("remaining_fen"), money=True, width=18),
)
BUDGET_COLUMNS_V2: tuple[Column, ...] = (
    *BUDGET_COLUMNS,
    Column("本期追回（元）", "clawed_back_fen", _budget("clawed_back_fen"), money=True, width=16),
    Column("期初已追回（元）", "opening_recovered_fen", _budget("opening_recovered_fen"), money=True, width=18),
    Column("期末已追回（元）", "closing_recovered_fen", _budget("closing_recovered_fen"), money=True, width=18),
)


def row_columns(header: ReportHeader) -> tuple[Column, ...]:
    """The rows' columns of a report of this format."""
    return ROW_COLUMNS if header.format_version < 2 else ROW_COLUMNS_V2


def budget_columns(header: ReportHeader) -> tuple[Column, ...]:
    return BUDGET_COLUMNS if header.format_version < 2 else BUDGET_COLUMNS_V2


def about(header: ReportHeader) -> list[tuple[str, str]]:
    """The report's identity, as (label, value) pairs: the XLSX's 说明 sheet."""
    pairs = [
        ("业务日期 business date", header.business_date.isoformat()),
        ("时区 time zone", header.timezone),
        ("截止时间 cut-off (next day)", header.cutoff),
        ("日开始 day starts (UTC)", header.day_starts_at.isoformat()),
        ("日结束 day ends (UTC)", header.day_ends_at.isoformat()),
        ("生成时间 cut at (UTC)", header.cut_at.isoformat()),
        ("发布人 published by", header.published_by),
        ("上一报告 previous report", header.previous_date.isoformat() if header.previous_date else ""),
        ("上一报告哈希 previous hash", header.previous_hash),
        ("内容哈希 content SHA-256", header.content_hash),
        ("格式版本 format version", str(header.format_version)),
        ("行数 rows", str(header.row_count)),
        ("调整行数 adjustment rows", str(header.adjustment_rows)),
    ]
    if header.format_version >= 2:
        pairs += [
            ("受理投诉 tickets opened", str(header.tickets_opened)),
            ("办结投诉 tickets resolved or rejected", str(header.tickets_resolved)),
            ("超时投诉 tickets overdue at the day's end", str(header.tickets_overdue)),
        ]
    pairs += [(f"账链头 chain head {head.campaign_id}", f"{head.seq} {head.hash}") for head in header.chain_heads]
    return pairs


def _csv_line(values: Iterable[Any]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(list(values))
    return buffer.getvalue().encode("utf-8")


def _text(column: Column, item: Any) -> str:
    value = column.value(item)
    return yuan(value) if column.money else str(value)


def csv_head(columns: tuple[Column, ...]) -> bytes:
    """The CSV's first line: a BOM and the headers (业务日期 first)."""
    return BOM.encode("utf-8") + _csv_line(["业务日期", *(column.title for column in columns)])


def csv_line(header: ReportHeader, columns: tuple[Column, ...], item: Any) -> bytes:
    """One row or budget line; amounts in yuan with two decimals."""
    return _csv_line([header.business_date.isoformat(), *(_text(column, item) for column in columns)])


def csv_lines(header: ReportHeader, columns: tuple[Column, ...], items: Iterable[Any]) -> Iterator[bytes]:
    """The CSV, one line of bytes at a time."""
    yield csv_head(columns)
    for item in items:
        yield csv_line(header, columns, item)


def money(fen: int) -> Decimal:
    """Fen as an exact decimal number of yuan (never a float)."""
    return Decimal(fen).scaleb(-2)


class XlsxReport:
    """An XLSX of one report built row by row (openpyxl write-only): sheet 日报 (the rows),
    预算 (the budget lines) and 说明 (the report's identity and hashes). Write the budgets and
    the identity, add the rows as they come, then ``save``."""

    def __init__(self, header: ReportHeader) -> None:
        self._header = header
        self._book = openpyxl.Workbook(write_only=True)
        self._rows = self._book.create_sheet(ROWS_SHEET)
        self._budgets = self._book.create_sheet(BUDGETS_SHEET)
        self._about = self._book.create_sheet(ABOUT_SHEET)
        self._bold = Font(bold=True)
        self._row_columns, self._budget_columns = row_columns(header), budget_columns(header)
        self._prepare(self._rows, self._row_columns)
        self._prepare(self._budgets, self._budget_columns)
        self._about.column_dimensions["A"].width = 34
        self._about.column_dimensions["B"].width = 80
        for label, value in about(header):
            self._about.append([WriteOnlyCell(self._about, value=label), value])

    def _prepare(self, sheet: Any, columns: tuple[Column, ...]) -> None:
        letters = [openpyxl.utils.get_column_letter(index) for index in range(1, len(columns) + 2)]
        sheet.column_dimensions[letters[0]].width = 12
        for letter, column in zip(letters[1:], columns, strict=True):
            sheet.column_dimensions[letter].width = column.width
        sheet.freeze_panes = "A2"
        titles = ["业务日期", *(column.title for column in columns)]
        sheet.append([self._cell(sheet, title, bold=True) for title in titles])

    def _cell(self, sheet: Any, value: Any, bold: bool = False, money_format: bool = False) -> WriteOnlyCell:
        cell = WriteOnlyCell(sheet, value=value)
        if bold:
            cell.font = self._bold
        if money_format:
            cell.number_format = MONEY_FORMAT
        return cell

    def _append(self, sheet: Any, columns: tuple[Column, ...], item: Any) -> None:
        values: list[Any] = [self._header.business_date.isoformat()]
        for column in columns:
            value = column.value(item)
            values.append(self._cell(sheet, money(value), money_format=True) if column.money else value)
        sheet.append(values)

    def budget(self, line: BudgetLine) -> None:
        self._append(self._budgets, self._budget_columns, line)

    def row(self, row: ReportRow) -> None:
        self._append(self._rows, self._row_columns, row)

    def save(self, target: str | IO[bytes]) -> None:
        self._book.save(target)
