"""Basket vouchers and their refunds (issue 13, items 6 and 7), through the public API on a
real gateway, PostgreSQL and Redis:

- ``threshold_scope`` round-trips through CreateCampaign / UpdateCampaign / GetCampaign, the
  campaign's PostgreSQL row, the rule's JSON in Redis and a campaign file; a basket on a
  PERCENT rule or an unknown scope is refused naming the field, writing nothing.
- A BASKET rule's threshold applies to the total of the payment's lines of its category
  (exactly Y approved, Y - 1 declined BASKET_BELOW_THRESHOLD); an ineligible line declines the
  payment with its own reason (it is not silently left out); the amount off is apportioned by
  largest remainder (1000 over three equal lines: 334/333/333, the extra fen to the first);
  the basket counts once against the per-person limit; one line, the most lines with the
  highest prices, and none or one too many (refused).
- Refunds of a basket voucher's payment (the Hubei-style example): line by line they return
  exactly the granted subsidy and count the voucher as used (it cannot pay again and its holder
  cannot claim again); the whole basket at once within validity restores it; after expiry it
  counts as used. The ledger reconciles with Redis to the fen and the unit after each.
- LINE scope is unchanged: each line on its own, a voucher's payment has one line.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy, SignedClient
from subsidy_client.errors import InvalidArgument
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import campaign_pb2 as pb
from subsidy_client.v1 import qualification_pb2 as qpb
from subsidy_client.v1.common_pb2 import COORDINATE_SYSTEM_WGS84, Location

from server.ctl.campaign import campaign_message, campaigns_from_file
from server.domain.gtin import gtin13_check_digit
from storage.devenv import Services
from storage.postgres.audit import rebuild, reconcile, redis_counters
from storage.postgres.reference import fetch_reference
from storage.postgres.writer import LedgerWriter, WriterConfig
from storage.redis.reference import publish_reference
from tests.conftest import (
    ROOT,
    Environment,
    consumer_key,
    consumer_key_of,
    id_number,
    isolated_environment,
    load_document,
    running_gateway,
    serial,
)

SERVICE = "/subsidy.v1.CampaignService/"
EXAMPLE = ROOT / "examples" / "campaigns" / "hubei-basket-vouchers.yaml"
HUBEI = "hubei-2022-basket-vouchers"
PRICE_MAX = 10_000_000_000 - 1  # the dearest line a request may carry
MAX_LINES = 20  # Config.max_lines, the gateway's default


def gtin(number: int) -> str:
    base = f"69710000{number:04d}"
    return base + str(gtin13_check_digit(base))


GOODS = "6970000000086"  # the fixture's: category general
SERIAL_GOODS = gtin(1)  # general, a device serial required
RETIRED = gtin(2)  # general, taken out of the catalog
FRIDGE = "6970000000017"  # the fixture's: category fridge
PRODUCTS = [
    {"gtin": SERIAL_GOODS, "brand": "B", "model": "S", "category": "general", "serial_required": True},
    {"gtin": RETIRED, "brand": "B", "model": "R", "category": "general", "active": False},
]
INSIDE = Location(latitude=30.18, longitude=120.26, coordinate_system=COORDINATE_SYSTEM_WGS84, accuracy_m=20.0)


def rule(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "category": "general",
        "kind": "FIXED",
        "threshold_scope": "BASKET",
        "threshold_fen": 20_000,
        "off_fen": 5_000,
        "per_person_limit": 1,
        "budget_fen": 1_000_000_000_000,
    }
    base.update(fields)
    return base


def campaign(campaign_id: str, **rule_fields: Any) -> pb.Campaign:
    """A campaign without qualifications ("X off Y" for anyone), as a campaign file says it."""
    record = {
        "id": campaign_id,
        "starts_at": "2020-01-01T00:00:00+08:00",
        "ends_at": "2099-01-01T00:00:00+08:00",
        "rules": [rule(**rule_fields)],
    }
    return campaign_message(record, Path("test"))


@dataclass
class World:
    env: Environment
    operator: SignedClient
    till: AuthorizationClient
    wallet: QualificationClient
    redis: Redis

    async def create(self, message: pb.Campaign) -> pb.Campaign:
        request = pb.CreateCampaignRequest(request_id=str(uuid.uuid4()), campaign=message)
        return (await self.operator._call(SERVICE + "CreateCampaign", request, pb.CreateCampaignResponse)).campaign

    async def update(self, message: pb.Campaign) -> pb.Campaign:
        request = pb.UpdateCampaignRequest(request_id=str(uuid.uuid4()), campaign=message)
        return (await self.operator._call(SERVICE + "UpdateCampaign", request, pb.UpdateCampaignResponse)).campaign

    async def get(self, campaign_id: str) -> pb.Campaign:
        request = pb.GetCampaignRequest(campaign_id=campaign_id)
        return (await self.operator._call(SERVICE + "GetCampaign", request, pb.GetCampaignResponse)).campaign

    async def pay(
        self,
        campaign_id: str,
        prices: Sequence[int],
        person: str | None = None,
        code: str = "",
        products: Sequence[str] = (),
        ids: Sequence[str] = (),
    ) -> apb.AuthorizeResponse:
        lines = [
            Line(
                ids[index] if ids else str(index + 1),
                products[index] if products else GOODS,
                price,
                serial() if products and products[index] == SERIAL_GOODS and price % 2 == 0 else "",
            )
            for index, price in enumerate(prices)
        ]
        return await self.till.authorize(
            campaign_id=campaign_id, lines=lines, consumer_key=person or consumer_key(), redemption_code=code
        )

    async def try_claim(self, person: str, campaign_id: str = HUBEI) -> qpb.ClaimQualificationResponse:
        return await self.wallet.claim(
            campaign_id=campaign_id,
            category="general",
            id_number=person,
            location=INSIDE,
            fix_time_ms=int(time.time() * 1000),
        )

    async def claim(self, person: str, campaign_id: str = HUBEI) -> str:
        claimed = await self.try_claim(person, campaign_id)
        assert claimed.decision == qpb.CLAIM_DECISION_ISSUED, claimed
        return claimed.qualification.redemption_code

    async def budget(self, campaign_id: str) -> dict[str, int]:
        raw = await self.redis.hgetall(self.env.keys.budget(campaign_id))
        return {key.decode(): int(value) for key, value in raw.items() if key.decode().startswith("general:")}

    async def units(self, campaign_id: str, person_key: str) -> int:
        return int(await self.redis.hget(self.env.keys.usage(campaign_id, person_key), "general") or 0)

    async def reconciled(self) -> list[Any]:
        """Drains the ledger stream into PostgreSQL and compares every counter with Redis."""
        await LedgerWriter(
            WriterConfig(pg_dsn=self.env.pg_dsn, redis_url=self.env.redis_url, prefix=self.env.prefix), self.redis
        ).drain()
        connection = await asyncpg.connect(self.env.pg_dsn)
        try:
            return list(await reconcile(connection, self.redis, self.env.keys))
        finally:
            await connection.close()


@asynccontextmanager
async def basket_world(services: Services, **config: Any) -> AsyncIterator[World]:
    async with isolated_environment(services) as env, running_gateway(env.config(**config)) as gateway:
        await load_document(env, {"products": PRODUCTS})
        target = f"127.0.0.1:{gateway.port}"
        once = RetryPolicy(max_attempts=1)
        redis = Redis.from_url(env.redis_url)
        async with (
            SignedClient(target, "op-auditor", env.credentials["op-auditor"], retry=once) as operator,
            AuthorizationClient(target, "t-main-01", env.credentials["t-main-01"], retry=once) as till,
            QualificationClient(target, "p-wallet-01", env.credentials["p-wallet-01"], retry=once) as wallet,
        ):
            try:
                yield World(env, operator, till, wallet, redis)
            finally:
                await redis.aclose()


def outcome(response: apb.AuthorizeResponse) -> str:
    if response.decision == apb.DECISION_APPROVED:
        return "APPROVED"
    return apb.DeclineReason.Name(response.decline_reason).removeprefix("DECLINE_REASON_")


def shares(response: apb.AuthorizeResponse) -> list[int]:
    assert response.decision == apb.DECISION_APPROVED, response
    return [line.subsidy_fen for line in response.lines]


# --- The campaign field ----------------------------------------------------------------------------


async def test_threshold_scope_round_trips_through_the_api_postgres_redis_and_files(services: Services) -> None:
    async with basket_world(services) as world:
        created = await world.create(campaign("c-scope"))
        assert created.rules[0].threshold_scope == pb.THRESHOLD_SCOPE_BASKET
        assert (await world.get("c-scope")).rules[0].threshold_scope == pb.THRESHOLD_SCOPE_BASKET
        connection = await asyncpg.connect(world.env.pg_dsn)
        try:

            async def stored() -> tuple[str, str]:
                column = await connection.fetchval(
                    "SELECT threshold_scope FROM campaign_rules WHERE campaign_id = 'c-scope'"
                )
                published = orjson.loads(await world.redis.hget(world.env.keys.rules("c-scope"), "general"))
                return column, published["threshold_scope"]

            assert await stored() == ("BASKET", "BASKET")
            # UNSPECIFIED is LINE, the threshold's meaning before the field; answers say LINE.
            message = campaign("c-scope")
            message.rules[0].threshold_scope = pb.THRESHOLD_SCOPE_UNSPECIFIED
            assert (await world.update(message)).rules[0].threshold_scope == pb.THRESHOLD_SCOPE_LINE
            assert await stored() == ("LINE", "LINE")
            message.rules[0].threshold_scope = pb.THRESHOLD_SCOPE_BASKET
            await world.update(message)
            assert (await world.get("c-scope")).rules[0].threshold_scope == pb.THRESHOLD_SCOPE_BASKET
            assert await stored() == ("BASKET", "BASKET")
        finally:
            await connection.close()
        # The example file says BASKET and subsidyctl campaign apply sends it.
        (example,) = campaigns_from_file(EXAMPLE)
        assert example.rules[0].threshold_scope == pb.THRESHOLD_SCOPE_BASKET


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: setattr(c.rules[0], "kind", pb.RULE_KIND_PERCENT), "campaign.rules[0].threshold_scope"),
        (lambda c: setattr(c.rules[0], "threshold_scope", 3), "campaign.rules[0].threshold_scope"),
    ],
    ids=["basket on a percent rule", "unknown scope"],
)
async def test_a_scope_that_cannot_work_is_refused_naming_the_field(
    services: Services, change: Any, field: str
) -> None:
    async with basket_world(services) as world:
        message = campaign("c-bad-scope")
        change(message)
        if message.rules[0].kind == pb.RULE_KIND_PERCENT:
            message.rules[0].rates.add(energy_grade=0, rate_bp=1500)
            message.rules[0].cap_fen = 50_000
        with pytest.raises(InvalidArgument) as refused:
            await world.create(message)
        assert refused.value.metadata["field"] == field
        connection = await asyncpg.connect(world.env.pg_dsn)
        try:
            assert await connection.fetchval("SELECT count(*) FROM campaigns WHERE campaign_id = 'c-bad-scope'") == 0
            assert await connection.fetchval("SELECT count(*) FROM operator_actions") == 0
        finally:
            await connection.close()


# --- Authorize ---------------------------------------------------------------------------------------


async def test_the_threshold_applies_to_the_basket_total(services: Services) -> None:
    """200 yuan off 50 on the basket: two lines adding up to exactly 200 yuan are approved, one
    fen less is declined BASKET_BELOW_THRESHOLD (on the basket's first line); one line alone is
    a basket of one. The same lines under a LINE rule are each below the threshold."""
    async with basket_world(services) as world:
        await world.create(campaign("c-basket"))
        await world.create(campaign("c-line", threshold_scope="LINE", per_person_limit=2))
        approved = await world.pay("c-basket", [10_000, 10_000])
        assert shares(approved) == [2_500, 2_500]
        assert (approved.subsidy_fen, approved.total_price_fen, approved.payable_fen) == (5_000, 20_000, 15_000)
        below = await world.pay("c-basket", [10_000, 9_999])
        assert (outcome(below), below.declined_line_id) == ("BASKET_BELOW_THRESHOLD", "1")
        assert shares(await world.pay("c-basket", [20_000])) == [5_000]
        assert outcome(await world.pay("c-basket", [19_999])) == "BASKET_BELOW_THRESHOLD"
        assert outcome(await world.pay("c-basket", [1])) == "BASKET_BELOW_THRESHOLD"
        # LINE scope, unchanged: each line on its own.
        assert outcome(await world.pay("c-line", [10_000, 10_000])) == "PRICE_BELOW_THRESHOLD"
        assert shares(await world.pay("c-line", [20_000, 20_000])) == [5_000, 5_000]
        assert (await world.budget("c-basket"))["general:reserved"] == 2 * 5_000
        assert await world.reconciled() == []


async def test_the_amount_off_is_apportioned_by_largest_remainder(services: Services) -> None:
    """1000 fen over three lines of 10 yuan: 334/333/333, the extra fen to the first line in the
    request (whatever its id); over 10, 10 and 10.01 yuan the third line's remainder is the
    largest, so it gets the fen."""
    async with basket_world(services) as world:
        await world.create(campaign("c-thirds", threshold_fen=3_000, off_fen=1_000, per_person_limit=1))
        assert shares(await world.pay("c-thirds", [1_000, 1_000, 1_000], ids=["a", "b", "c"])) == [334, 333, 333]
        reordered = await world.pay("c-thirds", [1_000, 1_000, 1_000], ids=["c", "b", "a"])
        assert [(line.line_id, line.subsidy_fen) for line in reordered.lines] == [("c", 334), ("b", 333), ("a", 333)]
        assert shares(await world.pay("c-thirds", [1_000, 1_000, 1_001])) == [333, 333, 334]
        assert (await world.budget("c-thirds"))["general:reserved"] == 3 * 1_000
        assert await world.reconciled() == []


async def test_an_ineligible_line_declines_the_basket_with_its_own_reason(services: Services) -> None:
    """Every line of the payment must be eligible: one that is not is never dropped to approve
    the rest. A line failing a check of its own (a missing serial) still counts in the basket's
    total, so its reason is reported, not a basket made short by leaving it out; a basket short
    even with it ranks BASKET_BELOW_THRESHOLD, right after where PRICE_BELOW_THRESHOLD would."""
    async with basket_world(services) as world:
        await world.create(campaign("c-basket"))
        retired = await world.pay("c-basket", [25_000, 100], products=[GOODS, RETIRED])
        assert (outcome(retired), retired.declined_line_id) == ("PRODUCT_NOT_ELIGIBLE", "2")
        fridge = await world.pay("c-basket", [25_000, 100], products=[GOODS, FRIDGE])
        assert (outcome(fridge), fridge.declined_line_id) == ("CATEGORY_NOT_COVERED", "2")
        # An odd price leaves the serial out (see World.pay): 15,000 + 5,001 >= 20,000.
        no_serial = await world.pay("c-basket", [15_000, 5_001], products=[GOODS, SERIAL_GOODS])
        assert (outcome(no_serial), no_serial.declined_line_id) == ("SERIAL_REQUIRED", "2")
        short = await world.pay("c-basket", [5_000, 5_001], products=[GOODS, SERIAL_GOODS])
        assert (outcome(short), short.declined_line_id) == ("BASKET_BELOW_THRESHOLD", "1")
        retired_and_short = await world.pay("c-basket", [5_000, 100], products=[GOODS, RETIRED])
        assert outcome(retired_and_short) == "PRODUCT_NOT_ELIGIBLE"
        with_serial = await world.pay("c-basket", [15_000, 5_000], products=[GOODS, SERIAL_GOODS])
        assert shares(with_serial) == [3_750, 1_250]
        assert (await world.budget("c-basket"))["general:reserved"] == 5_000


async def test_a_basket_counts_once_against_the_per_person_limit(services: Services) -> None:
    """One voucher, several lines: three lines under a limit of one per person are one use; the
    next basket is over the limit until the first is voided. A LINE rule still counts lines."""
    async with basket_world(services) as world:
        await world.create(campaign("c-basket"))
        await world.create(campaign("c-line", threshold_scope="LINE"))
        person = consumer_key()
        first = await world.pay("c-basket", [8_000, 8_000, 8_000], person)
        assert shares(first) == [1_667, 1_667, 1_666]
        assert await world.units("c-basket", person) == 1
        assert outcome(await world.pay("c-basket", [20_000], person)) == "CONSUMER_LIMIT_REACHED"
        await world.till.void(first.authorization_id)
        assert await world.units("c-basket", person) == 0
        assert shares(await world.pay("c-basket", [20_000, 1], person)) == [5_000, 0]
        assert outcome(await world.pay("c-line", [20_000, 20_000])) == "CONSUMER_LIMIT_REACHED"
        assert await world.reconciled() == []


async def test_no_lines_one_line_the_most_lines_and_one_too_many(services: Services) -> None:
    """The most lines a request carries, each at the highest price, with the largest amount off:
    shared exactly (19 lines get the fen the division leaves over); none or one line too many
    is refused before anything is written."""
    async with basket_world(services) as world:
        await world.create(campaign("c-max", threshold_fen=PRICE_MAX, off_fen=PRICE_MAX, per_person_limit=1000))
        most = await world.pay("c-max", [PRICE_MAX] * MAX_LINES)
        assert shares(most) == [500_000_000] * 19 + [499_999_999]
        assert most.subsidy_fen == PRICE_MAX and most.total_price_fen == PRICE_MAX * MAX_LINES
        assert shares(await world.pay("c-max", [PRICE_MAX])) == [PRICE_MAX]
        assert outcome(await world.pay("c-max", [PRICE_MAX - 1])) == "BASKET_BELOW_THRESHOLD"
        for count in (0, MAX_LINES + 1):
            with pytest.raises(InvalidArgument) as refused:
                await world.pay("c-max", [PRICE_MAX] * count)
            assert refused.value.metadata["field"] == "lines"
        assert (await world.budget("c-max"))["general:reserved"] == 2 * PRICE_MAX
        assert await world.reconciled() == []


# --- Refunds of a basket voucher's payment (the example campaign) --------------------------------


async def voucher_payment(world: World, prices: Sequence[int], campaign_id: str = HUBEI) -> tuple[str, str, Any]:
    """A person claims the voucher and pays a basket with it (captured)."""
    person = id_number()
    code = await world.claim(person, campaign_id)
    approved = await world.pay(campaign_id, prices, consumer_key_of(person), code)
    assert outcome(approved) == "APPROVED"
    await world.till.capture(approved.authorization_id)
    return person, code, approved


async def test_a_basket_refunded_line_by_line_returns_exactly_its_subsidy_and_uses_the_voucher(
    services: Services,
) -> None:
    async with basket_world(services) as world:
        await world.create(campaigns_from_file(EXAMPLE)[0])
        person, code, approved = await voucher_payment(world, [7_000, 7_000, 7_000])
        assert shares(approved) == [1_667, 1_667, 1_666]
        refunded = [(await world.till.refund(approved.authorization_id, ["2"])).refunded_subsidy_fen]
        # A partial refund counts the voucher as used: it stays REDEEMED and its unit counted, so
        # it cannot pay again (the per-person limit ranks before QUALIFICATION_NOT_USABLE), and
        # its holder cannot claim another.
        assert (await world.wallet.get(code)).state == qpb.QUALIFICATION_STATE_REDEEMED
        assert outcome(await world.pay(HUBEI, [20_000], consumer_key_of(person), code)) == "CONSUMER_LIMIT_REACHED"
        assert (await world.try_claim(person)).decision == qpb.CLAIM_DECISION_DECLINED
        refunded.append((await world.till.refund(approved.authorization_id, ["1"])).refunded_subsidy_fen)
        last = await world.till.refund(approved.authorization_id)  # the rest: line 3
        refunded.append(last.refunded_subsidy_fen)
        assert refunded == [1_667, 1_667, 1_666] and sum(refunded) == approved.subsidy_fen == 5_000
        assert last.authorization.state == apb.AUTHORIZATION_STATE_REFUNDED
        assert last.authorization.refunded_subsidy_fen == 5_000
        assert (await world.wallet.get(code)).state == qpb.QUALIFICATION_STATE_REDEEMED
        budget = await world.budget(HUBEI)
        assert (budget["general:spent"], budget["general:refunded"]) == (0, 5_000)
        assert await world.units(HUBEI, consumer_key_of(person)) == 1  # split refunds count as used
        assert await world.reconciled() == []
        connection = await asyncpg.connect(world.env.pg_dsn)
        try:
            per_line = await connection.fetch(
                "SELECT line->>'l' AS line, (line->>'s')::bigint AS fen FROM ledger_events,"
                " jsonb_array_elements(lines) AS line WHERE event_type = 'REFUNDED' ORDER BY event_ms, event_seq"
            )
        finally:
            await connection.close()
        assert [(row["line"], row["fen"]) for row in per_line] == [("2", 1_667), ("1", 1_667), ("3", 1_666)]


async def test_the_whole_basket_refunded_within_validity_restores_the_voucher(services: Services) -> None:
    async with basket_world(services) as world:
        await world.create(campaigns_from_file(EXAMPLE)[0])
        person, code, approved = await voucher_payment(world, [12_000, 9_000])
        expires = (await world.wallet.get(code)).expires_at
        refund = await world.till.refund(approved.authorization_id, ["1", "2"])
        assert refund.refunded_subsidy_fen == 5_000
        restored = await world.wallet.get(code)
        assert restored.state == qpb.QUALIFICATION_STATE_ISSUED and restored.expires_at == expires
        assert await world.units(HUBEI, consumer_key_of(person)) == 0
        assert shares(await world.pay(HUBEI, [20_000], consumer_key_of(person), code)) == [5_000]
        assert await world.reconciled() == []


async def test_a_refund_after_the_voucher_expired_counts_it_as_used(services: Services) -> None:
    async with basket_world(services) as world:
        brief = campaigns_from_file(EXAMPLE)[0]
        brief.campaign_id, brief.qualification_validity_s = "c-brief-basket", 2
        await world.create(brief)
        person, code, approved = await voucher_payment(world, [10_000, 10_000], "c-brief-basket")
        expires_ms = (await world.wallet.get(code)).expires_at.ToMilliseconds()
        await asyncio.sleep(max(0.0, expires_ms / 1000 - time.time()) + 0.3)
        assert (await world.till.refund(approved.authorization_id)).refunded_subsidy_fen == 5_000
        assert (await world.wallet.get(code)).state == qpb.QUALIFICATION_STATE_REDEEMED
        assert (await world.try_claim(person, "c-brief-basket")).decision == qpb.CLAIM_DECISION_DECLINED
        assert await world.reconciled() == []


async def test_a_partly_refunded_basket_is_rebuilt_from_the_ledger(services: Services) -> None:
    """After a Redis loss, rebuild restores a partly refunded basket's counters from the ledger
    (its one unit still counted, the refunded share back in the budget) and the authorization
    with its shares, so the rest of the basket then refunds exactly its own shares."""
    async with basket_world(services) as world:
        await world.create(campaigns_from_file(EXAMPLE)[0])
        person, _code, approved = await voucher_payment(world, [7_000, 7_000, 7_000])
        assert (await world.till.refund(approved.authorization_id, ["3"])).refunded_subsidy_fen == 1_666
        assert await world.reconciled() == []
        before = await redis_counters(world.redis, world.env.keys)
        for pattern in ("usage", "serial", "budget", "auth", "holds"):
            doomed = [key async for key in world.redis.scan_iter(match=f"{world.env.keys.tag}:{pattern}*")]
            if doomed:
                await world.redis.delete(*doomed)
        connection = await asyncpg.connect(world.env.pg_dsn)
        try:
            await publish_reference(world.redis, world.env.keys, await fetch_reference(connection))
            await rebuild(connection, world.redis, world.env.keys)
        finally:
            await connection.close()
        assert (await redis_counters(world.redis, world.env.keys)).nonzero() == before.nonzero()
        assert await world.units(HUBEI, consumer_key_of(person)) == 1
        rest = await world.till.refund(approved.authorization_id)
        assert rest.refunded_subsidy_fen == 1_667 + 1_667
        assert rest.authorization.refunded_subsidy_fen == 5_000
        assert await world.units(HUBEI, consumer_key_of(person)) == 1
        assert await world.reconciled() == []


async def test_a_line_rule_voucher_still_pays_one_line(services: Services) -> None:
    """A voucher under a LINE rule takes its amount off one line: a payment of two lines with
    it is refused INVALID_ARGUMENT naming lines, and the voucher stays usable."""
    async with basket_world(services) as world:
        per_line = campaigns_from_file(EXAMPLE)[0]
        per_line.campaign_id = "c-line-voucher"
        per_line.rules[0].threshold_scope = pb.THRESHOLD_SCOPE_LINE
        await world.create(per_line)
        person = id_number()
        code = await world.claim(person, "c-line-voucher")
        with pytest.raises(InvalidArgument) as refused:
            await world.pay("c-line-voucher", [20_000, 20_000], consumer_key_of(person), code)
        assert refused.value.metadata["field"] == "lines"
        assert (await world.wallet.get(code)).state == qpb.QUALIFICATION_STATE_ISSUED
        assert shares(await world.pay("c-line-voucher", [20_000], consumer_key_of(person), code)) == [5_000]
