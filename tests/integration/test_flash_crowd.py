"""Qualification invariants under load, across 2 server processes: a flash crowd of 10,000
concurrent claims for 1,000 qualifications, and expiry racing redemption."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import secrets
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from tests.conftest import Environment, consumer_key_of, id_number, load_document
from tests.integration.loadgen import ClaimJob, ClaimOutcome, run_claim_job
from tests.integration.test_concurrency import (
    ID_NUMBER,
    PHONE_NUMBER,
    free_port,
    server_processes,
    server_workers,
)

pytestmark = pytest.mark.slow

QUOTA = 1_000
CLAIMS = 10_000
PEOPLE = 7_000  # 3,000 of them claim twice at once: one qualification each, at most
CLIENT_PROCESSES = 4
GOODS = "6970000000086"
XIAOSHAN_GOVERNMENT = (30.18, 120.26)


async def load_campaign(environment: Environment, quota: int, validity_s: int) -> str:
    campaign_id = "c-flash-" + secrets.token_hex(4)
    await load_document(
        environment,
        {
            "campaigns": [
                {
                    "id": campaign_id,
                    "starts_at": "2020-01-01T00:00:00+00:00",
                    "ends_at": "2099-01-01T00:00:00+00:00",
                    "qualification_validity_s": validity_s,
                    "refund_policy": "RESTORE_ON_FULL_REFUND",
                    "region": {
                        "type": "Polygon",
                        "coordinates": [[[120.0, 29.8], [120.6, 29.8], [120.6, 30.3], [120.0, 30.3], [120.0, 29.8]]],
                    },
                    "rules": [
                        {
                            "category": "general",
                            "kind": "FIXED",
                            "threshold_fen": 2000,
                            "off_fen": 500,
                            "per_person_limit": 1,
                            "budget_fen": 10_000_000_000,
                            "qualification_quota": quota,
                        }
                    ],
                }
            ]
        },
    )
    return campaign_id


async def run_claims(jobs: list[ClaimJob]) -> list[ClaimOutcome]:
    context = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    with context.Pool(len(jobs)) as pool:
        results = await loop.run_in_executor(None, pool.map, run_claim_job, jobs)
    return [outcome for result in results for outcome in result]


async def test_ten_thousand_claims_issue_exactly_the_quota_once_per_person(
    environment: Environment, redis: Redis, tmp_path: Path
) -> None:
    campaign_id = await load_campaign(environment, QUOTA, 3600)
    people = [id_number() for _ in range(PEOPLE)]
    requests = [(str(uuid.uuid4()), people[index % PEOPLE]) for index in range(CLAIMS)]
    random.shuffle(requests)
    port = free_port()
    share = CLAIMS // CLIENT_PROCESSES
    partners = ["p-wallet-01", "p-bank-01"]
    jobs = [
        ClaimJob(
            target=f"127.0.0.1:{port}",
            partner_id=partners[worker % 2],
            secret=environment.credentials[partners[worker % 2]],
            campaign_id=campaign_id,
            category="general",
            latitude=XIAOSHAN_GOVERNMENT[0],
            longitude=XIAOSHAN_GOVERNMENT[1],
            fix_time_ms=int(time.time() * 1000),
            requests=requests[worker * share : (worker + 1) * share],
            channels=8,
        )
        for worker in range(CLIENT_PROCESSES)
    ]
    log_path = tmp_path / "server.log"
    async with server_processes(environment, port, log_path) as parent:
        workers = server_workers(parent)
        cpu_before = [sum(worker.cpu_times()[:2]) for worker in workers]
        outcomes = await run_claims(jobs)
        cpu_used = [sum(worker.cpu_times()[:2]) - before for worker, before in zip(workers, cpu_before, strict=True)]
    assert len(workers) == 2 and min(cpu_used) > 0.2, f"one server process did no work: {cpu_used}"

    assert len(outcomes) == CLAIMS
    # Every claim got a definite answer (a claim answered UNAVAILABLE was retried with the same
    # request_id, so a retry returned the first answer rather than claiming twice).
    assert Counter(outcome.error for outcome in outcomes if outcome.error) == Counter()
    issued = [outcome for outcome in outcomes if outcome.decision == "CLAIM_DECISION_ISSUED"]
    declined = Counter(outcome.reason for outcome in outcomes if outcome.decision == "CLAIM_DECISION_DECLINED")
    assert set(declined) <= {"CLAIM_DECLINE_REASON_QUOTA_EXHAUSTED", "CLAIM_DECLINE_REASON_PERSON_LIMIT_REACHED"}
    assert declined["CLAIM_DECLINE_REASON_QUOTA_EXHAUSTED"] > 0
    # Exactly the quota, and nobody twice.
    assert len(issued) == QUOTA
    assert len({outcome.id_number for outcome in issued}) == QUOTA
    assert len({outcome.redemption_code for outcome in issued}) == QUOTA
    for outcome in issued:
        assert outcome.consumer_key == consumer_key_of(outcome.id_number)
    # The counters agree with the answers.
    keys = environment.keys
    assert await redis.hget(keys.qualification_quota(campaign_id), "general:claimed") == str(QUOTA).encode()
    expiring = {code.decode() for code in await redis.zrange(keys.qualification_expiry, 0, -1)}
    assert {outcome.redemption_code for outcome in issued} <= expiring
    async with redis.pipeline(transaction=False) as pipe:
        for person in {outcome.id_number for outcome in outcomes}:
            pipe.hget(keys.qualification_holder(campaign_id, consumer_key_of(person)), "general")
        holdings = Counter(await pipe.execute())
    assert holdings == Counter({b"1": QUOTA, None: len({outcome.id_number for outcome in outcomes}) - QUOTA})
    # Every claim was logged at DEBUG, and no ID or phone number appears anywhere in the logs.
    log = log_path.read_text()
    assert log.count('"msg":"claim"') >= CLAIMS
    assert not ID_NUMBER.search(log)
    assert not PHONE_NUMBER.search(log)
    for person in people[:200]:
        assert consumer_key_of(person) not in log


async def test_expiry_returns_the_quota_exactly_once_when_racing_redemption(
    environment: Environment, redis: Redis, tmp_path: Path
) -> None:
    """300 qualifications valid for 3 s; each is redeemed at a random moment within 0.6 s either
    side of its expiry while both server processes sweep every 50 ms. Each ends either reserved
    by an approved payment or expired, never both; the quota comes back once per expiry, and
    once more for each payment voided after the qualification's validity passed."""
    count, validity_s = 300, 3
    campaign_id = await load_campaign(environment, count, validity_s)
    keys = environment.keys
    port = free_port()
    async with server_processes(environment, port, tmp_path / "server.log", sweep_interval_ms=50):
        target = f"127.0.0.1:{port}"
        one_attempt = RetryPolicy(max_attempts=1)
        async with (
            QualificationClient(
                target, "p-wallet-01", environment.credentials["p-wallet-01"], retry=one_attempt
            ) as app,
            AuthorizationClient(target, "t-main-01", environment.credentials["t-main-01"], retry=one_attempt) as till,
        ):
            people = [id_number() for _ in range(count)]
            location = common_pb2.Location(
                latitude=XIAOSHAN_GOVERNMENT[0],
                longitude=XIAOSHAN_GOVERNMENT[1],
                coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84,
                accuracy_m=10.0,
            )
            claims = await asyncio.gather(
                *(
                    app.claim(
                        campaign_id=campaign_id,
                        category="general",
                        id_number=person,
                        location=location,
                        fix_time_ms=int(time.time() * 1000),
                    )
                    for person in people
                )
            )
            assert all(claim.decision == qpb.CLAIM_DECISION_ISSUED for claim in claims)
            qualifications = [claim.qualification for claim in claims]

            async def redeem(person: str, qualification: qpb.Qualification) -> apb.AuthorizeResponse:
                moment_ms = qualification.expires_at.ToMilliseconds() + random.uniform(-600, 600)
                await asyncio.sleep(max(0.0, moment_ms / 1000 - time.time()))
                return await till.authorize(
                    campaign_id=campaign_id,
                    consumer_key=consumer_key_of(person),
                    lines=[Line("1", GOODS, 3_000)],
                    redemption_code=qualification.redemption_code,
                )

            answers = await asyncio.gather(*(redeem(p, q) for p, q in zip(people, qualifications, strict=True)))
            await asyncio.sleep(0.5)  # the sweepers' last round
            states = [await app.get(q.redemption_code) for q in qualifications]

            approved = [answer for answer in answers if answer.decision == apb.DECISION_APPROVED]
            assert approved and len(approved) < count, "the race did not straddle the expiry"
            reasons = Counter(
                apb.DeclineReason.Name(answer.decline_reason)
                for answer in answers
                if answer.decision == apb.DECISION_DECLINED
            )
            assert set(reasons) <= {"DECLINE_REASON_QUALIFICATION_EXPIRED", "DECLINE_REASON_QUALIFICATION_NOT_USABLE"}
            for answer, state in zip(answers, states, strict=True):
                if answer.decision == apb.DECISION_APPROVED:
                    assert state.state == qpb.QUALIFICATION_STATE_RESERVED
                    assert state.authorization_id == answer.authorization_id
                else:
                    assert state.state == qpb.QUALIFICATION_STATE_EXPIRED
            claimed = keys.qualification_quota(campaign_id)
            assert int(await redis.hget(claimed, "general:claimed") or 0) == len(approved)
            # Voided now, after their validity: each reserved qualification expires, once.
            for answer in approved:
                await till.void(answer.authorization_id)
                await till.void(answer.authorization_id)  # voiding again returns it as is
            assert int(await redis.hget(claimed, "general:claimed") or 0) == 0
            finals: dict[Any, int] = Counter([(await app.get(q.redemption_code)).state for q in qualifications])
            assert finals == {qpb.QUALIFICATION_STATE_EXPIRED: count}
            async with redis.pipeline(transaction=False) as pipe:
                for person in people:
                    pipe.hget(keys.qualification_holder(campaign_id, consumer_key_of(person)), "general")
                assert set(await pipe.execute()) == {b"0"}
