"""Redis killed with SIGKILL in the middle of the load and started again on its AOF
(``appendfsync always``), under the gateway's lean Redis path: the calls in flight fail with
UNAVAILABLE, the clients retry with the same request_id, the gateway reconnects and reloads its
scripts, and afterwards every approval a client was told of exists, none twice, and the budget
adds up to the fen. And Redis stalled (SIGSTOP) past the timeout: UNAVAILABLE, then the same
request acts once. A Redis of the test's own (its own port and data directory): the shared one
is never killed or stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import asyncpg
import grpc
import orjson
import pytest
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, RetryPolicy
from subsidy_client.errors import SubsidyError
from subsidy_client.v1 import authorization_pb2 as pb

from benchmarks.services import redis_binary
from storage.cluster_dev import free_port
from storage.postgres.reference import fetch_reference
from storage.redis.reference import publish_reference
from tests.conftest import Environment, consumer_key, running_gateway, serial

CALLS = 300
IN_FLIGHT = 16
SUBSIDY_FEN = 60_000  # 20% of 300,000 fen, grade 1 fridge in c-main


class OwnRedis:
    """A redis-server on a fixed port and data directory, so that a restart finds its AOF."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                redis_binary(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


async def wait_ready(url: str) -> None:
    client = Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                if await client.ping():
                    return
            except Exception:  # refused, or LOADING while it replays the AOF
                await asyncio.sleep(0.05)
        raise AssertionError(f"redis at {url} did not answer")
    finally:
        await client.aclose()


@contextmanager
def own_redis(directory: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(directory)
    try:
        yield server
    finally:
        server.stop()


async def test_redis_killed_mid_load_loses_and_doubles_nothing(environment: Environment, tmp_path: Path) -> None:
    with own_redis(tmp_path) as server:
        server.start()
        await wait_ready(server.url)
        env = replace(environment, redis_url=server.url)
        redis = Redis.from_url(server.url)
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            await publish_reference(redis, env.keys, await fetch_reference(connection))
        finally:
            await connection.close()
        config = env.config(redis_timeout_s=1.0)
        assert config.redis_client == "lean"
        async with running_gateway(config) as gateway:
            assert gateway.lean is not None
            async with AuthorizationClient(
                f"127.0.0.1:{gateway.port}",
                "t-main-01",
                env.credentials["t-main-01"],
                deadline_s=5,
                retry=RetryPolicy(max_attempts=30, backoff_initial_s=0.05, backoff_max_s=0.3, total_budget_s=60),
            ) as client:
                pending = iter(range(CALLS))
                answers: list[pb.AuthorizeResponse] = []
                a_third_answered = asyncio.Event()

                async def worker() -> None:
                    for _ in pending:
                        answers.append(
                            await client.authorize(
                                campaign_id="c-main",
                                consumer_key=consumer_key(),
                                lines=[Line("1", "6970000000017", 300_000, serial())],
                            )
                        )
                        if len(answers) >= CALLS // 3:
                            a_third_answered.set()

                load = asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
                await a_third_answered.wait()
                server.kill()
                killed_after = len(answers)
                await asyncio.sleep(0.3)
                server.start()
                await load
            assert killed_after < CALLS
            # The gateway lost its connection and made a new one (at least one more).
            assert gateway.lean.connections >= 2
        approved = [answer for answer in answers if answer.decision == pb.DECISION_APPROVED]
        assert len(answers) == CALLS and len(approved) == CALLS
        await wait_ready(server.url)
        await redis.aclose()
        redis = Redis.from_url(server.url)
        try:
            keys = env.keys
            budget = await redis.hgetall(keys.budget("c-main"))
            assert int(budget[b"fridge:reserved"]) == CALLS * SUBSIDY_FEN
            events = [orjson.loads(fields[b"e"]) for _, fields in await redis.xrange(keys.ledger)]
            authorized = [event["authorization_id"] for event in events if event["type"] == "AUTHORIZED"]
            assert sorted(authorized) == sorted(answer.authorization_id for answer in approved)
            for answer in approved[:50]:
                assert await redis.hget(keys.authorization(answer.authorization_id), "state") == b"PENDING"
        finally:
            await redis.aclose()


async def test_a_stalled_redis_times_out_as_unavailable_and_the_retry_acts_once(
    environment: Environment, tmp_path: Path
) -> None:
    """Redis stopped (SIGSTOP) longer than SUBSIDY_REDIS_TIMEOUT_S: the call answers UNAVAILABLE
    with reason DEPENDENCY_UNAVAILABLE (the lean client's timeout, not the client's deadline), and
    the gateway drops the connection. Redis continued (SIGCONT): the same request_id, sent again,
    is approved, and the ledger holds one AUTHORIZED event for it whether or not the stalled
    attempt ran."""
    with own_redis(tmp_path) as server:
        server.start()
        await wait_ready(server.url)
        env = replace(environment, redis_url=server.url)
        redis = Redis.from_url(server.url)
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            await publish_reference(redis, env.keys, await fetch_reference(connection))
        finally:
            await connection.close()
        async with running_gateway(env.config(redis_timeout_s=0.5)) as gateway:
            assert gateway.lean is not None
            async with AuthorizationClient(
                f"127.0.0.1:{gateway.port}",
                "t-main-01",
                env.credentials["t-main-01"],
                deadline_s=5,
                retry=RetryPolicy(max_attempts=1),
            ) as client:
                request = {
                    "campaign_id": "c-main",
                    "consumer_key": consumer_key(),
                    "lines": [Line("1", "6970000000017", 300_000, serial())],
                    "request_id": str(uuid.uuid4()),
                }
                warm = await client.authorize(
                    campaign_id="c-main",
                    consumer_key=consumer_key(),
                    lines=[Line("1", "6970000000017", 300_000, serial())],
                )
                assert warm.decision == pb.DECISION_APPROVED
                assert server.process is not None
                os.kill(server.process.pid, signal.SIGSTOP)
                try:
                    with pytest.raises(SubsidyError) as raised:
                        await client.authorize(**request)  # type: ignore[arg-type]
                finally:
                    os.kill(server.process.pid, signal.SIGCONT)
                assert raised.value.code == grpc.StatusCode.UNAVAILABLE
                assert raised.value.reason == "DEPENDENCY_UNAVAILABLE"
                again = await client.authorize(**request)  # type: ignore[arg-type]
                assert again.decision == pb.DECISION_APPROVED
            assert gateway.lean.connections == 2
        events = [orjson.loads(fields[b"e"]) for _, fields in await redis.xrange(env.keys.ledger)]
        mine = [event for event in events if event["authorization_id"] == again.authorization_id]
        assert [event["type"] for event in mine] == ["AUTHORIZED"]
        assert sum(event["type"] == "AUTHORIZED" for event in events) == 2
        await redis.aclose()
