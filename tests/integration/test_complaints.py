"""The complaints desk (issue 14, section 3) over a real gateway, PostgreSQL and Redis: a
ticket's full lifecycle with a refund through the normal money path (the ledger writer records
it, and the ledger verifies and reconciles), idempotent retries, every bad input writing
nothing, the daily limit, the roles pairwise, the SLA flags and counts, and the contact number
sealed at rest, masked for staff and revealed only by an audited action."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import yaml
from click.testing import CliRunner, Result
from google.protobuf.message import Message
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy, SignedClient
from subsidy_client.errors import (
    FailedPrecondition,
    IdempotencyConflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SubsidyError,
)
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import complaints_pb2 as pb
from subsidy_client.v1 import qualification_pb2 as qpb

from server.ctl import main as subsidyctl
from server.processes.app import Application
from storage.devenv import Services
from storage.postgres.audit import reconcile, verify
from storage.postgres.writer import LedgerWriter, WriterConfig
from tests.conftest import (
    REFERENCE_FILE,
    Environment,
    consumer_key_of,
    id_number,
    isolated_environment,
    load_document,
    running_gateway,
    serial,
)

SERVICE = "/subsidy.v1.ComplaintService/"
DESK, DESK_2, GOVERNMENT, AUDITOR = "op-desk", "op-desk-2", "gov-desk", "aud-desk"
OPERATOR = "op-auditor"  # the fixture's operator
TERMINAL, OTHER_TERMINAL, SAME_MERCHANT_TERMINAL = "t-main-01", "t-other-01", "t-main-02"
WALLET, BANK, PROVIDER = "p-wallet-01", "p-bank-01", "p-peer-01"
STAFF = [
    {"id": DESK, "name": "投诉专席 1"},
    {"id": DESK_2, "name": "投诉专席 2"},
    {"id": GOVERNMENT, "name": "萧山区商务局", "role": "government"},
    {"id": AUDITOR, "name": "区审计局", "role": "auditor"},
]
FRIDGE = "6970000000017"
WASHER = "6970000000093"
PHONE = "13812345678"
DAILY_LIMIT = 3
RESPONSES = {
    "OpenConsumerTicket": pb.OpenConsumerTicketResponse,
    "OpenMerchantTicket": pb.OpenMerchantTicketResponse,
    "GetTicket": pb.GetTicketResponse,
    "ListTickets": pb.ListTicketsResponse,
    "AssignTicket": pb.AssignTicketResponse,
    "ReplyTicket": pb.ReplyTicketResponse,
    "TransitionTicket": pb.TransitionTicketResponse,
    "RevealTicketContact": pb.RevealTicketContactResponse,
    "GetTicketCounts": pb.GetTicketCountsResponse,
}


@dataclass
class World:
    env: Environment
    gateway: Application
    credentials: dict[str, str]
    clients: dict[str, SignedClient]

    async def call(self, caller_id: str, method: str, request: Message) -> Any:
        return await self.clients[caller_id]._call(SERVICE + method, request, RESPONSES[method])

    def terminal(self, caller_id: str = TERMINAL) -> AuthorizationClient:
        return AuthorizationClient(
            f"127.0.0.1:{self.gateway.port}",
            caller_id,
            self.credentials[caller_id],
            retry=RetryPolicy(max_attempts=1),
        )

    def partner(self, caller_id: str = WALLET) -> QualificationClient:
        return QualificationClient(
            f"127.0.0.1:{self.gateway.port}",
            caller_id,
            self.credentials[caller_id],
            retry=RetryPolicy(max_attempts=1),
        )


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[World]:
    """A database and prefix of their own (so the ledger reconciles exactly), the desk's staff
    loaded beside the test reference data, and a gateway with a small daily limit."""
    async with isolated_environment(services) as env:
        document = yaml.safe_load(REFERENCE_FILE.read_text())
        document["operators"] = [*document["operators"], *STAFF]
        credentials = {**env.credentials, **await load_document(env, document)}
        config = env.config(ticket_daily_limit_per_consumer=DAILY_LIMIT, ticket_daily_limit_per_merchant=DAILY_LIMIT)
        async with running_gateway(config) as gateway:
            clients = {
                caller_id: SignedClient(
                    f"127.0.0.1:{gateway.port}", caller_id, secret, retry=RetryPolicy(max_attempts=1)
                )
                for caller_id, secret in credentials.items()
            }
            yield World(env, gateway, credentials, clients)
            for client in clients.values():
                await client.close()


async def written(world: World) -> dict[str, int]:
    """Row counts of everything the desk writes in PostgreSQL."""
    connection = await asyncpg.connect(world.env.pg_dsn)
    try:
        return {
            table: int(await connection.fetchval(f"SELECT count(*) FROM {table}"))
            for table in ("tickets", "ticket_replies", "operator_actions")
        }
    finally:
        await connection.close()


async def captured_payment(world: World, person: str) -> apb.AuthorizeResponse:
    """A captured two-line payment of ``person`` at m-main."""
    async with world.terminal() as till:
        approved = await till.authorize(
            campaign_id="c-main",
            consumer_key=consumer_key_of(person),
            lines=[Line("fridge", FRIDGE, 300_000, serial()), Line("washer", WASHER, 200_000)],
        )
        assert approved.decision == apb.DECISION_APPROVED, approved
        await till.capture(approved.authorization_id)
    return approved


def consumer_ticket(
    person: str,
    link: pb.TicketLink,
    *,
    text: str = "冰箱补贴没有到账, 请核实",
    category: int = pb.TICKET_CATEGORY_NOT_RECEIVED,
    phone: str = "",
    request_id: str | None = None,
) -> pb.OpenConsumerTicketRequest:
    return pb.OpenConsumerTicketRequest(
        request_id=request_id or str(uuid.uuid4()),
        consumer=qpb.ConsumerIdentity(id_number=person),
        category=category,  # type: ignore[arg-type]
        link=link,
        text=text,
        contact_phone=phone,
    )


def transition(ticket_id: str, to_state: int, text: str, lines: tuple[str, ...] = ()) -> pb.TransitionTicketRequest:
    return pb.TransitionTicketRequest(
        request_id=str(uuid.uuid4()),
        ticket_id=ticket_id,
        to_state=to_state,  # type: ignore[arg-type]
        text=text,
        refund_line_ids=list(lines),
    )


async def test_full_lifecycle_with_a_refund_through_the_money_path(world: World) -> None:
    """Opened by the consumer's app, assigned, taken up, answered and resolved with a refund of
    one line: the refund is the normal script's (the authorization becomes PARTIALLY_REFUNDED),
    each step is a reply in order and an audited operator action, the submitter reads it all,
    a closed ticket moves no further, and after the writer drains the ledger holds the refund,
    verifies and reconciles."""
    person = id_number()
    payment = await captured_payment(world, person)
    opened = await world.call(
        WALLET,
        "OpenConsumerTicket",
        consumer_ticket(
            person,
            pb.TicketLink(authorization_id=payment.authorization_id),
            category=pb.TICKET_CATEGORY_REFUND,
            phone=PHONE,
            text="洗衣机退货了, 补贴请退回",
        ),
    )
    ticket = opened.ticket
    assert not opened.replayed
    assert ticket.state == pb.TICKET_STATE_OPEN and ticket.submitter == pb.TICKET_SUBMITTER_CONSUMER
    assert ticket.partner_id == WALLET and ticket.merchant_id == "m-main"
    assert ticket.consumer_key == consumer_key_of(person)
    assert ticket.masked_contact_phone == "138****5678"
    assert ticket.first_reply_due_at.ToDatetime() > ticket.opened_at.ToDatetime()
    assert ticket.resolution_due_at.ToDatetime() > ticket.first_reply_due_at.ToDatetime()
    assert not (ticket.first_reply_overdue or ticket.resolution_overdue)
    ticket_id = ticket.ticket_id

    queue = await world.call(DESK, "ListTickets", pb.ListTicketsRequest(state=pb.TICKET_STATE_OPEN, limit=500))
    assert ticket_id in [listed.ticket_id for listed in queue.tickets]
    assigned = await world.call(
        DESK, "AssignTicket", pb.AssignTicketRequest(request_id=str(uuid.uuid4()), ticket_id=ticket_id, assignee=DESK_2)
    )
    assert assigned.ticket.assignee == DESK_2
    mine = await world.call(DESK, "ListTickets", pb.ListTicketsRequest(assignee=DESK_2))
    assert [listed.ticket_id for listed in mine.tickets] == [ticket_id]

    taken = await world.call(DESK_2, "TransitionTicket", transition(ticket_id, pb.TICKET_STATE_IN_PROGRESS, "已受理"))
    assert taken.ticket.state == pb.TICKET_STATE_IN_PROGRESS and taken.ticket.HasField("first_replied_at")
    await world.call(
        DESK_2, "ReplyTicket", pb.ReplyTicketRequest(request_id=str(uuid.uuid4()), ticket_id=ticket_id, text="正在核实")
    )
    resolved = await world.call(
        DESK_2, "TransitionTicket", transition(ticket_id, pb.TICKET_STATE_RESOLVED, "已退回洗衣机补贴", ("washer",))
    )
    final = resolved.ticket
    assert final.state == pb.TICKET_STATE_RESOLVED and final.HasField("closed_at")
    assert [(reply.from_state, reply.to_state) for reply in final.replies] == [
        (pb.TICKET_STATE_OPEN, pb.TICKET_STATE_IN_PROGRESS),
        (pb.TICKET_STATE_IN_PROGRESS, pb.TICKET_STATE_IN_PROGRESS),
        (pb.TICKET_STATE_IN_PROGRESS, pb.TICKET_STATE_RESOLVED),
    ]
    refund_reply = final.replies[-1]
    assert refund_reply.author == DESK_2 and refund_reply.refund_request_id
    assert refund_reply.refunded_subsidy_fen == 40_000  # 20 % of the washer's 2,000 yuan

    async with world.terminal() as till:
        after = await till.get_authorization(payment.authorization_id)
    assert after.state == apb.AUTHORIZATION_STATE_PARTIALLY_REFUNDED
    assert [line.refunded for line in after.lines] == [False, True]

    # The submitter reads its own ticket with every reply.
    read = await world.call(
        WALLET, "GetTicket", pb.GetTicketRequest(ticket_id=ticket_id, consumer=qpb.ConsumerIdentity(id_number=person))
    )
    assert [reply.text for reply in read.ticket.replies] == ["已受理", "正在核实", "已退回洗衣机补贴"]

    for to_state in (pb.TICKET_STATE_IN_PROGRESS, pb.TICKET_STATE_REJECTED, pb.TICKET_STATE_RESOLVED):
        with pytest.raises(FailedPrecondition) as refused:
            await world.call(DESK, "TransitionTicket", transition(ticket_id, to_state, "再次处理"))
        assert refused.value.reason == "INVALID_STATE"
        assert refused.value.metadata["state"] == "TICKET_STATE_RESOLVED"
    with pytest.raises(FailedPrecondition):
        await world.call(
            DESK, "ReplyTicket", pb.ReplyTicketRequest(request_id=str(uuid.uuid4()), ticket_id=ticket_id, text="x")
        )

    connection = await asyncpg.connect(world.env.pg_dsn)
    redis = Redis.from_url(world.env.redis_url)
    try:
        audited = await connection.fetch(
            "SELECT operator_id, action FROM operator_actions WHERE target_kind = 'ticket' AND target_id = $1"
            " ORDER BY action_id",
            ticket_id,
        )
        assert [(row["operator_id"], row["action"]) for row in audited] == [
            (DESK, "AssignTicket"),
            (DESK_2, "TransitionTicket"),
            (DESK_2, "ReplyTicket"),
            (DESK_2, "TransitionTicket"),
        ]
        writer = LedgerWriter(
            WriterConfig(pg_dsn=world.env.pg_dsn, redis_url=world.env.redis_url, prefix=world.env.prefix), redis
        )
        await writer.drain()
        await writer.close()
        refunds = await connection.fetch(
            "SELECT request_id, terminal_id, amount_fen FROM ledger_events"
            " WHERE authorization_id = $1 AND event_type = 'REFUNDED'",
            payment.authorization_id,
        )
        # The authorization's own terminal acted, under the refund request id the reply names.
        assert [tuple(row) for row in refunds] == [(refund_reply.refund_request_id, TERMINAL, 40_000)]
        report = await verify(connection)
        assert report.ok, report
        assert await reconcile(connection, redis, world.env.keys) == []
    finally:
        await connection.close()
        await redis.aclose()


async def test_retries_answer_the_first_result_and_act_once(world: World) -> None:
    """The same request id opens one ticket (replayed: true) and refunds once; the same id with
    another payload is IDEMPOTENCY_CONFLICT and writes nothing."""
    person = id_number()
    payment = await captured_payment(world, person)
    request = consumer_ticket(person, pb.TicketLink(authorization_id=payment.authorization_id), phone=PHONE)
    first = await world.call(WALLET, "OpenConsumerTicket", request)
    again = await world.call(WALLET, "OpenConsumerTicket", request)
    assert again.replayed and again.ticket.ticket_id == first.ticket.ticket_id
    before = await written(world)
    changed = pb.OpenConsumerTicketRequest()
    changed.CopyFrom(request)
    changed.text = "换一种说法"
    with pytest.raises(IdempotencyConflict):
        await world.call(WALLET, "OpenConsumerTicket", changed)
    assert await written(world) == before

    resolve = transition(first.ticket.ticket_id, pb.TICKET_STATE_RESOLVED, "全部退回", ("fridge", "washer"))
    done = await world.call(DESK, "TransitionTicket", resolve)
    replay = await world.call(DESK, "TransitionTicket", resolve)
    assert replay.replayed and not done.replayed
    assert len(replay.ticket.replies) == 1
    assert replay.ticket.replies[0].refunded_subsidy_fen == 60_000 + 40_000
    async with world.terminal() as till:
        after = await till.get_authorization(payment.authorization_id)
    assert after.state == apb.AUTHORIZATION_STATE_REFUNDED
    assert after.refunded_subsidy_fen == 100_000


async def test_a_refused_refund_leaves_the_ticket_and_the_money_as_they_were(world: World) -> None:
    """Refund lines on a ticket about a merchant, with REJECTED, naming a line the payment does
    not have, or on a payment not captured yet: each refused precisely; the ticket keeps its
    state and replies, no operator action is recorded, and the payment is unchanged."""
    person = id_number()
    about_merchant = await world.call(
        WALLET, "OpenConsumerTicket", consumer_ticket(person, pb.TicketLink(merchant_id="m-main"))
    )
    async with world.terminal() as till:
        pending = await till.authorize(
            campaign_id="c-main", consumer_key=consumer_key_of(person), lines=[Line("washer", WASHER, 200_000)]
        )
    about_payment = await world.call(
        WALLET, "OpenConsumerTicket", consumer_ticket(person, pb.TicketLink(authorization_id=pending.authorization_id))
    )
    before = await written(world)
    cases: list[tuple[pb.TransitionTicketRequest, type[SubsidyError], str]] = [
        (
            transition(about_merchant.ticket.ticket_id, pb.TICKET_STATE_RESOLVED, "退款", ("washer",)),
            InvalidArgument,
            "refund_line_ids",
        ),
        (
            transition(about_payment.ticket.ticket_id, pb.TICKET_STATE_REJECTED, "拒绝", ("washer",)),
            InvalidArgument,
            "refund_line_ids",
        ),
        (
            transition(about_payment.ticket.ticket_id, pb.TICKET_STATE_RESOLVED, "退款", ("nope",)),
            FailedPrecondition,  # still PENDING: the script refuses before it looks at the lines
            "INVALID_STATE",
        ),
        (
            transition(about_payment.ticket.ticket_id, pb.TICKET_STATE_OPEN, "重开"),
            InvalidArgument,
            "to_state",
        ),
    ]
    for request, error, detail in cases:
        with pytest.raises(error) as raised:
            await world.call(DESK, "TransitionTicket", request)
        assert detail in (raised.value.metadata.get("field"), raised.value.reason), raised.value
    assert await written(world) == before
    async with world.terminal() as till:
        await till.capture(pending.authorization_id)
        with pytest.raises(InvalidArgument) as unknown_line:
            await world.call(
                DESK,
                "TransitionTicket",
                transition(about_payment.ticket.ticket_id, pb.TICKET_STATE_RESOLVED, "退款", ("nope",)),
            )
        assert unknown_line.value.metadata["field"] == "refund_line_ids"
        assert (await till.get_authorization(pending.authorization_id)).state == apb.AUTHORIZATION_STATE_CAPTURED
    assert await written(world) == before
    read = await world.call(DESK, "GetTicket", pb.GetTicketRequest(ticket_id=about_payment.ticket.ticket_id))
    assert read.ticket.state == pb.TICKET_STATE_OPEN and list(read.ticket.replies) == []


def bad_requests(
    person: str, others_payment: str, others_code: str
) -> list[tuple[str, pb.OpenConsumerTicketRequest, type[SubsidyError], str]]:
    """(what, request, error class, field or reason) for each bad consumer ticket."""
    link = pb.TicketLink(merchant_id="m-main")
    return [
        ("empty text", consumer_ticket(person, link, text="  \n "), InvalidArgument, "text"),
        ("2,001 characters", consumer_ticket(person, link, text="投" * 2001), InvalidArgument, "text"),
        ("a control character", consumer_ticket(person, link, text="退款\x1b[31m"), InvalidArgument, "text"),
        ("a bidi override", consumer_ticket(person, link, text="abc\u202edef"), InvalidArgument, "text"),
        (
            "the ID number in the text",
            consumer_ticket(person, link, text=f"身份证 {person} 请核实"),
            InvalidArgument,
            "text",
        ),
        ("a mobile number in the text", consumer_ticket(person, link, text=f"请回电 {PHONE}"), InvalidArgument, "text"),
        ("no category", consumer_ticket(person, link, category=0), InvalidArgument, "category"),
        ("unknown category", consumer_ticket(person, link, category=99), InvalidArgument, "category"),
        ("no link", consumer_ticket(person, pb.TicketLink()), InvalidArgument, "link"),
        (
            "malformed authorization id",
            consumer_ticket(person, pb.TicketLink(authorization_id="not-hex")),
            InvalidArgument,
            "link.authorization_id",
        ),
        (
            "malformed redemption code",
            consumer_ticket(person, pb.TicketLink(redemption_code="short")),
            InvalidArgument,
            "link.redemption_code",
        ),
        ("malformed phone", consumer_ticket(person, link, phone="12345"), InvalidArgument, "contact_phone"),
        (
            "malformed ID number",
            consumer_ticket(person[:-1] + ("0" if person[-1] != "0" else "1"), link),
            InvalidArgument,
            "consumer.id_number",
        ),
        ("bad request id", consumer_ticket(person, link, request_id="nope"), InvalidArgument, "request_id"),
        (
            "unknown authorization",
            consumer_ticket(person, pb.TicketLink(authorization_id=uuid.uuid4().hex)),
            NotFound,
            "authorization",
        ),
        (
            "unknown qualification",
            consumer_ticket(person, pb.TicketLink(redemption_code="ABCDEFGHJKMNPQRS")),
            NotFound,
            "qualification",
        ),
        ("unknown merchant", consumer_ticket(person, pb.TicketLink(merchant_id="m-nobody")), NotFound, "merchant"),
        (
            "another consumer's authorization",
            consumer_ticket(person, pb.TicketLink(authorization_id=others_payment)),
            PermissionDenied,
            "PERMISSION_DENIED",
        ),
        (
            "a qualification claimed through another app",
            consumer_ticket(person, pb.TicketLink(redemption_code=others_code)),
            PermissionDenied,
            "PERMISSION_DENIED",
        ),
    ]


async def test_each_bad_input_is_refused_precisely_and_writes_nothing(world: World) -> None:
    """Malformed or oversized text, unknown ids, another consumer's payment, another app's
    qualification: each a precise error (field, kind or reason), and no row anywhere."""
    person, other = id_number(), id_number()
    others_payment = await captured_payment(world, other)
    async with world.partner(BANK) as bank:
        claimed = await bank.claim(
            campaign_id="c-qual",
            category="general",
            id_number=person,
            location=common_pb2.Location(
                latitude=30.18, longitude=120.26, coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84, accuracy_m=20.0
            ),
            fix_time_ms=int(time.time() * 1000),
        )
    assert claimed.decision == qpb.CLAIM_DECISION_ISSUED, claimed
    before = await written(world)
    for what, request, error, detail in bad_requests(
        person, others_payment.authorization_id, claimed.qualification.redemption_code
    ):
        with pytest.raises(error) as raised:
            await world.call(WALLET, "OpenConsumerTicket", request)
        found = raised.value
        assert detail in (found.metadata.get("field"), found.metadata.get("kind"), found.reason), (what, found)
        assert await written(world) == before, what
    # The same person's qualification through the app that claimed it is fine.
    await world.call(
        BANK,
        "OpenConsumerTicket",
        consumer_ticket(person, pb.TicketLink(redemption_code=claimed.qualification.redemption_code)),
    )
    assert (await written(world))["tickets"] == before["tickets"] + 1


async def test_merchant_tickets_and_another_merchants_authorization(world: World) -> None:
    """A merchant's terminal opens a ticket about its own payment; another merchant's payment
    is PERMISSION_DENIED and writes nothing; the merchant's other terminal reads the ticket,
    another merchant and the consumer's app do not (NOT_FOUND)."""
    payment = await captured_payment(world, id_number())
    link = pb.TicketLink(authorization_id=payment.authorization_id)
    before = await written(world)
    with pytest.raises(PermissionDenied):
        await world.call(
            OTHER_TERMINAL,
            "OpenMerchantTicket",
            pb.OpenMerchantTicketRequest(
                request_id=str(uuid.uuid4()), category=pb.TICKET_CATEGORY_OTHER, link=link, text="查询"
            ),
        )
    with pytest.raises(PermissionDenied):
        await world.call(
            OTHER_TERMINAL,
            "OpenMerchantTicket",
            pb.OpenMerchantTicketRequest(
                request_id=str(uuid.uuid4()),
                category=pb.TICKET_CATEGORY_OTHER,
                link=pb.TicketLink(merchant_id="m-main"),
                text="查询",
            ),
        )
    assert await written(world) == before
    opened = await world.call(
        TERMINAL,
        "OpenMerchantTicket",
        pb.OpenMerchantTicketRequest(
            request_id=str(uuid.uuid4()), category=pb.TICKET_CATEGORY_WRONGLY_DECLINED, link=link, text="核销异常"
        ),
    )
    ticket_id = opened.ticket.ticket_id
    assert opened.ticket.submitter == pb.TICKET_SUBMITTER_MERCHANT and opened.ticket.merchant_id == "m-main"
    read = await world.call(SAME_MERCHANT_TERMINAL, "GetTicket", pb.GetTicketRequest(ticket_id=ticket_id))
    assert read.ticket.text == "核销异常"
    with pytest.raises(NotFound):
        await world.call(OTHER_TERMINAL, "GetTicket", pb.GetTicketRequest(ticket_id=ticket_id))
    with pytest.raises(NotFound):
        await world.call(
            WALLET,
            "GetTicket",
            pb.GetTicketRequest(ticket_id=ticket_id, consumer=qpb.ConsumerIdentity(id_number=id_number())),
        )


async def test_consumer_tickets_are_read_only_by_their_app_and_consumer(world: World) -> None:
    """Another app, or the same app presenting another consumer, finds no such ticket; the
    merchant the ticket concerns does not read it either."""
    person = id_number()
    opened = await world.call(
        WALLET, "OpenConsumerTicket", consumer_ticket(person, pb.TicketLink(merchant_id="m-main"))
    )
    ticket_id = opened.ticket.ticket_id
    for caller_id, someone in ((BANK, person), (WALLET, id_number())):
        with pytest.raises(NotFound):
            await world.call(
                caller_id,
                "GetTicket",
                pb.GetTicketRequest(ticket_id=ticket_id, consumer=qpb.ConsumerIdentity(id_number=someone)),
            )
    with pytest.raises(NotFound):
        await world.call(TERMINAL, "GetTicket", pb.GetTicketRequest(ticket_id=ticket_id))


async def test_daily_limit_per_consumer(world: World) -> None:
    """The limit's tickets open, the next is RESOURCE_EXHAUSTED (RATE_LIMITED) and writes
    nothing; a retry of an earlier request still answers; another consumer is unaffected."""
    person = id_number()
    link = pb.TicketLink(merchant_id="m-main")
    requests = [consumer_ticket(person, link, text=f"第 {index} 次咨询") for index in range(DAILY_LIMIT)]
    opened_before = REGISTRY.get_sample_value("subsidy_tickets_opened_total", {"submitter": "CONSUMER"}) or 0.0
    for request in requests:
        await world.call(WALLET, "OpenConsumerTicket", request)
    before = await written(world)
    with pytest.raises(SubsidyError) as refused:
        await world.call(BANK, "OpenConsumerTicket", consumer_ticket(person, link, text="再一次"))
    assert refused.value.code.name == "RESOURCE_EXHAUSTED" and refused.value.reason == "RATE_LIMITED"
    assert refused.value.metadata == {"limit": "tickets_per_consumer_per_day", "max": str(DAILY_LIMIT)}
    assert await written(world) == before
    replay = await world.call(WALLET, "OpenConsumerTicket", requests[0])
    assert replay.replayed
    # Openings are counted once each: not the refused one, not the replay.
    opened_after = REGISTRY.get_sample_value("subsidy_tickets_opened_total", {"submitter": "CONSUMER"})
    assert opened_after == opened_before + DAILY_LIMIT
    await world.call(WALLET, "OpenConsumerTicket", consumer_ticket(id_number(), link))


async def test_daily_limit_holds_when_calls_race(world: World) -> None:
    """Twelve openings for one consumer at once, through two apps, against a limit of three:
    exactly three tickets exist afterwards, and every other call is RATE_LIMITED (the count and
    the insert share a transaction under the consumer's advisory lock)."""
    person = id_number()
    link = pb.TicketLink(merchant_id="m-main")
    results = await asyncio.gather(
        *(
            world.call(WALLET if index % 2 else BANK, "OpenConsumerTicket", consumer_ticket(person, link))
            for index in range(12)
        ),
        return_exceptions=True,
    )
    opened = [result for result in results if isinstance(result, pb.OpenConsumerTicketResponse)]
    refused = [result for result in results if isinstance(result, SubsidyError)]
    assert len(opened) == DAILY_LIMIT and len(refused) == 12 - DAILY_LIMIT, results
    assert {error.reason for error in refused} == {"RATE_LIMITED"}
    connection = await asyncpg.connect(world.env.pg_dsn)
    try:
        stored = await connection.fetchval(
            "SELECT count(*) FROM tickets WHERE consumer_key = $1", consumer_key_of(person)
        )
    finally:
        await connection.close()
    assert stored == DAILY_LIMIT


ROLES = (OPERATOR, GOVERNMENT, AUDITOR, TERMINAL, WALLET, PROVIDER)
ALLOWED = {
    "OpenConsumerTicket": {WALLET},
    "OpenMerchantTicket": {TERMINAL},
    "GetTicket": {WALLET, TERMINAL, OPERATOR},
    "ListTickets": {OPERATOR},
    "AssignTicket": {OPERATOR},
    "ReplyTicket": {OPERATOR},
    "TransitionTicket": {OPERATOR},
    "RevealTicketContact": {OPERATOR},
    "GetTicketCounts": {OPERATOR, GOVERNMENT},
}


def minimal(method: str) -> Message:
    request_type = RESPONSES[method].__name__.removesuffix("Response") + "Request"
    request: Message = getattr(pb, request_type)()
    return request


@pytest.mark.parametrize("method", sorted(ALLOWED))
async def test_roles_pairwise(world: World, method: str) -> None:
    """Every method against every kind of caller: the roles not named are PERMISSION_DENIED
    before anything is read or written; the roles named get past the role check (their empty
    request is then refused for its fields, or answered)."""
    before = await written(world)
    for caller_id in ROLES:
        if caller_id in ALLOWED[method]:
            try:
                await world.call(caller_id, method, minimal(method))
            except SubsidyError as error:
                assert not isinstance(error, PermissionDenied), (method, caller_id, error)
        else:
            with pytest.raises(PermissionDenied):
                await world.call(caller_id, method, minimal(method))
    assert await written(world) == before


async def test_overdue_tickets_are_flagged_listed_and_counted(world: World) -> None:
    """A ticket whose first-reply deadline has passed is flagged in the list, found by the
    overdue filter and counted (per day and now); a reply after the deadline keeps it flagged
    (late), and a ticket answered in time is not flagged. Deadlines are moved in PostgreSQL
    rather than waiting for them."""
    late = await world.call(
        WALLET, "OpenConsumerTicket", consumer_ticket(id_number(), pb.TicketLink(merchant_id="m-main"))
    )
    on_time = await world.call(
        WALLET, "OpenConsumerTicket", consumer_ticket(id_number(), pb.TicketLink(merchant_id="m-other"))
    )
    connection = await asyncpg.connect(world.env.pg_dsn)
    try:
        await connection.execute(
            "UPDATE tickets SET first_reply_due_at = now() - interval '1 hour' WHERE ticket_id = $1",
            late.ticket.ticket_id,
        )
    finally:
        await connection.close()
    overdue = await world.call(DESK, "ListTickets", pb.ListTicketsRequest(overdue_only=True, limit=500))
    flagged = {ticket.ticket_id: ticket for ticket in overdue.tickets}
    assert late.ticket.ticket_id in flagged and on_time.ticket.ticket_id not in flagged
    assert flagged[late.ticket.ticket_id].first_reply_overdue
    assert not flagged[late.ticket.ticket_id].resolution_overdue
    everything = await world.call(DESK, "ListTickets", pb.ListTicketsRequest(limit=500))
    assert not {t.ticket_id: t for t in everything.tickets}[on_time.ticket.ticket_id].first_reply_overdue

    counts = await world.call(GOVERNMENT, "GetTicketCounts", pb.GetTicketCountsRequest())
    assert len(counts.days) == 30
    # The gauges the gateway's /metrics serves follow the last count.
    assert REGISTRY.get_sample_value("subsidy_tickets_overdue") == counts.overdue_now
    assert REGISTRY.get_sample_value("subsidy_tickets_open") == counts.open_now
    today = counts.days[-1]
    assert today.opened >= 2 and today.overdue >= 1
    assert counts.overdue_now >= 1 and counts.open_now >= 1
    await world.call(
        DESK,
        "ReplyTicket",
        pb.ReplyTicketRequest(request_id=str(uuid.uuid4()), ticket_id=late.ticket.ticket_id, text="迟到的回复"),
    )
    replied = await world.call(DESK, "GetTicket", pb.GetTicketRequest(ticket_id=late.ticket.ticket_id))
    assert replied.ticket.first_reply_overdue
    with pytest.raises(InvalidArgument) as invalid:
        await world.call(
            GOVERNMENT, "GetTicketCounts", pb.GetTicketCountsRequest(from_date="2026-01-02", to_date="2026-01-01")
        )
    assert invalid.value.metadata["field"] == "from_date"


async def test_contact_is_sealed_masked_and_revealed_only_by_an_audited_action(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """At rest the phone is a sealed token, never the number; staff see it masked; the reveal
    answers the number and is in the operator audit trail with its purpose; neither the ID
    number nor the phone reaches the logs."""
    caplog.set_level(logging.DEBUG)
    person = id_number()
    opened = await world.call(
        WALLET, "OpenConsumerTicket", consumer_ticket(person, pb.TicketLink(merchant_id="m-main"), phone=PHONE)
    )
    ticket_id = opened.ticket.ticket_id
    listed = await world.call(DESK, "ListTickets", pb.ListTicketsRequest(limit=500))
    assert {t.ticket_id: t for t in listed.tickets}[ticket_id].masked_contact_phone == "138****5678"
    with pytest.raises(InvalidArgument):
        await world.call(
            DESK,
            "RevealTicketContact",
            pb.RevealTicketContactRequest(request_id=str(uuid.uuid4()), ticket_id=ticket_id),
        )
    revealed = await world.call(
        DESK,
        "RevealTicketContact",
        pb.RevealTicketContactRequest(request_id=str(uuid.uuid4()), ticket_id=ticket_id, purpose="回电核实退款"),
    )
    assert revealed.contact_phone == PHONE
    connection = await asyncpg.connect(world.env.pg_dsn)
    try:
        row = await connection.fetchrow("SELECT * FROM tickets WHERE ticket_id = $1", ticket_id)
        assert row["contact_phone_sealed"].startswith("s1.")
        assert PHONE not in str(dict(row)) and person not in str(dict(row)) and "5678" not in str(dict(row))
        audit = await connection.fetchrow(
            "SELECT operator_id, details FROM operator_actions WHERE action = 'RevealTicketContact' AND target_id = $1",
            ticket_id,
        )
        assert audit["operator_id"] == DESK and "回电核实退款" in audit["details"]
    finally:
        await connection.close()
    logged = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    assert PHONE not in logged and person not in logged


async def ctl(world: World, caller_id: str, *arguments: str) -> Result:
    environment = {"SUBSIDYCTL_OPERATOR": caller_id, "SUBSIDYCTL_SECRET": world.credentials[caller_id]}
    return await asyncio.to_thread(
        CliRunner().invoke,
        subsidyctl,
        ["--target", f"127.0.0.1:{world.gateway.port}", *arguments],
        env=environment,
        catch_exceptions=False,
    )


async def test_subsidyctl_ticket_commands(world: World) -> None:
    """`subsidyctl ticket list|show|assign|start|reply|resolve --refund|reject|reveal|stats`:
    tables with the contact masked, --json, the refund through the money path, a refused move
    exit status 1 with its reason, and a government user limited to stats."""
    person = id_number()
    payment = await captured_payment(world, person)
    opened = await world.call(
        WALLET,
        "OpenConsumerTicket",
        consumer_ticket(person, pb.TicketLink(authorization_id=payment.authorization_id), phone=PHONE, text="未到账"),
    )
    ticket_id = opened.ticket.ticket_id
    listed = await ctl(world, DESK, "ticket", "list", "--state", "open", "--limit", "500")
    assert listed.exit_code == 0, listed.output
    line = next(row for row in listed.output.splitlines() if ticket_id in row)
    assert "138****5678" in line and "NOT_RECEIVED" in line and PHONE not in listed.output
    as_json = await ctl(world, DESK, "ticket", "show", ticket_id, "--json")
    assert json.loads(as_json.output)["ticket"]["ticket_id"] == ticket_id
    for arguments in (("assign", ticket_id, DESK_2), ("start", ticket_id, "已受理"), ("reply", ticket_id, "核实中")):
        result = await ctl(world, DESK, "ticket", *arguments)
        assert result.exit_code == 0, (arguments, result.output)
    resolved = await ctl(world, DESK, "--json", "ticket", "resolve", ticket_id, "已退款", "--refund", "fridge")
    assert resolved.exit_code == 0, resolved.output
    final = json.loads(resolved.output)["ticket"]
    assert final["state"] == "TICKET_STATE_RESOLVED" and final["assignee"] == DESK_2
    assert final["replies"][-1]["refunded_subsidy_fen"] == "60000"
    again = await ctl(world, DESK, "ticket", "reject", ticket_id, "再拒绝")
    assert again.exit_code == 1 and "INVALID_STATE" in again.output
    shown = await ctl(world, DESK, "ticket", "show", ticket_id)
    assert "已退款" in shown.output and "IN_PROGRESS -> RESOLVED" in shown.output
    revealed = await ctl(world, DESK, "ticket", "reveal", ticket_id, "--purpose", "回电")
    assert revealed.exit_code == 0 and PHONE in revealed.output
    stats = await ctl(world, GOVERNMENT, "ticket", "stats", "--json")
    assert stats.exit_code == 0 and len(json.loads(stats.output)["days"]) == 30
    table = await ctl(world, GOVERNMENT, "ticket", "stats")
    assert "OPENED" in table.output and "overdue_now" in table.output
    refused = await ctl(world, GOVERNMENT, "ticket", "list")
    assert refused.exit_code == 1 and "PERMISSION_DENIED" in refused.output
    unreachable = await asyncio.to_thread(
        CliRunner().invoke,
        subsidyctl,
        ["--target", "127.0.0.1:1", "ticket", "list"],
        env={"SUBSIDYCTL_OPERATOR": DESK, "SUBSIDYCTL_SECRET": world.credentials[DESK]},
    )
    assert unreachable.exit_code == 3
