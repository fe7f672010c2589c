"""``subsidyctl ledger reconcile`` compares the qualification counters in Redis (each campaign's
quota hash, each person's holder hash, voucher packs' fields included) with what the
qualification mirror in PostgreSQL says they must be, on real Redis and PostgreSQL through the
public API (the voucher-pack tests' gateway and helpers)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
from click.testing import CliRunner
from subsidy_client import ReportingClient, RetryPolicy
from subsidy_client.v1 import common_pb2, reporting_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from server.commands.common import EXIT_PROBLEM
from server.commands.ledger import with_connections
from server.ctl import main as subsidyctl
from storage.postgres.qualifications import QualificationMirror
from tests.conftest import consumer_key_of, id_number
from tests.integration import test_voucher_packs
from tests.integration.test_voucher_packs import HANGZHOU, OPERATOR, World, codes_of, create, new_id, pack_campaign

# The voucher-pack tests' gateway and clients (a module-scoped fixture: this module gets its own).
world = test_voucher_packs.world

HERE = common_pb2.Location(
    latitude=30.18, longitude=120.26, coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84, accuracy_m=10
)


async def asked_of_the_gateway(world: World) -> reporting_pb2.ReconcileResponse:
    client = ReportingClient(
        world.operator._target, OPERATOR, world.env.credentials[OPERATOR], retry=RetryPolicy(max_attempts=1)
    )
    try:
        return await client.reconcile()
    finally:
        await client.close()


def mirror_differences(response: reporting_pb2.ReconcileResponse) -> list[dict[str, Any]]:
    """The RPC's qualification differences in the ledger command's shape."""
    return [
        {"kind": item.kind, "key": item.key, "mirror": item.mirror_value, "redis": item.redis_value}
        for item in response.differences
        if item.kind in ("qualification", "voucher_pack")
    ]


async def reconciled(world: World) -> tuple[int, list[dict[str, Any]]]:
    """The reconcile command's exit status and differences, with the mirror drained first;
    asserts that the gateway's Reconcile finds the same qualification differences."""
    await QualificationMirror(world.redis, world.env.keys, world.env.pg_dsn).drain()
    status, result = await with_connections(world.env.config(), "reconcile", force=False)
    response = await asked_of_the_gateway(world)
    assert response.qualification_mirror.backlog == 0
    assert mirror_differences(response) == [
        item for item in result["differences"] if item["kind"] in ("qualification", "voucher_pack")
    ]
    return status, result["differences"]


async def test_reconcile_finds_a_voucher_pack_or_qualification_counter_redis_got_wrong(world: World) -> None:
    """Clean after packs held whole, held in part and returned, and one category claim; then
    each counter corrupted in Redis alone (the quota's packs claimed, a holder's vouchers live,
    a holder's packs issued this round, a category's quota claimed, a person's held and issued
    counts) is reported with both values, by the command (exit 1) and by the gateway's
    Reconcile alike; clean again once it is put back. Fails if reconcile skips the
    qualification hashes or miscounts a pack's vouchers or a category's claims."""
    campaign_id = new_id()
    await create(world, pack_campaign(campaign_id, HANGZHOU[:2], quota=3))
    held, partly, returned = id_number(), id_number(), id_number()
    await codes_of(world, held, campaign_id)
    await world.wallet.cancel((await codes_of(world, partly, campaign_id))[0])
    for code in await codes_of(world, returned, campaign_id):
        await world.wallet.cancel(code)
    claimant = id_number()
    issued = await world.wallet.claim(
        campaign_id="c-qual", category="general", id_number=claimant, location=HERE, fix_time_ms=int(time.time() * 1000)
    )
    assert issued.decision == qpb.CLAIM_DECISION_ISSUED
    assert await reconciled(world) == (0, [])

    keys = world.env.keys
    quota = keys.qualification_quota(campaign_id)
    corruptions = [
        (quota, "pack:p:claimed", "voucher_pack", f"quota:{campaign_id}:pack:p:claimed", 2),
        (
            keys.qualification_holder(campaign_id, consumer_key_of(partly)),
            "pack:p:live",
            "voucher_pack",
            f"holder:{campaign_id}:{consumer_key_of(partly)}:pack:p:live",
            1,
        ),
        (
            keys.qualification_holder(campaign_id, consumer_key_of(returned)),
            "pack:p:issued",
            "voucher_pack",
            f"holder:{campaign_id}:{consumer_key_of(returned)}:pack:p:issued",
            1,
        ),
        (
            keys.qualification_quota("c-qual"),
            "general:claimed",
            "qualification",
            "quota:c-qual:general:claimed",
            1,
        ),
        (
            keys.qualification_holder("c-qual", consumer_key_of(claimant)),
            "general",
            "qualification",
            f"holder:c-qual:{consumer_key_of(claimant)}:general",
            1,
        ),
        (
            keys.qualification_holder("c-qual", consumer_key_of(claimant)),
            "general:issued",
            "qualification",
            f"holder:c-qual:{consumer_key_of(claimant)}:general:issued",
            1,
        ),
    ]
    for key, field, kind, name, mirrored in corruptions:
        assert int(await world.redis.hget(key, field) or 0) == mirrored
        await world.redis.hincrby(key, field, 1)
        status, differences = await reconciled(world)
        assert status == EXIT_PROBLEM
        assert differences == [{"kind": kind, "key": name, "mirror": mirrored, "redis": mirrored + 1}]
        await world.redis.hincrby(key, field, -1)
    # A counter Redis lost (a pack's quota field deleted) is a difference too.
    await world.redis.hdel(quota, "pack:p:claimed")
    status, differences = await reconciled(world)
    assert (status, [(item["key"], item["redis"]) for item in differences]) == (
        EXIT_PROBLEM,
        [(f"quota:{campaign_id}:pack:p:claimed", 0)],
    )
    await world.redis.hset(quota, "pack:p:claimed", 2)
    assert await reconciled(world) == (0, [])


async def test_reporting_reconcile_reports_what_the_ledger_command_does(world: World, tmp_path: Path) -> None:
    """`subsidyctl reporting reconcile` (the gateway's Reconcile, for an operator without
    database access) is a finding (exit 1) exactly when the ledger command's answer is, or the
    comparison is premature: a qualification counter corrupted in Redis (shown with the
    mirror's count, not as the ledger's), a claim the mirror has not yet written (the backlog
    says so), a dead-lettered qualification change; clean (exit 0) otherwise."""
    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        orjson.dumps(
            {"target": world.operator._target, "operators": {OPERATOR: world.env.credentials[OPERATOR]}}
        ).decode()
    )
    base = ["--credentials", str(credentials)]

    async def subsidyctl_reconcile(*options: str) -> tuple[int, str]:
        result = await asyncio.to_thread(CliRunner().invoke, subsidyctl, [*base, *options, "reporting", "reconcile"])
        return result.exit_code, result.output

    mirror = QualificationMirror(world.redis, world.env.keys, world.env.pg_dsn)
    await mirror.drain()
    status, output = await subsidyctl_reconcile()
    assert status == 0, output
    assert "no differences" in output and "qualification mirror: 0 changes unwritten, 0 dead letters" in output

    # A claim not yet mirrored: the comparison is premature, and the answer says so.
    claimant = id_number()
    issued = await world.wallet.claim(
        campaign_id="c-qual", category="general", id_number=claimant, location=HERE, fix_time_ms=int(time.time() * 1000)
    )
    assert issued.decision == qpb.CLAIM_DECISION_ISSUED
    behind = await asked_of_the_gateway(world)
    assert behind.qualification_mirror.backlog >= 1
    status, output = await subsidyctl_reconcile()
    assert status == 1 and "qualification mirror: 0 changes unwritten" not in output, output
    await mirror.drain()
    assert (await subsidyctl_reconcile())[0] == 0

    # A corrupted counter: shown with the mirror's count, in the table and in JSON.
    holder = world.env.keys.qualification_holder("c-qual", consumer_key_of(claimant))
    await world.redis.hincrby(holder, "general", 1)
    status, output = await subsidyctl_reconcile("--json")
    assert status == 1, output
    (difference,) = orjson.loads(output)["differences"]
    assert difference == {
        "kind": "qualification",
        "key": f"holder:c-qual:{consumer_key_of(claimant)}:general",
        "ledger_value": "0",
        "redis_value": "2",
        "ledger_owner": "",
        "redis_owner": "",
        "mirror_value": "1",
    }
    status, output = await subsidyctl_reconcile()
    assert status == 1 and "MIRROR" in output.upper(), output
    await world.redis.hincrby(holder, "general", -1)
    assert (await subsidyctl_reconcile())[0] == 0

    # A dead-lettered qualification change: a row missing from the mirror.
    dead = world.env.keys.qualification_events + ":dead"
    await world.redis.xadd(dead, {"q": "{}"})
    try:
        command_status, result = await with_connections(world.env.config(), "reconcile", force=False)
        assert (command_status, result["streams"]["qualification_mirror"]["dead_letters"]) == (EXIT_PROBLEM, 1)
        assert (await asked_of_the_gateway(world)).qualification_mirror.dead_letters == 1
        status, output = await subsidyctl_reconcile()
        assert status == 1 and "1 dead letters" in output, output
    finally:
        await world.redis.delete(dead)
    assert (await subsidyctl_reconcile())[0] == 0
