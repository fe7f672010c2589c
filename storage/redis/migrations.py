"""Layout migrations of Redis key families, run by every gateway at start (idempotent, and a
no-op once the deployment's ``schema`` hash records the version).

Serial keys, version 2: ``P:serial:<gtin>:<serial>`` became ``P:serial:<serial>`` (a device is
its serial, whatever GTIN it is sold under; see ``Keys.serial``). Each old key is copied to the
new name unless that exists (SET NX) and then deleted. When two old keys name one serial (the
same device subsidised under two GTINs before this change), the first copied keeps the device
and the others are counted as ``conflicts`` and logged: both sales are in the ledger, and
``server.ledger reconcile`` lists the serial until an operator settles it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.asyncio import Redis

from storage.redis.keys import Keys

log = logging.getLogger("subsidy.migrations")
SERIAL_KEYS_VERSION = 2


@dataclass(frozen=True)
class SerialMigration:
    moved: int
    conflicts: int


async def migrate_serial_keys(redis: Redis, keys: Keys) -> SerialMigration:
    if await redis.hget(keys.schema, "serial_keys") == str(SERIAL_KEYS_VERSION).encode():
        return SerialMigration(0, 0)
    prefix = f"{keys.tag}:serial:"
    moved = conflicts = 0
    # Old keys have a ':' after the GTIN; canonical serials never contain one.
    async for raw in redis.scan_iter(match=prefix + "*:*", count=1000):
        old = raw.decode() if isinstance(raw, bytes) else raw
        serial = old.removeprefix(prefix).split(":", 1)[1]
        owner = await redis.get(old)
        if owner is not None:
            copied = await redis.set(keys.serial(serial), owner, nx=True)
            if copied:
                moved += 1
            elif await redis.get(keys.serial(serial)) != owner:
                conflicts += 1
                log.warning("serial held twice under two GTINs; the first keeps it", extra={"key": old})
        await redis.delete(old)
    await redis.hset(keys.schema, "serial_keys", str(SERIAL_KEYS_VERSION))
    if moved or conflicts:
        log.info("serial keys migrated", extra={"moved": moved, "conflicts": conflicts})
    return SerialMigration(moved, conflicts)


# Qualifications ever issued, version 1: claim once per round (claim_qualification.lua) counts
# every qualification issued to a person in ``<category>:issued`` of their holder hash, but the
# claims made before that counter existed were never counted, so a person whose pre-upgrade
# qualification expired could claim again live while a ledger rebuild (which counts them all)
# would refuse them. Qualification hashes stay in Redis whatever their state, so the count is
# rebuilt from them once; the counter is only ever raised (an atomic max), never lowered, so a
# claim made by another gateway while this runs is not lost.
ISSUED_COUNTS_VERSION = 1
_RAISE_TO = "local c = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') local n = tonumber(ARGV[2]) if n > c then redis.call('HSET', KEYS[1], ARGV[1], n) return 1 end return 0"  # noqa: E501


async def migrate_issued_counts(redis: Redis, keys: Keys) -> int:
    """Fills ``<category>:issued`` from the qualifications in Redis; returns how many counters
    it raised (0 once the deployment's ``schema`` hash records the version)."""
    if await redis.hget(keys.schema, "issued_counts") == str(ISSUED_COUNTS_VERSION).encode():
        return 0
    counts: dict[tuple[str, str, str], int] = {}
    async for raw in redis.scan_iter(match=f"{keys.tag}:qual:*", count=1000):
        fields = await redis.hmget(raw, "campaign", "consumer", "category", "pack")
        campaign, consumer, category, pack = (value.decode() if isinstance(value, bytes) else value for value in fields)
        # A pack's voucher counts against its pack (pack:<id>:issued, written by every pack
        # claim), never its category.
        if campaign and consumer and category and not pack:
            key = (campaign, consumer, category)
            counts[key] = counts.get(key, 0) + 1
    raised = 0
    for (campaign_id, consumer_key, category), count in counts.items():
        holder = keys.qualification_holder(campaign_id, consumer_key)
        raised += int(await redis.eval(_RAISE_TO, 1, holder, f"{category}:issued", str(count)))
    await redis.hset(keys.schema, "issued_counts", str(ISSUED_COUNTS_VERSION))
    if raised:
        log.info("qualification issued counts filled", extra={"raised": raised})
    return raised
