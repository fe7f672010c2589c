"""The T+1 daily reports (``subsidy.v1.DailyReportService``) for operator and government
credentials: publish closed days (operators), list them, stream one (header, budget lines,
rows in chunks) or download it as CSV or XLSX (bytes in chunks).

Example::

    async with DailyReportClient("127.0.0.1:50051", "gov-bureau", secret) as reports:
        async for part in reports.stream("2026-03-01"):
            ...
        with open("day.xlsx", "wb") as out:
            async for chunk in reports.export("2026-03-01", EXPORT_FORMAT_XLSX):
                out.write(chunk.chunk)

Streams are signed like unary calls (over the request's bytes) and are not retried: a broken
stream is asked for again, and a published report is the same every time.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from subsidy_client import signing
from subsidy_client.client import SignedClient
from subsidy_client.errors import from_rpc_error
from subsidy_client.v1 import daily_report_pb2 as pb

SERVICE = "/subsidy.v1.DailyReportService/"
STREAM_TIMEOUT_S = 600.0
PUBLISH_DEADLINE_S = 600.0


class DailyReportClient(SignedClient):
    async def publish(
        self, up_to_date: str = "", *, request_id: str | None = None, deadline_s: float = PUBLISH_DEADLINE_S
    ) -> pb.PublishDailyReportsResponse:
        """Publishes every closed day not yet published (operators). Cutting a large day takes
        up to about a minute, so this call has its own deadline and is not retried (a repeated
        call is harmless: a published day is never cut again)."""
        request = pb.PublishDailyReportsRequest(up_to_date=up_to_date, request_id=request_id or str(uuid.uuid4()))
        method = SERVICE + "PublishDailyReports"
        body = request.SerializeToString()
        stub = self._channel.unary_unary(
            method, request_serializer=lambda raw: raw, response_deserializer=pb.PublishDailyReportsResponse.FromString
        )
        metadata = signing.signed_metadata(self._secret, method, self._terminal_id, body)
        try:
            response: pb.PublishDailyReportsResponse = await stub(body, timeout=deadline_s, metadata=metadata)
            return response
        except grpc.aio.AioRpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None

    async def list(self, from_date: str = "", to_date: str = "", limit: int = 0) -> list[pb.DailyReportHeader]:
        request = pb.ListDailyReportsRequest(from_date=from_date, to_date=to_date, limit=limit)
        response = await self._call(SERVICE + "ListDailyReports", request, pb.ListDailyReportsResponse)
        return list(response.reports)

    def stream(
        self, business_date: str, levels: Sequence[int] = (), *, timeout_s: float = STREAM_TIMEOUT_S
    ) -> AsyncIterator[pb.StreamDailyReportResponse]:
        """The header, then the budget lines, then the rows in chunks."""
        request = pb.StreamDailyReportRequest(business_date=business_date, levels=list(levels))  # type: ignore[arg-type]
        return self._server_stream(
            SERVICE + "StreamDailyReport", request, pb.StreamDailyReportResponse.FromString, timeout_s
        )

    def export(
        self,
        business_date: str,
        file_format: int,
        table: int = pb.EXPORT_TABLE_ROWS,
        *,
        timeout_s: float = STREAM_TIMEOUT_S,
    ) -> AsyncIterator[pb.ExportDailyReportResponse]:
        """The file in chunks; the first names it (file_name, content_type, content_hash)."""
        request = pb.ExportDailyReportRequest(business_date=business_date, format=file_format, table=table)  # type: ignore[arg-type]
        return self._server_stream(
            SERVICE + "ExportDailyReport", request, pb.ExportDailyReportResponse.FromString, timeout_s
        )

    async def _server_stream(self, method: str, request: Message, parse: Any, timeout_s: float) -> AsyncIterator[Any]:
        body = request.SerializeToString()
        stub = self._channel.unary_stream(method, request_serializer=lambda raw: raw, response_deserializer=parse)
        metadata = signing.signed_metadata(self._secret, method, self._terminal_id, body)
        call = stub(body, timeout=timeout_s, metadata=metadata)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None
        finally:
            call.cancel()
