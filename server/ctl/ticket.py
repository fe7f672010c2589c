"""subsidyctl ticket: the complaints desk's queue over the gateway (ComplaintService).

    subsidyctl ticket list [--state S] [--category C] [--overdue] [--assignee ID] [--limit N]
    subsidyctl ticket show TICKET                      the ticket and every reply
    subsidyctl ticket assign TICKET OPERATOR
    subsidyctl ticket reply TICKET TEXT                a reply, the state unchanged
    subsidyctl ticket start TICKET TEXT                OPEN -> IN_PROGRESS, with a reply
    subsidyctl ticket resolve TICKET TEXT [--refund LINE ...]
    subsidyctl ticket reject TICKET TEXT
    subsidyctl ticket reveal TICKET --purpose TEXT     the contact number in clear (audited)
    subsidyctl ticket stats [--from DATE] [--to DATE]  opened, resolved, rejected, overdue per day

Every command but ``stats`` needs an operator's credential; ``stats`` takes a government
user's too. ``resolve --refund LINE`` refunds those lines of the linked authorization through
the same script as AuthorizationService.Refund (the ledger records it like any refund). Each
mutating command sends a fresh request id, or ``--request-id`` to retry one exactly (the
gateway then answers the first result and acts once). Times are shown in Asia/Shanghai.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import click
from google.protobuf.message import Message
from subsidy_client import SignedClient
from subsidy_client.v1 import complaints_pb2 as pb

from server.ctl.common import GATEWAY, Settings, emit, emit_document, json_option, new_request_id, pass_settings, run

SERVICE = "/subsidy.v1.ComplaintService/"
SHANGHAI = ZoneInfo("Asia/Shanghai")
STATE_CHOICES = ("open", "in_progress", "resolved", "rejected")
CATEGORY_CHOICES = ("not_received", "wrongly_declined", "refund", "merchant_conduct", "other")
request_id_option = click.option("--request-id", help="retry an earlier call exactly (default: a fresh UUID)")


def _call(settings: Settings, method: str, request: Message, response_type: type[Any]) -> Any:
    async def action(client: SignedClient) -> Any:
        return await client._call(SERVICE + method, request, response_type)

    return run(settings, action)


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def _when(stamp: Any, present: bool = True) -> str:
    if not present:
        return "-"
    moment: datetime = stamp.ToDatetime().replace(tzinfo=ZoneInfo("UTC"))
    return moment.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M")


def _link(link: pb.TicketLink) -> str:
    target = link.WhichOneof("target")
    return f"{target.removesuffix('_id').removesuffix('_code')}:{getattr(link, target)}" if target else "-"


def _overdue(ticket: pb.Ticket) -> str:
    flags = [
        name for name, on in (("reply", ticket.first_reply_overdue), ("resolution", ticket.resolution_overdue)) if on
    ]
    return ", ".join(flags) or "-"


def ticket_row(ticket: pb.Ticket) -> dict[str, Any]:
    """One line of the queue: contact masked, deadlines and what is overdue."""
    return {
        "ticket": ticket.ticket_id,
        "opened": _when(ticket.opened_at),
        "state": _name(pb.TicketState, ticket.state, "TICKET_STATE_"),
        "category": _name(pb.TicketCategory, ticket.category, "TICKET_CATEGORY_"),
        "from": _name(pb.TicketSubmitter, ticket.submitter, "TICKET_SUBMITTER_").lower(),
        "about": _link(ticket.link),
        "assignee": ticket.assignee or "-",
        "contact": ticket.masked_contact_phone or "-",
        "reply_due": _when(ticket.first_reply_due_at),
        "resolve_due": _when(ticket.resolution_due_at),
        "overdue": _overdue(ticket),
    }


def ticket_document(ticket: pb.Ticket) -> dict[str, Any]:
    document = ticket_row(ticket)
    document.update(
        {
            "partner": ticket.partner_id or "-",
            "merchant": ticket.merchant_id or "-",
            "first_reply": _when(ticket.first_replied_at, ticket.HasField("first_replied_at")),
            "closed": _when(ticket.closed_at, ticket.HasField("closed_at")),
            "text": ticket.text,
            "replies": [
                {
                    "at": _when(reply.created_at),
                    "by": reply.author,
                    "move": (
                        _name(pb.TicketState, reply.from_state, "TICKET_STATE_")
                        + " -> "
                        + _name(pb.TicketState, reply.to_state, "TICKET_STATE_")
                    ),
                    "refunded_fen": reply.refunded_subsidy_fen,
                    "text": reply.text,
                }
                for reply in ticket.replies
            ],
        }
    )
    return document


def _show(settings: Settings, response: Any) -> None:
    """A ticket's answer: the message as JSON with --json, else the ticket and its replies."""
    if settings.json_output:
        emit(settings, response)
        return
    emit_document(ticket_document(response.ticket), json_output=False)


@click.group()
def ticket() -> None:
    """The complaints desk: work the queue of consumers' and merchants' tickets."""


@ticket.command("list")
@click.option("--state", type=click.Choice(STATE_CHOICES))
@click.option("--category", type=click.Choice(CATEGORY_CHOICES))
@click.option("--overdue", is_flag=True, help="only tickets past a deadline")
@click.option("--assignee", default="", help="only tickets assigned to this operator")
@click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True)
@json_option
@pass_settings
def list_tickets(
    settings: Settings, state: str | None, category: str | None, overdue: bool, assignee: str, limit: int
) -> None:
    """The queue, oldest first (contact numbers masked)."""
    request = pb.ListTicketsRequest(
        state=pb.TicketState.Value("TICKET_STATE_" + state.upper()) if state else pb.TICKET_STATE_UNSPECIFIED,
        category=(
            pb.TicketCategory.Value("TICKET_CATEGORY_" + category.upper())
            if category
            else pb.TICKET_CATEGORY_UNSPECIFIED
        ),
        overdue_only=overdue,
        assignee=assignee,
        limit=limit,
    )
    response = _call(settings, "ListTickets", request, pb.ListTicketsResponse)
    emit(settings, response, [ticket_row(item) for item in response.tickets])


@ticket.command("show")
@click.argument("ticket_id")
@json_option
@pass_settings
def show(settings: Settings, ticket_id: str) -> None:
    """A ticket with every reply."""
    _show(settings, _call(settings, "GetTicket", pb.GetTicketRequest(ticket_id=ticket_id), pb.GetTicketResponse))


@ticket.command("assign")
@click.argument("ticket_id")
@click.argument("assignee")
@request_id_option
@json_option
@pass_settings
def assign(settings: Settings, ticket_id: str, assignee: str, request_id: str | None) -> None:
    """Assign a ticket to an operator."""
    request = pb.AssignTicketRequest(request_id=request_id or new_request_id(), ticket_id=ticket_id, assignee=assignee)
    _show(settings, _call(settings, "AssignTicket", request, pb.AssignTicketResponse))


@ticket.command("reply")
@click.argument("ticket_id")
@click.argument("text")
@request_id_option
@json_option
@pass_settings
def reply(settings: Settings, ticket_id: str, text: str, request_id: str | None) -> None:
    """Reply without changing the state (the first reply meets the first-reply SLA)."""
    request = pb.ReplyTicketRequest(request_id=request_id or new_request_id(), ticket_id=ticket_id, text=text)
    _show(settings, _call(settings, "ReplyTicket", request, pb.ReplyTicketResponse))


def _transition(to_state: int, help_text: str, refund: bool = False) -> Callable[..., None]:
    def command(settings: Settings, ticket_id: str, text: str, request_id: str | None, **extra: Any) -> None:
        request = pb.TransitionTicketRequest(
            request_id=request_id or new_request_id(),
            ticket_id=ticket_id,
            to_state=to_state,  # type: ignore[arg-type]
            text=text,
            refund_line_ids=list(extra.get("refund", ())),
        )
        _show(settings, _call(settings, "TransitionTicket", request, pb.TransitionTicketResponse))

    command.__doc__ = help_text
    decorated = pass_settings(command)
    decorated = json_option(decorated)
    decorated = request_id_option(decorated)
    if refund:
        decorated = click.option(
            "--refund",
            multiple=True,
            metavar="LINE",
            help="refund this line of the linked authorization (repeat for several) through the normal refund path",
        )(decorated)
    decorated = click.argument("text")(decorated)
    return click.argument("ticket_id")(decorated)


ticket.command("start")(
    _transition(pb.TICKET_STATE_IN_PROGRESS, "Take a ticket up (OPEN -> IN_PROGRESS) with a reply.")
)
ticket.command("resolve")(
    _transition(pb.TICKET_STATE_RESOLVED, "Resolve a ticket with a reply, optionally refunding lines.", refund=True)
)
ticket.command("reject")(_transition(pb.TICKET_STATE_REJECTED, "Reject a ticket with a reply saying why."))


@ticket.command("reveal")
@click.argument("ticket_id")
@click.option("--purpose", required=True, help="why the number is needed (kept in the audit trail)")
@request_id_option
@json_option
@pass_settings
def reveal(settings: Settings, ticket_id: str, purpose: str, request_id: str | None) -> None:
    """The consumer's contact number in clear (an audited operator action)."""
    request = pb.RevealTicketContactRequest(
        request_id=request_id or new_request_id(), ticket_id=ticket_id, purpose=purpose
    )
    response = _call(settings, "RevealTicketContact", request, pb.RevealTicketContactResponse)
    emit(settings, response, [{"ticket": ticket_id, "contact_phone": response.contact_phone or "(none given)"}])


@ticket.command("stats")
@click.option("--from", "from_date", default="", help="first business date YYYY-MM-DD (default: 29 days before --to)")
@click.option("--to", "to_date", default="", help="last business date (default: today in Asia/Shanghai)")
@json_option
@pass_settings
def stats(settings: Settings, from_date: str, to_date: str) -> None:
    """Tickets opened, resolved, rejected and overdue per business day, and open / overdue now."""
    request = pb.GetTicketCountsRequest(from_date=from_date, to_date=to_date)
    response = _call(settings, "GetTicketCounts", request, pb.GetTicketCountsResponse)
    if settings.json_output:
        emit(settings, response)
        return
    emit_document(
        {
            "open_now": response.open_now,
            "overdue_now": response.overdue_now,
            "days": [
                {
                    "date": day.business_date,
                    "opened": day.opened,
                    "resolved": day.resolved,
                    "rejected": day.rejected,
                    "overdue": day.overdue,
                }
                for day in response.days
            ],
        },
        json_output=False,
    )


# The heading of `subsidyctl --help` this group belongs under (server/ctl/__init__.py).
SECTION = GATEWAY
COMMANDS = (ticket,)
