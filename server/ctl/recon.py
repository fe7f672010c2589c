"""subsidyctl recon: bill reconciliation with the payment channel over the gateway
(ReconciliationService; docs/reconciliation.md).

    subsidyctl recon import FILE --channel C --date D [--mapping YAML] [--good-lines]
    subsidyctl recon show [--channel C] [--date D] [--run ID] [--history] [--matched]
    subsidyctl recon export (--run ID | --channel C --date D) --format csv|xlsx [--out FILE]
    subsidyctl recon resolve --run ID --position N --reason TEXT

``import`` and ``resolve`` need an operator's credential; ``show`` and ``export`` an operator's or a
government user's. ``show`` without a run (no --run, not both --channel and --date) lists the
runs; with one, its summary and its exception lines. ``--json`` (before or after the command)
prints JSON (amounts in fen); tables show yuan. Exit status 1 when an import rejected lines or
a run has exceptions (a finding), as ``ledger reconcile`` does for a difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml
from subsidy_client.reconciliation import ReconciliationClient
from subsidy_client.v1 import reconciliation_pb2 as pb

from server.ctl.common import (
    EXIT_PROBLEM,
    GATEWAY,
    ConfigurationError,
    Settings,
    echo_json,
    format_table,
    json_option,
    new_request_id,
    pass_settings,
    run,
    steps,
    to_dict,
)
from server.domain.daily_report import yuan
from server.domain.reconciliation_files import KIND_NAMES, STATUS_NAMES
from server.domain.settlement_file import ColumnMapping, mapping_from_dict

SECTION = GATEWAY
FORMATS = {"csv": pb.RECONCILIATION_EXPORT_FORMAT_CSV, "xlsx": pb.RECONCILIATION_EXPORT_FORMAT_XLSX}


def _status(value: int) -> str:
    return pb.ReconciliationStatus.Name(value).removeprefix("RECONCILIATION_STATUS_")  # type: ignore[arg-type]


def _kind(value: int) -> str:
    return pb.ReconciliationKind.Name(value).removeprefix("RECONCILIATION_KIND_").replace("UNSPECIFIED", "")  # type: ignore[arg-type]


def mapping_message(path: Path | None) -> pb.SettlementColumnMapping:
    """The --mapping YAML (docs/reconciliation.md) as the header's message; none: the standard format."""
    if path is None:
        return pb.SettlementColumnMapping()
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(document, dict):
            raise ValueError("the mapping file must be a YAML mapping")
        mapping: ColumnMapping = mapping_from_dict(document)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ConfigurationError(f"{path}: {error}") from None
    message = pb.SettlementColumnMapping(
        payment_status_values=list(mapping.payment_status_values),
        refund_status_values=list(mapping.refund_status_values),
        ignore_status_values=list(mapping.ignore_status_values),
    )
    for name in (
        "name",
        "channel_txn_id",
        "authorization_id",
        "order_amount",
        "subsidy_amount",
        "refund_amount",
        "time",
        "status",
        "refund_txn_id",
        "amount_unit",
        "trailer_marker",
        "trailer_count",
        "trailer_subsidy_total",
        "trailer_refund_total",
        "time_format",
        "time_zone",
    ):
        setattr(message, name, getattr(mapping, name))
    return message


def run_row(run_message: pb.ReconciliationRun) -> dict[str, Any]:
    counts = {_status(count.status): count.lines for count in run_message.counts}
    return {
        "date": run_message.business_date,
        "channel": run_message.channel,
        "run": run_message.run_id[:8],
        "file": run_message.file_name,
        "lines": run_message.file_lines,
        "matched": counts.get("MATCHED", 0),
        "mismatch": counts.get("AMOUNT_MISMATCH", 0),
        "not_in_ledger": counts.get("MISSING_IN_LEDGER", 0),
        "not_in_file": counts.get("MISSING_IN_CHANNEL", 0),
        "duplicate": counts.get("DUPLICATE_IN_FILE", 0),
        "bad": counts.get("BAD_LINE", 0),
        "channel_net": yuan(run_message.channel_net_subsidy_fen),
        "ledger_net": yuan(run_message.ledger_net_subsidy_fen),
        "state": "superseded" if run_message.superseded_by_run_id else "current",
    }


def line_row(line: pb.ReconciliationLine) -> dict[str, Any]:
    status = _status(line.status)
    return {
        "status": status,
        "状态": STATUS_NAMES.get(status, ""),
        "kind": KIND_NAMES.get(_kind(line.kind), ""),
        "line": line.line_number or "-",
        "channel_txn": line.channel_txn_id,
        "authorization": line.authorization_id,
        "channel": yuan(line.channel_subsidy_fen),
        "ledger": yuan(line.ledger_subsidy_fen),
        "difference": yuan(line.difference_fen),
        "order_diff": yuan(line.order_difference_fen),
        "position": line.position,
        "resolved": f"{line.resolved_by}: {line.resolution}" if line.resolved_by else "",
        "error": line.error,
    }


@click.group()
def recon() -> None:
    """Bill reconciliation: import a channel's settlement file, show runs and exceptions, export."""


@recon.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--channel", required=True, help="the payment channel, e.g. wechat-pay ([a-z0-9_-])")
@click.option("--date", "business_date", required=True, help="the business day the file settles, YYYY-MM-DD")
@click.option(
    "--mapping",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML column mapping for a channel's own format (default: the standard format)",
)
@click.option(
    "--all-or-nothing/--good-lines",
    "all_or_nothing",
    default=True,
    show_default=True,
    help="store nothing if any line is bad, or match the good lines and keep the bad ones as errors",
)
@json_option
@pass_settings
def import_file(
    settings: Settings, file: Path, channel: str, business_date: str, mapping: Path | None, all_or_nothing: bool
) -> None:
    """Import FILE, a channel's settlement file for one day, and match it against the ledger.
    The same file again changes nothing; another file for the same channel and day supersedes
    the current run (kept as history). A progress bar (bytes sent, on stderr) follows a large
    file. Exit status 1 when lines were rejected or the run has exceptions."""
    header_mapping = mapping_message(mapping)
    mode = pb.SETTLEMENT_IMPORT_MODE_ALL_OR_NOTHING if all_or_nothing else pb.SETTLEMENT_IMPORT_MODE_GOOD_LINES
    with steps(settings.json_output) as progress:
        sending = progress.add(f"sending {file.name}", file.stat().st_size)

        async def go(client: Any) -> pb.ImportSettlementFileResponse:
            with file.open("rb") as handle:
                response: pb.ImportSettlementFileResponse = await client.import_file(
                    handle,
                    channel=channel,
                    business_date=business_date,
                    file_name=file.name,
                    mapping=header_mapping,
                    mode=mode,
                    request_id=new_request_id(),
                    progress=lambda size: progress.advance(sending, size),
                )
                return response

        response = run(settings, go, ReconciliationClient)
        progress.finish(sending)
    if settings.json_output:
        echo_json(to_dict(response))
    else:
        if response.errors:
            rows = [{"line": e.line_number, "column": e.column, "reason": e.reason} for e in response.errors]
            click.echo(format_table(rows))
            if not response.applied:
                click.echo("nothing was stored; fix the lines above (or use --good-lines)", err=True)
        if response.run.run_id:
            said = "already imported: nothing changed" if response.replayed else "imported"
            click.echo(f"{said}: run {response.run.run_id}")
            click.echo(format_table([run_row(response.run)]))
    if response.lines_rejected or response.run.exception_lines:
        raise click.exceptions.Exit(EXIT_PROBLEM)


@recon.command("show")
@click.option("--channel", default="", help="the payment channel")
@click.option("--date", "business_date", default="", help="the business day, YYYY-MM-DD")
@click.option("--run", "run_id", default="", help="a run id (also a superseded one)")
@click.option("--history", is_flag=True, help="list superseded runs too")
@click.option("--matched", is_flag=True, help="every result line, not only the exceptions")
@json_option
@pass_settings
def show(settings: Settings, channel: str, business_date: str, run_id: str, history: bool, matched: bool) -> None:
    """The runs (newest first), or one run (--run, or --channel with --date) with its
    exception lines. Exit status 1 when that run has exceptions."""
    if not run_id and not (channel and business_date):

        async def listing(client: Any) -> list[pb.ReconciliationRun]:
            found: list[pb.ReconciliationRun] = await client.list(
                channel=channel, from_date=business_date, to_date=business_date, include_superseded=history
            )
            return found

        runs = run(settings, listing, ReconciliationClient)
        if settings.json_output:
            echo_json([to_dict(item) for item in runs])
        else:
            click.echo(format_table([run_row(item) for item in runs]))
        return

    async def detail(client: Any) -> pb.ReconciliationRun:
        summary = pb.ReconciliationRun()
        lines_open = False
        async for part in client.results(run_id, channel=channel, business_date=business_date, include_matched=matched):
            if part.HasField("run"):
                summary = part.run
                if settings.json_output:
                    click.echo('{"run": ' + json.dumps(to_dict(part.run), ensure_ascii=False) + ',\n"lines": [')
                else:
                    click.echo(format_table([run_row(part.run)]))
                    click.echo(f"\nrun {part.run.run_id}, file SHA-256 {part.run.file_sha256}")
                    if part.run.superseded_by_run_id:
                        click.echo(f"superseded by run {part.run.superseded_by_run_id}")
                    click.echo("\nlines (yuan; difference = channel - ledger)")
                continue
            if settings.json_output:
                for line in part.lines:
                    click.echo(("," if lines_open else "") + json.dumps(to_dict(line), ensure_ascii=False))
                    lines_open = True
            else:
                click.echo(format_table([line_row(line) for line in part.lines]))
        if settings.json_output:
            click.echo("]}")
        elif summary.exception_lines == 0 and not matched:
            click.echo("(no exceptions)")
        return summary

    summary = run(settings, detail, ReconciliationClient)
    if summary.exception_lines:
        raise click.exceptions.Exit(EXIT_PROBLEM)


@recon.command("resolve")
@click.option("--run", "run_id", required=True, help="the run id")
@click.option("--position", required=True, type=click.IntRange(1), help="the line's position (show --json: position)")
@click.option("--reason", required=True, help="why it is resolved (1-500 characters)")
@json_option
@pass_settings
def resolve(settings: Settings, run_id: str, position: int, reason: str) -> None:
    """Mark one exception line resolved, saying why (operators; who and when are recorded)."""

    async def go(client: Any) -> pb.ResolveReconciliationLineResponse:
        response: pb.ResolveReconciliationLineResponse = await client.resolve(
            run_id, position, reason, request_id=new_request_id()
        )
        return response

    response = run(settings, go, ReconciliationClient)
    if settings.json_output:
        echo_json(to_dict(response))
    else:
        click.echo(format_table([line_row(response.line)]))
        click.echo(f"resolved by {response.line.resolved_by}: {response.line.resolution}")


@recon.command("export")
@click.option("--channel", default="", help="the payment channel")
@click.option("--date", "business_date", default="", help="the business day, YYYY-MM-DD")
@click.option("--run", "run_id", default="", help="a run id (default: the channel and day's current run)")
@click.option("--format", "file_format", type=click.Choice(sorted(FORMATS)), default="xlsx", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="file to write (default: the name the gateway gives)")
@json_option
@pass_settings
def export(
    settings: Settings, channel: str, business_date: str, run_id: str, file_format: str, out: Path | None
) -> None:
    """Download a run's exceptions as CSV (UTF-8 with a BOM) or XLSX: Chinese headers, yuan."""
    if not run_id and not (channel and business_date):
        raise click.UsageError("name the run: --run ID, or --channel and --date")

    async def go(client: Any) -> dict[str, Any]:
        target: Path | None = out
        partial: Path | None = None
        size, exported = 0, ""
        handle = None
        try:
            async for part in client.export(
                run_id, channel=channel, business_date=business_date, file_format=FORMATS[file_format]
            ):
                if handle is None:
                    target = target or Path(part.file_name)
                    exported = part.run_id
                    partial = target.with_name(target.name + ".part")
                    handle = open(partial, "wb")  # noqa: ASYNC230 - written chunk by chunk as they arrive
                handle.write(part.chunk)
                size += len(part.chunk)
        finally:
            if handle is not None:
                handle.close()
        assert target is not None and partial is not None
        partial.replace(target)
        return {"file": str(target), "bytes": size, "run_id": exported}

    result = run(settings, go, ReconciliationClient)
    if settings.json_output:
        echo_json(result)
    else:
        click.echo(f"wrote {result['file']} ({result['bytes']} bytes) from run {result['run_id']}")


COMMANDS = (recon,)
