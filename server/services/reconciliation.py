"""ReconciliationService: a payment channel's settlement file matched against the ledger of its
business day (issue 12, section 3; docs/reconciliation.md).

Importing is for operators (audited under the header's request id); reading and exporting for
operators and the bureau's government users; every other caller is refused PERMISSION_DENIED.
The uploaded bytes go to a spooled temporary file (memory up to 8 MiB, then disk) while their
SHA-256 is computed; storage (storage/postgres/reconciliation.py) reads that file line by line.
Results travel as server streams in chunks, never a run whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from typing import Any

import grpc
import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client.v1 import common_pb2, reconciliation_pb2, reconciliation_pb2_grpc

from server.domain.bill_matching import STATUSES
from server.domain.daily_report import BusinessCalendar, parse_business_date
from server.domain.errors import InvalidField, NotFound
from server.domain.reconciliation_files import XlsxExceptions, csv_head, csv_line
from server.domain.settlement_file import CHANNEL_NAME, ColumnMapping, FileRefused
from server.rpc.auth import GOVERNMENT, OPERATOR, caller, caller_in
from server.rpc.errors import ApiError
from server.services.operations import OperatorDeps, begin_action
from storage.postgres import reconciliation
from storage.postgres.pool import Connection

LINES_PER_MESSAGE = 500
FILE_CHUNK_BYTES = 64 * 1024
CHUNK_BYTES_MAX = 1 << 20
FILE_BYTES_MAX = 1 << 30
SPOOL_BYTES = 8 << 20
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 100, 1000
READERS = (OPERATOR, GOVERNMENT)
REASON_LENGTH_MAX = 500
RESOLVE_REFUSALS = {
    "MATCHED": "a matched line is not an exception: there is nothing to resolve",
    "RESOLVED": "this line is already resolved",
    "SUPERSEDED": "this run was superseded by a corrected file: resolve the line in the current run",
}
METHOD = "ImportSettlementFile"
MODES = {
    reconciliation_pb2.SETTLEMENT_IMPORT_MODE_UNSPECIFIED: reconciliation.ALL_OR_NOTHING,
    reconciliation_pb2.SETTLEMENT_IMPORT_MODE_ALL_OR_NOTHING: reconciliation.ALL_OR_NOTHING,
    reconciliation_pb2.SETTLEMENT_IMPORT_MODE_GOOD_LINES: reconciliation.GOOD_LINES,
}
MODE_TO_PROTO = {
    reconciliation.ALL_OR_NOTHING: reconciliation_pb2.SETTLEMENT_IMPORT_MODE_ALL_OR_NOTHING,
    reconciliation.GOOD_LINES: reconciliation_pb2.SETTLEMENT_IMPORT_MODE_GOOD_LINES,
}
STATUS_TO_PROTO = {
    status: reconciliation_pb2.ReconciliationStatus.Value(f"RECONCILIATION_STATUS_{status}") for status in STATUSES
}
KIND_TO_PROTO = {
    "PAYMENT": reconciliation_pb2.RECONCILIATION_KIND_PAYMENT,
    "REFUND": reconciliation_pb2.RECONCILIATION_KIND_REFUND,
    "": reconciliation_pb2.RECONCILIATION_KIND_UNSPECIFIED,
}
CSV_TYPE = "text/csv; charset=utf-8"
XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def run_message(run: dict[str, Any]) -> reconciliation_pb2.ReconciliationRun:
    counts = run["counts"]
    if isinstance(counts, str):
        counts = orjson.loads(counts)
    message = reconciliation_pb2.ReconciliationRun(
        run_id=str(run["run_id"]),
        channel=run["channel"],
        business_date=run["business_date"].isoformat(),
        file_name=run["file_name"],
        file_sha256=run["file_sha256"],
        mapping_name=run["mapping_name"],
        mode=MODE_TO_PROTO[run["mode"]],
        imported_by=run["imported_by"],
        imported_at=_stamp(run["imported_at"]),
        superseded_by_run_id=str(run["superseded_by_run_id"] or ""),
        supersedes_run_id=str(run["supersedes_run_id"] or ""),
        file_lines=run["file_lines"],
        ignored_lines=run["ignored_lines"],
        ledger_items=run["ledger_items"],
        counts=[
            reconciliation_pb2.ReconciliationStatusCount(
                status=STATUS_TO_PROTO[status], lines=counts[status][0], difference_fen=counts[status][1]
            )
            for status in STATUSES
            if status in counts
        ],
        channel_net_subsidy_fen=run["channel_net_subsidy_fen"],
        ledger_net_subsidy_fen=run["ledger_net_subsidy_fen"],
        exception_lines=sum(counts[status][0] for status in counts if status != "MATCHED"),
        resolved_lines=run.get("resolved_lines", 0),
    )
    if run["superseded_at"] is not None:
        message.superseded_at.CopyFrom(_stamp(run["superseded_at"]))
    return message


def line_message(line: dict[str, Any]) -> reconciliation_pb2.ReconciliationLine:
    message = reconciliation_pb2.ReconciliationLine(
        status=STATUS_TO_PROTO[line["status"]],
        kind=KIND_TO_PROTO[line["kind"]],
        line_number=line["line_number"],
        channel_txn_id=line["channel_txn_id"],
        authorization_id=line["authorization_id"],
        ledger_event_id=line["ledger_event_id"],
        ledger_channel_reference=line["ledger_channel_reference"],
        merchant_id=line["merchant_id"],
        channel_subsidy_fen=line["channel_subsidy_fen"],
        ledger_subsidy_fen=line["ledger_subsidy_fen"],
        channel_order_fen=line["channel_order_fen"],
        ledger_order_fen=line["ledger_order_fen"],
        difference_fen=line["difference_fen"],
        order_difference_fen=line["order_difference_fen"],
        error=line["error"],
        position=line["position"],
        resolved_by=line.get("resolved_by", ""),
        resolution=line.get("resolution", ""),
    )
    if line.get("resolved_at") is not None:
        message.resolved_at.CopyFrom(_stamp(line["resolved_at"]))
    if line["channel_time"] is not None:
        message.channel_time.CopyFrom(_stamp(line["channel_time"]))
    if line["ledger_time"] is not None:
        message.ledger_time.CopyFrom(_stamp(line["ledger_time"]))
    return message


def mapping_of(message: reconciliation_pb2.SettlementColumnMapping) -> ColumnMapping:
    """The header's mapping over the standard format's defaults; a bad one names its field."""
    defaults = ColumnMapping()
    values: dict[str, Any] = {}
    for name in (
        "name",
        "channel_txn_id",
        "authorization_id",
        "order_amount",
        "subsidy_amount",
        "refund_amount",
        "time",
        "status",
        "refund_txn_id",
        "trailer_marker",
        "trailer_count",
        "trailer_subsidy_total",
        "trailer_refund_total",
        "time_format",
        "time_zone",
    ):
        given = getattr(message, name).strip()
        values[name] = given if given else getattr(defaults, name)
    values["amount_unit"] = message.amount_unit.strip().upper() or defaults.amount_unit
    for name in ("payment_status_values", "refund_status_values", "ignore_status_values"):
        given_values = tuple(value.strip() for value in getattr(message, name) if value.strip())
        values[name] = given_values or getattr(defaults, name)
    try:
        return ColumnMapping(**values)
    except ValueError as error:
        raise InvalidField("header.mapping", str(error)) from None


def check_header(header: reconciliation_pb2.SettlementImportHeader) -> tuple[str, date, str, ColumnMapping]:
    channel = header.channel.strip()
    if not CHANNEL_NAME.fullmatch(channel):
        raise InvalidField("header.channel", "must be 1-64 characters of [a-z0-9_-]")
    day = parse_business_date(header.business_date, "header.business_date")
    if header.mode not in MODES:
        raise InvalidField("header.mode", "must be ALL_OR_NOTHING or GOOD_LINES")
    name = header.file_name.strip()
    if not name or len(name) > 256:
        raise InvalidField("header.file_name", "must name the file, in 1-256 characters")
    return channel, day, name, mapping_of(header.mapping)


def _refused(error: FileRefused) -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        common_pb2.ERROR_REASON_INVALID_FIELD,
        f"the settlement file is refused: {error}",
        {"field": "file", "line": str(error.line_number), "column": error.column},
    )


class ReconciliationService(reconciliation_pb2_grpc.ReconciliationServiceServicer):
    def __init__(self, deps: OperatorDeps, calendar: BusinessCalendar) -> None:
        self._pool = deps.pool
        self._calendar = calendar

    async def ImportSettlementFile(
        self,
        request_iterator: AsyncIterator[reconciliation_pb2.ImportSettlementFileRequest],
        context: grpc.aio.ServicerContext,
    ) -> reconciliation_pb2.ImportSettlementFileResponse:
        caller(OPERATOR)  # the role first: nothing of another caller's upload is read
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidField("header", "the first message must be the import header")
        header = first.header
        channel, day, file_name, mapping = check_header(header)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            digest = hashlib.sha256()
            size = 0
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidField("header", "only the first message may be a header")
                if len(message.chunk) > CHUNK_BYTES_MAX:
                    raise InvalidField("chunk", f"at most {CHUNK_BYTES_MAX} bytes per message")
                size += len(message.chunk)
                if size > FILE_BYTES_MAX:
                    raise InvalidField("chunk", f"a file of at most {FILE_BYTES_MAX} bytes")
                digest.update(message.chunk)
                spool.write(message.chunk)
            sha256 = digest.hexdigest()
            # The payload hash covers the header and the file's digest: the same request id with
            # another file is IDEMPOTENCY_CONFLICT.
            header.request_id = header.request_id.strip()
            probe = reconciliation_pb2.SettlementImportHeader()
            probe.CopyFrom(header)
            probe.file_name = f"{file_name}\n{sha256}"
            action = begin_action(METHOD, probe, "reconciliation", f"{channel}:{day.isoformat()}")
            start, end = self._calendar.bounds(day)
            upload = reconciliation.SettlementUpload(
                channel, day, start, end, file_name, sha256, mapping, MODES[header.mode], action
            )
            spool.seek(0)
            text = io.TextIOWrapper(spool, encoding="utf-8-sig", newline="")
            pool = await self._pool.get()
            try:
                async with pool.acquire() as connection:
                    outcome = await reconciliation.import_or_refuse(connection, upload, text)
            except FileRefused as error:
                raise _refused(error) from None
            except UnicodeDecodeError as error:
                raise _refused(FileRefused(0, "", f"not UTF-8 text ({error.reason} at byte {error.start})")) from None
            finally:
                text.detach()
        return reconciliation_pb2.ImportSettlementFileResponse(
            run=run_message(outcome.run) if outcome.run else None,
            replayed=outcome.replayed,
            applied=outcome.applied,
            errors=[
                reconciliation_pb2.SettlementLineError(
                    line_number=error.line_number, column=error.column, reason=error.reason
                )
                for error in outcome.errors
            ],
            errors_truncated=outcome.errors_truncated,
            lines_received=outcome.lines_received,
            lines_rejected=outcome.lines_rejected,
        )

    async def ResolveReconciliationLine(
        self, request: reconciliation_pb2.ResolveReconciliationLineRequest, context: grpc.aio.ServicerContext
    ) -> reconciliation_pb2.ResolveReconciliationLineResponse:
        caller(OPERATOR)
        try:
            run_id = str(uuid.UUID(request.run_id.strip()))
        except ValueError:
            raise InvalidField("run_id", "must be a UUID") from None
        if request.position <= 0:
            raise InvalidField("position", "must be a line's position (ReconciliationLine.position)")
        reason = request.reason.strip()
        if not reason or len(reason) > REASON_LENGTH_MAX:
            raise InvalidField("reason", f"must say why, in 1-{REASON_LENGTH_MAX} characters")
        request.run_id, request.reason = run_id, reason
        target = reconciliation.line_target(run_id, request.position)
        action = begin_action(reconciliation.RESOLVE_ACTION, request, "reconciliation_line", target)
        pool = await self._pool.get()
        try:
            async with pool.acquire() as connection:
                found = await reconciliation.resolve_line(connection, action, run_id, request.position, reason)
        except reconciliation.NotResolvable as refused:
            raise ApiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                common_pb2.ERROR_REASON_INVALID_STATE,
                RESOLVE_REFUSALS[refused.state],
                {"state": refused.state},
            ) from None
        if found is None:
            raise NotFound("reconciliation line", target)
        line, replayed = found
        return reconciliation_pb2.ResolveReconciliationLineResponse(line=line_message(line), replayed=replayed)

    async def ListReconciliationRuns(
        self, request: reconciliation_pb2.ListReconciliationRunsRequest, context: grpc.aio.ServicerContext
    ) -> reconciliation_pb2.ListReconciliationRunsResponse:
        caller_in(*READERS)
        channel = request.channel.strip()
        if channel and not CHANNEL_NAME.fullmatch(channel):
            raise InvalidField("channel", "must be 1-64 characters of [a-z0-9_-]")
        since = parse_business_date(request.from_date, "from_date") if request.from_date.strip() else None
        until = parse_business_date(request.to_date, "to_date") if request.to_date.strip() else None
        if not 0 <= request.limit <= LIST_LIMIT_MAX:
            raise InvalidField("limit", f"must be between 0 and {LIST_LIMIT_MAX}")
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            runs = await reconciliation.list_runs(
                connection, channel, since, until, request.include_superseded, request.limit or LIST_LIMIT_DEFAULT
            )
        return reconciliation_pb2.ListReconciliationRunsResponse(runs=[run_message(run) for run in runs])

    async def _run(self, connection: Connection, run_id: str, channel: str, business_date: str) -> dict[str, Any]:
        if run_id.strip():
            try:
                key = str(uuid.UUID(run_id.strip()))
            except ValueError:
                raise InvalidField("run_id", "must be a UUID") from None
            run = await reconciliation.run_by_id(connection, key)
            if run is None:
                raise NotFound("reconciliation run", key)
            return run
        name = channel.strip()
        if not CHANNEL_NAME.fullmatch(name):
            raise InvalidField("channel", "must be 1-64 characters of [a-z0-9_-] (or give run_id)")
        day = parse_business_date(business_date)
        run = await reconciliation.current_run(connection, name, day)
        if run is None:
            raise NotFound("reconciliation run", f"{name} {day.isoformat()}")
        return run

    async def StreamReconciliationResults(
        self, request: reconciliation_pb2.StreamReconciliationResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[reconciliation_pb2.StreamReconciliationResultsResponse]:
        caller_in(*READERS)
        pool = await self._pool.get()
        async with pool.acquire() as connection, connection.transaction(readonly=True):
            run = await self._run(connection, request.run_id, request.channel, request.business_date)
            yield reconciliation_pb2.StreamReconciliationResultsResponse(run=run_message(run))
            chunk: list[reconciliation_pb2.ReconciliationLine] = []
            async for line in reconciliation.stream_lines(connection, run["run_id"], request.include_matched):
                chunk.append(line_message(line))
                if len(chunk) >= LINES_PER_MESSAGE:
                    yield reconciliation_pb2.StreamReconciliationResultsResponse(lines=chunk)
                    chunk = []
            if chunk:
                yield reconciliation_pb2.StreamReconciliationResultsResponse(lines=chunk)

    async def ExportReconciliationExceptions(
        self, request: reconciliation_pb2.ExportReconciliationExceptionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[reconciliation_pb2.ExportReconciliationExceptionsResponse]:
        caller_in(*READERS)
        formats = (
            reconciliation_pb2.RECONCILIATION_EXPORT_FORMAT_UNSPECIFIED,
            reconciliation_pb2.RECONCILIATION_EXPORT_FORMAT_CSV,
            reconciliation_pb2.RECONCILIATION_EXPORT_FORMAT_XLSX,
        )
        if request.format not in formats:
            raise InvalidField("format", "must be RECONCILIATION_EXPORT_FORMAT_CSV or _XLSX")
        xlsx = request.format == reconciliation_pb2.RECONCILIATION_EXPORT_FORMAT_XLSX
        pool = await self._pool.get()
        async with pool.acquire() as connection, connection.transaction(readonly=True):
            run = await self._run(connection, request.run_id, request.channel, request.business_date)
            name = f"reconciliation-{run['channel']}-{run['business_date'].isoformat()}-exceptions"
            first = reconciliation_pb2.ExportReconciliationExceptionsResponse(
                file_name=f"{name}.{'xlsx' if xlsx else 'csv'}",
                content_type=XLSX_TYPE if xlsx else CSV_TYPE,
                run_id=str(run["run_id"]),
            )
            lines = reconciliation.stream_lines(connection, run["run_id"], include_matched=False)
            if not xlsx:
                pending, buffer = first, bytearray(csv_head())
                async for line in lines:
                    buffer += csv_line(run, line)
                    if len(buffer) >= FILE_CHUNK_BYTES:
                        pending.chunk = bytes(buffer)
                        yield pending
                        pending, buffer = reconciliation_pb2.ExportReconciliationExceptionsResponse(), bytearray()
                pending.chunk = bytes(buffer)
                yield pending
                return
            book = XlsxExceptions(run)
            async for line in lines:
                book.line(line)
        descriptor, path = tempfile.mkstemp(suffix=".xlsx")
        os.close(descriptor)
        try:
            await asyncio.to_thread(book.save, path)
            pending = first
            with open(path, "rb") as handle:  # noqa: ASYNC230 - a local temporary file, read in chunks
                while data := handle.read(FILE_CHUNK_BYTES):
                    pending.chunk = data
                    yield pending
                    pending = reconciliation_pb2.ExportReconciliationExceptionsResponse()
        finally:
            os.unlink(path)
