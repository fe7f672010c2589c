"""Basket vouchers' apportioning is the same in Lua (``apportion`` in _lib.lua, which
authorize.lua applies) and in Python (server/domain/basket.py), including baskets whose
products of amount off and price pass 2^53, where Lua's doubles would round."""

from __future__ import annotations

import random
from importlib import resources

import orjson
from redis.asyncio import Redis

from server.domain.basket import apportion

LIBRARY = (resources.files("storage.redis") / "lua" / "_lib.lua").read_text(encoding="utf-8")
APPORTION = (
    LIBRARY
    + """
local results = {}
for _, case in ipairs(cjson.decode(ARGV[1])) do
  local shares = apportion(case[1], case[2])
  for i, share in ipairs(shares) do shares[i] = string.format('%d', share) end
  results[#results + 1] = table.concat(shares, ',')
end
return results
"""
)
PRICE_MAX = 10_000_000_000 - 1


def cases() -> list[tuple[int, list[int]]]:
    """Ties, the extra fen on a later line, one line, the largest basket, products far past
    2^53 with remainders that differ only in their last digits, and random baskets."""
    rng = random.Random(13)
    found = [
        (1000, [3000, 3000, 3000]),
        (50, [100, 100, 101]),
        (2, [1, 1, 1]),
        (5000, [20_000]),
        (0, [7, 9]),
        (PRICE_MAX, [PRICE_MAX] * 100),
        (PRICE_MAX, [PRICE_MAX - 1, PRICE_MAX, PRICE_MAX - 2]),
        (9_999_999_967, [PRICE_MAX, 1, PRICE_MAX - 1, 3]),
        # Two lines whose remainders differ by less than the rounding of a double product:
        # computed as floor(off * price / total) in doubles, the extra fen goes to the wrong line.
        (9_089_100_000, [7_177_940_767, 7_841_244_310]),
        (3_417_331_015, [8_163_394_538, 8_647_405_613]),
    ]
    for _ in range(300):
        prices = [
            rng.choice([rng.randrange(1, 100), rng.randrange(1, PRICE_MAX)]) for _ in range(rng.randrange(1, 101))
        ]
        found.append((rng.randrange(0, min(sum(prices), PRICE_MAX) + 1), prices))
    return found


async def test_lua_and_python_apportion_the_same_shares(redis: Redis) -> None:
    batch = cases()
    # JSON numbers up to 10^12 are exact in cjson's doubles.
    lua = await redis.eval(APPORTION, 0, orjson.dumps([[off, prices] for off, prices in batch]))
    python = [",".join(str(share) for share in apportion(off, prices)) for off, prices in batch]
    assert [item.decode() for item in lua] == python
