"""A reconciliation run's exceptions as files for people: CSV (UTF-8 with a BOM, so Excel opens
the Chinese headers correctly) and XLSX (sheets 异常明细 and 说明). Pure: result lines in,
bytes out. Amounts are integer fen in the results; the files show yuan with two decimals
converted exactly (``yuan`` and ``money`` of the daily report's files), never through a float.
The XLSX is built in openpyxl's write-only mode, row by row.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import datetime
from typing import IO, Any

import openpyxl
from openpyxl.cell import WriteOnlyCell
from openpyxl.styles import Font

from server.domain.daily_report import yuan
from server.domain.report_files import BOM, MONEY_FORMAT, Column, money

STATUS_NAMES = {
    "MATCHED": "一致",
    "AMOUNT_MISMATCH": "金额不符",
    "MISSING_IN_LEDGER": "渠道有、台账无",
    "MISSING_IN_CHANNEL": "台账有、渠道无",
    "DUPLICATE_IN_FILE": "渠道文件重复",
    "BAD_LINE": "无法读取",
}
KIND_NAMES = {"PAYMENT": "支付", "REFUND": "退款", "": ""}
EXCEPTIONS_SHEET, ABOUT_SHEET = "异常明细", "说明"


def _time(value: datetime | None) -> str:
    return value.isoformat() if value is not None else ""


COLUMNS: tuple[Column, ...] = (
    Column("状态", "status", lambda line: STATUS_NAMES[line["status"]], width=14),
    Column("类型", "kind", lambda line: KIND_NAMES[line["kind"]], width=8),
    Column("文件行号", "line_number", lambda line: line["line_number"] or "", width=10),
    Column("渠道交易号", "channel_txn_id", lambda line: line["channel_txn_id"], width=32),
    Column("授权号", "authorization_id", lambda line: line["authorization_id"], width=34),
    Column("台账事件", "ledger_event_id", lambda line: line["ledger_event_id"], width=20),
    Column("台账渠道参考号", "ledger_channel_reference", lambda line: line["ledger_channel_reference"], width=32),
    Column("商户", "merchant_id", lambda line: line["merchant_id"], width=14),
    Column("渠道补贴金额(元)", "channel_subsidy_fen", lambda line: line["channel_subsidy_fen"], money=True),
    Column("台账补贴金额(元)", "ledger_subsidy_fen", lambda line: line["ledger_subsidy_fen"], money=True),
    Column("补贴差额(元)", "difference_fen", lambda line: line["difference_fen"], money=True),
    Column("渠道订单金额(元)", "channel_order_fen", lambda line: line["channel_order_fen"], money=True),
    Column("台账订单金额(元)", "ledger_order_fen", lambda line: line["ledger_order_fen"], money=True),
    Column("订单差额(元)", "order_difference_fen", lambda line: line["order_difference_fen"], money=True),
    Column("渠道时间", "channel_time", lambda line: _time(line["channel_time"]), width=26),
    Column("台账时间", "ledger_time", lambda line: _time(line["ledger_time"]), width=26),
    Column("说明", "error", lambda line: line["error"], width=40),
    Column("处理人", "resolved_by", lambda line: line.get("resolved_by", ""), width=16),
    Column("处理时间", "resolved_at", lambda line: _time(line.get("resolved_at")), width=26),
    Column("处理说明", "resolution", lambda line: line.get("resolution", ""), width=40),
)


def _csv_row(values: Iterable[Any]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(list(values))
    return buffer.getvalue().encode("utf-8")


def csv_head() -> bytes:
    """The CSV's first line: a BOM and the Chinese headers (渠道, 业务日期 first)."""
    return BOM.encode("utf-8") + _csv_row(["渠道", "业务日期", *(column.title for column in COLUMNS)])


def csv_line(run: dict[str, Any], line: dict[str, Any]) -> bytes:
    values = [run["channel"], run["business_date"].isoformat()]
    for column in COLUMNS:
        value = column.value(line)
        values.append(yuan(value) if column.money else str(value))
    return _csv_row(values)


def about(run: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = [
        ("渠道 channel", run["channel"]),
        ("业务日期 business date", run["business_date"].isoformat()),
        ("批次 run", str(run["run_id"])),
        ("文件 file", run["file_name"]),
        ("文件 SHA-256", run["file_sha256"]),
        ("导入人 imported by", run["imported_by"]),
        ("导入时间 imported at (UTC)", run["imported_at"].isoformat()),
        ("渠道净补贴(元) channel net subsidy", yuan(run["channel_net_subsidy_fen"])),
        ("台账净补贴(元) ledger net subsidy", yuan(run["ledger_net_subsidy_fen"])),
    ]
    if run["superseded_at"] is not None:
        pairs.append(("已被替代 superseded by", str(run["superseded_by_run_id"])))
    return pairs


class XlsxExceptions:
    """An XLSX of one run's exceptions, row by row (openpyxl write-only)."""

    def __init__(self, run: dict[str, Any]) -> None:
        self._run = run
        self._book = openpyxl.Workbook(write_only=True)
        self._sheet = self._book.create_sheet(EXCEPTIONS_SHEET)
        about_sheet = self._book.create_sheet(ABOUT_SHEET)
        bold = Font(bold=True)
        for index, column in enumerate(COLUMNS, start=3):
            self._sheet.column_dimensions[openpyxl.utils.get_column_letter(index)].width = column.width
        self._sheet.freeze_panes = "A2"
        titles = ["渠道", "业务日期", *(column.title for column in COLUMNS)]
        header = []
        for title in titles:
            cell = WriteOnlyCell(self._sheet, value=title)
            cell.font = bold
            header.append(cell)
        self._sheet.append(header)
        about_sheet.column_dimensions["A"].width = 36
        about_sheet.column_dimensions["B"].width = 70
        for label, value in about(run):
            about_sheet.append([label, value])

    def line(self, line: dict[str, Any]) -> None:
        values: list[Any] = [self._run["channel"], self._run["business_date"].isoformat()]
        for column in COLUMNS:
            value = column.value(line)
            if column.money:
                cell = WriteOnlyCell(self._sheet, value=money(value))
                cell.number_format = MONEY_FORMAT
                values.append(cell)
            else:
                values.append(value)
        self._sheet.append(values)

    def save(self, target: str | IO[bytes]) -> None:
        self._book.save(target)
