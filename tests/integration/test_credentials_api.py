"""CredentialService and `subsidyctl credential` against real PostgreSQL and Redis (issue 13,
item 9: onboarding without YAML).

The module runs its own world (database, Redis prefix) and two gateways, each with its own
credential cache refreshing every 200 ms (production: 1 s), standing in for two gateway
processes: a change made through one must reach the other within the cache's bound.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner, Result
from redis.asyncio import Redis
from subsidy_client import CredentialClient, RetryPolicy
from subsidy_client.errors import (
    AlreadyExists,
    FailedPrecondition,
    IdempotencyConflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from subsidy_client.v1 import credentials_pb2 as pb

from server.ctl import main as subsidyctl
from server.domain.credentials import refuse_status_change
from storage.devenv import Services
from tests.conftest import Environment, isolated_environment, load_document, running_gateway

OPERATOR = "op-auditor"  # the fixture's only active operator-role credential
ROLES = {
    "partner": pb.CREDENTIAL_ROLE_PARTNER,
    "provider": pb.CREDENTIAL_ROLE_PROVIDER,
    "operator": pb.CREDENTIAL_ROLE_OPERATOR,
    "government": pb.CREDENTIAL_ROLE_GOVERNMENT,
    "auditor": pb.CREDENTIAL_ROLE_AUDITOR,
}


@dataclass(frozen=True)
class World:
    env: Environment
    targets: tuple[str, str]
    operator: CredentialClient


def client(target: str, caller_id: str, secret: str) -> CredentialClient:
    # One attempt per call, so that a test sees exactly what the gateway answered.
    return CredentialClient(target, caller_id, secret, deadline_s=10.0, retry=RetryPolicy(max_attempts=1))


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[World]:
    async with isolated_environment(services) as env:
        config = env.config(credentials_refresh_ms=200)
        async with running_gateway(config) as first, running_gateway(config) as second:
            targets = (f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}")
            async with client(targets[0], OPERATOR, env.credentials[OPERATOR]) as operator:
                yield World(env, targets, operator)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Polls until ``check`` holds: for effects bounded by the credential cache's refresh."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.05)


async def outcome(target: str, caller_id: str, secret: str) -> str:
    """What a ListCredentials call signed by this caller gets: "ok" (an operator),
    "denied" (authenticated, another role) or "unauthenticated"."""
    async with client(target, caller_id, secret) as caller:
        try:
            await caller.list_credentials()
        except PermissionDenied:
            return "denied"
        except Unauthenticated:
            return "unauthenticated"
    return "ok"


async def on_every_gateway(world: World, caller_id: str, secret: str, expected: str) -> None:
    for target in world.targets:

        async def holds(target: str = target) -> bool:
            return await outcome(target, caller_id, secret) == expected

        await eventually(holds)


async def create(world: World, role: str, credential_id: str | None = None) -> tuple[str, str]:
    credential_id = credential_id or unique(role[:3])
    response = await world.operator.create_credential(credential_id, ROLES[role], f"{role} 测试")
    assert response.secret and response.credential.status == pb.CREDENTIAL_STATUS_ACTIVE
    return credential_id, response.secret


async def audit_rows(env: Environment, credential_id: str) -> list[dict[str, Any]]:
    connection = await asyncpg.connect(env.pg_dsn, timeout=10)
    try:
        rows = await connection.fetch(
            "SELECT operator_id, action, details::text AS details FROM operator_actions"
            " WHERE target_kind = 'credential' AND target_id = $1 ORDER BY action_id",
            credential_id,
        )
    finally:
        await connection.close()
    return [dict(row) for row in rows]


# --- Roles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", sorted(ROLES))
async def test_a_created_credential_signs_calls_with_its_role_on_every_gateway(world: World, role: str) -> None:
    """A credential created through the API authenticates at once on both gateways with the
    role it was given: an operator may use CredentialService, every other role is refused
    PERMISSION_DENIED (so it was authenticated, and is not an operator)."""
    credential_id, secret = await create(world, role)
    expected = "ok" if role == "operator" else "denied"
    await on_every_gateway(world, credential_id, secret, expected)
    listed = {credential.credential_id: credential for credential in await world.operator.list_credentials()}
    assert listed[credential_id].role == ROLES[role] and listed[credential_id].managed_by_api


async def test_terminals_and_fixture_roles_are_refused_permission_denied(world: World) -> None:
    """Only operator credentials may call CredentialService: a terminal, a partner app and a
    provider from the reference file are each refused PERMISSION_DENIED."""
    for caller_id in ("t-main-01", "p-wallet-01", "p-peer-01"):
        assert await outcome(world.targets[0], caller_id, world.env.credentials[caller_id]) == "denied", caller_id


async def test_list_never_returns_secrets(world: World) -> None:
    """ListCredentials names every non-terminal credential with its role and status, and no
    secret appears anywhere in its bytes."""
    credential_id, secret = await create(world, "partner")
    async with client(world.targets[0], OPERATOR, world.env.credentials[OPERATOR]) as operator:
        response = await operator._call(  # the raw message, to search its bytes
            "/subsidy.v1.CredentialService/ListCredentials", pb.ListCredentialsRequest(), pb.ListCredentialsResponse
        )
    raw = response.SerializeToString()
    assert secret.encode() not in raw and world.env.credentials[OPERATOR].encode() not in raw
    ids = [credential.credential_id for credential in response.credentials]
    assert credential_id in ids and {"op-auditor", "op-gone", "p-wallet-01"} <= set(ids)
    assert "t-main-01" not in ids and ids == sorted(ids)


# --- Create, rotate, suspend ------------------------------------------------------------------


async def test_create_is_idempotent_and_shows_the_secret_once(world: World) -> None:
    """A replayed CreateCredential answers with the same credential and an empty secret; the
    same request_id with another payload is IDEMPOTENCY_CONFLICT; an id already taken (by a
    terminal or a credential) is ALREADY_EXISTS. One audit row, without the secret."""
    credential_id, request_id = unique("gov"), str(uuid.uuid4())
    first = await world.operator.create_credential(
        credential_id, pb.CREDENTIAL_ROLE_GOVERNMENT, "区商务局", request_id=request_id
    )
    again = await world.operator.create_credential(
        credential_id, pb.CREDENTIAL_ROLE_GOVERNMENT, "区商务局", request_id=request_id
    )
    assert first.secret and again.secret == "" and again.credential == first.credential
    with pytest.raises(IdempotencyConflict):
        await world.operator.create_credential(
            credential_id, pb.CREDENTIAL_ROLE_AUDITOR, "区商务局", request_id=request_id
        )
    for taken in (credential_id, "t-main-01", "p-wallet-01"):
        with pytest.raises(AlreadyExists) as raised:
            await world.operator.create_credential(taken, pb.CREDENTIAL_ROLE_PARTNER, "dup")
        assert not isinstance(raised.value, IdempotencyConflict)
    rows = await audit_rows(world.env, credential_id)
    assert [row["action"] for row in rows] == ["CreateCredential"] and rows[0]["operator_id"] == OPERATOR
    assert first.secret not in rows[0]["details"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"credential_id": "bad id!", "role": pb.CREDENTIAL_ROLE_PARTNER, "display_name": "x"}, "credential_id"),
        ({"credential_id": "ok-id", "role": pb.CREDENTIAL_ROLE_UNSPECIFIED, "display_name": "x"}, "role"),
        ({"credential_id": "ok-id", "role": pb.CREDENTIAL_ROLE_PARTNER, "display_name": ""}, "display_name"),
    ],
)
async def test_bad_create_requests_name_the_field(world: World, fields: dict[str, Any], field: str) -> None:
    """An id outside [A-Za-z0-9_.-]{1,64}, no role, or no display name: INVALID_ARGUMENT naming it."""
    with pytest.raises(InvalidArgument) as raised:
        await world.operator.create_credential(fields["credential_id"], fields["role"], fields["display_name"])
    assert raised.value.metadata["field"] == field


async def test_rotation_replaces_the_secret_on_every_gateway(world: World) -> None:
    """After RotateCredential the new secret works and the old one is refused UNAUTHENTICATED on
    both gateways; a replay returns no secret and rotates nothing; an unknown id is NOT_FOUND."""
    credential_id, old = await create(world, "provider")
    await on_every_gateway(world, credential_id, old, "denied")
    request_id = str(uuid.uuid4())
    rotated = await world.operator.rotate_credential(credential_id, request_id=request_id)
    assert rotated.secret and rotated.secret != old
    await on_every_gateway(world, credential_id, old, "unauthenticated")
    await on_every_gateway(world, credential_id, rotated.secret, "denied")
    replay = await world.operator.rotate_credential(credential_id, request_id=request_id)
    assert replay.secret == ""
    await on_every_gateway(world, credential_id, rotated.secret, "denied")
    with pytest.raises(NotFound):
        await world.operator.rotate_credential("nobody-here")


async def test_suspension_reaches_every_gateway_and_reinstating_restores_it(world: World) -> None:
    """A suspended partner credential is refused UNAUTHENTICATED on its next call on both
    gateways (each with its own cache) within the refresh bound; reinstated, it works again with
    the same secret. Suspending needs a reason; both changes are in the audit trail."""
    credential_id, secret = await create(world, "partner")
    await on_every_gateway(world, credential_id, secret, "denied")
    with pytest.raises(InvalidArgument) as raised:
        await world.operator.set_credential_status(credential_id, pb.CREDENTIAL_STATUS_SUSPENDED, "")
    assert raised.value.metadata["field"] == "reason"
    suspended = await world.operator.set_credential_status(
        credential_id, pb.CREDENTIAL_STATUS_SUSPENDED, "contract ended"
    )
    assert suspended.credential.status == pb.CREDENTIAL_STATUS_SUSPENDED
    await on_every_gateway(world, credential_id, secret, "unauthenticated")
    await world.operator.set_credential_status(credential_id, pb.CREDENTIAL_STATUS_ACTIVE)
    await on_every_gateway(world, credential_id, secret, "denied")
    actions = [row["action"] for row in await audit_rows(world.env, credential_id)]
    assert actions == ["CreateCredential", "SetCredentialStatus", "SetCredentialStatus"]


async def test_an_operator_cannot_suspend_itself_or_the_last_active_operator(world: World) -> None:
    """Suspending one's own credential is refused FAILED_PRECONDITION naming SELF_SUSPENSION.
    Two operators suspending each other: the first wins; the second, still authenticated by a
    gateway whose cache has not refreshed, is refused LAST_ACTIVE_OPERATOR, so one operator
    always remains. Refused calls change nothing and leave no audit row."""
    with pytest.raises(FailedPrecondition) as raised:
        await world.operator.set_credential_status(OPERATOR, pb.CREDENTIAL_STATUS_SUSPENDED, "leaving")
    assert raised.value.metadata["refusal"] == "SELF_SUSPENSION" and "own credential" in str(raised.value)
    # Leave two active operators: this one and a new one (other tests create more).
    for credential in await world.operator.list_credentials():
        if credential.role == pb.CREDENTIAL_ROLE_OPERATOR and credential.credential_id != OPERATOR:
            await world.operator.set_credential_status(
                credential.credential_id, pb.CREDENTIAL_STATUS_SUSPENDED, "test set-up"
            )
    other_id, other_secret = await create(world, "operator")
    # A gateway that does not refresh in this test: it keeps other_id's credential cached.
    async with running_gateway(world.env.config(credentials_refresh_ms=3_600_000)) as stale:
        target = f"127.0.0.1:{stale.port}"
        await world.operator.set_credential_status(other_id, pb.CREDENTIAL_STATUS_SUSPENDED, "rotation of staff")
        async with client(target, other_id, other_secret) as other:
            with pytest.raises(FailedPrecondition) as raised:
                await other.set_credential_status(OPERATOR, pb.CREDENTIAL_STATUS_SUSPENDED, "takeover")
    assert raised.value.metadata["refusal"] == "LAST_ACTIVE_OPERATOR"
    await on_every_gateway(world, OPERATOR, world.env.credentials[OPERATOR], "ok")
    assert [row["action"] for row in await audit_rows(world.env, OPERATOR)] == []
    await world.operator.set_credential_status(other_id, pb.CREDENTIAL_STATUS_ACTIVE)


def test_status_rules_pure() -> None:
    """The rule itself: reinstating or re-suspending is never refused; a government or auditor
    credential may be suspended even when it is the only one."""

    def refusal(credential_id: str, role: str, active: str, new_status: str = "SUSPENDED") -> str | None:
        found = refuse_status_change(
            acting_operator_id="a",
            credential_id=credential_id,
            role=role,
            current_status="ACTIVE",
            new_status=new_status,
            active_operator_ids=frozenset(active),
        )
        return None if found is None else found.refusal

    assert refusal("b", "operator", "ab") is None
    assert refusal("g", "government", "a") is None
    assert refusal("b", "operator", "b") == "LAST_ACTIVE_OPERATOR"
    assert refusal("a", "operator", "ab") == "SELF_SUSPENSION"
    assert refusal("a", "operator", "", new_status="ACTIVE") is None


# --- Restart and reference reloads ------------------------------------------------------------


async def test_api_credentials_survive_a_restart_and_a_yaml_reload(world: World) -> None:
    """A reference file naming credentials the API manages leaves them as the API set them: a
    credential suspended through the API stays suspended (the file says ACTIVE), a secret
    rotated through the API stays (the file sets another), and the file's secret is refused.
    A gateway started afterwards (a restart) authenticates them from the published state."""
    yaml_partner = "p-bank-01"  # ACTIVE in the fixture file
    await world.operator.set_credential_status(yaml_partner, pb.CREDENTIAL_STATUS_SUSPENDED, "audit finding")
    staff_id, _ = await create(world, "auditor")
    rotated = (await world.operator.rotate_credential(staff_id)).secret
    file_secret = "file-secret-0123456789abcdef0123456789"
    issued = await load_document(
        world.env,
        {
            "partners": [{"id": yaml_partner, "name": "A bank app", "kind": "APP", "status": "ACTIVE"}],
            "operators": [{"id": staff_id, "name": "from the file", "role": "operator", "secret": file_secret}],
        },
    )
    assert yaml_partner not in issued and staff_id not in issued
    async with running_gateway(world.env.config(credentials_refresh_ms=200)) as restarted:
        target = f"127.0.0.1:{restarted.port}"
        assert await outcome(target, yaml_partner, world.env.credentials[yaml_partner]) == "unauthenticated"
        assert await outcome(target, staff_id, rotated) == "denied"  # still an auditor
        assert await outcome(target, staff_id, file_secret) == "unauthenticated"
    listed = {credential.credential_id: credential for credential in await world.operator.list_credentials()}
    assert listed[yaml_partner].status == pb.CREDENTIAL_STATUS_SUSPENDED
    assert listed[staff_id].role == pb.CREDENTIAL_ROLE_AUDITOR and listed[staff_id].display_name == "auditor 测试"
    await world.operator.set_credential_status(yaml_partner, pb.CREDENTIAL_STATUS_ACTIVE)


async def test_yaml_still_manages_the_credentials_it_alone_has_set(world: World) -> None:
    """Credentials the API never touched keep following the file: a reload that suspends one
    withdraws it."""
    await load_document(world.env, {"partners": [{"id": "p-wallet-01", "name": "A wallet app", "status": "SUSPENDED"}]})
    await on_every_gateway(world, "p-wallet-01", world.env.credentials["p-wallet-01"], "unauthenticated")
    await load_document(world.env, {"partners": [{"id": "p-wallet-01", "name": "A wallet app"}]})
    await on_every_gateway(world, "p-wallet-01", world.env.credentials["p-wallet-01"], "denied")


# --- subsidyctl credential --------------------------------------------------------------------


async def subsidyctl_run(world: World, *arguments: str) -> Result:
    """Runs subsidyctl in a worker thread (it runs its own event loop) as op-auditor."""
    environment = {"SUBSIDYCTL_OPERATOR": OPERATOR, "SUBSIDYCTL_SECRET": world.env.credentials[OPERATOR]}
    return await asyncio.to_thread(
        CliRunner().invoke,
        subsidyctl,
        ["--target", world.targets[0], *arguments],
        env=environment,
        catch_exceptions=False,
    )


async def test_subsidyctl_credential_lifecycle(world: World) -> None:
    """`credential create` prints the secret once on stdout (the warning on stderr) and the
    secret works; `rotate` with the same --request-id twice rotates once and prints no secret
    the second time; `suspend` needs --reason and cuts the credential off; `activate` restores
    it; `list` shows it in a table and in JSON, never with a secret."""
    credential_id = unique("prv")
    created = await subsidyctl_run(
        world, "credential", "create", credential_id, "--role", "provider", "--name", "邻区服务商", "--json"
    )
    assert created.exit_code == 0, created.output
    document = json.loads(created.stdout)
    secret = document["secret"]
    assert len(secret) >= 43 and document["credential"]["role"] == "CREDENTIAL_ROLE_PROVIDER"
    assert "shown this once" in created.stderr and secret not in created.stderr
    await on_every_gateway(world, credential_id, secret, "denied")

    request_id = str(uuid.uuid4())
    rotated = await subsidyctl_run(world, "credential", "rotate", credential_id, "--request-id", request_id)
    assert rotated.exit_code == 0, rotated.output
    replayed = await subsidyctl_run(world, "credential", "rotate", credential_id, "--request-id", request_id)
    assert replayed.exit_code == 0 and "used already" in replayed.stderr
    new_secret = next(word for word in rotated.stdout.split() if len(word) >= 43)
    assert new_secret not in replayed.stdout
    await on_every_gateway(world, credential_id, secret, "unauthenticated")
    await on_every_gateway(world, credential_id, new_secret, "denied")

    assert (await subsidyctl_run(world, "credential", "suspend", credential_id)).exit_code == 2  # --reason
    suspended = await subsidyctl_run(world, "credential", "suspend", credential_id, "--reason", "contract ended")
    assert suspended.exit_code == 0 and "SUSPENDED" in suspended.stdout
    await on_every_gateway(world, credential_id, new_secret, "unauthenticated")
    assert (await subsidyctl_run(world, "credential", "activate", credential_id)).exit_code == 0
    await on_every_gateway(world, credential_id, new_secret, "denied")

    table = await subsidyctl_run(world, "credential", "list")
    assert table.exit_code == 0 and credential_id in table.stdout and "provider" in table.stdout
    listed = json.loads((await subsidyctl_run(world, "credential", "list", "--json")).stdout)["credentials"]
    assert {"credential_id": credential_id, "role": "provider", "status": "ACTIVE"}.items() <= next(
        row for row in listed if row["credential_id"] == credential_id
    ).items()
    assert new_secret not in table.stdout and "secret" not in json.dumps(listed)


async def test_subsidyctl_names_the_refusal(world: World) -> None:
    """Suspending one's own credential through subsidyctl exits 1 naming SELF_SUSPENSION."""
    result = await subsidyctl_run(world, "credential", "suspend", OPERATOR, "--reason", "leaving")
    assert result.exit_code == 1 and "SELF_SUSPENSION" in result.output and "own credential" in result.output


async def test_a_replay_completes_a_publication_cut_short(world: World) -> None:
    """A suspension committed in PostgreSQL whose publication to Redis did not happen (here: the
    credential written back into the Redis hash afterwards, as if the call had failed between
    commit and publish) is completed by the client's retry with the same request_id: the replay
    changes nothing in PostgreSQL but publishes the committed state, so the credential is cut off."""
    credential_id, secret = await create(world, "partner")
    redis = Redis.from_url(world.env.redis_url)
    try:
        published = await redis.hget(world.env.keys.credentials, credential_id)
        assert published is not None
        request_id = str(uuid.uuid4())
        await world.operator.set_credential_status(
            credential_id, pb.CREDENTIAL_STATUS_SUSPENDED, "key leaked", request_id=request_id
        )
        await redis.hset(world.env.keys.credentials, credential_id, published)
        await redis.incr(world.env.keys.reference_version)
        await on_every_gateway(world, credential_id, secret, "denied")  # the lost publication
        await world.operator.set_credential_status(
            credential_id, pb.CREDENTIAL_STATUS_SUSPENDED, "key leaked", request_id=request_id
        )
        assert await redis.hget(world.env.keys.credentials, credential_id) is None
        await on_every_gateway(world, credential_id, secret, "unauthenticated")
        assert len(await audit_rows(world.env, credential_id)) == 2  # create, one suspension
    finally:
        await redis.aclose()
