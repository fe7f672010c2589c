"""BlockListService: the operator's block lists (issue 14, section 1; protos/subsidy/v1/blocklist.proto).

Each change commits in PostgreSQL with its audit row (storage/postgres/risk_blocks.py), then the
blocks in force are published to the Redis hash the scripts read, before the call answers: the
block is then effective on every gateway process. If that publication fails, the ledger
writer's publisher completes it within about a second, and a retry with the same request_id
(which changes nothing in PostgreSQL) publishes it again.
"""

from __future__ import annotations

import time
from datetime import UTC

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client.v1 import blocklist_pb2, blocklist_pb2_grpc

from server.domain.blocks import KINDS, canonical_subject, check_reason
from server.domain.errors import InvalidField
from server.rpc.auth import OPERATOR, caller
from server.services.common import checked_timestamp
from server.services.operations import OperatorDeps, begin_action
from storage.postgres import risk_blocks
from storage.postgres.risk_blocks import Block

pb = blocklist_pb2
KIND_TO_PROTO = {kind: pb.BlockKind.Value("BLOCK_KIND_" + kind) for kind in KINDS}
PROTO_TO_KIND: dict[int, str] = {int(value): kind for kind, value in KIND_TO_PROTO.items()}


def _kind(value: int) -> str:
    if value not in PROTO_TO_KIND:
        raise InvalidField("kind", "must be a block kind (CONSUMER, DEVICE, MERCHANT, TERMINAL, PARTNER_APP)")
    return PROTO_TO_KIND[value]


def block_message(block: Block) -> blocklist_pb2.Block:
    created = Timestamp()
    created.FromDatetime(block.created_at)
    message = pb.Block(
        kind=KIND_TO_PROTO[block.kind],
        subject_id=block.subject_id,
        reason=block.reason,
        created_by=block.created_by,
        created_at=created,
    )
    if block.expires_at is not None:
        message.expires_at.FromDatetime(block.expires_at)
    return message


class BlockListService(blocklist_pb2_grpc.BlockListServiceServicer):
    def __init__(self, deps: OperatorDeps) -> None:
        self._pool = deps.pool
        self._store = deps.store

    async def _publish(self) -> None:
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            await risk_blocks.publish(connection, self._store.redis, self._store.keys)

    async def AddBlock(
        self, request: blocklist_pb2.AddBlockRequest, context: grpc.aio.ServicerContext
    ) -> blocklist_pb2.AddBlockResponse:
        caller(OPERATOR)
        kind = _kind(request.kind)
        request.subject_id = canonical_subject(kind, request.subject_id)
        request.reason = check_reason(request.reason)
        expires_at = None
        if request.HasField("expires_at"):
            stamp = checked_timestamp(request.expires_at, "expires_at")
            if stamp.ToMilliseconds() <= time.time() * 1000:
                raise InvalidField("expires_at", "must lie in the future")
            expires_at = stamp.ToDatetime(tzinfo=UTC)
        action = begin_action("AddBlock", request, "block", f"{kind}:{request.subject_id}")
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            block = await risk_blocks.add(connection, action, kind, request.subject_id, request.reason, expires_at)
        await self._publish()
        return pb.AddBlockResponse(block=block_message(block))

    async def RemoveBlock(
        self, request: blocklist_pb2.RemoveBlockRequest, context: grpc.aio.ServicerContext
    ) -> blocklist_pb2.RemoveBlockResponse:
        caller(OPERATOR)
        kind = _kind(request.kind)
        request.subject_id = canonical_subject(kind, request.subject_id)
        action = begin_action("RemoveBlock", request, "block", f"{kind}:{request.subject_id}")
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            block = await risk_blocks.remove(connection, action, kind, request.subject_id)
        await self._publish()
        return pb.RemoveBlockResponse(block=block_message(block))

    async def ListBlocks(
        self, request: blocklist_pb2.ListBlocksRequest, context: grpc.aio.ServicerContext
    ) -> blocklist_pb2.ListBlocksResponse:
        caller(OPERATOR)
        kind = None if request.kind == pb.BLOCK_KIND_UNSPECIFIED else _kind(request.kind)
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            blocks = await risk_blocks.list_in_force(connection, kind)
        return pb.ListBlocksResponse(blocks=[block_message(block) for block in blocks])
