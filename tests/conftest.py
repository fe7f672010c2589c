"""Shared fixtures: real PostgreSQL and Redis, an isolated database and key prefix per run,
the test reference data, and an in-process gateway bound to an ephemeral port.

PostgreSQL and Redis are found the way ``make run`` finds them (storage/devenv.py): the
SUBSIDY_* variables, else the local default ports, else embedded servers under .data/test.
Each run creates its own database and its own Redis key prefix and removes both at the end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, RetryPolicy

from server.config import Config
from server.domain.identity import check_digit
from server.domain.identity import consumer_key as derive_consumer_key
from server.domain.reference import parse_reference
from server.processes.app import Application, create_server
from storage.devenv import DevServices, Services
from storage.postgres.migrate import migrate
from storage.postgres.reference import fetch_reference, save_reference
from storage.redis.keys import Keys
from storage.redis.reference import publish_reference

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_FILE = ROOT / "tests" / "fixtures" / "reference.yaml"
# The programme key of the test gateways (consumer key = HMAC-SHA256 of the ID number under it).
PROGRAMME_KEY = "test-programme-key-0123456789abcdef0123456789"
# The test gateways' own key for masked personal data at rest (docs/privacy.md).
LOCAL_DATA_KEY = "test-local-data-key-not-the-programme-key-0123"


@dataclass(frozen=True)
class Environment:
    pg_dsn: str
    redis_url: str
    prefix: str
    credentials: dict[str, str]

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def config(self, **overrides: Any) -> Config:
        base = Config(
            listen="127.0.0.1:0",
            pg_dsn=self.pg_dsn,
            redis_url=self.redis_url,
            redis_prefix=self.prefix,
            hold_ttl_s=600,
            # Background work is slow by default so that command counts stay exact; tests of
            # expiry start their own gateway with a fast sweeper.
            sweep_interval_ms=3_600_000,
            credentials_refresh_ms=3_600_000,
            shutdown_grace_s=1.0,
            log_level="WARNING",
            programme_key=PROGRAMME_KEY,
            # Tells this run's gateway connections apart in CLIENT LIST (other runs may share Redis).
            redis_client_name=f"gateway-{self.prefix}",
            local_data_key=LOCAL_DATA_KEY,
        )
        return replace(base, **overrides)


def with_database(dsn: str, database: str) -> str:
    from server.commands.dev import with_database as swap

    return swap(dsn, database)


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    (ROOT / ".data").mkdir(exist_ok=True)
    with DevServices(ROOT / ".data" / "test") as found:
        yield found


@asynccontextmanager
async def isolated_environment(services: Services) -> AsyncIterator[Environment]:
    """A database and a Redis key prefix of their own, with the test reference data loaded;
    both removed afterwards."""
    database = f"subsidy_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(services.pg_dsn, timeout=10)
    await admin.execute(f'CREATE DATABASE "{database}"')
    prefix = f"test{secrets.token_hex(4)}"
    pg_dsn = with_database(services.pg_dsn, database)
    env = Environment(pg_dsn=pg_dsn, redis_url=services.redis_url, prefix=prefix, credentials={})
    try:
        credentials = await load_document(env, yaml.safe_load(REFERENCE_FILE.read_text()))
        yield replace(env, credentials=credentials)
    finally:
        redis = Redis.from_url(services.redis_url)
        doomed = [key async for key in redis.scan_iter(match=Keys(prefix).pattern(), count=10_000)]
        for start in range(0, len(doomed), 1000):
            await redis.unlink(*doomed[start : start + 1000])
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def environment(services: Services) -> AsyncIterator[Environment]:
    async with isolated_environment(services) as env:
        yield env


async def load_document(env: Environment, document: dict[str, Any]) -> dict[str, str]:
    """Loads reference data into the run's database and publishes it to its Redis prefix."""
    connection = await asyncpg.connect(env.pg_dsn, timeout=10)
    redis = Redis.from_url(env.redis_url)
    try:
        await migrate(connection)
        credentials = await save_reference(connection, parse_reference(document))
        await publish_reference(redis, env.keys, await fetch_reference(connection))
    finally:
        await connection.close()
        await redis.aclose()
    return credentials


@asynccontextmanager
async def running_gateway(config: Config) -> AsyncIterator[Application]:
    application = await create_server(config)
    await application.start()
    try:
        yield application
    finally:
        await application.stop()


@pytest.fixture(scope="session")
async def gateway(environment: Environment) -> AsyncIterator[Application]:
    async with running_gateway(environment.config()) as application:
        yield application


@pytest.fixture(scope="session")
async def redis(environment: Environment) -> AsyncIterator[Redis]:
    client = Redis.from_url(environment.redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def clients(environment: Environment, gateway: Application) -> AsyncIterator[dict[str, AuthorizationClient]]:
    """One client per test terminal, keyed by terminal id; no retries, so each call is one attempt."""
    made = {
        terminal: AuthorizationClient(
            f"127.0.0.1:{gateway.port}", terminal, secret, deadline_s=5.0, retry=RetryPolicy(max_attempts=1)
        )
        for terminal, secret in environment.credentials.items()
    }
    yield made
    await asyncio.gather(*(client.close() for client in made.values()))


@pytest.fixture
def client(clients: dict[str, AuthorizationClient]) -> AuthorizationClient:
    return clients["t-main-01"]


def consumer_key() -> str:
    """A fresh consumer key (what a partner app derives from an ID number), unique per call."""
    return secrets.token_hex(32)


_ID_NUMBERS_GIVEN: set[str] = set()


def id_number() -> str:
    """A fresh, valid resident ID number (Hangzhou region code, a real birth date, a random
    sequence and the GB 11643 check character), never the same twice in a test process: the
    numbers come from about 18 million, so a flash crowd's 2,400 random draws repeated one about
    one run in six, and a test counting distinct people was then one short."""
    while True:
        born = date(1950, 1, 1) + timedelta(days=secrets.randbelow(365 * 50))
        first = f"330109{born:%Y%m%d}{secrets.randbelow(1000):03d}"
        number = first + check_digit(first)
        if number not in _ID_NUMBERS_GIVEN:
            _ID_NUMBERS_GIVEN.add(number)
            return number


def consumer_key_of(number: str) -> str:
    """The consumer key the test gateways derive from an ID number."""
    return derive_consumer_key(PROGRAMME_KEY.encode(), number)


def serial() -> str:
    return "SN" + uuid.uuid4().hex[:16].upper()


class Snapshot(dict[bytes, Any]):
    """Every key of the run and its logical value (``snapshot()``), compared knowing Redis's
    expiry: two snapshots are equal when the keys both hold have the same values and each key
    only one holds had run out its TTL by the time the other was taken. A nonce an earlier test
    wrote 11 minutes before (on a busy machine) lapses between the two snapshots of a "change
    nothing" check; that is Redis's expiry, not a write of the call under test. A key the call
    writes or changes still makes them differ."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, values: dict[bytes, Any], deadlines_ms: dict[bytes, int], taken_ms: int) -> None:
        super().__init__(values)
        self.deadlines_ms = deadlines_ms  # the keys with a TTL: when they expire
        self.taken_ms = taken_ms  # when the snapshot was complete

    def without(self, prefix: bytes) -> Snapshot:
        """The snapshot without the keys starting with ``prefix``."""
        kept = {key: value for key, value in self.items() if not key.startswith(prefix)}
        return Snapshot(kept, self.deadlines_ms, self.taken_ms)

    def changed(self, later: Snapshot) -> set[bytes]:
        """The keys written, changed or deleted between this snapshot and ``later``; a key that
        ran out its TTL in between is not counted."""
        differ = {key for key in self.keys() & later.keys() if self[key] != later[key]}
        gone = {key for key in self.keys() - later.keys() if not self._expired_by(key, later)}
        return differ | gone | (later.keys() - self.keys())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Snapshot):
            return dict.__eq__(self, other)
        earlier, later = (self, other) if self.taken_ms <= other.taken_ms else (other, self)
        return not earlier.changed(later)

    def _expired_by(self, key: bytes, other: Snapshot) -> bool:
        deadline = self.deadlines_ms.get(key)
        return deadline is not None and deadline <= other.taken_ms + SNAPSHOT_CLOCK_MS

    def __ne__(self, other: object) -> bool:
        return not self == other


# How far apart the test's clock and Redis's expiry may be when judging that a key lapsed.
SNAPSHOT_CLOCK_MS = 1_000


async def snapshot(redis: Redis, keys: Keys) -> Snapshot:
    """Every key of the run and its logical value, to prove a call changed nothing (compare two
    with ``==``: ``Snapshot`` knows which keys lapsed in between).

    Values are read per type rather than with DUMP: a hash's DUMP bytes can change when a read
    triggers an incremental rehash, though its contents did not. Reads are pipelined, since the
    multi-process tests leave tens of thousands of keys behind. A key that expires while it is
    being read is left out."""
    names = [key async for key in redis.scan_iter(match=keys.pattern(), count=10_000)]
    started_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        for key in names:
            pipe.pttl(key)
        lifetimes = await pipe.execute()
    deadlines_ms = {key: started_ms + ms for key, ms in zip(names, lifetimes, strict=True) if ms >= 0}
    names = [key for key, ms in zip(names, lifetimes, strict=True) if ms != -2]
    async with redis.pipeline(transaction=False) as pipe:
        for key in names:
            pipe.type(key)
        kinds = await pipe.execute()
    present = [(key, kind) for key, kind in zip(names, kinds, strict=True) if kind != b"none"]
    async with redis.pipeline(transaction=False) as pipe:
        for key, kind in present:
            if kind == b"string":
                pipe.get(key)
            elif kind == b"hash":
                pipe.hgetall(key)
            elif kind == b"zset":
                pipe.zrange(key, 0, -1, withscores=True)
            elif kind == b"stream":
                pipe.xrange(key)
            else:
                raise AssertionError(f"unexpected key type {kind!r} for {key!r}")
        values = await pipe.execute()
    # A key gone between its TYPE and its read reads as nil or empty (Redis keeps no empty hash
    # or sorted set; a stream may be empty and is kept).
    found = {
        key: (kind, value)
        for (key, kind), value in zip(present, values, strict=True)
        if value is not None and (kind == b"stream" or value)
    }
    return Snapshot(found, deadlines_ms, taken_ms=int(time.time() * 1000))
