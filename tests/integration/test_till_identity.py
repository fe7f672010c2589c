"""The till never holds the programme key (issue 13, item 8).

A till identifies the consumer by what it really has: a redemption code alone (the consumer is
the qualification's owner, resolved by authorize.lua in the same single script call) or an ID
number read from an ID card or typed (keyed at the edge exactly as ClaimQualification keys it,
never stored or logged); partner apps that hold the programme key keep sending consumer_key.
Every path reaches the same consumer, so the per-person limit counts across them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy
from subsidy_client.errors import InvalidArgument
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from server.processes.app import Application
from tests.conftest import Environment, consumer_key_of, id_number, snapshot

GOODS = "6970000000086"  # category general (c-qual: 500 off 2,000, one unit per person)
FRIDGE = "6970000000024"  # category fridge, grade 2, no serial (c-main: one unit per person)
XIAOSHAN = common_pb2.Location(
    latitude=30.18, longitude=120.26, coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84, accuracy_m=20
)


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


async def code_of(wallet: QualificationClient, person: str) -> str:
    response = await wallet.claim(
        campaign_id="c-qual",
        category="general",
        id_number=person,
        location=XIAOSHAN,
        fix_time_ms=int(time.time() * 1000),
    )
    assert response.decision == qpb.CLAIM_DECISION_ISSUED, response
    return response.qualification.redemption_code


async def pay(
    till: AuthorizationClient,
    *,
    campaign: str = "c-qual",
    gtin: str = GOODS,
    code: str = "",
    key: str = "",
    number: str = "",
    request_id: str = "",
) -> apb.AuthorizeResponse:
    request = apb.AuthorizeRequest(
        request_id=request_id or str(uuid.uuid4()),
        campaign_id=campaign,
        consumer_key=key,
        consumer_id_number=number,
        channel=apb.CHANNEL_POS,
        redemption_code=code,
        lines=[apb.LineItem(line_id="1", gtin=gtin, unit_price_fen=3_000)],
    )
    return await till.send_authorize(request)


def outcome(response: apb.AuthorizeResponse) -> str:
    if response.decision == apb.DECISION_APPROVED:
        return "APPROVED"
    return apb.DeclineReason.Name(response.decline_reason).removeprefix("DECLINE_REASON_")


async def usage(redis: Redis, environment: Environment, campaign: str, person: str) -> dict[Any, Any]:
    return await redis.hgetall(environment.keys.usage(campaign, consumer_key_of(person)))


async def test_a_redemption_code_alone_pays_as_the_qualifications_owner(
    environment: Environment, redis: Redis, client: AuthorizationClient, wallet: QualificationClient
) -> None:
    person = id_number()
    code = await code_of(wallet, person)
    # Through the Python client as a till calls it: no consumer identity but the code.
    response = await client.authorize(campaign_id="c-qual", lines=[Line("1", GOODS, 3_000)], redemption_code=code)
    assert outcome(response) == "APPROVED"
    assert response.subsidy_fen == 500
    stored = await redis.hmget(environment.keys.authorization(response.authorization_id), ["consumer", "qualification"])
    assert stored == [consumer_key_of(person).encode(), code.encode()]
    assert await usage(redis, environment, "c-qual", person) == {b"general": b"1"}
    # The declared prefix the script completed was never written to itself.
    assert not await redis.exists(environment.keys.usage("c-qual", ""), environment.keys.external_consumer(""))
    captured = await client.capture(response.authorization_id)
    assert captured.authorization.state == apb.AUTHORIZATION_STATE_CAPTURED


async def test_the_per_person_limit_counts_across_consumer_key_and_code_only_payments(
    environment: Environment, redis: Redis, client: AuthorizationClient, wallet: QualificationClient
) -> None:
    """c-qual allows one unit per person. The reserved qualification would be
    QUALIFICATION_NOT_USABLE, but CONSUMER_LIMIT_REACHED ranks first: seeing it proves the
    second payment read the counter the first one wrote, whichever identity each carried."""
    first, second = id_number(), id_number()
    first_code, second_code = await code_of(wallet, first), await code_of(wallet, second)
    assert outcome(await pay(client, code=first_code)) == "APPROVED"
    assert outcome(await pay(client, code=first_code, key=consumer_key_of(first))) == "CONSUMER_LIMIT_REACHED"
    assert outcome(await pay(client, code=second_code, key=consumer_key_of(second))) == "APPROVED"
    assert outcome(await pay(client, code=second_code)) == "CONSUMER_LIMIT_REACHED"
    for person in (first, second):
        assert await usage(redis, environment, "c-qual", person) == {b"general": b"1"}
    # Someone else's code does not pay for a consumer key that does not own it.
    third = id_number()
    assert outcome(await pay(client, code=await code_of(wallet, third), key=consumer_key_of(first))) == (
        "CONSUMER_LIMIT_REACHED"
    )
    fourth = id_number()
    assert outcome(await pay(client, code=await code_of(wallet, fourth), key=consumer_key_of(id_number()))) == (
        "QUALIFICATION_NOT_FOUND"
    )


async def test_an_unknown_code_alone_is_qualification_not_found(
    client: AuthorizationClient, wallet: QualificationClient
) -> None:
    assert outcome(await pay(client, code="0123456789ABCDEF")) == "QUALIFICATION_NOT_FOUND"
    # A code of another campaign has no owner in this one.
    code = await code_of(wallet, id_number())
    assert outcome(await pay(client, campaign="c-main", gtin=FRIDGE, code=code)) == "QUALIFICATION_NOT_FOUND"


async def test_an_id_number_pays_exactly_as_its_consumer_key(
    environment: Environment, redis: Redis, client: AuthorizationClient, wallet: QualificationClient
) -> None:
    by_key, by_number = id_number(), id_number()
    keyed = await pay(client, campaign="c-main", gtin=FRIDGE, key=consumer_key_of(by_key))
    # As typed at a till: a lower-case x and spaces are normalised as at claim.
    typed = " ".join([by_number[:6], by_number[6:14], by_number[14:].lower()])
    numbered = await pay(client, campaign="c-main", gtin=FRIDGE, number=typed)
    assert (
        (outcome(keyed), keyed.subsidy_fen, keyed.payable_fen)
        == (
            outcome(numbered),
            numbered.subsidy_fen,
            numbered.payable_fen,
        )
        == ("APPROVED", 450, 2_550)
    )
    assert await usage(redis, environment, "c-main", by_key) == await usage(redis, environment, "c-main", by_number)
    assert await usage(redis, environment, "c-main", by_number) == {b"fridge": b"1"}
    stored = await redis.hget(environment.keys.authorization(numbered.authorization_id), "consumer")
    assert stored == consumer_key_of(by_number).encode()
    # The same person by either identity is one person: the second unit is refused both ways.
    assert outcome(await pay(client, campaign="c-main", gtin=FRIDGE, key=consumer_key_of(by_number))) == (
        "CONSUMER_LIMIT_REACHED"
    )
    assert outcome(await pay(client, campaign="c-main", gtin=FRIDGE, number=by_key)) == "CONSUMER_LIMIT_REACHED"
    # With a redemption code: the ID number must be the code's owner, like a consumer key.
    holder = id_number()
    code = await code_of(wallet, holder)
    assert outcome(await pay(client, code=code, number=id_number())) == "QUALIFICATION_NOT_FOUND"
    assert outcome(await pay(client, code=code, number=holder)) == "APPROVED"


async def test_a_retry_by_id_number_replays_and_the_hash_keeps_no_number(
    environment: Environment, redis: Redis, client: AuthorizationClient
) -> None:
    person, request_id = id_number(), str(uuid.uuid4())
    first = await pay(client, campaign="c-main", gtin=FRIDGE, number=person, request_id=request_id)
    again = await pay(client, campaign="c-main", gtin=FRIDGE, number=person, request_id=request_id)
    assert (outcome(first), again.replayed, again.authorization_id) == ("APPROVED", True, first.authorization_id)
    # The same request sent by consumer key is the same payload: it replays too.
    keyed = await pay(client, campaign="c-main", gtin=FRIDGE, key=consumer_key_of(person), request_id=request_id)
    assert (keyed.replayed, keyed.authorization_id) == (True, first.authorization_id)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"key": "ab" * 32, "number": "330109198403010017"}, "consumer_id_number"),
        ({"number": "330109198403010018"}, "consumer_id_number"),  # wrong check character
        ({"number": "33010919840301001"}, "consumer_id_number"),
        ({}, "consumer_key"),  # no identity and no code
    ],
)
async def test_bad_consumer_identities_are_refused_naming_the_field(
    client: AuthorizationClient, fields: dict[str, str], field: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await pay(client, campaign="c-main", gtin=FRIDGE, **fields)
    assert refused.value.metadata["field"] == field


async def test_an_id_number_is_never_stored_or_logged(
    environment: Environment,
    redis: Redis,
    client: AuthorizationClient,
    wallet: QualificationClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    person, holder = id_number(), id_number()
    code = await code_of(wallet, holder)
    request_id = str(uuid.uuid4())
    answers = [
        await pay(client, campaign="c-main", gtin=FRIDGE, number=person, request_id=request_id),
        await pay(client, campaign="c-main", gtin=FRIDGE, number=person, request_id=request_id),
        await pay(client, campaign="c-main", gtin=FRIDGE, number=person),
        await pay(client, code=code, number=holder.lower()),
    ]
    assert [outcome(answer) for answer in answers] == ["APPROVED", "APPROVED", "CONSUMER_LIMIT_REACHED", "APPROVED"]
    assert any(record.getMessage() == "authorize" for record in caplog.records)  # the debug log ran
    logged = "\n".join(repr(record.__dict__) for record in caplog.records)
    at_rest = [repr(await snapshot(redis, environment.keys))]
    connection = await asyncpg.connect(environment.pg_dsn)
    try:
        for table in await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"):
            at_rest += [repr(dict(row)) for row in await connection.fetch(f'SELECT * FROM "{table["tablename"]}"')]
    finally:
        await connection.close()
    everything = (logged + "\n".join(at_rest)).upper()
    for number in (person, holder):
        assert number not in everything
        assert number[6:14] + number[14:17] not in everything  # not even the birth date and sequence
    # What is kept is the keyed form.
    assert consumer_key_of(person) in "\n".join(at_rest)


async def test_every_till_identity_is_still_one_evalsha(
    environment: Environment, client: AuthorizationClient, wallet: QualificationClient
) -> None:
    """MONITOR, as tests/integration/test_hot_path_cost.py watches: a code-only, an ID-number
    and a consumer-key Authorize (approved and declined) each send exactly one EVALSHA from the
    gateway, and the owner's usage counter is read inside the script."""
    name = f"gateway-{environment.prefix}"
    holder, person = id_number(), id_number()
    code = await code_of(wallet, holder)
    sentinel = "end-of-watch-" + uuid.uuid4().hex
    probe = Redis.from_url(environment.redis_url, single_connection_client=True)
    watcher_client = Redis.from_url(environment.redis_url)
    ready = asyncio.Event()
    watcher = asyncio.create_task(_watch(watcher_client, sentinel, ready))
    await ready.wait()
    outcomes = [
        outcome(await pay(client, code=code)),
        outcome(await pay(client, code=code)),
        outcome(await pay(client, campaign="c-main", gtin=FRIDGE, number=person)),
        outcome(await pay(client, campaign="c-main", gtin=FRIDGE, key=consumer_key_of(person))),
        outcome(await pay(client, code="0123456789ABCDEF")),
    ]
    addresses = {entry["addr"] for entry in await probe.client_list() if entry.get("name") == name}
    await probe.echo(sentinel)
    commands = await asyncio.wait_for(watcher, timeout=10)
    await watcher_client.aclose()
    await probe.aclose()
    assert outcomes == [
        "APPROVED",
        "CONSUMER_LIMIT_REACHED",
        "APPROVED",
        "CONSUMER_LIMIT_REACHED",
        "QUALIFICATION_NOT_FOUND",
    ]
    from_gateway = [
        entry["command"].split()[0].upper()
        for entry in commands
        if entry["client_type"] != "lua" and f"{entry['client_address']}:{entry['client_port']}" in addresses
    ]
    assert from_gateway == ["EVALSHA"] * 5
    owner_usage = environment.keys.usage("c-qual", consumer_key_of(holder))
    assert any(entry["client_type"] == "lua" and owner_usage in entry["command"] for entry in commands)


async def _watch(redis: Redis, sentinel: str, ready: asyncio.Event) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with redis.monitor() as monitor:
        ready.set()
        while True:
            command = await monitor.next_command()
            if sentinel in command["command"]:
                return seen
            seen.append(command)
