"""Invariants under load: 2,400 concurrent Authorize calls from 4 client processes against
2 server processes sharing one port, on a budget that admits only 600 of them; and the same
with one server process killed (SIGKILL) in the middle of the load."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import secrets
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import orjson
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from storage.cluster_dev import free_port
from tests.conftest import PROGRAMME_KEY, ROOT, Environment, consumer_key, load_document
from tests.integration.loadgen import Job, Outcome, run_job

pytestmark = pytest.mark.slow

SUBSIDY_FEN = 60_000  # 20% of 300,000 fen
ADMITTED = 600
CLIENT_PROCESSES = 4
REQUESTS = 2_400
DISTINCT_CONSUMERS = 1_800  # 600 consumers ask twice: the per-person limit must hold
DISTINCT_SERIALS = 2_100  # 300 devices are sold twice: one subsidy per serial


async def load_campaign(environment: Environment) -> str:
    campaign_id = "c-load-" + secrets.token_hex(4)
    await load_document(
        environment,
        {
            "campaigns": [
                {
                    "id": campaign_id,
                    "starts_at": "2020-01-01T00:00:00+00:00",
                    "ends_at": "2099-01-01T00:00:00+00:00",
                    "rules": [
                        {
                            "category": "fridge",
                            "kind": "PERCENT",
                            "rates_bp": {"1": 2000},
                            "cap_fen": 200_000,
                            "per_person_limit": 1,
                            "budget_fen": ADMITTED * SUBSIDY_FEN,
                        }
                    ],
                }
            ]
        },
    )
    return campaign_id


@asynccontextmanager
async def server_processes(
    environment: Environment,
    port: int,
    log_path: Path,
    sweep_interval_ms: int = 3_600_000,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[psutil.Process]:
    """``python -m server`` with 2 workers, as in production; yields the parent process."""
    env = {
        **os.environ,
        "SUBSIDY_LISTEN": f"127.0.0.1:{port}",
        "SUBSIDY_WORKERS": "2",
        "SUBSIDY_PG_DSN": environment.pg_dsn,
        "SUBSIDY_REDIS_URL": environment.redis_url,
        "SUBSIDY_REDIS_PREFIX": environment.prefix,
        "SUBSIDY_LOG_LEVEL": "DEBUG",  # every call logged: the log scan below reads them all
        "SUBSIDY_SWEEP_INTERVAL_MS": str(sweep_interval_ms),
        "SUBSIDY_PROGRAMME_KEY": PROGRAMME_KEY,
        **(extra_env or {}),
    }
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", cwd=ROOT, env=env, stdout=log, stderr=log
        )
        try:
            await wait_serving(port)
            parent = psutil.Process(process.pid)
            for _ in range(100):
                if len(server_workers(parent)) == 2:
                    break
                await asyncio.sleep(0.05)
            yield parent
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), timeout=20)
                except TimeoutError:
                    process.kill()
                    await process.wait()


def server_workers(parent: psutil.Process) -> list[psutil.Process]:
    """The worker processes (multiprocessing also starts a resource tracker child)."""
    return [child for child in parent.children() if "resource_tracker" not in " ".join(child.cmdline())]


async def wait_serving(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(200):
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"server on port {port} never became SERVING")


def build_jobs(environment: Environment, port: int, campaign_id: str, max_attempts: int) -> list[Job]:
    consumers = [consumer_key() for _ in range(DISTINCT_CONSUMERS)]
    serials = [f"LOAD{index:06d}{secrets.token_hex(3)}" for index in range(DISTINCT_SERIALS)]
    requests = [
        (str(uuid.uuid4()), consumers[index % DISTINCT_CONSUMERS], serials[(index * 11) % DISTINCT_SERIALS])
        for index in range(REQUESTS)
    ]
    share = REQUESTS // CLIENT_PROCESSES
    return [
        Job(
            target=f"127.0.0.1:{port}",
            terminal_id="t-main-01" if worker % 2 == 0 else "t-main-02",
            secret=environment.credentials["t-main-01" if worker % 2 == 0 else "t-main-02"],
            campaign_id=campaign_id,
            gtin="6970000000017",
            price_fen=300_000,
            requests=requests[worker * share : (worker + 1) * share],
            channels=8,
            max_attempts=max_attempts,
        )
        for worker in range(CLIENT_PROCESSES)
    ]


async def run_clients(jobs: list[Job]) -> list[Outcome]:
    context = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    with context.Pool(len(jobs)) as pool:
        results = await loop.run_in_executor(None, pool.map, run_job, jobs)
    return [outcome for result in results for outcome in result]


# Standalone tokens only: the same digits inside a UUID or a hex id are not a phone number.
ID_NUMBER = re.compile(r"(?<![0-9A-Za-z-])[1-9][0-9]{5}(19|20)[0-9]{2}(0[1-9]|1[0-2])[0-9]{5}[0-9Xx](?![0-9A-Za-z-])")
PHONE_NUMBER = re.compile(r"(?<![0-9A-Za-z-])1[3-9][0-9]{9}(?![0-9A-Za-z-])")


def assert_no_personal_data(log: str, outcomes: list[Outcome]) -> None:
    """The server's logs hold no ID number, phone number, consumer key or device serial."""
    assert log.count('"msg":"authorize"') >= REQUESTS, "the server did not log every call"
    assert not ID_NUMBER.search(log)
    assert not PHONE_NUMBER.search(log)
    for outcome in outcomes[:200]:
        assert outcome.consumer not in log
        assert outcome.serial not in log


async def check_invariants(redis: Redis, environment: Environment, campaign_id: str, outcomes: list[Outcome]) -> None:
    keys = environment.keys
    assert len(outcomes) == REQUESTS
    assert Counter(outcome.error for outcome in outcomes if outcome.error) == Counter()
    approved = [outcome for outcome in outcomes if outcome.decision == "DECISION_APPROVED"]
    declined = Counter(outcome.reason for outcome in outcomes if outcome.decision == "DECISION_DECLINED")
    assert set(declined) <= {
        "DECLINE_REASON_BUDGET_EXHAUSTED",
        "DECLINE_REASON_CONSUMER_LIMIT_REACHED",
        "DECLINE_REASON_SERIAL_ALREADY_SUBSIDISED",
    }
    # Budget: never exceeded, and with more eligible demand than budget it is used to the fen.
    assert sum(outcome.subsidy_fen for outcome in approved) == ADMITTED * SUBSIDY_FEN
    assert len(approved) == ADMITTED
    # Per person and per device: at most once.
    assert max(Counter(outcome.consumer for outcome in approved).values()) == 1
    assert max(Counter(outcome.serial for outcome in approved).values()) == 1
    # Redis counters add up exactly.
    budget = await redis.hgetall(keys.budget(campaign_id))
    assert int(budget[b"fridge:reserved"]) == ADMITTED * SUBSIDY_FEN
    assert int(budget.get(b"fridge:spent", 0)) == 0
    for outcome in approved:
        assert await redis.hget(keys.usage(campaign_id, outcome.consumer), "fridge") == b"1"
        # Serials are stored in their canonical (upper-case) form.
        assert await redis.get(keys.serial(outcome.serial.upper())) == outcome.authorization_id.encode()
    # Exactly one ledger event per reservation, and no reservation the clients were not told of.
    events = [orjson.loads(fields[b"e"]) for _, fields in await redis.xrange(keys.ledger)]
    authorized = [event["authorization_id"] for event in events if event["campaign"] == campaign_id]
    assert sorted(authorized) == sorted(outcome.authorization_id for outcome in approved)


async def test_budget_quota_and_serials_hold_across_processes(
    environment: Environment, redis: Redis, tmp_path: Path
) -> None:
    """2,400 concurrent calls, 4 client processes, 2 server processes: exactly 600 approved,
    no consumer or serial twice, every counter and ledger event accounted for; both server
    processes did work."""
    campaign_id = await load_campaign(environment)
    port = free_port()
    async with server_processes(environment, port, tmp_path / "server.log") as parent:
        workers = server_workers(parent)
        assert len(workers) == 2
        cpu_before = [sum(worker.cpu_times()[:2]) for worker in workers]
        outcomes = await run_clients(build_jobs(environment, port, campaign_id, max_attempts=1))
        cpu_used = [sum(worker.cpu_times()[:2]) - before for worker, before in zip(workers, cpu_before, strict=True)]
    assert min(cpu_used) > 0.2, f"one server process did no work: {cpu_used}"
    await check_invariants(redis, environment, campaign_id, outcomes)
    assert_no_personal_data((tmp_path / "server.log").read_text(), outcomes)


async def test_invariants_hold_when_a_server_process_is_killed(
    environment: Environment, redis: Redis, tmp_path: Path
) -> None:
    """SIGKILL one of the two server processes while the load is in flight. Clients retry with
    the same request_id on the survivor; every call gets a definite answer, and a reservation
    whose answer was lost with the dead process is replayed, never made twice."""
    campaign_id = await load_campaign(environment)
    port = free_port()
    async with server_processes(environment, port, tmp_path / "server.log") as parent:
        victim = server_workers(parent)[0]
        ledger_length = await redis.xlen(environment.keys.ledger)
        clients = asyncio.create_task(run_clients(build_jobs(environment, port, campaign_id, max_attempts=8)))
        # Kill once the first hundred reservations exist, while the rest are still in flight.
        for _ in range(400):
            if await redis.xlen(environment.keys.ledger) - ledger_length >= 100:
                break
            await asyncio.sleep(0.05)
        assert not clients.done()
        victim.send_signal(signal.SIGKILL)
        outcomes = await clients
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
    await check_invariants(redis, environment, campaign_id, outcomes)
