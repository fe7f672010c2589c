"""subsidyctl reporting: the ledger's health asked of the gateway (ReportingService).

    subsidyctl reporting reconcile   Redis counters against the ledger's sums, every difference to the fen
    subsidyctl reporting lag         how far the ledger is behind the event stream

The same questions as ``subsidyctl ledger reconcile`` and ``ledger lag``, for an operator who
holds an operator's credential but no PostgreSQL or Redis access (the gateway answers them
from its own connections). A difference is a finding (exit status 1), as for ``ledger
reconcile``; so is any backlog for ``reconcile``, which is only meaningful once the writer
has drained the stream.
"""

from __future__ import annotations

import click
from subsidy_client import ReportingClient, SignedClient
from subsidy_client.v1 import reporting_pb2

from server.ctl.common import GATEWAY, Settings, emit, finding, json_option, pass_settings, run

# The heading of `subsidyctl --help` this group belongs under (server/ctl/__init__.py).
SECTION = GATEWAY


@click.group()
def reporting() -> None:
    """The ledger's reconciliation and lag, asked of the gateway (an operator's credential)."""


@reporting.command("reconcile", short_help="Redis counters against the ledger (asked of the gateway).")
@json_option
@pass_settings
def reconcile(settings: Settings) -> None:
    """Compares every Redis budget, consumer-usage and serial counter with the sums over the
    PostgreSQL ledger, listing each difference (budgets in fen, usage in units); a difference,
    or events still unwritten (the comparison is then premature), is a finding (exit status 1)."""

    async def action(client: SignedClient) -> reporting_pb2.ReconcileResponse:
        assert isinstance(client, ReportingClient)
        return await client.reconcile()

    response = run(settings, action, ReportingClient)
    rows = [
        {
            "kind": item.kind,
            "key": item.key,
            "ledger": item.ledger_owner or str(item.ledger_value),
            "redis": item.redis_owner or str(item.redis_value),
        }
        for item in response.differences
    ] or [{"kind": "-", "key": "no differences", "ledger": "", "redis": ""}]
    if settings.json_output:
        emit(settings, response)
    else:
        emit(settings, response, rows)
        click.echo(f"ledger backlog: {response.ledger_backlog} events")
    finding(bool(response.differences) or response.ledger_backlog > 0)


@reporting.command("lag", short_help="How far the ledger is behind the stream (asked of the gateway).")
@json_option
@pass_settings
def lag(settings: Settings) -> None:
    """The event stream's length, entries delivered to the writer but unacknowledged
    (pending), never delivered (undelivered), the oldest unwritten event's age in seconds,
    and dead letters; dead letters are a finding (exit status 1)."""

    async def action(client: SignedClient) -> reporting_pb2.GetLedgerStatusResponse:
        assert isinstance(client, ReportingClient)
        return await client.get_ledger_status()

    response = run(settings, action, ReportingClient)
    emit(settings, response)
    finding(response.dead_letters > 0)


COMMANDS = (reporting,)
