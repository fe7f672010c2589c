"""ExchangeService: the online cross-provider checks (provider credentials only).

Another provider asks ``CheckConsumer`` / ``CheckSerial``. The answer is this gateway's own live
Redis state, never what peers told us, so a fact is reported only by the provider that holds it.
The daily files are the other way to know (server/commands/exchange.py, docs/exchange.md).
"""

from __future__ import annotations

import grpc
from subsidy_client.v1 import exchange_pb2, exchange_pb2_grpc

from server.domain import exchange_file
from server.domain.exchange_file import ConsumerRecord
from server.domain.gtin import is_valid_gtin13
from server.domain.validation import CONSUMER_KEY
from server.rpc.auth import PROVIDER, caller
from server.rpc.errors import invalid_field
from storage.postgres import exchange as queries
from storage.postgres.pool import LazyPool
from storage.redis.exchange import local_usage, subsidised_here
from storage.redis.store import RedisStore


class ExchangeService(exchange_pb2_grpc.ExchangeServiceServicer):
    def __init__(self, store: RedisStore, pool: LazyPool) -> None:
        self._store = store
        self._pool = pool

    async def CheckConsumer(
        self, request: exchange_pb2.CheckConsumerRequest, context: grpc.aio.ServicerContext
    ) -> exchange_pb2.CheckConsumerResponse:
        caller(PROVIDER)
        if not CONSUMER_KEY.match(request.consumer_key):
            raise invalid_field("consumer_key", "must be 64 lowercase hex characters")
        if not exchange_file.CATEGORY.match(request.category):
            raise invalid_field("category", f"must match {exchange_file.CATEGORY.pattern}")
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            campaigns, known = await queries.usage_scope(connection, request.category)
        if not known:
            raise invalid_field("category", "no campaign of this gateway covers this category")
        consumer = ConsumerRecord(request.consumer_key, request.category)
        units = await local_usage(self._store.redis, self._store.keys, campaigns, [consumer])
        return exchange_pb2.CheckConsumerResponse(used=units[0] > 0)

    async def CheckSerial(
        self, request: exchange_pb2.CheckSerialRequest, context: grpc.aio.ServicerContext
    ) -> exchange_pb2.CheckSerialResponse:
        caller(PROVIDER)
        if not is_valid_gtin13(request.gtin):
            raise invalid_field("gtin", "must be a GTIN-13 with a valid check digit")
        if not exchange_file.is_valid_serial(request.serial_number):
            raise invalid_field("serial_number", "must be 1-64 visible ASCII characters")
        serial = exchange_file.canonical_serial(request.serial_number)
        subsidised = await subsidised_here(self._store.redis, self._store.keys, serial)
        return exchange_pb2.CheckSerialResponse(subsidised=subsidised)
