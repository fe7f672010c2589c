"""Consumers' personal data at rest (issue 10, item 9; docs/privacy.md).

Whoever holds the programme key (every provider of the programme does) and a copy of the
databases must not find an ID number faster than by searching the whole ID number space:
before this, the masked ID number stored beside the consumer key (330***********2328: the
first 3 and the last 4 characters) cut that search to the region digits and the birth date.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, timedelta

import asyncpg
import pytest
from redis.asyncio import Redis
from subsidy_client import QualificationClient, RetryPolicy
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from server.domain.identity import check_digit, mask_id_number
from server.domain.sealing import Sealer
from storage.devenv import Services
from storage.postgres.migrate import migrate, migration_files
from storage.postgres.qualifications import QualificationMirror
from storage.redis.masks import scrub_clear_masks
from tests.conftest import (
    LOCAL_DATA_KEY,
    PROGRAMME_KEY,
    Environment,
    consumer_key_of,
    isolated_environment,
    running_gateway,
    snapshot,
    with_database,
)

HERE = common_pb2.Location(
    latitude=30.18, longitude=120.26, coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84, accuracy_m=10
)
PHONE = "13812345678"
# What the attacker is granted on top of the data: the birth date within a 90-day window (a
# small slice of the ~36,500 plausible dates, so that the search below runs in about a second).
WINDOW_START = date(1984, 3, 1)
WINDOW_DAYS = 90
ID_MASK = re.compile(r"([1-9][0-9]{2})\*{11}([0-9]{3}[0-9X])")
PHONE_MASK = re.compile(r"1[3-9][0-9]\*{4}[0-9]{4}")
HEX_KEY = re.compile(r"\b[0-9a-f]{64}\b")
TOKEN = re.compile(r"s1\.[A-Za-z0-9_-]{40,200}")


def person_in_window() -> str:
    born = WINDOW_START + timedelta(days=secrets.randbelow(WINDOW_DAYS))
    first = f"330109{born:%Y%m%d}{secrets.randbelow(1000):03d}"
    return first + check_digit(first)


def mask_implied_search(programme_key: bytes, consumer_keys: set[str], mask: str) -> tuple[str | None, int]:
    """The brute force of the issue: a stored mask fixes the first 3 and the last 4 characters;
    try every region remainder (000-999) and every birth date of the window, keep those whose
    check character matches the mask's, and compare their HMAC with the stored consumer keys.
    Returns the ID number found (or None) and the number of HMACs computed."""
    found = ID_MASK.fullmatch(mask)
    assert found is not None
    prefix, last_four = found.groups()
    hmacs = 0
    for region in range(1000):
        for offset in range(WINDOW_DAYS):
            first = f"{prefix}{region:03d}{WINDOW_START + timedelta(days=offset):%Y%m%d}{last_four[:3]}"
            if check_digit(first) != last_four[3]:
                continue
            hmacs += 1
            number = first + last_four[3]
            if hmac.new(programme_key, number.encode(), hashlib.sha256).hexdigest() in consumer_keys:
                return number, hmacs
    return None, hmacs


@dataclass(frozen=True)
class AtRest:
    """Everything the deployment keeps: every Redis key of it and every PostgreSQL table."""

    text: str

    def masks(self) -> list[str]:
        return sorted({match.group(0) for match in ID_MASK.finditer(self.text)})

    def consumer_keys(self) -> set[str]:
        return set(HEX_KEY.findall(self.text))

    def tokens(self) -> set[str]:
        return set(TOKEN.findall(self.text))


async def everything_at_rest(env: Environment) -> AtRest:
    redis = Redis.from_url(env.redis_url)
    try:
        keys = await snapshot(redis, env.keys)
    finally:
        await redis.aclose()
    parts: list[str] = [repr(keys)]
    connection = await asyncpg.connect(env.pg_dsn)
    try:
        tables = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        for table in tables:
            rows = await connection.fetch(f'SELECT * FROM "{table["tablename"]}"')
            parts += [repr(dict(row)) for row in rows]
    finally:
        await connection.close()
    return AtRest("\n".join(parts))


@asynccontextmanager
async def partner_app(
    services: Services, local_data_key: str
) -> AsyncIterator[tuple[Environment, QualificationClient]]:
    async with (
        isolated_environment(services) as env,
        running_gateway(env.config(local_data_key=local_data_key)) as gateway,
        QualificationClient(
            f"127.0.0.1:{gateway.port}",
            "p-wallet-01",
            env.credentials["p-wallet-01"],
            retry=RetryPolicy(max_attempts=1),
        ) as app,
    ):
        yield env, app


async def claim(
    app: QualificationClient, person: str, request_id: str | None = None, fix_time_ms: int | None = None
) -> qpb.ClaimQualificationResponse:
    response = await app.claim(
        campaign_id="c-qual",
        category="general",
        id_number=person,
        location=HERE,
        fix_time_ms=fix_time_ms or int(time.time() * 1000),
        phone_number=PHONE,
        request_id=request_id,
    )
    assert response.decision == qpb.CLAIM_DECISION_ISSUED, response
    return response


async def mirror(env: Environment) -> None:
    redis = Redis.from_url(env.redis_url)
    try:
        await QualificationMirror(redis, env.keys, env.pg_dsn, consumer="privacy-test").drain()
    finally:
        await redis.aclose()


def phone_masks(text: str) -> Iterable[str]:
    return PHONE_MASK.findall(text)


def test_the_mask_implied_search_finds_an_id_number_from_a_mask_in_clear() -> None:
    """The attack works: given the mask as it used to be stored, the search of the test below
    finds the number within its budget. (It is what that test would find on the old data.)"""
    person = person_in_window()
    number, hmacs = mask_implied_search(PROGRAMME_KEY.encode(), {consumer_key_of(person)}, mask_id_number(person))
    assert number == person
    assert hmacs <= 1000 * WINDOW_DAYS // 11 + 1000


@pytest.mark.parametrize("local_data_key", [LOCAL_DATA_KEY, ""], ids=["local-key", "no-local-key"])
async def test_the_programme_key_and_everything_at_rest_do_not_recover_an_id_number(
    services: Services, local_data_key: str
) -> None:
    """A real claim through the gRPC service (ID and phone number), Get and List, the mirror
    drained into PostgreSQL; then an attacker with the programme key and every Redis key and
    PostgreSQL row of the deployment: no mask to narrow the search, no token the programme key
    opens, and the mask-implied search over whatever is there finds nothing."""
    person = person_in_window()
    async with partner_app(services, local_data_key) as (env, app):
        response = await claim(app, person)
        code = response.qualification.redemption_code
        assert response.qualification.masked_id_number == mask_id_number(person)  # the app sent it
        await app.get(code)
        await app.list(person)
        await mirror(env)
        rest = await everything_at_rest(env)

    programme_key = PROGRAMME_KEY.encode()
    consumer_key = consumer_key_of(person)
    assert consumer_key in rest.consumer_keys() and code in rest.text  # the claim is there
    assert person not in rest.text and PHONE not in rest.text
    # The search of the issue, from every mask the data offers: on the data as it used to be
    # kept this finds the number in about a second; now there is nothing to start from, and
    # only the whole ID number space (~1e11 HMACs, docs/privacy.md) is left.
    found = {mask: mask_implied_search(programme_key, rest.consumer_keys(), mask)[0] for mask in rest.masks()}
    assert person not in found.values(), f"recovered the ID number from {found}"
    # Nothing shaped like a mask, of either number, is kept anywhere.
    assert rest.masks() == [] and list(phone_masks(rest.text)) == []
    assert mask_id_number(person) not in rest.text
    # The sealed tokens (with a local data key) do not open under the shared key.
    tokens = rest.tokens()
    assert len(tokens) == (2 if local_data_key else 0)
    shared = Sealer(programme_key)
    for token in tokens:
        for field in ("masked_id", "masked_phone"):
            assert shared.open(token, field=field, redemption_code=code, consumer_key=consumer_key) == ""


async def test_with_the_local_data_key_the_masks_come_back_on_get_list_cancel_and_replay(
    services: Services,
) -> None:
    person = person_in_window()
    masked_id, masked_phone = mask_id_number(person), "138****5678"
    async with partner_app(services, LOCAL_DATA_KEY) as (env, app):
        request_id, fix_time_ms = str(uuid.uuid4()), int(time.time() * 1000)
        first = await claim(app, person, request_id, fix_time_ms)
        code = first.qualification.redemption_code
        replayed = await claim(app, person, request_id, fix_time_ms)
        assert replayed.replayed and replayed.qualification == first.qualification
        got = await app.get(code)
        assert (got.masked_id_number, got.masked_phone_number) == (masked_id, masked_phone)
        assert got == first.qualification
        listed = await app.list(person)
        assert [(q.masked_id_number, q.masked_phone_number) for q in listed] == [(masked_id, masked_phone)]
        cancelled = (await app.cancel(code)).qualification
        assert (cancelled.masked_id_number, cancelled.masked_phone_number) == (masked_id, masked_phone)
        # Stored sealed in Redis, and so mirrored into PostgreSQL.
        redis = Redis.from_url(env.redis_url)
        try:
            stored = await redis.hmget(env.keys.qualification(code), ["masked_id", "masked_phone"])
        finally:
            await redis.aclose()
        assert all(value is not None and value.startswith(b"s1.") for value in stored)
        await mirror(env)
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            row = await connection.fetchrow("SELECT * FROM qualifications WHERE redemption_code = $1", code)
        finally:
            await connection.close()
        assert row is not None
        assert (row["masked_id_number"], row["masked_phone_number"]) == tuple(value.decode() for value in stored)
        # A gateway with another local key (or none) reads nothing from them.
        async with running_gateway(env.config(local_data_key="another-provider-local-key-0123456789")) as other:
            async with QualificationClient(
                f"127.0.0.1:{other.port}", "p-wallet-01", env.credentials["p-wallet-01"]
            ) as elsewhere:
                blank = await elsewhere.get(code)
        assert (blank.masked_id_number, blank.masked_phone_number) == ("", "")


async def test_without_a_local_data_key_no_mask_is_stored_and_reads_return_none(services: Services) -> None:
    person = person_in_window()
    async with partner_app(services, "") as (env, app):
        response = await claim(app, person)
        # The claim answers with the masks of the numbers it was sent...
        assert response.qualification.masked_id_number == mask_id_number(person)
        assert response.qualification.masked_phone_number == "138****5678"
        code = response.qualification.redemption_code
        # ...but nothing was kept to answer later reads with.
        got = await app.get(code)
        assert (got.masked_id_number, got.masked_phone_number) == ("", "")
        assert [q.masked_id_number for q in await app.list(person)] == [""]
        redis = Redis.from_url(env.redis_url)
        try:
            assert await redis.hmget(env.keys.qualification(code), ["masked_id", "masked_phone"]) == [b"", b""]
        finally:
            await redis.aclose()


async def test_masks_stored_in_clear_before_are_blanked_in_redis(services: Services) -> None:
    """The writer's one-time scrub: qualification hashes, claims' idempotency answers (their
    time to live kept) and dead-lettered snapshots lose their clear masks; sealed ones stay."""
    async with isolated_environment(services) as env:
        keys = env.keys
        redis = Redis.from_url(env.redis_url)
        try:
            token = Sealer(LOCAL_DATA_KEY.encode()).seal(
                "330***********2328", field="masked_id", redemption_code="B" * 16, consumer_key="ab" * 32
            )
            await redis.hset(
                keys.qualification("A" * 16),
                mapping={"code": "A" * 16, "masked_id": "330***********2328", "masked_phone": "138****5678"},
            )
            await redis.hset(keys.qualification("B" * 16), mapping={"masked_id": token, "masked_phone": ""})
            legacy = b'h|{"decision":"ISSUED","qualification":{"masked_id":"330***********2328","masked_phone":""}}'
            await redis.set(keys.idempotency("p-wallet-01", "r-1"), legacy, ex=5000)
            await redis.xadd(
                keys.qualification_events + ":dead",
                {b"id": b"1-0", b"q": b'{"code":"AAAA","masked_id":"330***********2328","masked_phone":"138****5678"}'},
            )

            report = await scrub_clear_masks(redis, keys)
            assert (report.qualifications, report.idempotency_answers, report.dead_letters) == (1, 1, 1)
            assert await redis.hmget(keys.qualification("A" * 16), ["masked_id", "masked_phone"]) == [b"", b""]
            assert await redis.hget(keys.qualification("B" * 16), "masked_id") == token.encode()
            answer = await redis.get(keys.idempotency("p-wallet-01", "r-1"))
            assert answer == b'h|{"decision":"ISSUED","qualification":{"masked_id":"","masked_phone":""}}'
            assert 4000 < await redis.ttl(keys.idempotency("p-wallet-01", "r-1")) <= 5000
            dead = await redis.xrange(keys.qualification_events + ":dead")
            assert [fields for _, fields in dead] == [
                {b"id": b"1-0", b"q": b'{"code":"AAAA","masked_id":"","masked_phone":""}'}
            ]
            assert (await scrub_clear_masks(redis, keys)).already_done
            assert "330***" not in repr(await snapshot(redis, keys))
        finally:
            await redis.aclose()


async def test_masks_stored_in_clear_before_are_blanked_in_postgresql_and_refused_after(services: Services) -> None:
    """Migration 0008 on a table written before it: the clear masks become '', sealed ones
    stay; and from then on the table refuses a mask in clear."""
    database = f"subsidy_test_masks_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(services.pg_dsn, timeout=10)
    await admin.execute(f'CREATE DATABASE "{database}"')
    try:
        connection = await asyncpg.connect(with_database(services.pg_dsn, database), timeout=10)
        try:
            await connection.execute(
                "CREATE TABLE schema_migrations"
                " (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, sql in migration_files():
                if version == "0008_sealed_masks":
                    break
                await connection.execute(sql)
                await connection.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            token = Sealer(LOCAL_DATA_KEY.encode()).seal(
                "138****5678", field="masked_phone", redemption_code="B" * 16, consumer_key="ab" * 32
            )
            insert = (
                "INSERT INTO qualifications VALUES ($1, 'ISSUED', 'c', 'general', $2, 'p', now(), now(), now(),"
                " '', 'COUNT_AS_USED', $3, $4, '30.18,120.26', 'r', 1, 0)"
            )
            await connection.execute(insert, "A" * 16, "ab" * 32, "330***********2328", "138****5678")
            await connection.execute(insert, "B" * 16, "ab" * 32, "", token)
            assert "0008_sealed_masks" in await migrate(connection)
            rows = await connection.fetch(
                "SELECT redemption_code, masked_id_number, masked_phone_number FROM qualifications"
                " ORDER BY redemption_code"
            )
            assert [tuple(row) for row in rows] == [("A" * 16, "", ""), ("B" * 16, "", token)]
            with pytest.raises(asyncpg.CheckViolationError):
                await connection.execute(insert, "C" * 16, "ab" * 32, "330***********2328", "")
        finally:
            await connection.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
