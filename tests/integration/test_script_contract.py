"""The Lua side of the script contract, run in Redis: the tranche release rule is the same in
Lua (``released`` in _lib.lua, which authorize and claim_qualification apply) and in Python
(server/domain/budget.py), and a script reading a KEY or ARG its declaration lacks fails
instead of reading nil."""

from __future__ import annotations

import random
from importlib import resources

import orjson
import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from server.domain import budget
from storage.redis import contract

LIBRARY = (resources.files("storage.redis") / "lua" / "_lib.lua").read_text(encoding="utf-8")
RELEASED = (
    LIBRARY
    + """
local results = {}
for _, case in ipairs(cjson.decode(ARGV[1])) do
  results[#results + 1] = released(case[1], case[2], case[3])
end
return results
"""
)


def cases() -> list[tuple[list[tuple[int, int]], int, int]]:
    """(tranches of (release ms, amount), total, now ms): none, all due, none due, some due,
    two at one moment, tranches over the total, a zero total."""
    rng = random.Random(11)
    found: list[tuple[list[tuple[int, int]], int, int]] = [
        ([], 5_000, 10),
        ([(100, 10)], 50, 99),
        ([(100, 10)], 50, 100),
        ([(100, 10), (100, 15)], 50, 100),
        ([(300, 30), (100, 10), (200, 20)], 45, 250),
        ([(100, 10), (200, 20)], 0, 1_000),
    ]
    for _ in range(300):
        tranches = [(rng.randrange(0, 1_000), rng.randrange(0, 10_000)) for _ in range(rng.randrange(0, 6))]
        total = rng.randrange(0, 40_000)
        found.append((tranches, total, rng.randrange(-10, 1_100)))
    return found


async def test_lua_and_python_release_the_same_amount(redis: Redis) -> None:
    batch = cases()
    steps = [[list(step) for step in budget.schedule(tranches)] for tranches, _, _ in batch]
    encoded = orjson.dumps([[step, total, now] for step, (_, total, now) in zip(steps, batch, strict=True)])
    lua = await redis.eval(RELEASED, 0, encoded)
    python = [budget.released(budget.schedule(tranches), total, now) for tranches, total, now in batch]
    # The rule as server/domain/budget.py wrote it before the schedule was shared: the sum of
    # the tranches due, at most the total.
    summed = [
        min(total, sum(amount for moment, amount in tranches if moment <= now)) if tranches else total
        for tranches, total, now in batch
    ]
    assert lua == python == summed
    assert python == [budget.released_by(tranches, total, now) for tranches, total, now in batch]


async def test_a_name_the_declaration_lacks_is_an_error(redis: Redis) -> None:
    cancel = contract.CANCEL
    keys = [f"k{index}" for index in range(len(contract.CancelKeys._fields))]
    args = [str(index) for index in range(len(contract.CancelArgs._fields))]
    code = cancel.lua_bindings() + cancel.bind("return ARG.nonce_ttl_s + #KEY.qualification")
    assert await redis.eval(code, len(keys), *keys, *args) == 6
    with pytest.raises(ValueError, match="not in the script contract"):
        cancel.bind("return ARG.line_ids")
    # An argument the caller did not send is missing, not nil: the script stops before reading any.
    code = cancel.lua_bindings() + cancel.bind("return ARG.consumer_key")
    with pytest.raises(redis_errors.ResponseError, match="not in the script contract: 7 KEYS and 6 ARGV, not 7 and 7"):
        await redis.eval(code, len(keys), *keys, *args[:-1])
