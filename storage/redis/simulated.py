"""Redis counters for a campaign whose ledger history was simulated (make run's report demo,
server/commands/report_demo.py): its budget's spent / reserved / refunded fields, its
consumers' usage and its devices' serials, set to what the ledger holds for it, so that
``server.ledger reconcile`` finds Redis and the ledger in agreement. Only for a campaign that
takes no live sales (a paused one): the values are set, not added."""

from __future__ import annotations

from collections.abc import Mapping

from redis.asyncio import Redis

from storage.redis.keys import Keys


async def set_campaign_counters(
    redis: Redis,
    keys: Keys,
    campaign_id: str,
    budget: Mapping[tuple[str, str], int],
    usage: Mapping[tuple[str, str], int],
    serials: Mapping[str, str],
) -> None:
    """``budget``: (category, field) -> fen; ``usage``: (consumer key, category) -> units;
    ``serials``: serial -> the authorization holding it."""
    async with redis.pipeline(transaction=True) as pipe:
        for (category, name), value in budget.items():
            pipe.hset(keys.budget(campaign_id), f"{category}:{name}", value)
        for (consumer_key, category), units in usage.items():
            if units:
                pipe.hset(keys.usage(campaign_id, consumer_key), category, units)
        for serial, authorization_id in serials.items():
            pipe.set(keys.serial(serial), authorization_id)
        await pipe.execute()
