"""DailyReportService: the T+1 daily reports for the bureau (issue 12, section 1).

Publishing is for operators (audited in ``operator_actions`` under the request's id); reading
(list, stream, export) for operators and the bureau's government users; every other caller,
auditors included, is refused PERMISSION_DENIED. The cut itself is storage's
(storage/postgres/daily_reports.py) and the rules the domain's (server/domain/daily_report.py).

Large reports travel as server streams: rows in chunks of ``ROWS_PER_MESSAGE`` read through a
cursor, files in chunks of ``FILE_CHUNK_BYTES`` (an XLSX is built in openpyxl's write-only mode
into a temporary file, then streamed), so neither side holds a report whole.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client.v1 import common_pb2, daily_report_pb2, daily_report_pb2_grpc

from server.domain.daily_report import (
    ADJUSTMENT,
    CATEGORY_TOTAL,
    DAY,
    DISTRICT_TOTAL,
    MERCHANT,
    BudgetLine,
    BusinessCalendar,
    DayNotClosed,
    Figures,
    ReportHeader,
    ReportRow,
    parse_business_date,
)
from server.domain.errors import InvalidField, NotFound
from server.domain.report_files import XlsxReport, budget_columns, csv_head, csv_line, row_columns
from server.rpc.auth import GOVERNMENT, OPERATOR, caller_in
from server.rpc.errors import ApiError
from server.services.operations import OperatorDeps, begin_action
from storage.postgres import daily_reports
from storage.postgres.actions import Action, Scope, record
from storage.postgres.pool import Connection

ROWS_PER_MESSAGE = 500
FILE_CHUNK_BYTES = 64 * 1024
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 100, 1000
READERS = (OPERATOR, GOVERNMENT)
KIND_TO_PROTO = {
    DAY: daily_report_pb2.DAILY_REPORT_ROW_KIND_DAY,
    ADJUSTMENT: daily_report_pb2.DAILY_REPORT_ROW_KIND_ADJUSTMENT,
}
LEVEL_TO_PROTO = {
    MERCHANT: daily_report_pb2.DAILY_REPORT_ROW_LEVEL_MERCHANT,
    CATEGORY_TOTAL: daily_report_pb2.DAILY_REPORT_ROW_LEVEL_CATEGORY_TOTAL,
    DISTRICT_TOTAL: daily_report_pb2.DAILY_REPORT_ROW_LEVEL_DISTRICT_TOTAL,
}
PROTO_TO_LEVEL: dict[int, str] = {int(value): key for key, value in LEVEL_TO_PROTO.items()}
CSV_TYPE = "text/csv; charset=utf-8"
XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def figures_message(figures: Figures) -> daily_report_pb2.DailyReportFigures:
    return daily_report_pb2.DailyReportFigures(
        consumers=figures.consumers,
        sales=figures.sales,
        units=figures.units,
        redeemed_fen=figures.redeemed_fen,
        order_fen=figures.order_fen,
        refunds=figures.refunds,
        refunded_fen=figures.refunded_fen,
        merchants=figures.merchants,
        clawbacks=figures.clawbacks,
        clawed_back_fen=figures.clawed_back_fen,
    )


def header_message(
    header: ReportHeader, totals: dict[str, Figures] | None = None
) -> daily_report_pb2.DailyReportHeader:
    totals = totals or {}
    return daily_report_pb2.DailyReportHeader(
        business_date=header.business_date.isoformat(),
        time_zone=header.timezone,
        cutoff=header.cutoff,
        day_starts_at=_stamp(header.day_starts_at),
        day_ends_at=_stamp(header.day_ends_at),
        cut_at=_stamp(header.cut_at),
        published_by=header.published_by,
        previous_date=header.previous_date.isoformat() if header.previous_date else "",
        previous_hash=header.previous_hash,
        chain_heads=[
            daily_report_pb2.ChainHead(campaign_id=head.campaign_id, entry_seq=head.seq, entry_hash=head.hash)
            for head in header.chain_heads
        ],
        budget_count=header.budget_count,
        row_count=header.row_count,
        adjustment_rows=header.adjustment_rows,
        format_version=header.format_version,
        content_hash=header.content_hash,
        day_total=figures_message(totals.get(DAY, Figures())),
        adjustment_total=figures_message(totals.get(ADJUSTMENT, Figures())),
        tickets_opened=header.tickets_opened,
        tickets_resolved=header.tickets_resolved,
        tickets_overdue=header.tickets_overdue,
    )


def budget_message(line: BudgetLine) -> daily_report_pb2.DailyReportBudget:
    return daily_report_pb2.DailyReportBudget(
        campaign_id=line.campaign_id,
        campaign_name=line.campaign_name,
        category=line.category,
        budget_fen=line.budget_fen,
        released_fen=line.released_fen,
        opening_spent_fen=line.opening_spent_fen,
        captured_fen=line.captured_fen,
        refunded_fen=line.refunded_fen,
        closing_spent_fen=line.closing_spent_fen,
        opening_held_fen=line.opening_held_fen,
        held_fen=line.held_fen,
        released_hold_fen=line.released_hold_fen,
        closing_held_fen=line.closing_held_fen,
        remaining_fen=line.remaining_fen,
        clawed_back_fen=line.clawed_back_fen,
        opening_recovered_fen=line.opening_recovered_fen,
        closing_recovered_fen=line.closing_recovered_fen,
    )


def row_message(row: ReportRow) -> daily_report_pb2.DailyReportRow:
    return daily_report_pb2.DailyReportRow(
        kind=KIND_TO_PROTO[row.kind],
        level=LEVEL_TO_PROTO[row.level],
        original_date=row.original_date.isoformat() if row.original_date else "",
        campaign_id=row.campaign_id,
        campaign_name=row.campaign_name,
        category=row.category,
        merchant_id=row.merchant_id,
        merchant_name=row.merchant_name,
        figures=figures_message(row.figures),
    )


def _optional_date(value: str, field: str) -> date | None:
    return parse_business_date(value, field) if value.strip() else None


def _levels(values: Sequence[int]) -> list[str]:
    levels = []
    for index, value in enumerate(values):
        level = PROTO_TO_LEVEL.get(int(value))
        if level is None:
            raise InvalidField(f"levels[{index}]", "must be MERCHANT, CATEGORY_TOTAL or DISTRICT_TOTAL")
        levels.append(level)
    return levels


class DailyReportService(daily_report_pb2_grpc.DailyReportServiceServicer):
    def __init__(self, deps: OperatorDeps, calendar: BusinessCalendar) -> None:
        self._pool = deps.pool
        self._calendar = calendar

    async def PublishDailyReports(
        self, request: daily_report_pb2.PublishDailyReportsRequest, context: grpc.aio.ServicerContext
    ) -> daily_report_pb2.PublishDailyReportsResponse:
        action = begin_action("PublishDailyReports", request, "daily_report", request.up_to_date or "(last closed)")
        up_to = _optional_date(request.up_to_date, "up_to_date")
        # A caller that gives up (its deadline) does not abandon a cut half-way: it completes
        # and commits, and asking again finds the days published.
        work = asyncio.ensure_future(self._publish(action, request.up_to_date, up_to))
        work.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved, if abandoned
        try:
            result, totals = await asyncio.shield(work)
        except DayNotClosed as error:
            raise ApiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                common_pb2.ERROR_REASON_INVALID_STATE,
                str(error),
                {"state": "OPEN", "closes_at": error.closes_at.isoformat()},
            ) from None
        return daily_report_pb2.PublishDailyReportsResponse(
            published=[header_message(header, totals.get(header.business_date)) for header in result.published],
            last_published_date=result.last_published.isoformat() if result.last_published else "",
            last_closed_date=result.last_closed.isoformat(),
        )

    async def _publish(
        self, action: Action, up_to_text: str, up_to: date | None
    ) -> tuple[daily_reports.PublishResult, dict[date, dict[str, Figures]]]:
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            async with connection.transaction():
                # The audit row; a replayed request id publishes nothing twice anyway.
                await record(connection, action, {"up_to_date": up_to_text}, Scope())
            result = await daily_reports.publish_closed_days(
                connection, self._calendar, datetime.now(UTC), action.operator_id, up_to
            )
            totals = await daily_reports.district_totals(
                connection, [header.business_date for header in result.published]
            )
        return result, totals

    async def ListDailyReports(
        self, request: daily_report_pb2.ListDailyReportsRequest, context: grpc.aio.ServicerContext
    ) -> daily_report_pb2.ListDailyReportsResponse:
        caller_in(*READERS)
        since = _optional_date(request.from_date, "from_date")
        until = _optional_date(request.to_date, "to_date")
        if not 0 <= request.limit <= LIST_LIMIT_MAX:
            raise InvalidField("limit", f"must be between 0 and {LIST_LIMIT_MAX}")
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            headers = await daily_reports.list_headers(connection, since, until, request.limit or LIST_LIMIT_DEFAULT)
            totals = await daily_reports.district_totals(connection, [header.business_date for header in headers])
        return daily_report_pb2.ListDailyReportsResponse(
            reports=[header_message(header, totals.get(header.business_date)) for header in headers]
        )

    async def StreamDailyReport(
        self, request: daily_report_pb2.StreamDailyReportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[daily_report_pb2.StreamDailyReportResponse]:
        caller_in(*READERS)
        day = parse_business_date(request.business_date)
        levels = _levels(request.levels)
        pool = await self._pool.get()
        async with pool.acquire() as connection, daily_reports.reading(connection):
            header = await self._header(connection, day)
            totals = await daily_reports.district_totals(connection, [day])
            yield daily_report_pb2.StreamDailyReportResponse(header=header_message(header, totals.get(day)))
            budgets = [budget_message(line) async for line in daily_reports.stream_budgets(connection, day)]
            yield daily_report_pb2.StreamDailyReportResponse(budgets=budgets)
            chunk: list[daily_report_pb2.DailyReportRow] = []
            async for row in daily_reports.stream_rows(connection, day, levels):
                chunk.append(row_message(row))
                if len(chunk) >= ROWS_PER_MESSAGE:
                    yield daily_report_pb2.StreamDailyReportResponse(rows=chunk)
                    chunk = []
            if chunk:
                yield daily_report_pb2.StreamDailyReportResponse(rows=chunk)

    async def ExportDailyReport(
        self, request: daily_report_pb2.ExportDailyReportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[daily_report_pb2.ExportDailyReportResponse]:
        caller_in(*READERS)
        day = parse_business_date(request.business_date)
        if request.format not in (daily_report_pb2.EXPORT_FORMAT_CSV, daily_report_pb2.EXPORT_FORMAT_XLSX):
            raise InvalidField("format", "must be EXPORT_FORMAT_CSV or EXPORT_FORMAT_XLSX")
        if request.table not in (
            daily_report_pb2.EXPORT_TABLE_UNSPECIFIED,
            daily_report_pb2.EXPORT_TABLE_ROWS,
            daily_report_pb2.EXPORT_TABLE_BUDGETS,
        ):
            raise InvalidField("table", "must be EXPORT_TABLE_ROWS or EXPORT_TABLE_BUDGETS")
        pool = await self._pool.get()
        async with pool.acquire() as connection, daily_reports.reading(connection):
            header = await self._header(connection, day)
            name = f"daily-report-{day.isoformat()}"
            if request.format == daily_report_pb2.EXPORT_FORMAT_CSV:
                budgets_only = request.table == daily_report_pb2.EXPORT_TABLE_BUDGETS
                first = daily_report_pb2.ExportDailyReportResponse(
                    file_name=f"{name}{'-budgets' if budgets_only else ''}.csv",
                    content_type=CSV_TYPE,
                    content_hash=header.content_hash,
                )
                async for message in self._csv(connection, header, budgets_only, first):
                    yield message
            else:
                first = daily_report_pb2.ExportDailyReportResponse(
                    file_name=f"{name}.xlsx", content_type=XLSX_TYPE, content_hash=header.content_hash
                )
                async for message in self._xlsx(connection, header, first):
                    yield message

    async def _header(self, connection: Connection, day: date) -> ReportHeader:
        found = await daily_reports.header(connection, day)
        if found is None:
            raise NotFound("daily report", day.isoformat())
        return found

    async def _csv(
        self,
        connection: Connection,
        header: ReportHeader,
        budgets_only: bool,
        first: daily_report_pb2.ExportDailyReportResponse,
    ) -> AsyncIterator[daily_report_pb2.ExportDailyReportResponse]:
        day = header.business_date
        budget_table, row_table = budget_columns(header), row_columns(header)
        pending, buffer = first, bytearray(csv_head(budget_table if budgets_only else row_table))
        if budgets_only:
            async for line in daily_reports.stream_budgets(connection, day):
                buffer += csv_line(header, budget_table, line)
        else:
            async for row in daily_reports.stream_rows(connection, day):
                buffer += csv_line(header, row_table, row)
                if len(buffer) >= FILE_CHUNK_BYTES:
                    pending.chunk = bytes(buffer)
                    yield pending
                    pending, buffer = daily_report_pb2.ExportDailyReportResponse(), bytearray()
        pending.chunk = bytes(buffer)
        yield pending

    async def _xlsx(
        self, connection: Connection, header: ReportHeader, first: daily_report_pb2.ExportDailyReportResponse
    ) -> AsyncIterator[daily_report_pb2.ExportDailyReportResponse]:
        day = header.business_date
        report = XlsxReport(header)
        async for line in daily_reports.stream_budgets(connection, day):
            report.budget(line)
        async for row in daily_reports.stream_rows(connection, day):
            report.row(row)
        descriptor, path = tempfile.mkstemp(suffix=".xlsx")
        os.close(descriptor)
        try:
            await asyncio.to_thread(report.save, path)
            pending = first
            with open(path, "rb") as handle:  # noqa: ASYNC230 - a local temporary file, read in chunks
                while data := handle.read(FILE_CHUNK_BYTES):
                    pending.chunk = data
                    yield pending
                    pending = daily_report_pb2.ExportDailyReportResponse()
            if pending is first:
                yield first
        finally:
            os.unlink(path)
