"""subsidyctl supervise: live fund supervision over the gateway (SupervisionService).

    subsidyctl supervise watch [--campaign ID] [--interval-ms N] [--count N]   a live table of every budget
    subsidyctl supervise alerts [--date DATE | --since TIME] [--limit N]        alerts, newest first
    subsidyctl supervise today [--top N]                                        today's figures so far

For an operator's or a government user's credential (``--operator ID``). ``--json`` (before or
after the command) prints JSON: ``watch --json`` one snapshot per line as it arrives. Amounts in
tables are yuan; in JSON integer fen, as on the wire.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table
from subsidy_client.supervision import SupervisionClient
from subsidy_client.v1 import supervision_pb2 as pb

from server.ctl.common import GATEWAY, Settings, pass_settings, run, to_dict
from server.domain.daily_report import yuan

SECTION = GATEWAY
KINDS = {pb.ALERT_KIND_BUDGET_THRESHOLD: "budget threshold", pb.ALERT_KIND_MERCHANT_SURGE: "merchant surge"}

json_flag = click.option("--json", "json_here", is_flag=True, help="print JSON instead of tables")


def _json(settings: Settings, json_here: bool) -> bool:
    return json_here or settings.json_output


def _when(stamp: Any) -> str:
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ") if stamp.seconds or stamp.nanos else ""


def budgets_table(snapshot: pb.WatchFundsResponse) -> Table:
    table = Table(title=f"budgets at {_when(snapshot.taken_at)} (poll {snapshot.sequence}; yuan)")
    for column in ("campaign", "category", "budget", "reserved", "spent", "refunded", "remaining", "used"):
        table.add_column(column, justify="left" if column in ("campaign", "category") else "right")
    for column in ("claims/min", "redeemed/min", "burn/min", "exhausted at"):
        table.add_column(column, justify="right")
    for item in snapshot.budgets:
        table.add_row(
            item.campaign_id,
            item.category,
            yuan(item.budget_fen),
            yuan(item.reserved_fen),
            yuan(item.spent_fen),
            yuan(item.refunded_fen),
            yuan(item.remaining_fen),
            f"{item.used_ratio:.1%}",
            f"{item.claims_per_minute:.1f}",
            f"{item.redemptions_per_minute:.1f}",
            yuan(item.burn_fen_per_minute),
            _when(item.projected_exhaustion_at) if item.HasField("projected_exhaustion_at") else "-",
        )
    return table


def alerts_table(alerts: list[pb.Alert], title: str = "alerts") -> Table:
    table = Table(title=title)
    for column in ("id", "raised at", "kind", "subject", "message"):
        table.add_column(column)
    for alert in alerts:
        subject = alert.merchant_id or f"{alert.campaign_id}/{alert.category}"
        table.add_row(alert.alert_id, _when(alert.raised_at), KINDS.get(alert.kind, "?"), subject, alert.message)
    return table


@click.group()
def supervise() -> None:
    """Live fund supervision: watch the budgets, list alerts, today's figures so far."""


@supervise.command("watch")
@click.option("--campaign", "campaign_id", default="", help="only this campaign")
@click.option("--interval-ms", default=0, type=int, help="between snapshots: 1000..60000 (default 1000)")
@click.option("--count", default=0, type=click.IntRange(0, None), help="stop after this many snapshots (0: never)")
@json_flag
@pass_settings
def watch(settings: Settings, campaign_id: str, interval_ms: int, count: int, json_here: bool) -> None:
    """A live table of every budget, refreshed from the WatchFunds stream (Ctrl-C ends it)."""
    as_json = _json(settings, json_here)
    console = Console()

    async def go(client: Any) -> None:
        seen = 0
        alerts: list[pb.Alert] = []
        stream = client.watch(campaign_id, interval_ms)
        if as_json:
            async for snapshot in stream:
                click.echo(json.dumps(to_dict(snapshot), ensure_ascii=False))
                seen += 1
                if seen == count:
                    break
            return
        with Live(console=console, auto_refresh=False) as live:
            async for snapshot in stream:
                alerts = (list(snapshot.alerts) + alerts)[:10]
                grid = Table.grid()
                grid.add_row(budgets_table(snapshot))
                grid.add_row(alerts_table(alerts, "latest alerts"))
                live.update(grid, refresh=True)
                seen += 1
                if seen == count:
                    break

    try:
        run(settings, go, SupervisionClient)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass


@supervise.command("alerts")
@click.option("--date", "business_date", default="", help="YYYY-MM-DD: that business day's alerts")
@click.option("--since", default="", help="ISO 8601 time: alerts raised since (default: the last 7 days)")
@click.option("--limit", default=0, type=click.IntRange(0, 1000), help="at most this many (default 100)")
@json_flag
@pass_settings
def alerts(settings: Settings, business_date: str, since: str, limit: int, json_here: bool) -> None:
    """Alerts recorded in PostgreSQL: newest first, or one business day's in order."""
    moment = None
    if since:
        try:
            moment = datetime.fromisoformat(since)
        except ValueError:
            raise click.BadParameter("not an ISO 8601 time", param_hint="--since") from None
        if moment.tzinfo is None:
            raise click.BadParameter("give a time zone (e.g. +08:00 or Z)", param_hint="--since")

    async def go(client: Any) -> list[pb.Alert]:
        found: list[pb.Alert] = await client.alerts(moment, limit, business_date)
        return found

    found = run(settings, go, SupervisionClient)
    if _json(settings, json_here):
        click.echo(json.dumps([to_dict(alert) for alert in found], ensure_ascii=False, indent=2))
        return
    Console().print(alerts_table(found))


@supervise.command("today")
@click.option("--top", default=0, type=click.IntRange(0, 100), help="top merchants (default 10)")
@json_flag
@pass_settings
def today(settings: Settings, top: int, json_here: bool) -> None:
    """The current business day so far, from the ledger: per campaign x category, the district
    total and the top merchants by redeemed subsidy."""

    async def go(client: Any) -> pb.GetTodayFiguresResponse:
        response: pb.GetTodayFiguresResponse = await client.today(top)
        return response

    response = run(settings, go, SupervisionClient)
    if _json(settings, json_here):
        click.echo(json.dumps(to_dict(response), ensure_ascii=False, indent=2))
        return
    console = Console()
    table = Table(title=f"{response.business_date} ({response.time_zone}) so far, as of {_when(response.as_of)}; yuan")
    for column in (
        "campaign",
        "category",
        "consumers",
        "sales",
        "redeemed",
        "order",
        "refunds",
        "refunded",
        "merchants",
    ):
        table.add_column(column, justify="left" if column in ("campaign", "category") else "right")
    for item in [*response.categories, response.district_total]:
        table.add_row(
            item.campaign_id or "district",
            item.category or "",
            str(item.consumers),
            str(item.sales),
            yuan(item.redeemed_fen),
            yuan(item.order_fen),
            str(item.refunds),
            yuan(item.refunded_fen),
            str(item.merchants),
        )
    console.print(table)
    merchants = Table(title="top merchants")
    for column in ("merchant", "name", "sales", "redeemed", "order", "refunded"):
        merchants.add_column(column, justify="left" if column in ("merchant", "name") else "right")
    for merchant in response.top_merchants:
        merchants.add_row(
            merchant.merchant_id,
            merchant.merchant_name,
            str(merchant.sales),
            yuan(merchant.redeemed_fen),
            yuan(merchant.order_fen),
            yuan(merchant.refunded_fen),
        )
    console.print(merchants)


COMMANDS = (supervise,)
