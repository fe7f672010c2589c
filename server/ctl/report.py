"""subsidyctl report: the T+1 daily reports over the gateway (DailyReportService).

    subsidyctl report publish [--up-to DATE]           publish every closed day not yet published (operators)
    subsidyctl report list [--from DATE] [--to DATE]   the published reports, newest first
    subsidyctl report show DATE|latest [--merchants]   header, budgets, totals, the day's alerts (--merchants: all rows)
    subsidyctl report export DATE|latest --format csv|xlsx [--budgets] [--out FILE]

Reading works with an operator's or a government user's credential (``--operator ID`` names
it in the credentials file). ``--json`` (before or after the command) prints JSON; ``show
--json`` streams the rows out as they arrive, so a large report is never held whole. Amounts
in tables are yuan; in JSON integer fen, as on the wire.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import click
from subsidy_client.reports import DailyReportClient
from subsidy_client.supervision import SupervisionClient
from subsidy_client.v1 import daily_report_pb2 as pb
from subsidy_client.v1 import supervision_pb2

from server.ctl.common import GATEWAY, Settings, operator_tls, pass_settings, run, to_dict
from server.domain.daily_report import yuan

# The heading of `subsidyctl --help` this group belongs under (server/ctl/__init__.py).
SECTION = GATEWAY
LEVELS = {
    pb.DAILY_REPORT_ROW_LEVEL_MERCHANT: "merchant",
    pb.DAILY_REPORT_ROW_LEVEL_CATEGORY_TOTAL: "campaign x category",
    pb.DAILY_REPORT_ROW_LEVEL_DISTRICT_TOTAL: "district",
}
KINDS = {pb.DAILY_REPORT_ROW_KIND_DAY: "day", pb.DAILY_REPORT_ROW_KIND_ADJUSTMENT: "adjustment"}
FORMATS = {"csv": pb.EXPORT_FORMAT_CSV, "xlsx": pb.EXPORT_FORMAT_XLSX}

json_flag = click.option("--json", "json_here", is_flag=True, help="print JSON instead of tables")


def _json(settings: Settings, json_here: bool) -> bool:
    return json_here or settings.json_output


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _pad(text: str, width: int, right: bool = False) -> str:
    room = " " * max(width - _width(text), 0)
    return room + text if right else text + room


def _table(rows: list[dict[str, str]], numeric: set[str]) -> str:
    """Columns aligned in terminal cells (a Chinese character takes two)."""
    if not rows:
        return "(none)"
    columns = list(rows[0])
    widths = {column: max(_width(column), *(_width(row[column]) for row in rows)) for column in columns}
    lines = ["  ".join(_pad(column.upper(), widths[column], column in numeric) for column in columns)]
    for row in rows:
        lines.append("  ".join(_pad(row[column], widths[column], column in numeric) for column in columns))
    return "\n".join(line.rstrip() for line in lines)


def _summary(header: pb.DailyReportHeader) -> dict[str, str]:
    day = header.day_total
    return {
        "date": header.business_date,
        "consumers": str(day.consumers),
        "sales": str(day.sales),
        "redeemed": yuan(day.redeemed_fen),
        "orders": yuan(day.order_fen),
        "refunded": yuan(day.refunded_fen),
        "clawed_back": yuan(day.clawed_back_fen),
        "merchants": str(day.merchants),
        "tickets": f"{header.tickets_opened}/{header.tickets_resolved}/{header.tickets_overdue}",
        "adjustments": str(header.adjustment_rows),
        "published_by": header.published_by,
        "content_hash": header.content_hash[:16],
    }


def _budget_row(line: pb.DailyReportBudget) -> dict[str, str]:
    return {
        "campaign": line.campaign_id,
        "category": line.category,
        "budget": yuan(line.budget_fen),
        "opening": yuan(line.opening_spent_fen),
        "captured": yuan(line.captured_fen),
        "refunded": yuan(line.refunded_fen),
        "clawed_back": yuan(line.clawed_back_fen),
        "closing": yuan(line.closing_spent_fen),
        "recovered": yuan(line.closing_recovered_fen),
        "held": yuan(line.closing_held_fen),
        "remaining": yuan(line.remaining_fen),
    }


def _row(row: pb.DailyReportRow) -> dict[str, str]:
    figures = row.figures
    return {
        "kind": KINDS.get(row.kind, "?") + (f" {row.original_date}" if row.original_date else ""),
        "level": LEVELS.get(row.level, "?"),
        "campaign": row.campaign_id,
        "category": row.category,
        "merchant": row.merchant_name or row.merchant_id,
        "consumers": str(figures.consumers),
        "sales": str(figures.sales),
        "redeemed": yuan(figures.redeemed_fen),
        "orders": yuan(figures.order_fen),
        "refunds": str(figures.refunds),
        "refunded": yuan(figures.refunded_fen),
        "clawed_back": yuan(figures.clawed_back_fen),
        "merchants": str(figures.merchants),
    }


NUMERIC = {"consumers", "sales", "redeemed", "orders", "refunds", "refunded", "merchants", "adjustments"}
NUMERIC |= {"budget", "opening", "captured", "closing", "held", "remaining", "clawed_back", "recovered", "tickets"}


async def _resolve(client: DailyReportClient, business_date: str) -> str:
    if business_date != "latest":
        return business_date
    reports = await client.list(limit=1)
    if not reports:
        raise click.ClickException("no daily report is published yet (subsidyctl report publish)")
    return reports[0].business_date


@click.group()
def report() -> None:
    """T+1 daily reports: publish, list, show, export (CSV / XLSX)."""


@report.command("publish")
@click.option("--up-to", "up_to", default="", help="YYYY-MM-DD (default: the last closed day)")
@json_flag
@pass_settings
def publish(settings: Settings, up_to: str, json_here: bool) -> None:
    """Publish every closed business day not yet published (operators only)."""

    async def go(client: Any) -> pb.PublishDailyReportsResponse:
        response: pb.PublishDailyReportsResponse = await client.publish(up_to)
        return response

    response = run(settings, go, DailyReportClient)
    if _json(settings, json_here):
        click.echo(json.dumps(to_dict(response), ensure_ascii=False, indent=2))
        return
    click.echo(
        f"published {len(response.published)} report(s); last published {response.last_published_date or '(none)'},"
        f" last closed day {response.last_closed_date}"
    )
    if response.published:
        click.echo(_table([_summary(header) for header in response.published], NUMERIC))


@report.command("list")
@click.option("--from", "from_date", default="", help="YYYY-MM-DD, inclusive")
@click.option("--to", "to_date", default="", help="YYYY-MM-DD, inclusive")
@click.option("--limit", default=0, type=click.IntRange(0, 1000), help="at most this many (default 100)")
@json_flag
@pass_settings
def list_reports(settings: Settings, from_date: str, to_date: str, limit: int, json_here: bool) -> None:
    """The published reports, newest first, with the day's district totals."""

    async def go(client: Any) -> list[pb.DailyReportHeader]:
        found: list[pb.DailyReportHeader] = await client.list(from_date, to_date, limit)
        return found

    reports = run(settings, go, DailyReportClient)
    if _json(settings, json_here):
        click.echo(json.dumps([to_dict(header) for header in reports], ensure_ascii=False, indent=2))
        return
    click.echo(_table([_summary(header) for header in reports], NUMERIC))


@report.command("show")
@click.argument("business_date")
@click.option("--merchants", is_flag=True, help="every merchant row too (default: the totals)")
@json_flag
@pass_settings
def show(settings: Settings, business_date: str, merchants: bool, json_here: bool) -> None:
    """One report: its identity, budget lines and rows (DATE is YYYY-MM-DD or 'latest')."""
    as_json = _json(settings, json_here)
    levels = () if merchants or as_json else (
        pb.DAILY_REPORT_ROW_LEVEL_CATEGORY_TOTAL, pb.DAILY_REPORT_ROW_LEVEL_DISTRICT_TOTAL
    )  # fmt: skip

    async def go(client: Any) -> None:
        day = await _resolve(client, business_date)
        rows_open = False
        async for part in client.stream(day, levels):
            if part.HasField("header"):
                if as_json:
                    click.echo('{"header": ' + json.dumps(to_dict(part.header), ensure_ascii=False) + ",")
                else:
                    _print_header(part.header)
            elif part.budgets or not part.rows:
                if as_json:
                    budgets = [to_dict(line) for line in part.budgets]
                    click.echo('"budgets": ' + json.dumps(budgets, ensure_ascii=False) + ',\n"rows": [')
                else:
                    click.echo(
                        "\nbudgets (yuan; spent = owed to merchants: captured net of refunds and claw-backs,"
                        " held = open holds, recovered = clawed back, not granted again)"
                    )
                    click.echo(_table([_budget_row(line) for line in part.budgets], NUMERIC))
                    click.echo("\nrows (yuan)")
            else:
                for row in part.rows:
                    if as_json:
                        click.echo(("," if rows_open else "") + json.dumps(to_dict(row), ensure_ascii=False))
                        rows_open = True
                chunk = [_row(row) for row in part.rows]
                if not as_json:
                    click.echo(_table(chunk, NUMERIC))
        # The day's supervision alerts (SupervisionService; not part of the published content
        # or its hash: alerts are recorded as they happen, the report is cut after the day).
        async with SupervisionClient(
            settings.target, settings.operator_id, settings.secret, deadline_s=30.0, tls=operator_tls()
        ) as supervision:
            alerts = await supervision.alerts(limit=1000, business_date=day)
        if as_json:
            click.echo('], "alerts": ' + json.dumps([to_dict(alert) for alert in alerts], ensure_ascii=False) + "}")
        else:
            click.echo(f"\nalerts raised on {day} (live supervision; not in the content hash)")
            click.echo(_table([_alert(alert) for alert in alerts], set()))

    run(settings, go, DailyReportClient)


def _alert(alert: supervision_pb2.Alert) -> dict[str, str]:
    return {
        "raised_at": alert.raised_at.ToDatetime().isoformat() + "Z",
        "kind": supervision_pb2.AlertKind.Name(alert.kind).removeprefix("ALERT_KIND_"),
        "subject": alert.merchant_id or f"{alert.campaign_id}/{alert.category}",
        "message": alert.message,
    }


def _print_header(header: pb.DailyReportHeader) -> None:
    click.echo(f"daily report {header.business_date} ({header.time_zone}, closes {header.cutoff} next day)")
    click.echo(f"  cut at {header.cut_at.ToDatetime().isoformat()}Z by {header.published_by}")
    click.echo(f"  content SHA-256 {header.content_hash}")
    click.echo(f"  previous {header.previous_date or '(first report)'} {header.previous_hash}")
    for head in header.chain_heads:
        click.echo(f"  chain head {head.campaign_id}: entry {head.entry_seq} {head.entry_hash}")
    click.echo(f"  {header.row_count} rows, {header.adjustment_rows} of them adjustments of earlier days")
    if header.format_version >= 2:
        click.echo(
            f"  complaints: {header.tickets_opened} opened, {header.tickets_resolved} resolved or rejected,"
            f" {header.tickets_overdue} open and overdue at the day's end"
        )


@report.command("export")
@click.argument("business_date")
@click.option("--format", "file_format", type=click.Choice(sorted(FORMATS)), default="xlsx", show_default=True)
@click.option("--budgets", is_flag=True, help="CSV: the budget lines instead of the rows (an XLSX has both)")
@click.option("--out", type=click.Path(path_type=Path), help="file to write (default: the name the gateway gives)")
@json_flag
@pass_settings
def export(
    settings: Settings, business_date: str, file_format: str, budgets: bool, out: Path | None, json_here: bool
) -> None:
    """Download a report as CSV or XLSX (Chinese headers, yuan).

    CSV is UTF-8 with a BOM (Excel opens it as is); --budgets for the budget lines."""
    table = pb.EXPORT_TABLE_BUDGETS if budgets else pb.EXPORT_TABLE_ROWS

    async def go(client: Any) -> dict[str, Any]:
        day = await _resolve(client, business_date)
        target: Path | None = out
        partial: Path | None = None
        size, content_hash = 0, ""
        handle = None
        try:
            async for part in client.export(day, FORMATS[file_format], table):
                if handle is None:
                    target = target or Path(part.file_name)
                    content_hash = part.content_hash
                    partial = target.with_name(target.name + ".part")
                    handle = open(partial, "wb")  # noqa: ASYNC230 - written chunk by chunk as they arrive
                handle.write(part.chunk)
                size += len(part.chunk)
        finally:
            if handle is not None:
                handle.close()
        assert target is not None and partial is not None
        partial.replace(target)
        return {"file": str(target), "bytes": size, "business_date": day, "content_hash": content_hash}

    result = run(settings, go, DailyReportClient)
    if _json(settings, json_here):
        click.echo(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        click.echo(f"wrote {result['file']} ({result['bytes']} bytes) from report {result['business_date']}")


COMMANDS = (report,)
