"""Client processes for the multi-process concurrency tests (importable by spawned children)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from subsidy_client import AuthorizationClient, Line, RetryPolicy, SubsidyError
from subsidy_client.v1 import authorization_pb2 as pb


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
