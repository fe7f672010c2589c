"""The ledger writer: moves ledger events from the Redis stream into PostgreSQL.

A consumer of the stream's consumer group. Each step takes a bounded batch (at most
``batch_size`` entries, waiting at most ``block_ms`` for new ones), writes it in one PostgreSQL
transaction (``storage.postgres.ledger.write_batch``: idempotent on the event id), and only
then XACKs it. Entries are taken in this order: this consumer's own unacknowledged entries
(left by its previous life), entries idle for ``claim_idle_ms`` in another consumer's pending
list (XAUTOCLAIM: a dead writer's), then new entries. An entry that has failed
``max_deliveries`` times goes to the dead-letter stream and the dead-letter counter rises.

It runs as its own process (``python -m server.ledger writer``), not inside the gateway: the
gateway then holds no PostgreSQL connection at all (the hot path provably touches none), a
PostgreSQL outage cannot slow an authorization, and the writer can be killed, restarted and
scaled on its own.

On a Redis Cluster (issue 16, storage/redis/cluster/shards.py) one writer drains one consumer
shard's ``ledger`` stream: given that shard's ``Keys`` and a cluster client, every command it
sends names only that shard's keys (the stream and its ``:dead`` stream share the shard's hash
tag), so the client routes them to the shard's primary. Its events are recorded under the entry
id qualified by the shard (``<ms>-<seq>@<shard>``, storage/postgres/ledger.py), since two
shards' streams can hand out the same entry id; one Redis's ids stay the bare entry id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from storage.postgres.ledger import EventCollision, LedgerEvent, MalformedEvent, parse_event, write_batch
from storage.redis.keys import Keys

log = logging.getLogger("subsidy.writer")
CRASH_POINTS = ("", "before_commit", "after_commit", "after_ack")
# PostgreSQL refusing the data itself (SQLSTATE classes 22 and 23), and events that collide with
# a different event of the same id: retrying cannot help, so such an event is dead-lettered
# after max_deliveries. Every other failure is treated as PostgreSQL being unavailable.
DETERMINISTIC_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, EventCollision)


@dataclass(frozen=True)
class WriterConfig:
    pg_dsn: str
    redis_url: str
    prefix: str
    group: str = "ledger-writer"
    consumer: str = "writer-1"
    batch_size: int = 500
    block_ms: int = 200
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    retry_backoff_max_s: float = 5.0
    trim: bool = True
    # Fault injection for the crash tests: SIGKILL this process at that point of the Nth batch.
    crash_at: str = ""
    crash_after_batches: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.batch_size <= 10_000:
            raise ValueError("batch_size must be between 1 and 10000")
        if not 0 < self.block_ms <= 60_000:
            raise ValueError("block_ms must be between 1 and 60000")
        if self.max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        if self.crash_at not in CRASH_POINTS:
            raise ValueError(f"crash_at must be one of {CRASH_POINTS}")


@dataclass
class WriterStats:
    batches: int = 0
    events_written: int = 0
    duplicates_skipped: int = 0
    reused_request_ids: int = 0
    dead_letters: int = 0
    postgres_failures: int = 0


async def read_group(
    redis: Redis | RedisCluster,
    stream: str,
    group: str,
    consumer: str,
    count: int,
    claim_idle_ms: int,
    block_ms: int | None,
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """A consumer's next batch: its own pending entries first (left by its previous life), then
    entries idle for ``claim_idle_ms`` in another consumer's pending list, then new ones."""
    # redis-py's stubs type stream replies loosely; their shape is fixed by the commands.
    client: Any = redis
    own = await client.xreadgroup(group, consumer, {stream: "0"}, count=count)
    if own and own[0][1]:
        return list(own[0][1])
    claimed = await client.xautoclaim(stream, group, consumer, claim_idle_ms, "0-0", count=count)
    if claimed[1]:
        return [entry for entry in claimed[1] if entry[1] is not None]
    fresh = await client.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
    return list(fresh[0][1]) if fresh else []


class LedgerWriter:
    """The writer of one ledger stream: one Redis's (``keys`` default ``Keys(config.prefix)``)
    or one consumer shard's on a Redis Cluster (``keys`` the shard's, ``redis`` a cluster client)."""

    def __init__(self, config: WriterConfig, redis: Redis | RedisCluster, keys: Keys | None = None) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys if keys is not None else Keys(config.prefix)
        self.stats = WriterStats()
        self._connection: asyncpg.Connection | None = None
        self._backoff_s = 0.1

    @property
    def dead_letter_stream(self) -> str:
        return self.keys.ledger + ":dead"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.ledger, self.config.group, id="0", mkstream=True)
        except redis_errors.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def _pg(self) -> asyncpg.Connection:
        if self._connection is None or self._connection.is_closed():
            self._connection = await asyncpg.connect(self.config.pg_dsn, timeout=5)
        return self._connection

    async def close(self) -> None:
        if self._connection is not None and not self._connection.is_closed():
            await self._connection.close()

    async def _read(self, block: bool) -> list[tuple[bytes, dict[bytes, bytes]]]:
        config = self.config
        return await read_group(
            self.redis,
            self.keys.ledger,
            config.group,
            config.consumer,
            config.batch_size,
            config.claim_idle_ms,
            config.block_ms if block else None,
        )

    def _crash_point(self, point: str) -> None:
        if self.config.crash_at == point and self.stats.batches + 1 >= self.config.crash_after_batches:
            log.warning("fault injection: killing the writer", extra={"point": point})
            os.kill(os.getpid(), signal.SIGKILL)

    async def step(self, block: bool = True) -> int:
        """One batch: read, write, acknowledge. Returns the number of entries handled."""
        entries = await self._read(block)
        if not entries:
            # Idle: trim what every consumer has acknowledged, so the stream's length converges
            # on the backlog even when the last batch was handled by another writer (a takeover).
            if self.config.trim:
                await self.trim_acknowledged()
            return 0
        events, malformed = [], []
        for entry_id, fields in entries:
            try:
                events.append(parse_event(entry_id, fields, self.keys.shard))
            except MalformedEvent:
                malformed.append((entry_id, fields))
        if malformed:
            await self._dead_letter(malformed, "malformed event")
        if events:
            try:
                await self._write(events)
            except DETERMINISTIC_ERRORS:
                # PostgreSQL refuses something in this batch's data: find which event.
                await self._drop_connection()
                await self._isolate(events)
            except (Exception, asyncio.CancelledError) as error:
                if isinstance(error, asyncio.CancelledError) or isinstance(error, redis_errors.RedisError):
                    raise
                # Anything else (connection lost, failover to read-only, disk full, timeouts) is
                # the database's condition, not the events': keep everything pending and back off.
                await self._postgres_unavailable(error)
                return 0
        self._backoff_s = 0.1
        self.stats.batches += 1
        if self.config.trim:
            await self.trim_acknowledged()
        return len(entries)

    async def _postgres_unavailable(self, error: BaseException) -> None:
        self.stats.postgres_failures += 1
        await self._drop_connection()
        log.warning("postgres unavailable; will retry", extra={"error": type(error).__name__})
        await asyncio.sleep(self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, self.config.retry_backoff_max_s)

    async def _write(self, events: list[LedgerEvent]) -> None:
        connection = await self._pg()
        async with connection.transaction():
            result = await write_batch(connection, events)
            # Fault injection can die here: everything inserted, COMMIT not yet sent.
            self._crash_point("before_commit")
        self._crash_point("after_commit")
        await self.redis.xack(self.keys.ledger, self.config.group, *[event.entry_id for event in events])
        self._crash_point("after_ack")
        self.stats.events_written += result.new_events
        self.stats.duplicates_skipped += result.duplicates
        self.stats.reused_request_ids += result.reused_request_ids
        if result.reused_request_ids:
            log.warning("request ids reused after Redis forgot them", extra={"count": result.reused_request_ids})

    async def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None

    async def _isolate(self, events: list[LedgerEvent]) -> None:
        """A batch PostgreSQL refused for its data: write its events one by one, so one bad event
        cannot hold back the rest; an event refused ``max_deliveries`` times is dead-lettered.
        A failure that is not about the data stops the isolation (the batch stays pending)."""
        deliveries = await self._delivery_counts([event.entry_id for event in events])
        for event in events:
            try:
                await self._write([event])
            except DETERMINISTIC_ERRORS as error:
                await self._drop_connection()
                if deliveries.get(event.entry_id, 1) >= self.config.max_deliveries:
                    fields = {b"e": orjson.dumps(event.payload)}
                    await self._dead_letter([(event.entry_id.encode(), fields)], type(error).__name__)
                else:
                    log.warning("event refused; will retry", extra={"event_id": event.event_id})

    async def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        pending = await self.redis.xpending_range(
            self.keys.ledger,
            self.config.group,
            min=min(entry_ids, key=_order),
            max=max(entry_ids, key=_order),
            count=len(entry_ids) * 2,
        )
        return {_text(item["message_id"]): int(item["times_delivered"]) for item in pending}

    async def _dead_letter(self, entries: list[tuple[Any, dict[bytes, bytes]]], reason: str) -> None:
        for entry_id, fields in entries:
            identifier = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            record: dict[Any, Any] = {**fields, b"source_id": identifier, b"reason": reason}
            await self.redis.xadd(self.dead_letter_stream, record)
            await self.redis.xack(self.keys.ledger, self.config.group, identifier)
            self.stats.dead_letters += 1
            log.error("ledger event dead-lettered", extra={"event_id": identifier, "reason": reason})

    async def trim_acknowledged(self) -> None:
        """Removes entries every consumer has acknowledged, keeping anything pending or not yet
        delivered, so the stream's length is the ledger's backlog."""
        groups = await self.redis.xinfo_groups(self.keys.ledger)
        mine = next((group for group in groups if _text(group["name"]) == self.config.group), None)
        if mine is None:
            return
        last_delivered = _text(mine["last-delivered-id"])
        milliseconds, sequence = last_delivered.split("-")
        keep_from = f"{milliseconds}-{int(sequence) + 1}"
        summary = await self.redis.xpending(self.keys.ledger, self.config.group)
        if summary["pending"] and summary["min"] is not None:
            keep_from = min(keep_from, _text(summary["min"]), key=_order)
        await self.redis.xtrim(self.keys.ledger, minid=keep_from)

    async def run(self, stopping: asyncio.Event) -> None:
        # The group is created inside the retry loop: an error at start (a node restarting;
        # redis-py 8.1's AttributeError on a fresh cluster client's concurrent first commands)
        # must be retried like a step's, not end this writer's task unseen, its stream undrained.
        group_ready = False
        while not stopping.is_set():
            try:
                if not group_ready:
                    await self.ensure_group()
                    group_ready = True
                    log.info(
                        "ledger writer started", extra={"consumer": self.config.consumer, "group": self.config.group}
                    )
                await self.step()
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as error:
                log.warning(
                    "redis unavailable; will retry",
                    extra={"consumer": self.config.consumer, "error": f"{type(error).__name__}: {error}"},
                )
                await asyncio.sleep(1.0)
            except Exception:  # a bug must not crash-loop the writer; entries stay pending
                log.error("ledger writer step failed", extra={"consumer": self.config.consumer}, exc_info=True)
                await asyncio.sleep(1.0)
        # Shutdown: what this writer holds is either written and acknowledged above, or still
        # pending in the group, where the next writer (or this one restarted) takes it up.
        await self.close()
        log.info("ledger writer stopped", extra={"events_written": self.stats.events_written})

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Writes until nothing is pending or undelivered (tests and the rebuild command)."""
        await self.ensure_group()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            handled = await self.step(block=False)
            if handled == 0 and (await lag(self.redis, self.keys, self.config.group)).backlog == 0:
                return
        raise TimeoutError("the ledger did not drain in time")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _order(entry_id: str) -> tuple[int, int]:
    milliseconds, sequence = entry_id.split("-")
    return int(milliseconds), int(sequence)


@dataclass(frozen=True)
class Lag:
    stream_length: int
    pending: int
    undelivered: int
    oldest_unwritten_age_s: float
    dead_letters: int

    @property
    def backlog(self) -> int:
        return self.pending + self.undelivered


async def lag(redis: Redis | RedisCluster, keys: Keys, group: str) -> Lag:
    """How far the ledger is behind the stream, measured on Redis's clock."""
    seconds, microseconds = await redis.time()
    now_ms = seconds * 1000 + microseconds // 1000
    length = await redis.xlen(keys.ledger)
    dead = await redis.xlen(keys.ledger + ":dead")
    groups = await redis.xinfo_groups(keys.ledger) if await redis.exists(keys.ledger) else []
    mine = next((item for item in groups if _text(item["name"]) == group), None)
    pending, first_undelivered, undelivered = 0, "-", length
    if mine is not None:
        pending = int(mine["pending"])
        first_undelivered = "(" + _text(mine["last-delivered-id"])
        # Redis 7 reports the group's lag; it is nil when it cannot tell (after deletions).
        reported = mine.get("lag")
        if reported is not None:
            undelivered = int(reported)
        else:
            # Bounded count: past this many the backlog is reported as at least this.
            undelivered = len(await redis.xrange(keys.ledger, min=first_undelivered, count=10_000) or [])
    next_undelivered = await redis.xrange(keys.ledger, min=first_undelivered, count=1)
    oldest_ms: list[int] = []
    if pending:
        # A separate call: the writer may have acknowledged everything in between.
        summary = await redis.xpending(keys.ledger, group)
        pending = int(summary["pending"])
        if pending and summary["min"] is not None:
            oldest_ms.append(_order(_text(summary["min"]))[0])
    if next_undelivered:
        oldest_ms.append(_order(_text(next_undelivered[0][0]))[0])
    age_s = max((now_ms - min(oldest_ms)) / 1000, 0.0) if oldest_ms else 0.0
    return Lag(length, pending, undelivered if next_undelivered else 0, age_s, dead)
