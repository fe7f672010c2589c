"""A gateway and the bureau's dashboard over a real PostgreSQL and Redis, for the dashboard's
tests (tests/integration/test_dashboard.py over HTTP, test_dashboard_browser.py in Chromium).

The world: the test reference data plus a government user (``gov-dash``) and an auditor; two
generated closed days in the ledger (ten and nine days ago), published by the operator, so
there are reports to list and download; the first day's settlement file of a payment channel
imported with three deliberate exceptions (an amount 1.23 yuan too high, a payment the ledger
never saw, a payment missing from the file); a gateway on an ephemeral port; the dashboard on
another, calling that gateway.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
import yaml
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, RetryPolicy
from subsidy_client.reconciliation import ReconciliationClient
from subsidy_client.reports import DailyReportClient

from server.domain.bill_matching import mirror
from server.domain.daily_report import BusinessCalendar
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from server.domain.settlement_file import PAYMENT, ChannelLine, standard_file
from server.processes.app import Application
from server.processes.dashboard import DashboardServer, start_dashboard
from storage.devenv import Services
from storage.postgres import daily_reports, reconciliation
from storage.postgres.writer import LedgerWriter, WriterConfig
from tests.conftest import REFERENCE_FILE, Environment, isolated_environment, load_document, running_gateway

CALENDAR = BusinessCalendar("Asia/Shanghai", "00:30")
GOVERNMENT, AUDITOR, OPERATOR, TERMINAL = "gov-dash", "aud-dash", "op-auditor", "t-main-01"
STAFF = [
    {"id": GOVERNMENT, "name": "萧山区商务局（只读）", "role": "government"},
    {"id": AUDITOR, "name": "区审计局", "role": "auditor"},
]


@dataclass
class DashboardWorld:
    env: Environment
    gateway: Application
    dashboard: DashboardServer
    credentials: dict[str, str]
    days: list[date]
    run_id: str = ""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard.port}"

    def reports(self, caller_id: str) -> DailyReportClient:
        return DailyReportClient(
            self.target, caller_id, self.credentials[caller_id], deadline_s=30.0, retry=RetryPolicy(max_attempts=1)
        )

    def reconciliation(self, caller_id: str) -> ReconciliationClient:
        return ReconciliationClient(
            self.target, caller_id, self.credentials[caller_id], deadline_s=30.0, retry=RetryPolicy(max_attempts=1)
        )

    async def drain_ledger(self) -> None:
        """Writes what the gateway's scripts put on the event stream into the ledger, as the
        ledger writer process would (today's figures are cut from the ledger)."""
        redis = Redis.from_url(self.env.redis_url)
        writer = LedgerWriter(
            WriterConfig(pg_dsn=self.env.pg_dsn, redis_url=self.env.redis_url, prefix=self.env.prefix), redis
        )
        try:
            await writer.drain()
        finally:
            await writer.close()
            await redis.aclose()

    def terminal(self) -> AuthorizationClient:
        return AuthorizationClient(
            self.target, TERMINAL, self.credentials[TERMINAL], deadline_s=10.0, retry=RetryPolicy(max_attempts=1)
        )


@asynccontextmanager
async def dashboard_world(services: Services) -> AsyncIterator[DashboardWorld]:
    async with isolated_environment(services) as env:
        document = yaml.safe_load(REFERENCE_FILE.read_text())
        document["operators"] = [*document["operators"], *STAFF]
        credentials = {**env.credentials, **await load_document(env, document)}
        first = CALENDAR.day_of(datetime.now(UTC)) - timedelta(days=10)
        start_ms = int(CALENDAR.bounds(first)[0].timestamp() * 1000)
        # The generated days use the paused campaign, so the live figures of c-main (the sale the
        # browser test makes) and the ledger's history do not overlap.
        settings = SimSettings(
            campaigns=(SimCampaign("c-paused", ("fridge",)),),
            merchants=("m-main", "m-other"),
            seed=12,
            refund_share=0.2,
            partial_refund_share=0.3,
        )
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            await daily_reports.write_simulated(
                connection, simulate(settings, start_ms, start_ms + 2 * 86_400_000, 300)
            )
        finally:
            await connection.close()
        config = env.config()
        async with running_gateway(config) as gateway:
            days = [first, first + timedelta(days=1)]
            world_config = env.config(dashboard_listen="127.0.0.1:0", dashboard_gateway=f"127.0.0.1:{gateway.port}")
            dashboard = await start_dashboard(world_config)
            world = DashboardWorld(env, gateway, dashboard, credentials, days)
            try:
                async with world.reports(OPERATOR) as operator:
                    await operator.publish(days[-1].isoformat())
                world.run_id = await import_settlement(world, days[0])
                yield world
            finally:
                await dashboard.stop()


async def import_settlement(world: DashboardWorld, day: date) -> str:
    """The day's file as the channel would send it, but for three exceptions; returns the run."""
    start, end = CALENDAR.bounds(day)
    connection = await asyncpg.connect(world.env.pg_dsn, timeout=10)
    try:
        async with connection.transaction():
            items = [item async for item in reconciliation.ledger_items(connection, start, end)]
    finally:
        await connection.close()
    lines = [mirror(item, 0, f"CH{index:08d}") for index, item in enumerate(items)]
    payments = [index for index, item in enumerate(items) if item.kind == PAYMENT]
    mismatch, dropped = payments[1], payments[3]
    lines[mismatch] = lines[mismatch]._replace(subsidy_fen=lines[mismatch].subsidy_fen + 123)
    extra = ChannelLine(0, PAYMENT, "CHEXTRA0001", "f" * 32, 99_900, 4_567, 0, lines[0].time)
    kept = [line for index, line in enumerate(lines) if index != dropped]
    kept.insert(5, extra)
    numbered = [line._replace(line_number=number) for number, line in enumerate(kept, start=2)]
    async with world.reconciliation(OPERATOR) as operator:
        answer = await operator.import_file(
            io.BytesIO("".join(standard_file(numbered)).encode()),
            channel="demo-pay",
            business_date=day.isoformat(),
            file_name=f"demo-pay-{day}.csv",
        )
    assert answer.applied, list(answer.errors)
    return answer.run.run_id
