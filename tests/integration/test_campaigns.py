"""CampaignService: the real programme rules as campaigns (shipped in examples/campaigns/),
rules that cannot work refused naming the field, changes taking effect on the next
authorization, tranches, budget status, and subsidyctl over it all."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy, SignedClient
from subsidy_client.errors import InvalidArgument, NotFound, PermissionDenied
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import campaign_pb2 as pb
from subsidy_client.v1 import qualification_pb2 as qpb
from subsidy_client.v1.common_pb2 import COORDINATE_SYSTEM_WGS84, Location

from server.ctl import main as subsidyctl
from server.ctl.campaign import campaigns_from_file
from server.domain.gtin import gtin13_check_digit
from storage.devenv import Services
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
EXAMPLES = ROOT / "examples" / "campaigns"


def gtin(number: int) -> str:
    base = f"69800000{number:04d}"
    return base + str(gtin13_check_digit(base))


# Products of the example campaigns' categories: (gtin, category, energy grade, serial required)
PRODUCTS = {
    "fridge_g1": (gtin(1), "fridge", 1, True),
    "washer_g2": (gtin(2), "washer", 2, True),
    "tv_ungraded": (gtin(3), "tv", 0, True),
    "ac_g1": (gtin(4), "air_conditioner", 1, True),
    "microwave_g3": (gtin(5), "microwave", 3, False),
    "phone": (gtin(6), "phone", 0, True),
    "tablet": (gtin(7), "tablet", 0, True),
    "goods": (gtin(8), "general", 0, False),
}


@asynccontextmanager
async def campaign_world(services: Services) -> AsyncIterator[tuple[Environment, SignedClient, AuthorizationClient]]:
    async with isolated_environment(services) as env, running_gateway(env.config()) as gateway:
        await load_document(
            env,
            {
                "products": [
                    {
                        "gtin": code,
                        "brand": "B",
                        "model": name,
                        "category": category,
                        "energy_grade": grade,
                        "serial_required": needs_serial,
                    }
                    for name, (code, category, grade, needs_serial) in PRODUCTS.items()
                ]
            },
        )
        target = f"127.0.0.1:{gateway.port}"
        operator = SignedClient(target, "op-auditor", env.credentials["op-auditor"], retry=RetryPolicy(max_attempts=1))
        terminal = AuthorizationClient(
            target, "t-main-01", env.credentials["t-main-01"], retry=RetryPolicy(max_attempts=1)
        )
        try:
            yield env, operator, terminal
        finally:
            await operator.close()
            await terminal.close()


async def create(
    operator: SignedClient, campaign: pb.Campaign, request_id: str | None = None
) -> pb.CreateCampaignResponse:
    request = pb.CreateCampaignRequest(request_id=request_id or str(uuid.uuid4()), campaign=campaign)
    return await operator._call(SERVICE + "CreateCampaign", request, pb.CreateCampaignResponse)


async def update(operator: SignedClient, campaign: pb.Campaign) -> pb.UpdateCampaignResponse:
    request = pb.UpdateCampaignRequest(request_id=str(uuid.uuid4()), campaign=campaign)
    return await operator._call(SERVICE + "UpdateCampaign", request, pb.UpdateCampaignResponse)


async def buy(
    terminal: AuthorizationClient,
    campaign: str,
    product: str,
    price_fen: int,
    person: str | None = None,
    redemption_code: str = "",
) -> apb.AuthorizeResponse:
    code, _, _, needs_serial = PRODUCTS[product]
    line = Line("1", code, price_fen, serial() if needs_serial else "")
    return await terminal.authorize(
        campaign_id=campaign, consumer_key=person or consumer_key(), lines=[line], redemption_code=redemption_code
    )


def subsidy(response: apb.AuthorizeResponse) -> int | str:
    if response.decision == apb.DECISION_APPROVED:
        return response.subsidy_fen
    return apb.DeclineReason.Name(response.decline_reason).removeprefix("DECLINE_REASON_")


async def test_the_2025_trade_in_rules_give_the_published_subsidies(services: Services) -> None:
    """20% for grade 1, 15% for grade 2 and for ungraded products, capped at 2,000 yuan; grade 3
    earns nothing; one item per category per person, air conditioners up to three."""
    async with campaign_world(services) as (_env, operator, terminal):
        for campaign in campaigns_from_file(EXAMPLES / "trade-in-2025.yaml"):
            await create(operator, campaign)
        assert subsidy(await buy(terminal, "trade-in-2025", "fridge_g1", 459_900)) == 91_980  # 4,599 yuan: 919.80
        assert subsidy(await buy(terminal, "trade-in-2025", "washer_g2", 329_900)) == 49_485  # 3,299 yuan: 494.85
        assert subsidy(await buy(terminal, "trade-in-2025", "tv_ungraded", 1_200_000)) == 180_000  # at most grade 2
        assert subsidy(await buy(terminal, "trade-in-2025", "ac_g1", 1_500_000)) == 200_000  # 3,000 capped at 2,000
        assert subsidy(await buy(terminal, "trade-in-2025", "microwave_g3", 50_000)) == "GRADE_NOT_ELIGIBLE"
        person = consumer_key()
        for _ in range(3):
            assert subsidy(await buy(terminal, "trade-in-2025", "ac_g1", 400_000, person)) == 80_000
        assert subsidy(await buy(terminal, "trade-in-2025", "ac_g1", 400_000, person)) == "CONSUMER_LIMIT_REACHED"
        assert subsidy(await buy(terminal, "trade-in-2025", "fridge_g1", 400_000, person)) == 80_000
        assert subsidy(await buy(terminal, "trade-in-2025", "fridge_g1", 400_000, person)) == "CONSUMER_LIMIT_REACHED"


async def test_the_2025_digital_product_rules_give_the_published_subsidies(services: Services) -> None:
    """15% capped at 500 yuan, final price at most 6,000 yuan, one per category per person."""
    async with campaign_world(services) as (_env, operator, terminal):
        for campaign in campaigns_from_file(EXAMPLES / "digital-2025.yaml"):
            await create(operator, campaign)
        person = consumer_key()
        assert subsidy(await buy(terminal, "digital-2025", "phone", 299_900, person)) == 44_985  # 449.85 yuan
        assert subsidy(await buy(terminal, "digital-2025", "phone", 299_900, person)) == "CONSUMER_LIMIT_REACHED"
        assert subsidy(await buy(terminal, "digital-2025", "tablet", 300_000, person)) == 45_000  # another category
        assert subsidy(await buy(terminal, "digital-2025", "phone", 599_900)) == 50_000  # 899.85 capped at 500
        assert subsidy(await buy(terminal, "digital-2025", "phone", 600_000)) == 50_000  # exactly 6,000 yuan qualifies
        assert subsidy(await buy(terminal, "digital-2025", "phone", 600_001)) == "PRICE_ABOVE_CEILING"


async def test_hangzhou_style_vouchers_take_their_amount_off_at_their_threshold(services: Services) -> None:
    """ "5 off 20", "10 off 40", "20 off 80": each voucher is claimed first (a qualification),
    then takes its fixed amount off at or above the minimum spend, nothing below it; one voucher
    of each kind per person; the daily 20:00 tranches release the budget."""
    async with campaign_world(services) as (env, operator, terminal):
        for campaign in campaigns_from_file(EXAMPLES / "hangzhou-vouchers.yaml"):
            await create(operator, campaign)
        async with QualificationClient(
            terminal.target, "p-wallet-01", env.credentials["p-wallet-01"], retry=RetryPolicy(max_attempts=1)
        ) as wallet:
            person = id_number()
            key = consumer_key_of(person)

            async def claim(campaign: str) -> str:
                claimed = await wallet.claim(
                    campaign_id=campaign,
                    category="general",
                    id_number=person,
                    location=Location(
                        latitude=30.18, longitude=120.26, coordinate_system=COORDINATE_SYSTEM_WGS84, accuracy_m=20.0
                    ),
                    fix_time_ms=int(time.time() * 1000),
                )
                assert claimed.decision == qpb.CLAIM_DECISION_ISSUED, claimed
                return claimed.qualification.redemption_code

            five = await claim("hz-voucher-5off20")
            assert (
                subsidy(await buy(terminal, "hz-voucher-5off20", "goods", 1_999, key, five)) == "PRICE_BELOW_THRESHOLD"
            )
            assert subsidy(await buy(terminal, "hz-voucher-5off20", "goods", 2_000, key)) == "QUALIFICATION_REQUIRED"
            assert subsidy(await buy(terminal, "hz-voucher-5off20", "goods", 2_000, key, five)) == 500
            # The voucher is now held by that payment: a second payment cannot use it.
            assert (
                subsidy(await buy(terminal, "hz-voucher-5off20", "goods", 9_900, key, five)) == "CONSUMER_LIMIT_REACHED"
            )
            assert (
                subsidy(
                    await buy(terminal, "hz-voucher-10off40", "goods", 4_500, key, await claim("hz-voucher-10off40"))
                )
                == 1_000
            )
            assert (
                subsidy(
                    await buy(terminal, "hz-voucher-20off80", "goods", 8_000, key, await claim("hz-voucher-20off80"))
                )
                == 2_000
            )
        status = await operator._call(
            SERVICE + "GetBudgetStatus",
            pb.GetBudgetStatusRequest(campaign_id="hz-voucher-5off20"),
            pb.GetBudgetStatusResponse,
        )
        general = status.categories[0]
        assert (general.budget_fen, general.released_fen, general.reserved_fen) == (1_000_000_000, 1_000_000_000, 500)
        assert general.available_fen == 1_000_000_000 - 500


def valid_campaign(campaign_id: str) -> pb.Campaign:
    start = datetime.now(UTC) - timedelta(days=1)
    campaign = pb.Campaign(campaign_id=campaign_id, name="test", status=pb.CAMPAIGN_STATUS_ACTIVE)
    campaign.starts_at.FromDatetime(start)
    campaign.ends_at.FromDatetime(start + timedelta(days=30))
    campaign.rules.append(
        pb.CategoryRule(
            category="fridge",
            kind=pb.RULE_KIND_PERCENT,
            rates=[pb.GradeRate(energy_grade=1, rate_bp=2000)],
            cap_fen=200_000,
            per_person_limit=1,
            budget_fen=10_000_000,
        )
    )
    return campaign


def broken(change: Any) -> pb.Campaign:
    campaign = valid_campaign("c-broken-" + secrets.token_hex(3))
    change(campaign)
    return campaign


def add_tranches(campaign: pb.Campaign, amounts: list[int]) -> None:
    for index, amount in enumerate(amounts):
        tranche = campaign.rules[0].tranches.add(amount_fen=amount)
        tranche.release_at.FromDatetime(datetime.now(UTC) + timedelta(days=index))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: setattr(c.rules[0], "cap_fen", -1), "campaign.rules[0].cap_fen"),
        (lambda c: setattr(c.rules[0].rates[0], "rate_bp", 10_001), "campaign.rules[0].rates_bp.1.rate"),
        (lambda c: c.ends_at.FromDatetime(datetime(2020, 1, 1, tzinfo=UTC)), "campaign.ends_at"),
        (lambda c: add_tranches(c, [6_000_000, 6_000_000]), "campaign.rules[0].tranches"),
        (lambda c: setattr(c.rules[0], "kind", 9), "campaign.rules[0].kind"),
        (lambda c: setattr(c.rules[0], "per_person_limit", 0), "campaign.rules[0].per_person_limit"),
        (lambda c: setattr(c, "campaign_id", "bad id"), "campaign.campaign_id"),
        (lambda c: setattr(c, "region_geojson", '{"type": "Point", "coordinates": [120, 30]}'), "campaign.region"),
        (lambda c: c.ClearField("starts_at"), "campaign.starts_at"),
    ],
    ids=[
        "cap below zero",
        "rate above 100%",
        "window ends before it starts",
        "tranches exceed the budget",
        "unknown rule kind",
        "no per-person limit",
        "bad id",
        "region not a polygon",
        "no start",
    ],
)
async def test_rules_that_cannot_work_are_refused_naming_the_field(services: Services, change: Any, field: str) -> None:
    """INVALID_ARGUMENT with ErrorInfo metadata.field naming the culprit; nothing is created."""
    async with campaign_world(services) as (env, operator, _terminal):
        campaign = broken(change)
        with pytest.raises(InvalidArgument) as raised:
            await create(operator, campaign)
        assert raised.value.metadata["field"] == field
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            assert await connection.fetchval("SELECT count(*) FROM operator_actions") == 0
        finally:
            await connection.close()


async def test_a_rule_change_takes_effect_on_the_next_authorization(services: Services) -> None:
    """Update a campaign's rate and pause it: the very next authorizations follow the new rules;
    every change is in the append-only audit trail, and a replayed request id changes nothing."""
    async with campaign_world(services) as (env, operator, terminal):
        campaign = valid_campaign("c-change")
        request_id = str(uuid.uuid4())
        first = await create(operator, campaign, request_id)
        replay = await create(operator, campaign, request_id)
        assert replay.campaign == first.campaign
        assert subsidy(await buy(terminal, "c-change", "fridge_g1", 300_000)) == 60_000
        campaign.rules[0].rates[0].rate_bp = 1000
        await update(operator, campaign)
        assert subsidy(await buy(terminal, "c-change", "fridge_g1", 300_000)) == 30_000
        campaign.status = pb.CAMPAIGN_STATUS_PAUSED
        await update(operator, campaign)
        assert subsidy(await buy(terminal, "c-change", "fridge_g1", 300_000)) == "CAMPAIGN_NOT_FOUND"
        with pytest.raises(NotFound):
            await update(operator, valid_campaign("c-never-created"))
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            actions = await connection.fetch(
                "SELECT operator_id, action, target_id FROM operator_actions ORDER BY action_id"
            )
            assert [(row["operator_id"], row["action"]) for row in actions] == [
                ("op-auditor", "CreateCampaign"),
                ("op-auditor", "UpdateCampaign"),
                ("op-auditor", "UpdateCampaign"),
            ]
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute("DELETE FROM operator_actions")
        finally:
            await connection.close()


async def test_tranches_release_the_budget_on_schedule(services: Services) -> None:
    """Only the tranches due by now can be spent: 60,000 fen released now, more tomorrow."""
    async with campaign_world(services) as (_env, operator, terminal):
        campaign = valid_campaign("c-tranches")
        first, second = (
            campaign.rules[0].tranches.add(amount_fen=60_000),
            campaign.rules[0].tranches.add(amount_fen=9_000_000),
        )
        first.release_at.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
        second.release_at.FromDatetime(datetime.now(UTC) + timedelta(days=1))
        await create(operator, campaign)
        assert subsidy(await buy(terminal, "c-tranches", "fridge_g1", 300_000)) == 60_000
        assert subsidy(await buy(terminal, "c-tranches", "fridge_g1", 300_000)) == "BUDGET_EXHAUSTED"
        status = await operator._call(
            SERVICE + "GetBudgetStatus", pb.GetBudgetStatusRequest(campaign_id="c-tranches"), pb.GetBudgetStatusResponse
        )
        fridge = status.categories[0]
        assert (fridge.released_fen, fridge.reserved_fen, fridge.available_fen) == (60_000, 60_000, 0)


async def test_terminals_cannot_manage_campaigns(services: Services) -> None:
    """A terminal credential calling CampaignService gets PERMISSION_DENIED."""
    async with campaign_world(services) as (_env, _operator, terminal):
        with pytest.raises(PermissionDenied):
            await create(terminal, valid_campaign("c-by-terminal"))


async def test_subsidyctl_applies_campaign_files_and_shows_budget_status(services: Services, tmp_path: Path) -> None:
    """The command line: apply an example file (three times: create, update, then a harmless
    replay), show
    the campaign and its budget status, as a table and as JSON."""
    async with campaign_world(services) as (env, operator, _terminal):
        credentials = tmp_path / "credentials.json"
        document = {"target": operator._target, "operators": {"op-auditor": env.credentials["op-auditor"]}}
        credentials.write_text(json.dumps(document))
        runner = CliRunner()
        base = ["--credentials", str(credentials)]
        for _ in range(3):
            result = await _invoke(runner, [*base, "campaign", "apply", str(EXAMPLES / "digital-2025.yaml")])
            assert result.exit_code == 0, result.output
            assert "phone" in result.output and "PERCENT" in result.output
        status = await _invoke(runner, [*base, "--json", "budget", "status", "digital-2025"])
        assert status.exit_code == 0, status.output
        assert '"campaign_id": "digital-2025"' in status.output and '"released_fen": "3000000000"' in status.output
        missing = await _invoke(runner, [*base, "campaign", "show", "no-such-campaign"])
        assert missing.exit_code == 1 and "NOT_FOUND" in missing.output


async def test_campaign_apply_probe_logs_no_failed_call_and_errors_name_the_code_once(
    services: Services, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10, item 14: `campaign apply` of a new campaign first asks whether it exists; that
    expected NOT_FOUND is no "call failed" line in the gateway's log. An operator's error names
    its code once ("NOT_FOUND: no campaign ...", not "NOT_FOUND NOT_FOUND: ... id=... kind=...")."""
    async with campaign_world(services) as (env, operator, _terminal):
        credentials = tmp_path / "credentials.json"
        credentials.write_text(
            json.dumps({"target": operator._target, "operators": {"op-auditor": env.credentials["op-auditor"]}})
        )
        base = ["--credentials", str(credentials)]
        runner = CliRunner()
        with caplog.at_level("DEBUG", logger="subsidy.errors"):
            applied = await _invoke(runner, [*base, "campaign", "apply", str(EXAMPLES / "trade-in-2025.yaml")])
            missing = await _invoke(runner, [*base, "campaign", "show", "no-such-campaign"])
        assert applied.exit_code == 0, applied.output
        assert [record.getMessage() for record in caplog.records if record.levelno >= 20] == []
        assert any(record.getMessage() == "nothing found" for record in caplog.records)
        assert missing.exit_code == 1
        assert missing.output.strip() == "Error: NOT_FOUND: no campaign no-such-campaign"


async def _invoke(runner: CliRunner, arguments: list[str]) -> Any:
    """subsidyctl runs its own event loop; run it in a thread so this test's loop keeps serving."""
    import asyncio

    return await asyncio.to_thread(runner.invoke, subsidyctl, arguments)
