"""ComplaintService: the complaints and consultations desk (issue 14, section 3; README
"Complaints desk").

Consumers' tickets come through partner apps, the consumer identified as QualificationService
identifies them: the ID number becomes the consumer key here and is never stored or logged; a
contact phone is stored only sealed under the local data key, bound to the ticket and consumer
(server/domain/sealing.py), shown masked, and opened in clear only by RevealTicketContact, an
audited operator action. Merchants' tickets come with their terminals' credentials. Every check
(fields, the link's existence and owner, the daily limit) happens before anything is written.

Staff actions (assign, reply, move, reveal) are operator actions: audited in
``operator_actions`` in the same transaction as the change, idempotent on (operator,
request_id). A resolution may refund lines of the linked authorization through the same Redis
script as AuthorizationService.Refund (RedisStore.refund), so the money moves only on the
normal path and the ledger writer records it like any refund.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge
from subsidy_client.v1 import authorization_pb2, common_pb2, complaints_pb2, complaints_pb2_grpc, qualification_pb2

from server.domain import complaints, identity, sealing, validation
from server.domain.complaints import InvalidTransition, RateLimited, SlaPolicy
from server.domain.daily_report import parse_business_date
from server.domain.errors import InvalidField, NotFound
from server.domain.reference import IDENTIFIER
from server.rpc.auth import GOVERNMENT, OPERATOR, PARTNER, TERMINAL, Caller, caller, caller_in
from server.rpc.errors import ApiError, invalid_field
from server.services.common import payload_hash, raise_script_error
from server.services.operations import OperatorDeps, begin_action
from storage.postgres import complaints as tickets
from storage.postgres.complaints import NewTicket, TicketRow
from storage.redis import complaints as links
from storage.redis.contract import Failure
from storage.redis.store import LifecycleInput

pb = complaints_pb2
log = logging.getLogger("subsidy.complaints")

OPENED = Counter("subsidy_tickets_opened", "Complaint tickets opened, by submitter", ["submitter"])
OVERDUE_NOW = Gauge("subsidy_tickets_overdue", "Open complaint tickets past an SLA deadline, at the last count")
OPEN_NOW = Gauge("subsidy_tickets_open", "Complaint tickets not closed, at the last count")

CATEGORIES: Mapping[int, str] = {
    pb.TicketCategory.Value("TICKET_CATEGORY_" + name): name for name in complaints.CATEGORIES
}
STATES: Mapping[int, str] = {pb.TicketState.Value("TICKET_STATE_" + name): name for name in complaints.STATES}
CATEGORY_VALUES = {name: value for value, name in CATEGORIES.items()}
STATE_VALUES = {name: value for value, name in STATES.items()}
SUBMITTERS = {complaints.CONSUMER: pb.TICKET_SUBMITTER_CONSUMER, complaints.MERCHANT: pb.TICKET_SUBMITTER_MERCHANT}
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 100, 500
COUNT_DAYS_MAX = 366
# Refunds a ticket starts get request ids derived from the operator's (operator, request_id),
# so a retried resolution replays the same refund instead of refunding twice.
REFUND_NAMESPACE = uuid.UUID("6f1d3c2e-5b1a-4c8e-9d7f-0a2b4c6d8e10")


@dataclass(frozen=True)
class DailyLimits:
    per_consumer: int = 5
    per_merchant: int = 50


def _stamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def permission_denied(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, common_pb2.ERROR_REASON_PERMISSION_DENIED, message)


def invalid_state(error: InvalidTransition) -> ApiError:
    return ApiError(
        grpc.StatusCode.FAILED_PRECONDITION,
        common_pb2.ERROR_REASON_INVALID_STATE,
        str(error),
        {"state": "TICKET_STATE_" + error.state, "to_state": "TICKET_STATE_" + error.to_state},
    )


def closed_ticket(state: str, done: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.FAILED_PRECONDITION,
        common_pb2.ERROR_REASON_INVALID_STATE,
        f"a {state} ticket is closed and cannot be {done}; the submitter opens a new one",
        {"state": "TICKET_STATE_" + state},
    )


def rate_limited(error: RateLimited) -> ApiError:
    return ApiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        common_pb2.ERROR_REASON_RATE_LIMITED,
        str(error),
        {"limit": f"tickets_per_{error.scope}_per_day", "max": str(error.limit)},
    )


def ticket_not_found(ticket_id: str) -> NotFound:
    return NotFound("ticket", ticket_id)


def _link_message(kind: str, link_id: str) -> complaints_pb2.TicketLink:
    if kind == complaints.AUTHORIZATION:
        return pb.TicketLink(authorization_id=link_id)
    if kind == complaints.QUALIFICATION:
        return pb.TicketLink(redemption_code=link_id)
    return pb.TicketLink(merchant_id=link_id)


def _check_link(link: complaints_pb2.TicketLink) -> tuple[str, str]:
    """(kind, canonical id) of the one target a link names."""
    target = link.WhichOneof("target")
    try:
        if target == "authorization_id":
            return complaints.AUTHORIZATION, validation.canonical_authorization_id(link.authorization_id)
        if target == "redemption_code":
            return complaints.QUALIFICATION, validation.canonical_redemption_code(link.redemption_code)
    except InvalidField as error:
        raise invalid_field(f"link.{target}", error.reason) from None
    if target == "merchant_id":
        merchant_id = validation.canonical(link.merchant_id)
        if not IDENTIFIER.match(merchant_id):
            raise invalid_field("link.merchant_id", "must be 1-64 characters of [A-Za-z0-9_.-]")
        return complaints.MERCHANT_LINK, merchant_id
    raise invalid_field("link", "name one authorization_id, redemption_code or merchant_id")


def _category(value: int) -> str:
    if value not in CATEGORIES:
        raise invalid_field("category", "must be one of " + ", ".join(complaints.CATEGORIES))
    return CATEGORIES[value]


class ComplaintService(complaints_pb2_grpc.ComplaintServiceServicer):
    def __init__(
        self,
        deps: OperatorDeps,
        policy: SlaPolicy,
        limits: DailyLimits,
        programme_key: str,
        local_data_key: str = "",
        max_lines: int = 20,
    ) -> None:
        self._pool = deps.pool
        self._store = deps.store
        self._policy = policy
        self._limits = limits
        self._programme_key = programme_key.encode()
        self._sealer = sealing.Sealer(local_data_key.encode())
        self._local_data_key = local_data_key.encode()
        self._max_lines = max_lines

    def _phone_digest(self, phone: str) -> str:
        """What stands for the contact phone in the idempotency hash: an HMAC under the local
        data key, not the shared programme key. The rest of the request (text, link, request
        id) is stored with the ticket, so a digest under a key every provider holds would let a
        holder of a database copy test phone numbers against the stored hash. Without a local
        data key the phone is left out (a retry with another phone is then a replay)."""
        if not phone or not self._local_data_key:
            return ""
        return hmac.new(self._local_data_key, b"ticket contact phone\n" + phone.encode(), hashlib.sha256).hexdigest()

    # The submitters' side.

    def _consumer_key(self, consumer: qualification_pb2.ConsumerIdentity) -> str:
        if not self._programme_key:
            raise ApiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                common_pb2.ERROR_REASON_DEPENDENCY_UNAVAILABLE,
                "the gateway has no programme key configured (SUBSIDY_PROGRAMME_KEY)",
            )
        if not consumer.id_number:
            raise invalid_field("consumer.id_number", "is required")
        try:
            number = identity.validate_id_number(consumer.id_number)
        except identity.IdentityError as error:
            raise invalid_field("consumer.id_number", str(error)) from None
        return identity.consumer_key(self._programme_key, number)

    async def _claim_nonce(self, who: Caller) -> None:
        """Partner and terminal calls record their nonce themselves (server/rpc/auth.py)."""
        if not await self._store.claim_nonce(who.terminal_id, who.nonce):
            raise_script_error(Failure("NONCE_REUSED"))

    async def _consumer_link_merchant(self, kind: str, link_id: str, partner_id: str, consumer_key: str) -> str:
        """Checks a consumer's link; returns the merchant it concerns ("" when none)."""
        if kind == complaints.AUTHORIZATION:
            owner = await links.authorization_owner(self._store, link_id)
            if owner is None:
                raise NotFound("authorization", link_id)
            if owner.consumer_key != consumer_key:
                raise permission_denied("the authorization is another consumer's")
            return owner.merchant_id
        if kind == complaints.QUALIFICATION:
            owner = await links.qualification_owner(self._store, link_id)
            if owner is None:
                raise NotFound("qualification", link_id)
            if owner.partner_id != partner_id or owner.consumer_key != consumer_key:
                raise permission_denied("the qualification was claimed by another consumer or through another app")
            return owner.merchant_id
        if not await links.merchant_exists(self._store, link_id):
            raise NotFound("merchant", link_id)
        return link_id

    async def _merchant_link(self, kind: str, link_id: str, merchant_id: str) -> None:
        if kind == complaints.AUTHORIZATION:
            owner = await links.authorization_owner(self._store, link_id)
            if owner is None:
                raise NotFound("authorization", link_id)
            if owner.merchant_id != merchant_id:
                raise permission_denied("the authorization is another merchant's")
            return
        if kind == complaints.QUALIFICATION:
            owner = await links.qualification_owner(self._store, link_id)
            if owner is None:
                raise NotFound("qualification", link_id)
            if owner.merchant_id != merchant_id:
                raise permission_denied("the qualification was not redeemed at this merchant")
            return
        if not await links.merchant_exists(self._store, link_id):
            raise NotFound("merchant", link_id)
        if link_id != merchant_id:
            raise permission_denied("a merchant's ticket may name only its own merchant")

    def _new_ticket(
        self, who: Caller, submitter: str, request_id: str, digest: str, category: str, link: tuple[str, str], body: str
    ) -> NewTicket:
        now = datetime.now(UTC)
        first_due, resolution_due = self._policy.deadlines(now)
        return NewTicket(
            ticket_id=uuid.uuid4().hex,
            submitter=submitter,
            opened_by=who.terminal_id,
            request_id=request_id,
            payload_hash=digest,
            partner_id="",
            merchant_id="",
            consumer_key="",
            category=category,
            link_kind=link[0],
            link_id=link[1],
            body=body,
            contact_phone_sealed="",
            opened_at=now,
            first_reply_due_at=first_due,
            resolution_due_at=resolution_due,
        )

    async def _open(self, ticket: NewTicket, limit: int) -> tuple[TicketRow, bool]:
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            try:
                row, replayed = await tickets.open_ticket(
                    connection, ticket, limit, self._policy.day_start(ticket.opened_at)
                )
            except RateLimited as error:
                raise rate_limited(error) from None
        if not replayed:
            OPENED.labels(ticket.submitter).inc()
        return row, replayed

    async def OpenConsumerTicket(
        self, request: complaints_pb2.OpenConsumerTicketRequest, context: grpc.aio.ServicerContext
    ) -> complaints_pb2.OpenConsumerTicketResponse:
        partner = caller(PARTNER)
        request_id = validation.check_request_id(request.request_id)
        consumer_key = self._consumer_key(request.consumer)
        category = _category(request.category)
        link = _check_link(request.link)
        body = complaints.canonical_text(request.text, "text")
        phone = validation.canonical(request.contact_phone)
        if phone:
            try:
                identity.mask_phone(phone)
            except identity.IdentityError as error:
                raise invalid_field("contact_phone", str(error)) from None
        merchant_id = await self._consumer_link_merchant(*link, partner.terminal_id, consumer_key)
        await self._claim_nonce(partner)
        # The idempotency hash covers the request with the ID and phone numbers replaced by
        # keyed digests, as a claim's does: a stored hash must not be a way to test a number.
        scrubbed = complaints_pb2.OpenConsumerTicketRequest()
        scrubbed.CopyFrom(request)
        scrubbed.consumer.id_number = consumer_key
        scrubbed.consumer.phone_number = ""
        scrubbed.contact_phone = self._phone_digest(phone)
        ticket = self._new_ticket(
            partner,
            complaints.CONSUMER,
            request_id,
            payload_hash("OpenConsumerTicket", scrubbed),
            category,
            link,
            body,
        )
        sealed = self._seal_phone(phone, ticket.ticket_id, consumer_key)
        ticket = NewTicket(
            **{
                **ticket.__dict__,
                "partner_id": partner.terminal_id,
                "merchant_id": merchant_id,
                "consumer_key": consumer_key,
                "contact_phone_sealed": sealed,
            }
        )
        row, replayed = await self._open(ticket, self._limits.per_consumer)
        log.info("ticket opened", extra={"ticket": row.ticket_id, "partner": partner.terminal_id, "replayed": replayed})
        return pb.OpenConsumerTicketResponse(ticket=self._message(row, []), replayed=replayed)

    async def OpenMerchantTicket(
        self, request: complaints_pb2.OpenMerchantTicketRequest, context: grpc.aio.ServicerContext
    ) -> complaints_pb2.OpenMerchantTicketResponse:
        terminal = caller(TERMINAL)
        request_id = validation.check_request_id(request.request_id)
        category = _category(request.category)
        link = _check_link(request.link)
        body = complaints.canonical_text(request.text, "text")
        await self._merchant_link(*link, terminal.merchant_id)
        await self._claim_nonce(terminal)
        ticket = self._new_ticket(
            terminal,
            complaints.MERCHANT,
            request_id,
            payload_hash("OpenMerchantTicket", request),
            category,
            link,
            body,
        )
        ticket = NewTicket(**{**ticket.__dict__, "merchant_id": terminal.merchant_id})
        row, replayed = await self._open(ticket, self._limits.per_merchant)
        log.info(
            "ticket opened", extra={"ticket": row.ticket_id, "terminal": terminal.terminal_id, "replayed": replayed}
        )
        return pb.OpenMerchantTicketResponse(ticket=self._message(row, []), replayed=replayed)

    async def GetTicket(
        self, request: complaints_pb2.GetTicketRequest, context: grpc.aio.ServicerContext
    ) -> complaints_pb2.GetTicketResponse:
        who = caller_in(PARTNER, TERMINAL, OPERATOR)
        ticket_id = self._ticket_id(request.ticket_id)
        consumer_key = self._consumer_key(request.consumer) if who.role == PARTNER else ""
        if who.role != OPERATOR:
            await self._claim_nonce(who)
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            row = await tickets.get_ticket(connection, ticket_id)
            # Another submitter's ticket reads as absent, as another partner's qualification does.
            if row is None or not self._submitted_by(row, who, consumer_key):
                raise ticket_not_found(ticket_id)
            replies = await tickets.replies(connection, ticket_id)
        return pb.GetTicketResponse(ticket=self._message(row, replies))

    @staticmethod
    def _submitted_by(row: TicketRow, who: Caller, consumer_key: str) -> bool:
        if who.role == OPERATOR:
            return True
        if who.role == PARTNER:
            return row.submitter == complaints.CONSUMER and (row.partner_id, row.consumer_key) == (
                who.terminal_id,
                consumer_key,
            )
        return row.submitter == complaints.MERCHANT and row.merchant_id == who.merchant_id

    # The staff's side.

    async def ListTickets(
        self, request: complaints_pb2.ListTicketsRequest, context: grpc.aio.ServicerContext
    ) -> complaints_pb2.ListTicketsResponse:
        caller(OPERATOR)
        state = ""
        if request.state:
            if request.state not in STATES:
                raise invalid_field("state", "must be one of " + ", ".join(complaints.STATES))
            state = STATES[request.state]
        category = _category(request.category) if request.category else ""
        assignee = validation.canonical(request.assignee)
        if assignee and not IDENTIFIER.match(assignee):
            raise invalid_field("assignee", "must be 1-64 characters of [A-Za-z0-9_.-]")
        if not 0 <= request.limit <= LIST_LIMIT_MAX:
            raise invalid_field("limit", f"must be between 0 and {LIST_LIMIT_MAX}")
        now = datetime.now(UTC)
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            rows = await tickets.list_tickets(
                connection,
                state=state,
                category=category,
                assignee=assignee,
                overdue_at=now if request.overdue_only else None,
                limit=request.limit or LIST_LIMIT_DEFAULT,
            )
        return pb.ListTicketsResponse(tickets=[self._message(row, [], now) for row in rows])

    async def AssignTicket(
        self, request: complaints_pb2.AssignTicketRequest, context: grpc.aio.ServicerContext
    ) -> complaints_pb2.AssignTicketResponse:
        caller(OPERATOR)
        ticket_id = self._ticket_id(request.ticket_id)
        action = begin_action("AssignTicket", request, "ticket", ticket_id)
        assignee = validation.canonical(request.assignee)
        if not IDENTIFIER.match(assignee):
            raise invalid_field("assignee", "must be 1-64 characters of [A-Za-z0-9_.-]")
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            async with connection.transaction():
                row = await self._locked(connection, ticket_id)
                replayed = not await tickets.audit(connection, action, {"assignee": assignee})
                if not replayed:
                    if not await tickets.is_staff(connection, assignee):
                        raise NotFound("operator", assignee)
                    if row.state in complaints.CLOSED:
                        raise closed_ticket(row.state, "assigned")
                    await tickets.assign(connection, ticket_id, assignee)
            return pb.AssignTicketResponse(ticket=await self._current(connection, ticket_id), replayed=replayed)

    async def ReplyTicket(
        self, request: complaints_pb2.ReplyTicketRequest, context: grpc.aio.ServicerContext
    ) -> complaints_pb2.ReplyTicketResponse:
        caller(OPERATOR)
        ticket_id = self._ticket_id(request.ticket_id)
        action = begin_action("ReplyTicket", request, "ticket", ticket_id)
        body = complaints.canonical_text(request.text, "text")
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            async with connection.transaction():
                row = await self._locked(connection, ticket_id)
                replayed = not await tickets.audit(connection, action, {})
                if not replayed:
                    if row.state in complaints.CLOSED:
                        raise closed_ticket(row.state, "replied to")
                    await tickets.add_reply(
                        connection, row, author=action.operator_id, body=body, to_state=row.state, at=datetime.now(UTC)
                    )
            return pb.ReplyTicketResponse(ticket=await self._current(connection, ticket_id), replayed=replayed)

    async def TransitionTicket(
        self, request: complaints_pb2.TransitionTicketRequest, context: grpc.aio.ServicerContext
    ) -> complaints_pb2.TransitionTicketResponse:
        caller(OPERATOR)
        ticket_id = self._ticket_id(request.ticket_id)
        action = begin_action("TransitionTicket", request, "ticket", ticket_id)
        if request.to_state not in STATES or STATES[request.to_state] == complaints.OPEN:
            raise invalid_field("to_state", "must be IN_PROGRESS, RESOLVED or REJECTED")
        to_state = STATES[request.to_state]
        body = complaints.canonical_text(request.text, "text")
        line_ids = validation.canonical_line_ids(request.refund_line_ids, self._max_lines, "refund_line_ids")
        if line_ids and to_state != complaints.RESOLVED:
            raise invalid_field("refund_line_ids", "a refund goes only with RESOLVED")
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            async with connection.transaction():
                row = await self._locked(connection, ticket_id)
                details = {"to_state": to_state, "refund_line_ids": line_ids}
                replayed = not await tickets.audit(connection, action, details)
                if not replayed:
                    try:
                        complaints.check_transition(row.state, to_state)
                    except InvalidTransition as error:
                        raise invalid_state(error) from None
                    refund_request_id, refunded_fen = "", 0
                    if line_ids:
                        # Under the ticket's row lock and before the reply is written: a failure
                        # after the refund rolls the reply back, and the retry (same request id)
                        # replays the same refund in Redis rather than making a second one.
                        refund_request_id, refunded_fen = await self._refund(row, action.operator_id, request, line_ids)
                    await tickets.add_reply(
                        connection,
                        row,
                        author=action.operator_id,
                        body=body,
                        to_state=to_state,
                        at=datetime.now(UTC),
                        refund_request_id=refund_request_id,
                        refunded_subsidy_fen=refunded_fen,
                    )
            return pb.TransitionTicketResponse(ticket=await self._current(connection, ticket_id), replayed=replayed)

    async def _refund(
        self, row: TicketRow, operator_id: str, request: complaints_pb2.TransitionTicketRequest, line_ids: list[str]
    ) -> tuple[str, int]:
        """Refunds lines of the ticket's authorization through RedisStore.refund (the script
        AuthorizationService.Refund calls), as the authorization's own terminal would."""
        if row.link_kind != complaints.AUTHORIZATION:
            raise invalid_field("refund_line_ids", "the ticket is not linked to an authorization")
        owner = await links.authorization_owner(self._store, row.link_id)
        if owner is None:
            raise NotFound("authorization", row.link_id)
        refund_request_id = str(uuid.uuid5(REFUND_NAMESPACE, f"{operator_id}/{request.request_id}"))
        refund = authorization_pb2.RefundRequest(
            request_id=refund_request_id, authorization_id=row.link_id, line_ids=line_ids
        )
        reply = await self._store.refund(
            LifecycleInput(
                payload_hash=payload_hash("Refund", refund),
                request_id=refund_request_id,
                terminal_id=owner.terminal_id,
                merchant_id=owner.merchant_id,
                nonce=secrets.token_hex(16),
                authorization_id=row.link_id,
            ),
            line_ids,
        )
        if isinstance(reply, Failure):
            if reply.error == "LINE_NOT_FOUND":
                raise invalid_field("refund_line_ids", f"line {reply.line_id} is not part of the linked authorization")
            raise_script_error(reply)
        log.info(
            "ticket refund",
            extra={"ticket": row.ticket_id, "refund_request_id": refund_request_id, "replayed": reply.replayed},
        )
        return refund_request_id, reply.body.refunded_fen

    async def RevealTicketContact(
        self, request: complaints_pb2.RevealTicketContactRequest, context: grpc.aio.ServicerContext
    ) -> complaints_pb2.RevealTicketContactResponse:
        caller(OPERATOR)
        ticket_id = self._ticket_id(request.ticket_id)
        action = begin_action("RevealTicketContact", request, "ticket", ticket_id)
        purpose = complaints.canonical_text(request.purpose, "purpose", complaints.PURPOSE_CHARS_MAX)
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            async with connection.transaction():
                row = await tickets.get_ticket(connection, ticket_id)
                if row is None:
                    raise ticket_not_found(ticket_id)
                # Audited even when there is no number to show: the attempt is what is recorded.
                await tickets.audit(connection, action, {"purpose": purpose})
        return pb.RevealTicketContactResponse(contact_phone=self._open_phone(row))

    async def GetTicketCounts(
        self, request: complaints_pb2.GetTicketCountsRequest, context: grpc.aio.ServicerContext
    ) -> complaints_pb2.GetTicketCountsResponse:
        caller_in(OPERATOR, GOVERNMENT)
        now = datetime.now(UTC)
        last = parse_business_date(request.to_date, "to_date") if request.to_date else self._policy.business_date(now)
        first = parse_business_date(request.from_date, "from_date") if request.from_date else last - timedelta(days=29)
        if first > last:
            raise invalid_field("from_date", "must not be after to_date")
        if (last - first).days >= COUNT_DAYS_MAX:
            raise invalid_field("from_date", f"at most {COUNT_DAYS_MAX} days at once")
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            days = await tickets.day_counts(connection, first, last, self._policy.timezone, now)
            open_now, overdue_now = await tickets.open_counts(connection, now)
        OPEN_NOW.set(open_now)
        OVERDUE_NOW.set(overdue_now)
        return pb.GetTicketCountsResponse(
            days=[
                pb.TicketDayCount(
                    business_date=day.business_date.isoformat(),
                    opened=day.opened,
                    resolved=day.resolved,
                    rejected=day.rejected,
                    overdue=day.overdue,
                )
                for day in days
            ],
            open_now=open_now,
            overdue_now=overdue_now,
        )

    # Shared.

    @staticmethod
    def _ticket_id(value: str) -> str:
        form = validation.canonical(value).lower()
        if not validation.AUTHORIZATION_ID.fullmatch(form):
            raise invalid_field("ticket_id", "must be 32 hexadecimal characters")
        return form

    @staticmethod
    async def _locked(connection: tickets.Connection, ticket_id: str) -> TicketRow:
        row = await tickets.get_ticket(connection, ticket_id, lock=True)
        if row is None:
            raise ticket_not_found(ticket_id)
        return row

    async def _current(self, connection: tickets.Connection, ticket_id: str) -> complaints_pb2.Ticket:
        row = await tickets.get_ticket(connection, ticket_id)
        assert row is not None  # it was locked in this request's transaction, and tickets are never deleted
        return self._message(row, await tickets.replies(connection, ticket_id))

    def _seal_phone(self, phone: str, ticket_id: str, consumer_key: str) -> str:
        sealed = self._sealer.seal(phone, field="contact_phone", redemption_code=ticket_id, consumer_key=consumer_key)
        assert sealing.at_rest_form(sealed)  # never a number in clear at rest
        return sealed

    def _open_phone(self, row: TicketRow) -> str:
        return self._sealer.open(
            row.contact_phone_sealed,
            field="contact_phone",
            redemption_code=row.ticket_id,
            consumer_key=row.consumer_key,
        )

    def _message(
        self, row: TicketRow, replies: Sequence[tickets.ReplyRow], now: datetime | None = None
    ) -> complaints_pb2.Ticket:
        status = complaints.sla_status(
            row.first_reply_due_at,
            row.resolution_due_at,
            row.first_replied_at,
            row.closed_at,
            now or datetime.now(UTC),
        )
        phone = self._open_phone(row)
        return pb.Ticket(
            ticket_id=row.ticket_id,
            submitter=SUBMITTERS[row.submitter],
            partner_id=row.partner_id,
            merchant_id=row.merchant_id,
            consumer_key=row.consumer_key,
            category=CATEGORY_VALUES[row.category],  # type: ignore[arg-type]
            state=STATE_VALUES[row.state],  # type: ignore[arg-type]
            link=_link_message(row.link_kind, row.link_id),
            text=row.body,
            masked_contact_phone=identity.mask_phone(phone) if phone else "",
            assignee=row.assignee,
            opened_at=_stamp(row.opened_at),
            first_replied_at=_stamp(row.first_replied_at),
            closed_at=_stamp(row.closed_at),
            first_reply_due_at=_stamp(row.first_reply_due_at),
            resolution_due_at=_stamp(row.resolution_due_at),
            first_reply_overdue=status.first_reply_overdue,
            resolution_overdue=status.resolution_overdue,
            replies=[
                pb.TicketReply(
                    author=reply.author,
                    text=reply.body,
                    created_at=_stamp(reply.created_at),
                    from_state=STATE_VALUES[reply.from_state],  # type: ignore[arg-type]
                    to_state=STATE_VALUES[reply.to_state],  # type: ignore[arg-type]
                    refund_request_id=reply.refund_request_id,
                    refunded_subsidy_fen=reply.refunded_subsidy_fen,
                )
                for reply in replies
            ],
        )
