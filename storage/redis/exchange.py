"""Other providers' reports in Redis, and this gateway's own usage as the exchange reads it.

An imported consumer marks its category in ``external_consumer`` (the first provider to report
it stays named); an imported serial takes the serial key, valued ``peer:<provider>``, unless one
of our authorizations holds it. The authorize script declines both.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from server.domain.exchange_file import ConsumerRecord, SerialRecord
from storage.redis.keys import Keys
from storage.redis.store import text

PEER_PREFIX = "peer:"


def is_local(owner: bytes | str) -> bool:
    """A serial key holds an authorization id when we subsidised the device, ``peer:<id>`` when
    another provider reported it."""
    return not text(owner).startswith(PEER_PREFIX)


async def subsidised_here(redis: Redis, keys: Keys, serial: str) -> bool:
    """Whether one of our own authorizations holds the (canonical) serial."""
    owner = await redis.get(keys.serial(serial))
    return owner is not None and is_local(owner)


async def local_usage(
    redis: Redis, keys: Keys, campaigns: Sequence[str], consumers: Sequence[ConsumerRecord]
) -> list[int]:
    """Units each consumer holds or bought in the category across every campaign: one
    pipelined round trip of one HGET per campaign and consumer."""
    if not campaigns:
        return [0] * len(consumers)
    async with redis.pipeline(transaction=False) as pipe:
        for consumer in consumers:
            for campaign_id in campaigns:
                pipe.hget(keys.usage(campaign_id, consumer.consumer_key), consumer.category)
        replies = await pipe.execute()
    width = len(campaigns)
    return [
        sum(int(value) for value in replies[index * width : (index + 1) * width] if value is not None)
        for index in range(len(consumers))
    ]


async def write_consumers(redis: Redis, keys: Keys, records: Sequence[tuple[ConsumerRecord, str]]) -> None:
    """Marks each consumer's category as used elsewhere. The first provider to report it stays
    named (HSETNX), so a re-import or a reapply writes the same values."""
    async with redis.pipeline(transaction=False) as pipe:
        for record, provider_id in records:
            pipe.hsetnx(keys.external_consumer(record.consumer_key), record.category, provider_id)
        await pipe.execute()


async def write_serials(redis: Redis, keys: Keys, records: Sequence[tuple[SerialRecord, str]]) -> list[str]:
    """Marks each serial as subsidised elsewhere, never overwriting a key that exists (SET NX):
    one of our authorizations keeps its serial. Returns the serials we hold ourselves."""
    async with redis.pipeline(transaction=False) as pipe:
        for record, provider_id in records:
            key = keys.serial(record.serial)
            pipe.set(key, PEER_PREFIX + provider_id, nx=True)
            pipe.get(key)
        replies = await pipe.execute()
    owners = replies[1::2]
    return [
        f"{record.gtin}:{record.serial}"
        for (record, _), owner in zip(records, owners, strict=True)
        if owner is not None and is_local(owner)
    ]
