"""Blanks the masked ID and phone numbers that Redis kept in clear before they were sealed
(issue 10, item 9; docs/privacy.md). The PostgreSQL half is migration 0008_sealed_masks.sql.

Since then a mask at rest is ``""`` or a sealed token (server/domain/sealing.py). Masks stored
before are blanked, not re-sealed: they are support data, and blanking needs no key, so the
writer process (which has no local data key) runs this once at start; the deployment's
``schema`` hash records it. Three places held them:

- each qualification hash (``P:qual:<code>``): the ``masked_id`` and ``masked_phone`` fields;
- each claim's idempotency answer (``P:idem:<partner>:<request id>``, kept for
  ``SUBSIDY_IDEMPOTENCY_TTL_S``): the qualification view in the answer JSON, rewritten with
  its time to live kept;
- the qualification mirror's dead letters (``P:qualification_events:dead``): re-added with the
  masks blanked and their original entry id, the old entries deleted.

Entries still in the live qualification stream are left to the mirror, which stores only a
sealed token or ``""`` (``snapshot_row``) and deletes them once written.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from server.domain.sealing import at_rest_form
from storage.redis.keys import Keys

log = logging.getLogger("subsidy.masks")
# The deployment's schema hash (the same one the key-layout migrations record versions in).
SCHEMA_FIELD = "sealed_masks"
SCHEMA_VERSION = b"1"
MASK_FIELDS = ("masked_id", "masked_phone")
# A mask field in a JSON document (cjson's encoding: no spaces) whose value is not a token.
CLEAR_IN_JSON = re.compile(rb'"(masked_id|masked_phone)":"(?!s1\.)[^"]+"')
BATCH = 500


@dataclass(frozen=True)
class ScrubReport:
    qualifications: int = 0
    idempotency_answers: int = 0
    dead_letters: int = 0
    already_done: bool = False


def blank_in_json(raw: bytes) -> bytes:
    return CLEAR_IN_JSON.sub(rb'"\1":""', raw)


async def scrub_clear_masks(redis: Redis, keys: Keys, force: bool = False) -> ScrubReport:
    """Blanks every mask Redis holds in clear; once per deployment unless ``force``."""
    schema = f"{keys.tag}:schema"
    if not force and await redis.hget(schema, SCHEMA_FIELD) == SCHEMA_VERSION:
        return ScrubReport(already_done=True)
    qualifications = await _scrub_hashes(redis, f"{keys.tag}:qual:*")
    answers = await _scrub_answers(redis, f"{keys.tag}:idem:*")
    dead = await _scrub_dead_letters(redis, keys.qualification_events + ":dead")
    await redis.hset(schema, SCHEMA_FIELD, SCHEMA_VERSION)
    report = ScrubReport(qualifications, answers, dead)
    if qualifications or answers or dead:
        log.info(
            "masks stored in clear blanked",
            extra={"qualifications": qualifications, "idempotency_answers": answers, "dead_letters": dead},
        )
    return report


async def _batches(redis: Redis, match: str) -> list[list[bytes]]:
    names = [name async for name in redis.scan_iter(match=match, count=1000)]
    return [names[start : start + BATCH] for start in range(0, len(names), BATCH)]


async def _scrub_hashes(redis: Redis, match: str) -> int:
    scrubbed = 0
    for batch in await _batches(redis, match):
        async with redis.pipeline(transaction=False) as pipe:
            for name in batch:
                pipe.hmget(name, list(MASK_FIELDS))
            found = await pipe.execute()
        async with redis.pipeline(transaction=False) as pipe:
            for name, values in zip(batch, found, strict=True):
                clear = [
                    field
                    for field, value in zip(MASK_FIELDS, values, strict=True)
                    if value is not None and not at_rest_form(value.decode(errors="replace"))
                ]
                if clear:
                    pipe.hset(name, mapping=dict.fromkeys(clear, ""))
                    scrubbed += 1
            await pipe.execute()
    return scrubbed


async def _scrub_answers(redis: Redis, match: str) -> int:
    scrubbed = 0
    for batch in await _batches(redis, match):
        async with redis.pipeline(transaction=False) as pipe:
            for name in batch:
                pipe.get(name)
            found = await pipe.execute()
        async with redis.pipeline(transaction=False) as pipe:
            for name, value in zip(batch, found, strict=True):
                if isinstance(value, bytes) and CLEAR_IN_JSON.search(value):
                    # XX: not recreated if it expired meanwhile; KEEPTTL: it expires as before.
                    pipe.set(name, blank_in_json(value), xx=True, keepttl=True)
                    scrubbed += 1
            await pipe.execute()
    return scrubbed


async def _scrub_dead_letters(redis: Redis, stream: str) -> int:
    scrubbed = 0
    # redis-py types stream entries loosely; without decode_responses they are bytes.
    entries: Any = await redis.xrange(stream)
    for entry_id, fields in entries:
        if not any(CLEAR_IN_JSON.search(value) for value in fields.values()):
            continue
        cleaned = {name: blank_in_json(value) for name, value in fields.items()}
        await redis.xadd(stream, cleaned)  # type: ignore[arg-type]  # bytes field names are fine
        await redis.xdel(stream, entry_id)
        scrubbed += 1
    return scrubbed
