"""Regression tests for the money-path defects found from the outside (issue 10): each test is
named after its defect and failed on the code before the fix."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid

import grpc
import orjson
import pytest
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, RetryPolicy, signing
from subsidy_client.errors import IdempotencyConflict, InvalidArgument, PermissionDenied
from subsidy_client.v1 import authorization_pb2 as pb
from subsidy_client.v1 import authorization_pb2_grpc

from server.processes.app import Application
from server.processes.writer import WriterMetrics, serve_metrics
from server.rpc.errors import REJECTED_CALLS, RejectionLog
from storage.devenv import Services
from storage.postgres.writer import LedgerWriter, WriterConfig, lag
from storage.redis.migrations import migrate_issued_counts, migrate_serial_keys
from storage.redis.store import sweep_backlog
from tests.conftest import Environment, consumer_key, running_gateway, serial
from tests.integration.test_ledger import ledger_world, traffic
from tests.integration.test_lifecycle import counters, fresh_campaign

FRIDGE_G1 = "6970000000017"  # serial required, reference price 20,000 yuan
FRIDGE_G2 = "6970000000024"  # no serial required
WASHER = "6970000000093"
PHONE = "6970000000048"


# 1. A zero-fen approval froze hold expiry for everyone.


async def test_zero_fen_subsidy_is_declined_and_reserves_nothing(
    environment: Environment, redis: Redis, client: AuthorizationClient
) -> None:
    """A 1-fen fridge floors to 0 fen at 20%: declined NO_SUBSIDY, the consumer's right and the
    serial untouched (before: APPROVED with 0 fen, then Capture/Void failed with INTERNAL)."""
    campaign = await fresh_campaign(environment)
    person, device = consumer_key(), serial()
    before = await counters(redis, environment, campaign, person)
    for price in (1, 4):  # floor(4 * 2000 / 10000) = 0; 5 fen is the first to earn 1 fen
        response = await client.authorize(
            campaign_id=campaign, consumer_key=person, lines=[Line("1", FRIDGE_G1, price, device)]
        )
        assert response.decision == pb.DECISION_DECLINED
        assert response.decline_reason == pb.DECLINE_REASON_NO_SUBSIDY
        assert response.declined_line_id == "1"
    assert await counters(redis, environment, campaign, person) == before
    assert await redis.exists(environment.keys.serial(device)) == 0
    # One fen of subsidy is a subsidy: approved, and its whole lifecycle works.
    approved = await client.authorize(
        campaign_id=campaign, consumer_key=person, lines=[Line("1", FRIDGE_G1, 5, device)]
    )
    assert approved.decision == pb.DECISION_APPROVED and approved.subsidy_fen == 1
    voided = await client.void(approved.authorization_id)
    assert voided.authorization.state == pb.AUTHORIZATION_STATE_VOIDED
    assert await counters(redis, environment, campaign, person) == before


async def test_zero_fen_line_never_passes_minus_zero_to_redis(
    environment: Environment, redis: Redis, gateway: Application
) -> None:
    """A hold recorded with a 0-fen line (as the old code approved them) is captured, voided and
    expired without INTERNAL: no script passes "-0" to HINCRBY."""
    campaign = await fresh_campaign(environment)
    keys = environment.keys
    store = gateway.store
    ids = []
    for _ in range(3):
        authorization_id = uuid.uuid4().hex
        person = consumer_key()
        await redis.hset(
            keys.authorization(authorization_id),
            mapping={
                "id": authorization_id, "state": "PENDING", "campaign": campaign, "merchant": "m-main",
                "terminal": "t-main-01", "consumer": person, "channel": 1,
                "lines": orjson.dumps([{"l": "1", "g": FRIDGE_G2, "c": "fridge", "p": 1, "s": 0, "sn": "", "r": 0}]),
                "total_fen": 1, "subsidy_fen": 0, "refunded_fen": 0, "created_ms": 1, "expires_ms": 2,
                "updated_ms": 1, "request_id": str(uuid.uuid4()), "last_request_id": "", "qualification": "",
            },
        )  # fmt: skip
        await redis.hset(keys.usage(campaign, person), "fridge", 1)
        await redis.zadd(keys.holds, {authorization_id: 2})
        ids.append(authorization_id)
    expired = await store.expire_due_holds(100)
    assert expired >= 3
    for authorization_id in ids:
        assert await redis.hget(keys.authorization(authorization_id), "state") == b"EXPIRED"
    assert (await sweep_backlog(redis, keys, 0)).set_aside_holds == 0


async def test_poison_hold_is_set_aside_and_the_sweep_goes_on(environment: Environment, redis: Redis) -> None:
    """A hold whose expiry fails is moved aside (once), the holds behind it expire, and the
    set-aside hold shows in the sweep backlog (reconcile, metrics, health) until requeued."""
    campaign = await fresh_campaign(environment)
    keys = environment.keys
    config = environment.config(hold_ttl_s=1, sweep_interval_ms=3_600_000, sweep_batch_size=2)
    async with running_gateway(config) as short_gateway:
        client = AuthorizationClient(
            f"127.0.0.1:{short_gateway.port}", "t-main-01", environment.credentials["t-main-01"], deadline_s=5
        )
        try:
            poison = uuid.uuid4().hex
            # Due first, so it is in every batch the old sweeper fetched: lines that do not decode.
            await redis.hset(keys.authorization(poison), mapping={"id": poison, "state": "PENDING",
                "campaign": campaign, "consumer": consumer_key(), "lines": "{not json"})  # fmt: skip
            await redis.zadd(keys.holds, {poison: 1})
            approved = [
                await client.authorize(
                    campaign_id=campaign, consumer_key=consumer_key(), lines=[Line("1", FRIDGE_G1, 300_000, serial())]
                )
                for _ in range(3)
            ]
            await asyncio.sleep(1.1)
            for _ in range(3):
                await short_gateway.store.expire_due_holds(2)
            for response in approved:
                state = await redis.hget(keys.authorization(response.authorization_id), "state")
                assert state == b"EXPIRED"
            backlog = await sweep_backlog(redis, keys, 0)
            assert backlog.set_aside_holds == 1 and backlog.overdue_holds == 0
            assert await redis.zscore(keys.holds, poison) is None
            assert await short_gateway.store.requeue_set_aside() == 1
            assert (await sweep_backlog(redis, keys, 0)).overdue_holds == 1
        finally:
            await redis.zrem(keys.holds, poison)
            await redis.zrem(keys.holds_set_aside, poison)
            await client.close()


async def test_overdue_holds_are_counted(environment: Environment, redis: Redis) -> None:
    keys = environment.keys
    ghost = uuid.uuid4().hex
    await redis.zadd(keys.holds, {ghost: 1})
    try:
        assert (await sweep_backlog(redis, keys, 60_000)).overdue_holds >= 1
    finally:
        await redis.zrem(keys.holds, ghost)


# 2. A trailing newline defeated "never twice"; full-width digits from a scanner or IME.


@pytest.mark.parametrize(
    "spelling",
    ["{s}\n", " {s}", "{s}\r\n", "{lower}", "{fullwidth}", "{s}\u3000"],
    ids=["trailing-newline", "leading-space", "crlf", "lower-case", "full-width", "ideographic-space"],
)
async def test_trailing_newline_serial_is_the_same_device(
    environment: Environment, client: AuthorizationClient, spelling: str
) -> None:
    campaign = await fresh_campaign(environment)
    device = serial()
    fullwidth = "".join(chr(ord(char) + 0xFEE0) for char in device)
    first = await client.authorize(
        campaign_id=campaign, consumer_key=consumer_key(), lines=[Line("1", FRIDGE_G1, 300_000, device)]
    )
    assert first.decision == pb.DECISION_APPROVED
    again = await client.authorize(
        campaign_id=campaign,
        consumer_key=consumer_key(),
        lines=[Line("1", FRIDGE_G1, 300_000, spelling.format(s=device, lower=device.lower(), fullwidth=fullwidth))],
    )
    assert again.decision == pb.DECISION_DECLINED
    assert again.decline_reason == pb.DECLINE_REASON_SERIAL_ALREADY_SUBSIDISED


async def test_trailing_newline_consumer_key_is_the_same_person(
    environment: Environment, client: AuthorizationClient
) -> None:
    campaign = await fresh_campaign(environment)
    person = consumer_key()
    first = await client.authorize(
        campaign_id=campaign, consumer_key=person, lines=[Line("1", FRIDGE_G1, 300_000, serial())]
    )
    assert first.decision == pb.DECISION_APPROVED
    for spelling in (person + "\n", person.upper(), " " + person):
        again = await client.authorize(
            campaign_id=campaign, consumer_key=spelling, lines=[Line("1", FRIDGE_G1, 300_000, serial())]
        )
        assert again.decline_reason == pb.DECLINE_REASON_CONSUMER_LIMIT_REACHED


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lines[0].serial_number", "S N"),
        ("lines[0].serial_number", "S\nN"),
        ("lines[0].serial_number", "SN\x00"),
        ("lines[0].serial_number", "\n"),
        ("consumer_key", "a" * 63 + "\n\n"),
        ("consumer_key", "a" * 63 + "g"),
        ("lines[0].line_id", "1\n2"),
        ("lines[0].gtin", FRIDGE_G1 + "\n0"),
        ("request_id", "not-a-uuid\n"),
    ],
)
async def test_identifier_that_does_not_canonicalise_is_invalid_argument_naming_the_field(
    client: AuthorizationClient, field: str, value: str
) -> None:
    line = Line("1", FRIDGE_G1, 300_000, serial())
    kwargs: dict[str, object] = {"campaign_id": "c-main", "consumer_key": consumer_key()}
    if field == "lines[0].serial_number":
        line = Line("1", FRIDGE_G1, 300_000, value)
    elif field == "lines[0].line_id":
        line = Line(value, FRIDGE_G1, 300_000, serial())
    elif field == "lines[0].gtin":
        line = Line("1", value, 300_000, serial())
    elif field == "request_id":
        kwargs["request_id"] = value
    else:
        kwargs[field] = value
    with pytest.raises(InvalidArgument) as raised:
        await client.authorize(lines=[line], **kwargs)  # type: ignore[arg-type]
    assert raised.value.metadata["field"] == field


# 3. A device is a device, not a (GTIN, serial) pair.


async def test_same_serial_under_two_gtins_is_one_device(environment: Environment, client: AuthorizationClient) -> None:
    campaign = await fresh_campaign(environment)
    device = serial()
    # One request carrying a fridge and a washer with the same serial.
    with pytest.raises(InvalidArgument) as raised:
        await client.authorize(
            campaign_id=campaign,
            consumer_key=consumer_key(),
            lines=[Line("1", FRIDGE_G1, 300_000, device), Line("2", WASHER, 300_000, device)],
        )
    assert raised.value.metadata["field"] == "lines[1].serial_number"
    # Two requests: the serial sold again under another GTIN.
    first = await client.authorize(
        campaign_id=campaign, consumer_key=consumer_key(), lines=[Line("1", FRIDGE_G1, 300_000, device)]
    )
    assert first.decision == pb.DECISION_APPROVED
    again = await client.authorize(
        campaign_id=campaign, consumer_key=consumer_key(), lines=[Line("1", WASHER, 300_000, device)]
    )
    assert again.decline_reason == pb.DECLINE_REASON_SERIAL_ALREADY_SUBSIDISED


async def test_serial_keys_of_the_old_layout_are_migrated(environment: Environment, redis: Redis) -> None:
    keys = environment.keys
    device, other = serial(), serial()
    await redis.hdel(keys.schema, "serial_keys")
    await redis.set(f"{keys.tag}:serial:{FRIDGE_G1}:{device}", "a" * 32)
    await redis.set(f"{keys.tag}:serial:{WASHER}:{device}", "b" * 32)  # the same device twice, before
    await redis.set(f"{keys.tag}:serial:{PHONE}:{other}", "peer:p-other")
    result = await migrate_serial_keys(redis, keys)
    assert result.moved == 2 and result.conflicts == 1
    assert await redis.get(keys.serial(device)) in (b"a" * 32, b"b" * 32)
    assert await redis.get(keys.serial(other)) == b"peer:p-other"
    assert [key async for key in redis.scan_iter(match=f"{keys.tag}:serial:*:*")] == []
    # Done once: a second start does nothing.
    assert await migrate_serial_keys(redis, keys) == type(result)(0, 0)
    await redis.delete(keys.serial(device), keys.serial(other))


async def test_qualifications_issued_before_the_per_round_counter_are_counted(
    environment: Environment, redis: Redis
) -> None:
    """Claim once per round counts ``<category>:issued``; qualifications claimed before that
    counter existed are counted once at the next start (raised, never lowered), so a person whose
    old voucher expired is refused a second claim live as after a ledger rebuild."""
    keys = environment.keys
    await redis.hdel(keys.schema, "issued_counts")
    old, mixed, ahead = consumer_key(), consumer_key(), consumer_key()
    codes = []

    async def qualification(consumer: str, category: str) -> None:
        code = "Q" + secrets.token_hex(6).upper()
        codes.append(code)
        await redis.hset(
            keys.qualification(code),
            mapping={
                "code": code,
                "campaign": "c-round",
                "consumer": consumer,
                "category": category,
                "state": "EXPIRED",
            },
        )

    await qualification(old, "fridge")
    await qualification(old, "fridge")
    await qualification(old, "phone")
    await qualification(mixed, "fridge")
    await qualification(mixed, "fridge")
    await redis.hset(keys.qualification_holder("c-round", mixed), "fridge:issued", 1)  # claimed after the upgrade
    await qualification(ahead, "fridge")
    await redis.hset(keys.qualification_holder("c-round", ahead), "fridge:issued", 5)
    try:
        assert await migrate_issued_counts(redis, keys) == 3
        assert await redis.hget(keys.qualification_holder("c-round", old), "fridge:issued") == b"2"
        assert await redis.hget(keys.qualification_holder("c-round", old), "phone:issued") == b"1"
        assert await redis.hget(keys.qualification_holder("c-round", mixed), "fridge:issued") == b"2"
        assert await redis.hget(keys.qualification_holder("c-round", ahead), "fridge:issued") == b"5"
        # Done once: a second start does nothing.
        assert await migrate_issued_counts(redis, keys) == 0
    finally:
        await redis.delete(
            *(keys.qualification(code) for code in codes),
            *(keys.qualification_holder("c-round", consumer) for consumer in (old, mixed, ahead)),
        )


# 4. request_id was case-sensitive.


async def test_upper_case_request_id_is_the_same_request(environment: Environment, client: AuthorizationClient) -> None:
    campaign = await fresh_campaign(environment)
    request_id = str(uuid.uuid4())
    person = consumer_key()
    line = Line("1", FRIDGE_G1, 300_000, serial())
    first = await client.authorize(campaign_id=campaign, consumer_key=person, lines=[line], request_id=request_id)
    assert first.decision == pb.DECISION_APPROVED
    replay = await client.authorize(
        campaign_id=campaign, consumer_key=person, lines=[line], request_id=request_id.upper()
    )
    assert replay.replayed and replay.authorization_id == first.authorization_id
    with pytest.raises(IdempotencyConflict):
        await client.authorize(
            campaign_id=campaign,
            consumer_key=consumer_key(),
            lines=[Line("1", FRIDGE_G1, 300_000, serial())],
            request_id=request_id.upper(),
        )


# 5. Unauthenticated INTERNAL, and unbounded logging of rejected calls.


def signed_metadata(terminal: str, secret: str, body: bytes, timestamp: str) -> list[tuple[str, str]]:
    nonce = secrets.token_urlsafe(16)
    try:
        signature = signing.signature(secret, AUTHORIZE, terminal, int(timestamp), nonce, body)
    except (ValueError, OverflowError):
        signature = "0" * 64
    return [
        (signing.TERMINAL_HEADER, terminal),
        (signing.TIMESTAMP_HEADER, timestamp),
        (signing.NONCE_HEADER, nonce),
        (signing.SIGNATURE_HEADER, signature),
    ]


AUTHORIZE = "/subsidy.v1.AuthorizationService/Authorize"


@pytest.mark.parametrize(
    "timestamp", [str(10**400), "9" * 16, "-1", "1e3", " 1", "0x10", str(int(time.time() * 1000)) + " "]
)
async def test_huge_timestamp_is_unauthenticated_not_internal(
    environment: Environment, gateway: Application, timestamp: str
) -> None:
    request = pb.AuthorizeRequest(
        request_id=str(uuid.uuid4()),
        campaign_id="c-main",
        consumer_key=consumer_key(),
        channel=pb.CHANNEL_POS,
        lines=[pb.LineItem(line_id="1", gtin=FRIDGE_G2, unit_price_fen=300_000)],
    )
    body = request.SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = authorization_pb2_grpc.AuthorizationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Authorize(
                request, metadata=signed_metadata("t-main-01", environment.credentials["t-main-01"], body, timestamp)
            )
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_rejected_call_logging_is_bounded_but_every_rejection_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    rejections = RejectionLog(window_s=3600)
    method = "/test.Method/" + secrets.token_hex(4)
    with caplog.at_level(logging.INFO, logger="subsidy.errors"):
        for _ in range(1000):
            rejections.rejected(method, "UNAUTHENTICATED", "UNAUTHENTICATED")
        rejections.rejected(method, "INVALID_ARGUMENT", "INVALID_FIELD")
    lines = [record for record in caplog.records if record.getMessage() == "call failed"]
    assert len(lines) == 2
    counted = REJECTED_CALLS.labels(method, "UNAUTHENTICATED", "UNAUTHENTICATED")._value.get()
    assert counted == 1000


# 6. A suspended terminal could still read.


async def test_suspended_terminal_cannot_read_authorizations(environment: Environment, redis: Redis) -> None:
    """Suspension stops every call of the credential, GetAuthorization included."""
    keys = environment.keys
    config = environment.config()
    async with running_gateway(config) as own_gateway:
        client = AuthorizationClient(
            f"127.0.0.1:{own_gateway.port}",
            "t-main-02",
            environment.credentials["t-main-02"],
            deadline_s=5,
            retry=RetryPolicy(max_attempts=1),
        )
        try:
            approved = await client.authorize(
                campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", FRIDGE_G2, 300_000)]
            )
            assert (await client.get_authorization(approved.authorization_id)).state == pb.AUTHORIZATION_STATE_PENDING
            await redis.hset(keys.terminal("t-main-02"), "status", "SUSPENDED")
            with pytest.raises(PermissionDenied):
                await client.get_authorization(approved.authorization_id)
        finally:
            await redis.hset(keys.terminal("t-main-02"), "status", "ACTIVE")
            await client.close()


# 7. Stale pooled connections after Redis closed them.


async def test_stale_pooled_connections_after_redis_closed_them_fail_no_call(
    environment: Environment, redis: Redis
) -> None:
    """Every pooled connection is closed by the server (as a Redis restart does); the next
    calls succeed on fresh connections instead of answering UNAVAILABLE."""
    name = "stale-" + secrets.token_hex(4)
    config = environment.config(redis_client_name=name)
    async with running_gateway(config) as own_gateway:
        client = AuthorizationClient(
            f"127.0.0.1:{own_gateway.port}",
            "t-main-01",
            environment.credentials["t-main-01"],
            deadline_s=5,
            retry=RetryPolicy(max_attempts=1),
        )
        try:
            people = [consumer_key() for _ in range(8)]
            # Fill the pool with several connections.
            await asyncio.gather(
                *(
                    client.authorize(campaign_id="c-main", consumer_key=p, lines=[Line("1", FRIDGE_G2, 300_000)])
                    for p in people[:4]
                )
            )
            killed = 0
            listing = await redis.client_list()
            for entry in listing:
                if entry.get("name") == name:
                    await redis.client_kill_filter(_id=entry["id"])
                    killed += 1
            assert killed >= 1
            await asyncio.sleep(0.1)
            results = await asyncio.gather(
                *(
                    client.authorize(campaign_id="c-main", consumer_key=p, lines=[Line("1", FRIDGE_G2, 300_000)])
                    for p in people[4:]
                )
            )
            assert all(result.decision == pb.DECISION_APPROVED for result in results)
        finally:
            await client.close()


# 1 (reporting). Set-aside and overdue work degrades health and shows in metrics.


async def test_set_aside_holds_show_in_metrics_and_degrade_health(services: Services) -> None:
    async with ledger_world(services) as (env, _gateway, client):
        await traffic(client, 2)
        redis = Redis.from_url(env.redis_url)
        writer = LedgerWriter(WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), redis)
        await writer.drain()
        metrics = WriterMetrics(writer)
        assert all(value == 0 for value in (await metrics.snapshot())["sweeper"].values())
        await redis.zadd(env.keys.holds_set_aside, {uuid.uuid4().hex: 1})
        await redis.zadd(env.keys.holds, {uuid.uuid4().hex: 1})  # due long ago, never swept
        details = await metrics.snapshot()
        assert details["sweeper"] == {
            "overdue_holds": 1,
            "overdue_qualifications": 0,
            "set_aside_holds": 1,
            "set_aside_qualifications": 0,
        }
        server = await serve_metrics(metrics, "127.0.0.1:0")
        port = server.port
        reader, stream = await asyncio.open_connection("127.0.0.1", port)
        stream.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        health = (await reader.read()).decode()
        stream.close()
        server.close()
        assert " 503 Service Unavailable" in health.splitlines()[0] and '"status":"degraded"' in health
        await redis.aclose()


# 8. stream_length was not the backlog after a writer takeover.


async def test_stream_length_is_the_backlog_after_a_writer_takeover(services: Services) -> None:
    """XTRIM MINID ~ removes at most 10,000 entries a call, and the writer trimmed only after a
    batch: a takeover that acknowledged a long backlog left the rest in the stream for good
    (10,505 entries, nothing pending). An idle writer now trims too, so the length converges."""
    async with ledger_world(services) as (env, _gateway, _client):
        redis = Redis.from_url(env.redis_url)
        config = WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix, block_ms=10)
        writer = LedgerWriter(config, redis)
        await writer.ensure_group()
        # 12,000 entries delivered to and acknowledged by a writer that then went away.
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(12_000):
                pipe.xadd(env.keys.ledger, {"e": "{}"})
            await pipe.execute()
        delivered = await redis.xreadgroup(config.group, "gone", {env.keys.ledger: ">"}, count=12_000)
        ids = [entry_id for entry_id, _ in delivered[0][1]]
        await redis.xack(env.keys.ledger, config.group, *ids)
        await writer.trim_acknowledged()  # the last trim after that writer's last batch
        for _ in range(3):
            await writer.step(block=False)  # idle
        current = await lag(redis, env.keys, config.group)
        assert current.backlog == 0
        # Approximate trimming keeps at most one radix-tree node (100 entries by default).
        assert current.stream_length <= 100
        await redis.aclose()
