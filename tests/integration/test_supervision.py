"""Live fund supervision over real gateways, PostgreSQL and Redis (issue 12, section 2).

One poller per process however many watch (counted in Redis reads and polls, not time); a
watcher that falls behind is dropped while the others keep receiving, and its stream ends
RESOURCE_EXHAUSTED / SLOW_CONSUMER; the figures follow an authorization, a capture and a
refund; a budget crossing 80 % raises one alert, recorded once though two gateway processes
see it; the surge detector fires on planted sales and not on flat ones; roles; interval_ms.
Waits are bounded by a number of snapshots (a poll each), never by a clock assertion.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
import yaml
from click.testing import CliRunner, Result
from subsidy_client import AuthorizationClient, Line, RetryPolicy
from subsidy_client.errors import InvalidArgument, PermissionDenied, SubsidyError
from subsidy_client.supervision import SupervisionClient
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import supervision_pb2 as pb

from server.ctl import main as subsidyctl
from server.domain.daily_report import BusinessCalendar
from server.domain.supervision import SurgeRule
from server.processes.app import Application
from server.services.supervision import DROPPED, FundsPoller, SupervisionSettings
from storage.devenv import Services
from storage.postgres import alerts as alert_store
from storage.postgres import daily_reports
from storage.postgres.pool import LazyPool
from storage.postgres.writer import LedgerWriter, WriterConfig
from storage.redis.budget import BudgetReader
from tests.conftest import (
    REFERENCE_FILE,
    Environment,
    consumer_key,
    isolated_environment,
    load_document,
    running_gateway,
)

OPERATOR, GOVERNMENT, AUDITOR = "op-auditor", "gov-bureau", "aud-bureau"
TERMINAL, PARTNER, PROVIDER = "t-main-01", "p-wallet-01", "p-peer-01"
STAFF = [
    {"id": GOVERNMENT, "name": "Bureau (read-only)", "role": "government"},
    {"id": AUDITOR, "name": "Audit office", "role": "auditor"},
]
# A small budget: a 400,000 fen fridge at 20 % takes exactly 80 % of it.
SMALL = {
    "id": "c-small",
    "status": "ACTIVE",
    "starts_at": "2020-01-01T00:00:00+08:00",
    "ends_at": "2099-01-01T00:00:00+08:00",
    "rules": [
        {
            "category": "fridge",
            "kind": "PERCENT",
            "rates_bp": {"2": 2000},
            "cap_fen": 200_000,
            "per_person_limit": 1,
            "budget_fen": 100_000,
        }
    ],
}
FRIDGE = "6970000000024"  # grade 2
SNAPSHOTS_MAX = 300  # polls a wait may take before the test fails (100 ms each)


@dataclass
class World:
    env: Environment
    gateway: Application
    credentials: dict[str, str]

    def target(self, gateway: Application | None = None) -> str:
        return f"127.0.0.1:{(gateway or self.gateway).port}"

    def supervision(self, caller_id: str, gateway: Application | None = None) -> SupervisionClient:
        return SupervisionClient(
            self.target(gateway), caller_id, self.credentials[caller_id], retry=RetryPolicy(max_attempts=1)
        )

    def terminal(self) -> AuthorizationClient:
        return AuthorizationClient(
            self.target(), TERMINAL, self.credentials[TERMINAL], deadline_s=10.0, retry=RetryPolicy(max_attempts=1)
        )

    async def drain_ledger(self) -> None:
        from redis.asyncio import Redis

        redis = Redis.from_url(self.env.redis_url)
        writer = LedgerWriter(
            WriterConfig(pg_dsn=self.env.pg_dsn, redis_url=self.env.redis_url, prefix=self.env.prefix), redis
        )
        try:
            await writer.drain()
        finally:
            await writer.close()
            await redis.aclose()


def gateway_config(env: Environment) -> Any:
    return env.config(supervision_poll_ms=100, supervision_queue_size=4)


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[World]:
    async with isolated_environment(services) as env:
        document = yaml.safe_load(REFERENCE_FILE.read_text())
        document["operators"] = [*document["operators"], *STAFF]
        document["campaigns"] = [*document["campaigns"], SMALL]
        credentials = {**env.credentials, **await load_document(env, document)}
        async with running_gateway(gateway_config(env)) as gateway:
            yield World(env, gateway, credentials)


async def until(
    stream: AsyncIterator[pb.WatchFundsResponse], condition: Callable[[pb.WatchFundsResponse], bool]
) -> pb.WatchFundsResponse:
    """The first snapshot meeting the condition, within SNAPSHOTS_MAX snapshots."""
    for _ in range(SNAPSHOTS_MAX):
        snapshot = await anext(stream)
        if condition(snapshot):
            return snapshot
    raise AssertionError("no snapshot met the condition")


def budget(snapshot: pb.WatchFundsResponse, campaign_id: str, category: str) -> pb.BudgetFigures:
    return next(item for item in snapshot.budgets if item.campaign_id == campaign_id and item.category == category)


@asynccontextmanager
async def watching(client: SupervisionClient, **request: Any) -> AsyncIterator[AsyncIterator[pb.WatchFundsResponse]]:
    stream = client.watch(**request)
    try:
        yield stream
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_government_and_operators_watch_and_others_are_refused(world: World) -> None:
    """Government and operator credentials open the stream (a first snapshot of every budget)
    and read alerts and today's figures; terminal, partner app, provider and auditor
    credentials are refused PERMISSION_DENIED on each of the three RPCs."""
    for caller_id in (GOVERNMENT, OPERATOR):
        async with world.supervision(caller_id) as client, watching(client) as stream:
            first = await anext(stream)
            assert budget(first, "c-main", "fridge").budget_fen == 100_000_000_000
            assert budget(first, "c-small", "fridge").budget_fen == 100_000
            assert isinstance(await client.alerts(), list)
            assert (await client.today()).time_zone == "Asia/Shanghai"
    for caller_id in (TERMINAL, PARTNER, PROVIDER, AUDITOR):
        async with world.supervision(caller_id) as client:
            with pytest.raises(PermissionDenied):
                await client.alerts()
            with pytest.raises(PermissionDenied):
                await client.today()
            with pytest.raises(PermissionDenied):
                async with watching(client) as stream:
                    await anext(stream)


@pytest.mark.parametrize("interval_ms", [0, 1000, 60_000])
async def test_accepted_intervals_answer_at_once(world: World, interval_ms: int) -> None:
    async with world.supervision(GOVERNMENT) as client, watching(client, interval_ms=interval_ms) as stream:
        assert (await anext(stream)).sequence >= 1


@pytest.mark.parametrize("interval_ms", [999, 60_001, -1])
async def test_refused_intervals_name_the_field(world: World, interval_ms: int) -> None:
    async with world.supervision(GOVERNMENT) as client:
        with pytest.raises(InvalidArgument) as raised:
            async with watching(client, interval_ms=interval_ms) as stream:
                await anext(stream)
    assert raised.value.metadata["field"] == "interval_ms"


async def test_many_watchers_share_one_poller(world: World) -> None:
    """Eight watchers, three snapshots each: one poller started once, one Redis read per poll
    (not per watcher), the same sequence numbers to all; the poller stops with the last."""
    poller = world.gateway.poller
    assert poller is not None and not poller.running
    starts, reads_before, sequence_before = poller.starts, poller.reads, poller.sequence
    clients = [world.supervision(GOVERNMENT if index % 2 else OPERATOR) for index in range(8)]
    seen: list[list[int]] = []

    async def watch(client: SupervisionClient) -> None:
        async with client, watching(client) as stream:
            sequences = [(await anext(stream)).sequence for _ in range(3)]
            seen.append(sequences)

    await asyncio.gather(*(watch(client) for client in clients))
    assert poller.starts == starts + 1
    polls = poller.sequence - sequence_before
    assert poller.reads - reads_before == polls
    assert polls < 8 * 3  # fewer polls than snapshots sent: they are shared
    assert all(sequences == sorted(set(sequences)) for sequences in seen)
    for _ in range(50):
        if not poller.running:
            break
        await asyncio.sleep(0.05)
    assert not poller.running and poller.watchers == 0


async def test_slow_watcher_is_dropped_and_others_keep_receiving(world: World) -> None:
    """Step by step on a poller of its own: the watcher that reads is served every poll; the
    one that does not is dropped once its queue (4) is full, counted once, its queue ends with
    the end marker, and it is no longer offered anything."""
    pool = LazyPool(world.env.pg_dsn)
    poller = FundsPoller(
        BudgetReader(world.gateway.redis, world.env.keys),
        pool,
        BusinessCalendar(),
        SupervisionSettings(poll_interval_ms=100, queue_size=4),
        autostart=False,
    )
    try:
        fast, slow = poller.subscribe(), poller.subscribe()
        dropped = DROPPED._value.get()
        received = []
        for _ in range(8):
            await poller.tick()
            snapshot = fast.queue.get_nowait()
            assert snapshot is not None
            received.append(snapshot.sequence)
        assert received == list(range(1, 9))
        assert slow.dropped and not fast.dropped
        assert slow.queue.get_nowait() is None and slow.queue.empty()
        assert poller.watchers == 1
        assert DROPPED._value.get() == dropped + 1
    finally:
        await pool.close()


async def test_a_dropped_stream_ends_slow_consumer(world: World) -> None:
    """Through the gateway: a watcher offered more snapshots than its queue holds before it can
    take one (the poller's fan-out never waits) ends RESOURCE_EXHAUSTED, reason SLOW_CONSUMER."""
    poller = world.gateway.poller
    assert poller is not None
    async with world.supervision(GOVERNMENT) as client, watching(client) as stream:
        first = await anext(stream)
        assert poller.watchers == 1
        for _ in range(poller.settings.queue_size + 1):
            poller.fan_out(first)  # synchronously: the stream's task cannot drain in between
        with pytest.raises(SubsidyError) as raised:
            for _ in range(SNAPSHOTS_MAX):
                await anext(stream)
    assert raised.value.code.name == "RESOURCE_EXHAUSTED"
    assert raised.value.reason == "SLOW_CONSUMER"


async def test_figures_follow_authorize_capture_refund(world: World) -> None:
    """c-main/fridge: an authorization moves its subsidy to reserved, the capture to spent, the
    refund from spent to refunded; today's figures (from the ledger) count the sale and the
    refund and rank the merchant."""
    async with world.supervision(GOVERNMENT) as client, watching(client, campaign_id="c-main") as stream:
        before = budget(await anext(stream), "c-main", "fridge")
        assert {item.campaign_id for item in (await anext(stream)).budgets} == {"c-main"}
        today_before = await client.today()
        async with world.terminal() as terminal:
            approved = await terminal.authorize(
                campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", FRIDGE, 300_000)]
            )
            assert approved.decision == apb.DECISION_APPROVED
            subsidy = approved.subsidy_fen
            held = await until(stream, lambda s: budget(s, "c-main", "fridge").reserved_fen != before.reserved_fen)
            figures = budget(held, "c-main", "fridge")
            assert figures.reserved_fen == before.reserved_fen + subsidy
            assert figures.remaining_fen == before.remaining_fen - subsidy
            await terminal.capture(approved.authorization_id)
            spent = await until(stream, lambda s: budget(s, "c-main", "fridge").spent_fen != before.spent_fen)
            figures = budget(spent, "c-main", "fridge")
            assert (figures.reserved_fen, figures.spent_fen) == (before.reserved_fen, before.spent_fen + subsidy)
            await world.drain_ledger()
            today = await client.today()
            total = today.district_total
            assert total.sales == today_before.district_total.sales + 1
            assert total.redeemed_fen == today_before.district_total.redeemed_fen + subsidy
            assert today.top_merchants[0].merchant_id == "m-main"
            await terminal.refund(approved.authorization_id)
            refunded = await until(stream, lambda s: budget(s, "c-main", "fridge").refunded_fen != before.refunded_fen)
            figures = budget(refunded, "c-main", "fridge")
            assert (figures.spent_fen, figures.refunded_fen) == (before.spent_fen, before.refunded_fen + subsidy)
            await world.drain_ledger()
            after = await client.today()
            assert after.district_total.refunds == today_before.district_total.refunds + 1
            assert after.district_total.refunded_fen == today_before.district_total.refunded_fen + subsidy


async def test_budget_alert_is_raised_once_by_two_processes(world: World) -> None:
    """Two gateway processes watch c-small; one authorization takes exactly 80 % of it. Both
    streams show the 80 % alert (one as its recorder, the other from PostgreSQL), the table
    holds it once, 90 % is not raised, and ListAlerts lists it once."""
    async with running_gateway(gateway_config(world.env)) as second:
        async with (
            world.supervision(GOVERNMENT) as first_client,
            world.supervision(OPERATOR, second) as second_client,
            watching(first_client, campaign_id="c-small") as first_stream,
            watching(second_client, campaign_id="c-small") as second_stream,
        ):
            await anext(first_stream)
            await anext(second_stream)
            async with world.terminal() as terminal:
                approved = await terminal.authorize(
                    campaign_id="c-small", consumer_key=consumer_key(), lines=[Line("1", FRIDGE, 400_000)]
                )
            assert approved.decision == apb.DECISION_APPROVED and approved.subsidy_fen == 80_000

            def alerted(snapshot: pb.WatchFundsResponse) -> bool:
                return any(alert.kind == pb.ALERT_KIND_BUDGET_THRESHOLD for alert in snapshot.alerts)

            seen = [await until(first_stream, alerted), await until(second_stream, alerted)]
            for snapshot in seen:
                (alert,) = [item for item in snapshot.alerts if item.kind == pb.ALERT_KIND_BUDGET_THRESHOLD]
                assert (alert.campaign_id, alert.category, alert.threshold_percent) == ("c-small", "fridge", 80)
                assert alert.observed == pytest.approx(0.8)
            assert seen[0].alerts[0].alert_id == seen[1].alerts[0].alert_id
            # Several more polls in both processes add nothing.
            for _ in range(5):
                assert not alerted(await anext(first_stream))
                assert not alerted(await anext(second_stream))
        connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
        try:
            rows = await connection.fetch(
                "SELECT alert_key FROM supervision_alerts WHERE kind = 'BUDGET_THRESHOLD' AND campaign_id = 'c-small'"
            )
        finally:
            await connection.close()
        assert [row["alert_key"] for row in rows] == ["BUDGET_THRESHOLD:c-small:fridge:80"]
        async with world.supervision(GOVERNMENT) as client:
            listed = [alert for alert in await client.alerts() if alert.campaign_id == "c-small"]
        assert len(listed) == 1 and listed[0].threshold_percent == 80


async def plant_captures(connection: asyncpg.Connection, merchant_id: str, moments: list[datetime]) -> None:
    """CAPTURED ledger events of a merchant at the given moments (what the writer would record)."""
    records = []
    for moment in moments:
        event_id = f"{int(moment.timestamp() * 1000)}-{uuid.uuid4().int % 1_000_000}"
        records.append(
            (
                event_id,
                int(moment.timestamp() * 1000),
                0,
                "CAPTURED",
                uuid.uuid4().hex,
                "c-main",
                merchant_id,
                "t-planted",
                consumer_key(),
                str(uuid.uuid4()),
                100,
                moment,
                orjson.dumps([]).decode(),
                orjson.dumps({}).decode(),
            )
        )
    await connection.copy_records_to_table(
        "ledger_events",
        records=records,
        columns=(
            "event_id",
            "event_ms",
            "event_seq",
            "event_type",
            "authorization_id",
            "campaign_id",
            "merchant_id",
            "terminal_id",
            "consumer_key",
            "request_id",
            "amount_fen",
            "occurred_at",
            "lines",
            "payload",
        ),
    )


async def test_surge_detector_fires_on_planted_sales_not_on_flat(services: Services) -> None:
    """In a database of its own: m-hot sold 1 an hour for a week, then 30 in the last hour (a
    surge: 30 > 5 x 1 and >= 20); m-flat sold 30 an hour all week and 30 now; m-new has no
    history and 10 sales now (below 20). One alert, for m-hot, recorded once however often the
    detector runs."""
    async with isolated_environment(services) as env:
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        pool = LazyPool(env.pg_dsn)
        try:
            now = datetime.now(UTC).replace(microsecond=0)
            week = [now - timedelta(hours=1, minutes=30) - timedelta(hours=hour) for hour in range(168)]
            last_hour = [now - timedelta(minutes=1 + minute) for minute in range(30)]
            await plant_captures(connection, "m-hot", week + last_hour)
            flat = [moment - timedelta(minutes=minute) for moment in week for minute in range(30)]
            await plant_captures(connection, "m-flat", flat + last_hour)
            await plant_captures(connection, "m-new", last_hour[:10])
            from redis.asyncio import Redis

            from storage.redis.keys import Keys

            redis = Redis.from_url(env.redis_url)
            store = BudgetReader(redis, Keys(env.prefix))
            poller = FundsPoller(
                store,
                pool,
                BusinessCalendar(),
                SupervisionSettings(surge=SurgeRule(factor=5.0, min_sales=20, baseline_hours=168)),
                autostart=False,
            )
            raised = await poller.check_surges(now)
            assert [(alert.kind, alert.merchant_id) for alert in raised] == [(pb.ALERT_KIND_MERCHANT_SURGE, "m-hot")]
            assert raised[0].observed == 30 and raised[0].baseline == pytest.approx(1.0)
            assert await poller.check_surges(now) == []
            fresh = FundsPoller(store, pool, BusinessCalendar(), SupervisionSettings(), autostart=False)
            assert await fresh.check_surges(now) == []  # another process: the key is taken
            count = await connection.fetchval("SELECT count(*) FROM supervision_alerts WHERE kind = 'MERCHANT_SURGE'")
            assert count == 1
            await redis.aclose()
        finally:
            await pool.close()
            await connection.close()


async def ctl(target: str, credentials: dict[str, str], caller_id: str, *arguments: str) -> Result:
    # A wide terminal, so the live table's twelve columns are not folded.
    environment = {"SUBSIDYCTL_OPERATOR": caller_id, "SUBSIDYCTL_SECRET": credentials[caller_id], "COLUMNS": "250"}
    return await asyncio.to_thread(
        CliRunner().invoke, subsidyctl, ["--target", target, *arguments], env=environment, catch_exceptions=False
    )


async def test_subsidyctl_supervise_commands(world: World) -> None:
    """`subsidyctl supervise watch|alerts|today`, tables and --json, with a government
    credential; an alert recorded for today is listed by --date; a terminal is refused."""
    day = BusinessCalendar().day_of(datetime.now(UTC))
    connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
    try:
        planted = await alert_store.record_alert(
            connection,
            alert_store.NewAlert(
                alert_key=alert_store.merchant_surge_key("m-other", day),
                kind=alert_store.MERCHANT_SURGE,
                message="merchant m-other: planted for the command-line test",
                observed=40.0,
                baseline=2.0,
                raised_at=datetime.now(UTC),
                business_date=day,
                merchant_id="m-other",
            ),
            "test",
        )
    finally:
        await connection.close()
    assert planted is not None
    target = world.target()
    watched = await ctl(target, world.credentials, GOVERNMENT, "supervise", "watch", "--count", "2", "--json")
    assert watched.exit_code == 0, watched.output
    snapshots = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(snapshots) == 2 and int(snapshots[1]["sequence"]) > int(snapshots[0]["sequence"])
    assert any(item["campaign_id"] == "c-small" for item in snapshots[0]["budgets"])
    assert str(planted.alert_id) in {alert["alert_id"] for alert in snapshots[0]["alerts"]}
    table = await ctl(target, world.credentials, GOVERNMENT, "supervise", "watch", "--count", "1")
    assert table.exit_code == 0 and "c-small" in table.stdout and "remaining" in table.stdout
    listed = await ctl(
        target, world.credentials, GOVERNMENT, "supervise", "alerts", "--date", day.isoformat(), "--json"
    )
    assert listed.exit_code == 0, listed.output
    assert "m-other" in {alert["merchant_id"] for alert in json.loads(listed.stdout)}
    human = await ctl(target, world.credentials, GOVERNMENT, "supervise", "alerts")
    assert human.exit_code == 0 and "merchant surge" in human.stdout
    bad = await ctl(target, world.credentials, GOVERNMENT, "supervise", "alerts", "--date", "2026-02-30")
    assert bad.exit_code == 1 and "business_date" in bad.output
    today = await ctl(target, world.credentials, GOVERNMENT, "supervise", "today", "--json")
    assert today.exit_code == 0, today.output
    assert json.loads(today.stdout)["business_date"] == day.isoformat()
    today_table = await ctl(target, world.credentials, GOVERNMENT, "supervise", "today", "--top", "3")
    assert today_table.exit_code == 0 and "top merchants" in today_table.stdout
    refused = await ctl(target, world.credentials, TERMINAL, "supervise", "today")
    assert refused.exit_code == 1 and "PERMISSION_DENIED" in refused.output


async def test_report_show_lists_the_days_alerts_outside_its_hash(services: Services) -> None:
    """A published day's `subsidyctl report show` lists the alerts recorded for that business
    day (JSON and table); the report's content hash and its verification do not change."""
    from tests.integration.test_daily_report_rpc import GOVERNMENT as REPORT_READER
    from tests.integration.test_daily_report_rpc import OPERATOR as PUBLISHER
    from tests.integration.test_daily_report_rpc import report_world

    async with report_world(services) as made:
        async with made.reports(PUBLISHER) as operator:
            await operator.publish(made.days[-1].isoformat())
        day = made.days[0]
        target = f"127.0.0.1:{made.gateway.port}"
        before = json.loads(
            (await ctl(target, made.credentials, REPORT_READER, "--json", "report", "show", str(day))).stdout
        )
        assert before["alerts"] == []
        connection = await asyncpg.connect(made.env.pg_dsn, timeout=10)
        try:
            await alert_store.record_alert(
                connection,
                alert_store.NewAlert(
                    alert_key=alert_store.budget_threshold_key("c-main", "fridge", 80),
                    kind=alert_store.BUDGET_THRESHOLD,
                    message="c-main/fridge has used 80.0% of its budget (threshold 80%)",
                    observed=0.8,
                    baseline=0.8,
                    raised_at=BusinessCalendar().bounds(day)[0] + timedelta(hours=10),
                    business_date=day,
                    campaign_id="c-main",
                    category="fridge",
                    threshold_percent=80,
                ),
                "test",
            )
            shown = await ctl(target, made.credentials, REPORT_READER, "--json", "report", "show", str(day))
            assert shown.exit_code == 0, shown.output
            document = json.loads(shown.stdout)
            assert [(alert["campaign_id"], alert["threshold_percent"]) for alert in document["alerts"]] == [
                ("c-main", 80)
            ]
            assert document["header"]["content_hash"] == before["header"]["content_hash"]
            assert await daily_reports.verify(connection, day) is True
            other = json.loads(
                (
                    await ctl(target, made.credentials, REPORT_READER, "--json", "report", "show", str(made.days[1]))
                ).stdout
            )
            assert other["alerts"] == []
        finally:
            await connection.close()
        human = await ctl(target, made.credentials, REPORT_READER, "report", "show", str(day))
        assert human.exit_code == 0 and "alerts raised on" in human.stdout and "BUDGET_THRESHOLD" in human.stdout


async def use_small_budget_up_to(world: World, committed_fen: int) -> None:
    """Authorizes on c-small (20 % of the price) until reserved + spent is at least this much."""
    counters = await BudgetReader(world.gateway.redis, world.env.keys).read(["c-small"])
    committed = counters.category("c-small:fridge").reserved_fen + counters.category("c-small:fridge").spent_fen
    if committed < committed_fen:
        async with world.terminal() as terminal:
            approved = await terminal.authorize(
                campaign_id="c-small",
                consumer_key=consumer_key(),
                lines=[Line("1", FRIDGE, (committed_fen - committed) * 5)],
            )
        assert approved.decision == apb.DECISION_APPROVED


async def test_the_writer_raises_alerts_while_nobody_watches(world: World) -> None:
    """No WatchFunds stream is open (the gateway's poller is stopped); the ledger writer's alert
    watch still records the 90 % crossing of c-small, once, as the writer."""
    from redis.asyncio import Redis

    from server.processes.alert_watch import run_alert_watch

    assert world.gateway.poller is not None and not world.gateway.poller.running
    await use_small_budget_up_to(world, 90_000)
    redis = Redis.from_url(world.env.redis_url)
    stopping = asyncio.Event()
    config = world.env.config(alert_check_interval_s=1, writer_consumer="writer-test")
    task = asyncio.create_task(run_alert_watch(config, redis, stopping))
    connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
    try:
        rows: list[Any] = []
        for _ in range(100):  # bounded: about one check a second
            rows = await connection.fetch(
                "SELECT raised_by FROM supervision_alerts WHERE alert_key = 'BUDGET_THRESHOLD:c-small:fridge:90'"
            )
            if rows:
                break
            await asyncio.sleep(0.2)
        assert [row["raised_by"] for row in rows] == ["writer-test"]
        assert not world.gateway.poller.running
    finally:
        stopping.set()
        await task
        await connection.close()
        await redis.aclose()


async def test_budgets_still_flow_when_postgresql_fails(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Once the budgets are known, a poll whose PostgreSQL work fails (here: its pool closed
    under it) still reads Redis and sends every budget; only the ledger figures wait."""
    pool = LazyPool(world.env.pg_dsn)
    poller = FundsPoller(
        BudgetReader(world.gateway.redis, world.env.keys),
        pool,
        BusinessCalendar(),
        SupervisionSettings(ledger_refresh_s=0.0),
        autostart=False,
    )
    first = await poller.tick()
    await pool.close()
    second = await poller.tick()
    assert second.sequence == first.sequence + 1
    assert [(item.campaign_id, item.category) for item in second.budgets] == [
        (item.campaign_id, item.category) for item in first.budgets
    ]
    assert budget(second, "c-small", "fridge").budget_fen == 100_000
    assert "supervision: ledger read failed" in caplog.text


async def test_a_campaign_with_thresholds_of_its_own(world: World) -> None:
    """With c-small's thresholds overridden to 50 % and the default at 100 %, a poll records
    c-small's 50 % crossing once it has used half, and nothing for the other campaigns."""
    pool = LazyPool(world.env.pg_dsn)
    poller = FundsPoller(
        BudgetReader(world.gateway.redis, world.env.keys),
        pool,
        BusinessCalendar(),
        SupervisionSettings(thresholds=(100,), thresholds_by_campaign={"c-small": (50,)}),
        autostart=False,
    )
    await use_small_budget_up_to(world, 50_000)
    try:
        await poller.tick()
        snapshot = await poller.tick()
        assert budget(snapshot, "c-small", "fridge").used_ratio >= 0.5
        connection = await pool.get()
        keys = await alert_store.recorded_keys(
            connection, ["BUDGET_THRESHOLD:c-small:fridge:50", "BUDGET_THRESHOLD:c-main:fridge:100"]
        )
        assert keys == {"BUDGET_THRESHOLD:c-small:fridge:50"}
    finally:
        await pool.close()
