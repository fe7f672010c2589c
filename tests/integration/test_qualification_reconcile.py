"""``subsidyctl ledger reconcile`` compares the qualification counters in Redis (each campaign's
quota hash, each person's holder hash, voucher packs' fields included) with what the
qualification mirror in PostgreSQL says they must be, on real Redis and PostgreSQL through the
public API (the voucher-pack tests' gateway and helpers)."""

from __future__ import annotations

import time
from typing import Any

from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from server.commands.common import EXIT_PROBLEM
from server.commands.ledger import with_connections
from storage.postgres.qualifications import QualificationMirror
from tests.conftest import consumer_key_of, id_number
from tests.integration import test_voucher_packs
from tests.integration.test_voucher_packs import HANGZHOU, World, codes_of, create, new_id, pack_campaign

# The voucher-pack tests' gateway and clients (a module-scoped fixture: this module gets its own).
world = test_voucher_packs.world

HERE = common_pb2.Location(
    latitude=30.18, longitude=120.26, coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84, accuracy_m=10
)


async def reconciled(world: World) -> tuple[int, list[dict[str, Any]]]:
    """The reconcile command's exit status and differences, with the mirror drained first."""
    await QualificationMirror(world.redis, world.env.keys, world.env.pg_dsn).drain()
    status, result = await with_connections(world.env.config(), "reconcile", force=False)
    return status, result["differences"]


async def test_reconcile_finds_a_voucher_pack_or_qualification_counter_redis_got_wrong(world: World) -> None:
    """Clean after packs held whole, held in part and returned, and one category claim; then
    each counter corrupted in Redis alone (the quota's packs claimed, a holder's vouchers live,
    a holder's packs issued this round, a category's quota and a person's issued count) is
    reported with both values and the command exits 1; clean again once it is put back.
    Fails if reconcile skips the qualification hashes or miscounts a pack's vouchers."""
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
        assert differences == [{"kind": kind, "key": name, "ledger": mirrored, "redis": mirrored + 1}]
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
