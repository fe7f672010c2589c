"""Cross-provider checks (issue 6): the daily exchange files and their commands.

Several service providers run the programme; a consumer or a device subsidised through one
must not be subsidised again through another. Two ways to know:

- **Online**: another provider asks ``CheckConsumer`` / ``CheckSerial`` (the ExchangeService,
  server/services/exchange.py), answered from this gateway's own live Redis state.
- **Daily files** (``server/domain/exchange_file.py``): each provider exports the consumer keys
  and serials it subsidised on a day (``export``), signed with the key the providers share;
  each imports the others' (``import``). An imported record goes to PostgreSQL (the record) and
  then to Redis (storage/redis/exchange.py), where the authorize script declines the same
  serial (the serial key, valued ``peer:<provider>``) or consumer category
  (``external_consumer``).

The commands: ``subsidyctl exchange export|import|reapply`` (server/ctl/exchange.py;
``python -m server.exchange`` is their alias).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

import asyncpg
import orjson
from redis.asyncio import Redis

from server.commands.common import EXIT_PROBLEM
from server.config import Config
from server.domain import exchange_file
from server.domain.exchange_file import ConsumerRecord, ExchangeFileError, SerialRecord
from storage.postgres import exchange as queries
from storage.redis.exchange import local_usage, write_consumers, write_serials
from storage.redis.keys import Keys

# China has kept UTC+8 without daylight saving since 1991: a fixed offset is exact, and needs
# no time zone database on the host.
CHINA_STANDARD_TIME = timezone(timedelta(hours=8), "CST")
# Redis commands per pipeline.
REDIS_BATCH_SIZE = 1000

# A long job's progress: called with (records done, records in all).
Progress = Callable[[int, int], None]


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """The programme's day: midnight to midnight China Standard Time."""
    start = datetime.combine(day, time(0), CHINA_STANDARD_TIME)
    return start, start + timedelta(days=1)


def previous_day(now: datetime | None = None) -> date:
    """Yesterday in China Standard Time: the day a morning export covers."""
    moment = now or datetime.now(CHINA_STANDARD_TIME)
    return moment.astimezone(CHINA_STANDARD_TIME).date() - timedelta(days=1)


async def export_day(pool: asyncpg.Pool, provider_id: str, key: bytes, day: date) -> bytes:
    """Our signed file for ``day``: the consumers and serials of the authorizations captured that
    day whose lines are not refunded now. Keys and serials only: no ID number, no amount. Run
    it after the day has ended and the ledger writer has caught up."""
    start, end = day_bounds(day)
    async with pool.acquire() as connection:
        subsidised = await queries.subsidised_between(connection, start, end)
    return exchange_file.encode(provider_id, day, subsidised.consumers, subsidised.serials, key)


@dataclass(frozen=True)
class ImportSummary:
    provider: str
    date: str
    consumers: int
    serials: int
    already_imported: bool
    new_consumers: int
    new_serials: int
    # Facts also true here: the same consumer used the category through us as well, or the
    # same device was subsidised by one of our authorizations (which keeps its serial key).
    consumers_also_local: int
    serials_also_local: list[str]


async def import_file(
    pool: asyncpg.Pool,
    redis: Redis,
    keys: Keys,
    key: bytes,
    data: bytes,
    *,
    own_provider_id: str,
    progress: Progress | None = None,
) -> ImportSummary:
    """Verifies a peer's file, records it in PostgreSQL, then writes it to Redis. A file that
    fails verification (ExchangeFileError) changes nothing; importing a file again is harmless."""
    parsed = exchange_file.parse(data, key)
    if parsed.provider_id == own_provider_id:
        raise ExchangeFileError(1, f"the file is from {own_provider_id}, this gateway's own provider id")
    async with pool.acquire() as connection:
        recorded = await queries.record_file(connection, parsed, hashlib.sha256(data).hexdigest())
        campaigns = await queries.campaign_ids(connection)
    total = len(parsed.consumers) + len(parsed.serials)
    also_local = 0
    for start in range(0, len(parsed.consumers), REDIS_BATCH_SIZE):
        batch = parsed.consumers[start : start + REDIS_BATCH_SIZE]
        await write_consumers(redis, keys, [(record, parsed.provider_id) for record in batch])
        usage = await local_usage(redis, keys, campaigns, batch)
        also_local += sum(1 for units in usage if units > 0)
        _advance(progress, start + len(batch), total)
    serials_also_local: list[str] = []
    for start in range(0, len(parsed.serials), REDIS_BATCH_SIZE):
        batch_serials = parsed.serials[start : start + REDIS_BATCH_SIZE]
        serials_also_local += await write_serials(
            redis, keys, [(record, parsed.provider_id) for record in batch_serials]
        )
        _advance(progress, len(parsed.consumers) + start + len(batch_serials), total)
    return ImportSummary(
        provider=parsed.provider_id,
        date=parsed.day.isoformat(),
        consumers=len(parsed.consumers),
        serials=len(parsed.serials),
        already_imported=not recorded.new_file,
        new_consumers=recorded.new_consumers,
        new_serials=recorded.new_serials,
        consumers_also_local=also_local,
        serials_also_local=serials_also_local,
    )


@dataclass(frozen=True)
class ReapplySummary:
    consumers: int
    serials: int


async def reapply(pool: asyncpg.Pool, redis: Redis, keys: Keys, progress: Progress | None = None) -> ReapplySummary:
    """Rewrites Redis from every record imported so far, after a Redis loss. Run it after
    ``subsidyctl ledger rebuild``, which restores our own serials (and drops every other
    serial key): our authorizations then keep their serials and peers' records fill the rest."""
    async with pool.acquire() as connection, connection.transaction():
        consumers, serials = await queries.imported_counts(connection)
        total, done = consumers + serials, 0
        async for rows in queries.imported_consumers(connection, REDIS_BATCH_SIZE):
            await write_consumers(
                redis,
                keys,
                [(ConsumerRecord(row["consumer_key"], row["category"]), row["provider_id"]) for row in rows],
            )
            done += len(rows)
            _advance(progress, done, total)
        async for rows in queries.imported_serials(connection, REDIS_BATCH_SIZE):
            await write_serials(
                redis, keys, [(SerialRecord(row["gtin"], row["serial"]), row["provider_id"]) for row in rows]
            )
            done += len(rows)
            _advance(progress, done, total)
    return ReapplySummary(consumers=consumers, serials=serials)


def _advance(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


class UsageError(Exception):
    """A command that cannot run as configured or invoked; exit status 2."""


def exchange_key(config: Config) -> bytes:
    if not config.exchange_key:
        raise UsageError(
            "SUBSIDY_EXCHANGE_KEY is not set: exchange files are signed and verified with the key"
            " shared by the programme's service providers (at least 32 bytes)"
        )
    return config.exchange_key.encode()


def export_path(output: str | None, provider_id: str, day: date) -> Path | None:
    """Where to write: the given path, stdout for "-", else <provider>-<date>.jsonl here."""
    if output == "-":
        return None
    return Path(output) if output else Path(f"{provider_id}-{day.isoformat()}.jsonl")


def write_atomically(path: Path, data: bytes) -> None:
    """A peer collecting the file never sees half of it: write aside, then rename."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


async def run_export(config: Config, day: date, output: str | None) -> dict[str, object]:
    key = exchange_key(config)
    pool = await asyncpg.create_pool(config.pg_dsn, min_size=1, max_size=1, timeout=10)
    try:
        data = await export_day(pool, config.provider_id, key, day)
    finally:
        await pool.close()
    header = orjson.loads(data.split(b"\n", 1)[0])
    path = export_path(output, config.provider_id, day)
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:
            write_atomically(path, data)
        except OSError as error:
            raise UsageError(f"{path}: {error.strerror}") from error
    return {**header, "file": str(path) if path else "-"}


async def run_import(
    config: Config, files: Sequence[Path], progress: Callable[[str], Progress] | None = None
) -> tuple[int, list[dict[str, object]]]:
    """Imports each file on its own: a rejected file changes nothing and the others still go in.
    ``progress``, given a file's name, returns the callback that follows its import."""
    key = exchange_key(config)
    contents = []
    for path in files:
        try:
            contents.append((path, path.read_bytes()))
        except OSError as error:
            raise UsageError(f"{path}: {error.strerror}") from error
    pool = await asyncpg.create_pool(config.pg_dsn, min_size=1, max_size=1, timeout=10)
    redis = Redis.from_url(config.redis_url, socket_timeout=30)
    keys = Keys(config.redis_prefix)
    results: list[dict[str, object]] = []
    status = 0
    try:
        for path, data in contents:
            try:
                summary = await import_file(
                    pool,
                    redis,
                    keys,
                    key,
                    data,
                    own_provider_id=config.provider_id,
                    progress=progress(str(path)) if progress else None,
                )
            except ExchangeFileError as error:
                print(f"{path}: rejected, nothing imported: {error}", file=sys.stderr)
                results.append({"file": str(path), "rejected": str(error)})
                status = EXIT_PROBLEM
                continue
            results.append({"file": str(path), **asdict(summary)})
    finally:
        await redis.aclose()
        await pool.close()
    return status, results


async def run_reapply(config: Config, progress: Progress | None = None) -> dict[str, object]:
    pool = await asyncpg.create_pool(config.pg_dsn, min_size=1, max_size=1, timeout=10)
    redis = Redis.from_url(config.redis_url, socket_timeout=30)
    try:
        summary = await reapply(pool, redis, Keys(config.redis_prefix), progress)
    finally:
        await redis.aclose()
        await pool.close()
    return asdict(summary)
