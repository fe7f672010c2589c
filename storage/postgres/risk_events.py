"""Risk events into PostgreSQL: every decline by a hot-path risk rule and every flag.

authorize.lua and claim_qualification.lua append each one to the risk event stream
(``Keys.risk_events``, ``risk_event`` in _lib.lua) in the same call as the decision.
``RiskEventWriter`` runs in the ledger writer process beside the ledger writer and the
qualification mirror, as a consumer of its own group on that stream, like the mirror: it
inserts a batch in one transaction, keyed by the stream entry id (``ON CONFLICT DO NOTHING``),
and only then acknowledges and deletes the entries. Delivery is at least once; the entry id
makes the write exactly once, so a redelivery after a crash or two writers racing add no row.
Risk events are not money: they do not go through the ledger stream, whose every entry posts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from storage.postgres.ledger import from_ms
from storage.postgres.writer import read_group
from storage.redis.contract import RISK_EVENT
from storage.redis.keys import Keys
from storage.redis.store import text

log = logging.getLogger("subsidy.risk")
GROUP = "risk-events"

INSERT = """
INSERT INTO risk_events (stream_id, action, rule, subject_kind, subject_id, campaign_id, merchant_id,
    terminal_id, request_id, authorization_id, evidence, occurred_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12)
ON CONFLICT (stream_id) DO NOTHING
"""


def event_row(entry_id: str, raw: bytes) -> tuple[Any, ...]:
    """A stream entry as the insert's parameters; msgspec.ValidationError or DecodeError when malformed."""
    event = RISK_EVENT.decode(raw)
    return (
        entry_id,
        event.action,
        event.rule,
        event.subject_kind,
        event.subject_id,
        event.campaign_id,
        event.merchant_id,
        event.terminal_id,
        event.request_id,
        event.authorization_id,
        orjson.dumps(event.evidence).decode(),
        from_ms(event.at_ms),
    )


@dataclass
class RiskEventStats:
    events_written: int = 0
    dead_letters: int = 0
    postgres_failures: int = 0


class RiskEventWriter:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        pg_dsn: str,
        consumer: str = "risk-1",
        batch_size: int = 500,
        block_ms: int = 200,
        claim_idle_ms: int = 30_000,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.stats = RiskEventStats()
        self._pg_dsn = pg_dsn
        self._consumer = consumer
        self._batch_size = batch_size
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._connection: asyncpg.Connection | None = None
        self._backoff_s = 0.1

    @property
    def stream(self) -> str:
        return self.keys.risk_events

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis_errors.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def _pg(self) -> asyncpg.Connection:
        if self._connection is None or self._connection.is_closed():
            self._connection = await asyncpg.connect(self._pg_dsn, timeout=5)
        return self._connection

    async def step(self, block: bool = True) -> int:
        """One batch: read, insert in one transaction, then acknowledge and delete. Returns the
        number of entries handled (0 when PostgreSQL is unavailable: they stay pending)."""
        entries = await read_group(
            self.redis,
            self.stream,
            GROUP,
            self._consumer,
            self._batch_size,
            self._claim_idle_ms,
            self._block_ms if block else None,
        )
        if not entries:
            return 0
        parsed: list[tuple[bytes, tuple[Any, ...]]] = []
        refused: list[tuple[bytes, dict[bytes, bytes]]] = []
        for raw_id, fields in entries:
            try:
                parsed.append((raw_id, event_row(text(raw_id), fields[b"r"])))
            except (KeyError, msgspec.ValidationError, msgspec.DecodeError, OverflowError):
                refused.append((raw_id, fields))
        try:
            connection = await self._pg()
            try:
                async with connection.transaction():
                    await connection.executemany(INSERT, [row for _, row in parsed])
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
                fields_of = dict(entries)
                for raw_id, row in parsed:
                    try:
                        await connection.execute(INSERT, *row)
                    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
                        refused.append((raw_id, fields_of[raw_id]))
        except (TimeoutError, OSError, asyncpg.PostgresError) as error:
            self.stats.postgres_failures += 1
            log.warning("postgres unavailable for the risk events", extra={"error": type(error).__name__})
            if self._connection is not None:
                self._connection.terminate()
                self._connection = None
            await asyncio.sleep(self._backoff_s)
            self._backoff_s = min(self._backoff_s * 2, 5.0)
            return 0
        self._backoff_s = 0.1
        for raw_id, fields in refused:
            # Kept, never dropped: a human looks at the dead-letter stream.
            await self.redis.xadd(self.stream + ":dead", {b"id": raw_id, **fields})  # type: ignore[dict-item]
            self.stats.dead_letters += 1
            log.error("risk event dead-lettered", extra={"entry": text(raw_id)})
        ids = [raw_id for raw_id, _ in entries]
        await self.redis.xack(self.stream, GROUP, *ids)
        await self.redis.xdel(self.stream, *ids)
        self.stats.events_written += len(entries) - len(refused)
        return len(entries)

    async def drain(self) -> None:
        """Handles every entry present now (for tests)."""
        await self.ensure_group()
        while await self.step(block=False):
            pass

    async def run(self, stopping: asyncio.Event) -> None:
        await self.ensure_group()
        while not stopping.is_set():
            try:
                await self.step()
            except redis_errors.RedisError:
                log.warning("redis unavailable for the risk events", exc_info=True)
                await asyncio.sleep(1.0)
        if self._connection is not None:
            await self._connection.close()
