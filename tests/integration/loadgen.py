"""Client processes for the multi-process concurrency tests (importable by spawned children)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy, SubsidyError
from subsidy_client.v1 import authorization_pb2 as pb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb


@dataclass(frozen=True)
class Job:
    """One client process's share: requests (request_id, consumer, serial) fired all at once."""

    target: str
    terminal_id: str
    secret: str
    campaign_id: str
    gtin: str
    price_fen: int
    requests: list[tuple[str, str, str]]
    channels: int
    max_attempts: int


@dataclass(frozen=True)
class Outcome:
    request_id: str
    consumer: str
    serial: str
    decision: str
    reason: str
    authorization_id: str
    subsidy_fen: int
    error: str


async def _run(job: Job) -> list[Outcome]:
    # One TCP connection per client (a local subchannel pool), so the kernel spreads them across
    # the server processes sharing the port.
    channels = [
        grpc.aio.insecure_channel(job.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(job.channels)
    ]
    retry = RetryPolicy(max_attempts=job.max_attempts, backoff_initial_s=0.1, total_budget_s=60.0)
    clients = [
        AuthorizationClient(job.target, job.terminal_id, job.secret, deadline_s=30.0, retry=retry, channel=channel)
        for channel in channels
    ]

    async def one(index: int, request_id: str, consumer: str, serial: str) -> Outcome:
        client = clients[index % len(clients)]
        try:
            response = await client.authorize(
                campaign_id=job.campaign_id,
                consumer_key=consumer,
                lines=[Line("1", job.gtin, job.price_fen, serial)],
                request_id=request_id,
            )
        except SubsidyError as error:
            return Outcome(
                request_id, consumer, serial, "ERROR", "", "", 0, f"{error.code.name} {error.reason} {error.message}"
            )
        return Outcome(
            request_id,
            consumer,
            serial,
            pb.Decision.Name(response.decision),
            pb.DeclineReason.Name(response.decline_reason),
            response.authorization_id,
            response.subsidy_fen,
            "",
        )

    try:
        return await asyncio.gather(*(one(index, *request) for index, request in enumerate(job.requests)))
    finally:
        for channel in channels:
            await channel.close()


def run_job(job: Job) -> list[Outcome]:
    return asyncio.run(_run(job))


@dataclass(frozen=True)
class ClaimJob:
    """One client process's share of a flash crowd: claims (request_id, ID number) fired at once
    from a phone at ``latitude``, ``longitude`` (WGS-84)."""

    target: str
    partner_id: str
    secret: str
    campaign_id: str
    category: str
    latitude: float
    longitude: float
    fix_time_ms: int
    requests: list[tuple[str, str]]
    channels: int
    # Retries (same request_id) of UNAVAILABLE answers: a burst can outlast the Redis pool wait.
    max_attempts: int = 8
    # A pack claim (category ""): the pack's id.
    pack_id: str = ""


@dataclass(frozen=True)
class ClaimOutcome:
    request_id: str
    id_number: str
    decision: str
    reason: str
    redemption_code: str
    consumer_key: str
    error: str
    # Every code the claim issued (a pack's vouchers), with each one's pack, consumer and expiry.
    vouchers: tuple[tuple[str, str, str, int], ...] = ()


async def _run_claims(job: ClaimJob) -> list[ClaimOutcome]:
    channels = [
        grpc.aio.insecure_channel(job.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(job.channels)
    ]
    clients = [
        QualificationClient(
            job.target,
            job.partner_id,
            job.secret,
            deadline_s=60.0,
            retry=RetryPolicy(max_attempts=job.max_attempts, backoff_initial_s=0.1, total_budget_s=120.0),
            channel=channel,
        )
        for channel in channels
    ]
    location = common_pb2.Location(
        latitude=job.latitude,
        longitude=job.longitude,
        coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84,
        accuracy_m=15.0,
    )

    async def one(index: int, request_id: str, id_number: str) -> ClaimOutcome:
        try:
            response = await clients[index % len(clients)].claim(
                campaign_id=job.campaign_id,
                category=job.category,
                id_number=id_number,
                location=location,
                fix_time_ms=job.fix_time_ms,
                request_id=request_id,
                pack_id=job.pack_id,
            )
        except SubsidyError as error:
            return ClaimOutcome(request_id, id_number, "ERROR", "", "", "", f"{error.code.name} {error.message}")
        return ClaimOutcome(
            request_id,
            id_number,
            qpb.ClaimDecision.Name(response.decision),
            qpb.ClaimDeclineReason.Name(response.decline_reason),
            response.qualification.redemption_code,
            response.qualification.consumer_key,
            "",
            tuple(
                (q.redemption_code, q.pack_id, q.consumer_key, q.expires_at.ToMilliseconds())
                for q in response.qualifications
            ),
        )

    try:
        return await asyncio.gather(*(one(index, *request) for index, request in enumerate(job.requests)))
    finally:
        for channel in channels:
            await channel.close()


def run_claim_job(job: ClaimJob) -> list[ClaimOutcome]:
    return asyncio.run(_run_claims(job))
