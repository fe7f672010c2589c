"""Live fund supervision (``subsidy.v1.SupervisionService``) for government and operator
credentials: a stream of budget snapshots, the alerts, and today's figures so far.

Example::

    async with SupervisionClient("127.0.0.1:50051", "gov-bureau", secret) as supervision:
        async for snapshot in supervision.watch(interval_ms=1000):
            for budget in snapshot.budgets:
                print(budget.campaign_id, budget.category, budget.remaining_fen)

The stream is signed like a unary call (over the request's bytes) and is not retried: when it
ends (the server stops, or drops a watcher that fell behind with RESOURCE_EXHAUSTED /
SLOW_CONSUMER), open it again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from subsidy_client import signing
from subsidy_client.client import SignedClient
from subsidy_client.errors import from_rpc_error
from subsidy_client.v1 import supervision_pb2 as pb

SERVICE = "/subsidy.v1.SupervisionService/"


class SupervisionClient(SignedClient):
    async def watch(
        self, campaign_id: str = "", interval_ms: int = 0, *, timeout_s: float | None = None
    ) -> AsyncIterator[pb.WatchFundsResponse]:
        """Snapshots until the caller stops iterating (the call is then cancelled)."""
        request = pb.WatchFundsRequest(campaign_id=campaign_id, interval_ms=interval_ms)
        method = SERVICE + "WatchFunds"
        body = request.SerializeToString()
        stub = self._channel.unary_stream(
            method, request_serializer=lambda raw: raw, response_deserializer=pb.WatchFundsResponse.FromString
        )
        metadata = signing.signed_metadata(self._secret, method, self._terminal_id, body)
        call = stub(body, timeout=timeout_s, metadata=metadata)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None
        finally:
            call.cancel()

    async def alerts(self, since: datetime | None = None, limit: int = 0, business_date: str = "") -> list[pb.Alert]:
        """Newest first since ``since`` (default: 7 days); or one business day's, oldest first."""
        request = pb.ListAlertsRequest(limit=limit, business_date=business_date)
        if since is not None:
            stamp = Timestamp()
            stamp.FromDatetime(since)
            request.since.CopyFrom(stamp)
        response = await self._call(SERVICE + "ListAlerts", request, pb.ListAlertsResponse)
        return list(response.alerts)

    async def today(self, top_merchants: int = 0) -> pb.GetTodayFiguresResponse:
        request = pb.GetTodayFiguresRequest(top_merchants=top_merchants)
        return await self._call(SERVICE + "GetTodayFigures", request, pb.GetTodayFiguresResponse)
