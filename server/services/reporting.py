"""ReportingService: reconciliation and ledger status for operators (auditors, the bureau).

Off the hot path by construction: the operator services' PostgreSQL pool is opened on the
first operator call, so a gateway that only authorizes never opens a PostgreSQL connection.
"""

from __future__ import annotations

import dataclasses

import grpc
from subsidy_client.v1 import reporting_pb2, reporting_pb2_grpc

from server.rpc.auth import OPERATOR, caller
from server.services.operations import OperatorDeps
from storage.postgres.counter_check import check_counters
from storage.postgres.stream_consumer import StreamBacklog
from storage.postgres.writer import lag

LEDGER_GROUP = "ledger-writer"


def _stream(backlog: StreamBacklog) -> reporting_pb2.StreamBacklog:
    return reporting_pb2.StreamBacklog(backlog=backlog.backlog, dead_letters=backlog.dead_letters)


class ReportingService(reporting_pb2_grpc.ReportingServiceServicer):
    def __init__(self, deps: OperatorDeps) -> None:
        self._store = deps.store
        self._pool = deps.pool

    async def Reconcile(
        self, request: reporting_pb2.ReconcileRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.ReconcileResponse:
        caller(OPERATOR)
        backlog = await lag(self._store.redis, self._store.keys, LEDGER_GROUP)
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            # The same questions as ``subsidyctl ledger reconcile`` (storage/postgres/counter_check.py).
            check = await check_counters(connection, self._store.redis, self._store.keys)
        return reporting_pb2.ReconcileResponse(
            differences=[
                *(
                    reporting_pb2.CounterDifference(
                        kind=item.kind,
                        key=item.key,
                        ledger_value=item.ledger if isinstance(item.ledger, int) else 0,
                        redis_value=item.redis if isinstance(item.redis, int) else 0,
                        ledger_owner=item.ledger if isinstance(item.ledger, str) else "",
                        redis_owner=item.redis if isinstance(item.redis, str) else "",
                    )
                    for item in check.ledger_differences
                ),
                *(
                    reporting_pb2.CounterDifference(
                        kind=item.kind, key=item.key, mirror_value=item.mirror, redis_value=item.redis
                    )
                    for item in check.mirror_differences
                ),
            ],
            ledger_backlog=backlog.backlog,
            qualification_mirror=_stream(check.streams["qualification_mirror"]),
            risk_events=_stream(check.streams["risk_events"]),
            sweeper=reporting_pb2.SweeperBacklog(**dataclasses.asdict(check.sweeper)),
        )

    async def GetLedgerStatus(
        self, request: reporting_pb2.GetLedgerStatusRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.GetLedgerStatusResponse:
        caller(OPERATOR)
        current = await lag(self._store.redis, self._store.keys, LEDGER_GROUP)
        return reporting_pb2.GetLedgerStatusResponse(
            stream_length=current.stream_length,
            pending=current.pending,
            undelivered=current.undelivered,
            oldest_unwritten_age_s=current.oldest_unwritten_age_s,
            dead_letters=current.dead_letters,
        )
