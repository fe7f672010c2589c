"""Counted, not assumed: one Redis command per Authorize, and no PostgreSQL on the hot path; one
script call per claim."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, QualificationClient
from subsidy_client.v1 import authorization_pb2 as pb
from subsidy_client.v1.common_pb2 import COORDINATE_SYSTEM_WGS84, Location

from server.processes.app import Application
from storage.devenv import Services
from tests.conftest import Environment, consumer_key, id_number, serial

AUTHORIZATIONS = 50


async def command_calls(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}


async def watch_commands(redis: Redis, sentinel: str, ready: asyncio.Event) -> list[dict[str, Any]]:
    """Every command Redis executes until the sentinel ECHO, via MONITOR."""
    seen: list[dict[str, Any]] = []
    async with redis.monitor() as monitor:
        ready.set()
        while True:
            command = await monitor.next_command()
            if sentinel in command["command"]:
                return seen
            seen.append(command)


async def test_authorize_is_exactly_one_redis_command(environment: Environment, client: AuthorizationClient) -> None:
    """50 authorizations (approvals and declines) cost exactly 50 client commands, all EVALSHA.

    INFO commandstats counts the EVALSHA calls (and, separately, the commands the script runs
    inside Redis); MONITOR shows which commands came from a client rather than from the script
    ("lua"), so nothing else travelled between gateway and Redis. The gateway's background tasks
    are idle in tests (hour-long intervals), and nothing else uses this Redis during the suite."""
    await client.authorize(campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", "6970000000024", 1000)])
    sentinel = "end-of-watch-" + uuid.uuid4().hex
    # The test's own probes (INFO, ECHO) go through one connection, opened before watching.
    probe = Redis.from_url(environment.redis_url, single_connection_client=True)
    ready = asyncio.Event()
    watcher_client = Redis.from_url(environment.redis_url)
    watcher = asyncio.create_task(watch_commands(watcher_client, sentinel, ready))
    await ready.wait()
    before = await command_calls(probe)
    decisions = []
    for index in range(AUTHORIZATIONS):
        gtin = "6970000000017" if index % 5 else "6970000000109"  # every fifth is declined
        response = await client.authorize(
            campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", gtin, 300_000, serial())]
        )
        decisions.append(response.decision)
    after = await command_calls(probe)
    # This run's gateway connections (conftest names them), so that other test runs sharing this
    # Redis do not count.
    gateway_name = f"gateway-{environment.prefix}"
    gateway_addresses = {entry["addr"] for entry in await probe.client_list() if entry.get("name") == gateway_name}
    await probe.echo(sentinel)
    commands = await asyncio.wait_for(watcher, timeout=10)
    await watcher_client.aclose()
    await probe.aclose()
    # Other test runs may share this Redis: commandstats counts theirs too, MONITOR below tells
    # this gateway's connections apart.
    assert after["evalsha"] - before["evalsha"] >= AUTHORIZATIONS
    from_clients = [
        entry["command"].split()[0].upper()
        for entry in commands
        if entry["client_type"] != "lua" and f"{entry['client_address']}:{entry['client_port']}" in gateway_addresses
    ]
    assert from_clients == ["EVALSHA"] * AUTHORIZATIONS
    scripted = [entry for entry in commands if entry["client_type"] == "lua"]
    assert scripted, "MONITOR should also show the commands the script ran inside Redis"
    assert decisions.count(pb.DECISION_DECLINED) == AUTHORIZATIONS // 5


async def test_authorize_touches_no_postgres(
    services: Services, environment: Environment, client: AuthorizationClient
) -> None:
    """While authorizations are answered, the gateway's database sees no query: no session opens,
    none of those already connected runs anything (its state_change stays put), and the
    database's transaction counters do not move.

    Sessions may already be connected: the session-wide gateway keeps an idle pool connection
    after RPCs that do read PostgreSQL (a qualification listing, for one) ran in an earlier test
    module. PostgreSQL counts an idle session's transactions only when it flushes its pending
    statistics, at the latest PGSTAT_IDLE_INTERVAL (10 s) after it went idle; the test waits
    until every connected session has been idle that long, so that no earlier transaction is
    counted inside the window."""
    database = urlsplit(environment.pg_dsn).path.lstrip("/")
    admin = await asyncpg.connect(services.pg_dsn, timeout=10)
    try:

        async def activity() -> tuple[int, dict[int, tuple[str, Any]], float]:
            await admin.execute("SELECT pg_stat_clear_snapshot()")
            transactions = await admin.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", database
            )
            rows = await admin.fetch(
                "SELECT pid, state, state_change, extract(epoch FROM now() - state_change) AS idle_s"
                " FROM pg_stat_activity WHERE datname = $1",
                database,
            )
            sessions = {row["pid"]: (row["state"], row["state_change"]) for row in rows}
            least_idle = min((float(row["idle_s"]) for row in rows), default=math.inf)
            return int(transactions), sessions, least_idle

        before = await activity()
        if before[2] < 11:
            await asyncio.sleep(11 - before[2])
            before = await activity()
        assert all(state == "idle" for state, _ in before[1].values()), before[1]
        for _ in range(AUTHORIZATIONS):
            response = await client.authorize(
                campaign_id="c-main",
                consumer_key=consumer_key(),
                lines=[Line("1", "6970000000017", 300_000, serial())],
            )
            assert response.decision == pb.DECISION_APPROVED
        during = await activity()
    finally:
        await admin.close()
    assert during[1] == before[1]
    assert during[0] == before[0]


async def test_authorize_survives_a_script_cache_flush(redis: Redis, client: AuthorizationClient) -> None:
    """After Redis forgets its scripts (a restart, SCRIPT FLUSH), the next calls answer NOSCRIPT
    and are retried with the script reloaded: concurrent authorizations still succeed."""
    await redis.script_flush()
    responses = await asyncio.gather(
        *(
            client.authorize(
                campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", "6970000000017", 300_000, serial())]
            )
            for _ in range(5)
        )
    )
    assert [response.decision for response in responses] == [pb.DECISION_APPROVED] * 5


async def test_a_claim_is_one_script_call(environment: Environment, gateway: Application) -> None:
    """30 claims cost 30 EVALSHA of the claim script; besides them only the campaign's location
    rules are read (one HMGET, cached for a second per process). The EVALSHAs all come from the
    lean client's connection (SUBSIDY_REDIS_CLIENT=lean, the default): claims, the flash crowd's
    call, take the same lean path as Authorize, not redis-py's pool."""
    async with QualificationClient(
        f"127.0.0.1:{gateway.port}", "p-wallet-01", environment.credentials["p-wallet-01"]
    ) as wallet:

        async def claim() -> None:
            await wallet.claim(
                campaign_id="c-qual",
                category="general",
                id_number=id_number(),
                location=Location(
                    latitude=30.18, longitude=120.26, coordinate_system=COORDINATE_SYSTEM_WGS84, accuracy_m=9
                ),
                fix_time_ms=int(time.time() * 1000),
            )

        await claim()
        sentinel = "end-of-watch-" + uuid.uuid4().hex
        probe = Redis.from_url(environment.redis_url, single_connection_client=True)
        ready = asyncio.Event()
        watcher_client = Redis.from_url(environment.redis_url)
        watcher = asyncio.create_task(watch_commands(watcher_client, sentinel, ready))
        await ready.wait()
        started = time.monotonic()
        for _ in range(30):
            await claim()
        elapsed_s = time.monotonic() - started
        gateway_name = f"gateway-{environment.prefix}"
        gateway_addresses = {entry["addr"] for entry in await probe.client_list() if entry.get("name") == gateway_name}
        await probe.echo(sentinel)
        commands = await asyncio.wait_for(watcher, timeout=10)
        await watcher_client.aclose()
        await probe.aclose()
    from_clients = Counter(
        entry["command"].split()[0].upper()
        for entry in commands
        if entry["client_type"] != "lua" and f"{entry['client_address']}:{entry['client_port']}" in gateway_addresses
    )
    assert from_clients["EVALSHA"] == 30
    assert set(from_clients) <= {"EVALSHA", "HMGET"}
    assert gateway.lean is not None and gateway.lean.connection is not None
    lean_address = gateway.lean.connection.local_address
    assert lean_address in gateway_addresses
    script_senders = Counter(
        f"{entry['client_address']}:{entry['client_port']}"
        for entry in commands
        if entry["client_type"] != "lua" and entry["command"].split()[0].upper() == "EVALSHA"
    )
    assert script_senders[lean_address] == 30
    assert from_clients["HMGET"] <= math.ceil(elapsed_s) + 1
