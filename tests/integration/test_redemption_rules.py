"""Redemption-side programme rules (issue 13, items 1, 3 and 4) through the public API.

- Region-bound redemption (``redeem_in_region_only``): the Hubei-style example campaign is
  redeemable only at stores inside its region; a store of the neighbouring district, an online
  shop and a terminal without a store are declined STORE_OUTSIDE_REGION, a store on the
  boundary is accepted, campaigns without the flag (or without a region) are unaffected.
- At most N payments per consumer per merchant per day (``per_merchant_daily_limit``): the
  Hangzhou-style example with N = 2; N + 1 declined MERCHANT_DAILY_LIMIT_REACHED, another
  merchant or the next programme day allowed, a void gives the slot back, a refund does not;
  reconcile knows the counter and rebuild restores it.
- Claim once per round (``reclaim_after_expiry``): a cancelled or expired qualification's
  quota goes back to the pool for others, and its holder may claim again only if the campaign
  says so.
- Contradictory campaign rules are refused naming the field, with nothing applied.

The module runs its own world: the test reference data, a campaign whose region covers the
neighbouring Binjiang district (so a store there can be registered at all), one merchant with
stores inside Xiaoshan, on its boundary, in Binjiang and online, and a gateway whose
background tasks run hourly (so its Redis commands can be counted); the expiry tests start a
gateway of their own that sweeps every 50 ms.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, MerchantClient, QualificationClient, RetryPolicy, SignedClient
from subsidy_client.errors import InvalidArgument
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import campaign_pb2 as cpb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import merchant_pb2 as mpb
from subsidy_client.v1 import qualification_pb2 as qpb

from server.ctl.campaign import campaigns_from_file
from server.domain.merchants import licence_check_character
from storage.devenv import Services
from storage.postgres.audit import rebuild, reconcile
from storage.postgres.qualifications import QualificationMirror, restore_qualifications
from storage.postgres.writer import LedgerWriter, WriterConfig
from tests.conftest import (
    Environment,
    consumer_key,
    consumer_key_of,
    id_number,
    isolated_environment,
    load_document,
    running_gateway,
    serial,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "campaigns"
SERVICE = "/subsidy.v1.CampaignService/"
GOODS = "6970000000086"  # category general, no serial
FRIDGE = "6970000000017"  # grade 1, serial required
UNKNOWN_GTIN = "6970000000109"  # valid check digit, not in the catalog
OPERATOR = "op-auditor"
HUBEI = "hubei-2022-district-vouchers"
HANGZHOU = "hz-2020-voucher-pack"
HANGZHOU_PACK = "hz-2020-pack"

XIAOSHAN_GOVERNMENT = (30.18, 120.26)  # inside the Xiaoshan outline
XIAOSHAN_VERTEX = (30.225, 120.25)  # a vertex of the outline: exactly on its boundary
BINJIANG_GOVERNMENT = (30.208, 120.212)  # across the district line, outside Xiaoshan
# A box around Binjiang: a campaign region that lets a Binjiang store be registered at all.
BINJIANG_BOX = {
    "type": "Polygon",
    "coordinates": [[[120.15, 30.17], [120.235, 30.17], [120.235, 30.23], [120.15, 30.23], [120.15, 30.17]]],
}
NEIGHBOUR = {
    "campaigns": [
        {
            "id": "c-binjiang",
            "starts_at": "2020-01-01T00:00:00+08:00",
            "ends_at": "2099-01-01T00:00:00+08:00",
            "region": BINJIANG_BOX,
            "rules": [
                {"category": "fridge", "kind": "PERCENT", "rates_bp": {"1": 2000}, "cap_fen": 200_000,
                 "per_person_limit": 1, "budget_fen": 10_000_000},
            ],
        }
    ]
}  # fmt: skip


@dataclass
class World:
    env: Environment
    target: str
    operator: SignedClient
    merchants: MerchantClient
    wallet: QualificationClient
    redis: Redis
    # terminal name -> (terminal id, secret, its client): inside, boundary, binjiang, online (one
    # merchant), other (a second merchant inside Xiaoshan), nostore (the fixture's t-main-01)
    tills: dict[str, tuple[str, str, AuthorizationClient]]

    def till(self, name: str) -> AuthorizationClient:
        return self.tills[name][2]


def request_id() -> str:
    return str(uuid.uuid4())


def licence() -> str:
    body = "91330109" + "".join(secrets.choice("0123456789ABCDEFGHJKLMNPQRTUWXY") for _ in range(9))
    return body + licence_check_character(body)


def wgs84(point: tuple[float, float], accuracy_m: float = 0.0) -> common_pb2.Location:
    return common_pb2.Location(
        latitude=point[0],
        longitude=point[1],
        coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84,
        accuracy_m=accuracy_m,
    )


async def open_till(target: str, merchants: MerchantClient, store_id: str) -> tuple[str, str, AuthorizationClient]:
    terminal_id = f"t-{secrets.token_hex(4)}"
    created = await merchants.create_terminal(
        mpb.CreateTerminalRequest(request_id=request_id(), terminal_id=terminal_id, store_id=store_id)
    )
    client = AuthorizationClient(target, terminal_id, created.secret, deadline_s=5.0, retry=RetryPolicy(max_attempts=1))
    return terminal_id, created.secret, client


async def new_merchant(merchants: MerchantClient) -> str:
    merchant_id = f"m-{secrets.token_hex(4)}"
    merchant = mpb.Merchant(merchant_id=merchant_id, name="萧山百货", licence_number=licence())
    await merchants.create_merchant(mpb.CreateMerchantRequest(request_id=request_id(), merchant=merchant))
    return merchant_id


async def new_store(merchants: MerchantClient, merchant_id: str, where: tuple[float, float] | None) -> str:
    store_id = f"s-{secrets.token_hex(4)}"
    if where is None:
        store = mpb.Store(
            store_id=store_id,
            merchant_id=merchant_id,
            kind=mpb.STORE_KIND_ONLINE,
            name="天猫旗舰店",
            platform="tmall",
            shop_url="https://example.tmall.com/",
        )
    else:
        store = mpb.Store(
            store_id=store_id,
            merchant_id=merchant_id,
            kind=mpb.STORE_KIND_PHYSICAL,
            name="门店",
            address="杭州",
            location=wgs84(where),
        )
    await merchants.create_store(mpb.CreateStoreRequest(request_id=request_id(), store=store))
    return store_id


async def create(operator: SignedClient, campaign: cpb.Campaign) -> cpb.CreateCampaignResponse:
    request = cpb.CreateCampaignRequest(request_id=request_id(), campaign=campaign)
    return await operator._call(SERVICE + "CreateCampaign", request, cpb.CreateCampaignResponse)


async def update(operator: SignedClient, campaign: cpb.Campaign) -> cpb.UpdateCampaignResponse:
    request = cpb.UpdateCampaignRequest(request_id=request_id(), campaign=campaign)
    return await operator._call(SERVICE + "UpdateCampaign", request, cpb.UpdateCampaignResponse)


async def fetch(operator: SignedClient, campaign_id: str) -> cpb.Campaign:
    request = cpb.GetCampaignRequest(campaign_id=campaign_id)
    return (await operator._call(SERVICE + "GetCampaign", request, cpb.GetCampaignResponse)).campaign


def example(name: str) -> cpb.Campaign:
    (campaign,) = campaigns_from_file(EXAMPLES / name)
    return campaign


def voucher_campaign(campaign_id: str, **fields: Any) -> cpb.Campaign:
    """A voucher campaign in the Xiaoshan region ("5 off 20"), adjusted by ``fields``."""
    campaign = example("hubei-vouchers.yaml")
    campaign.campaign_id = campaign_id
    campaign.redeem_in_region_only = False
    campaign.rules[0].threshold_fen, campaign.rules[0].off_fen, campaign.rules[0].per_person_limit = 2_000, 500, 1
    for name, value in fields.items():
        setattr(campaign, name, value)
    return campaign


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[World]:
    async with isolated_environment(services) as env:
        await load_document(env, NEIGHBOUR)
        async with running_gateway(env.config()) as gateway:
            target = f"127.0.0.1:{gateway.port}"
            once = RetryPolicy(max_attempts=1)
            operator = SignedClient(target, OPERATOR, env.credentials[OPERATOR], deadline_s=10.0, retry=once)
            merchants = MerchantClient(target, OPERATOR, env.credentials[OPERATOR], deadline_s=10.0, retry=once)
            wallet = QualificationClient(target, "p-wallet-01", env.credentials["p-wallet-01"], retry=once)
            redis = Redis.from_url(env.redis_url)
            # The campaigns first: stores registered afterwards are placed in their regions when
            # their merchant is published.
            await create(operator, example("hubei-vouchers.yaml"))
            await create(operator, example("hangzhou-voucher-pack.yaml"))
            merchant_id, other_merchant = await new_merchant(merchants), await new_merchant(merchants)
            places = {
                "inside": (merchant_id, XIAOSHAN_GOVERNMENT),
                "boundary": (merchant_id, XIAOSHAN_VERTEX),
                "binjiang": (merchant_id, BINJIANG_GOVERNMENT),
                "online": (merchant_id, None),
                "other": (other_merchant, XIAOSHAN_GOVERNMENT),
            }
            tills = {
                name: await open_till(target, merchants, await new_store(merchants, owner, where))
                for name, (owner, where) in places.items()
            }
            tills["nostore"] = (
                "t-main-01",
                env.credentials["t-main-01"],
                AuthorizationClient(target, "t-main-01", env.credentials["t-main-01"], retry=once),
            )
            try:
                yield World(env, target, operator, merchants, wallet, redis, tills)
            finally:
                for _, _, till in tills.values():
                    await till.close()
                for client in (operator, merchants, wallet):
                    await client.close()
                await redis.aclose()


async def claim(world: World, person: str, campaign: str) -> qpb.ClaimQualificationResponse:
    return await world.wallet.claim(
        campaign_id=campaign,
        category="general",
        id_number=person,
        location=wgs84(XIAOSHAN_GOVERNMENT, accuracy_m=20.0),
        fix_time_ms=int(time.time() * 1000),
    )


def decision(response: qpb.ClaimQualificationResponse) -> str:
    if response.decision == qpb.CLAIM_DECISION_ISSUED:
        return "ISSUED"
    return qpb.ClaimDeclineReason.Name(response.decline_reason).removeprefix("CLAIM_DECLINE_REASON_")


async def voucher(world: World, person: str, campaign: str) -> str:
    response = await claim(world, person, campaign)
    assert decision(response) == "ISSUED", response
    return response.qualification.redemption_code


async def pack_codes(world: World, person: str) -> list[str]:
    """The Hangzhou example's pack, claimed whole: its three codes ("5 off 20", "10 off 40",
    "20 off 80"), each redeemable by a payment of 80 yuan."""
    response = await world.wallet.claim(
        campaign_id=HANGZHOU,
        category="",
        pack_id=HANGZHOU_PACK,
        id_number=person,
        location=wgs84(XIAOSHAN_GOVERNMENT, accuracy_m=20.0),
        fix_time_ms=int(time.time() * 1000),
    )
    assert decision(response) == "ISSUED", response
    return [qualification.redemption_code for qualification in response.qualifications]


def outcome(response: apb.AuthorizeResponse) -> str:
    if response.decision == apb.DECISION_APPROVED:
        return "APPROVED"
    return apb.DeclineReason.Name(response.decline_reason).removeprefix("DECLINE_REASON_")


async def pay(
    till: AuthorizationClient, person: str, code: str, campaign: str, price_fen: int = 10_000, gtin: str = GOODS
) -> apb.AuthorizeResponse:
    return await till.authorize(
        campaign_id=campaign,
        consumer_key=consumer_key_of(person),
        lines=[Line("1", gtin, price_fen)],
        redemption_code=code,
    )


async def qualification_state(world: World, code: str) -> int:
    return (await world.wallet.get(code)).state


# --- 1. Region-bound redemption ------------------------------------------------------------


async def test_hubei_vouchers_redeem_only_at_stores_inside_the_region(world: World) -> None:
    """The Hubei-style example, loaded through CampaignService: a voucher claimed inside the
    district is declined STORE_OUTSIDE_REGION at a store of the neighbouring district, at an
    online shop and at a terminal bound to no store, with nothing reserved (the voucher stays
    ISSUED); accepted at a store inside, and at a store exactly on the boundary (covered, as at
    registration)."""
    person = id_number()
    code = await voucher(world, person, HUBEI)
    for outside in ("binjiang", "online", "nostore"):
        declined = await pay(world.till(outside), person, code, HUBEI)
        assert outcome(declined) == "STORE_OUTSIDE_REGION", outside
        assert await qualification_state(world, code) == qpb.QUALIFICATION_STATE_ISSUED
    approved = await pay(world.till("inside"), person, code, HUBEI)
    assert outcome(approved) == "APPROVED" and approved.subsidy_fen == 2_000
    neighbour = id_number()  # one voucher per person: another person at the boundary store
    on_the_line = await pay(world.till("boundary"), neighbour, await voucher(world, neighbour, HUBEI), HUBEI)
    assert outcome(on_the_line) == "APPROVED"


async def test_store_outside_region_ranks_before_line_level_reasons(world: World) -> None:
    """STORE_OUTSIDE_REGION is numbered 22 but ranks with the caller-level checks: an unknown
    product sold at the neighbouring district's store is declined for the store, and at a store
    inside for the product."""
    person = id_number()
    code = await voucher(world, person, HUBEI)
    assert outcome(await pay(world.till("binjiang"), person, code, HUBEI, gtin=UNKNOWN_GTIN)) == "STORE_OUTSIDE_REGION"
    assert outcome(await pay(world.till("inside"), person, code, HUBEI, gtin=UNKNOWN_GTIN)) == "PRODUCT_NOT_ELIGIBLE"


async def test_campaigns_that_do_not_bind_redemption_are_unaffected(world: World) -> None:
    """A campaign without a region (c-main) and a campaign with a region but without the flag
    (the fixture's c-qual, the default) still redeem at the neighbouring district's store and
    at a terminal without a store."""
    for name in ("binjiang", "nostore"):
        trade_in = await world.till(name).authorize(
            campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", FRIDGE, 300_000, serial())]
        )
        assert outcome(trade_in) == "APPROVED", name
        person = id_number()
        unbound = await pay(world.till(name), person, await voucher(world, person, "c-qual"), "c-qual", 3_000)
        assert outcome(unbound) == "APPROVED", name


async def test_stores_and_regions_published_later_are_placed(world: World) -> None:
    """Membership is precomputed at publication, both ways: a store registered after the
    campaign redeems at once; a campaign created after the stores places them; when an update
    moves the region away from a store, its next redemption is declined, and turning the flag
    off lifts the rule."""
    merchant_id = await new_merchant(world.merchants)
    _, _, late = await open_till(
        world.target, world.merchants, await new_store(world.merchants, merchant_id, XIAOSHAN_GOVERNMENT)
    )
    try:
        person = id_number()
        assert outcome(await pay(late, person, await voucher(world, person, HUBEI), HUBEI)) == "APPROVED"
        bound = voucher_campaign("c-bound-later", redeem_in_region_only=True)
        bound.rules[0].per_person_limit = 3
        await create(world.operator, bound)
        person = id_number()
        codes = [await voucher(world, person, "c-bound-later") for _ in range(3)]
        assert outcome(await pay(late, person, codes[0], "c-bound-later", 3_000)) == "APPROVED"
        # The region becomes the Binjiang box: the Xiaoshan store is outside it now, the
        # Binjiang store inside (vouchers claimed before the change keep their codes).
        bound.region_geojson = orjson.dumps(BINJIANG_BOX).decode()
        await update(world.operator, bound)
        assert outcome(await pay(late, person, codes[1], "c-bound-later", 3_000)) == "STORE_OUTSIDE_REGION"
        assert outcome(await pay(world.till("binjiang"), person, codes[1], "c-bound-later", 3_000)) == "APPROVED"
        bound.redeem_in_region_only = False
        await update(world.operator, bound)
        assert outcome(await pay(late, person, codes[2], "c-bound-later", 3_000)) == "APPROVED"
        assert not await world.redis.exists(world.env.keys.region_stores("c-bound-later"))
    finally:
        await late.close()


# --- 3. At most N payments per consumer per merchant per day ----------------------------------


async def usage_fields(redis: Redis, key: str) -> dict[str, int]:
    """A consumer's usage hash: category or day:<day>:<merchant> -> count."""
    raw: dict[Any, Any] = await redis.hgetall(key)
    return {name.decode(): int(value) for name, value in raw.items()}


def programme_day(zone: str = "Asia/Shanghai") -> int:
    """Days since 1970-01-01 of today's date in the zone."""
    return (datetime.now(ZoneInfo(zone)).date() - datetime(1970, 1, 1, tzinfo=UTC).date()).days


async def test_hangzhou_two_per_merchant_per_day(world: World) -> None:
    """The Hangzhou-style example (N = 2), with its pack's three vouchers: the first and second
    payments at a merchant are approved, the third declined MERCHANT_DAILY_LIMIT_REACHED with nothing reserved, while
    another merchant still redeems; a void gives the slot back, a refund does not. The counter
    is kept per Asia/Shanghai calendar day."""
    person = id_number()
    codes = await pack_codes(world, person)
    before_day = programme_day()
    first = await pay(world.till("inside"), person, codes[0], HANGZHOU, 8_000)
    second = await pay(world.till("boundary"), person, codes[1], HANGZHOU, 8_000)  # same merchant, other store
    assert (outcome(first), outcome(second)) == ("APPROVED", "APPROVED")
    third = await pay(world.till("inside"), person, codes[2], HANGZHOU, 8_000)
    assert outcome(third) == "MERCHANT_DAILY_LIMIT_REACHED"
    assert await qualification_state(world, codes[2]) == qpb.QUALIFICATION_STATE_ISSUED
    usage = world.env.keys.usage(HANGZHOU, consumer_key_of(person))
    fields = await usage_fields(world.redis, usage)
    day_fields = {name: count for name, count in fields.items() if name.startswith("day:")}
    assert len(day_fields) == 1 and list(day_fields.values()) == [2]
    (field,) = day_fields
    assert int(field.split(":")[1]) in {before_day, programme_day()}  # the Shanghai date, even at midnight
    assert outcome(await pay(world.till("other"), person, codes[2], HANGZHOU, 8_000)) == "APPROVED"
    # A void gives the slot back; the voucher is usable again.
    await world.till("inside").void(first.authorization_id)
    again = await pay(world.till("inside"), person, codes[0], HANGZHOU, 8_000)
    assert outcome(again) == "APPROVED"
    # A refund does not: the redemption took place (the full refund restores the voucher).
    await world.till("inside").capture(again.authorization_id)
    await world.till("inside").refund(again.authorization_id)
    assert outcome(await pay(world.till("inside"), person, codes[0], HANGZHOU, 8_000)) == "MERCHANT_DAILY_LIMIT_REACHED"


async def test_a_limit_of_one_and_the_next_day(world: World, services: Services) -> None:
    """N = 1 set through UpdateCampaign: one payment, then declined. The next programme day is
    allowed again: a second gateway on the same Redis whose programme zone is 26 hours ahead
    (UTC+14 against UTC-12, so its calendar date is always a later one) is on the next day."""
    campaign = voucher_campaign("c-one-a-day", per_merchant_daily_limit=1)
    campaign.rules[0].per_person_limit = 3
    await create(world.operator, campaign)
    person = id_number()
    codes = [await voucher(world, person, "c-one-a-day") for _ in range(3)]
    async with (
        running_gateway(world.env.config(report_timezone="Etc/GMT+12")) as behind,
        running_gateway(world.env.config(report_timezone="Etc/GMT-14")) as ahead,
    ):
        once = RetryPolicy(max_attempts=1)
        terminal_id, secret, _ = world.tills["inside"]
        async with (
            AuthorizationClient(f"127.0.0.1:{behind.port}", terminal_id, secret, retry=once) as today,
            AuthorizationClient(f"127.0.0.1:{ahead.port}", terminal_id, secret, retry=once) as tomorrow,
        ):
            assert outcome(await pay(today, person, codes[0], "c-one-a-day", 3_000)) == "APPROVED"
            assert outcome(await pay(today, person, codes[1], "c-one-a-day", 3_000)) == "MERCHANT_DAILY_LIMIT_REACHED"
            assert outcome(await pay(tomorrow, person, codes[1], "c-one-a-day", 3_000)) == "APPROVED"
            assert (
                outcome(await pay(tomorrow, person, codes[2], "c-one-a-day", 3_000)) == "MERCHANT_DAILY_LIMIT_REACHED"
            )


async def test_reconcile_knows_the_daily_counters_and_rebuild_restores_them(world: World) -> None:
    """The ledger events of counted payments carry their programme day: after the writer has
    drained, reconcile finds no difference; after the usage hashes are lost, rebuild restores
    the daily counter exactly, and a void after the rebuild still gives the slot back."""
    person = id_number()
    codes = await pack_codes(world, person)
    first = await pay(world.till("inside"), person, codes[0], HANGZHOU, 8_000)
    second = await pay(world.till("inside"), person, codes[1], HANGZHOU, 8_000)
    assert (outcome(first), outcome(second)) == ("APPROVED", "APPROVED")
    await world.till("inside").void(second.authorization_id)
    held = await pay(world.till("inside"), person, codes[1], HANGZHOU, 8_000)
    assert outcome(held) == "APPROVED"
    env = world.env
    writer = LedgerWriter(WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), world.redis)
    try:
        await writer.drain()
    finally:
        await writer.close()
    connection = await asyncpg.connect(env.pg_dsn, timeout=10)
    try:
        assert await reconcile(connection, world.redis, env.keys) == []
        usage = env.keys.usage(HANGZHOU, consumer_key_of(person))
        kept = await usage_fields(world.redis, usage)
        assert [value for key, value in kept.items() if key.startswith("day:")] == [2]
        # A counter off by one is a difference reconcile reports.
        day_field = next(key for key in kept if key.startswith("day:"))
        await world.redis.hincrby(usage, day_field, 1)
        differences = await reconcile(connection, world.redis, env.keys)
        assert [(d.kind, d.ledger, d.redis) for d in differences] == [("usage", 2, 3)]
        await world.redis.delete(usage)
        await rebuild(connection, world.redis, env.keys)
        assert await usage_fields(world.redis, usage) == kept
        assert await reconcile(connection, world.redis, env.keys) == []
    finally:
        await connection.close()
    assert outcome(await pay(world.till("inside"), person, codes[2], HANGZHOU, 8_000)) == "MERCHANT_DAILY_LIMIT_REACHED"
    await world.till("inside").void(held.authorization_id)
    assert outcome(await pay(world.till("inside"), person, codes[2], HANGZHOU, 8_000)) == "APPROVED"


def plain_campaign(campaign_id: str, budget_fen: int, per_person_limit: int, daily_limit: int) -> cpb.Campaign:
    """A campaign without vouchers or region: "5 off 20" on general goods."""
    campaign = voucher_campaign(campaign_id, per_merchant_daily_limit=daily_limit)
    campaign.qualification_validity_s = 0
    campaign.region_geojson = ""
    campaign.rules[0].budget_fen, campaign.rules[0].per_person_limit = budget_fen, per_person_limit
    return campaign


async def test_the_daily_limit_ranks_after_the_person_limit_and_before_the_budget(world: World) -> None:
    """MERCHANT_DAILY_LIMIT_REACHED (23) ranks right after CONSUMER_LIMIT_REACHED (13) and before
    BUDGET_EXHAUSTED (14): with a budget for one subsidy and a limit of one a day, the second
    payment at the merchant is declined for the day, at another merchant for the budget; with a
    per-person limit of one as well, for the person."""
    await create(world.operator, plain_campaign("c-rank-budget", budget_fen=500, per_person_limit=3, daily_limit=1))
    await create(world.operator, plain_campaign("c-rank-person", budget_fen=10_000, per_person_limit=1, daily_limit=1))
    for campaign_id, at_the_merchant, elsewhere in (
        ("c-rank-budget", "MERCHANT_DAILY_LIMIT_REACHED", "BUDGET_EXHAUSTED"),
        ("c-rank-person", "CONSUMER_LIMIT_REACHED", "CONSUMER_LIMIT_REACHED"),
    ):
        person = consumer_key()

        async def buy(till: AuthorizationClient, campaign_id: str = campaign_id, person: str = person) -> str:
            response = await till.authorize(
                campaign_id=campaign_id, consumer_key=person, lines=[Line("1", GOODS, 3_000)]
            )
            return outcome(response)

        assert await buy(world.till("inside")) == "APPROVED"
        assert await buy(world.till("inside")) == at_the_merchant, campaign_id
        assert await buy(world.till("other")) == elsewhere, campaign_id


async def test_an_expired_hold_gives_its_daily_slot_back(world: World) -> None:
    """A hold the sweeper expires (a gateway whose holds last 1 s) gives its slot back like a
    void: after two payments at the limit, the third is declined until one of them expires."""
    campaign = voucher_campaign("c-two-a-day", per_merchant_daily_limit=2)
    campaign.rules[0].per_person_limit = 3
    await create(world.operator, campaign)
    person = id_number()
    codes = [await voucher(world, person, "c-two-a-day") for _ in range(3)]
    terminal_id, secret, _ = world.tills["inside"]
    async with (
        running_gateway(world.env.config(hold_ttl_s=1, sweep_interval_ms=50)) as short,
        AuthorizationClient(f"127.0.0.1:{short.port}", terminal_id, secret, retry=RetryPolicy(max_attempts=1)) as till,
    ):
        lapsing = await pay(till, person, codes[0], "c-two-a-day", 3_000)
        assert outcome(lapsing) == "APPROVED"
        kept = await pay(world.till("inside"), person, codes[1], "c-two-a-day", 3_000)
        assert outcome(kept) == "APPROVED"
        await world.till("inside").capture(kept.authorization_id)
        assert outcome(await pay(world.till("inside"), person, codes[2], "c-two-a-day", 3_000)) == (
            "MERCHANT_DAILY_LIMIT_REACHED"
        )
        for _ in range(200):
            if (
                await world.till("inside").get_authorization(lapsing.authorization_id)
            ).state == apb.AUTHORIZATION_STATE_EXPIRED:
                break
            await asyncio.sleep(0.05)
        assert (
            await world.till("inside").get_authorization(lapsing.authorization_id)
        ).state == apb.AUTHORIZATION_STATE_EXPIRED
    assert outcome(await pay(world.till("inside"), person, codes[2], "c-two-a-day", 3_000)) == "APPROVED"


# --- 4. Claim once per round -----------------------------------------------------------------


async def test_a_cancelled_voucher_goes_back_to_the_pool_not_to_its_holder(world: World) -> None:
    """Default (reclaim_after_expiry off, the Hubei example): after a cancel the person is
    declined ALREADY_CLAIMED_THIS_ROUND, while the quota came back for others. With the flag on
    (the fixture's c-qual) the same person may claim again."""
    campaign = voucher_campaign("c-once")
    campaign.rules[0].qualification_quota = 1
    await create(world.operator, campaign)
    person, other = id_number(), id_number()
    code = await voucher(world, person, "c-once")
    assert decision(await claim(world, other, "c-once")) == "QUOTA_EXHAUSTED"
    await world.wallet.cancel(code)
    assert decision(await claim(world, person, "c-once")) == "ALREADY_CLAIMED_THIS_ROUND"
    assert decision(await claim(world, other, "c-once")) == "ISSUED"  # the quota went back
    # After a Redis loss the count of what was ever issued comes back from the mirror.
    env = world.env
    mirror = QualificationMirror(world.redis, env.keys, env.pg_dsn)
    await mirror.drain()
    holder = env.keys.qualification_holder("c-once", consumer_key_of(person))
    assert await world.redis.hgetall(holder) == {b"general": b"0", b"general:issued": b"1"}
    await world.redis.delete(holder)
    connection = await asyncpg.connect(env.pg_dsn, timeout=10)
    try:
        await restore_qualifications(connection, world.redis, env.keys)
    finally:
        await connection.close()
    assert await world.redis.hgetall(holder) == {b"general:issued": b"1"}
    assert decision(await claim(world, person, "c-once")) == "ALREADY_CLAIMED_THIS_ROUND"
    reclaimer = id_number()
    await world.wallet.cancel(await voucher(world, reclaimer, "c-qual"))
    assert decision(await claim(world, reclaimer, "c-qual")) == "ISSUED"


@pytest.mark.parametrize("reclaim", [False, True])
async def test_an_expired_voucher_may_be_claimed_again_only_if_the_campaign_says_so(
    world: World, reclaim: bool
) -> None:
    """Validity 1 s, quota 1: while the voucher is out nobody else gets one; once a sweeper (a
    gateway of its own, sweeping every 50 ms) expires it, its holder may claim again only with
    reclaim_after_expiry, and otherwise the quota went back to the pool for someone else."""
    campaign_id = f"c-expiry-{'again' if reclaim else 'once'}"
    campaign = voucher_campaign(campaign_id, qualification_validity_s=1, reclaim_after_expiry=reclaim)
    campaign.rules[0].qualification_quota = 1
    await create(world.operator, campaign)
    person, other = id_number(), id_number()
    code = await voucher(world, person, campaign_id)
    assert decision(await claim(world, other, campaign_id)) == "QUOTA_EXHAUSTED"
    async with running_gateway(world.env.config(sweep_interval_ms=50)):
        for _ in range(200):
            if await qualification_state(world, code) == qpb.QUALIFICATION_STATE_EXPIRED:
                break
            await asyncio.sleep(0.05)
    assert await qualification_state(world, code) == qpb.QUALIFICATION_STATE_EXPIRED
    assert decision(await claim(world, person, campaign_id)) == ("ISSUED" if reclaim else "ALREADY_CLAIMED_THIS_ROUND")
    assert decision(await claim(world, other, campaign_id)) == ("QUOTA_EXHAUSTED" if reclaim else "ISSUED")


# --- Bad input ---------------------------------------------------------------------------------


def bowtie() -> str:
    """A self-intersecting ring: not a valid polygon."""
    ring = [[120.1, 30.1], [120.3, 30.3], [120.3, 30.1], [120.1, 30.3], [120.1, 30.1]]
    return orjson.dumps({"type": "Polygon", "coordinates": [ring]}).decode()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: setattr(c, "per_merchant_daily_limit", 0), "campaign.per_merchant_daily_limit"),
        (lambda c: setattr(c, "per_merchant_daily_limit", 1001), "campaign.per_merchant_daily_limit"),
        (lambda c: setattr(c, "region_geojson", ""), "campaign.redeem_in_region_only"),
        (lambda c: setattr(c, "region_geojson", bowtie()), "campaign.region"),
        (lambda c: setattr(c, "qualification_validity_s", 0), "campaign.reclaim_after_expiry"),
    ],
)
async def test_contradictory_rules_are_refused_naming_the_field_and_nothing_is_applied(
    world: World, change: Any, field: str
) -> None:
    """A per-day limit of 0 (or above 1,000), region-bound redemption without a region, a region
    that is not a valid polygon, claiming again in a campaign that issues no qualifications:
    INVALID_ARGUMENT naming the field, on create and on update, and the stored campaign and its
    published copy are unchanged."""
    campaign_id = f"c-bad-{secrets.token_hex(3)}"
    good = voucher_campaign(campaign_id, redeem_in_region_only=True, reclaim_after_expiry=True)
    bad = cpb.Campaign()
    bad.CopyFrom(good)
    change(bad)
    with pytest.raises(InvalidArgument) as refused:
        await create(world.operator, bad)
    assert refused.value.metadata["field"] == field
    assert not await world.redis.exists(world.env.keys.campaign(campaign_id))
    await create(world.operator, good)
    published = await world.redis.hgetall(world.env.keys.campaign(campaign_id))
    with pytest.raises(InvalidArgument) as refused:
        await update(world.operator, bad)
    assert refused.value.metadata["field"] == field
    stored = await fetch(world.operator, campaign_id)
    assert (stored.redeem_in_region_only, stored.reclaim_after_expiry, stored.HasField("per_merchant_daily_limit")) == (
        True,
        True,
        False,
    )
    assert await world.redis.hgetall(world.env.keys.campaign(campaign_id)) == published


# --- The hot path ------------------------------------------------------------------------------


async def test_authorize_under_the_new_rules_is_still_one_evalsha(world: World) -> None:
    """Counted, as tests/integration/test_hot_path_cost.py counts: region-bound and daily-limited
    authorizations (approved, STORE_OUTSIDE_REGION, MERCHANT_DAILY_LIMIT_REACHED) each send
    exactly one EVALSHA from the gateway, and MONITOR shows the script itself reading the store
    set and the daily counter. The module's gateway runs its background tasks hourly (its
    start-up sweep long done), as the session gateway of test_hot_path_cost does; the tests that
    need a sweeper start a gateway of their own."""
    name = f"gateway-{world.env.prefix}"  # the world's gateway (conftest names its connections)
    person, shopper = id_number(), id_number()
    hubei = [await voucher(world, person, HUBEI)]
    hangzhou = await pack_codes(world, shopper)
    inside, binjiang = world.till("inside"), world.till("binjiang")
    sentinel = "end-of-watch-" + uuid.uuid4().hex
    probe = Redis.from_url(world.env.redis_url, single_connection_client=True)
    watcher_client = Redis.from_url(world.env.redis_url)
    ready = asyncio.Event()
    watcher = asyncio.create_task(_watch(watcher_client, sentinel, ready))
    await ready.wait()
    outcomes = [
        outcome(await pay(binjiang, person, hubei[0], HUBEI)),
        outcome(await pay(inside, person, hubei[0], HUBEI)),
        *[outcome(await pay(inside, shopper, code, HANGZHOU, 8_000)) for code in hangzhou],
    ]
    addresses = {entry["addr"] for entry in await probe.client_list() if entry.get("name") == name}
    await probe.echo(sentinel)
    commands = await asyncio.wait_for(watcher, timeout=10)
    await watcher_client.aclose()
    await probe.aclose()
    assert outcomes == ["STORE_OUTSIDE_REGION", "APPROVED", "APPROVED", "APPROVED", "MERCHANT_DAILY_LIMIT_REACHED"]
    from_gateway = [
        entry["command"].split()[0].upper()
        for entry in commands
        if entry["client_type"] != "lua" and f"{entry['client_address']}:{entry['client_port']}" in addresses
    ]
    assert from_gateway == ["EVALSHA"] * 5
    scripted = [entry["command"].split()[0].upper() for entry in commands if entry["client_type"] == "lua"]
    assert "SISMEMBER" in scripted and "HINCRBY" in scripted


async def _watch(redis: Redis, sentinel: str, ready: asyncio.Event) -> list[dict[str, Any]]:
    """Every command Redis executes until the sentinel ECHO, via MONITOR."""
    seen: list[dict[str, Any]] = []
    async with redis.monitor() as monitor:
        ready.set()
        while True:
            command = await monitor.next_command()
            if sentinel in command["command"]:
                return seen
            seen.append(command)
