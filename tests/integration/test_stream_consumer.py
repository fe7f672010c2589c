"""The stream consumer the qualification mirror and the risk event writer share
(storage/postgres/stream_consumer.py), driven through the risk event writer against real Redis
and PostgreSQL: exactly once across a consumer that dies, and poison entries set aside."""

from __future__ import annotations

import asyncpg
import orjson
from redis.asyncio import Redis

from storage.devenv import Services
from storage.postgres.risk_events import GROUP, INSERT, RiskEventWriter, event_row
from tests.conftest import isolated_environment


def risk_event(subject_id: str) -> bytes:
    return orjson.dumps(
        {
            "action": "DECLINE",
            "rule": "CONSUMER_BLOCKED",
            "subject_kind": "CONSUMER",
            "subject_id": subject_id,
            "campaign": "c-main",
            "request_id": "r-" + subject_id,
            "evidence": {"limit": 3},
            "at_ms": 1_800_000_000_000,
        }
    )


async def test_a_dead_consumers_batch_is_written_once_and_poison_is_set_aside(services: Services) -> None:
    """A consumer reads five entries and dies having committed two of them but acknowledged
    none. Another consumer claims the batch: the three good entries are one row each (the two
    already written are not written again), the unparseable entry and the one PostgreSQL
    refuses (a NUL byte in text) go to the dead-letter stream whole, and nothing stays pending.
    Fails if a redelivery adds a row, if a poison entry holds the batch back, or if one is lost."""
    async with isolated_environment(services) as env:
        redis = Redis.from_url(env.redis_url)
        stream = env.keys.risk_events
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            good = [await redis.xadd(stream, {"r": risk_event(f"person-{index}")}) for index in range(3)]
            unparseable = await redis.xadd(stream, {"r": b"{not json"})
            refused = await redis.xadd(stream, {"r": risk_event("nul\x00byte")})

            dying = RiskEventWriter(redis, env.keys, env.pg_dsn, consumer="risk-dying")
            await dying.ensure_group()
            assert len(await dying._read(block=False)) == 5
            for index, entry_id in enumerate(good[:2]):  # committed before the crash, never acknowledged
                await connection.execute(INSERT, *event_row(entry_id.decode(), risk_event(f"person-{index}")))

            taking_over = RiskEventWriter(redis, env.keys, env.pg_dsn, consumer="risk-next", claim_idle_ms=0)
            await taking_over.drain()

            rows = await connection.fetch("SELECT stream_id, subject_id FROM risk_events ORDER BY stream_id")
            assert [row["stream_id"] for row in rows] == [entry_id.decode() for entry_id in good]
            assert [row["subject_id"] for row in rows] == ["person-0", "person-1", "person-2"]
            dead = await redis.xrange(stream + ":dead")
            assert [fields[b"id"] for _, fields in dead] == [unparseable, refused]
            assert dead[1][1][b"r"] == risk_event("nul\x00byte")
            assert (taking_over.stats.written, taking_over.stats.dead_letters) == (3, 2)
            assert await redis.xlen(stream) == 0
            assert (await redis.xpending(stream, GROUP))["pending"] == 0
        finally:
            await connection.close()
            await redis.delete(stream, stream + ":dead")
            await redis.aclose()
