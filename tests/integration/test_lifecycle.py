"""Capture, void, refund, expiry and idempotency, checked against the Redis counters."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line
from subsidy_client.errors import IdempotencyConflict, InvalidArgument, InvalidState, NotFound, PermissionDenied
from subsidy_client.v1 import authorization_pb2 as pb

from tests.conftest import Environment, consumer_key, load_document, running_gateway, serial

FRIDGE_G1 = "6970000000017"
WASHER = "6970000000093"
AIR_CONDITIONER = "6970000000116"
BUDGET_FEN = 10_000_000


async def fresh_campaign(environment: Environment) -> str:
    """A campaign of its own, so the test can check its counters exactly."""
    campaign_id = "c-life-" + secrets.token_hex(4)
    rule = {"kind": "PERCENT", "rates_bp": {"1": 2000}, "cap_fen": 200_000, "budget_fen": BUDGET_FEN}
    await load_document(
        environment,
        {
            "campaigns": [
                {
                    "id": campaign_id,
                    "starts_at": "2020-01-01T00:00:00+00:00",
                    "ends_at": "2099-01-01T00:00:00+00:00",
                    "rules": [
                        {**rule, "category": "fridge", "per_person_limit": 1},
                        {**rule, "category": "washer", "per_person_limit": 1},
                        {**rule, "category": "air_conditioner", "per_person_limit": 3},
                    ],
                }
            ]
        },
    )
    return campaign_id


async def counters(redis: Redis, environment: Environment, campaign: str, consumer: str) -> dict[str, int]:
    keys = environment.keys
    budget = await redis.hgetall(keys.budget(campaign))
    usage = await redis.hgetall(keys.usage(campaign, consumer))
    result = {f"budget.{key.decode()}": int(value) for key, value in budget.items() if not key.endswith(b":total")}
    result.update({f"usage.{key.decode()}": int(value) for key, value in usage.items()})
    return {key: value for key, value in result.items() if value != 0}


async def ledger_events(redis: Redis, environment: Environment, authorization_id: str) -> list[dict[str, Any]]:
    entries = await redis.xrange(environment.keys.ledger)
    events = [orjson.loads(fields[b"e"]) for _, fields in entries]
    return [event for event in events if event["authorization_id"] == authorization_id]


async def test_capture_moves_reserved_to_spent(
    environment: Environment, redis: Redis, client: AuthorizationClient
) -> None:
    """Authorize reserves; capture moves the reservation to spent; quota and serial stay used."""
    campaign, person, device = await fresh_campaign(environment), consumer_key(), serial()
    approved = await client.authorize(
        campaign_id=campaign, consumer_key=person, lines=[Line("1", FRIDGE_G1, 300_000, device)]
    )
    assert await counters(redis, environment, campaign, person) == {"budget.fridge:reserved": 60_000, "usage.fridge": 1}
    captured = await client.capture(approved.authorization_id)
    assert captured.authorization.state == pb.AUTHORIZATION_STATE_CAPTURED
    assert await counters(redis, environment, campaign, person) == {"budget.fridge:spent": 60_000, "usage.fridge": 1}
    assert await redis.get(environment.keys.serial(device)) == approved.authorization_id.encode()
    again = await client.capture(approved.authorization_id)  # a new request id: "exists" is "ok"
    assert again.authorization.state == pb.AUTHORIZATION_STATE_CAPTURED
    assert await counters(redis, environment, campaign, person) == {"budget.fridge:spent": 60_000, "usage.fridge": 1}
    types = [event["type"] for event in await ledger_events(redis, environment, approved.authorization_id)]
    assert types == ["AUTHORIZED", "CAPTURED"]


async def test_void_releases_budget_quota_and_serial(
    environment: Environment, redis: Redis, client: AuthorizationClient
) -> None:
    """Void gives everything back: the same consumer and device can then be subsidised."""
    campaign, person, device = await fresh_campaign(environment), consumer_key(), serial()
    line = Line("1", FRIDGE_G1, 300_000, device)
    approved = await client.authorize(campaign_id=campaign, consumer_key=person, lines=[line])
    voided = await client.void(approved.authorization_id)
    assert voided.authorization.state == pb.AUTHORIZATION_STATE_VOIDED
    assert await counters(redis, environment, campaign, person) == {}
    assert await redis.exists(environment.keys.serial(device)) == 0
    with pytest.raises(InvalidState) as raised:
        await client.capture(approved.authorization_id)
    assert raised.value.metadata["state"] == "AUTHORIZATION_STATE_VOIDED"
    assert (await client.authorize(campaign_id=campaign, consumer_key=person, lines=[line])).decision == (
        pb.DECISION_APPROVED
    )


async def test_partial_then_full_refund_restores_each_line(
    environment: Environment, redis: Redis, client: AuthorizationClient
) -> None:
    """Refunding line by line returns each line's subsidy, quota unit and serial, once."""
    campaign, person = await fresh_campaign(environment), consumer_key()
    devices = [serial(), serial()]
    approved = await client.authorize(
        campaign_id=campaign,
        consumer_key=person,
        lines=[
            Line("fridge", FRIDGE_G1, 300_000, devices[0]),
            Line("ac", AIR_CONDITIONER, 400_000, devices[1]),
            Line("washer", WASHER, 200_000),
        ],
    )
    with pytest.raises(InvalidState):
        await client.refund(approved.authorization_id)  # still PENDING: void it instead
    await client.capture(approved.authorization_id)
    partial = await client.refund(approved.authorization_id, ["ac"])
    assert partial.refunded_subsidy_fen == 80_000
    assert partial.authorization.state == pb.AUTHORIZATION_STATE_PARTIALLY_REFUNDED
    assert [line.refunded for line in partial.authorization.lines] == [False, True, False]
    assert await counters(redis, environment, campaign, person) == {
        "budget.fridge:spent": 60_000,
        "budget.washer:spent": 40_000,
        "budget.air_conditioner:refunded": 80_000,
        "usage.fridge": 1,
        "usage.washer": 1,
    }
    assert await redis.exists(environment.keys.serial(devices[1])) == 0
    assert await redis.exists(environment.keys.serial(devices[0])) == 1
    with pytest.raises(InvalidState) as raised:
        await client.refund(approved.authorization_id, ["ac"])
    assert raised.value.reason == "LINE_ALREADY_REFUNDED"
    with pytest.raises(InvalidArgument) as unknown:
        await client.refund(approved.authorization_id, ["nope"])
    assert unknown.value.metadata["field"] == "line_ids"
    full = await client.refund(approved.authorization_id)  # the rest
    assert full.refunded_subsidy_fen == 100_000
    assert full.authorization.state == pb.AUTHORIZATION_STATE_REFUNDED
    assert full.authorization.refunded_subsidy_fen == 180_000
    assert await counters(redis, environment, campaign, person) == {
        "budget.fridge:refunded": 60_000,
        "budget.washer:refunded": 40_000,
        "budget.air_conditioner:refunded": 80_000,
    }
    assert await redis.exists(environment.keys.serial(devices[0])) == 0
    with pytest.raises(InvalidState):
        await client.refund(approved.authorization_id)
    events = await ledger_events(redis, environment, approved.authorization_id)
    assert [(event["type"], event["amount_fen"]) for event in events] == [
        ("AUTHORIZED", 180_000),
        ("CAPTURED", 180_000),
        ("REFUNDED", 80_000),
        ("REFUNDED", 100_000),
    ]


async def test_idempotent_replay_returns_the_first_answer_and_acts_once(
    environment: Environment, redis: Redis, client: AuthorizationClient
) -> None:
    """Same request_id and payload: the stored answer, flagged replayed; one reservation, one event."""
    campaign, person, request_id = await fresh_campaign(environment), consumer_key(), str(uuid.uuid4())
    lines = [Line("1", FRIDGE_G1, 300_000, serial())]
    first = await client.authorize(campaign_id=campaign, consumer_key=person, lines=lines, request_id=request_id)
    second = await client.authorize(campaign_id=campaign, consumer_key=person, lines=lines, request_id=request_id)
    assert (first.replayed, second.replayed) == (False, True)
    second.replayed = False
    assert second == first
    assert await counters(redis, environment, campaign, person) == {"budget.fridge:reserved": 60_000, "usage.fridge": 1}
    assert len(await ledger_events(redis, environment, first.authorization_id)) == 1
    capture_id = str(uuid.uuid4())
    captured = await client.capture(first.authorization_id, request_id=capture_id)
    replayed = await client.capture(first.authorization_id, request_id=capture_id)
    assert replayed.replayed and replayed.authorization == captured.authorization


async def test_a_replayed_decline_stays_a_decline(client: AuthorizationClient) -> None:
    """The answer is stored whatever it was: a retried decline does not turn into an approval."""
    request_id, person = str(uuid.uuid4()), consumer_key()
    unknown = [Line("1", "6970000000109", 100_000)]
    first = await client.authorize(campaign_id="c-main", consumer_key=person, lines=unknown, request_id=request_id)
    again = await client.authorize(campaign_id="c-main", consumer_key=person, lines=unknown, request_id=request_id)
    assert first.decline_reason == again.decline_reason == pb.DECLINE_REASON_PRODUCT_NOT_ELIGIBLE
    assert again.replayed


async def test_conflicting_replay_is_refused_and_changes_nothing(
    environment: Environment, redis: Redis, client: AuthorizationClient
) -> None:
    """Same request_id, different payload (price, or another method): ALREADY_EXISTS, nothing reserved."""
    campaign, person, request_id = await fresh_campaign(environment), consumer_key(), str(uuid.uuid4())
    device = serial()
    first = await client.authorize(
        campaign_id=campaign, consumer_key=person, lines=[Line("1", FRIDGE_G1, 300_000, device)], request_id=request_id
    )
    before = await counters(redis, environment, campaign, person)
    with pytest.raises(IdempotencyConflict) as raised:
        await client.authorize(
            campaign_id=campaign,
            consumer_key=person,
            lines=[Line("1", FRIDGE_G1, 300_001, device)],
            request_id=request_id,
        )
    assert raised.value.reason == "IDEMPOTENCY_CONFLICT"
    with pytest.raises(IdempotencyConflict):
        await client.capture(first.authorization_id, request_id=request_id)
    assert await counters(redis, environment, campaign, person) == before
    assert len(await ledger_events(redis, environment, first.authorization_id)) == 1


async def test_another_merchant_cannot_see_or_touch_an_authorization(
    clients: dict[str, AuthorizationClient],
) -> None:
    """Terminal identity comes from the credential: another merchant's terminal gets NOT_FOUND."""
    approved = await clients["t-main-01"].authorize(
        campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", WASHER, 100_000)]
    )
    other = clients["t-other-01"]
    for call in (other.get_authorization, other.capture, other.void, other.refund):
        with pytest.raises(NotFound):
            await call(approved.authorization_id)
    # A terminal of the same merchant may act on it (another till in the same store).
    assert (await clients["t-main-02"].get_authorization(approved.authorization_id)).state == (
        pb.AUTHORIZATION_STATE_PENDING
    )


async def test_hold_expiry_releases_once_even_when_racing_capture(
    environment: Environment, redis: Redis, clients: dict[str, AuthorizationClient]
) -> None:
    """Holds of 1 s; at expiry, captures race several sweepers. Each hold ends CAPTURED or EXPIRED,
    exactly one terminal ledger event each, and the counters match that split to the fen."""
    campaign = await fresh_campaign(environment)
    config = environment.config(hold_ttl_s=1, sweep_interval_ms=20)
    async with running_gateway(config) as short_gateway:
        client = AuthorizationClient(
            f"127.0.0.1:{short_gateway.port}", "t-main-01", environment.credentials["t-main-01"], deadline_s=5
        )
        people = [consumer_key() for _ in range(40)]
        approved = await asyncio.gather(
            *(
                client.authorize(
                    campaign_id=campaign, consumer_key=person, lines=[Line("1", FRIDGE_G1, 300_000, serial())]
                )
                for person in people
            )
        )
        # Start the race a few milliseconds before the earliest expiry, on Redis's clock.
        seconds, microseconds = await redis.time()
        earliest_ms = min(response.hold_expires_at.ToMilliseconds() for response in approved)
        await asyncio.sleep(max(0.0, (earliest_ms - (seconds * 1000 + microseconds // 1000) - 40) / 1000))

        async def capture(authorization_id: str) -> str:
            try:
                return pb.AuthorizationState.Name((await client.capture(authorization_id)).authorization.state)
            except InvalidState as error:
                return error.metadata["state"]

        async def sweep() -> None:
            for _ in range(20):
                await short_gateway.store.expire_due_holds(100)
                await asyncio.sleep(0.01)

        outcomes, *_ = await asyncio.gather(
            asyncio.gather(*(capture(response.authorization_id) for response in approved)),
            sweep(),
            sweep(),
        )
        await asyncio.sleep(1.2)  # any hold not captured is now past expiry: let the sweepers finish
        await client.close()
    states = [
        pb.AuthorizationState.Name((await clients["t-main-01"].get_authorization(response.authorization_id)).state)
        for response in approved
    ]
    assert states == list(outcomes)
    assert set(states) <= {"AUTHORIZATION_STATE_CAPTURED", "AUTHORIZATION_STATE_EXPIRED"}
    captured = states.count("AUTHORIZATION_STATE_CAPTURED")
    print("captured", captured, "of", len(states))
    budget = {
        key.decode(): int(value) for key, value in (await redis.hgetall(environment.keys.budget(campaign))).items()
    }
    assert budget.get("fridge:reserved", 0) == 0
    assert budget.get("fridge:spent", 0) == 60_000 * captured
    for response, person, state in zip(approved, people, states, strict=True):
        usage = await redis.hget(environment.keys.usage(campaign, person), "fridge")
        assert int(usage or 0) == (1 if state == "AUTHORIZATION_STATE_CAPTURED" else 0)
        events = [event["type"] for event in await ledger_events(redis, environment, response.authorization_id)]
        assert events == ["AUTHORIZED", state.removeprefix("AUTHORIZATION_STATE_")]
    for response in approved:
        assert await redis.zscore(environment.keys.holds, response.authorization_id) is None


async def test_a_suspended_terminal_cannot_move_money(
    environment: Environment, clients: dict[str, AuthorizationClient]
) -> None:
    """Capture, void and refund are refused to a suspended terminal (PERMISSION_DENIED), though
    the authorization belongs to its merchant; an active till of the same merchant may act."""
    approved = await clients["t-main-01"].authorize(
        campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", WASHER, 100_000)]
    )
    suspended = clients["t-main-off"]
    for call in (suspended.capture, suspended.void, suspended.refund):
        with pytest.raises(PermissionDenied):
            await call(approved.authorization_id)
    assert (await clients["t-main-02"].capture(approved.authorization_id)).authorization.state == (
        pb.AUTHORIZATION_STATE_CAPTURED
    )


async def test_serials_are_one_device_whatever_their_case(client: AuthorizationClient) -> None:
    """ "sn-abc" and "SN-ABC" are the same device: the second sale is declined."""
    device = serial()
    first = await client.authorize(
        campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", FRIDGE_G1, 300_000, device.lower())]
    )
    assert first.decision == pb.DECISION_APPROVED
    second = await client.authorize(
        campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", FRIDGE_G1, 300_000, device.upper())]
    )
    assert second.decline_reason == pb.DECLINE_REASON_SERIAL_ALREADY_SUBSIDISED


async def test_ledger_events_name_the_terminal_that_acted(
    environment: Environment, redis: Redis, clients: dict[str, AuthorizationClient]
) -> None:
    """A capture by another till of the merchant is recorded under that till, with the
    authorizing terminal kept beside it."""
    approved = await clients["t-main-01"].authorize(
        campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", WASHER, 100_000)]
    )
    await clients["t-main-02"].capture(approved.authorization_id)
    events = await ledger_events(redis, environment, approved.authorization_id)
    assert [(event["type"], event["terminal"], event["authorization_terminal"]) for event in events] == [
        ("AUTHORIZED", "t-main-01", "t-main-01"),
        ("CAPTURED", "t-main-02", "t-main-01"),
    ]
