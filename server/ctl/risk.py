"""subsidyctl risk: offline risk detection over the PostgreSQL ledger and the risk team's cases.

    subsidyctl risk detect --from DATE --to DATE [--detector NAME ...]   find, record new cases
    subsidyctl risk cases [--state S] [--detector NAME] [--assignee ID] [--limit N]
    subsidyctl risk show CASE
    subsidyctl risk assign CASE OPERATOR
    subsidyctl risk review CASE [--note TEXT]          NEW -> REVIEWING
    subsidyctl risk confirm CASE --note TEXT           REVIEWING -> CONFIRMED
    subsidyctl risk dismiss CASE --note TEXT           NEW or REVIEWING -> DISMISSED
    subsidyctl risk clawback CASE AUTHORIZATION --note TEXT [--line ID ...]   over the gateway

They talk to PostgreSQL directly (SUBSIDY_PG_DSN, or what make run recorded), like ``ledger``.
DATEs are business days in SUBSIDY_REPORT_TIMEZONE, both ends included. Case work is recorded
in the operator audit trail under the operator named by --operator or SUBSIDYCTL_OPERATOR
(required for those commands), with a fresh request id or ``--request-id`` to retry one
exactly. Exit status: 0 done (``detect``: whatever it found, the cases are the result), 1 the
case's state does not allow the move (FAILED_PRECONDITION INVALID_STATE) or it does not exist
(NOT_FOUND), 2 bad usage, 3 PostgreSQL unavailable.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any, TypeVar

import asyncpg
import click
from subsidy_client import SignedClient
from subsidy_client.v1 import risk_pb2

from server import logs
from server.commands import risk as jobs
from server.ctl.common import (
    LOCAL,
    ConfigurationError,
    Settings,
    check_services,
    emit_document,
    format_table,
    guarded,
    json_option,
    local_config,
    new_request_id,
    options,
    pass_settings,
    run,
    steps,
)
from server.domain.daily_report import BusinessCalendar
from server.domain.errors import IdempotencyConflict, NotFound
from server.domain.risk_detection import (
    CASE_STATES,
    CONFIRMED,
    DETECTORS,
    DISMISSED,
    REVIEWING,
    InvalidCaseTransition,
)
from storage.postgres import risk_cases

T = TypeVar("T")
request_id_option = click.option("--request-id", help="retry an earlier call exactly (default: a fresh UUID)")


@click.group()
def risk() -> None:
    """Offline risk detection on the ledger; the risk team's cases."""


def _with_connection(body: Callable[[asyncpg.Connection, BusinessCalendar], Awaitable[T]]) -> T:
    config, recorded = local_config()
    logs.configure(config.log_level)
    check_services(config, recorded)
    calendar = BusinessCalendar(config.report_timezone, config.report_cutoff)

    async def go() -> T:
        connection = await asyncpg.connect(config.pg_dsn, timeout=10)
        try:
            return await body(connection, calendar)
        finally:
            await connection.close()

    try:
        return guarded(lambda: asyncio.run(go()))
    except InvalidCaseTransition as error:
        raise click.ClickException(f"FAILED_PRECONDITION (INVALID_STATE): {error}") from None
    except NotFound as error:
        raise click.ClickException(f"NOT_FOUND: {error}") from None
    except IdempotencyConflict as error:
        raise click.ClickException(f"ALREADY_EXISTS (IDEMPOTENCY_CONFLICT): {error}") from None


def _operator() -> str:
    operator = options().operator or os.environ.get("SUBSIDYCTL_OPERATOR", "")
    if not operator:
        raise ConfigurationError("name the operator doing this: --operator ID or SUBSIDYCTL_OPERATOR")
    return operator


@risk.command(short_help="Run the detectors over business days; record new cases.")
@click.option("--from", "first", required=True, type=click.DateTime(["%Y-%m-%d"]), help="first business day")
@click.option("--to", "last", required=True, type=click.DateTime(["%Y-%m-%d"]), help="last business day (included)")
@click.option("--detector", "detectors", multiple=True, type=click.Choice(DETECTORS), help="only these (repeatable)")
@json_option
def detect(first: Any, last: Any, detectors: tuple[str, ...]) -> None:
    """Run the detectors over each business day from --from to --to and record a case per new
    finding (a finding already recorded for that day is not recorded again)."""
    first_day: date = first.date()
    last_day: date = last.date()
    if last_day < first_day:
        raise ConfigurationError("--to is before --from")
    if (last_day - first_day).days + 1 > jobs.DAYS_MAX:
        raise ConfigurationError(f"at most {jobs.DAYS_MAX} days at a time")
    detected_by = options().operator or os.environ.get("SUBSIDYCTL_OPERATOR", "") or "subsidyctl"
    chosen = detectors or DETECTORS
    with steps() as progress:
        task = progress.add("detecting", total=((last_day - first_day).days + 1) * len(chosen))

        def advance(_name: str, _found: int, _seconds: float) -> None:
            progress.advance(task)

        result = _with_connection(
            lambda connection, calendar: jobs.detect_days(
                connection, calendar, first_day, last_day, detected_by, chosen, advance
            )
        )
    emit_document(result)


@risk.command(short_help="List cases, newest first.")
@click.option("--state", type=click.Choice([state.lower() for state in CASE_STATES]), help="only this state")
@click.option("--detector", type=click.Choice(DETECTORS), help="only this detector")
@click.option("--assignee", help="only this assignee's")
@click.option("--limit", type=click.IntRange(1, risk_cases.LIST_LIMIT_MAX), default=100, show_default=True)
@json_option
def cases(state: str | None, detector: str | None, assignee: str | None, limit: int) -> None:
    """The cases, newest first, one line each."""
    found = _with_connection(
        lambda connection, _calendar: risk_cases.list_cases(
            connection, state.upper() if state else None, detector, assignee, limit
        )
    )
    rows = [case.summary() for case in found]
    if options().json_output:
        emit_document(rows)
    else:
        click.echo(format_table(rows) if rows else "no cases")


@risk.command(short_help="A case with its evidence.")
@click.argument("case_id", type=click.IntRange(1))
@json_option
def show(case_id: int) -> None:
    """The case, its state, assignee, note, the detector's evidence and its claw-backs."""

    async def read(connection: asyncpg.Connection, _calendar: BusinessCalendar) -> dict[str, Any]:
        case = await risk_cases.get(connection, case_id)
        clawed = await risk_cases.clawbacks(connection, case_id)
        return {**case.document(), "clawbacks": [item.document() for item in clawed]}

    emit_document(_with_connection(read))


@risk.command(short_help="Give a case to an operator.")
@click.argument("case_id", type=click.IntRange(1))
@click.argument("assignee")
@request_id_option
@json_option
def assign(case_id: int, assignee: str, request_id: str | None) -> None:
    """Give an open case to ASSIGNEE (an operator id)."""
    operator = _operator()
    case = _with_connection(
        lambda connection, _calendar: risk_cases.assign(
            connection, case_id, assignee, operator, request_id or new_request_id()
        )
    )
    emit_document(case.document())


def _move(case_id: int, to_state: str, note: str, request_id: str | None) -> None:
    operator = _operator()
    case = _with_connection(
        lambda connection, _calendar: risk_cases.move(
            connection, case_id, to_state, note, operator, request_id or new_request_id()
        )
    )
    emit_document(case.document())


note_option = click.option("--note", default="", help="why (kept on the case and in the audit trail)")


@risk.command(short_help="Start reviewing a case (NEW -> REVIEWING).")
@click.argument("case_id", type=click.IntRange(1))
@note_option
@request_id_option
@json_option
def review(case_id: int, note: str, request_id: str | None) -> None:
    """NEW -> REVIEWING; the operator takes the case when nobody has it."""
    _move(case_id, REVIEWING, note, request_id)


@risk.command(short_help="Confirm a case (REVIEWING -> CONFIRMED).")
@click.argument("case_id", type=click.IntRange(1))
@click.option("--note", required=True, help="the finding, for the record")
@request_id_option
@json_option
def confirm(case_id: int, note: str, request_id: str | None) -> None:
    """REVIEWING -> CONFIRMED. A sale's subsidy is then clawed back with ``risk clawback``."""
    _move(case_id, CONFIRMED, note, request_id)


@risk.command(short_help="Dismiss a case (NEW or REVIEWING -> DISMISSED).")
@click.argument("case_id", type=click.IntRange(1))
@click.option("--note", required=True, help="why it is not fraud")
@request_id_option
@json_option
def dismiss(case_id: int, note: str, request_id: str | None) -> None:
    """NEW or REVIEWING -> DISMISSED."""
    _move(case_id, DISMISSED, note, request_id)


@risk.command(short_help="Claw back a sale's subsidy on a CONFIRMED case (over the gateway).")
@click.argument("case_id", type=click.IntRange(1))
@click.argument("authorization_id")
@click.option("--line", "line_ids", multiple=True, help="only this line (repeatable; default: every line left)")
@click.option("--note", required=True, help="why, for the audit trail")
@request_id_option
@json_option
@pass_settings
def clawback(
    settings: Settings,
    case_id: int,
    authorization_id: str,
    line_ids: tuple[str, ...],
    note: str,
    request_id: str | None,
) -> None:
    """Claw back the subsidy of AUTHORIZATION (a captured sale of the case's subject) through
    RiskCaseService.ClawBack: it moves money, so it goes through the gateway's money path (one
    Redis script, one CLAWED_BACK ledger event), never straight into PostgreSQL. Needs the
    operator's credential; exit 1 with the gateway's reason when refused."""
    request = risk_pb2.ClawBackRequest(
        request_id=request_id or new_request_id(),
        case_id=case_id,
        authorization_id=authorization_id,
        line_ids=line_ids,
        note=note,
    )

    async def action(client: SignedClient) -> risk_pb2.ClawBackResponse:
        return await client._call(RISK_SERVICE + "ClawBack", request, risk_pb2.ClawBackResponse)

    response = run(settings, action)
    emit_document(
        {
            "case": case_id,
            "authorization": response.authorization_id,
            "merchant": response.merchant_id,
            "lines": list(response.line_ids),
            "clawed_back_yuan": f"{response.clawed_back_fen / 100:.2f}",
            "clawed_back_fen": response.clawed_back_fen,
            "all_clawed_back_lines": list(response.clawed_back_line_ids),
            "replayed": response.replayed,
        }
    )


RISK_SERVICE = "/subsidy.v1.RiskCaseService/"
SECTION = LOCAL
COMMANDS = (risk,)

# The block lists' commands (block, unblock, blocks) join this group from their own module.
from server.ctl import risk_blocks as _risk_blocks  # noqa: E402,F401
