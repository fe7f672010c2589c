"""A Redis stream written into PostgreSQL exactly once: the loop the qualification mirror
(qualifications.py) and the risk event writer (risk_events.py) share.

Each is a consumer of its own group on its own stream, in the ledger writer process. A step
reads a bounded batch (``read_group`` in writer.py: this consumer's own pending entries first,
then a dead consumer's claimed after ``claim_idle_ms``, then new ones), writes it in one
PostgreSQL transaction, and only then acknowledges and deletes the entries. Delivery is at
least once; the subclass's statement makes the write idempotent (keyed by the stream entry id
or ordered by it), so a redelivery after a crash, or two consumers racing, change nothing.

A poison item never stalls the stream: an entry the subclass cannot turn into a row (whatever
its parser raises: the parser is a function of the entry alone, so its failure is the entry's),
or whose row PostgreSQL refuses for its data (SQLSTATE classes 22 and 23, found by writing the
batch's rows one by one), goes to the dead-letter stream ``<stream>:dead`` (kept whole, for a
human) and is acknowledged with the rest. Any other PostgreSQL failure is the database's
condition, not the entries': the batch stays pending and the consumer backs off (0.1 s doubling
to 5 s). ``run`` outlives any failure of a step (logged, retried a second later), so the task
never ends before it is stopped.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import asyncpg
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from storage.postgres.writer import read_group
from storage.redis.keys import Keys
from storage.redis.store import text

# PostgreSQL refusing a row's data: retrying cannot help, so the entry is set aside at once.
REFUSED_DATA = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
BACKOFF_S_MIN = 0.1
BACKOFF_S_MAX = 5.0


async def reconnected(connection: asyncpg.Connection | None, dsn: str) -> asyncpg.Connection:
    """``connection`` while it is open, otherwise a new one (5 s to connect): a consumer's one
    PostgreSQL connection, replaced after a failure closed or terminated it."""
    if connection is None or connection.is_closed():
        return await asyncpg.connect(dsn, timeout=5)
    return connection


@dataclass(frozen=True)
class StreamBacklog:
    """A consumer's stuck or waiting work: entries not yet written (a handled entry is deleted,
    so the stream's length) and entries set aside in its dead-letter stream (alert when > 0)."""

    backlog: int
    dead_letters: int


async def stream_backlog(redis: Redis, stream: str) -> StreamBacklog:
    return StreamBacklog(await redis.xlen(stream), await redis.xlen(stream + ":dead"))


async def consumer_backlogs(redis: Redis, keys: Keys) -> dict[str, StreamBacklog]:
    """The backlog of each consumer built on this one: the qualification mirror's and the risk
    event writer's (shown by reconcile and lag, the writer's metrics and health)."""
    return {
        "qualification_mirror": await stream_backlog(redis, keys.qualification_events),
        "risk_events": await stream_backlog(redis, keys.risk_events),
    }


@dataclass
class ConsumerStats:
    written: int = 0  # entries written (or found already written) in PostgreSQL
    dead_letters: int = 0
    postgres_failures: int = 0


class StreamConsumer(ABC):
    """One stream's consumer: the subclass names its group, statement and stream, and turns an
    entry into the statement's parameters."""

    group: ClassVar[str]
    statement: ClassVar[str]
    default_consumer: ClassVar[str]
    what: ClassVar[str]  # in log messages: "the qualification mirror"
    item: ClassVar[str]  # in log messages: "qualification event"
    log: ClassVar[logging.Logger]

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        pg_dsn: str,
        consumer: str = "",
        batch_size: int = 500,
        block_ms: int = 200,
        claim_idle_ms: int = 30_000,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.stats = ConsumerStats()
        self._pg_dsn = pg_dsn
        self._consumer = consumer or self.default_consumer
        self._batch_size = batch_size
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._connection: asyncpg.Connection | None = None
        self._backoff_s = BACKOFF_S_MIN

    @property
    @abstractmethod
    def stream(self) -> str: ...

    @abstractmethod
    def row(self, entry_id: str, fields: dict[bytes, bytes]) -> tuple[Any, ...]:
        """The entry as the statement's parameters; raises when the entry is not one."""

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis_errors.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def _read(self, block: bool) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return await read_group(
            self.redis,
            self.stream,
            self.group,
            self._consumer,
            self._batch_size,
            self._claim_idle_ms,
            self._block_ms if block else None,
        )

    async def step(self, block: bool = True) -> int:
        """One batch: read, write in one transaction, then acknowledge and delete. Returns the
        number of entries handled (0 when PostgreSQL is unavailable: they stay pending)."""
        entries = await self._read(block)
        if not entries:
            return 0
        parsed: list[tuple[bytes, tuple[Any, ...]]] = []
        refused: list[tuple[bytes, dict[bytes, bytes]]] = []
        for raw_id, fields in entries:
            try:
                parsed.append((raw_id, self.row(text(raw_id), fields)))
            except Exception as error:  # e.g. a time out of range (OverflowError), an unencodable value
                self.log.warning(
                    f"{self.item} not parsed", extra={"entry": text(raw_id), "error": type(error).__name__}
                )
                refused.append((raw_id, fields))
        try:
            connection = self._connection = await reconnected(self._connection, self._pg_dsn)
            try:
                async with connection.transaction():
                    await connection.executemany(self.statement, [row for _, row in parsed])
            except REFUSED_DATA:
                # PostgreSQL refuses some row's data: write them one by one, set the refused aside.
                fields_of = dict(entries)
                for raw_id, row in parsed:
                    try:
                        await connection.execute(self.statement, *row)
                    except REFUSED_DATA:
                        refused.append((raw_id, fields_of[raw_id]))
        except (TimeoutError, OSError, asyncpg.PostgresError) as error:
            await self._postgres_unavailable(error)
            return 0
        self._backoff_s = BACKOFF_S_MIN
        for raw_id, fields in refused:
            # Kept, never dropped: a human looks at the dead-letter stream.
            await self.redis.xadd(self.stream + ":dead", {b"id": raw_id, **fields})  # type: ignore[dict-item]
            self.stats.dead_letters += 1
            self.log.error(f"{self.item} dead-lettered", extra={"entry": text(raw_id)})
        ids = [raw_id for raw_id, _ in entries]
        await self.redis.xack(self.stream, self.group, *ids)
        await self.redis.xdel(self.stream, *ids)
        self.stats.written += len(entries) - len(refused)
        return len(entries)

    async def _postgres_unavailable(self, error: BaseException) -> None:
        self.stats.postgres_failures += 1
        self.log.warning(f"postgres unavailable for {self.what}", extra={"error": type(error).__name__})
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None
        await asyncio.sleep(self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, BACKOFF_S_MAX)

    async def drain(self) -> None:
        """Handles every entry present now (for tests and before a rebuild)."""
        await self.ensure_group()
        while await self.step(block=False):
            pass

    async def prepare(self) -> None:  # noqa: B027 (a hook, empty unless a subclass needs it)
        """Work done once when ``run`` starts, after the group exists (none by default)."""

    async def run(self, stopping: asyncio.Event) -> None:
        # The group and the start-up work are inside the retry loop: an error at start (Redis
        # restarting, a key of the wrong type) is retried like a step's, instead of ending this
        # consumer's task unseen with its stream undrained (as LedgerWriter.run, 52ec8d6).
        started = False
        while not stopping.is_set():
            try:
                if not started:
                    await self.ensure_group()
                    await self.prepare()
                    started = True
                await self.step()
            except redis_errors.RedisError:
                self.log.warning(f"redis unavailable for {self.what}", exc_info=True)
                await asyncio.sleep(1.0)
            except Exception:  # a bug must not end the task: the entries stay pending, visible
                self.log.error(f"a step of {self.what} failed", exc_info=True)
                await asyncio.sleep(1.0)
        if self._connection is not None:
            await self._connection.close()
