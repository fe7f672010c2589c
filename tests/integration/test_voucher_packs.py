"""Voucher packs (issue 13, item 5) through the public API, on real Redis and PostgreSQL.

A claim naming a pack takes every voucher of it in one script call or none: each voucher its
own code, expiry and "X off Y", the pack's quota counting packs, a person holding a pack once
per round. A pack goes back to the pool only when every voucher of it expired unused or was
cancelled. Campaigns are created through CampaignService; bad packs and bad pack claims are
INVALID_ARGUMENT naming the field, with nothing written. The flash crowd across processes is
at the end (marked slow, like tests/integration/test_flash_crowd.py).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from click.testing import CliRunner
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy, SignedClient
from subsidy_client.errors import InvalidArgument, NotFound
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import campaign_pb2 as cpb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from server.ctl import main as subsidyctl
from storage.devenv import Services
from storage.postgres.qualifications import QualificationMirror, restore_qualifications
from storage.redis.migrations import migrate_issued_counts
from tests.conftest import (
    Environment,
    consumer_key_of,
    id_number,
    isolated_environment,
    running_gateway,
    snapshot,
)
from tests.integration.loadgen import ClaimJob, run_claim_job
from tests.integration.test_concurrency import free_port, server_processes

SERVICE = "/subsidy.v1.CampaignService/"
OPERATOR = "op-auditor"
GOODS = "6970000000086"  # category general, no serial
XIAOSHAN_GOVERNMENT = (30.18, 120.26)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "campaigns"
HANGZHOU = ((2_000, 500), (4_000, 1_000), (8_000, 2_000))  # "5 off 20, 10 off 40, 20 off 80"


@dataclass
class World:
    env: Environment
    operator: SignedClient
    wallet: QualificationClient
    till: AuthorizationClient
    redis: Redis


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[World]:
    # The sweeper runs every 50 ms: the expiry tests wait for it.
    async with (
        isolated_environment(services) as env,
        running_gateway(env.config(sweep_interval_ms=50)) as gateway,
    ):
        target = f"127.0.0.1:{gateway.port}"
        once = RetryPolicy(max_attempts=1)
        operator = SignedClient(target, OPERATOR, env.credentials[OPERATOR], deadline_s=10.0, retry=once)
        wallet = QualificationClient(target, "p-wallet-01", env.credentials["p-wallet-01"], retry=once)
        till = AuthorizationClient(target, "t-main-01", env.credentials["t-main-01"], retry=once)
        redis = Redis.from_url(env.redis_url)
        try:
            yield World(env, operator, wallet, till, redis)
        finally:
            for client in (operator, wallet, till):
                await client.close()
            await redis.aclose()


def stamp(moment: float) -> Timestamp:
    result = Timestamp()
    result.FromMilliseconds(int(moment * 1000))
    return result


def pack_campaign(
    campaign_id: str,
    vouchers: Sequence[tuple[int, int]] = HANGZHOU,
    quota: int = 100,
    *,
    validity_s: int = 3600,
    per_person_limit: int | None = None,
    tranches: Sequence[tuple[float, int]] = (),
    reclaim: bool = False,
) -> cpb.Campaign:
    """A voucher campaign (no region) with one pack "p" of ``vouchers`` (threshold, off) of
    category general, whose FIXED rule lets a person redeem every voucher of it."""
    return cpb.Campaign(
        campaign_id=campaign_id,
        name=campaign_id,
        status=cpb.CAMPAIGN_STATUS_ACTIVE,
        starts_at=stamp(datetime(2020, 1, 1, tzinfo=UTC).timestamp()),
        ends_at=stamp(datetime(2099, 1, 1, tzinfo=UTC).timestamp()),
        qualification_validity_s=validity_s,
        refund_policy=cpb.REFUND_POLICY_RESTORE_ON_FULL_REFUND,
        reclaim_after_expiry=reclaim,
        rules=[
            cpb.CategoryRule(
                category="general",
                kind=cpb.RULE_KIND_FIXED,
                threshold_fen=2_000,
                off_fen=500,
                per_person_limit=per_person_limit or max(len(vouchers), 1),
                budget_fen=10_000_000_000,
            )
        ],
        packs=[
            cpb.VoucherPack(
                pack_id="p",
                vouchers=[
                    cpb.PackVoucher(category="general", threshold_fen=threshold, off_fen=off)
                    for threshold, off in vouchers
                ],
                quota=quota,
                tranches=[cpb.QualificationTranche(release_at=stamp(at), count=count) for at, count in tranches],
            )
        ],
    )


def new_id() -> str:
    return "c-pack-" + secrets.token_hex(4)


async def create(world: World, campaign: cpb.Campaign) -> cpb.Campaign:
    request = cpb.CreateCampaignRequest(request_id=str(uuid.uuid4()), campaign=campaign)
    return (await world.operator._call(SERVICE + "CreateCampaign", request, cpb.CreateCampaignResponse)).campaign


async def fetch(world: World, campaign_id: str) -> cpb.Campaign:
    request = cpb.GetCampaignRequest(campaign_id=campaign_id)
    return (await world.operator._call(SERVICE + "GetCampaign", request, cpb.GetCampaignResponse)).campaign


async def budget_status(world: World, campaign_id: str) -> cpb.GetBudgetStatusResponse:
    request = cpb.GetBudgetStatusRequest(campaign_id=campaign_id)
    return await world.operator._call(SERVICE + "GetBudgetStatus", request, cpb.GetBudgetStatusResponse)


def location() -> common_pb2.Location:
    return common_pb2.Location(
        latitude=XIAOSHAN_GOVERNMENT[0],
        longitude=XIAOSHAN_GOVERNMENT[1],
        coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84,
        accuracy_m=20.0,
    )


async def claim(
    world: World,
    person: str,
    campaign_id: str,
    pack_id: str = "p",
    request_id: str | None = None,
    fix_time_ms: int | None = None,
) -> qpb.ClaimQualificationResponse:
    return await world.wallet.claim(
        campaign_id=campaign_id,
        category="",
        pack_id=pack_id,
        id_number=person,
        location=location(),
        fix_time_ms=fix_time_ms or int(time.time() * 1000),
        request_id=request_id,
    )


def decision(response: qpb.ClaimQualificationResponse) -> str:
    if response.decision == qpb.CLAIM_DECISION_ISSUED:
        return "ISSUED"
    return qpb.ClaimDeclineReason.Name(response.decline_reason).removeprefix("CLAIM_DECLINE_REASON_")


async def codes_of(world: World, person: str, campaign_id: str) -> list[str]:
    response = await claim(world, person, campaign_id)
    assert decision(response) == "ISSUED", response
    return [qualification.redemption_code for qualification in response.qualifications]


def outcome(response: apb.AuthorizeResponse) -> str:
    if response.decision == apb.DECISION_APPROVED:
        return "APPROVED"
    return apb.DeclineReason.Name(response.decline_reason).removeprefix("DECLINE_REASON_")


async def pay(world: World, person: str, code: str, campaign_id: str, price_fen: int) -> apb.AuthorizeResponse:
    return await world.till.authorize(
        campaign_id=campaign_id,
        consumer_key=consumer_key_of(person),
        lines=[Line("1", GOODS, price_fen)],
        redemption_code=code,
    )


async def counters(world: World, campaign_id: str, person: str) -> tuple[dict[str, str], dict[str, str]]:
    """The campaign's quota hash and the person's holder hash, as text."""
    keys = world.env.keys
    quota = await world.redis.hgetall(keys.qualification_quota(campaign_id))
    holder = await world.redis.hgetall(keys.qualification_holder(campaign_id, consumer_key_of(person)))
    return (
        {key.decode(): value.decode() for key, value in quota.items()},
        {key.decode(): value.decode() for key, value in holder.items()},
    )


async def until_state(world: World, codes: Sequence[str], state: int) -> None:
    """Waits (at most 10 s) for the sweeper to bring every code to ``state``."""
    states: list[int] = []
    for _ in range(200):
        states = [(await world.wallet.get(code)).state for code in codes]
        if set(states) == {state}:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not all {state}: {states}")


# --- Claiming a pack ---------------------------------------------------------------------------


async def test_a_pack_is_claimed_whole_each_voucher_with_its_own_code_expiry_and_amounts(world: World) -> None:
    """The Hangzhou pack: one claim issues its three vouchers in the pack's order, each with
    its own code, an expiry of issue + validity, the pack's id and its own "X off Y"; the
    single ``qualification`` (for clients unaware of packs) is the first. The quota and the
    person count one pack; the category's own counters are untouched."""
    campaign_id = new_id()
    await create(world, pack_campaign(campaign_id, validity_s=7 * 86_400))
    person = id_number()
    response = await claim(world, person, campaign_id)
    assert decision(response) == "ISSUED"
    vouchers = list(response.qualifications)
    assert [(q.threshold_fen, q.off_fen) for q in vouchers] == list(HANGZHOU)
    assert len({q.redemption_code for q in vouchers}) == 3
    assert response.qualification == vouchers[0]
    for voucher in vouchers:
        assert (voucher.pack_id, voucher.category, voucher.campaign_id) == ("p", "general", campaign_id)
        assert voucher.state == qpb.QUALIFICATION_STATE_ISSUED
        assert voucher.consumer_key == consumer_key_of(person)
        validity_ms = voucher.expires_at.ToMilliseconds() - voucher.issued_at.ToMilliseconds()
        assert validity_ms == 7 * 86_400 * 1000
        # Each is a qualification of its own: readable by its code, with its amounts.
        stored = await world.wallet.get(voucher.redemption_code)
        assert (stored.pack_id, stored.threshold_fen, stored.off_fen, stored.expires_at) == (
            "p",
            voucher.threshold_fen,
            voucher.off_fen,
            voucher.expires_at,
        )
    quota, holder = await counters(world, campaign_id, person)
    assert quota == {"pack:p:claimed": "1"}
    assert holder == {"pack:p": "1", "pack:p:issued": "1", "pack:p:live": "3"}
    listed = await world.wallet.list(person, campaign_id)
    assert sorted(q.redemption_code for q in listed) == sorted(q.redemption_code for q in vouchers)


async def test_claim_once_per_person_and_a_retry_replays_the_same_pack(world: World) -> None:
    """A second claim of the pack by the same person is declined PERSON_LIMIT_REACHED with
    nothing issued; a retry of the first claim (same request_id) answers its three codes again,
    marked replayed, and issues nothing more."""
    campaign_id = new_id()
    await create(world, pack_campaign(campaign_id))
    person, request_id, fixed = id_number(), str(uuid.uuid4()), int(time.time() * 1000)
    first = await claim(world, person, campaign_id, request_id=request_id, fix_time_ms=fixed)
    again = await claim(world, person, campaign_id, request_id=request_id, fix_time_ms=fixed)
    assert decision(first) == "ISSUED" and again.replayed and not first.replayed
    assert [q.redemption_code for q in again.qualifications] == [q.redemption_code for q in first.qualifications]
    assert decision(await claim(world, person, campaign_id)) == "PERSON_LIMIT_REACHED"
    quota, holder = await counters(world, campaign_id, person)
    assert quota == {"pack:p:claimed": "1"} and holder["pack:p"] == "1" and holder["pack:p:issued"] == "1"
    assert len(await world.wallet.list(person, campaign_id)) == 3


async def test_each_voucher_is_redeemed_once_at_its_own_threshold(world: World) -> None:
    """Authorize applies each voucher's own "X off Y": one fen under its threshold is
    PRICE_BELOW_THRESHOLD, at the threshold its own amount off (not the rule's 5 off 20); once
    captured it is REDEEMED and a second payment with it is QUALIFICATION_NOT_USABLE."""
    campaign_id = new_id()
    # One redemption more than the pack holds per person, so a reused code meets its own reason.
    await create(world, pack_campaign(campaign_id, per_person_limit=4))
    person = id_number()
    codes = await codes_of(world, person, campaign_id)
    for code, (threshold, off) in zip(codes, HANGZHOU, strict=True):
        assert outcome(await pay(world, person, code, campaign_id, threshold - 1)) == "PRICE_BELOW_THRESHOLD"
        approved = await pay(world, person, code, campaign_id, threshold)
        assert outcome(approved) == "APPROVED" and approved.subsidy_fen == off
        await world.till.capture(approved.authorization_id)
        assert (await world.wallet.get(code)).state == qpb.QUALIFICATION_STATE_REDEEMED
        assert outcome(await pay(world, person, code, campaign_id, threshold)) == "QUALIFICATION_NOT_USABLE"
    # Someone else cannot use a code of this pack.
    assert outcome(await pay(world, id_number(), codes[0], campaign_id, 10_000)) == "QUALIFICATION_NOT_FOUND"


async def test_a_voucher_keeps_the_amounts_it_was_issued_with(world: World) -> None:
    """UpdateCampaign changing the pack's amounts applies to later claims: a voucher claimed
    before keeps its own "5 off 20", one claimed after has the new "6 off 30"."""
    campaign_id = new_id()
    await create(world, pack_campaign(campaign_id, HANGZHOU[:1]))
    before, after = id_number(), id_number()
    (old_code,) = await codes_of(world, before, campaign_id)
    request = cpb.UpdateCampaignRequest(
        request_id=str(uuid.uuid4()), campaign=pack_campaign(campaign_id, [(3_000, 600)])
    )
    await world.operator._call(SERVICE + "UpdateCampaign", request, cpb.UpdateCampaignResponse)
    (new_code,) = await codes_of(world, after, campaign_id)
    old_payment = await pay(world, before, old_code, campaign_id, 2_000)
    assert outcome(old_payment) == "APPROVED" and old_payment.subsidy_fen == 500
    assert outcome(await pay(world, after, new_code, campaign_id, 2_999)) == "PRICE_BELOW_THRESHOLD"
    new_payment = await pay(world, after, new_code, campaign_id, 3_000)
    assert outcome(new_payment) == "APPROVED" and new_payment.subsidy_fen == 600


async def test_the_quota_counts_packs(world: World) -> None:
    """Quota 1: one pack of three is issued (three codes), the next person's claim is
    QUOTA_EXHAUSTED with nothing issued. Quota 2: exactly two packs, six codes. GetBudgetStatus
    counts packs."""
    for quota in (1, 2):
        campaign_id = new_id()
        await create(world, pack_campaign(campaign_id, quota=quota))
        people = [id_number() for _ in range(quota + 2)]
        answers = [await claim(world, person, campaign_id) for person in people]
        assert [decision(answer) for answer in answers] == ["ISSUED"] * quota + ["QUOTA_EXHAUSTED"] * 2
        assert sum(len(answer.qualifications) for answer in answers) == 3 * quota
        quota_hash, holder = await counters(world, campaign_id, people[-1])
        assert quota_hash == {"pack:p:claimed": str(quota)} and holder == {}
        status = await budget_status(world, campaign_id)
        assert list(status.packs) == [cpb.PackBudget(pack_id="p", quota=quota, released=quota, claimed=quota)]


async def test_packs_are_released_by_their_tranches(world: World) -> None:
    """A pack whose only tranche opens tomorrow: NOT_YET_RELEASED, nothing issued, none
    released in GetBudgetStatus."""
    campaign_id = new_id()
    await create(world, pack_campaign(campaign_id, quota=5, tranches=[(time.time() + 86_400, 5)]))
    person = id_number()
    assert decision(await claim(world, person, campaign_id)) == "NOT_YET_RELEASED"
    assert await counters(world, campaign_id, person) == ({}, {})
    status = await budget_status(world, campaign_id)
    assert list(status.packs) == [cpb.PackBudget(pack_id="p", quota=5, released=0, claimed=0)]


# --- Back to the pool ------------------------------------------------------------------------------


async def test_a_pack_returns_to_the_pool_only_when_every_voucher_is_cancelled(world: World) -> None:
    """Quota 1, a pack of two. Cancelling one voucher gives nothing back (the pack is still
    out: the next person is QUOTA_EXHAUSTED); cancelling the other returns the pack, which the
    next person then claims. The first person may not claim it again this round."""
    campaign_id = new_id()
    await create(world, pack_campaign(campaign_id, HANGZHOU[:2], quota=1))
    first, second = id_number(), id_number()
    codes = await codes_of(world, first, campaign_id)
    await world.wallet.cancel(codes[0])
    assert decision(await claim(world, second, campaign_id)) == "QUOTA_EXHAUSTED"
    assert (await counters(world, campaign_id, first))[1]["pack:p:live"] == "1"
    await world.wallet.cancel(codes[1])
    quota, holder = await counters(world, campaign_id, first)
    assert quota == {"pack:p:claimed": "0"} and holder == {"pack:p": "0", "pack:p:issued": "1"}
    assert decision(await claim(world, first, campaign_id)) == "ALREADY_CLAIMED_THIS_ROUND"
    assert decision(await claim(world, second, campaign_id)) == "ISSUED"


async def test_an_expired_pack_returns_unless_one_of_its_vouchers_was_redeemed(world: World) -> None:
    """Validity 1 s, quota 1, a pack of two. Both expire unused: the pack goes back, someone
    else claims it. In a second campaign one voucher is redeemed and the other expires: the
    pack stays used (QUOTA_EXHAUSTED for the next person, the counters unchanged)."""
    unused, redeemed = new_id(), new_id()
    for campaign_id in (unused, redeemed):
        await create(world, pack_campaign(campaign_id, HANGZHOU[:2], quota=1, validity_s=1))
    first, second = id_number(), id_number()
    codes = await codes_of(world, first, unused)
    await until_state(world, codes, qpb.QUALIFICATION_STATE_EXPIRED)
    assert decision(await claim(world, first, unused)) == "ALREADY_CLAIMED_THIS_ROUND"
    # Waited out too: the sweeper returning this pack later would change keys under another
    # test's "change nothing" snapshot (the world and its sweeper are shared by the module).
    await until_state(world, await codes_of(world, second, unused), qpb.QUALIFICATION_STATE_EXPIRED)

    codes = await codes_of(world, first, redeemed)
    approved = await pay(world, first, codes[0], redeemed, 2_000)
    assert outcome(approved) == "APPROVED"
    await world.till.capture(approved.authorization_id)
    await until_state(world, codes[1:], qpb.QUALIFICATION_STATE_EXPIRED)
    assert (await world.wallet.get(codes[0])).state == qpb.QUALIFICATION_STATE_REDEEMED
    assert decision(await claim(world, second, redeemed)) == "QUOTA_EXHAUSTED"
    quota, holder = await counters(world, redeemed, first)
    assert quota == {"pack:p:claimed": "1"} and holder == {"pack:p": "1", "pack:p:issued": "1", "pack:p:live": "1"}


async def test_reclaim_after_expiry_lets_the_person_claim_the_pack_again(world: World) -> None:
    """With reclaim_after_expiry, a person whose whole pack expired unused claims a new one."""
    campaign_id = new_id()
    await create(world, pack_campaign(campaign_id, HANGZHOU[:2], quota=1, validity_s=1, reclaim=True))
    person = id_number()
    codes = await codes_of(world, person, campaign_id)
    await until_state(world, codes, qpb.QUALIFICATION_STATE_EXPIRED)
    again = await codes_of(world, person, campaign_id)
    assert not set(again) & set(codes)
    quota, holder = await counters(world, campaign_id, person)
    assert quota == {"pack:p:claimed": "1"} and holder == {"pack:p": "1", "pack:p:issued": "2", "pack:p:live": "2"}
    # Waited out: the sweeper returning this pack later would change keys under another test's
    # "change nothing" snapshot (the world and its sweeper are shared by the module).
    await until_state(world, again, qpb.QUALIFICATION_STATE_EXPIRED)


async def test_rebuild_restores_the_packs_and_their_counters(world: World) -> None:
    """After the qualification keys are lost, restore_qualifications rebuilds from the mirror:
    the vouchers' amounts, the pack counters of a held pack, of a pack with one voucher
    cancelled and of a pack returned whole; claims and payments then behave as before."""
    campaign_id = new_id()
    await create(world, pack_campaign(campaign_id, HANGZHOU[:2], quota=3))
    held, partly, returned = id_number(), id_number(), id_number()
    await codes_of(world, held, campaign_id)
    await world.wallet.cancel((await codes_of(world, partly, campaign_id))[0])
    for code in await codes_of(world, returned, campaign_id):
        await world.wallet.cancel(code)
    env = world.env

    async def nonzero() -> dict[str, Any]:
        # A counter back at 0 and an absent one mean the same (restore writes no zeros).
        found = {}
        for person in (held, partly, returned):
            quota, holder = await counters(world, campaign_id, person)
            found[person] = (quota, {key: value for key, value in holder.items() if value != "0"})
        return found

    before = await nonzero()
    mirror = QualificationMirror(world.redis, env.keys, env.pg_dsn)
    await mirror.drain()
    connection = await asyncpg.connect(env.pg_dsn, timeout=10)
    try:
        for pattern in ("qual", "qquota", "qholder", "quals"):
            async for key in world.redis.scan_iter(match=f"{env.keys.tag}:{pattern}:*"):
                await world.redis.delete(key)
        await restore_qualifications(connection, world.redis, env.keys)
    finally:
        await connection.close()
    assert await nonzero() == before
    assert before[partly][1]["pack:p:live"] == "1" and before[returned][0] == {"pack:p:claimed": "2"}
    listed = await world.wallet.list(held, campaign_id)
    assert sorted((q.threshold_fen, q.off_fen) for q in listed) == list(HANGZHOU[:2])
    assert decision(await claim(world, held, campaign_id)) == "PERSON_LIMIT_REACHED"
    assert decision(await claim(world, returned, campaign_id)) == "ALREADY_CLAIMED_THIS_ROUND"
    approved = await pay(world, held, listed[0].redemption_code, campaign_id, listed[0].threshold_fen)
    assert outcome(approved) == "APPROVED" and approved.subsidy_fen == listed[0].off_fen


async def test_the_issued_counts_migration_leaves_pack_vouchers_to_their_pack(world: World) -> None:
    """migrate_issued_counts (run once per deployment at gateway start, again after a Redis
    loss took its schema mark) counts claims by category only: a pack's vouchers give their
    holder no <category>:issued."""
    campaign_id = new_id()
    await create(world, pack_campaign(campaign_id))
    person = id_number()
    await codes_of(world, person, campaign_id)
    before = await counters(world, campaign_id, person)
    await world.redis.hdel(world.env.keys.schema, "issued_counts")
    await migrate_issued_counts(world.redis, world.env.keys)
    assert await counters(world, campaign_id, person) == before
    assert "general:issued" not in before[1]


async def test_subsidyctl_applies_the_hangzhou_pack_file_and_shows_its_packs(world: World, tmp_path: Path) -> None:
    """The example file through subsidyctl (create, then a replay): GetCampaign answers its
    pack as the file says, a claim of the pack issues its three vouchers at their amounts, and
    `budget status` shows the pack counted in packs, as a table and as JSON."""
    example = EXAMPLES / "hangzhou-voucher-pack.yaml"
    credentials = tmp_path / "credentials.json"
    target = world.operator._target
    credentials.write_text(
        orjson.dumps({"target": target, "operators": {OPERATOR: world.env.credentials[OPERATOR]}}).decode()
    )
    base = ["--credentials", str(credentials)]
    runner = CliRunner()
    for _ in range(2):
        applied = await asyncio.to_thread(runner.invoke, subsidyctl, [*base, "campaign", "apply", str(example)])
        assert applied.exit_code == 0, applied.output
    (pack,) = (await fetch(world, "hz-2020-voucher-pack")).packs
    assert (pack.pack_id, pack.quota, len(pack.tranches)) == ("hz-2020-pack", 2_000_000, 4)
    response = await claim(world, id_number(), "hz-2020-voucher-pack", "hz-2020-pack")
    assert [(q.threshold_fen, q.off_fen) for q in response.qualifications] == list(HANGZHOU)
    table = await asyncio.to_thread(runner.invoke, subsidyctl, [*base, "budget", "status", "hz-2020-voucher-pack"])
    assert table.exit_code == 0 and "pack hz-2020-pack" in table.output and "1/2000000 of 2000000" in table.output
    as_json = await asyncio.to_thread(
        runner.invoke, subsidyctl, [*base, "--json", "budget", "status", "hz-2020-voucher-pack"]
    )
    assert as_json.exit_code == 0, as_json.output
    assert orjson.loads(as_json.output)["packs"] == [
        {"pack_id": "hz-2020-pack", "quota": "2000000", "released": "2000000", "claimed": "1"}
    ]


# --- Bounds and bad input ------------------------------------------------------------------------


async def test_pack_size_zero_one_max_and_max_plus_one(world: World) -> None:
    """0 vouchers and 11 are refused naming packs[0].vouchers (nothing created); 1 and 10 are
    created, answered by GetCampaign as sent, and one claim issues exactly 1 and 10 codes."""
    for size, accepted in ((0, False), (1, True), (10, True), (11, False)):
        campaign_id = new_id()
        vouchers = [(1_000 * (index + 1), 100) for index in range(size)]
        campaign = pack_campaign(campaign_id, vouchers, per_person_limit=max(size, 1))
        if not accepted:
            with pytest.raises(InvalidArgument) as refused:
                await create(world, campaign)
            assert refused.value.metadata["field"] == "campaign.packs[0].vouchers", size
            with pytest.raises(NotFound):
                await fetch(world, campaign_id)
            continue
        stored = await create(world, campaign)
        assert list(stored.packs) == list(campaign.packs) and list((await fetch(world, campaign_id)).packs) == list(
            campaign.packs
        )
        response = await claim(world, id_number(), campaign_id)
        assert decision(response) == "ISSUED" and len(response.qualifications) == size
        assert len({q.redemption_code for q in response.qualifications}) == size


async def test_pack_quota_zero_one_max_and_max_plus_one(world: World) -> None:
    """A quota of 0 and of 1,000,000,001 packs is refused naming packs[0].quota; 1 and
    1,000,000,000 are accepted (1 was claimed out in test_the_quota_counts_packs)."""
    for quota, accepted in ((0, False), (1, True), (1_000_000_000, True), (1_000_000_001, False)):
        campaign_id = new_id()
        if accepted:
            assert (await create(world, pack_campaign(campaign_id, quota=quota))).packs[0].quota == quota
            continue
        with pytest.raises(InvalidArgument) as refused:
            await create(world, pack_campaign(campaign_id, quota=quota))
        assert refused.value.metadata["field"] == "campaign.packs[0].quota"
        with pytest.raises(NotFound):
            await fetch(world, campaign_id)


def _bad_campaigns() -> list[tuple[str, Any, str]]:
    def percent_rule(campaign: cpb.Campaign) -> None:
        campaign.rules.append(
            cpb.CategoryRule(
                category="fridge",
                kind=cpb.RULE_KIND_PERCENT,
                rates=[cpb.GradeRate(energy_grade=1, rate_bp=1500)],
                cap_fen=100_000,
                per_person_limit=1,
                budget_fen=1_000_000,
            )
        )
        campaign.packs[0].vouchers[0].category = "fridge"

    def duplicate(campaign: cpb.Campaign) -> None:
        campaign.packs.append(campaign.packs[0])
        campaign.rules[0].per_person_limit = 6

    def more_packs(campaign: cpb.Campaign) -> None:
        campaign.rules[0].per_person_limit = 1000
        for index in range(20):
            extra = campaign.packs.add()
            extra.CopyFrom(campaign.packs[0])
            extra.pack_id = f"p{index}"

    def short_validity(campaign: cpb.Campaign) -> None:
        # Releases an hour and a second apart, vouchers valid for an hour (pack_campaign's).
        campaign.packs[0].tranches.add(release_at=stamp(time.time()), count=10)
        campaign.packs[0].tranches.add(release_at=stamp(time.time() + 3601), count=10)

    return [
        ("no rule", (lambda c: setattr(c.packs[0].vouchers[1], "category", "phone")), "vouchers[1].category"),
        ("percent rule", percent_rule, "vouchers[0].category"),
        ("decreasing", lambda c: setattr(c.packs[0].vouchers[2], "threshold_fen", 4_000), "vouchers[2].threshold_fen"),
        ("off above", (lambda c: setattr(c.packs[0].vouchers[0], "off_fen", 2_001)), "vouchers[0].off_fen"),
        ("zero off", (lambda c: setattr(c.packs[0].vouchers[0], "off_fen", 0)), "vouchers[0].off_fen"),
        ("limit", (lambda c: setattr(c.rules[0], "per_person_limit", 2)), "vouchers[2].category"),
        ("pack id", (lambda c: setattr(c.packs[0], "pack_id", "no spaces")), "pack_id"),
        ("tranches", (lambda c: c.packs[0].tranches.add(release_at=stamp(0), count=101)), "tranches"),
        ("duplicate", duplicate, "packs"),
        ("too many", more_packs, "packs"),
        ("no qualifications", (lambda c: setattr(c, "qualification_validity_s", 0)), "packs"),
        ("validity under the release interval", short_validity, "qualification_validity_s"),
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "change", "field"), _bad_campaigns(), ids=[case[0] for case in _bad_campaigns()])
async def test_packs_that_cannot_work_are_refused_naming_the_field(
    world: World, name: str, change: Any, field: str
) -> None:
    """Each contradiction is INVALID_ARGUMENT naming its field, and nothing is created."""
    campaign_id = new_id()
    campaign = pack_campaign(campaign_id)
    change(campaign)
    with pytest.raises(InvalidArgument) as refused:
        await create(world, campaign)
    expected = "campaign." + field if field in ("packs", "qualification_validity_s") else "campaign.packs[0]." + field
    assert refused.value.metadata["field"] == expected, name
    with pytest.raises(NotFound):
        await fetch(world, campaign_id)


async def test_bad_pack_claims_are_refused_naming_the_field_and_change_nothing(world: World) -> None:
    """An unknown pack, a malformed pack id, a pack claim that also names a category, a claim by
    category of a category the campaign issues in packs, and a pack whose published category
    has no rule: INVALID_ARGUMENT naming the field; only the signed call's nonce is written."""
    campaign_id = new_id()
    await create(world, pack_campaign(campaign_id))
    # A pack naming a category without a rule cannot be created (test above); published
    # directly, as a damaged or concurrent publication could leave it, the script refuses it.
    campaign_key = world.env.keys.campaign(campaign_id)
    packs = orjson.loads(await world.redis.hget(campaign_key, "packs"))
    packs["broken"] = {"v": [["general", 2000, 500], ["phone", 4000, 1000]], "q": 10, "qt": []}
    await world.redis.hset(campaign_key, "packs", orjson.dumps(packs))
    person = id_number()

    def request(**fields: Any) -> qpb.ClaimQualificationRequest:
        message = qpb.ClaimQualificationRequest(
            request_id=str(uuid.uuid4()),
            campaign_id=campaign_id,
            pack_id="p",
            consumer=qpb.ConsumerIdentity(id_number=person),
            device_location=qpb.DeviceLocation(location=location()),
        )
        message.device_location.fix_time.FromMilliseconds(int(time.time() * 1000))
        for name, value in fields.items():
            setattr(message, name, value)
        return message

    cases = [
        (request(pack_id="nope"), "pack_id"),
        (request(pack_id="no spaces"), "pack_id"),
        (request(pack_id="x" * 65), "pack_id"),
        (request(category="general"), "category"),
        (request(pack_id="", category="general"), "category"),
        (request(pack_id="broken"), "pack_id"),
    ]
    nonce = world.env.keys.nonce("p-wallet-01", "").encode()
    for message, field in cases:
        before = await snapshot(world.redis, world.env.keys)
        with pytest.raises(InvalidArgument) as refused:
            await world.wallet.send_claim(message)
        assert refused.value.metadata["field"] == field, message
        after = await snapshot(world.redis, world.env.keys)
        assert after.without(nonce) == before.without(nonce), message
    assert decision(await world.wallet.send_claim(request())) == "ISSUED"


async def test_a_campaign_without_packs_answers_its_one_qualification_in_both_fields(world: World) -> None:
    """Claims by category are unchanged; the new list carries the one qualification."""
    campaign_id = new_id()
    campaign = pack_campaign(campaign_id)
    del campaign.packs[:]
    await create(world, campaign)
    response = await world.wallet.claim(
        campaign_id=campaign_id,
        category="general",
        id_number=id_number(),
        location=location(),
        fix_time_ms=int(time.time() * 1000),
    )
    assert decision(response) == "ISSUED" and list(response.qualifications) == [response.qualification]
    assert (response.qualification.pack_id, response.qualification.threshold_fen) == ("", 0)


# --- A flash crowd across processes ------------------------------------------------------------


@pytest.mark.slow
async def test_a_flash_crowd_takes_exactly_the_quota_of_whole_packs(services: Services, tmp_path: Path) -> None:
    """3,000 claims (2,400 people, 600 of them twice at once) from 4 client processes against 2
    server processes for 200 packs of three: exactly 200 claims are issued, each with its three
    codes (600 distinct codes, all of the claim's person), nobody twice, every other claim
    declined QUOTA_EXHAUSTED or PERSON_LIMIT_REACHED; Redis holds exactly 600 pack vouchers,
    200 packs counted, and no voucher outside an issued claim."""
    packs, claims, people_count, processes = 200, 3_000, 2_400, 4
    async with isolated_environment(services) as env:
        port = free_port()
        async with server_processes(env, port, tmp_path / "server.log"):
            campaign_id = new_id()
            target = f"127.0.0.1:{port}"
            async with SignedClient(target, OPERATOR, env.credentials[OPERATOR], deadline_s=10.0) as operator:
                request = cpb.CreateCampaignRequest(
                    request_id=str(uuid.uuid4()), campaign=pack_campaign(campaign_id, quota=packs)
                )
                await operator._call(SERVICE + "CreateCampaign", request, cpb.CreateCampaignResponse)
            people = [id_number() for _ in range(people_count)]
            requests = [(str(uuid.uuid4()), people[index % people_count]) for index in range(claims)]
            random.shuffle(requests)
            share = claims // processes
            partners = ["p-wallet-01", "p-bank-01"]
            jobs = [
                ClaimJob(
                    target=target,
                    partner_id=partners[worker % 2],
                    secret=env.credentials[partners[worker % 2]],
                    campaign_id=campaign_id,
                    category="",
                    latitude=XIAOSHAN_GOVERNMENT[0],
                    longitude=XIAOSHAN_GOVERNMENT[1],
                    fix_time_ms=int(time.time() * 1000),
                    requests=requests[worker * share : (worker + 1) * share],
                    channels=4,
                    pack_id="p",
                )
                for worker in range(processes)
            ]
            context = multiprocessing.get_context("spawn")
            loop = asyncio.get_running_loop()
            with context.Pool(processes) as pool:
                results = await loop.run_in_executor(None, pool.map, run_claim_job, jobs)
        outcomes = [outcome for result in results for outcome in result]
        assert len(outcomes) == claims
        assert Counter(o.error for o in outcomes if o.error) == Counter()
        issued = [o for o in outcomes if o.decision == "CLAIM_DECISION_ISSUED"]
        declined = Counter(o.reason for o in outcomes if o.decision == "CLAIM_DECISION_DECLINED")
        assert set(declined) <= {"CLAIM_DECLINE_REASON_QUOTA_EXHAUSTED", "CLAIM_DECLINE_REASON_PERSON_LIMIT_REACHED"}
        assert declined["CLAIM_DECLINE_REASON_QUOTA_EXHAUSTED"] > 0
        assert len(issued) == packs and len({o.id_number for o in issued}) == packs
        for o in issued:
            assert len(o.vouchers) == 3
            assert {(pack, consumer) for _, pack, consumer, _ in o.vouchers} == {("p", consumer_key_of(o.id_number))}
            assert len({expiry for _, _, _, expiry in o.vouchers}) == 1
        codes = {code for o in issued for code, _, _, _ in o.vouchers}
        assert len(codes) == 3 * packs
        redis = Redis.from_url(env.redis_url)
        try:
            keys = env.keys
            assert await redis.hget(keys.qualification_quota(campaign_id), "pack:p:claimed") == str(packs).encode()
            written = set()
            async for key in redis.scan_iter(match=keys.qualification("*"), count=10_000):
                fields = await redis.hmget(key, ["campaign", "code", "pack"])
                if fields[0] == campaign_id.encode():
                    assert fields[2] == b"p"
                    written.add(fields[1].decode())
            assert written == codes  # never a voucher outside an issued claim: no half pack
            async with redis.pipeline(transaction=False) as pipe:
                for person in set(people):
                    pipe.hget(keys.qualification_holder(campaign_id, consumer_key_of(person)), "pack:p")
                holdings = Counter(await pipe.execute())
            assert holdings == Counter({b"1": packs, None: people_count - packs})
        finally:
            await redis.aclose()
