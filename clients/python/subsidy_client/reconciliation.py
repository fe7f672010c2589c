"""Bill reconciliation (``subsidy.v1.ReconciliationService``): import a payment channel's daily
settlement file and mark exceptions resolved (operators), list runs, stream a run's results,
download its exceptions as CSV or XLSX (operators and government users).

Example::

    async with ReconciliationClient("127.0.0.1:50051", "op-finance", secret) as reconciliation:
        with open("wechat-2026-03-01.csv", "rb") as handle:
            answer = await reconciliation.import_file(
                handle, channel="wechat-pay", business_date="2026-03-01", file_name="wechat-2026-03-01.csv"
            )
        async for part in reconciliation.results(answer.run.run_id):
            ...

The import streams the file in chunks of ``CHUNK_BYTES`` and is not retried; its request_id
makes a repeated call safe (the same file under the same id answers with the stored run).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import IO, Any

import grpc
from google.protobuf.message import Message

from subsidy_client import signing
from subsidy_client.client import SignedClient
from subsidy_client.errors import from_rpc_error
from subsidy_client.v1 import reconciliation_pb2 as pb

SERVICE = "/subsidy.v1.ReconciliationService/"
CHUNK_BYTES = 256 * 1024
IMPORT_DEADLINE_S = 900.0
STREAM_TIMEOUT_S = 600.0


class ReconciliationClient(SignedClient):
    async def import_file(
        self,
        handle: IO[bytes],
        *,
        channel: str,
        business_date: str,
        file_name: str,
        mapping: pb.SettlementColumnMapping | None = None,
        mode: int = pb.SETTLEMENT_IMPORT_MODE_ALL_OR_NOTHING,
        request_id: str | None = None,
        progress: Callable[[int], None] | None = None,
        deadline_s: float = IMPORT_DEADLINE_S,
    ) -> pb.ImportSettlementFileResponse:
        """Sends the header, then the file's bytes; ``progress`` is called with each chunk's size."""
        header = pb.SettlementImportHeader(
            request_id=request_id or str(uuid.uuid4()),
            channel=channel,
            business_date=business_date,
            mode=mode,  # type: ignore[arg-type]
            file_name=file_name,
            mapping=mapping or pb.SettlementColumnMapping(),
        )

        def messages() -> Iterator[pb.ImportSettlementFileRequest]:
            yield pb.ImportSettlementFileRequest(header=header)
            while data := handle.read(CHUNK_BYTES):
                if progress is not None:
                    progress(len(data))
                yield pb.ImportSettlementFileRequest(chunk=data)

        method = SERVICE + "ImportSettlementFile"
        stub = self._channel.stream_unary(
            method,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=pb.ImportSettlementFileResponse.FromString,
        )
        metadata = signing.signed_metadata(self._secret, method, self._terminal_id, b"")
        try:
            response: pb.ImportSettlementFileResponse = await stub(messages(), timeout=deadline_s, metadata=metadata)
            return response
        except grpc.aio.AioRpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None

    async def resolve(
        self, run_id: str, position: int, reason: str, *, request_id: str | None = None
    ) -> pb.ResolveReconciliationLineResponse:
        """Marks an exception line resolved (operators): who and when are recorded with the reason."""
        request = pb.ResolveReconciliationLineRequest(
            request_id=request_id or str(uuid.uuid4()), run_id=run_id, position=position, reason=reason
        )
        return await self._call(SERVICE + "ResolveReconciliationLine", request, pb.ResolveReconciliationLineResponse)

    async def list(
        self,
        channel: str = "",
        from_date: str = "",
        to_date: str = "",
        include_superseded: bool = False,
        limit: int = 0,
    ) -> list[pb.ReconciliationRun]:
        request = pb.ListReconciliationRunsRequest(
            channel=channel, from_date=from_date, to_date=to_date, include_superseded=include_superseded, limit=limit
        )
        response = await self._call(SERVICE + "ListReconciliationRuns", request, pb.ListReconciliationRunsResponse)
        return list(response.runs)

    def results(
        self,
        run_id: str = "",
        *,
        channel: str = "",
        business_date: str = "",
        include_matched: bool = False,
        timeout_s: float = STREAM_TIMEOUT_S,
    ) -> AsyncIterator[pb.StreamReconciliationResultsResponse]:
        """The run's summary, then its result lines in chunks (exceptions only by default)."""
        request = pb.StreamReconciliationResultsRequest(
            run_id=run_id, channel=channel, business_date=business_date, include_matched=include_matched
        )
        return self._server_stream(
            SERVICE + "StreamReconciliationResults",
            request,
            pb.StreamReconciliationResultsResponse.FromString,
            timeout_s,
        )

    def export(
        self,
        run_id: str = "",
        *,
        channel: str = "",
        business_date: str = "",
        file_format: int = pb.RECONCILIATION_EXPORT_FORMAT_CSV,
        timeout_s: float = STREAM_TIMEOUT_S,
    ) -> AsyncIterator[pb.ExportReconciliationExceptionsResponse]:
        """The exceptions as a file in chunks; the first names it (file_name, content_type, run_id)."""
        request = pb.ExportReconciliationExceptionsRequest(
            run_id=run_id,
            channel=channel,
            business_date=business_date,
            format=file_format,  # type: ignore[arg-type]
        )
        return self._server_stream(
            SERVICE + "ExportReconciliationExceptions",
            request,
            pb.ExportReconciliationExceptionsResponse.FromString,
            timeout_s,
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
