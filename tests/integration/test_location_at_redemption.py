"""Location at redemption (issue 13, item 2) through the public API.

The Yantai-style example campaign (examples/campaigns/yantai-vouchers.yaml, applied with
subsidyctl and through CampaignService) requires the phone's location when paying, checked
with a claim's rules: none sent LOCATION_REQUIRED, then LOCATION_MOCKED, LOCATION_STALE,
LOCATION_INACCURATE, LOCATION_OUTSIDE_REGION, ranked right after STORE_OUTSIDE_REGION and
before every line-level reason; a GCJ-02 position is converted as a claim's; the limits are
exact (200 m and 300 s allowed, 201 m and 301 s not); campaigns without the flag ignore a
location's verdict but refuse a malformed one, like every campaign, INVALID_ARGUMENT naming
the field with nothing written; the flag is read by the script in its one call, so switching
it on or off applies to the very next payment; and the precise position is neither kept in
Redis nor logged.

Places (WGS-84; the simplified Xiaoshan outline of the example and tests/fixtures/reference.yaml):
  Xiaoshan District government  30.18 N, 120.26 E     inside
  Binjiang District government  30.208 N, 120.212 E   outside (across the district line)
  West Lake                     30.25 N, 120.14 E     outside
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, MerchantClient, QualificationClient, RetryPolicy, SignedClient
from subsidy_client.errors import InvalidArgument
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import campaign_pb2 as cpb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import merchant_pb2 as mpb
from subsidy_client.v1 import qualification_pb2 as qpb

from server.ctl import main as subsidyctl
from server.ctl.campaign import campaigns_from_file
from server.domain.geo import wgs84_to_gcj02
from server.domain.merchants import licence_check_character
from server.domain.validation import new_redemption_code
from storage.devenv import Services
from storage.redis.keys import Keys
from tests.conftest import (
    ROOT,
    Environment,
    consumer_key,
    consumer_key_of,
    id_number,
    isolated_environment,
    load_document,
    running_gateway,
)

EXAMPLE = ROOT / "examples" / "campaigns" / "yantai-vouchers.yaml"
SERVICE = "/subsidy.v1.CampaignService/"
OPERATOR = "op-auditor"
YANTAI = "yantai-2023-vouchers"
BOUND = "yantai-bound"  # the example, also redeemable only at stores inside the region
GOODS = "6970000000086"  # category general, no serial
UNKNOWN_GTIN = "6970000000109"  # valid check digit, not in the catalog

XIAOSHAN_GOVERNMENT = (30.18, 120.26)
BINJIANG_GOVERNMENT = (30.208, 120.212)
WEST_LAKE = (30.25, 120.14)
# Either side of the outline's Binjiang line (120.250 E at 30.225 N to 120.240 E at 30.160 N),
# which at 30.19 N runs through 120.24462 E: 200 m east (inside) and 200 m west (outside). The
# GCJ-02 offset here is about 500 m, so a GCJ-02 position read as WGS-84 lands on the wrong side.
BORDER_INSIDE = (30.19, 120.24670)
BORDER_OUTSIDE = (30.19, 120.24255)
# A box around Binjiang: a campaign region that lets a Binjiang store be registered at all.
NEIGHBOUR = {
    "campaigns": [
        {
            "id": "c-binjiang",
            "starts_at": "2020-01-01T00:00:00+08:00",
            "ends_at": "2099-01-01T00:00:00+08:00",
            "region": {"type": "Polygon", "coordinates": [
                [[120.15, 30.17], [120.235, 30.17], [120.235, 30.23], [120.15, 30.23], [120.15, 30.17]]]},
            "rules": [{"category": "general", "kind": "FIXED", "threshold_fen": 100, "off_fen": 10,
                       "per_person_limit": 1, "budget_fen": 1_000_000}],
        }
    ]
}  # fmt: skip


@dataclass
class World:
    env: Environment
    target: str
    operator: SignedClient
    wallet: QualificationClient
    redis: Redis
    inside: AuthorizationClient  # a till of a store in Xiaoshan
    binjiang: AuthorizationClient  # a till of a store across the district line
    nostore: AuthorizationClient  # the fixture's t-main-01, bound to no store


def request_id() -> str:
    return str(uuid.uuid4())


def now_ms() -> int:
    return int(time.time() * 1000)


def wgs84(point: tuple[float, float], accuracy_m: float = 20.0) -> common_pb2.Location:
    return common_pb2.Location(
        latitude=point[0],
        longitude=point[1],
        coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84,
        accuracy_m=accuracy_m,
    )


def gcj02(point: tuple[float, float], accuracy_m: float = 20.0) -> common_pb2.Location:
    """The point as a Chinese map SDK reports it (GCJ-02)."""
    latitude, longitude = wgs84_to_gcj02(*point)
    return common_pb2.Location(
        latitude=latitude,
        longitude=longitude,
        coordinate_system=common_pb2.COORDINATE_SYSTEM_GCJ02,
        accuracy_m=accuracy_m,
    )


def phone(
    where: tuple[float, float] = XIAOSHAN_GOVERNMENT,
    *,
    accuracy_m: float = 20.0,
    age_ms: int = 5_000,
    mock: bool = False,
    location: common_pb2.Location | None = None,
) -> qpb.DeviceLocation:
    """Where the consumer's phone is, as the partner app or the till reports it."""
    device = qpb.DeviceLocation(location=location or wgs84(where, accuracy_m), mock_location=mock)
    device.fix_time.FromMilliseconds(now_ms() - age_ms)
    return device


def outcome(response: apb.AuthorizeResponse) -> str:
    if response.decision == apb.DECISION_APPROVED:
        return "APPROVED"
    return apb.DeclineReason.Name(response.decline_reason).removeprefix("DECLINE_REASON_")


def licence() -> str:
    body = "91330109" + "".join(secrets.choice("0123456789ABCDEFGHJKLMNPQRTUWXY") for _ in range(9))
    return body + licence_check_character(body)


async def open_till(target: str, merchants: MerchantClient, merchant_id: str, where: tuple[float, float]) -> Any:
    store_id = f"s-{secrets.token_hex(4)}"
    store = mpb.Store(
        store_id=store_id,
        merchant_id=merchant_id,
        kind=mpb.STORE_KIND_PHYSICAL,
        name="门店",
        address="杭州",
        location=wgs84(where, 0.0),
    )
    await merchants.create_store(mpb.CreateStoreRequest(request_id=request_id(), store=store))
    terminal_id = f"t-{secrets.token_hex(4)}"
    created = await merchants.create_terminal(
        mpb.CreateTerminalRequest(request_id=request_id(), terminal_id=terminal_id, store_id=store_id)
    )
    return AuthorizationClient(target, terminal_id, created.secret, deadline_s=5.0, retry=RetryPolicy(max_attempts=1))


async def create(operator: SignedClient, campaign: cpb.Campaign) -> cpb.CreateCampaignResponse:
    request = cpb.CreateCampaignRequest(request_id=request_id(), campaign=campaign)
    return await operator._call(SERVICE + "CreateCampaign", request, cpb.CreateCampaignResponse)


async def update(operator: SignedClient, campaign: cpb.Campaign) -> cpb.UpdateCampaignResponse:
    request = cpb.UpdateCampaignRequest(request_id=request_id(), campaign=campaign)
    return await operator._call(SERVICE + "UpdateCampaign", request, cpb.UpdateCampaignResponse)


async def fetch(operator: SignedClient, campaign_id: str) -> cpb.Campaign:
    request = cpb.GetCampaignRequest(campaign_id=campaign_id)
    return (await operator._call(SERVICE + "GetCampaign", request, cpb.GetCampaignResponse)).campaign


def yantai(campaign_id: str = YANTAI, **fields: Any) -> cpb.Campaign:
    (campaign,) = campaigns_from_file(EXAMPLE)
    campaign.campaign_id = campaign_id
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
            # The campaigns first: stores registered afterwards are placed in the bound one's region.
            await create(operator, yantai())
            await create(operator, yantai(BOUND, redeem_in_region_only=True))
            merchant_id = f"m-{secrets.token_hex(4)}"
            merchant = mpb.Merchant(merchant_id=merchant_id, name="萧山百货", licence_number=licence())
            await merchants.create_merchant(mpb.CreateMerchantRequest(request_id=request_id(), merchant=merchant))
            inside = await open_till(target, merchants, merchant_id, XIAOSHAN_GOVERNMENT)
            binjiang = await open_till(target, merchants, merchant_id, BINJIANG_GOVERNMENT)
            nostore = AuthorizationClient(target, "t-main-01", env.credentials["t-main-01"], retry=once)
            try:
                yield World(env, target, operator, wallet, redis, inside, binjiang, nostore)
            finally:
                for client in (inside, binjiang, nostore, operator, merchants, wallet):
                    await client.close()
                await redis.aclose()


async def voucher(world: World, person: str, campaign: str = YANTAI) -> str:
    """A voucher claimed with the phone inside the region."""
    response = await world.wallet.claim(
        campaign_id=campaign,
        category="general",
        id_number=person,
        location=wgs84(XIAOSHAN_GOVERNMENT),
        fix_time_ms=now_ms(),
    )
    assert response.decision == qpb.CLAIM_DECISION_ISSUED, response
    return response.qualification.redemption_code


async def pay(
    till: AuthorizationClient,
    person: str,
    code: str,
    location: qpb.DeviceLocation | None,
    campaign: str = YANTAI,
    gtin: str = GOODS,
) -> apb.AuthorizeResponse:
    return await till.authorize(
        campaign_id=campaign,
        consumer_key=consumer_key_of(person),
        lines=[Line("1", gtin, 6_000)],
        redemption_code=code,
        consumer_location=location,
    )


async def state(world: World, code: str) -> int:
    return (await world.wallet.get(code)).state


# --- The example and each rule ---------------------------------------------------------------


async def test_the_yantai_voucher_is_paid_only_with_the_phone_inside_the_region(world: World) -> None:
    """Each rule declines with its own reason and reserves nothing (the voucher stays ISSUED);
    the same voucher is then paid with the phone inside: "10 off 50"."""
    person = id_number()
    code = await voucher(world, person)
    declines = [
        (None, "LOCATION_REQUIRED"),
        (phone(mock=True), "LOCATION_MOCKED"),
        (phone(age_ms=600_000), "LOCATION_STALE"),
        (phone(accuracy_m=5_000), "LOCATION_INACCURATE"),
        (phone(WEST_LAKE), "LOCATION_OUTSIDE_REGION"),
        (phone(BINJIANG_GOVERNMENT), "LOCATION_OUTSIDE_REGION"),
    ]
    for location, expected in declines:
        assert outcome(await pay(world.inside, person, code, location)) == expected
        assert await state(world, code) == qpb.QUALIFICATION_STATE_ISSUED
    approved = await pay(world.inside, person, code, phone())
    assert outcome(approved) == "APPROVED" and approved.subsidy_fen == 1_000
    assert await state(world, code) == qpb.QUALIFICATION_STATE_RESERVED


async def test_a_till_sending_only_the_code_sends_the_location_too(world: World) -> None:
    """Item 8's code-only request (the consumer is the voucher's owner) with the phone's
    location, through the Python client; without the location it is LOCATION_REQUIRED."""
    code = await voucher(world, id_number())
    alone = await world.inside.authorize(campaign_id=YANTAI, lines=[Line("1", GOODS, 6_000)], redemption_code=code)
    assert outcome(alone) == "LOCATION_REQUIRED"
    paid = await world.inside.authorize(
        campaign_id=YANTAI, lines=[Line("1", GOODS, 6_000)], redemption_code=code, consumer_location=phone()
    )
    assert outcome(paid) == "APPROVED"


async def test_a_gcj02_position_is_converted_as_a_claims(world: World) -> None:
    """200 m either side of the district line, reported in GCJ-02 (what Chinese map SDKs give):
    judged on the right side. Mislabelled as WGS-84 the same numbers land about 500 m away, on
    the other side, which shows the conversion is what decides."""
    for place, expected in ((BORDER_INSIDE, "APPROVED"), (BORDER_OUTSIDE, "LOCATION_OUTSIDE_REGION")):
        person = id_number()
        code = await voucher(world, person)
        assert outcome(await pay(world.inside, person, code, phone(location=gcj02(place)))) == expected, place
    person = id_number()
    code = await voucher(world, person)
    shifted = gcj02(BORDER_OUTSIDE)
    shifted.coordinate_system = common_pb2.COORDINATE_SYSTEM_WGS84
    assert outcome(await pay(world.inside, person, code, phone(location=shifted))) == "APPROVED"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (lambda: phone(accuracy_m=1.0), "APPROVED"),  # one metre
        (lambda: phone(accuracy_m=200.0), "APPROVED"),  # the example's maximum
        (lambda: phone(accuracy_m=200.001), "LOCATION_INACCURATE"),
        (lambda: phone(accuracy_m=201.0), "LOCATION_INACCURATE"),  # the maximum plus one
        (lambda: phone(age_ms=0), "APPROVED"),  # a fix taken now
        # 1 s short of the example's 300 s (the margin is the call's own time on the way).
        (lambda: phone(age_ms=299_000), "APPROVED"),
        (lambda: phone(age_ms=301_000), "LOCATION_STALE"),  # the maximum plus one second
        (lambda: phone(age_ms=-30_000), "APPROVED"),  # a phone clock half a minute ahead
    ],
)
async def test_the_limits_are_the_campaigns_exactly(world: World, location: Any, expected: str) -> None:
    person = id_number()
    code = await voucher(world, person)
    assert outcome(await pay(world.inside, person, code, location())) == expected


# --- Precedence --------------------------------------------------------------------------------


async def test_the_location_reasons_rank_in_their_order(world: World) -> None:
    """Several rules broken at once: the first in the order mocked, stale, inaccurate, outside."""
    person = id_number()
    code = await voucher(world, person)
    everything = phone(WEST_LAKE, mock=True, age_ms=600_000, accuracy_m=5_000)
    assert outcome(await pay(world.inside, person, code, everything)) == "LOCATION_MOCKED"
    everything.mock_location = False
    assert outcome(await pay(world.inside, person, code, everything)) == "LOCATION_STALE"
    assert outcome(await pay(world.inside, person, code, phone(WEST_LAKE, accuracy_m=5_000))) == "LOCATION_INACCURATE"
    assert outcome(await pay(world.inside, person, code, phone(WEST_LAKE))) == "LOCATION_OUTSIDE_REGION"


async def test_location_ranks_after_the_store_and_before_every_line_and_consumer_reason(world: World) -> None:
    """STORE_OUTSIDE_REGION (22) first; then the location (24-28); then the line-level reasons
    (an unknown product: PRODUCT_NOT_ELIGIBLE, 5) and the consumer's (a second payment with the
    voucher: CONSUMER_LIMIT_REACHED) only once the phone is accepted."""
    person = id_number()
    code = await voucher(world, person, BOUND)
    assert outcome(await pay(world.binjiang, person, code, None, BOUND)) == "STORE_OUTSIDE_REGION"
    assert outcome(await pay(world.binjiang, person, code, phone(mock=True), BOUND)) == "STORE_OUTSIDE_REGION"
    assert outcome(await pay(world.inside, person, code, None, BOUND)) == "LOCATION_REQUIRED"
    unknown = await pay(world.inside, person, code, phone(mock=True), BOUND, gtin=UNKNOWN_GTIN)
    assert outcome(unknown) == "LOCATION_MOCKED"
    assert outcome(await pay(world.inside, person, code, phone(), BOUND, gtin=UNKNOWN_GTIN)) == "PRODUCT_NOT_ELIGIBLE"
    assert outcome(await pay(world.inside, person, code, phone(), BOUND)) == "APPROVED"
    # The voucher is now reserved and the person's one unit held: a second payment is declined
    # for that only when the phone passes.
    assert outcome(await pay(world.inside, person, code, phone(WEST_LAKE), BOUND)) == "LOCATION_OUTSIDE_REGION"
    assert outcome(await pay(world.inside, person, code, phone(), BOUND)) == "CONSUMER_LIMIT_REACHED"


async def test_a_code_only_request_with_an_unknown_code_is_not_found_before_its_location(world: World) -> None:
    """Without a consumer, an unknown code (QUALIFICATION_NOT_FOUND, 16) ranks right after the
    store, ahead of the location reasons, as the proto says."""
    unknown = await world.inside.authorize(
        campaign_id=YANTAI, lines=[Line("1", GOODS, 6_000)], redemption_code=new_redemption_code()
    )
    assert outcome(unknown) == "QUALIFICATION_NOT_FOUND"


# --- Campaigns without the flag, and the flag switched -------------------------------------------


async def test_campaigns_without_the_flag_ignore_the_verdict(world: World) -> None:
    """The fixture's c-voucher (no region) and c-qual (a region, claims located, no flag): a
    missing, mocked, stale, inaccurate or far-away location does not matter when paying."""
    for location in (None, phone(WEST_LAKE, mock=True, age_ms=600_000, accuracy_m=5_000)):
        plain = await world.nostore.authorize(
            campaign_id="c-voucher",
            consumer_key=consumer_key(),
            lines=[Line("1", GOODS, 6_000)],
            consumer_location=location,
        )
        assert outcome(plain) == "APPROVED"
        person = id_number()
        claimed = await world.wallet.claim(
            campaign_id="c-qual", category="general", id_number=person, location=wgs84(XIAOSHAN_GOVERNMENT),
            fix_time_ms=now_ms(),
        )  # fmt: skip
        code = claimed.qualification.redemption_code
        assert outcome(await pay(world.nostore, person, code, location, "c-qual")) == "APPROVED"


async def test_switching_the_flag_applies_to_the_very_next_payment(world: World) -> None:
    """The flag is read by the script in its one call, not from the gateway's cached copy: a
    campaign switched on a moment ago declines the next payment without a location, and
    switched off accepts it again, with no wait."""
    campaign_id = f"yt-{secrets.token_hex(3)}"
    await create(world.operator, yantai(campaign_id, require_location_at_redemption=False))
    person = id_number()
    code = await voucher(world, person, campaign_id)
    assert outcome(await pay(world.inside, person, code, phone(mock=True), campaign_id)) == "APPROVED"
    other = id_number()
    other_code = await voucher(world, other, campaign_id)
    await update(world.operator, yantai(campaign_id, require_location_at_redemption=True))
    assert outcome(await pay(world.inside, other, other_code, None, campaign_id)) == "LOCATION_REQUIRED"
    assert outcome(await pay(world.inside, other, other_code, phone(mock=True), campaign_id)) == "LOCATION_MOCKED"
    await update(world.operator, yantai(campaign_id, require_location_at_redemption=False))
    assert outcome(await pay(world.inside, other, other_code, None, campaign_id)) == "APPROVED"


# --- Bad input -------------------------------------------------------------------------------


def _bad(**changes: Any) -> qpb.DeviceLocation:
    device = phone()
    if "latitude" in changes:
        device.location.latitude = changes["latitude"]
    if "longitude" in changes:
        device.location.longitude = changes["longitude"]
    if "system" in changes:
        device.location.coordinate_system = changes["system"]
    if "accuracy_m" in changes:
        device.location.accuracy_m = changes["accuracy_m"]
    if "fix_time_ms" in changes:
        if changes["fix_time_ms"] is None:
            device.ClearField("fix_time")
        else:
            device.fix_time.FromMilliseconds(changes["fix_time_ms"])
    if "fix_seconds" in changes:
        device.fix_time.seconds = changes["fix_seconds"]
    if "location" in changes:
        device.ClearField("location")
    return device


MALFORMED = [
    ("latitude beyond the pole", {"latitude": 91.0}, "consumer_location.location.latitude"),
    ("latitude NaN", {"latitude": float("nan")}, "consumer_location.location.latitude"),
    ("longitude NaN", {"longitude": float("nan")}, "consumer_location.location.longitude"),
    ("longitude infinite", {"longitude": float("inf")}, "consumer_location.location.longitude"),
    ("longitude beyond 180", {"longitude": 180.5}, "consumer_location.location.longitude"),
    ("no coordinate system", {"system": 0}, "consumer_location.location.coordinate_system"),
    ("unknown coordinate system", {"system": 7}, "consumer_location.location.coordinate_system"),
    ("accuracy zero", {"accuracy_m": 0.0}, "consumer_location.location.accuracy_m"),
    ("accuracy negative", {"accuracy_m": -5.0}, "consumer_location.location.accuracy_m"),
    ("accuracy NaN", {"accuracy_m": float("nan")}, "consumer_location.location.accuracy_m"),
    ("accuracy absurd", {"accuracy_m": 1e12}, "consumer_location.location.accuracy_m"),
    ("fix an hour in the future", {"fix_time_ms": now_ms() + 3_600_000}, "consumer_location.fix_time"),
    ("fix time missing", {"fix_time_ms": None}, "consumer_location.fix_time"),
    ("fix time beyond the Timestamp range", {"fix_seconds": 253_402_300_800}, "consumer_location.fix_time"),
    ("location missing", {"location": None}, "consumer_location.location"),
]


async def keyspace(redis: Redis, keys: Keys) -> dict[bytes, Any]:
    """Every key of the world and its value (sets included: the bound campaign's stores)."""
    found: dict[bytes, Any] = {}
    async for key in redis.scan_iter(match=keys.pattern(), count=10_000):
        kind = await redis.type(key)
        if kind == b"string":
            found[key] = await redis.get(key)
        elif kind == b"hash":
            found[key] = await redis.hgetall(key)
        elif kind == b"zset":
            found[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            found[key] = await redis.xrange(key)
        elif kind == b"set":
            found[key] = await redis.smembers(key)
        else:
            raise AssertionError(f"unexpected key type {kind!r}")
    return found


@pytest.mark.parametrize(("name", "changes", "field"), MALFORMED, ids=[case[0] for case in MALFORMED])
async def test_a_malformed_location_is_refused_naming_the_field_whatever_the_campaign(
    world: World, name: str, changes: dict[str, Any], field: str
) -> None:
    """INVALID_ARGUMENT naming the field, as ClaimQualification does, for a campaign that
    requires the location and for one that does not (a location sent is validated, its verdict
    used only where required); nothing is written, not even the nonce."""
    person = id_number()
    code = await voucher(world, person)
    before = await keyspace(world.redis, world.env.keys)
    with pytest.raises(InvalidArgument) as refused:
        await pay(world.inside, person, code, _bad(**changes))
    assert refused.value.metadata["field"] == field
    with pytest.raises(InvalidArgument) as refused:
        await world.nostore.authorize(
            campaign_id="c-voucher",
            consumer_key=consumer_key(),
            lines=[Line("1", GOODS, 6_000)],
            consumer_location=_bad(**changes),
        )
    assert refused.value.metadata["field"] == field
    assert await keyspace(world.redis, world.env.keys) == before


# --- Configuration -----------------------------------------------------------------------------


async def test_the_flag_needs_a_region_and_get_campaign_answers_it(world: World) -> None:
    """Without a region: INVALID_ARGUMENT naming the field, on create and on update, nothing
    stored or published; GetCampaign answers the flag as stored, and the published hash has it."""
    campaign_id = f"yt-{secrets.token_hex(3)}"
    keys = world.env.keys
    with pytest.raises(InvalidArgument) as refused:
        await create(world.operator, yantai(campaign_id, region_geojson=""))
    assert refused.value.metadata["field"] == "campaign.require_location_at_redemption"
    assert not await world.redis.exists(keys.campaign(campaign_id))
    await create(world.operator, yantai(campaign_id))
    assert (await fetch(world.operator, campaign_id)).require_location_at_redemption
    assert await world.redis.hget(keys.campaign(campaign_id), "loc_redeem") == b"1"
    published = await world.redis.hgetall(keys.campaign(campaign_id))
    with pytest.raises(InvalidArgument) as refused:
        await update(world.operator, yantai(campaign_id, region_geojson=""))
    assert refused.value.metadata["field"] == "campaign.require_location_at_redemption"
    stored = await fetch(world.operator, campaign_id)
    assert stored.require_location_at_redemption and stored.region_geojson
    assert await world.redis.hgetall(keys.campaign(campaign_id)) == published
    await update(world.operator, yantai(campaign_id, require_location_at_redemption=False))
    assert not (await fetch(world.operator, campaign_id)).require_location_at_redemption
    assert await world.redis.hget(keys.campaign(campaign_id), "loc_redeem") == b"0"


async def test_subsidyctl_applies_the_example_and_shows_the_flag(world: World, tmp_path: Path) -> None:
    """`subsidyctl campaign apply examples/campaigns/yantai-vouchers.yaml` (the world created the
    same campaign: an update), then `campaign show --json` says the flag."""
    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        json.dumps({"target": world.target, "operators": {OPERATOR: world.env.credentials[OPERATOR]}})
    )
    runner = CliRunner()
    base = ["--credentials", str(credentials)]
    applied = await asyncio.to_thread(runner.invoke, subsidyctl, [*base, "campaign", "apply", str(EXAMPLE)])
    assert applied.exit_code == 0, applied.output
    shown = await asyncio.to_thread(runner.invoke, subsidyctl, [*base, "--json", "campaign", "show", YANTAI])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["campaign"]["require_location_at_redemption"] is True


# --- Privacy and cost ------------------------------------------------------------------------


async def test_the_precise_position_is_neither_kept_nor_logged(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """A distinctive position (30.181234 N, 120.261234 E) approved and declined with DEBUG
    logging on: no Redis value and no log line carries its digits."""
    person = id_number()
    code = await voucher(world, person)
    spot = (30.181234, 120.261234)
    with caplog.at_level(logging.DEBUG):
        assert outcome(await pay(world.inside, person, code, phone(spot, mock=True))) == "LOCATION_MOCKED"
        assert outcome(await pay(world.inside, person, code, phone(spot))) == "APPROVED"
    everything = repr(await keyspace(world.redis, world.env.keys))
    logged = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    for digits in ("181234", "261234"):
        assert digits not in everything and digits not in logged


async def test_a_located_payment_is_still_one_evalsha(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted with MONITOR, as test_redemption_rules counts: once the gateway holds the
    campaign's rule and region (the cache's lifetime stretched here so that a slow machine
    cannot make it re-read mid-test), a payment with a location accepted, one declined
    LOCATION_MOCKED and one without a location each send exactly one EVALSHA, and the script
    reads the flag from the campaign hash itself."""
    monkeypatch.setattr("server.services.common.CAMPAIGN_CACHE_S", 3_600.0)
    name = f"gateway-{world.env.prefix}"
    people = [id_number() for _ in range(3)]
    codes = [await voucher(world, person) for person in people]
    warm = id_number()
    assert outcome(await pay(world.inside, warm, await voucher(world, warm), phone(mock=True))) == "LOCATION_MOCKED"
    sentinel = "end-of-watch-" + uuid.uuid4().hex
    probe = Redis.from_url(world.env.redis_url, single_connection_client=True)
    watcher_client = Redis.from_url(world.env.redis_url)
    ready = asyncio.Event()
    watcher = asyncio.create_task(_watch(watcher_client, sentinel, ready))
    await ready.wait()
    outcomes = [
        outcome(await pay(world.inside, people[0], codes[0], phone())),
        outcome(await pay(world.inside, people[1], codes[1], phone(mock=True))),
        outcome(await pay(world.inside, people[2], codes[2], None)),
    ]
    addresses = {entry["addr"] for entry in await probe.client_list() if entry.get("name") == name}
    await probe.echo(sentinel)
    commands = await asyncio.wait_for(watcher, timeout=10)
    await watcher_client.aclose()
    await probe.aclose()
    assert outcomes == ["APPROVED", "LOCATION_MOCKED", "LOCATION_REQUIRED"]
    from_gateway = [
        entry["command"].split()[0].upper()
        for entry in commands
        if entry["client_type"] != "lua" and f"{entry['client_address']}:{entry['client_port']}" in addresses
    ]
    assert from_gateway == ["EVALSHA"] * 3
    scripted = [entry["command"] for entry in commands if entry["client_type"] == "lua"]
    assert any("loc_redeem" in command for command in scripted)


async def _watch(redis: Redis, sentinel: str, ready: asyncio.Event) -> list[dict[str, Any]]:
    """Every command Redis executes until the sentinel ECHO, via MONITOR."""
    seen: list[dict[str, Any]] = []
    async with redis.monitor() as monitor:
        ready.set()
        while True:
            entry = await monitor.next_command()
            if entry["command"].startswith("ECHO") and sentinel in entry["command"]:
                return seen
            seen.append(entry)


async def test_the_gateways_copy_of_the_limits_and_what_happens_while_it_is_stale(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limits and the region come from the gateway's copy, re-read once it is older than
    CAMPAIGN_CACHE_S (1 s; stretched here to an hour, then shrunk to 0, so that the test does
    not depend on timing): while the copy is fresh, a tightened accuracy limit is not yet
    applied (the documented window); once re-read it is. A campaign the copy holds as absent is
    read again rather than trusted: one created after a payment for its id was tried is judged
    by its own rule at once."""
    monkeypatch.setattr("server.services.common.CAMPAIGN_CACHE_S", 3_600.0)
    campaign_id = f"yt-{secrets.token_hex(3)}"
    missing = await world.inside.authorize(
        campaign_id=campaign_id, consumer_key=consumer_key(), lines=[Line("1", GOODS, 6_000)], consumer_location=phone()
    )
    assert outcome(missing) == "CAMPAIGN_NOT_FOUND"
    await create(world.operator, yantai(campaign_id))
    people = [id_number() for _ in range(4)]
    codes = [await voucher(world, person, campaign_id) for person in people]
    assert outcome(await pay(world.inside, people[0], codes[0], phone(mock=True), campaign_id)) == "LOCATION_MOCKED"
    assert outcome(await pay(world.inside, people[0], codes[0], phone(accuracy_m=150), campaign_id)) == "APPROVED"
    await update(world.operator, yantai(campaign_id, location_max_accuracy_m=100))
    assert outcome(await pay(world.inside, people[1], codes[1], phone(accuracy_m=150), campaign_id)) == "APPROVED"
    monkeypatch.setattr("server.services.common.CAMPAIGN_CACHE_S", 0.0)
    tightened = await pay(world.inside, people[2], codes[2], phone(accuracy_m=150), campaign_id)
    assert outcome(tightened) == "LOCATION_INACCURATE"
    assert outcome(await pay(world.inside, people[2], codes[2], phone(accuracy_m=100), campaign_id)) == "APPROVED"


async def test_a_retry_replays_the_first_answer_even_once_its_fix_is_stale(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verdict is the first call's: a retry of an approved payment (same request id, same
    message) after its fix has aged past the limit answers the stored approval, replayed, not
    LOCATION_STALE. The gateway's clock is moved ten minutes ahead for the retry (its module's
    ``time`` only: the client still signs with the real clock)."""
    import types

    from server.services import authorization

    person = id_number()
    code = await voucher(world, person)
    request = apb.AuthorizeRequest(
        request_id=request_id(),
        campaign_id=YANTAI,
        consumer_key=consumer_key_of(person),
        channel=apb.CHANNEL_POS,
        lines=[apb.LineItem(line_id="1", gtin=GOODS, unit_price_fen=6_000)],
        redemption_code=code,
        consumer_location=phone(),
    )
    first = await world.inside.send_authorize(request)
    assert outcome(first) == "APPROVED" and not first.replayed
    later = types.SimpleNamespace(time=lambda: time.time() + 600.0)
    monkeypatch.setattr(authorization, "time", later)
    other = id_number()
    fresh = await pay(world.inside, other, await voucher(world, other), phone())
    assert outcome(fresh) == "LOCATION_STALE"  # the moved clock does judge a new payment
    retried = await world.inside.send_authorize(request)
    assert retried.replayed and retried.authorization_id == first.authorization_id
