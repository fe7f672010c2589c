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
from typing import Any

import asyncpg
import orjson
import pytest
from click.testing import CliRunner, Result
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy, SignedClient
from subsidy_client.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import blocklist_pb2 as bpb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from server.ctl import main as subsidyctl
from storage.devenv import Services
from storage.postgres import risk_blocks
from storage.postgres.risk_events import RiskEventWriter
from tests.conftest import Environment, consumer_key, consumer_key_of, id_number, isolated_environment, running_gateway

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


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[World]:
    async with isolated_environment(services) as env:
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
        assert refused.value.reason == "INVALID_STATE"
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
