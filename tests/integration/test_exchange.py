"""Cross-provider checks: our daily file carries exactly what we subsidised, a peer's file makes
the gateway decline the same device, a bad file changes nothing, and the online checks answer
from this gateway's own state only.

Two gateways, each with its own database and Redis prefix, play two service providers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, RetryPolicy
from subsidy_client.client import SignedClient
from subsidy_client.errors import InvalidArgument, PermissionDenied
from subsidy_client.v1 import authorization_pb2 as pb
from subsidy_client.v1 import exchange_pb2

from server.commands.exchange import CHINA_STANDARD_TIME, export_day, import_file, reapply
from server.domain import exchange_file
from server.domain.exchange_file import ConsumerRecord, ExchangeFileError, SerialRecord
from server.processes.app import Application
from storage.devenv import Services
from storage.postgres.writer import LedgerWriter, WriterConfig
from tests.conftest import ROOT, Environment, consumer_key, isolated_environment, running_gateway, serial, snapshot

KEY = b"exchange-key-shared-by-providers-0123"
FRIDGE_G1 = "6970000000017"  # serial required
WASHER = "6970000000093"
AIR_CONDITIONER = "6970000000116"  # serial required
PEER_ID = "p-peer-01"  # the other provider: its id in files, and its credential in reference.yaml
OURS_ID = "p-ours"
EXCHANGE = "/subsidy.v1.ExchangeService/"


@dataclass
class Provider:
    """One service provider: its environment, gateway, a terminal client, Redis and a pool."""

    env: Environment
    gateway: Application
    client: AuthorizationClient
    redis: Redis
    pool: asyncpg.Pool

    async def sell(self, person: str, lines: list[Line]) -> str:
        approved = await self.client.authorize(campaign_id="c-main", consumer_key=person, lines=lines)
        assert approved.decision == pb.DECISION_APPROVED
        await self.client.capture(approved.authorization_id)
        return approved.authorization_id

    async def drain_ledger(self) -> None:
        config = WriterConfig(pg_dsn=self.env.pg_dsn, redis_url=self.env.redis_url, prefix=self.env.prefix)
        writer = LedgerWriter(config, self.redis)
        try:
            await writer.drain()
        finally:
            await writer.close()

    async def import_(self, data: bytes) -> dict[str, object]:
        summary = await import_file(self.pool, self.redis, self.env.keys, KEY, data, own_provider_id="local")
        return asdict(summary)

    async def state(self) -> tuple[object, ...]:
        """Everything an import could change: the Redis keys and the exchange tables."""
        row = await self.pool.fetchrow(
            "SELECT (SELECT count(*) FROM exchange_files) AS files,"
            " (SELECT count(*) FROM exchange_consumers) AS consumers,"
            " (SELECT count(*) FROM exchange_serials) AS serials"
        )
        return await snapshot(self.redis, self.env.keys), tuple(row.values())


@asynccontextmanager
async def provider(services: Services) -> AsyncIterator[Provider]:
    async with isolated_environment(services) as env, running_gateway(env.config()) as gateway:
        client = AuthorizationClient(
            f"127.0.0.1:{gateway.port}", "t-main-01", env.credentials["t-main-01"], retry=RetryPolicy(max_attempts=1)
        )
        redis = Redis.from_url(env.redis_url)
        pool = await asyncpg.create_pool(env.pg_dsn, min_size=1, max_size=2)
        try:
            yield Provider(env, gateway, client, redis, pool)
        finally:
            await pool.close()
            await redis.aclose()
            await client.close()


@pytest.fixture(scope="module")
async def ours(services: Services) -> AsyncIterator[Provider]:
    async with provider(services) as made:
        yield made


@pytest.fixture(scope="module")
async def peer(services: Services) -> AsyncIterator[Provider]:
    async with provider(services) as made:
        yield made


@dataclass(frozen=True)
class Exported:
    data: bytes
    day: date
    person: str
    device: str


@pytest.fixture(scope="module")
async def exported(ours: Provider) -> Exported:
    """Our file of today, after a day with one sale kept (its washer line refunded), one sale
    fully refunded and one hold never captured."""
    person, device = consumer_key(), serial()
    sold = await ours.sell(person, [Line("f", FRIDGE_G1, 300_000, device.lower()), Line("w", WASHER, 150_000)])
    await ours.client.refund(sold, ["w"])
    await ours.client.refund(await ours.sell(consumer_key(), [Line("f", FRIDGE_G1, 300_000, serial())]))
    pending = await ours.client.authorize(
        campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("f", FRIDGE_G1, 300_000, serial())]
    )
    assert pending.decision == pb.DECISION_APPROVED
    await ours.drain_ledger()
    # The day of the capture itself, so a test running across midnight in Beijing still holds.
    captured_at = await ours.pool.fetchval(
        "SELECT occurred_at FROM ledger_events WHERE authorization_id = $1 AND event_type = 'CAPTURED'", sold
    )
    day = captured_at.astimezone(CHINA_STANDARD_TIME).date()
    return Exported(await export_day(ours.pool, OURS_ID, KEY, day), day, person, device)


def peer_file(consumers: list[ConsumerRecord], serials: list[SerialRecord]) -> bytes:
    return exchange_file.encode(PEER_ID, date(2026, 3, 1), consumers, serials, KEY)


async def test_export_carries_captured_unrefunded_lines_only(ours: Provider, exported: Exported) -> None:
    """The day's file lists the consumer (per category) and the serial, upper case, of each
    captured line not refunded: not a hold, not a refunded line; keys and serials only."""
    parsed = exchange_file.parse(exported.data, KEY)
    assert (parsed.provider_id, parsed.day) == (OURS_ID, exported.day)
    assert parsed.consumers == (ConsumerRecord(exported.person, "fridge"),)
    assert parsed.serials == (SerialRecord(FRIDGE_G1, exported.device),)
    for line in exported.data.splitlines()[1:-1]:
        assert set(json.loads(line)) <= {"kind", "consumer_key", "category", "gtin", "serial"}
    before = exchange_file.parse(await export_day(ours.pool, OURS_ID, KEY, exported.day - timedelta(days=1)), KEY)
    assert before.consumers == () and before.serials == ()


async def test_imported_serial_is_declined_at_the_peer(peer: Provider, exported: Exported) -> None:
    """After importing our file, the peer's gateway declines the same device, whoever buys it,
    and the same consumer in the same category, whatever the device."""
    summary = await peer.import_(exported.data)
    assert summary["already_imported"] is False
    assert (summary["new_consumers"], summary["new_serials"]) == (1, 1)
    keys = peer.env.keys
    assert await peer.redis.get(keys.serial(exported.device)) == f"peer:{OURS_ID}".encode()
    assert await peer.redis.hgetall(keys.external_consumer(exported.person)) == {b"fridge": OURS_ID.encode()}
    declined = await peer.client.authorize(
        campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("f", FRIDGE_G1, 300_000, exported.device)]
    )
    assert declined.decision == pb.DECISION_DECLINED
    assert declined.decline_reason == pb.DECLINE_REASON_SERIAL_ALREADY_SUBSIDISED
    used_elsewhere = await peer.client.authorize(
        campaign_id="c-main", consumer_key=exported.person, lines=[Line("f", FRIDGE_G1, 300_000, serial())]
    )
    assert used_elsewhere.decision == pb.DECISION_DECLINED
    assert used_elsewhere.decline_reason == pb.DECLINE_REASON_CONSUMER_USED_ELSEWHERE


async def test_reimport_changes_nothing(peer: Provider, exported: Exported) -> None:
    """Importing the same file again adds no row and changes no key."""
    await peer.import_(exported.data)
    before = await peer.state()
    summary = await peer.import_(exported.data)
    assert summary["already_imported"] is True
    assert (summary["new_consumers"], summary["new_serials"]) == (0, 0)
    assert await peer.state() == before


async def test_tampered_or_own_file_changes_nothing(peer: Provider, exported: Exported) -> None:
    """A file altered by one byte, signed with another key, or carrying our own provider id is
    refused whole: no row, no key."""
    fresh = peer_file([ConsumerRecord(consumer_key(), "tv")], [SerialRecord(FRIDGE_G1, serial())])
    tampered = fresh.replace(b'"tv"', b'"tw"')
    other_key = exchange_file.encode(PEER_ID, date(2026, 3, 1), [], [SerialRecord(FRIDGE_G1, serial())], b"x" * 32)
    own = exchange_file.encode("local", date(2026, 3, 1), [], [SerialRecord(FRIDGE_G1, serial())], KEY)
    before = await peer.state()
    for data, message in ((tampered, "signature"), (other_key, "signature"), (own, "own provider id")):
        with pytest.raises(ExchangeFileError, match=message):
            await peer.import_(data)
    assert await peer.state() == before


async def test_a_device_we_subsidised_keeps_our_record(peer: Provider) -> None:
    """When a peer reports a device or consumer we subsidised too, our authorization keeps the
    serial key, and the import reports the overlap for follow-up."""
    person, device = consumer_key(), serial()
    authorization_id = await peer.sell(person, [Line("f", FRIDGE_G1, 300_000, device)])
    summary = await peer.import_(
        peer_file([ConsumerRecord(person, "fridge")], [SerialRecord(FRIDGE_G1, device), SerialRecord(WASHER, "W1")])
    )
    assert summary["serials_also_local"] == [f"{FRIDGE_G1}:{device}"]
    assert summary["consumers_also_local"] == 1
    assert await peer.redis.get(peer.env.keys.serial(device)) == authorization_id.encode()
    assert await peer.redis.get(peer.env.keys.serial("W1")) == f"peer:{PEER_ID}".encode()


async def test_reapply_restores_imported_records_after_a_redis_loss(peer: Provider) -> None:
    """The exchange tables are the record: reapply writes every imported fact back to Redis and
    leaves our own serials alone."""
    person, device, ours_device = consumer_key(), serial(), serial()
    authorization_id = await peer.sell(consumer_key(), [Line("a", AIR_CONDITIONER, 300_000, ours_device)])
    await peer.import_(
        peer_file(
            [ConsumerRecord(person, "tv")],
            [SerialRecord(FRIDGE_G1, device), SerialRecord(AIR_CONDITIONER, ours_device)],
        )
    )
    keys = peer.env.keys
    await peer.redis.delete(keys.external_consumer(person), keys.serial(device))
    summary = await reapply(peer.pool, peer.redis, keys)
    assert summary.consumers >= 1 and summary.serials >= 2
    assert await peer.redis.hget(keys.external_consumer(person), "tv") == PEER_ID.encode()
    assert await peer.redis.get(keys.serial(device)) == f"peer:{PEER_ID}".encode()
    assert await peer.redis.get(keys.serial(ours_device)) == authorization_id.encode()


async def run_cli(
    env: Environment, *arguments: str, provider_id: str = "local", exchange_key: bytes = KEY
) -> tuple[int, str, str]:
    """``subsidyctl --json exchange`` as an operator runs it: (exit status, stdout, stderr)."""
    variables = {
        **os.environ,
        "SUBSIDY_PG_DSN": env.pg_dsn,
        "SUBSIDY_REDIS_URL": env.redis_url,
        "SUBSIDY_REDIS_PREFIX": env.prefix,
        "SUBSIDY_PROVIDER_ID": provider_id,
        "SUBSIDY_EXCHANGE_KEY": exchange_key.decode(),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from server.ctl import main; main()",
        "--json",
        "exchange",
        *arguments,
        cwd=ROOT,
        env=variables,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_export_then_import(ours: Provider, peer: Provider, exported: Exported, tmp_path: Path) -> None:
    """``export`` writes the same file as export_day; ``import`` takes it (exit 0) and refuses
    a tampered copy (exit 1) without importing it; a missing key is a usage error (exit 2)."""
    path = tmp_path / "ours.jsonl"
    status, stdout, _ = await run_cli(
        ours.env, "export", "--date", exported.day.isoformat(), "--output", str(path), provider_id=OURS_ID
    )
    assert status == 0
    assert path.read_bytes() == exported.data
    assert json.loads(stdout)["consumers"] == 1
    status, stdout, _ = await run_cli(peer.env, "import", str(path))
    assert status == 0
    assert json.loads(stdout)[0]["provider"] == OURS_ID
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(exported.data.replace(exported.device.encode(), b"SN0000000000000000"))
    before = await peer.state()
    status, stdout, stderr = await run_cli(peer.env, "import", str(tampered))
    assert status == 1
    assert "rejected, nothing imported" in stderr and "signature does not match" in stderr
    assert await peer.state() == before
    status, _, stderr = await run_cli(peer.env, "import", str(path), exchange_key=b"")
    assert status == 2
    assert "SUBSIDY_EXCHANGE_KEY" in stderr


@asynccontextmanager
async def provider_client(environment: Provider, caller_id: str = PEER_ID) -> AsyncIterator[SignedClient]:
    client = SignedClient(
        f"127.0.0.1:{environment.gateway.port}",
        caller_id,
        environment.env.credentials[caller_id],
        retry=RetryPolicy(max_attempts=1),
    )
    try:
        yield client
    finally:
        await client.close()


async def check_serial(client: SignedClient, gtin: str, serial_number: str) -> bool:
    request = exchange_pb2.CheckSerialRequest(gtin=gtin, serial_number=serial_number)
    response = await client._call(EXCHANGE + "CheckSerial", request, exchange_pb2.CheckSerialResponse)
    return response.subsidised


async def check_consumer(client: SignedClient, person: str, category: str) -> bool:
    request = exchange_pb2.CheckConsumerRequest(consumer_key=person, category=category)
    response = await client._call(EXCHANGE + "CheckConsumer", request, exchange_pb2.CheckConsumerResponse)
    return response.used


async def test_check_serial_reports_our_own_subsidies_only(peer: Provider) -> None:
    """CheckSerial answers true for a device one of our authorizations holds (whatever its case),
    false for one a peer reported to us, and false again once ours is refunded."""
    ours_device, reported = serial(), serial()
    authorization_id = await peer.sell(consumer_key(), [Line("f", FRIDGE_G1, 300_000, ours_device)])
    await peer.import_(peer_file([], [SerialRecord(FRIDGE_G1, reported)]))
    async with provider_client(peer) as client:
        assert await check_serial(client, FRIDGE_G1, ours_device.lower()) is True
        assert await check_serial(client, FRIDGE_G1, reported) is False
        assert await check_serial(client, FRIDGE_G1, serial()) is False
        await peer.client.refund(authorization_id)
        assert await check_serial(client, FRIDGE_G1, ours_device) is False


async def test_check_consumer_reads_usage_across_campaigns(peer: Provider) -> None:
    """CheckConsumer is true while the consumer holds or bought a unit of the category in any
    campaign, false for another category, for a consumer a peer reported, and after a refund."""
    person, reported = consumer_key(), consumer_key()
    authorization_id = await peer.sell(person, [Line("w", WASHER, 150_000)])
    await peer.import_(peer_file([ConsumerRecord(reported, "washer")], []))
    async with provider_client(peer) as client:
        assert await check_consumer(client, person, "washer") is True
        assert await check_consumer(client, person, "fridge") is False
        assert await check_consumer(client, reported, "washer") is False
        await peer.client.refund(authorization_id)
        assert await check_consumer(client, person, "washer") is False


@pytest.mark.parametrize(
    ("method", "request_message", "field"),
    [
        ("CheckConsumer", exchange_pb2.CheckConsumerRequest(consumer_key="A" * 64, category="fridge"), "consumer_key"),
        ("CheckConsumer", exchange_pb2.CheckConsumerRequest(consumer_key="a" * 64, category=""), "category"),
        ("CheckConsumer", exchange_pb2.CheckConsumerRequest(consumer_key="a" * 64, category="yacht"), "category"),
        ("CheckSerial", exchange_pb2.CheckSerialRequest(gtin="6970000000018", serial_number="SN1"), "gtin"),
        ("CheckSerial", exchange_pb2.CheckSerialRequest(gtin=FRIDGE_G1, serial_number=""), "serial_number"),
        ("CheckSerial", exchange_pb2.CheckSerialRequest(gtin=FRIDGE_G1, serial_number="S" * 65), "serial_number"),
        ("CheckSerial", exchange_pb2.CheckSerialRequest(gtin=FRIDGE_G1, serial_number="SN 1"), "serial_number"),
    ],
)
async def test_bad_check_requests_name_the_field(
    peer: Provider, method: str, request_message: exchange_pb2.CheckSerialRequest, field: str
) -> None:
    async with provider_client(peer) as client:
        response_type = getattr(exchange_pb2, method + "Response")
        with pytest.raises(InvalidArgument) as raised:
            await client._call(EXCHANGE + method, request_message, response_type)
    assert raised.value.metadata["field"] == field


async def test_checks_are_for_provider_credentials_only(peer: Provider) -> None:
    """A terminal (or any caller that is not a provider) is refused."""
    async with provider_client(peer, "t-main-01") as client:
        with pytest.raises(PermissionDenied):
            await check_serial(client, FRIDGE_G1, serial())
