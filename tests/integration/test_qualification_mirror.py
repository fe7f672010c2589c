"""Qualifications mirrored into PostgreSQL by the writer process, and restored from there (with
the other providers' imported reports) by ``server.ledger rebuild`` after Redis loses everything."""

from __future__ import annotations

import time
from datetime import date

import asyncpg
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from server.commands.exchange import import_file
from server.commands.ledger import with_connections
from server.domain.exchange_file import ConsumerRecord, SerialRecord, encode
from storage.devenv import Services
from storage.postgres.qualifications import GROUP, UPSERT, QualificationMirror, snapshot_row
from storage.postgres.reference import fetch_reference
from storage.postgres.writer import LedgerWriter, WriterConfig
from storage.redis.reference import publish_reference
from tests.conftest import Environment, consumer_key_of, id_number, isolated_environment, running_gateway

GOODS = "6970000000086"
FRIDGE = "6970000000017"  # serial required
HERE = common_pb2.Location(
    latitude=30.18, longitude=120.26, coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84, accuracy_m=10
)


async def mirrored(env: Environment) -> dict[str, asyncpg.Record]:
    connection = await asyncpg.connect(env.pg_dsn)
    try:
        return {row["redemption_code"]: row for row in await connection.fetch("SELECT * FROM qualifications")}
    finally:
        await connection.close()


async def test_every_change_is_mirrored_and_a_redis_loss_is_rebuilt(services: Services) -> None:
    async with isolated_environment(services) as env, running_gateway(env.config()) as gateway:
        target = f"127.0.0.1:{gateway.port}"
        one_attempt = RetryPolicy(max_attempts=1)
        redis = Redis.from_url(env.redis_url)
        async with (
            QualificationClient(target, "p-wallet-01", env.credentials["p-wallet-01"], retry=one_attempt) as app,
            AuthorizationClient(target, "t-main-01", env.credentials["t-main-01"], retry=one_attempt) as till,
        ):

            async def claimed(person: str) -> str:
                response = await app.claim(
                    campaign_id="c-qual",
                    category="general",
                    id_number=person,
                    location=HERE,
                    fix_time_ms=int(time.time() * 1000),
                )
                assert response.decision == qpb.CLAIM_DECISION_ISSUED
                return response.qualification.redemption_code

            async def pay(person: str, code: str) -> str:
                answer = await till.authorize(
                    campaign_id="c-qual",
                    consumer_key=consumer_key_of(person),
                    lines=[Line("1", GOODS, 3_000)],
                    redemption_code=code,
                )
                assert answer.decision == apb.DECISION_APPROVED
                return answer.authorization_id

            unused, redeemed, cancelled, reserved = (id_number() for _ in range(4))
            codes = {person: await claimed(person) for person in (unused, redeemed, cancelled, reserved)}
            captured = await pay(redeemed, codes[redeemed])
            await till.capture(captured)
            voided = await pay(unused, codes[unused])
            await till.void(voided)  # the code goes back to ISSUED; the payment keeps its link
            await app.cancel(codes[cancelled])
            held_by = await pay(reserved, codes[reserved])

            # A mirror that dies after reading (entries pending, nothing written) and its restart.
            mirror = QualificationMirror(redis, env.keys, env.pg_dsn, consumer="mirror-test")
            await mirror.ensure_group()
            assert await mirror._read(block=False)
            assert await mirrored(env) == {}
            await QualificationMirror(redis, env.keys, env.pg_dsn, consumer="mirror-test").drain()
            assert await redis.xlen(env.keys.qualification_events) == 0
            assert (await redis.xpending(env.keys.qualification_events, GROUP))["pending"] == 0

            rows = await mirrored(env)
            assert {code: rows[code]["state"] for code in codes.values()} == {
                codes[unused]: "ISSUED",
                codes[redeemed]: "REDEEMED",
                codes[cancelled]: "CANCELLED",
                codes[reserved]: "RESERVED",
            }
            assert rows[codes[reserved]]["authorization_id"] == held_by
            for person, code in codes.items():
                live = await app.get(code)
                assert rows[code]["consumer_key"] == consumer_key_of(person) == live.consumer_key
                assert rows[code]["expires_at"].timestamp() * 1000 == live.expires_at.ToMilliseconds()
                # Stored sealed under the local data key, opened for the partner's Get.
                assert rows[code]["masked_id_number"].startswith("s1.")
                assert live.masked_id_number == person[:3] + "*" * 11 + person[-4:]
                assert live.masked_id_number not in str(dict(rows[code]))
                assert person not in str(dict(rows[code]))
            quota_before = await redis.hget(env.keys.qualification_quota("c-qual"), "general:claimed")
            # Another provider's report, imported before the loss.
            peer_person, peer_serial = id_number(), "PEER-SN-0001"
            exchange_key = b"exchange-key-for-the-mirror-test-0123456789"
            pool = await asyncpg.create_pool(env.pg_dsn, min_size=1, max_size=1)
            try:
                await import_file(
                    pool,
                    redis,
                    env.keys,
                    exchange_key,
                    encode(
                        "p-peer-01",
                        date(2026, 11, 26),
                        [ConsumerRecord(consumer_key_of(peer_person), "general")],
                        [SerialRecord(FRIDGE, peer_serial)],
                        exchange_key,
                    ),
                    own_provider_id="local",
                )
            finally:
                await pool.close()

            # Redis loses everything of this deployment; the reference data is republished, the
            # ledger writer drained, and the state rebuilt from PostgreSQL.
            await LedgerWriter(
                WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), redis
            ).drain()
            doomed = [key async for key in redis.scan_iter(match=env.keys.pattern(), count=10_000)]
            await redis.delete(*doomed)
            connection = await asyncpg.connect(env.pg_dsn)
            try:
                await publish_reference(redis, env.keys, await fetch_reference(connection))
            finally:
                await connection.close()
            status, result = await with_connections(env.config(), "rebuild", force=False)
            assert status == 0 and result["qualifications"] == len(rows)
            assert (result["imported_consumers"], result["imported_serials"]) == (1, 1)

            assert await redis.hget(env.keys.qualification_quota("c-qual"), "general:claimed") == quota_before
            for person, code in codes.items():
                restored = await app.get(code)
                assert (
                    qpb.QualificationState.Name(restored.state).removeprefix("QUALIFICATION_STATE_")
                    == (rows[code]["state"])
                )
                assert restored.masked_id_number == person[:3] + "*" * 11 + person[-4:]  # still opens
            # The rebuilt state still works and still enforces: the reserved one is redeemed by
            # capturing its payment; the unused one can be redeemed; nobody claims twice.
            await till.capture(held_by)
            assert (await app.get(codes[reserved])).state == qpb.QUALIFICATION_STATE_REDEEMED
            # Both payments still show the code they redeemed (the link comes from the ledger).
            assert (await till.get_authorization(captured)).redemption_code == codes[redeemed]
            assert (await till.get_authorization(voided)).redemption_code == codes[unused]
            await pay(unused, codes[unused])
            again = await app.claim(
                campaign_id="c-qual",
                category="general",
                id_number=redeemed,
                location=HERE,
                fix_time_ms=int(time.time() * 1000),
            )
            assert again.decline_reason == qpb.CLAIM_DECLINE_REASON_PERSON_LIMIT_REACHED
            assert (await claimed(cancelled)) != codes[cancelled]  # a cancelled claim does not count
            # The peer's reports hold again: its consumer and its device are declined.
            used_elsewhere = await app.claim(
                campaign_id="c-qual",
                category="general",
                id_number=peer_person,
                location=HERE,
                fix_time_ms=int(time.time() * 1000),
            )
            assert used_elsewhere.decline_reason == qpb.CLAIM_DECLINE_REASON_USED_ELSEWHERE
            device = await till.authorize(
                campaign_id="c-main",
                consumer_key=consumer_key_of(id_number()),
                lines=[Line("1", FRIDGE, 300_000, peer_serial)],
            )
            assert device.decline_reason == apb.DECLINE_REASON_SERIAL_ALREADY_SUBSIDISED
        await redis.aclose()


async def test_an_older_snapshot_never_overwrites_a_newer_one(services: Services) -> None:
    """The mirror's ordering guard: a redelivered or late snapshot (a lower stream id) leaves the
    row as the newer one made it; a newer one replaces it."""
    async with isolated_environment(services) as env:
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            base = {
                "code": "0123456789ABCDEF",
                "state": "ISSUED",
                "campaign": "c-qual",
                "category": "general",
                "consumer": "ab" * 32,
                "partner": "p-wallet-01",
                "issued_ms": 1_800_000_000_000,
                "expires_ms": 1_800_003_600_000,
                "updated_ms": 1_800_000_000_000,
            }

            async def write(entry_id: str, **changes: object) -> None:
                await connection.execute(UPSERT, *snapshot_row(entry_id, {**base, **changes}))

            async def state() -> str:
                found: str = await connection.fetchval(
                    "SELECT state FROM qualifications WHERE redemption_code = $1", base["code"]
                )
                return found

            await write("1800000000000-0")
            await write("1800000005000-0", state="RESERVED", authorization="a" * 32)
            await write("1800000000000-0")  # the first snapshot redelivered
            assert await state() == "RESERVED"
            await write("1800000004999-7", state="CANCELLED")  # older, though a later seq
            assert await state() == "RESERVED"
            await write("1800000005000-1", state="REDEEMED")
            assert await state() == "REDEEMED"
        finally:
            await connection.close()
