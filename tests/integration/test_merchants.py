"""MerchantService and `subsidyctl merchant` against real PostgreSQL and Redis.

The module runs its own world (database, Redis prefix, gateway) with one campaign whose region
is the simplified Xiaoshan outline of examples/merchants/, so that store locations are checked,
and a gateway whose credential cache refreshes every 200 ms (production: 1 s), so that a
rotation is observed quickly.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from click.testing import CliRunner, Result
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, MerchantClient, RetryPolicy, signing
from subsidy_client.errors import (
    AlreadyExists,
    FailedPrecondition,
    IdempotencyConflict,
    InvalidArgument,
    InvalidState,
    NotFound,
    PermissionDenied,
    StoreOutsideRegion,
    Unauthenticated,
)
from subsidy_client.v1 import authorization_pb2, common_pb2
from subsidy_client.v1 import merchant_pb2 as pb

from server.ctl import main as subsidyctl
from server.ctl.merchant import parse_onboarding
from server.domain.geo import Point, distance_m
from server.domain.merchants import is_valid_licence_number, licence_check_character
from server.processes.publisher import PublishState, run_publisher
from storage.devenv import Services
from tests.conftest import (
    Environment,
    consumer_key,
    isolated_environment,
    load_document,
    running_gateway,
    serial,
    snapshot,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "merchants"
XIAOSHAN_REGION = yaml.safe_load((EXAMPLES / "xiaoshan-region.geojson.yaml").read_text())
FRIDGE = "6970000000017"  # grade 1, serial required: 20% of the price
OPERATOR = "op-auditor"

XIAOSHAN_GOVERNMENT_WGS84 = Point(30.18, 120.26)
XIAOSHAN_GOVERNMENT_GCJ02 = (30.177543, 120.264463)  # as AMap reports it
WEST_LAKE_WGS84 = Point(30.25, 120.14)
# 250 m west of the Binjiang-Xiaoshan line in WGS-84; its GCJ-02 numbers lie east of the line.
ACROSS_THE_LINE_GCJ02 = (30.187542, 120.246476)

REGION_CAMPAIGN = {
    "campaigns": [
        {
            "id": "c-xiaoshan",
            "name": "Xiaoshan appliance trade-in",
            "starts_at": "2020-01-01T00:00:00+08:00",
            "ends_at": "2099-01-01T00:00:00+08:00",
            "region": XIAOSHAN_REGION,
            "rules": [
                {
                    "category": "fridge",
                    "kind": "PERCENT",
                    "rates_bp": {"1": 2000},
                    "cap_fen": 200_000,
                    "per_person_limit": 1,
                    "budget_fen": 10_000_000,
                }
            ],
        }
    ]
}


@dataclass(frozen=True)
class World:
    env: Environment
    target: str
    operator: MerchantClient


def operator_client(env: Environment, target: str) -> MerchantClient:
    # One attempt per call, so that a test sees exactly what the gateway answered.
    return MerchantClient(
        target, OPERATOR, env.credentials[OPERATOR], deadline_s=10.0, retry=RetryPolicy(max_attempts=1)
    )


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[World]:
    async with isolated_environment(services) as env:
        await load_document(env, REGION_CAMPAIGN)
        async with running_gateway(env.config(credentials_refresh_ms=200)) as application:
            target = f"127.0.0.1:{application.port}"
            async with operator_client(env, target) as operator:
                yield World(env, target, operator)


# --- Helpers ----------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def request_id() -> str:
    return str(uuid.uuid4())


def valid_licence() -> str:
    """A fresh unified social credit code with a correct check character (Xiaoshan, 330109)."""
    body = "91330109" + "".join(secrets.choice("0123456789ABCDEFGHJKLMNPQRTUWXY") for _ in range(9))
    return body + licence_check_character(body)


def location(latitude: float, longitude: float, system: int = common_pb2.COORDINATE_SYSTEM_WGS84) -> Any:
    return common_pb2.Location(latitude=latitude, longitude=longitude, coordinate_system=system)  # type: ignore[arg-type]


def merchant_request(merchant_id: str, **fields: Any) -> pb.CreateMerchantRequest:
    merchant = pb.Merchant(merchant_id=merchant_id, name="萧山家电商行", licence_number=valid_licence())
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(merchant, name).extend(value)
        else:
            setattr(merchant, name, value)
    return pb.CreateMerchantRequest(request_id=request_id(), merchant=merchant)


def physical_store(store_id: str, merchant_id: str, where: Any) -> pb.CreateStoreRequest:
    store = pb.Store(
        store_id=store_id,
        merchant_id=merchant_id,
        kind=pb.STORE_KIND_PHYSICAL,
        name="人民路店",
        address="杭州市萧山区人民路",
        location=where,
    )
    return pb.CreateStoreRequest(request_id=request_id(), store=store)


def online_store(store_id: str, merchant_id: str) -> pb.CreateStoreRequest:
    store = pb.Store(
        store_id=store_id,
        merchant_id=merchant_id,
        kind=pb.STORE_KIND_ONLINE,
        name="天猫旗舰店",
        platform="tmall",
        shop_url="https://example.tmall.com/",
    )
    return pb.CreateStoreRequest(request_id=request_id(), store=store)


def terminal_request(terminal_id: str, store_id: str) -> pb.CreateTerminalRequest:
    return pb.CreateTerminalRequest(request_id=request_id(), terminal_id=terminal_id, store_id=store_id)


async def merchant_with_store(world: World) -> tuple[str, str]:
    """A new merchant with one physical store at the Xiaoshan government (WGS-84)."""
    merchant_id, store_id = unique("m"), unique("s")
    await world.operator.create_merchant(merchant_request(merchant_id))
    await world.operator.create_store(physical_store(store_id, merchant_id, location(30.18, 120.26)))
    return merchant_id, store_id


async def new_terminal(world: World, store_id: str) -> tuple[str, str]:
    terminal_id = unique("t")
    response = await world.operator.create_terminal(terminal_request(terminal_id, store_id))
    return terminal_id, response.secret


def terminal_client(world: World, terminal_id: str, secret: str) -> AuthorizationClient:
    return AuthorizationClient(world.target, terminal_id, secret, deadline_s=5.0, retry=RetryPolicy(max_attempts=1))


async def sell_fridge(client: AuthorizationClient) -> authorization_pb2.AuthorizeResponse:
    """One grade-1 fridge at 4,599 yuan, a fresh consumer and serial, under c-main."""
    return await client.authorize(
        campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", FRIDGE, 459_900, serial())]
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Polls until ``check`` holds: for effects bounded by the credential cache's refresh."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.05)


async def refused(call: Awaitable[Any]) -> bool:
    try:
        await call
    except Unauthenticated:
        return True
    return False


async def audit_state(env: Environment) -> tuple[int, int]:
    """(operator actions recorded, PostgreSQL reference version)."""
    connection = await asyncpg.connect(env.pg_dsn, timeout=10)
    try:
        actions = await connection.fetchval("SELECT count(*) FROM operator_actions")
        version = await connection.fetchval("SELECT version FROM reference_version")
    finally:
        await connection.close()
    return actions, version


# --- Licence numbers (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        ("91330100799655058B", True),  # Alibaba (China) Co., Ltd., Hangzhou
        ("914403001922038216", True),  # Huawei Technologies Co., Ltd., Shenzhen
        ("9144030071526726XG", True),  # Tencent Technology (Shenzhen) Co., Ltd.
        ("91330100799655058C", False),  # wrong check character
        ("91330100799655O58B", False),  # O is not in the alphabet
        ("91330100799655058", False),  # 17 characters
        ("91330100799655058b", False),  # lower case
        ("91330109MAIN", False),  # the test fixtures' placeholder
    ],
)
def test_licence_number_check_character(code: str, valid: bool) -> None:
    """GB 32100-2015: 18 characters of the 31-letter alphabet with a mod-31 check character,
    verified against real companies' published codes."""
    assert is_valid_licence_number(code) is valid


# --- Stores and regions -----------------------------------------------------------------------


async def test_store_outside_every_region_is_refused_with_a_clear_reason(world: World) -> None:
    """A physical store at West Lake (north of the Qiantang, outside Xiaoshan) is refused
    FAILED_PRECONDITION / STORE_OUTSIDE_REGION naming store.location; nothing is created."""
    merchant_id = unique("m")
    await world.operator.create_merchant(merchant_request(merchant_id))
    request = physical_store(unique("s"), merchant_id, location(WEST_LAKE_WGS84.latitude, WEST_LAKE_WGS84.longitude))
    with pytest.raises(StoreOutsideRegion) as raised:
        await world.operator.create_store(request)
    # Chosen by the reason: a precondition, not a lifecycle state (earlier clients said InvalidState).
    assert isinstance(raised.value, FailedPrecondition) and not isinstance(raised.value, InvalidState)
    assert raised.value.code.name == "FAILED_PRECONDITION"
    assert raised.value.reason == "STORE_OUTSIDE_REGION"
    assert raised.value.metadata["field"] == "store.location"
    assert "outside the region of every campaign" in raised.value.message
    assert not (await world.operator.get_merchant(merchant_id)).stores


async def test_store_inside_given_in_gcj02_is_accepted_and_kept_in_wgs84(world: World) -> None:
    """The Xiaoshan government as a Chinese map reports it (GCJ-02) is accepted; the store reads
    back in WGS-84, about 500 m from the numbers given and within a metre of the true position."""
    merchant_id, store_id = unique("m"), unique("s")
    await world.operator.create_merchant(merchant_request(merchant_id))
    given = location(*XIAOSHAN_GOVERNMENT_GCJ02, system=common_pb2.COORDINATE_SYSTEM_GCJ02)
    response = await world.operator.create_store(physical_store(store_id, merchant_id, given))
    stored = response.store.location
    assert stored.coordinate_system == common_pb2.COORDINATE_SYSTEM_WGS84
    stored_point = Point(stored.latitude, stored.longitude)
    assert distance_m(stored_point, XIAOSHAN_GOVERNMENT_WGS84) < 1.0
    assert distance_m(stored_point, Point(*XIAOSHAN_GOVERNMENT_GCJ02)) > 300
    merchant = await world.operator.get_merchant(merchant_id)
    assert [store.store_id for store in merchant.stores] == [store_id]
    assert merchant.stores[0].location == stored


async def test_gcj02_point_across_the_district_line_is_refused(world: World) -> None:
    """A shop 250 m outside Xiaoshan whose GCJ-02 numbers, read as WGS-84, would fall inside:
    the gateway converts first and refuses it."""
    merchant_id = unique("m")
    await world.operator.create_merchant(merchant_request(merchant_id))
    given = location(*ACROSS_THE_LINE_GCJ02, system=common_pb2.COORDINATE_SYSTEM_GCJ02)
    with pytest.raises(StoreOutsideRegion) as raised:
        await world.operator.create_store(physical_store(unique("s"), merchant_id, given))
    assert raised.value.reason == "STORE_OUTSIDE_REGION"


async def test_online_store_needs_no_location(world: World) -> None:
    """An online shop (platform and https URL, no location) is accepted whatever the regions."""
    merchant_id, store_id = unique("m"), unique("s")
    await world.operator.create_merchant(merchant_request(merchant_id))
    response = await world.operator.create_store(online_store(store_id, merchant_id))
    assert response.store.kind == pb.STORE_KIND_ONLINE
    assert response.store.platform == "tmall"
    assert not response.store.HasField("location")


async def test_without_any_campaign_region_every_location_is_accepted(services: Services) -> None:
    """When no campaign has a region nothing restricts location: a West Lake store is accepted."""
    async with isolated_environment(services) as env:
        # The shared fixture's qualification campaigns have a region; this world has none.
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            await connection.execute("UPDATE campaigns SET region = NULL")
        finally:
            await connection.close()
        async with running_gateway(env.config()) as application:
            async with operator_client(env, f"127.0.0.1:{application.port}") as operator:
                merchant_id = unique("m")
                await operator.create_merchant(merchant_request(merchant_id))
                where = location(WEST_LAKE_WGS84.latitude, WEST_LAKE_WGS84.longitude)
                response = await operator.create_store(physical_store(unique("s"), merchant_id, where))
                assert response.store.location.latitude == WEST_LAKE_WGS84.latitude


# --- Terminals on the hot path ----------------------------------------------------------------


async def test_new_terminal_authorizes_and_rotation_replaces_its_secret(world: World) -> None:
    """A terminal created through the API authorizes with the secret it was issued; after a
    rotation the old secret is refused UNAUTHENTICATED (within the cache refresh) and the new
    one works."""
    _, store_id = await merchant_with_store(world)
    terminal_id, first_secret = await new_terminal(world, store_id)
    assert len(first_secret) >= 43  # 256 bits, URL-safe base64
    async with terminal_client(world, terminal_id, first_secret) as old:
        approved = await sell_fridge(old)
        assert approved.decision == authorization_pb2.DECISION_APPROVED
        assert approved.subsidy_fen == 91_980

        rotated = await world.operator.rotate_terminal_credential(terminal_id)
        assert rotated.secret and rotated.secret != first_secret
        assert rotated.terminal.terminal_id == terminal_id
        await eventually(lambda: refused(old.echo(b"ping")))
        with pytest.raises(Unauthenticated):
            await sell_fridge(old)
    async with terminal_client(world, terminal_id, rotated.secret) as new:
        assert (await sell_fridge(new)).decision == authorization_pb2.DECISION_APPROVED


async def test_suspended_terminal_is_declined_until_reinstated(world: World) -> None:
    """SetTerminalStatus SUSPENDED: the very next authorization is declined TERMINAL_INACTIVE;
    after reinstatement the terminal is approved again."""
    _, store_id = await merchant_with_store(world)
    terminal_id, secret = await new_terminal(world, store_id)
    async with terminal_client(world, terminal_id, secret) as client:
        assert (await sell_fridge(client)).decision == authorization_pb2.DECISION_APPROVED
        suspended = await world.operator.set_terminal_status(
            terminal_id, pb.PARTY_STATUS_SUSPENDED, "card skimmer found on the device"
        )
        assert suspended.terminal.status == pb.PARTY_STATUS_SUSPENDED
        declined = await sell_fridge(client)
        assert declined.decision == authorization_pb2.DECISION_DECLINED
        assert declined.decline_reason == authorization_pb2.DECLINE_REASON_TERMINAL_INACTIVE
        await world.operator.set_terminal_status(terminal_id, pb.PARTY_STATUS_ACTIVE, "device replaced")
        assert (await sell_fridge(client)).decision == authorization_pb2.DECISION_APPROVED


async def test_suspended_merchant_is_declined_merchant_inactive(world: World) -> None:
    """SetMerchantStatus SUSPENDED: every terminal of the merchant is declined MERCHANT_INACTIVE
    on its next authorization, and approved again after reinstatement."""
    merchant_id, store_id = await merchant_with_store(world)
    terminal_id, secret = await new_terminal(world, store_id)
    async with terminal_client(world, terminal_id, secret) as client:
        suspended = await world.operator.set_merchant_status(
            merchant_id, pb.PARTY_STATUS_SUSPENDED, "fabricated sales under investigation"
        )
        assert suspended.merchant.status == pb.PARTY_STATUS_SUSPENDED
        declined = await sell_fridge(client)
        assert declined.decline_reason == authorization_pb2.DECLINE_REASON_MERCHANT_INACTIVE
        await world.operator.set_merchant_status(merchant_id, pb.PARTY_STATUS_ACTIVE)
        assert (await sell_fridge(client)).decision == authorization_pb2.DECISION_APPROVED


async def test_terminal_credentials_cannot_call_merchant_service(world: World) -> None:
    """MerchantService is for operators: a terminal's valid credential gets PERMISSION_DENIED,
    for reads and writes alike."""
    _, store_id = await merchant_with_store(world)
    terminal_id, secret = await new_terminal(world, store_id)
    async with MerchantClient(world.target, terminal_id, secret, retry=RetryPolicy(max_attempts=1)) as intruder:
        with pytest.raises(PermissionDenied):
            await intruder.get_merchant("m-main")
        with pytest.raises(PermissionDenied):
            await intruder.create_merchant(merchant_request(unique("m")))
        with pytest.raises(PermissionDenied):
            await intruder.rotate_terminal_credential(terminal_id)


async def test_a_reused_nonce_is_refused(world: World) -> None:
    """An operator call captured and sent again (same signature, same nonce) is UNAUTHENTICATED."""
    method = "/subsidy.v1.MerchantService/GetMerchant"
    body = pb.GetMerchantRequest(merchant_id="m-main").SerializeToString()
    metadata = signing.signed_metadata(world.env.credentials[OPERATOR], method, OPERATOR, body)
    await world.operator.call_raw(method, body, metadata)
    with pytest.raises(Unauthenticated):
        await world.operator.call_raw(method, body, metadata)


# --- Bad input --------------------------------------------------------------------------------

Call = Callable[[MerchantClient, str], Awaitable[Any]]


def _merchant_with(**fields: Any) -> Call:
    merchant_id = fields.pop("merchant_id", None) or unique("m")
    return lambda operator, _store: operator.create_merchant(merchant_request(merchant_id, **fields))


def _store_with(change: Callable[[pb.Store], None]) -> Call:
    def call(operator: MerchantClient, store_id: str) -> Awaitable[Any]:
        request = physical_store(unique("s"), "m-main", location(30.18, 120.26))
        change(request.store)
        return operator.create_store(request)

    return call


def _online_with(change: Callable[[pb.Store], None]) -> Call:
    def call(operator: MerchantClient, store_id: str) -> Awaitable[Any]:
        request = online_store(unique("s"), "m-main")
        change(request.store)
        return operator.create_store(request)

    return call


def _set(field: str, value: Any) -> Callable[[pb.Store], None]:
    def change(store: pb.Store) -> None:
        target: Any = store
        *parents, name = field.split(".")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)

    return change


BAD_INPUT: list[tuple[str, Call]] = [
    ("merchant.licence_number", _merchant_with(licence_number="91330100799655058C")),
    ("merchant.licence_number", _merchant_with(licence_number="91330109MAIN")),
    ("merchant.merchant_id", _merchant_with(merchant_id="m main")),
    ("merchant.name", _merchant_with(name="  ")),
    ("merchant.categories[1]", _merchant_with(categories=["fridge", "Fridge!"])),
    ("merchant.status", _merchant_with(status=pb.PARTY_STATUS_SUSPENDED)),
    ("store.kind", _store_with(_set("kind", 7))),
    ("store.kind", _store_with(_set("kind", pb.STORE_KIND_UNSPECIFIED))),
    ("store.location.latitude", _store_with(_set("location.latitude", 91.0))),
    ("store.location.longitude", _store_with(_set("location.longitude", float("nan")))),
    ("store.location.coordinate_system", _store_with(_set("location.coordinate_system", 0))),
    ("store.location", _store_with(lambda store: store.ClearField("location"))),
    ("store.address", _store_with(_set("address", ""))),
    ("store.platform", _store_with(_set("platform", "tmall"))),
    ("store.location", _online_with(lambda store: store.location.CopyFrom(location(30.18, 120.26)))),
    ("store.shop_url", _online_with(_set("shop_url", "http://example.com/"))),
    ("store.platform", _online_with(_set("platform", ""))),
    ("store_id", lambda operator, _store: operator.create_terminal(terminal_request(unique("t"), ""))),
    ("terminal_id", lambda operator, store: operator.create_terminal(terminal_request("t 1", store))),
    ("status", lambda operator, _store: operator.set_merchant_status("m-main", pb.PARTY_STATUS_UNSPECIFIED)),
    ("reason", lambda operator, _store: operator.set_terminal_status("t-main-02", pb.PARTY_STATUS_SUSPENDED, "")),
    ("request_id", lambda operator, _store: operator.rotate_terminal_credential("t-main-02", request_id="r-1")),
]


@pytest.mark.parametrize(
    ("field", "call"), BAD_INPUT, ids=[f"{field}-{index}" for index, (field, _) in enumerate(BAD_INPUT)]
)
async def test_bad_input_is_invalid_argument_naming_the_field(world: World, field: str, call: Call) -> None:
    """Malformed requests (bad licence number, unknown store kind, latitude 91, a terminal
    without a store, ...) are INVALID_ARGUMENT / INVALID_FIELD naming the field, and change
    nothing."""
    _, store_id = await merchant_with_store(world)
    before = await audit_state(world.env)
    with pytest.raises(InvalidArgument) as raised:
        await call(world.operator, store_id)
    assert raised.value.reason == "INVALID_FIELD"
    assert raised.value.metadata["field"] == field
    assert await audit_state(world.env) == before


async def test_unknown_objects_are_not_found_and_duplicates_already_exist(world: World) -> None:
    """NOT_FOUND names the missing merchant, store or terminal; creating an existing id (or a
    terminal named like an operator, which would clobber its credential) is ALREADY_EXISTS."""
    merchant_id, store_id = await merchant_with_store(world)
    with pytest.raises(NotFound) as missing:
        await world.operator.get_merchant("m-nobody")
    assert (missing.value.reason, missing.value.metadata) == ("NOT_FOUND", {"kind": "merchant", "id": "m-nobody"})
    with pytest.raises(NotFound) as missing:
        await world.operator.create_terminal(terminal_request(unique("t"), "s-nowhere"))
    assert missing.value.metadata == {"kind": "store", "id": "s-nowhere"}
    with pytest.raises(NotFound) as missing:
        await world.operator.create_store(online_store(unique("s"), "m-nobody"))
    assert missing.value.metadata == {"kind": "merchant", "id": "m-nobody"}
    with pytest.raises(NotFound):
        await world.operator.rotate_terminal_credential("t-nobody")

    for duplicate in (
        world.operator.create_merchant(merchant_request(merchant_id)),
        world.operator.create_store(online_store(store_id, merchant_id)),
        world.operator.create_terminal(terminal_request("t-main-01", store_id)),
        world.operator.create_terminal(terminal_request(OPERATOR, store_id)),
    ):
        with pytest.raises(AlreadyExists) as raised:
            await duplicate
        assert (raised.value.code.name, raised.value.reason) == ("ALREADY_EXISTS", "ALREADY_EXISTS")
        # Chosen by the reason: an existing object is not an idempotency conflict.
        assert not isinstance(raised.value, IdempotencyConflict)


# --- Idempotency and audit --------------------------------------------------------------------


async def test_replays_change_nothing_and_secrets_are_shown_once(world: World) -> None:
    """The same request_id and payload again returns the current state and records nothing; a
    replayed CreateTerminal or rotation returns an empty secret and issues none; the same
    request_id with another payload is IDEMPOTENCY_CONFLICT."""
    merchant_id = unique("m")
    create = merchant_request(merchant_id, categories=["fridge"])
    first = await world.operator.create_merchant(create)
    store = physical_store(unique("s"), merchant_id, location(30.18, 120.26))
    await world.operator.create_store(store)
    terminal = terminal_request(unique("t"), store.store.store_id)
    issued = await world.operator.create_terminal(terminal)
    rotation_id = request_id()
    rotated = await world.operator.rotate_terminal_credential(terminal.terminal_id, request_id=rotation_id)
    before = await audit_state(world.env)

    again = await world.operator.create_merchant(create)
    assert again.merchant.merchant_id == first.merchant.merchant_id
    assert list(again.merchant.categories) == ["fridge"]
    assert len(again.merchant.terminals) == 1
    assert (await world.operator.create_store(store)).store.store_id == store.store.store_id
    replayed = await world.operator.create_terminal(terminal)
    assert (replayed.secret, replayed.terminal) == ("", issued.terminal)
    rotated_again = await world.operator.rotate_terminal_credential(terminal.terminal_id, request_id=rotation_id)
    assert rotated_again.secret == ""
    assert await audit_state(world.env) == before

    # The replayed rotation issued nothing: the secret of the first rotation still works.
    async with terminal_client(world, terminal.terminal_id, rotated.secret) as client:
        await eventually(lambda: succeeded(client.echo(b"ping")))

    conflicting = merchant_request(merchant_id, name="another name")
    conflicting.request_id = create.request_id
    with pytest.raises(IdempotencyConflict) as raised:
        await world.operator.create_merchant(conflicting)
    assert raised.value.reason == "IDEMPOTENCY_CONFLICT"


async def test_a_replay_publishes_a_change_whose_publication_failed(world: World) -> None:
    """If the gateway committed a change but could not publish it (Redis failed after the
    commit), the client's retry with the same request_id is a replay; the replay publishes the
    merchant's pending change instead of leaving the hot path stale."""
    _, store_id = await merchant_with_store(world)
    create = terminal_request(unique("t"), store_id)
    issued = await world.operator.create_terminal(create)
    # Simulate a suspension that committed in PostgreSQL but never reached Redis.
    connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
    try:
        async with connection.transaction():
            await connection.execute(
                "UPDATE terminals SET status = 'SUSPENDED' WHERE terminal_id = $1", create.terminal_id
            )
            version = await connection.fetchval("UPDATE reference_version SET version = version + 1 RETURNING version")
            await connection.execute(
                "INSERT INTO unpublished_changes (version, merchant_ids) VALUES ($1, $2)",
                version,
                [issued.terminal.merchant_id],
            )
        async with terminal_client(world, create.terminal_id, issued.secret) as client:
            assert (await sell_fridge(client)).decision == authorization_pb2.DECISION_APPROVED  # stale
            await world.operator.create_terminal(create)  # the retry: a replay
            declined = await sell_fridge(client)
            assert declined.decline_reason == authorization_pb2.DECLINE_REASON_TERMINAL_INACTIVE
        assert await connection.fetchval("SELECT count(*) FROM unpublished_changes WHERE version = $1", version) == 0
    finally:
        await connection.close()


async def test_the_writer_publishes_a_change_nobody_retried(world: World) -> None:
    """A change committed in PostgreSQL whose gateway died before publishing it, and whose
    client never retried: the ledger writer's publisher (server/processes/publisher.py)
    publishes it and clears its mark."""
    _, store_id = await merchant_with_store(world)
    create = terminal_request(unique("t"), store_id)
    issued = await world.operator.create_terminal(create)
    connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
    redis = Redis.from_url(world.env.redis_url)
    stopping = asyncio.Event()
    state = PublishState()
    version = await stale_suspension(connection, create.terminal_id, issued.terminal.merchant_id)
    try:
        async with terminal_client(world, create.terminal_id, issued.secret) as client:
            assert (await sell_fridge(client)).decision == authorization_pb2.DECISION_APPROVED  # stale
            publisher = asyncio.create_task(
                run_publisher(world.env.pg_dsn, redis, world.env.keys, stopping, state, interval_s=0.1)
            )
            try:

                async def declined() -> bool:
                    answer = await sell_fridge(client)
                    return answer.decline_reason == authorization_pb2.DECLINE_REASON_TERMINAL_INACTIVE

                await eventually(declined)
            finally:
                stopping.set()
                await publisher
        assert await connection.fetchval("SELECT count(*) FROM unpublished_changes WHERE version = $1", version) == 0
        assert state.last.failed == 0 and not state.stuck
    finally:
        await connection.execute("DELETE FROM unpublished_changes WHERE version = $1", version)
        await redis.aclose()
        await connection.close()


async def test_a_change_that_cannot_be_published_keeps_its_mark_and_shows(world: World) -> None:
    """With Redis unreachable the publisher's passes fail: the mark stays for the next pass, the
    failure is counted, and a mark older than a minute makes the writer's /health unhealthy."""
    _, store_id = await merchant_with_store(world)
    create = terminal_request(unique("t"), store_id)
    issued = await world.operator.create_terminal(create)
    connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
    # Nothing listens on port 1.
    unreachable = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    stopping = asyncio.Event()
    state = PublishState()
    version = await stale_suspension(connection, create.terminal_id, issued.terminal.merchant_id)
    try:
        publisher = asyncio.create_task(
            run_publisher(world.env.pg_dsn, unreachable, world.env.keys, stopping, state, interval_s=0.1)
        )
        try:

            async def failed() -> bool:
                return state.last.failed >= 1

            await eventually(failed)
        finally:
            stopping.set()
            await publisher
        assert await connection.fetchval("SELECT count(*) FROM unpublished_changes WHERE version = $1", version) == 1
        assert state.last.published == 0
        assert state.stuck  # the mark is an hour old
    finally:
        await connection.execute("DELETE FROM unpublished_changes WHERE version = $1", version)
        await unreachable.aclose()
        await connection.close()


async def stale_suspension(connection: asyncpg.Connection, terminal_id: str, merchant_id: str) -> int:
    """A terminal's suspension committed in PostgreSQL an hour ago and never published to Redis."""
    async with connection.transaction():
        await connection.execute("UPDATE terminals SET status = 'SUSPENDED' WHERE terminal_id = $1", terminal_id)
        version: int = await connection.fetchval("UPDATE reference_version SET version = version + 1 RETURNING version")
        await connection.execute(
            "INSERT INTO unpublished_changes (version, merchant_ids, created_at)"
            " VALUES ($1, $2, now() - interval '1 hour')",
            version,
            [merchant_id],
        )
    return version


async def succeeded(call: Awaitable[Any]) -> bool:
    try:
        await call
    except Unauthenticated:
        return False
    return True


async def test_status_changes_are_audited_with_their_reason(world: World) -> None:
    """Each suspension and reinstatement is one append-only audit row naming the operator, the
    new and previous status and the reason given."""
    _, store_id = await merchant_with_store(world)
    terminal_id, _ = await new_terminal(world, store_id)
    await world.operator.set_terminal_status(terminal_id, pb.PARTY_STATUS_SUSPENDED, "reported stolen")
    await world.operator.set_terminal_status(terminal_id, pb.PARTY_STATUS_ACTIVE, "recovered")
    connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
    try:
        rows = await connection.fetch(
            "SELECT operator_id, action, details FROM operator_actions"
            " WHERE target_kind = 'terminal' AND target_id = $1 ORDER BY action_id",
            terminal_id,
        )
    finally:
        await connection.close()
    assert [(row["operator_id"], row["action"]) for row in rows] == [
        (OPERATOR, "CreateTerminal"),
        (OPERATOR, "SetTerminalStatus"),
        (OPERATOR, "SetTerminalStatus"),
    ]
    details = [json.loads(row["details"]) for row in rows[1:]]
    assert details == [
        {"status": "SUSPENDED", "previous_status": "ACTIVE", "reason": "reported stolen"},
        {"status": "ACTIVE", "previous_status": "SUSPENDED", "reason": "recovered"},
    ]
    assert "secret" not in json.loads(rows[0]["details"])


# --- subsidyctl merchant ----------------------------------------------------------------------


async def subsidyctl_run(world: World, *arguments: str) -> Result:
    """Runs subsidyctl in a worker thread (it runs its own event loop) as op-auditor."""
    environment = {"SUBSIDYCTL_OPERATOR": OPERATOR, "SUBSIDYCTL_SECRET": world.env.credentials[OPERATOR]}
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, subsidyctl, ["--target", world.target, *arguments], env=environment, catch_exceptions=False
    )


async def test_onboard_creates_everything_and_a_rerun_changes_nothing(world: World) -> None:
    """`merchant onboard` on the shipped Suning example creates the merchant, both stores and
    both terminals, prints each secret once (with a warning on stderr), and the POS terminal
    can sell with it. Running the same file again is a replay: no audit row, no version bump,
    no Redis change (other than the calls' own nonces), no secret."""
    example = EXAMPLES / "suning-xiaoshan.yaml"
    plan = parse_onboarding(yaml.safe_load(example.read_text()))
    merchant_id = plan.merchant.merchant.merchant_id
    first = await subsidyctl_run(world, "merchant", "onboard", str(example), "--json")
    assert first.exit_code == 0, first.output
    steps = json.loads(first.stdout)["steps"]
    assert [(step["object"], step["result"]) for step in steps] == [
        ("merchant", "created"),
        ("store", "created"),
        ("store", "created"),
        ("terminal", "created"),
        ("terminal", "created"),
    ]
    secrets_issued = {step["id"]: step["secret"] for step in steps if step["object"] == "terminal"}
    assert all(len(secret) >= 43 for secret in secrets_issued.values())
    assert "shown this once" in first.stderr
    merchant = await world.operator.get_merchant(merchant_id)
    assert [store.kind for store in merchant.stores] == [pb.STORE_KIND_ONLINE, pb.STORE_KIND_PHYSICAL]
    async with terminal_client(world, "t-suningcom-xs-pos-01", secrets_issued["t-suningcom-xs-pos-01"]) as pos:
        assert (await sell_fridge(pos)).decision == authorization_pb2.DECISION_APPROVED

    before = (await audit_state(world.env), await redis_state(world.env))
    second = await subsidyctl_run(world, "merchant", "onboard", str(example))
    assert second.exit_code == 0, second.output
    assert second.stdout.count("exists, unchanged") == 5
    assert not any(secret in second.stdout for secret in secrets_issued.values())
    assert "shown this once" not in second.stderr
    assert (await audit_state(world.env), await redis_state(world.env)) == before
    assert await world.operator.get_merchant(merchant_id) == merchant


async def redis_state(env: Environment) -> dict[bytes, Any]:
    redis = Redis.from_url(env.redis_url)
    try:
        state = await snapshot(redis, env.keys)
    finally:
        await redis.aclose()
    return {key: value for key, value in state.items() if b":nonce:" not in key}


async def test_operator_commands_suspend_show_and_rotate(world: World) -> None:
    """suspend-terminal / reinstate-terminal / suspend / reinstate / rotate-credential / show act
    through the API and print a table (or JSON with --json); a missing reason is a usage error."""
    merchant_id, store_id = await merchant_with_store(world)
    terminal_id, _ = await new_terminal(world, store_id)

    suspended = await subsidyctl_run(world, "merchant", "suspend-terminal", terminal_id, "--reason", "lost", "--json")
    assert suspended.exit_code == 0, suspended.output
    assert json.loads(suspended.stdout)["terminal"]["status"] == "PARTY_STATUS_SUSPENDED"
    shown = await subsidyctl_run(world, "merchant", "show", merchant_id)
    assert shown.exit_code == 0, shown.output
    assert "TERMINALS" in shown.stdout and "SUSPENDED" in shown.stdout and "WGS-84" in shown.stdout
    assert (await subsidyctl_run(world, "merchant", "reinstate-terminal", terminal_id)).exit_code == 0
    assert (await subsidyctl_run(world, "merchant", "suspend", merchant_id)).exit_code == 2  # --reason required
    assert (await subsidyctl_run(world, "merchant", "suspend", merchant_id, "--reason", "audit")).exit_code == 0
    assert (await world.operator.get_merchant(merchant_id)).status == pb.PARTY_STATUS_SUSPENDED
    assert (await subsidyctl_run(world, "merchant", "reinstate", merchant_id)).exit_code == 0
    merchant = await world.operator.get_merchant(merchant_id)
    assert merchant.status == pb.PARTY_STATUS_ACTIVE
    assert merchant.terminals[0].status == pb.PARTY_STATUS_ACTIVE

    rotated = await subsidyctl_run(world, "merchant", "rotate-credential", terminal_id)
    assert rotated.exit_code == 0, rotated.output
    secret = rotated.stdout.split()[-1]
    async with terminal_client(world, terminal_id, secret) as client:
        await eventually(lambda: succeeded(client.echo(b"ping")))
    missing = await subsidyctl_run(world, "merchant", "show", "m-nobody")
    assert missing.exit_code == 1
    assert "NOT_FOUND" in missing.output


@pytest.mark.parametrize(
    "command",
    ["onboard", "show", "suspend-terminal", "reinstate-terminal", "suspend", "reinstate", "rotate-credential"],
)
def test_every_merchant_command_has_help(command: str) -> None:
    """`subsidyctl merchant COMMAND --help` works without credentials or a gateway."""
    result = CliRunner().invoke(subsidyctl, ["merchant", command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_onboarding_file_mistakes_name_the_place_in_the_file(tmp_path: Path) -> None:
    """A misspelt key or an unquoted number in the onboarding file is refused before any call,
    naming where in the file."""
    document = yaml.safe_load((EXAMPLES / "suning-xiaoshan.yaml").read_text())
    document["stores"][0]["adress"] = document["stores"][0].pop("address")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    result = CliRunner().invoke(
        subsidyctl, ["merchant", "onboard", str(path)], env={"SUBSIDYCTL_OPERATOR": "x", "SUBSIDYCTL_SECRET": "y"}
    )
    assert result.exit_code == 1
    assert "stores[0]: unknown keys adress" in result.output
