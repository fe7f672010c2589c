"""The ledger writer's cluster seam (issue 16, docs/scale-out.md 2.3): drains every shard's
ledger stream on a Redis Cluster into PostgreSQL, exactly once.

Each step reads a batch from every primary (storage/redis/cluster/streams.py: this consumer's
unacknowledged entries first, then new ones, only entries the replicas have), stores it in one
PostgreSQL transaction with ``ON CONFLICT (stream, entry_id) DO NOTHING``, and only then
acknowledges it. A crash anywhere re-reads what was not acknowledged, and the insert skips what
was stored; an entry stored under an id whose content differs is an :class:`EventCollision`,
never a silent duplicate: it stops the writer (``run`` raises; the writer process's /health then
answers 503).

A poison entry never stalls the streams (a batch spans every stream on every primary, so one
entry kept pending would stop them all): an entry whose fields are not UTF-8, or whose row
PostgreSQL refuses for its data (SQLSTATE classes 22 and 23, e.g. a NUL in a field: found by
storing the batch's entries one by one once the batch is refused), is set aside whole in its
stream's dead-letter stream ``<stream>:dead`` (same slot) and acknowledged, in one transaction
on its primary; the rest of the batch is stored and acknowledged as usual. Any other
PostgreSQL failure is the database's condition, not the entries': the batch stays pending and
the writer backs off (0.1 s doubling to 5 s). ``ShardStreamReader.lag`` counts the backlog and
the dead letters (the writer process's /metrics and /health).

Not yet the gateway's writer: the shards emit the escrow events (funding, reservations,
transfers) into ``shard_events``; posting them to the double-entry ledger comes with the
authorize script on the cluster. The single-Redis writer (storage/postgres/writer.py) is
unchanged and stays the default.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import orjson

from storage.postgres.ledger import EventCollision
from storage.postgres.stream_consumer import BACKOFF_S_MAX, BACKOFF_S_MIN, REFUSED_DATA, reconnected
from storage.redis.cluster.streams import ShardStreamReader, StreamEntry

# PostgreSQL unavailable (the entries stay pending): its errors, and losing the connection.
UNAVAILABLE = (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

log = logging.getLogger("subsidy.shard_writer")


@dataclass
class ShardWriterStats:
    batches: int = 0
    events_written: int = 0
    duplicates_skipped: int = 0
    postgres_failures: int = 0
    dead_letters: int = 0  # entries set aside (not UTF-8, or refused by PostgreSQL for their data)
    trimmed: int = 0  # entries removed from the streams after every group acknowledged them


async def store_entries(connection: asyncpg.Connection, entries: Sequence[StreamEntry]) -> int:
    """Insert the entries in one transaction; returns how many were new. Safe to call again
    with any of the same entries; one stored with other content raises EventCollision."""
    streams = [entry.stream for entry in entries]
    ids = [entry.entry_id for entry in entries]
    payloads = [orjson.dumps(entry.fields, option=orjson.OPT_SORT_KEYS).decode() for entry in entries]
    types = [entry.fields.get("event", "") for entry in entries]
    async with connection.transaction():
        rows = await connection.fetch(
            "INSERT INTO shard_events (stream, entry_id, event_type, payload)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[])"
            " ON CONFLICT (stream, entry_id) DO NOTHING RETURNING stream, entry_id",
            streams,
            ids,
            types,
            payloads,
        )
        inserted = {(row["stream"], row["entry_id"]) for row in rows}
        again = [entry for entry in entries if (entry.stream, entry.entry_id) not in inserted]
        if again:
            stored = await connection.fetch(
                "SELECT s.stream, s.entry_id, s.payload FROM shard_events s"
                " JOIN unnest($1::text[], $2::text[]) AS k(stream, entry_id) USING (stream, entry_id)",
                [entry.stream for entry in again],
                [entry.entry_id for entry in again],
            )
            content = {(row["stream"], row["entry_id"]): orjson.loads(row["payload"]) for row in stored}
            for entry in again:
                if content.get((entry.stream, entry.entry_id)) != entry.fields:
                    raise EventCollision(f"{entry.stream} {entry.entry_id} is stored with different content")
    return len(inserted)


class ShardLedgerWriter:
    """Reads with ``reader``, stores in PostgreSQL at ``pg_dsn``, acknowledges after commit."""

    def __init__(
        self, reader: ShardStreamReader, pg_dsn: str, *, idle_pause_s: float = 0.2, trim_interval_s: float | None = 5.0
    ) -> None:
        self.reader = reader
        self.pg_dsn = pg_dsn
        self.idle_pause_s = idle_pause_s
        # When idle, at most this often: remove what every group acknowledged (None: never).
        self.trim_interval_s = trim_interval_s
        self._trimmed_at = float("-inf")
        self.stats = ShardWriterStats()
        self._connection: asyncpg.Connection | None = None
        self._backoff_s = BACKOFF_S_MIN

    async def step(self) -> int:
        """One batch: read, store, set poison entries aside, acknowledge. Returns the number of
        entries handled (0 when PostgreSQL is unavailable: they stay pending)."""
        entries = await self.reader.read()
        if not entries:
            return 0
        refused: list[tuple[StreamEntry, str]] = [(entry, "not UTF-8") for entry in entries if entry.raw is not None]
        storable = [entry for entry in entries if entry.raw is None]
        try:
            new, refused_by_postgres = await self._store(storable)
        except EventCollision:
            raise  # a broken invariant: stop rather than acknowledge it away
        except (*UNAVAILABLE, asyncio.CancelledError) as error:
            if self._connection is not None:
                self._connection.terminate()
                self._connection = None
            if isinstance(error, asyncio.CancelledError):
                raise
            # PostgreSQL's condition, not the entries': they stay pending and come back.
            self.stats.postgres_failures += 1
            log.warning("postgres unavailable; will retry", extra={"error": type(error).__name__})
            await asyncio.sleep(self._backoff_s)
            self._backoff_s = min(self._backoff_s * 2, BACKOFF_S_MAX)
            return 0
        self._backoff_s = BACKOFF_S_MIN
        refused += refused_by_postgres
        if refused:
            # Kept, never dropped: a human looks at the dead-letter streams (/health is 503 meanwhile).
            self.stats.dead_letters += await self.reader.dead_letter(refused)
            for entry, reason in refused:
                log.error(
                    "shard event dead-lettered",
                    extra={"stream": entry.stream, "entry": entry.entry_id, "reason": reason},
                )
        set_aside = {(entry.stream, entry.entry_id) for entry, _ in refused}
        await self.reader.ack([entry for entry in storable if (entry.stream, entry.entry_id) not in set_aside])
        self.stats.batches += 1
        self.stats.events_written += new
        self.stats.duplicates_skipped += len(storable) - len(refused_by_postgres) - new
        return len(entries)

    async def _store(self, entries: list[StreamEntry]) -> tuple[int, list[tuple[StreamEntry, str]]]:
        """Store the entries in one transaction; when PostgreSQL refuses the batch for its data,
        one by one. Returns how many were new and the entries refused, with the reason."""
        if not entries:
            return 0, []
        connection = self._connection = await reconnected(self._connection, self.pg_dsn)
        try:
            return await store_entries(connection, entries), []
        except REFUSED_DATA:
            pass
        new = 0
        refused: list[tuple[StreamEntry, str]] = []
        for entry in entries:
            try:
                new += await store_entries(connection, [entry])
            except REFUSED_DATA as error:
                refused.append((entry, type(error).__name__))
        return new, refused

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                handled = await self.step()
            except EventCollision:
                # A broken invariant (an entry id reused with other content): stop, loudly, with
                # the entries left pending for whoever investigates.
                log.critical("shard event collision; the shard writer stops", exc_info=True)
                raise
            except Exception:  # a bug or an unforeseen Redis error: entries stay pending
                log.error("shard writer step failed", exc_info=True)
                handled = 0
            if handled == 0:
                await self._trim_when_due()
                await asyncio.sleep(self.idle_pause_s)

    async def _trim_when_due(self) -> None:
        if self.trim_interval_s is None or time.monotonic() - self._trimmed_at < self.trim_interval_s:
            return
        self._trimmed_at = time.monotonic()
        try:
            self.stats.trimmed += await self.reader.trim()
        except Exception:  # trimming is housekeeping: a failure must not stop the writer
            log.warning("trimming the shard streams failed", exc_info=True)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Store until every registered stream's group has nothing pending or undelivered."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.step() == 0 and await self.reader.backlog() == 0:
                return
        raise TimeoutError("the shard streams did not drain in time")

    async def close(self) -> None:
        if self._connection is not None and not self._connection.is_closed():
            await self._connection.close()
        self._connection = None
