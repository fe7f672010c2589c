"""Hot-path risk rules (issue 14, section 1) through the public API, on real Redis and PostgreSQL.

- Block lists (BlockListService): each kind of block declines with its own reason and nothing
  else declines; a block set through one gateway is effective at once through another (no
  per-process cache), and so is lifting it; expiry by Redis's clock; a blocked merchant's
  pending hold cannot be captured and is kept (PENDING, reservation unchanged) until the block
  is lifted; the block list is re-published after a Redis loss.
- Velocity limits (Campaign.risk_limits): each at its limit and one past it, and the window
  sliding (the counters' timestamps moved back rather than waiting).
- The price flag: raised on a merchant selling at the cap threshold far more often than the
  rest of the category, not on normal sales; it never declines.
- Every risk decline and every flag is exactly one row in risk_events once the writer drained,
  a retried request (same request id) adding none.

The module runs its own world (database, Redis prefix, gateways) so that it can count every
risk event it causes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from click.testing import CliRunner, Result
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy, SignedClient
from subsidy_client.errors import FailedPrecondition, InvalidArgument, MerchantSuspended, NotFound, PermissionDenied
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import blocklist_pb2 as bpb
from subsidy_client.v1 import campaign_pb2 as cpb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from server.ctl import main as subsidyctl
from storage.devenv import Services
from storage.postgres import risk_blocks
from storage.postgres.risk_events import RiskEventWriter
from tests.conftest import (
    Environment,
    consumer_key,
    consumer_key_of,
    id_number,
    isolated_environment,
    load_document,
    running_gateway,
)

BLOCKS = "/subsidy.v1.BlockListService/"
OPERATOR = "op-auditor"
FRIDGE = "6970000000024"  # fridge, grade 2 (c-main 15 %, cap 2,000 yuan), no serial required
GOODS = "6970000000086"  # general (c-qual: 500 off 2,000, one per person)
XIAOSHAN = common_pb2.Location(
    latitude=30.18, longitude=120.26, coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84, accuracy_m=20
)


@dataclass
class World:
    env: Environment
    redis: Redis
    # Two gateways over the same Redis and PostgreSQL: "a" and "b".
    targets: dict[str, str]
    clients: list[SignedClient]

    def signed(self, caller_id: str, gateway: str = "a") -> SignedClient:
        client = SignedClient(
            self.targets[gateway], caller_id, self.env.credentials[caller_id], retry=RetryPolicy(max_attempts=1)
        )
        self.clients.append(client)
        return client

    def till(self, terminal_id: str, gateway: str = "a") -> AuthorizationClient:
        client = AuthorizationClient(
            self.targets[gateway], terminal_id, self.env.credentials[terminal_id], retry=RetryPolicy(max_attempts=1)
        )
        self.clients.append(client)
        return client

    def wallet(self, partner_id: str, gateway: str = "a") -> QualificationClient:
        client = QualificationClient(
            self.targets[gateway], partner_id, self.env.credentials[partner_id], retry=RetryPolicy(max_attempts=1)
        )
        self.clients.append(client)
        return client

    async def risk_events(self) -> list[asyncpg.Record]:
        """Every risk event, after the writer drained the stream (as the writer process does)."""
        await RiskEventWriter(self.redis, self.env.keys, self.env.pg_dsn).drain()
        connection = await asyncpg.connect(self.env.pg_dsn)
        try:
            return list(await connection.fetch("SELECT * FROM risk_events ORDER BY event_id"))
        finally:
            await connection.close()


def risk_campaign(campaign_id: str, limits: dict[str, int], per_person_limit: int = 1000) -> dict[str, Any]:
    return {
        "id": campaign_id,
        "starts_at": "2020-01-01T00:00:00+08:00",
        "ends_at": "2099-01-01T00:00:00+08:00",
        "rules": [
            {"category": "fridge", "kind": "PERCENT", "rates_bp": {"1": 2000, "2": 1500, "0": 1500},
             "cap_fen": 200_000, "per_person_limit": per_person_limit, "budget_fen": 100_000_000_000},
        ],
        "risk_limits": limits,
    }  # fmt: skip


# The module's campaigns with risk rules, loaded as a reference file (parse_reference, save,
# publish); c-main of the shared fixtures has none.
RISK_CAMPAIGNS = {
    "campaigns": [
        risk_campaign("c-vel-terminal", {"terminal_sales_per_minute": 2, "terminal_sales_per_hour": 3}),
        risk_campaign("c-vel-merchant", {"merchant_sales_per_day": 3}),
        risk_campaign("c-vel-consumer", {"consumer_sales_per_hour": 1}),
        risk_campaign("c-price", {"price_flag_min_sales": 5, "price_flag_ratio_percent": 300}),
        risk_campaign("c-price-edge", {"price_flag_min_sales": 2, "price_flag_ratio_percent": 200}),
    ]
}
# c-price's fridge rule for FRIDGE (grade 2): 15 %, capped at 200,000 fen, reached from
# ceil(200,000 * 10,000 / 1,500) = 1,333,334 fen.
CAP_THRESHOLD = 1_333_334


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[World]:
    async with isolated_environment(services) as env:
        await load_document(env, RISK_CAMPAIGNS)
        redis = Redis.from_url(env.redis_url)
        async with running_gateway(env.config()) as first, running_gateway(env.config()) as second:
            made = World(env, redis, {"a": f"127.0.0.1:{first.port}", "b": f"127.0.0.1:{second.port}"}, [])
            try:
                yield made
            finally:
                await asyncio.gather(*(client.close() for client in made.clients))
                await redis.aclose()


async def block(
    operator: SignedClient, kind: int, subject: str, reason: str = "fraud suspected", expires_ms: int = 0
) -> bpb.AddBlockResponse:
    request = bpb.AddBlockRequest(request_id=str(uuid.uuid4()), kind=kind, subject_id=subject, reason=reason)  # type: ignore[arg-type]
    if expires_ms:
        stamp = Timestamp()
        stamp.FromMilliseconds(expires_ms)
        request.expires_at.CopyFrom(stamp)
    return await operator._call(BLOCKS + "AddBlock", request, bpb.AddBlockResponse)


async def unblock(operator: SignedClient, kind: int, subject: str) -> bpb.RemoveBlockResponse:
    request = bpb.RemoveBlockRequest(request_id=str(uuid.uuid4()), kind=kind, subject_id=subject)  # type: ignore[arg-type]
    return await operator._call(BLOCKS + "RemoveBlock", request, bpb.RemoveBlockResponse)


async def listed(operator: SignedClient) -> list[tuple[int, str]]:
    response = await operator._call(BLOCKS + "ListBlocks", bpb.ListBlocksRequest(), bpb.ListBlocksResponse)
    return [(item.kind, item.subject_id) for item in response.blocks]


async def fridge(
    till: AuthorizationClient, key: str = "", serial: str = "", price: int = 300_000, **extra: Any
) -> apb.AuthorizeResponse:
    return await till.authorize(
        campaign_id=extra.pop("campaign_id", "c-main"),
        consumer_key=key or consumer_key(),
        lines=[Line("l1", FRIDGE, price, serial)],
        **extra,
    )


def reason(response: apb.AuthorizeResponse) -> str:
    if response.decision == apb.DECISION_APPROVED:
        return "APPROVED"
    return apb.DeclineReason.Name(response.decline_reason).removeprefix("DECLINE_REASON_")


async def claim(wallet: QualificationClient, person: str) -> qpb.ClaimQualificationResponse:
    return await wallet.claim(
        campaign_id="c-qual",
        category="general",
        id_number=person,
        location=XIAOSHAN,
        fix_time_ms=int(time.time() * 1000),
    )


def claim_reason(response: qpb.ClaimQualificationResponse) -> str:
    if response.decision == qpb.CLAIM_DECISION_ISSUED:
        return "ISSUED"
    return qpb.ClaimDeclineReason.Name(response.decline_reason).removeprefix("CLAIM_DECLINE_REASON_")


async def redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


# --- Block lists -------------------------------------------------------------------------------


async def test_each_block_declines_with_its_reason_through_another_gateway_and_nothing_else(world: World) -> None:
    operator = world.signed(OPERATOR, "a")
    main, main2, other = world.till("t-main-01", "b"), world.till("t-main-02", "b"), world.till("t-other-01", "b")
    before = len(await world.risk_events())
    blocked_key, device = consumer_key(), "sn-blocked-" + uuid.uuid4().hex[:8]

    await block(operator, bpb.BLOCK_KIND_TERMINAL, "t-main-02")
    await block(operator, bpb.BLOCK_KIND_MERCHANT, "m-other")
    await block(operator, bpb.BLOCK_KIND_CONSUMER, blocked_key)
    # Serials are compared without regard to case: blocked in lower case, sold in upper case.
    await block(operator, bpb.BLOCK_KIND_DEVICE, device)

    # Each declines through the other gateway at once, with its own reason...
    assert reason(await fridge(main2)) == "TERMINAL_BLOCKED"
    assert reason(await fridge(other)) == "MERCHANT_BLOCKED"
    assert reason(await fridge(main, key=blocked_key)) == "CONSUMER_BLOCKED"
    devices = await fridge(main, serial=device.upper())
    assert reason(devices) == "DEVICE_BLOCKED" and devices.declined_line_id == "l1"
    # ...and nothing else: the other terminal of the merchant, another consumer, another device.
    assert reason(await fridge(main)) == "APPROVED"
    assert reason(await fridge(main, serial="SN-FREE-" + uuid.uuid4().hex[:8].upper())) == "APPROVED"

    events = (await world.risk_events())[before:]
    assert [(row["action"], row["rule"], row["subject_kind"], row["subject_id"]) for row in events] == [
        ("DECLINE", "TERMINAL_BLOCKED", "TERMINAL", "t-main-02"),
        ("DECLINE", "MERCHANT_BLOCKED", "MERCHANT", "m-other"),
        ("DECLINE", "CONSUMER_BLOCKED", "CONSUMER", blocked_key),
        ("DECLINE", "DEVICE_BLOCKED", "DEVICE", device.upper()),
    ]
    assert all(row["campaign_id"] == "c-main" and row["request_id"] for row in events)
    assert events[1]["terminal_id"] == "t-other-01" and events[1]["merchant_id"] == "m-other"

    # Lifted through the first gateway: effective through the second at once.
    await unblock(operator, bpb.BLOCK_KIND_TERMINAL, "t-main-02")
    await unblock(operator, bpb.BLOCK_KIND_MERCHANT, "m-other")
    await unblock(operator, bpb.BLOCK_KIND_CONSUMER, blocked_key)
    await unblock(operator, bpb.BLOCK_KIND_DEVICE, device)
    assert reason(await fridge(main2)) == "APPROVED"
    assert reason(await fridge(other)) == "APPROVED"
    assert reason(await fridge(main, key=blocked_key)) == "APPROVED"
    assert reason(await fridge(main, serial=device.upper())) == "APPROVED"
    assert len(await world.risk_events()) == before + 4


async def test_a_block_ranks_before_the_terminals_status(world: World) -> None:
    operator = world.signed(OPERATOR)
    suspended = world.till("t-main-off")
    # Suspended: it authenticates and the script declines it TERMINAL_INACTIVE; blocked as well,
    # the block is what it hears (and what the risk events record).
    assert reason(await fridge(suspended)) == "TERMINAL_INACTIVE"
    await block(operator, bpb.BLOCK_KIND_TERMINAL, "t-main-off")
    try:
        assert reason(await fridge(suspended)) == "TERMINAL_BLOCKED"
    finally:
        await unblock(operator, bpb.BLOCK_KIND_TERMINAL, "t-main-off")


async def test_partner_app_and_consumer_blocks_decline_claims_and_redemptions(world: World) -> None:
    operator = world.signed(OPERATOR)
    bank, wallet = world.wallet("p-bank-01"), world.wallet("p-wallet-01")
    till = world.till("t-main-01")
    before = len(await world.risk_events())
    # A code the bank app issued before it was blocked, and one of the wallet app.
    early, person = id_number(), id_number()
    bank_code = (await claim(bank, early)).qualification.redemption_code
    assert bank_code
    await block(operator, bpb.BLOCK_KIND_PARTNER_APP, "p-bank-01")
    blocked_person = id_number()
    await block(operator, bpb.BLOCK_KIND_CONSUMER, consumer_key_of(blocked_person))
    try:
        assert claim_reason(await claim(bank, id_number())) == "PARTNER_APP_BLOCKED"
        assert claim_reason(await claim(wallet, blocked_person)) == "CONSUMER_BLOCKED"
        wallet_code = (await claim(wallet, person)).qualification.redemption_code
        assert wallet_code
        # Redeeming the bank app's code (a till sending the code alone): the issuing app is blocked.
        goods = [Line("l1", GOODS, 3_000)]
        redeemed = await till.authorize(campaign_id="c-qual", redemption_code=bank_code, lines=goods)
        assert reason(redeemed) == "PARTNER_APP_BLOCKED"
        redeemed = await till.authorize(
            campaign_id="c-qual", consumer_key=consumer_key_of(early), redemption_code=bank_code, lines=goods
        )
        assert reason(redeemed) == "PARTNER_APP_BLOCKED"
        assert (
            reason(await till.authorize(campaign_id="c-qual", redemption_code=wallet_code, lines=goods)) == "APPROVED"
        )
    finally:
        await unblock(operator, bpb.BLOCK_KIND_PARTNER_APP, "p-bank-01")
        await unblock(operator, bpb.BLOCK_KIND_CONSUMER, consumer_key_of(blocked_person))
    events = (await world.risk_events())[before:]
    assert [(row["rule"], row["subject_id"], row["terminal_id"]) for row in events] == [
        ("PARTNER_APP_BLOCKED", "p-bank-01", "p-bank-01"),
        ("CONSUMER_BLOCKED", consumer_key_of(blocked_person), "p-wallet-01"),
        ("PARTNER_APP_BLOCKED", "p-bank-01", "t-main-01"),
        ("PARTNER_APP_BLOCKED", "p-bank-01", "t-main-01"),
    ]
    # Lifted: the bank app's code is redeemable again.
    assert reason(await till.authorize(campaign_id="c-qual", redemption_code=bank_code, lines=goods)) == "APPROVED"


async def test_a_retried_decline_is_one_risk_event(world: World) -> None:
    operator, till = world.signed(OPERATOR), world.till("t-main-01")
    key = consumer_key()
    await block(operator, bpb.BLOCK_KIND_CONSUMER, key)
    before = len(await world.risk_events())
    try:
        request_id = str(uuid.uuid4())
        first = await fridge(till, key=key, request_id=request_id)
        again = await fridge(till, key=key, request_id=request_id)
        assert reason(first) == reason(again) == "CONSUMER_BLOCKED" and again.replayed and not first.replayed
    finally:
        await unblock(operator, bpb.BLOCK_KIND_CONSUMER, key)
    events = (await world.risk_events())[before:]
    assert [(row["rule"], row["request_id"]) for row in events] == [("CONSUMER_BLOCKED", request_id)]
    # Draining again writes nothing more.
    assert len(await world.risk_events()) == before + 1


async def test_block_expiry_by_the_servers_clock(world: World) -> None:
    operator, till = world.signed(OPERATOR), world.till("t-main-01", "b")
    key = consumer_key()
    expires_ms = int(time.time() * 1000) + 1_500
    added = await block(operator, bpb.BLOCK_KIND_CONSUMER, key, expires_ms=expires_ms)
    assert added.block.expires_at.ToMilliseconds() == expires_ms
    assert int(await world.redis.hget(world.env.keys.blocks, f"CONSUMER:{key}") or 0) == expires_ms
    assert reason(await fridge(till, key=key)) == "CONSUMER_BLOCKED"
    # Waits for Redis's clock (the script's) to pass the expiry: about 1.5 s, polled.
    while await redis_ms(world.redis) < expires_ms:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    assert reason(await fridge(till, key=key)) == "APPROVED"
    assert (bpb.BLOCK_KIND_CONSUMER, key) not in await listed(operator)


async def test_a_blocked_merchant_keeps_its_hold_and_is_paid_nothing_until_lifted(world: World) -> None:
    operator, till = world.signed(OPERATOR), world.till("t-main-01")
    approved = await fridge(till)
    assert approved.decision == apb.DECISION_APPROVED
    budget = world.env.keys.budget("c-main")
    reserved = await world.redis.hmget(budget, ["fridge:reserved", "fridge:spent"])
    await block(operator, bpb.BLOCK_KIND_MERCHANT, "m-main")
    try:
        with pytest.raises(FailedPrecondition) as refused:
            await till.capture(approved.authorization_id)
        assert refused.value.reason == "MERCHANT_SUSPENDED"
        assert isinstance(refused.value, MerchantSuspended)
        assert refused.value.metadata == {"state": "AUTHORIZATION_STATE_PENDING", "refusal": "MERCHANT_BLOCKED"}
        # Kept as it was: pending, its reservation in place, nothing spent.
        held = await till.get_authorization(approved.authorization_id)
        assert held.state == apb.AUTHORIZATION_STATE_PENDING
        assert await world.redis.hmget(budget, ["fridge:reserved", "fridge:spent"]) == reserved
        assert await world.redis.zscore(world.env.keys.holds, approved.authorization_id) is not None
        # A new payment of the merchant is declined.
        assert reason(await fridge(till)) == "MERCHANT_BLOCKED"
    finally:
        await unblock(operator, bpb.BLOCK_KIND_MERCHANT, "m-main")
    captured = await till.capture(approved.authorization_id)
    assert captured.authorization.state == apb.AUTHORIZATION_STATE_CAPTURED


async def test_the_block_list_is_published_again_after_a_redis_loss(world: World) -> None:
    operator, till = world.signed(OPERATOR), world.till("t-main-01")
    key = consumer_key()
    await block(operator, bpb.BLOCK_KIND_CONSUMER, key)
    try:
        await world.redis.delete(world.env.keys.blocks)
        assert reason(await fridge(till, key=key)) == "APPROVED"
        # What the ledger writer's publisher does every second.
        connection = await asyncpg.connect(world.env.pg_dsn)
        try:
            assert await risk_blocks.sync(connection, world.redis, world.env.keys)
            assert not await risk_blocks.sync(connection, world.redis, world.env.keys)
        finally:
            await connection.close()
        assert reason(await fridge(till, key=key)) == "CONSUMER_BLOCKED"
    finally:
        await unblock(operator, bpb.BLOCK_KIND_CONSUMER, key)


async def test_block_list_bad_input_and_callers(world: World) -> None:
    operator = world.signed(OPERATOR)
    before = await listed(operator)
    cases = [
        (bpb.BLOCK_KIND_UNSPECIFIED, "m-main", "why", 0, "kind"),
        (bpb.BLOCK_KIND_CONSUMER, "not-a-key", "why", 0, "subject_id"),
        (bpb.BLOCK_KIND_MERCHANT, "m main", "why", 0, "subject_id"),
        (bpb.BLOCK_KIND_DEVICE, "S" * 65, "why", 0, "subject_id"),
        (bpb.BLOCK_KIND_TERMINAL, "t-main-01", "", 0, "reason"),
        (bpb.BLOCK_KIND_TERMINAL, "t-main-01", "x" * 501, 0, "reason"),
        (bpb.BLOCK_KIND_TERMINAL, "t-main-01", "why", int(time.time() * 1000) - 1_000, "expires_at"),
    ]
    for kind, subject, why, expires_ms, field in cases:
        with pytest.raises(InvalidArgument) as refused:
            await block(operator, kind, subject, why, expires_ms)
        assert refused.value.metadata.get("field") == field, (kind, subject)
    # 500 characters is the most a reason may have.
    await block(operator, bpb.BLOCK_KIND_TERMINAL, "t-unknown-9", "x" * 500)
    await unblock(operator, bpb.BLOCK_KIND_TERMINAL, "t-unknown-9")
    assert await listed(operator) == before
    with pytest.raises(NotFound):
        await unblock(operator, bpb.BLOCK_KIND_TERMINAL, "t-unknown-9")
    for caller_id in ("t-main-01", "p-wallet-01"):
        with pytest.raises(PermissionDenied):
            await block(world.signed(caller_id), bpb.BLOCK_KIND_MERCHANT, "m-main")
        with pytest.raises(PermissionDenied):
            await listed(world.signed(caller_id))
    assert await listed(operator) == before


async def invoke(env: Environment, *arguments: str) -> Result:
    """subsidyctl runs its own event loop; run it in a thread so this test's loop keeps serving."""
    environ = {"SUBSIDY_PG_DSN": env.pg_dsn, "SUBSIDY_REDIS_URL": env.redis_url, "SUBSIDY_REDIS_PREFIX": env.prefix}
    return await asyncio.to_thread(CliRunner().invoke, subsidyctl, list(arguments), env=environ)


async def test_subsidyctl_risk_block_unblock_and_blocks(world: World) -> None:
    till = world.till("t-main-01", "b")
    key = consumer_key()
    no_operator = await invoke(world.env, "risk", "block", "consumer", key, "--reason", "broker")
    assert no_operator.exit_code == 2, no_operator.output
    bad = await invoke(world.env, "--operator", OPERATOR, "risk", "block", "consumer", "nope", "--reason", "broker")
    assert bad.exit_code == 2 and "SUBJECT" in bad.output, bad.output
    added = await invoke(
        world.env, "--operator", OPERATOR, "--json", "risk", "block", "consumer", key, "--reason", "broker"
    )
    assert added.exit_code == 0, added.output
    assert orjson.loads(added.output)["subject_id"] == key
    assert reason(await fridge(till, key=key)) == "CONSUMER_BLOCKED"
    shown = await invoke(world.env, "--json", "risk", "blocks", "--kind", "consumer")
    assert shown.exit_code == 0 and [row["subject_id"] for row in orjson.loads(shown.output)] == [key], shown.output
    lifted = await invoke(world.env, "--operator", OPERATOR, "risk", "unblock", "consumer", key)
    assert lifted.exit_code == 0, lifted.output
    assert reason(await fridge(till, key=key)) == "APPROVED"
    again = await invoke(world.env, "--operator", OPERATOR, "risk", "unblock", "consumer", key)
    assert again.exit_code == 1 and "NOT_FOUND" in again.output, again.output


# --- Velocity limits ---------------------------------------------------------------------------


async def slide(redis: Redis, key: str, back_ms: int) -> None:
    """Moves every sale of a velocity window back in time, as if it had been made back_ms earlier
    (the script's clock cannot be moved; its counters can)."""
    sales: list[tuple[bytes, float]] = await redis.zrange(key, 0, -1, withscores=True)  # type: ignore[assignment]
    assert sales, key
    moved: dict[Any, float] = {member: score - back_ms for member, score in sales}
    await redis.zadd(key, moved)


async def test_terminal_velocity_per_minute_and_hour_with_the_window_sliding(world: World) -> None:
    main, main2 = world.till("t-main-01"), world.till("t-main-02", "b")
    key = world.env.keys.velocity("c-vel-terminal", "t", "t-main-01")
    before = len(await world.risk_events())

    async def sale(till: AuthorizationClient = main) -> str:
        return reason(await fridge(till, campaign_id="c-vel-terminal"))

    # The limit is 2 a minute: the first two approved, the third declined; another terminal is not.
    assert [await sale(), await sale()] == ["APPROVED", "APPROVED"]
    assert await sale() == "TERMINAL_VELOCITY_MINUTE"
    assert await sale(main2) == "APPROVED"
    # A minute later (the two sales moved 61 s back): approved, the third of the hour (limit 3)...
    await slide(world.redis, key, 61_000)
    assert await sale() == "APPROVED"
    # ...so the next is over the hour's limit, though the minute has room.
    assert await sale() == "TERMINAL_VELOCITY_HOUR"
    # An hour later, room again.
    await slide(world.redis, key, 3_600_000)
    assert await sale() == "APPROVED"

    events = (await world.risk_events())[before:]
    assert [(row["rule"], row["subject_kind"], row["subject_id"]) for row in events] == [
        ("TERMINAL_VELOCITY_MINUTE", "TERMINAL", "t-main-01"),
        ("TERMINAL_VELOCITY_HOUR", "TERMINAL", "t-main-01"),
    ]
    assert orjson.loads(events[0]["evidence"]) == {"limit": 2, "sales": 2, "window_s": 60}
    assert orjson.loads(events[1]["evidence"]) == {"limit": 3, "sales": 3, "window_s": 3600}


async def test_merchant_velocity_per_programme_day(world: World) -> None:
    main, main2, other = world.till("t-main-01"), world.till("t-main-02"), world.till("t-other-01")
    before = len(await world.risk_events())

    async def sale(till: AuthorizationClient) -> str:
        return reason(await fridge(till, campaign_id="c-vel-merchant"))

    # 3 a day for the merchant, whichever of its terminals sells.
    assert [await sale(main), await sale(main2), await sale(main)] == ["APPROVED"] * 3
    assert await sale(main2) == "MERCHANT_VELOCITY_DAY"
    assert await sale(other) == "APPROVED"
    # Yesterday's sales do not count today: today's count moved to the day before.
    counter = world.env.keys.velocity("c-vel-merchant", "m", "m-main")
    ((day, count),) = (await world.redis.hgetall(counter)).items()
    await world.redis.hset(counter, mapping={str(int(day) - 1): count, day: 0})
    assert await sale(main) == "APPROVED"
    events = (await world.risk_events())[before:]
    assert [(row["rule"], row["subject_id"], row["terminal_id"]) for row in events] == [
        ("MERCHANT_VELOCITY_DAY", "m-main", "t-main-02")
    ]
    assert orjson.loads(events[0]["evidence"]) == {"limit": 3, "sales": 3, "day": int(day)}


async def test_consumer_velocity_across_merchants_and_a_void_gives_nothing_back(world: World) -> None:
    main, other = world.till("t-main-01"), world.till("t-other-01", "b")
    person = consumer_key()
    before = len(await world.risk_events())
    first = await fridge(main, key=person, campaign_id="c-vel-consumer")
    assert reason(first) == "APPROVED"
    # One an hour, across merchants; another consumer is not limited.
    assert reason(await fridge(other, key=person, campaign_id="c-vel-consumer")) == "CONSUMER_VELOCITY_HOUR"
    assert reason(await fridge(other, campaign_id="c-vel-consumer")) == "APPROVED"
    # Voiding the sale does not give the slot back: the attempt is what the limit counts.
    await main.void(first.authorization_id)
    assert reason(await fridge(main, key=person, campaign_id="c-vel-consumer")) == "CONSUMER_VELOCITY_HOUR"
    await slide(world.redis, world.env.keys.velocity("c-vel-consumer", "c", person), 3_600_000)
    assert reason(await fridge(other, key=person, campaign_id="c-vel-consumer")) == "APPROVED"
    events = (await world.risk_events())[before:]
    assert [(row["rule"], row["subject_id"]) for row in events] == [("CONSUMER_VELOCITY_HOUR", person)] * 2
    # A campaign without limits (c-main) keeps no velocity counters at all.
    assert not [key async for key in world.redis.scan_iter(match=f"{world.env.keys.tag}:vel:c-main:*")]


# --- The price flag ----------------------------------------------------------------------------


async def test_the_price_flag_is_raised_on_a_merchant_pricing_at_the_cap_threshold_and_not_on_normal_sales(
    world: World,
) -> None:
    main, other, scoped = world.till("t-main-01"), world.till("t-other-01"), world.till("t-scoped-01")
    before = len(await world.risk_events())

    async def sale(till: AuthorizationClient, price: int) -> None:
        assert reason(await fridge(till, price=price, campaign_id="c-price")) == "APPROVED"

    async def flags() -> list[asyncpg.Record]:
        return [row for row in (await world.risk_events())[before:] if row["action"] == "FLAG"]

    # Normal data: m-other 10 lines (1 at the threshold), m-main 6 (1 at it, one cent either
    # side of it twice): shares 10 % and 17 %, neither over 3 times the other's.
    for price in (300_000, 500_000, 800_000, 1_000_000, 1_200_000, 1_500_000, 2_000_000, 900_000, 700_000):
        await sale(other, price)
    await sale(other, CAP_THRESHOLD)
    for price in (CAP_THRESHOLD - 1, CAP_THRESHOLD + 1, CAP_THRESHOLD - 1, CAP_THRESHOLD + 1, 600_000):
        await sale(main, price)
    await sale(main, CAP_THRESHOLD)
    assert await flags() == []
    # Planted: m-scoped sells only at the threshold. Four sales are below the minimum of 5...
    for _ in range(4):
        await sale(scoped, CAP_THRESHOLD)
    assert await flags() == []
    # ...the fifth flags it (5 of 5 against 2 of 16), once; the sale itself is approved.
    await sale(scoped, CAP_THRESHOLD)
    await sale(scoped, CAP_THRESHOLD)
    found = await flags()
    assert [(row["rule"], row["subject_kind"], row["subject_id"], row["terminal_id"]) for row in found] == [
        ("PRICE_AT_CAP_THRESHOLD", "MERCHANT", "m-scoped", "t-scoped-01")
    ]
    assert found[0]["authorization_id"]
    evidence = orjson.loads(found[0]["evidence"])
    assert {key: evidence[key] for key in ("merchant_lines", "merchant_at_threshold", "others_lines")} == {
        "merchant_lines": 5,
        "merchant_at_threshold": 5,
        "others_lines": 16,
    }
    assert (evidence["others_at_threshold"], evidence["threshold_fen"], evidence["category"]) == (
        2,
        CAP_THRESHOLD,
        "fridge",
    )
    # No decline anywhere in this test.
    assert all(row["action"] == "FLAG" for row in (await world.risk_events())[before:])


async def test_the_price_flag_at_exactly_the_ratio_and_just_over_it(world: World) -> None:
    """c-price-edge flags a share over 200 % of the others' with at least 2 lines each side."""
    main, other = world.till("t-main-01"), world.till("t-other-01")
    before = len(await world.risk_events())

    async def sale(till: AuthorizationClient, price: int) -> None:
        assert reason(await fridge(till, price=price, campaign_id="c-price-edge")) == "APPROVED"

    # The others: 1 of 4 lines at the threshold (25 %).
    for price in (CAP_THRESHOLD, 500_000, 600_000, 700_000):
        await sale(other, price)
    # m-main: 1 of 2 (50 %): exactly 200 % of 25 %, not over it.
    await sale(main, 500_000)
    await sale(main, CAP_THRESHOLD)
    assert (await world.risk_events())[before:] == []
    # 2 of 3 (67 %): over it.
    await sale(main, CAP_THRESHOLD)
    events = (await world.risk_events())[before:]
    assert [(row["action"], row["subject_id"]) for row in events] == [("FLAG", "m-main")]


# --- Campaign.risk_limits through CampaignService ----------------------------------------------

CAMPAIGNS = "/subsidy.v1.CampaignService/"


def limited_campaign(campaign_id: str, **limits: int) -> cpb.Campaign:
    start = datetime.now(UTC) - timedelta(days=1)
    campaign = cpb.Campaign(campaign_id=campaign_id, name="risk", status=cpb.CAMPAIGN_STATUS_ACTIVE)
    campaign.starts_at.FromDatetime(start)
    campaign.ends_at.FromDatetime(start + timedelta(days=30))
    campaign.rules.append(
        cpb.CategoryRule(
            category="fridge",
            kind=cpb.RULE_KIND_PERCENT,
            rates=[cpb.GradeRate(energy_grade=2, rate_bp=1500)],
            cap_fen=200_000,
            per_person_limit=10,
            budget_fen=10_000_000_000,
        )
    )
    campaign.risk_limits.CopyFrom(cpb.RiskLimits(**limits))
    return campaign


async def test_risk_limits_through_the_campaign_service(world: World) -> None:
    operator, till = world.signed(OPERATOR), world.till("t-main-01")

    async def create(campaign: cpb.Campaign) -> cpb.CreateCampaignResponse:
        request = cpb.CreateCampaignRequest(request_id=str(uuid.uuid4()), campaign=campaign)
        return await operator._call(CAMPAIGNS + "CreateCampaign", request, cpb.CreateCampaignResponse)

    # The most a limit may be, and one more; a price flag without a ratio over 100 %, or a ratio
    # alone: each refused naming its field, nothing created.
    refusals = [
        ({"terminal_sales_per_minute": 1_000_001}, "terminal_sales_per_minute"),
        ({"consumer_sales_per_hour": -1}, "consumer_sales_per_hour"),
        ({"price_flag_min_sales": 5, "price_flag_ratio_percent": 100}, "price_flag_ratio_percent"),
        ({"price_flag_ratio_percent": 300}, "price_flag_min_sales"),
    ]
    for limits, field in refusals:
        campaign_id = "c-refused-" + uuid.uuid4().hex[:6]
        with pytest.raises(InvalidArgument) as refused:
            await create(limited_campaign(campaign_id, **limits))
        assert refused.value.metadata["field"] == f"campaign.risk_limits.{field}", limits
        assert not await world.redis.exists(world.env.keys.campaign(campaign_id))
    created = await create(
        limited_campaign("c-vel-api", terminal_sales_per_minute=1_000_000, consumer_sales_per_hour=1)
    )
    assert created.campaign.risk_limits == cpb.RiskLimits(
        terminal_sales_per_minute=1_000_000, consumer_sales_per_hour=1
    )
    got = await operator._call(
        CAMPAIGNS + "GetCampaign", cpb.GetCampaignRequest(campaign_id="c-vel-api"), cpb.GetCampaignResponse
    )
    assert got.campaign.risk_limits == created.campaign.risk_limits
    # Limit 1 on the consumer: the second sale within the hour is declined.
    person = consumer_key()
    assert reason(await fridge(till, key=person, campaign_id="c-vel-api")) == "APPROVED"
    assert reason(await fridge(till, key=person, campaign_id="c-vel-api")) == "CONSUMER_VELOCITY_HOUR"
    # Updated to no limits (0 everywhere): the campaign keeps no risk rules.
    update = cpb.UpdateCampaignRequest(request_id=str(uuid.uuid4()), campaign=limited_campaign("c-vel-api"))
    updated = await operator._call(CAMPAIGNS + "UpdateCampaign", update, cpb.UpdateCampaignResponse)
    assert not updated.campaign.HasField("risk_limits")
    assert await world.redis.hget(world.env.keys.campaign("c-vel-api"), "risk") == b""
    assert reason(await fridge(till, key=person, campaign_id="c-vel-api")) == "APPROVED"
