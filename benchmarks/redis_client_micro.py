"""The gateway process's CPU per Authorize script call, lean path against redis-py, in one process.

``python -m benchmarks.redis_client_micro [redis-url]`` (default the dev Redis): builds each call
with the project's own ``RedisStore.authorize`` (fresh request, nonce, consumer and
authorization ids; a campaign that does not exist, so the script answers at once and nothing is
written but the nonce and idempotency keys, under a random prefix, with 60 s TTLs),
keeps 32 calls in flight, and alternates 5 rounds of 4,000 calls through each client. CPU is
this process's ``time.process_time`` per call: key and argument building, encoding, the event
loop's socket work and reply parsing; not Redis's. Not part of ``make bench`` (no gRPC): it
isolates what the lean path saves per call (issue 15).
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import sys
import time
import uuid

import uvloop
from redis.asyncio import BlockingConnectionPool, Redis

from storage.redis.keys import Keys
from storage.redis.lean import LeanRedis
from storage.redis.scripts import Scripts
from storage.redis.store import AuthorizeInput, LineInput, RedisStore, StoreLimits

CALLS = 4000
IN_FLIGHT = 32
ROUNDS = 5


def request() -> AuthorizeInput:
    return AuthorizeInput(
        payload_hash=secrets.token_hex(32),
        request_id=str(uuid.uuid4()),
        terminal_id="t-micro",
        merchant_id="m-micro",
        nonce=secrets.token_hex(16),
        campaign_id="c-none",
        consumer_key=secrets.token_hex(32),
        channel=1,
        authorization_id=uuid.uuid4().hex,
        lines=[LineInput("1", "6970000000017", 300_000, "")],
    )


async def measure(store: RedisStore, calls: int) -> tuple[float, float]:
    """(CPU-µs per call, calls/s) of ``calls`` authorizations, IN_FLIGHT at a time."""
    pending = iter([request() for _ in range(calls)])

    async def worker() -> None:
        for item in pending:
            await store.authorize(item)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return (time.process_time() - cpu) / calls * 1e6, calls / (time.perf_counter() - wall)


async def main(url: str) -> None:
    redis = Redis(connection_pool=BlockingConnectionPool.from_url(url, max_connections=64))
    lean = LeanRedis.from_url(url)
    if lean is None:
        raise SystemExit(f"the lean path does not support {url}")
    keys = Keys("micro" + secrets.token_hex(3))
    limits = StoreLimits(hold_ttl_s=60, idempotency_ttl_s=60, nonce_ttl_s=60)
    through_redis_py = RedisStore(redis, keys, Scripts(redis), limits)
    through_lean = RedisStore(redis, keys, Scripts(redis, lean), limits)
    await Scripts(redis).preload()
    stores = {"redis-py": through_redis_py, "lean": through_lean}
    for store in stores.values():  # warm-up
        await measure(store, 500)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in stores}
    for _ in range(ROUNDS):
        for name, store in stores.items():
            results[name].append(await measure(store, CALLS))
    for name, rounds in results.items():
        cpu = [value[0] for value in rounds]
        rate = [value[1] for value in rounds]
        print(
            f"{name:9} CPU-µs per call median {statistics.median(cpu):6.1f} (rounds {min(cpu):.1f}–{max(cpu):.1f}),"
            f" calls/s median {statistics.median(rate):,.0f}"
        )
    await lean.aclose()
    await redis.aclose()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"))
