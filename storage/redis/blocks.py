"""The operator's block lists on the hot path (issue 14, section 1).

PostgreSQL's ``risk_blocks`` is the record (storage/postgres/risk_blocks.py); Redis keeps the
blocks in force in one hash, ``Keys.blocks``, which authorize.lua, claim_qualification.lua and
capture.lua read inside their single call: ``<KIND>:<subject id>`` -> the block's expiry in ms
(0: until lifted), compared with Redis TIME by the script, so a block is effective on every
gateway process the moment it is written, and an expired one is ignored at its expiry.

The hash is always rewritten whole (the list is an operator's, small), together with
``_version``: the PostgreSQL change it reflects. A publication never replaces a newer one
(checked under WATCH), and the ledger writer's publisher (server/processes/publisher.py)
re-publishes whenever Redis's version differs from PostgreSQL's: after a Redis loss, or a
gateway that failed between its commit and its publication.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from storage.redis.keys import Keys

VERSION_FIELD = "_version"


@dataclass(frozen=True)
class LiveBlock:
    kind: str  # CONSUMER, DEVICE, MERCHANT, TERMINAL, PARTNER_APP
    subject_id: str
    expires_ms: int  # 0: until lifted


def field(kind: str, subject_id: str) -> str:
    return f"{kind}:{subject_id}"


async def published_version(redis: Redis, keys: Keys) -> int:
    """The PostgreSQL change the Redis hash reflects; 0 when it has none (never published, lost)."""
    raw = await redis.hget(keys.blocks, VERSION_FIELD)
    return int(raw) if raw is not None else 0


async def publish_blocks(redis: Redis, keys: Keys, blocks: Iterable[LiveBlock], version: int) -> bool:
    """Replaces the hash with ``blocks`` at ``version``, unless Redis already holds that version
    or a newer one (another process published a later change first). Returns whether it wrote."""
    mapping: dict[Any, Any] = {field(block.kind, block.subject_id): str(block.expires_ms) for block in blocks}
    mapping[VERSION_FIELD] = str(version)
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(keys.blocks)
                current = await pipe.hget(keys.blocks, VERSION_FIELD)
                if current is not None and int(current) >= version and version > 0:
                    await pipe.unwatch()  # type: ignore[no-untyped-call]
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.delete(keys.blocks)
                pipe.hset(keys.blocks, mapping=mapping)
                await pipe.execute()
                return True
            except redis_errors.WatchError:
                continue
