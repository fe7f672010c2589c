"""The tests' "change nothing" check (tests/conftest.py ``snapshot``) on a real Redis: a key that
ran out its TTL between two snapshots is Redis's expiry, not a change; every write, change or
deletion still is one."""

from __future__ import annotations

import asyncio
import uuid

from redis.asyncio import Redis

from tests.conftest import Environment, snapshot


async def test_a_lapsed_key_is_not_a_change_and_every_write_is(environment: Environment, redis: Redis) -> None:
    tag = environment.keys.tag
    lapsing, kept, volatile = (
        f"{tag}:snapshot-test:{name}:{uuid.uuid4().hex}" for name in ("lapsing", "kept", "volatile")
    )
    try:
        # Long enough to be read by a snapshot of tens of thousands of keys on a busy machine.
        await redis.set(lapsing, b"1", px=10_000)
        await redis.set(kept, b"1")
        await redis.set(volatile, b"1", ex=600)
        before = await snapshot(redis, environment.keys)
        assert lapsing.encode() in before
        for _ in range(300):  # until Redis has expired it (10 s, and up to 20 s more when slow)
            if not await redis.exists(lapsing):
                break
            await asyncio.sleep(0.1)
        after = await snapshot(redis, environment.keys)
        assert lapsing.encode() not in after
        assert after == before and before == after and not before != after
        assert before.changed(after) == set()

        await redis.set(kept, b"2")  # a changed value
        changed = await snapshot(redis, environment.keys)
        assert changed != before and before.changed(changed) == {kept.encode()}

        await redis.set(kept, b"1")
        await redis.delete(volatile)  # deleted long before its TTL: a change
        deleted = await snapshot(redis, environment.keys)
        assert deleted != before and before.changed(deleted) == {volatile.encode()}

        added = f"{tag}:snapshot-test:added:{uuid.uuid4().hex}"
        await redis.set(added, b"1", ex=600)  # a new key, even a volatile one
        grown = await snapshot(redis, environment.keys)
        assert before.changed(grown) == {volatile.encode(), added.encode()}
        assert grown.without(f"{tag}:snapshot-test:".encode()) == before.without(f"{tag}:snapshot-test:".encode())
        await redis.delete(added)
    finally:
        await redis.delete(lapsing, kept, volatile)
