"""Boundaries of the hot-path risk rules (issue 14, section 1) that tests/integration/test_risk_rules.py
leaves open, through the public API on real Redis and PostgreSQL.

- The price flag's "others >= minimum": a merchant selling only at the cap threshold is flagged
  only once the other merchants have at least price_flag_min_sales lines of the category that
  day. Others at zero, one, the minimum less one, the minimum and the minimum plus one; the
  ratio is set so low that from two other lines on it is met, so at the minimum less one only
  the minimum holds the flag back.
- A voucher pack claimed by a blocked consumer, or through a blocked partner app: declined with
  the block's reason, one risk event, and nothing reserved (the pack's quota, the person's holder
  hash, no voucher issued); once the block is lifted the same person gets the pack. A claim
  carries no device serial, so a DEVICE block has nothing to match on a claim (it declines
  Authorize lines, tested in test_risk_rules.py).

The module runs its own world (database, Redis prefix, gateway) so that it can count every risk
event it causes.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy, SignedClient
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import blocklist_pb2 as bpb
from subsidy_client.v1 import campaign_pb2 as cpb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from storage.devenv import Services
from storage.postgres.risk_events import RiskEventWriter
from tests.conftest import (
    Environment,
    consumer_key,
    consumer_key_of,
    id_number,
    isolated_environment,
    load_document,
    running_gateway,
    snapshot,
)
from tests.integration.test_risk_rules import claim_reason

BLOCKS = "/subsidy.v1.BlockListService/"
CAMPAIGNS = "/subsidy.v1.CampaignService/"
OPERATOR = "op-auditor"
FRIDGE = "6970000000024"  # fridge, grade 2 (15 %, cap 2,000 yuan below), no serial required
# The fridge rule below for FRIDGE: 15 %, capped at 200,000 fen, reached from
# ceil(200,000 * 10,000 / 1,500) = 1,333,334 fen.
CAP_THRESHOLD = 1_333_334
MINIMUM = 4  # price_flag_min_sales
# 150 %: with the merchant's lines all at the threshold and none of the others', the ratio test
# 100 * own_t * others_n > ratio * own_n * max(others_t, 1) holds from 2 other lines on.
RATIO = 150
OTHERS = (0, 1, MINIMUM - 1, MINIMUM, MINIMUM + 1)
XIAOSHAN = common_pb2.Location(
    latitude=30.18, longitude=120.26, coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84, accuracy_m=20
)


def flag_campaign(campaign_id: str) -> dict[str, Any]:
    return {
        "id": campaign_id,
        "starts_at": "2020-01-01T00:00:00+08:00",
        "ends_at": "2099-01-01T00:00:00+08:00",
        "rules": [
            {"category": "fridge", "kind": "PERCENT", "rates_bp": {"1": 2000, "2": 1500, "0": 1500},
             "cap_fen": 200_000, "per_person_limit": 1000, "budget_fen": 100_000_000_000},
        ],
        "risk_limits": {"price_flag_min_sales": MINIMUM, "price_flag_ratio_percent": RATIO},
    }  # fmt: skip


# One campaign per count of the others' lines, so that each case starts from empty counters.
FLAG_CAMPAIGNS = {"campaigns": [flag_campaign(f"c-flag-others-{others}") for others in OTHERS]}


@dataclass
class World:
    env: Environment
    redis: Redis
    operator: SignedClient
    wallet: QualificationClient
    bank: QualificationClient
    main: AuthorizationClient
    other: AuthorizationClient

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
        await load_document(env, FLAG_CAMPAIGNS)
        async with running_gateway(env.config()) as gateway:
            target, once = f"127.0.0.1:{gateway.port}", RetryPolicy(max_attempts=1)
            credentials = env.credentials
            made = World(
                env,
                Redis.from_url(env.redis_url),
                SignedClient(target, OPERATOR, credentials[OPERATOR], deadline_s=10.0, retry=once),
                QualificationClient(target, "p-wallet-01", credentials["p-wallet-01"], retry=once),
                QualificationClient(target, "p-bank-01", credentials["p-bank-01"], retry=once),
                AuthorizationClient(target, "t-main-01", credentials["t-main-01"], retry=once),
                AuthorizationClient(target, "t-other-01", credentials["t-other-01"], retry=once),
            )
            try:
                yield made
            finally:
                for client in (made.operator, made.wallet, made.bank, made.main, made.other):
                    await client.close()
                await made.redis.aclose()


def reason(response: apb.AuthorizeResponse) -> str:
    if response.decision == apb.DECISION_APPROVED:
        return "APPROVED"
    return apb.DeclineReason.Name(response.decline_reason).removeprefix("DECLINE_REASON_")


# --- The price flag: the others' minimum -------------------------------------------------------


@pytest.mark.parametrize("others", OTHERS)
async def test_the_price_flag_needs_the_minimum_of_other_sales(world: World, others: int) -> None:
    """m-other sells ``others`` fridges at an ordinary price, then m-main sells MINIMUM at exactly
    the cap threshold (every one approved). m-main is flagged, once, on its MINIMUM-th sale only
    when the others have at least MINIMUM lines; at MINIMUM - 1 the ratio is met (3 x 100 > 150)
    and only the minimum holds the flag back."""
    campaign_id = f"c-flag-others-{others}"
    before = len(await world.risk_events())

    async def sale(till: AuthorizationClient, price: int) -> apb.AuthorizeResponse:
        response = await till.authorize(
            campaign_id=campaign_id, consumer_key=consumer_key(), lines=[Line("l1", FRIDGE, price)]
        )
        assert reason(response) == "APPROVED"
        return response

    for _ in range(others):
        await sale(world.other, 500_000)
    sales = [await sale(world.main, CAP_THRESHOLD) for _ in range(MINIMUM)]
    events = (await world.risk_events())[before:]
    if others < MINIMUM:
        assert events == []
        return
    assert [(row["action"], row["rule"], row["subject_kind"], row["subject_id"]) for row in events] == [
        ("FLAG", "PRICE_AT_CAP_THRESHOLD", "MERCHANT", "m-main")
    ]
    assert (events[0]["campaign_id"], events[0]["terminal_id"]) == (campaign_id, "t-main-01")
    assert events[0]["authorization_id"] == sales[-1].authorization_id
    evidence = orjson.loads(events[0]["evidence"])
    assert {key: evidence[key] for key in ("merchant_lines", "merchant_at_threshold", "others_lines")} == {
        "merchant_lines": MINIMUM,
        "merchant_at_threshold": MINIMUM,
        "others_lines": others,
    }
    assert (evidence["others_at_threshold"], evidence["min_sales"], evidence["ratio_percent"]) == (0, MINIMUM, RATIO)


# --- A voucher pack claimed by a blocked consumer or through a blocked app ---------------------


def stamp(moment: float) -> Timestamp:
    result = Timestamp()
    result.FromMilliseconds(int(moment * 1000))
    return result


def pack_campaign(campaign_id: str) -> cpb.Campaign:
    """One pack "p" of two vouchers of category general (5 off 20, 10 off 40), quota 10."""
    return cpb.Campaign(
        campaign_id=campaign_id,
        name=campaign_id,
        status=cpb.CAMPAIGN_STATUS_ACTIVE,
        starts_at=stamp(datetime(2020, 1, 1, tzinfo=UTC).timestamp()),
        ends_at=stamp(datetime(2099, 1, 1, tzinfo=UTC).timestamp()),
        qualification_validity_s=3600,
        rules=[
            cpb.CategoryRule(
                category="general",
                kind=cpb.RULE_KIND_FIXED,
                threshold_fen=2_000,
                off_fen=500,
                per_person_limit=2,
                budget_fen=10_000_000_000,
            )
        ],
        packs=[
            cpb.VoucherPack(
                pack_id="p",
                vouchers=[
                    cpb.PackVoucher(category="general", threshold_fen=2_000, off_fen=500),
                    cpb.PackVoucher(category="general", threshold_fen=4_000, off_fen=1_000),
                ],
                quota=10,
            )
        ],
    )


async def create_pack_campaign(world: World) -> str:
    campaign_id = "c-pack-" + secrets.token_hex(4)
    request = cpb.CreateCampaignRequest(request_id=str(uuid.uuid4()), campaign=pack_campaign(campaign_id))
    await world.operator._call(CAMPAIGNS + "CreateCampaign", request, cpb.CreateCampaignResponse)
    return campaign_id


async def claim_pack(wallet: QualificationClient, person: str, campaign_id: str) -> qpb.ClaimQualificationResponse:
    return await wallet.claim(
        campaign_id=campaign_id,
        category="",
        pack_id="p",
        id_number=person,
        location=XIAOSHAN,
        fix_time_ms=int(time.time() * 1000),
    )


async def set_block(world: World, kind: int, subject: str, *, lift: bool = False) -> None:
    if lift:
        removal = bpb.RemoveBlockRequest(request_id=str(uuid.uuid4()), kind=kind, subject_id=subject)  # type: ignore[arg-type]
        await world.operator._call(BLOCKS + "RemoveBlock", removal, bpb.RemoveBlockResponse)
    else:
        request = bpb.AddBlockRequest(request_id=str(uuid.uuid4()), kind=kind, subject_id=subject, reason="broker")  # type: ignore[arg-type]
        await world.operator._call(BLOCKS + "AddBlock", request, bpb.AddBlockResponse)


@pytest.mark.parametrize(
    ("kind", "app", "expected"),
    [
        (bpb.BLOCK_KIND_CONSUMER, "p-wallet-01", "CONSUMER_BLOCKED"),
        (bpb.BLOCK_KIND_PARTNER_APP, "p-bank-01", "PARTNER_APP_BLOCKED"),
    ],
    ids=["consumer", "partner_app"],
)
async def test_a_blocked_pack_claim_is_declined_with_the_block_and_reserves_nothing(
    world: World, kind: int, app: str, expected: str
) -> None:
    """The pack's claim is declined with the block's reason; the only keys the call writes are
    its nonce, its stored answer and the risk event (no quota, holder or voucher key); the risk
    event names the block's rule and subject. The block lifted, the same person claims the
    pack through the same app: both vouchers issued."""
    campaign_id = await create_pack_campaign(world)
    wallet = world.wallet if app == "p-wallet-01" else world.bank
    person = id_number()
    subject = consumer_key_of(person) if kind == bpb.BLOCK_KIND_CONSUMER else app
    keys = world.env.keys
    await set_block(world, kind, subject)
    try:
        before_events = len(await world.risk_events())
        before = await snapshot(world.redis, keys)
        declined = await claim_pack(wallet, person, campaign_id)
        after = await snapshot(world.redis, keys)
    finally:
        await set_block(world, kind, subject, lift=True)
    assert claim_reason(declined) == expected
    assert not declined.HasField("qualification") and list(declined.qualifications) == []
    changed = before.changed(after)
    nonce, answer = keys.nonce(app, "").encode(), keys.idempotency(app, "").encode()
    assert {key for key in changed if not key.startswith((nonce, answer))} == {keys.risk_events.encode()}
    assert [key for key in changed if key.startswith(answer)] != []
    assert not await world.redis.exists(keys.qualification_quota(campaign_id))
    assert not await world.redis.exists(keys.qualification_holder(campaign_id, consumer_key_of(person)))
    assert await world.wallet.list(person, campaign_id) == []
    events = (await world.risk_events())[before_events:]
    assert [(row["action"], row["rule"], row["subject_id"], row["campaign_id"]) for row in events] == [
        ("DECLINE", expected, subject, campaign_id)
    ]
    # Lifted: the same person, the same app, the whole pack.
    issued = await claim_pack(wallet, person, campaign_id)
    assert claim_reason(issued) == "ISSUED" and len(issued.qualifications) == 2
    holder = await world.redis.hgetall(keys.qualification_holder(campaign_id, consumer_key_of(person)))
    assert holder[b"pack:p"] == b"1"
    assert await world.redis.hget(keys.qualification_quota(campaign_id), "pack:p:claimed") == b"1"
