"""The payment channel's reference (issue 12, section 3): Capture and Refund take the acquirer's
or wallet's transaction id, validated at the edge; it travels through the scripts into the
ledger event, the writer stores it in PostgreSQL, GetAuthorization shows the capture's (also
after Redis is rebuilt from the ledger), and a
retry with another reference under the same request id is a conflict, not a replay."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, RetryPolicy
from subsidy_client.errors import ChannelReferenceConflict, IdempotencyConflict, InvalidField
from subsidy_client.v1 import authorization_pb2 as pb

from storage.devenv import Services
from storage.postgres.audit import rebuild, reconcile
from storage.postgres.writer import LedgerWriter, WriterConfig
from tests.conftest import consumer_key, isolated_environment, running_gateway, serial

FRIDGE_G1 = "6970000000017"
WASHER = "6970000000093"


async def test_channel_reference_reaches_postgres_and_get_authorization(services: Services) -> None:
    """Capture and two partial refunds with the channel's ids: each event in PostgreSQL carries
    its own (the capture's payment id, each refund's refund id), the authorization shows the
    capture's; an authorization captured without one stores NULL; older-shaped events still
    decode (the writer is the one that reads them)."""
    async with isolated_environment(services) as env, running_gateway(env.config()) as gateway:
        client = AuthorizationClient(
            f"127.0.0.1:{gateway.port}", "t-main-01", env.credentials["t-main-01"], retry=RetryPolicy(max_attempts=1)
        )
        try:
            lines = [Line("f", FRIDGE_G1, 300_000, serial()), Line("w", WASHER, 150_000)]
            approved = await client.authorize(campaign_id="c-main", consumer_key=consumer_key(), lines=lines)
            assert approved.decision == pb.DECISION_APPROVED
            authorization_id = approved.authorization_id
            captured = await client.capture(authorization_id, channel_reference="4200001234202611300012345678")
            assert captured.authorization.channel_reference == "4200001234202611300012345678"
            await client.refund(authorization_id, ["w"], channel_reference="50300001:R1")
            refunded = await client.refund(authorization_id, ["f"], channel_reference="50300001:R2")
            # The authorization keeps the capture's reference; refunds carry their own in events.
            assert refunded.authorization.channel_reference == "4200001234202611300012345678"
            shown = await client.get_authorization(authorization_id)
            assert shown.channel_reference == "4200001234202611300012345678"

            plain = await client.authorize(campaign_id="c-main", consumer_key=consumer_key(), lines=lines[1:])
            await client.capture(plain.authorization_id)
            assert (await client.get_authorization(plain.authorization_id)).channel_reference == ""

            # One authorization is one channel payment: a later capture (new request id) with the
            # same reference or none gets it as it is; another reference, or one for a capture
            # that recorded none, is refused and changes nothing.
            first = "4200001234202611300012345678"
            again = await client.capture(authorization_id, channel_reference=first)
            assert again.authorization.channel_reference == first
            assert (await client.capture(authorization_id)).authorization.channel_reference == first
            with pytest.raises(ChannelReferenceConflict) as conflict:
                await client.capture(authorization_id, channel_reference="4200009999202611300099999999")
            assert conflict.value.metadata["state"] == "AUTHORIZATION_STATE_REFUNDED"
            with pytest.raises(ChannelReferenceConflict):
                await client.capture(plain.authorization_id, channel_reference="4200001234202611300000000001")
            assert (await client.get_authorization(authorization_id)).channel_reference == first
            assert (await client.get_authorization(plain.authorization_id)).channel_reference == ""

            redis = Redis.from_url(env.redis_url)
            try:
                await LedgerWriter(
                    WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), redis
                ).drain()
            finally:
                await redis.aclose()
            connection = await asyncpg.connect(env.pg_dsn)
            try:
                rows = await connection.fetch(
                    "SELECT authorization_id, event_type, channel_reference, amount_fen FROM ledger_events"
                    " WHERE authorization_id = ANY($1::text[]) ORDER BY event_ms, event_seq",
                    [authorization_id, plain.authorization_id],
                )
            finally:
                await connection.close()
            found = [(row["authorization_id"], row["event_type"], row["channel_reference"]) for row in rows]
            assert found == [
                (authorization_id, "AUTHORIZED", None),
                (authorization_id, "CAPTURED", "4200001234202611300012345678"),
                (authorization_id, "REFUNDED", "50300001:R1"),
                (authorization_id, "REFUNDED", "50300001:R2"),
                (plain.authorization_id, "AUTHORIZED", None),
                (plain.authorization_id, "CAPTURED", None),
            ]
            # Redis lost and rebuilt from the ledger: the capture's reference comes back with
            # the authorization (from its CAPTURED event), and none where there was none.
            redis = Redis.from_url(env.redis_url)
            connection = await asyncpg.connect(env.pg_dsn)
            try:
                await redis.delete(
                    env.keys.authorization(authorization_id), env.keys.authorization(plain.authorization_id)
                )
                await rebuild(connection, redis, env.keys)
                assert await reconcile(connection, redis, env.keys) == []
            finally:
                await connection.close()
                await redis.aclose()
            rebuilt = await client.get_authorization(authorization_id)
            assert rebuilt.channel_reference == "4200001234202611300012345678"
            assert rebuilt.state == pb.AUTHORIZATION_STATE_REFUNDED
            assert (await client.get_authorization(plain.authorization_id)).channel_reference == ""
        finally:
            await client.close()


async def test_a_different_reference_is_a_different_payload(services: Services) -> None:
    """The same request id retried with the same reference is a replay; with another reference
    it is IDEMPOTENCY_CONFLICT (the reference is part of the payload hash); a reference outside
    1-64 of [A-Za-z0-9_.:-] is refused naming the field, before anything changes."""
    async with isolated_environment(services) as env, running_gateway(env.config()) as gateway:
        client = AuthorizationClient(
            f"127.0.0.1:{gateway.port}", "t-main-01", env.credentials["t-main-01"], retry=RetryPolicy(max_attempts=1)
        )
        try:
            approved = await client.authorize(
                campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("w", WASHER, 150_000)]
            )
            for bad in ("has space", "x" * 65, "引用", "a/b"):
                with pytest.raises(InvalidField) as refused:
                    await client.capture(approved.authorization_id, channel_reference=bad)
                assert refused.value.metadata.get("field") == "channel_reference"
            request_id = str(uuid.uuid4())
            first = await client.capture(approved.authorization_id, request_id=request_id, channel_reference="WX-1")
            again = await client.capture(approved.authorization_id, request_id=request_id, channel_reference="WX-1")
            assert again.replayed and not first.replayed
            with pytest.raises(IdempotencyConflict):
                await client.capture(approved.authorization_id, request_id=request_id, channel_reference="WX-2")
            refund_id = str(uuid.uuid4())
            await client.refund(approved.authorization_id, request_id=refund_id, channel_reference="RF-1")
            with pytest.raises(IdempotencyConflict):
                await client.refund(approved.authorization_id, request_id=refund_id, channel_reference="RF-9")
            with pytest.raises(IdempotencyConflict):
                await client.refund(approved.authorization_id, request_id=refund_id)
        finally:
            await client.close()
