"""The bench's Redis-direct scenario (benchmarks/redis_direct.py) does what it reports: every
command it builds is an approvable Authorize the script approves, and its RESP reader handles
replies split anywhere. No assertion on speed."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

from redis.asyncio import Redis

from benchmarks import redis_direct
from storage.devenv import Services
from tests.conftest import isolated_environment


def test_reply_parser_waits_for_split_replies() -> None:
    whole = b'*2\r\n$2\r\nok\r\n$14\r\n{"a":"APPROV"}\r\n-NOSCRIPT No matching script\r\n:7\r\n'
    for cut in range(len(whole)):
        head = whole[:cut]
        parsed = redis_direct.parse_reply(head, 0)
        if parsed is not None:  # a complete first reply can only end at its own CRLF
            assert parsed[1] <= cut
    first = redis_direct.parse_reply(whole, 0)
    assert first is not None and first[0] == [b"ok", b'{"a":"APPROV"}']
    second = redis_direct.parse_reply(whole, first[1])
    assert second is not None and second[0] == ("error", "NOSCRIPT No matching script")
    assert redis_direct.outcome(second[0]) == "REDIS_NOSCRIPT"
    third = redis_direct.parse_reply(whole, second[1])
    assert third == (7, len(whole))
    assert redis_direct.parse_reply(b"$5\r\nab", 0) is None


def test_encoded_command_is_resp() -> None:
    assert redis_direct.encode_command(("EVALSHA", "ab", 2, "k")) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$1\r\nk\r\n"
    )


async def test_pipelined_evalshas_approve_every_call(services: Services) -> None:
    async with isolated_environment(services) as env:
        url = urlparse(env.redis_url)
        await redis_direct.preload_scripts(env.redis_url)
        spec = redis_direct.DirectSpec(
            redis_host=url.hostname or "127.0.0.1",
            redis_port=url.port or 6379,
            db=int(url.path.lstrip("/") or 0),
            prefix=env.prefix,
            hold_ttl_s=600,
            terminal_id="t-main-01",
            merchant_id="m-main",
            campaign_id="c-main",
            gtin="6970000000024",  # grade 2, no serial: 15% of 3,000 yuan
            price_fen=300_000,
            depth=8,
            commands=40,
            warmup_s=0.0,
            duration_s=30.0,
        )
        results = await asyncio.to_thread(redis_direct.run_round, spec, 2)
        assert [result.sent for result in results] == [40, 40]
        assert all(result.ran_out for result in results)
        assert sum(result.completed_in_window for result in results) == 80
        assert [result.outcomes for result in results] == [{"APPROVED": 40}, {"APPROVED": 40}]
        redis = Redis.from_url(env.redis_url)
        try:
            # Each approval left its authorization behind, each under a distinct id.
            held = await redis.zcard(env.keys.holds)
            reserved = await redis.hget(env.keys.budget("c-main"), "fridge:reserved")
        finally:
            await redis.aclose()
        assert held == 80
        assert int(reserved or 0) == 80 * 45_000
