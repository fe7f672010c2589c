"""QualificationService against real Redis and PostgreSQL: claiming with a phone location,
redeeming at the till in the same atomic step as the authorization, the lifecycle of a
qualification through void, capture, refund and expiry, and malformed claims changing nothing.

Places used (WGS-84; the simplified Xiaoshan outline of tests/fixtures/reference.yaml):
  Xiaoshan District government  30.18 N, 120.26 E     inside
  Xiaoshan International Airport 30.23 N, 120.43 E     inside
  Binjiang District government  30.208 N, 120.212 E   outside (across the district line)
  West Lake                     30.25 N, 120.14 E     outside (north of the Qiantang)
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis
from subsidy_client import (
    AuthorizationClient,
    ExchangeClient,
    Line,
    QualificationClient,
    RetryPolicy,
    SignedClient,
)
from subsidy_client.errors import (
    IdempotencyConflict,
    InvalidArgument,
    InvalidState,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import campaign_pb2 as cpb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from server.domain.geo import wgs84_to_gcj02
from server.processes.app import Application
from storage.devenv import Services
from tests.conftest import (
    Environment,
    consumer_key_of,
    id_number,
    isolated_environment,
    load_document,
    running_gateway,
    serial,
    snapshot,
)

GOODS = "6970000000086"  # category general
FRIDGE = "6970000000017"  # category fridge, grade 1, serial required

XIAOSHAN_GOVERNMENT = (30.18, 120.26)
XIAOSHAN_AIRPORT = (30.23, 120.43)
BINJIANG_GOVERNMENT = (30.208, 120.212)
WEST_LAKE = (30.25, 120.14)
# Either side of the outline's Binjiang line (120.250 E at 30.225 N to 120.240 E at 30.160 N),
# which at 30.19 N runs through 120.24462 E: 200 m east (inside) and 200 m west (outside).
BORDER_INSIDE = (30.19, 120.24670)
BORDER_OUTSIDE = (30.19, 120.24255)


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


def now_ms() -> int:
    return int(time.time() * 1000)


def decision(response: qpb.ClaimQualificationResponse) -> str:
    if response.decision == qpb.CLAIM_DECISION_ISSUED:
        return "ISSUED"
    return qpb.ClaimDeclineReason.Name(response.decline_reason).removeprefix("CLAIM_DECLINE_REASON_")


def outcome(response: apb.AuthorizeResponse) -> str:
    if response.decision == apb.DECISION_APPROVED:
        return "APPROVED"
    return apb.DeclineReason.Name(response.decline_reason).removeprefix("DECLINE_REASON_")


@pytest.fixture(scope="module")
async def wallet(environment: Environment, gateway: Application) -> AsyncIterator[QualificationClient]:
    client = QualificationClient(
        f"127.0.0.1:{gateway.port}",
        "p-wallet-01",
        environment.credentials["p-wallet-01"],
        retry=RetryPolicy(max_attempts=1),
    )
    yield client
    await client.close()


@pytest.fixture(scope="module")
async def bank(environment: Environment, gateway: Application) -> AsyncIterator[QualificationClient]:
    client = QualificationClient(
        f"127.0.0.1:{gateway.port}",
        "p-bank-01",
        environment.credentials["p-bank-01"],
        retry=RetryPolicy(max_attempts=1),
    )
    yield client
    await client.close()


async def claim(
    wallet: QualificationClient,
    person: str,
    *,
    campaign: str = "c-qual",
    category: str = "general",
    location: common_pb2.Location | None = None,
    fix_time_ms: int | None = None,
    mock: bool = False,
    phone: str = "",
) -> qpb.ClaimQualificationResponse:
    return await wallet.claim(
        campaign_id=campaign,
        category=category,
        id_number=person,
        location=location or wgs84(XIAOSHAN_GOVERNMENT),
        fix_time_ms=now_ms() if fix_time_ms is None else fix_time_ms,
        mock_location=mock,
        phone_number=phone,
    )


async def issued(wallet: QualificationClient, person: str, campaign: str = "c-qual") -> str:
    response = await claim(wallet, person, campaign=campaign)
    assert decision(response) == "ISSUED", response
    return response.qualification.redemption_code


async def pay(
    client: AuthorizationClient, person: str, code: str, campaign: str = "c-qual", lines: int = 1
) -> apb.AuthorizeResponse:
    return await client.authorize(
        campaign_id=campaign,
        consumer_key=consumer_key_of(person),
        lines=[Line(str(index), GOODS, 3_000) for index in range(lines)],
        redemption_code=code,
    )


async def test_a_claim_issues_a_qualification_that_only_its_partner_can_read(
    wallet: QualificationClient, bank: QualificationClient
) -> None:
    person = id_number()
    before = now_ms()
    response = await claim(wallet, person, phone="13812345678")
    assert decision(response) == "ISSUED"
    issued_qualification = response.qualification
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{16}", issued_qualification.redemption_code)
    assert issued_qualification.state == qpb.QUALIFICATION_STATE_ISSUED
    assert issued_qualification.consumer_key == consumer_key_of(person)
    assert issued_qualification.masked_id_number == person[:3] + "*" * 11 + person[-4:]
    assert issued_qualification.masked_phone_number == "138****5678"
    assert issued_qualification.location_cell == "30.18,120.26"
    issued_ms = issued_qualification.issued_at.ToMilliseconds()
    assert before - 1000 <= issued_ms <= now_ms() + 1000
    assert issued_qualification.expires_at.ToMilliseconds() - issued_ms == 3_600_000  # c-qual: 3,600 s
    assert await wallet.get(issued_qualification.redemption_code) == issued_qualification
    assert [q.redemption_code for q in await wallet.list(person)] == [issued_qualification.redemption_code]
    assert await wallet.list(person, campaign_id="c-qual-used") == []
    # Another partner sees nothing of it: not by code, not in the consumer's list.
    with pytest.raises(NotFound):
        await bank.get(issued_qualification.redemption_code)
    assert await bank.list(person) == []


async def test_one_qualification_per_person_and_category(
    wallet: QualificationClient, bank: QualificationClient
) -> None:
    person = id_number()
    await issued(wallet, person)
    assert decision(await claim(wallet, person)) == "PERSON_LIMIT_REACHED"
    assert decision(await claim(bank, person)) == "PERSON_LIMIT_REACHED"  # through another app too
    assert decision(await claim(wallet, person, campaign="c-qual-used")) == "ISSUED"  # another campaign
    # The same number typed with a lower-case x or spaces is the same person.
    spaced = person[:6] + " " + person[6:14] + " " + person[14:].lower()
    assert decision(await claim(wallet, spaced)) == "PERSON_LIMIT_REACHED"


async def test_the_location_rules_decline_in_their_order(wallet: QualificationClient) -> None:
    assert decision(await claim(wallet, id_number(), mock=True, location=wgs84(WEST_LAKE, 5_000))) == "LOCATION_MOCKED"
    stale = now_ms() - 301_000  # c-qual accepts fixes up to 300 s old
    assert decision(await claim(wallet, id_number(), fix_time_ms=stale)) == "LOCATION_STALE"
    assert decision(await claim(wallet, id_number(), fix_time_ms=now_ms() - 290_000)) == "ISSUED"
    assert decision(await claim(wallet, id_number(), location=wgs84(XIAOSHAN_AIRPORT, 201))) == "LOCATION_INACCURATE"
    assert decision(await claim(wallet, id_number(), location=wgs84(XIAOSHAN_AIRPORT, 200))) == "ISSUED"
    # A device clock slightly ahead of the server's is accepted.
    assert decision(await claim(wallet, id_number(), fix_time_ms=now_ms() + 30_000)) == "ISSUED"


@pytest.mark.parametrize(
    ("place", "inside"),
    [
        (XIAOSHAN_GOVERNMENT, True),
        (XIAOSHAN_AIRPORT, True),
        (BORDER_INSIDE, True),
        (BORDER_OUTSIDE, False),
        (BINJIANG_GOVERNMENT, False),
        (WEST_LAKE, False),
    ],
)
async def test_real_places_inside_and_outside_the_district_in_both_coordinate_systems(
    wallet: QualificationClient, place: tuple[float, float], inside: bool
) -> None:
    expected = "ISSUED" if inside else "LOCATION_OUTSIDE_REGION"
    assert decision(await claim(wallet, id_number(), location=wgs84(place))) == expected
    assert decision(await claim(wallet, id_number(), location=gcj02(place))) == expected


async def test_a_gcj02_fix_read_as_wgs84_would_land_on_the_wrong_side_of_the_line(
    wallet: QualificationClient,
) -> None:
    """200 m outside the district line: its GCJ-02 coordinates, shifted by the datum about
    500 m east, lie inside the outline. Labelled correctly they are converted and declined;
    the same numbers mislabelled as WGS-84 are (wrongly, but as told) accepted."""
    shifted = gcj02(BORDER_OUTSIDE)
    assert decision(await claim(wallet, id_number(), location=shifted)) == "LOCATION_OUTSIDE_REGION"
    mislabelled = common_pb2.Location()
    mislabelled.CopyFrom(shifted)
    mislabelled.coordinate_system = common_pb2.COORDINATE_SYSTEM_WGS84
    assert decision(await claim(wallet, id_number(), location=mislabelled)) == "ISSUED"


async def test_redeeming_reserves_then_capture_uses_the_qualification(
    wallet: QualificationClient, client: AuthorizationClient
) -> None:
    person = id_number()
    code = await issued(wallet, person)
    approved = await pay(client, person, code)
    assert outcome(approved) == "APPROVED"
    assert approved.subsidy_fen == 500
    held = await wallet.get(code)
    assert held.state == qpb.QUALIFICATION_STATE_RESERVED
    assert held.authorization_id == approved.authorization_id
    assert (await client.get_authorization(approved.authorization_id)).redemption_code == code
    await client.capture(approved.authorization_id)
    assert (await wallet.get(code)).state == qpb.QUALIFICATION_STATE_REDEEMED
    # Used: the consumer cannot claim again in the category, nor pay with it again.
    assert decision(await claim(wallet, person)) == "PERSON_LIMIT_REACHED"
    with pytest.raises(InvalidState) as refused:
        await wallet.cancel(code)
    assert refused.value.metadata["state"] == "QUALIFICATION_STATE_REDEEMED"


async def test_the_code_is_checked_with_the_payment(wallet: QualificationClient, client: AuthorizationClient) -> None:
    person, stranger = id_number(), id_number()
    code = await issued(wallet, person)
    assert outcome(await pay(client, person, "")) == "QUALIFICATION_REQUIRED"
    # Someone else's code, a code of another campaign, a code that does not exist: absent.
    assert outcome(await pay(client, stranger, code)) == "QUALIFICATION_NOT_FOUND"
    other_campaign = await issued(wallet, person, campaign="c-qual-used")
    assert outcome(await pay(client, person, other_campaign)) == "QUALIFICATION_NOT_FOUND"
    assert outcome(await pay(client, person, "0" * 16)) == "QUALIFICATION_NOT_FOUND"
    # A campaign that issues no qualifications refuses a code rather than ignoring it.
    no_qualifications = await client.authorize(
        campaign_id="c-voucher",
        consumer_key=consumer_key_of(person),
        lines=[Line("1", GOODS, 3_000)],
        redemption_code=code,
    )
    assert outcome(no_qualifications) == "QUALIFICATION_NOT_FOUND"
    # The line's category must be the qualification's.
    fridge = await client.authorize(
        campaign_id="c-qual",
        consumer_key=consumer_key_of(person),
        lines=[Line("1", FRIDGE, 300_000, serial())],
        redemption_code=code,
    )
    assert outcome(fridge) == "QUALIFICATION_CATEGORY_MISMATCH"
    assert fridge.declined_line_id == "1"
    # One qualification per payment: while one payment holds it, another cannot use it.
    first = await pay(client, person, code)
    assert outcome(first) == "APPROVED"
    await client.void(first.authorization_id)
    assert (await wallet.get(code)).state == qpb.QUALIFICATION_STATE_ISSUED  # back after the void
    second = await pay(client, person, code)
    assert outcome(second) == "APPROVED"
    assert (await wallet.get(code)).authorization_id == second.authorization_id


async def test_cancel_returns_the_quota_and_the_persons_claim(
    wallet: QualificationClient, bank: QualificationClient, redis: Redis, environment: Environment
) -> None:
    person = id_number()
    code = await issued(wallet, person)
    quota = environment.keys.qualification_quota("c-qual")
    claimed = int(await redis.hget(quota, "general:claimed") or 0)
    with pytest.raises(NotFound):
        await bank.cancel(code)  # not the bank's
    request_id = str(uuid.uuid4())
    cancelled = await wallet.cancel(code, request_id=request_id)
    assert cancelled.qualification.state == qpb.QUALIFICATION_STATE_CANCELLED
    assert int(await redis.hget(quota, "general:claimed") or 0) == claimed - 1
    again = await wallet.cancel(code, request_id=request_id)
    assert again.replayed and again.qualification == cancelled.qualification
    assert (await wallet.cancel(code)).qualification.state == qpb.QUALIFICATION_STATE_CANCELLED  # as is
    assert int(await redis.hget(quota, "general:claimed") or 0) == claimed - 1  # returned once
    assert decision(await claim(wallet, person)) == "ISSUED"


async def test_a_retried_claim_returns_the_first_answer_and_issues_once(
    wallet: QualificationClient, redis: Redis, environment: Environment
) -> None:
    person = id_number()
    request = qpb.ClaimQualificationRequest(
        request_id=str(uuid.uuid4()),
        campaign_id="c-qual",
        category="general",
        consumer=qpb.ConsumerIdentity(id_number=person),
        device_location=qpb.DeviceLocation(location=wgs84(XIAOSHAN_GOVERNMENT)),
    )
    request.device_location.fix_time.FromMilliseconds(now_ms())
    first = await wallet.send_claim(request)
    second = await wallet.send_claim(request)
    assert decision(first) == "ISSUED" and second.replayed
    assert second.qualification == first.qualification
    assert await redis.zcard(environment.keys.consumer_qualifications(consumer_key_of(person))) == 1
    changed = qpb.ClaimQualificationRequest()
    changed.CopyFrom(request)
    changed.device_location.location.accuracy_m = 30.0
    with pytest.raises(IdempotencyConflict):
        await wallet.send_claim(changed)
    # The stored record never holds the ID number, in any form the tests can search for.
    for key in [key async for key in redis.scan_iter(match=environment.keys.pattern(), count=10_000)]:
        if await redis.type(key) == b"string":
            assert person.encode() not in (await redis.get(key) or b"")


async def test_terminals_and_operators_cannot_claim(environment: Environment, gateway: Application) -> None:
    for caller_id in ("t-main-01", "op-auditor"):
        async with QualificationClient(
            f"127.0.0.1:{gateway.port}",
            caller_id,
            environment.credentials[caller_id],
            retry=RetryPolicy(max_attempts=1),
        ) as impostor:
            with pytest.raises(PermissionDenied):
                await claim(impostor, id_number())


def hostile_claims() -> list[tuple[str, dict[str, Any], str]]:
    """(name, changes to a valid claim, the field the error must name)."""
    bad_check = id_number()
    bad_check = bad_check[:17] + ("0" if bad_check[17] != "0" else "1")
    return [
        ("wrong check character", {"id_number": bad_check}, "consumer.id_number"),
        ("ID number too short", {"id_number": "33010919900101123"}, "consumer.id_number"),
        ("impossible birth date", {"id_number": "330109199002301234"}, "consumer.id_number"),
        ("ID number missing", {"id_number": ""}, "consumer.id_number"),
        ("oversized ID number", {"id_number": "3" * 5000}, "consumer.id_number"),
        ("phone not a mobile number", {"phone": "12345"}, "consumer.phone_number"),
        ("oversized phone", {"phone": "1" * 5000}, "consumer.phone_number"),
        ("latitude beyond the pole", {"latitude": 91.0}, "device_location.location.latitude"),
        ("longitude NaN", {"longitude": float("nan")}, "device_location.location.longitude"),
        ("longitude infinite", {"longitude": float("inf")}, "device_location.location.longitude"),
        ("no coordinate system", {"system": 0}, "device_location.location.coordinate_system"),
        ("unknown coordinate system", {"system": 7}, "device_location.location.coordinate_system"),
        ("accuracy zero", {"accuracy_m": 0.0}, "device_location.location.accuracy_m"),
        ("accuracy negative", {"accuracy_m": -5.0}, "device_location.location.accuracy_m"),
        ("accuracy absurd", {"accuracy_m": 1e12}, "device_location.location.accuracy_m"),
        ("fix from the future", {"fix_time_ms": now_ms() + 3_600_000}, "device_location.fix_time"),
        ("fix time missing", {"fix_time_ms": None}, "device_location.fix_time"),
        ("location missing", {"location": None}, "device_location.location"),
        ("unknown category", {"category": "spaceship"}, "category"),
        ("malformed category", {"category": "Fridge!"}, "category"),
        ("oversized category", {"category": "a" * 5000}, "category"),
        ("malformed campaign", {"campaign": "c qual"}, "campaign_id"),
        ("oversized campaign", {"campaign": "c" * 65}, "campaign_id"),
        ("request id not a UUID", {"request_id": "retry-1"}, "request_id"),
    ]


@pytest.mark.parametrize(("name", "changes", "field"), hostile_claims(), ids=[case[0] for case in hostile_claims()])
async def test_malformed_claims_name_the_field_and_change_nothing(
    wallet: QualificationClient,
    redis: Redis,
    environment: Environment,
    name: str,
    changes: dict[str, Any],
    field: str,
) -> None:
    location = common_pb2.Location(
        latitude=changes.get("latitude", XIAOSHAN_GOVERNMENT[0]),
        longitude=changes.get("longitude", XIAOSHAN_GOVERNMENT[1]),
        coordinate_system=changes.get("system", common_pb2.COORDINATE_SYSTEM_WGS84),  # type: ignore[arg-type]
        accuracy_m=changes.get("accuracy_m", 20.0),
    )
    request = qpb.ClaimQualificationRequest(
        request_id=changes.get("request_id", str(uuid.uuid4())),
        campaign_id=changes.get("campaign", "c-qual"),
        category=changes.get("category", "general"),
        consumer=qpb.ConsumerIdentity(
            id_number=changes.get("id_number", id_number()), phone_number=changes.get("phone", "")
        ),
        device_location=qpb.DeviceLocation(location=None if "location" in changes else location),
    )
    fix_time_ms = changes.get("fix_time_ms", now_ms())
    if fix_time_ms is not None:
        request.device_location.fix_time.FromMilliseconds(fix_time_ms)
    before = await snapshot(redis, environment.keys)
    with pytest.raises(InvalidArgument) as refused:
        await wallet.send_claim(request)
    assert refused.value.reason == "INVALID_FIELD"
    assert refused.value.metadata["field"] == field, name
    after = await snapshot(redis, environment.keys)
    # The signed call's nonce is recorded (a replay must stay refused); nothing else changes.
    nonce = environment.keys.nonce("p-wallet-01", "").encode()
    assert after.without(nonce) == before.without(nonce)


async def test_no_id_or_phone_number_reaches_the_logs(
    wallet: QualificationClient, client: AuthorizationClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Every log record of claims, declines, refusals and redemptions, at DEBUG, rendered with
    its extra fields: no ID number, phone number or consumer key anywhere."""
    people = [id_number() for _ in range(5)]
    phone = "139" + f"{secrets.randbelow(10**8):08d}"
    with caplog.at_level(logging.DEBUG):
        for person in people:
            response = await claim(wallet, person, phone=phone)
            await pay(client, person, response.qualification.redemption_code)
            await claim(wallet, person, phone=phone)  # declined: limit
            await claim(wallet, person, location=wgs84(WEST_LAKE))
            with pytest.raises(InvalidArgument):
                await claim(wallet, person[:17] + "Y")
    rendered = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    assert sum(record.getMessage() == "claim" for record in caplog.records) >= 3 * len(people)  # logged at all
    for person in people:
        assert person not in rendered
        assert person[:17] not in rendered
        assert consumer_key_of(person) not in rendered
    assert phone not in rendered


async def test_refund_restoration_follows_the_campaign_rule(services: Services) -> None:
    """RESTORE_ON_FULL_REFUND: a refund within validity gives the qualification back with its
    original expiry, still out of the pool, and once it then expires its quota returns once.
    COUNT_AS_USED: a refund counts as used. A late refund (after expiry) counts as used. (A
    payment that redeems a qualification has one line, so its refund is always whole.)"""
    async with (
        isolated_environment(services) as env,
        running_gateway(env.config(sweep_interval_ms=50)) as gateway,
    ):
        await load_document(env, {"campaigns": [qualification_campaign("c-late", "RESTORE_ON_FULL_REFUND", 2, 1)]})
        target = f"127.0.0.1:{gateway.port}"
        one_attempt = RetryPolicy(max_attempts=1)
        redis = Redis.from_url(env.redis_url)
        async with (
            QualificationClient(target, "p-wallet-01", env.credentials["p-wallet-01"], retry=one_attempt) as wallet,
            AuthorizationClient(target, "t-main-01", env.credentials["t-main-01"], retry=one_attempt) as till,
        ):

            async def bought(campaign: str) -> tuple[str, str, str]:
                person = id_number()
                code = await issued(wallet, person, campaign)
                approved = await pay(till, person, code, campaign)
                assert outcome(approved) == "APPROVED"
                await till.capture(approved.authorization_id)
                return person, code, approved.authorization_id

            async def counts(campaign: str, person: str) -> tuple[int, int]:
                claimed = await redis.hget(env.keys.qualification_quota(campaign), "general:claimed")
                held = await redis.hget(env.keys.qualification_holder(campaign, consumer_key_of(person)), "general")
                return int(claimed or 0), int(held or 0)

            # Full refund within validity, restoring rule: back to ISSUED, same expiry, usable.
            person, code, authorization = await bought("c-qual")
            expires = (await wallet.get(code)).expires_at
            before = await counts("c-qual", person)
            await till.refund(authorization)
            restored = await wallet.get(code)
            assert restored.state == qpb.QUALIFICATION_STATE_ISSUED
            assert restored.expires_at == expires and restored.authorization_id == ""
            assert await counts("c-qual", person) == before  # still the person's, still out of the pool
            assert outcome(await pay(till, person, code)) == "APPROVED"
            # The same refund under COUNT_AS_USED: used, and the person keeps it.
            person, code, authorization = await bought("c-qual-used")
            await till.refund(authorization)
            assert (await wallet.get(code)).state == qpb.QUALIFICATION_STATE_REDEEMED
            assert (await counts("c-qual-used", person))[1] == 1
            assert decision(await claim(wallet, person, campaign="c-qual-used")) == "PERSON_LIMIT_REACHED"
            # Restored, then left to expire (validity 2 s): the quota comes back exactly once.
            person, code, authorization = await bought("c-late")
            await till.refund(authorization)
            assert (await wallet.get(code)).state == qpb.QUALIFICATION_STATE_ISSUED
            await asyncio.sleep(max(0.0, (await wallet.get(code)).expires_at.ToMilliseconds() - now_ms()) / 1000 + 0.5)
            assert (await wallet.get(code)).state == qpb.QUALIFICATION_STATE_EXPIRED
            assert await counts("c-late", person) == (0, 0)
            # A late refund: captured, then refunded after the validity passed: used.
            person, code, authorization = await bought("c-late")
            await asyncio.sleep(max(0.0, (await wallet.get(code)).expires_at.ToMilliseconds() - now_ms()) / 1000 + 0.2)
            await till.refund(authorization)
            assert (await wallet.get(code)).state == qpb.QUALIFICATION_STATE_REDEEMED
            assert await counts("c-late", person) == (1, 1)
        await redis.aclose()


async def test_a_held_qualification_comes_back_when_its_hold_expires(services: Services) -> None:
    """Holds of 1 s, swept every 50 ms: a payment never captured releases its qualification to
    ISSUED while the qualification is valid, and to EXPIRED (quota back, once) when its own
    validity ended meanwhile; a capture after the hold expired is refused."""
    async with (
        isolated_environment(services) as env,
        running_gateway(env.config(hold_ttl_s=1, sweep_interval_ms=50)) as gateway,
    ):
        await load_document(env, {"campaigns": [qualification_campaign("c-brief", "COUNT_AS_USED", 1, 1)]})
        target = f"127.0.0.1:{gateway.port}"
        one_attempt = RetryPolicy(max_attempts=1)
        redis = Redis.from_url(env.redis_url)
        async with (
            QualificationClient(target, "p-wallet-01", env.credentials["p-wallet-01"], retry=one_attempt) as wallet,
            AuthorizationClient(target, "t-main-01", env.credentials["t-main-01"], retry=one_attempt) as till,
        ):
            long_lived, brief = id_number(), id_number()
            long_code = await issued(wallet, long_lived)  # c-qual: valid for an hour
            brief_code = await issued(wallet, brief, "c-brief")  # valid for a second
            long_hold = await pay(till, long_lived, long_code)
            brief_hold = await pay(till, brief, brief_code, "c-brief")
            assert outcome(long_hold) == outcome(brief_hold) == "APPROVED"
            await asyncio.sleep(1.6)
            assert (await wallet.get(long_code)).state == qpb.QUALIFICATION_STATE_ISSUED
            assert (await wallet.get(brief_code)).state == qpb.QUALIFICATION_STATE_EXPIRED
            with pytest.raises(InvalidState):
                await till.capture(long_hold.authorization_id)
            assert await redis.hget(env.keys.qualification_quota("c-brief"), "general:claimed") == b"0"
            assert await redis.hget(env.keys.qualification_holder("c-brief", consumer_key_of(brief)), "general") == b"0"
            assert outcome(await pay(till, long_lived, long_code)) == "APPROVED"  # usable again
        await redis.aclose()


async def test_a_payment_that_redeems_a_qualification_has_one_line(
    wallet: QualificationClient, client: AuthorizationClient
) -> None:
    person = id_number()
    code = await issued(wallet, person)
    with pytest.raises(InvalidArgument) as refused:
        await pay(client, person, code, lines=2)
    assert refused.value.metadata["field"] == "lines"
    assert (await wallet.get(code)).state == qpb.QUALIFICATION_STATE_ISSUED


def qualification_campaign(
    campaign_id: str, refund_policy: str, validity_s: int, per_person_limit: int, quota: int = 100_000, **extra: Any
) -> dict[str, Any]:
    return {
        "id": campaign_id,
        "starts_at": "2020-01-01T00:00:00+00:00",
        "ends_at": "2099-01-01T00:00:00+00:00",
        "qualification_validity_s": validity_s,
        "refund_policy": refund_policy,
        "rules": [
            {
                "category": "general",
                "kind": "FIXED",
                "threshold_fen": 2000,
                "off_fen": 500,
                "per_person_limit": per_person_limit,
                "budget_fen": 10_000_000_000,
                "qualification_quota": quota,
                **extra,
            }
        ],
    }


async def test_tranches_open_at_their_time_first_come_first_served(services: Services) -> None:
    """Two tranches of 3: before the first opens every claim is NOT_YET_RELEASED; once it opens
    exactly 3 are issued and the rest find the quota exhausted until the second opens."""
    async with isolated_environment(services) as env, running_gateway(env.config()) as gateway:
        opens = time.time() + 2.0
        tranches = [
            {"release_at": datetime.fromtimestamp(opens, UTC).isoformat(), "count": 3},
            {"release_at": datetime.fromtimestamp(opens + 2.0, UTC).isoformat(), "count": 3},
        ]
        await load_document(
            env,
            {
                "campaigns": [
                    qualification_campaign(
                        "c-tranche", "COUNT_AS_USED", 3600, 1, quota=6, qualification_tranches=tranches
                    )
                ]
            },
        )
        async with QualificationClient(
            f"127.0.0.1:{gateway.port}",
            "p-wallet-01",
            env.credentials["p-wallet-01"],
            retry=RetryPolicy(max_attempts=1),
        ) as wallet:

            async def crowd(size: int) -> Counter[str]:
                answers = await asyncio.gather(*(claim(wallet, id_number(), campaign="c-tranche") for _ in range(size)))
                return Counter(decision(answer) for answer in answers)

            assert await crowd(5) == {"NOT_YET_RELEASED": 5}
            await asyncio.sleep(max(0.0, opens - time.time()) + 0.1)
            assert await crowd(10) == {"ISSUED": 3, "QUOTA_EXHAUSTED": 7}
            await asyncio.sleep(max(0.0, opens + 2.0 - time.time()) + 0.1)
            assert await crowd(10) == {"ISSUED": 3, "QUOTA_EXHAUSTED": 7}
            assert await crowd(2) == {"QUOTA_EXHAUSTED": 2}
        async with SignedClient(
            f"127.0.0.1:{gateway.port}", "op-auditor", env.credentials["op-auditor"], retry=RetryPolicy(max_attempts=1)
        ) as operator:
            status = await operator._call(
                "/subsidy.v1.CampaignService/GetBudgetStatus",
                cpb.GetBudgetStatusRequest(campaign_id="c-tranche"),
                cpb.GetBudgetStatusResponse,
            )
        general = status.categories[0]
        assert (general.qualification_quota, general.qualifications_released, general.qualifications_claimed) == (
            6,
            6,
            6,
        )


async def test_an_unredeemed_qualification_expires_and_its_quota_returns(services: Services) -> None:
    """Validity 1 s, quota 1: once the sweeper expires the first, someone else can claim it,
    and the first person holds none (whether they may claim again is reclaim_after_expiry's:
    tests/integration/test_redemption_rules.py)."""
    async with (
        isolated_environment(services) as env,
        running_gateway(env.config(sweep_interval_ms=50)) as gateway,
    ):
        await load_document(env, {"campaigns": [qualification_campaign("c-short", "COUNT_AS_USED", 1, 1, quota=1)]})
        async with QualificationClient(
            f"127.0.0.1:{gateway.port}",
            "p-wallet-01",
            env.credentials["p-wallet-01"],
            retry=RetryPolicy(max_attempts=1),
        ) as wallet:
            first, second = id_number(), id_number()
            code = await issued(wallet, first, "c-short")
            assert decision(await claim(wallet, second, campaign="c-short")) == "QUOTA_EXHAUSTED"
            for _ in range(100):
                if (await wallet.get(code)).state == qpb.QUALIFICATION_STATE_EXPIRED:
                    break
                await asyncio.sleep(0.05)
            assert (await wallet.get(code)).state == qpb.QUALIFICATION_STATE_EXPIRED
            await issued(wallet, second, "c-short")
            redis = Redis.from_url(env.redis_url)
            try:
                assert await redis.hget(env.keys.qualification_quota("c-short"), "general:claimed") == b"1"
                assert (
                    await redis.hget(env.keys.qualification_holder("c-short", consumer_key_of(first)), "general")
                    == b"0"
                )
            finally:
                await redis.aclose()


@pytest.mark.parametrize("code", ["SHORT", "0" * 17, "OOOOOOOOOOOOOOOO", "abcdefghjkmnpqri", "0000-0000-0000-00"])
async def test_malformed_redemption_codes_are_refused_naming_the_field(
    wallet: QualificationClient, client: AuthorizationClient, code: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await client.authorize(
            campaign_id="c-qual",
            consumer_key=consumer_key_of(id_number()),
            lines=[Line("1", GOODS, 3_000)],
            redemption_code=code,
        )
    assert refused.value.metadata["field"] == "redemption_code"
    with pytest.raises(InvalidArgument) as refused:
        await wallet.get(code)
    assert refused.value.metadata["field"] == "redemption_code"
    with pytest.raises(InvalidArgument) as refused:
        await wallet.cancel(code)
    assert refused.value.metadata["field"] == "redemption_code"


async def test_a_suspended_partner_app_is_unauthenticated(environment: Environment, gateway: Application) -> None:
    async with QualificationClient(
        f"127.0.0.1:{gateway.port}",
        "p-wallet-gone",
        environment.credentials["p-wallet-gone"],
        retry=RetryPolicy(max_attempts=1),
    ) as withdrawn:
        with pytest.raises(Unauthenticated):
            await claim(withdrawn, id_number())


async def test_another_provider_sees_a_redeemed_consumer_as_used(
    wallet: QualificationClient, client: AuthorizationClient, environment: Environment, gateway: Application
) -> None:
    """Through the typed ExchangeClient: a consumer who paid with a voucher is reported as having
    used the category; a stranger and an unknown device are not."""
    person = id_number()
    paid = await pay(client, person, await issued(wallet, person))
    await client.capture(paid.authorization_id)
    async with ExchangeClient(
        f"127.0.0.1:{gateway.port}",
        "p-peer-01",
        environment.credentials["p-peer-01"],
        retry=RetryPolicy(max_attempts=1),
    ) as peer:
        assert await peer.check_consumer(consumer_key_of(person), "general")
        assert not await peer.check_consumer(consumer_key_of(id_number()), "general")
        assert not await peer.check_serial(GOODS, "SN-NEVER-SOLD")
