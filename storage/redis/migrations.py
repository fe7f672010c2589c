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
