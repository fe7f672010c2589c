"""subsidyctl reporting: the ledger's health asked of the gateway (ReportingService).

    subsidyctl reporting reconcile   Redis counters against the ledger's sums (every difference to
                                     the fen) and the qualification mirror's, the sweepers' and the
                                     stream consumers' backlogs
    subsidyctl reporting lag         how far the ledger is behind the event stream

The same questions as ``subsidyctl ledger reconcile`` and ``ledger lag``, for an operator who
holds an operator's credential but no PostgreSQL or Redis access (the gateway answers them
from its own connections). A difference, sweeper backlog or dead letter is a finding (exit
status 1), as for ``ledger reconcile``; so, for ``reconcile``, is an event the ledger writer
or a change the qualification mirror has not yet written: the comparison is then premature
(``ledger reconcile`` shows those backlogs without judging them).
"""

from __future__ import annotations

import click
from subsidy_client import ReportingClient, SignedClient
from subsidy_client.v1 import reporting_pb2

from server.ctl.common import GATEWAY, Settings, emit, finding, json_option, pass_settings, run

# The heading of `subsidyctl --help` this group belongs under (server/ctl/__init__.py).
SECTION = GATEWAY
# Differences against the qualification mirror (CounterDifference.mirror_value), not the ledger.
MIRRORED_KINDS = frozenset({"qualification", "voucher_pack"})


@click.group()
def reporting() -> None:
    """The ledger's reconciliation and lag, asked of the gateway (an operator's credential)."""


@reporting.command("reconcile", short_help="Redis counters against the ledger and mirror (asked of the gateway).")
@json_option
@pass_settings
def reconcile(settings: Settings) -> None:
    """Compares every Redis budget, consumer-usage and serial counter with the sums over the
    PostgreSQL ledger (budgets in fen, usage in units) and every qualification quota and holder
    counter, voucher packs' included, with the qualification mirror, listing each difference;
    shows the sweepers' backlog and the stream consumers' (qualification mirror, risk events).
    A difference, sweeper backlog or dead letter is a finding (exit status 1); so are events
    the ledger writer or changes the qualification mirror has not yet written (the comparison
    is then premature)."""

    async def action(client: SignedClient) -> reporting_pb2.ReconcileResponse:
        assert isinstance(client, ReportingClient)
        return await client.reconcile()

    response = run(settings, action, ReportingClient)
    if settings.json_output:
        emit(settings, response)
    else:
        emit(settings, response, _difference_rows(response))
        mirror, risk_events, sweeper = response.qualification_mirror, response.risk_events, response.sweeper
        click.echo(f"ledger backlog: {response.ledger_backlog} events")
        click.echo(f"qualification mirror: {mirror.backlog} changes unwritten, {mirror.dead_letters} dead letters")
        click.echo(f"risk events: {risk_events.backlog} unwritten, {risk_events.dead_letters} dead letters")
        click.echo(
            f"sweepers: {sweeper.overdue_holds} holds and {sweeper.overdue_qualifications} qualifications overdue,"
            f" {sweeper.set_aside_holds} and {sweeper.set_aside_qualifications} set aside"
        )
    finding(_is_finding(response))


def _difference_rows(response: reporting_pb2.ReconcileResponse) -> list[dict[str, str]]:
    """A row per difference; "mirror" is the qualification mirror's count (qualification and
    voucher_pack differences), "ledger" the ledger's (budget, usage, serial)."""
    rows = []
    for item in response.differences:
        against_mirror = item.kind in MIRRORED_KINDS
        rows.append(
            {
                "kind": item.kind,
                "key": item.key,
                "ledger": "" if against_mirror else item.ledger_owner or str(item.ledger_value),
                "mirror": str(item.mirror_value) if against_mirror else "",
                "redis": item.redis_owner or str(item.redis_value),
            }
        )
    return rows or [{"kind": "-", "key": "no differences", "ledger": "", "mirror": "", "redis": ""}]


def _is_finding(response: reporting_pb2.ReconcileResponse) -> bool:
    sweeper = response.sweeper
    return (
        bool(response.differences)
        or response.ledger_backlog > 0
        or response.qualification_mirror.backlog > 0
        or response.qualification_mirror.dead_letters + response.risk_events.dead_letters > 0
        or sweeper.overdue_holds
        + sweeper.overdue_qualifications
        + sweeper.set_aside_holds
        + sweeper.set_aside_qualifications
        > 0
    )


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
