"""The budget of a campaign category over the consumer shards of a Redis Cluster deployment
(issue 16, docs/scale-out.md 2.1 and "Funding the shards from the published budget").

A consumer shard (shards.py) is a whole deployment's key set in one slot, and its budget is the
hash ``keys.budget(campaign)`` that authorize.lua reads: ``<category>:total``, ``:reserved``,
``:spent``, ``:refunded``. On a cluster the rules are published per shard without tranches, so a
shard's ``<category>:total`` *is* its spendable allocation, and this module is what moves it:

- **fund** sets each shard's part of the released budget (``split(released, S)[k]``):
  ``<category>:funded`` keeps the target applied and ``:total`` moves by the difference, up when
  a tranche comes due, down when a budget is lowered. Idempotent: the same target again moves
  nothing.
- **transfers** move allocation between shards exactly as escrow.py's do (debit in the lender,
  credit in the borrower, settle in the lender; each one script in one slot, idempotent on the
  transfer id, the amount from the lender's record), on ``:total``. The lender gives at most its
  available (``total - reserved - spent``, authorize.lua's rule without tranches), never below 0.
- **rebalance** reads every shard's available (one pipeline per primary) and moves money from
  the richest shards to those below a low-water mark; **sweep** completes transfers left between
  debit and credit; **audit** checks conservation.

Conservation: ``Σ total + F = Σ funded`` at every instant, F being what was debited and not yet
credited (fund moves total and funded together; debit moves total into F, credit out of it).
With every shard's ``reserved + spent ≤ total`` checked by authorize.lua, ``Σ (reserved + spent)
≤ Σ funded``: never past the released budget (unless a budget is lowered below what is already
used, which only stops approvals).

Every script runs through ``acked.run_acked`` (WAIT on the same connection, retried with the
same ids until acknowledged; a replay writes the shard's replay counter). The money events
(``SHARD_FUNDED`` with the signed change, ``TRANSFER_OUT``, ``TRANSFER_IN``, each naming its
campaign) go into the shard's budget stream (``ledger_key``: ``<shard tag>:budget_events``,
beside the sale scripts' ``keys.ledger``), registered for the shard writer before the first one.
Errors: acked.py's EscrowError (bad input, nothing written), EscrowConflict (an id reused with
other values), EscrowUnavailable (not acknowledged in time).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.domain.budget import released
from storage.redis.cluster.acked import EscrowError, EscrowUnavailable, LuaScript, run_acked
from storage.redis.cluster.escrow import CATEGORY_PATTERN, Transfer, _check_fen, _check_id, split
from storage.redis.cluster.nodes import NodeConnections
from storage.redis.cluster.shards import ShardLayout
from storage.redis.cluster.streams import register_streams

RETRY_PAUSE_S = 0.05
# A read of every shard survives these (a redirect, a failover, a dead node): retried with a
# fresh slot map until the deadline.
READ_ERRORS = (
    MovedError,
    AskError,
    TryAgainError,
    ClusterDownError,
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    SlotNotCoveredError,
)

_SCRIPTS = {
    "fund": LuaScript.load("shard_fund"),
    "debit": LuaScript.load("shard_debit"),
    "credit": LuaScript.load("shard_credit"),
    # escrow's settle, unchanged: it only flips the lender's record and leaves the open set.
    "settle": LuaScript.load("escrow_settle"),
}


def released_fen(budget_fen: int, tranches: Sequence[Sequence[int]], now_ms: int) -> int:
    """What a campaign category has released by ``now_ms``: ``budget_fen`` without tranches,
    else the cumulative amount of the last tranche due, at most the budget. ``tranches`` as
    published (storage/redis/reference.py tranche_schedule, the rule JSON's ``tranches``):
    [release ms, cumulative fen], in time order. The same rule as authorize.lua's ``released``
    (server/domain/budget.py); on a cluster it is applied by funding the shards instead."""
    return released([(int(moment), int(cumulative)) for moment, cumulative in tranches], budget_fen, now_ms)


@dataclass(frozen=True)
class ShardFunds:
    """One shard's budget of a campaign category, as the scripts keep it."""

    shard: int
    funded: int
    total: int
    reserved: int
    spent: int
    refunded: int

    @property
    def available(self) -> int:
        """What authorize.lua would approve here (negative after a budget lowered below use)."""
        return self.total - self.reserved - self.spent


@dataclass(frozen=True)
class ShardBudgetAudit:
    """Every shard of a campaign category and its transfers (exact only while nothing runs: the
    primaries are read one pipeline each, not at one instant)."""

    shards: list[ShardFunds]
    open_transfers: dict[int, dict[str, dict[str, Any]]]  # lender -> id -> record, this category
    in_flight: int  # F: debited, not yet credited
    credited_unsettled: int  # credited, the lender's record still open

    @property
    def funded(self) -> int:
        return sum(s.funded for s in self.shards)

    @property
    def total(self) -> int:
        return sum(s.total for s in self.shards)

    @property
    def used(self) -> int:
        """Σ (reserved + spent)."""
        return sum(s.reserved + s.spent for s in self.shards)

    @property
    def conserved(self) -> bool:
        """Σ total + F = Σ funded."""
        return self.total + self.in_flight == self.funded

    @property
    def within_budget(self) -> bool:
        """Σ (reserved + spent) ≤ Σ funded."""
        return self.used <= self.funded


class ShardBudget:
    """The budgets of a deployment's campaigns over its consumer shards (``layout``)."""

    def __init__(
        self,
        cluster: RedisCluster,
        layout: ShardLayout,
        *,
        wait_replicas: int = 1,
        wait_timeout_ms: int = 1000,
        deadline_s: float = 30.0,
    ) -> None:
        if wait_replicas < 0:
            raise EscrowError("wait_replicas must be >= 0")
        self.cluster = cluster
        self.layout = layout
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.deadline_s = deadline_s
        self._nodes = NodeConnections(cluster)
        # Why calls were retried (a redirect, WAIT short of its replicas, a dead connection).
        self.retried: dict[str, int] = {}

    # ---- keys, all in the shard's slot

    def budget_key(self, shard: int, campaign_id: str) -> str:
        """The hash authorize.lua reads: <category>:total, :reserved, :spent, :refunded, and
        :funded (this module's)."""
        return self.layout.keys[shard].budget(campaign_id)

    def transfers_key(self, shard: int, campaign_id: str) -> str:
        """Hash: transfer id -> the lender's record (JSON: category, to, asked, amount, state)."""
        return f"{self.layout.keys[shard].tag}:transfers:{campaign_id}"

    def open_key(self, shard: int, campaign_id: str) -> str:
        """Sorted set: the lender's transfers not yet settled, by debit time (ms)."""
        return f"{self.layout.keys[shard].tag}:transfers_open:{campaign_id}"

    def credited_key(self, shard: int, campaign_id: str) -> str:
        """Hash: transfer id -> "<lender>|<amount>" credited into this shard; kept, so a replay
        adds nothing."""
        return f"{self.layout.keys[shard].tag}:transfers_in:{campaign_id}"

    def replays_key(self, shard: int) -> str:
        """Hash: field ``replays``, written by each replayed answer so that its WAIT vouches
        for the first attempt's write (scale-out.md 3)."""
        return f"{self.layout.keys[shard].tag}:budget_replays"

    def ledger_key(self, shard: int) -> str:
        """The shard's stream of budget movements (SHARD_FUNDED, TRANSFER_OUT, TRANSFER_IN), which
        the shard writer drains into ``shard_events``. Not the shard's ``ledger`` stream: that one
        carries the sale scripts' events in the one-Redis format, for the ledger writer."""
        return f"{self.layout.keys[shard].tag}:budget_events"

    # ---- input

    def _shard(self, shard: int) -> int:
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < self.layout.count:
            raise EscrowError(f"shard must be an integer from 0 to {self.layout.count - 1}")
        return shard

    @staticmethod
    def _campaign(campaign_id: str, category: str | None = None) -> None:
        _check_id("campaign_id", campaign_id)
        if category is not None and (not isinstance(category, str) or not CATEGORY_PATTERN.fullmatch(category)):
            raise EscrowError(f"category must match {CATEGORY_PATTERN.pattern}")

    # ---- funding

    async def fund(self, campaign_id: str, category: str, released_fen: int, version: int = 0) -> list[int]:
        """Fund every shard with its part of ``released_fen`` (split, the remainder to the first
        shards); returns the targets. Idempotent; a lower amount than before takes the
        difference back from each shard's total. ``version``, the plan's (the publication's
        reference version): a shard that has applied a newer one ignores the call, so a
        stale keeper cannot undo a publication; among calls of one version the last applied wins."""
        self._campaign(campaign_id, category)
        _check_fen("released_fen", released_fen, 0)
        _check_fen("version", version, 0)
        targets = split(released_fen, self.layout.count)
        # The shard writer learns of the streams from the registry: listed before any event.
        await register_streams(
            self._nodes,
            self.layout.prefix,
            [self.ledger_key(shard) for shard in range(self.layout.count)],
            wait_replicas=self.wait_replicas,
            wait_timeout_ms=self.wait_timeout_ms,
            deadline_s=self.deadline_s,
        )
        await asyncio.gather(
            *(
                self._run(
                    shard,
                    "fund",
                    [self.budget_key(shard, campaign_id), self.replays_key(shard), self.ledger_key(shard)],
                    [campaign_id, category, target, version],
                )
                for shard, target in enumerate(targets)
            )
        )
        return targets

    # ---- one transfer, step by step

    async def debit(
        self, campaign_id: str, category: str, lender: int, transfer_id: str, asked: int, borrower: int
    ) -> int:
        """Step 1: the amount the lender gave (0 to ``asked``), recorded under the id."""
        self._campaign(campaign_id, category)
        self._shard(lender)
        self._shard(borrower)
        if lender == borrower:
            raise EscrowError("a shard cannot lend to itself")
        _check_id("transfer_id", transfer_id)
        _check_fen("asked", asked, 1)
        answer = await self._run(
            lender,
            "debit",
            [
                self.budget_key(lender, campaign_id),
                self.transfers_key(lender, campaign_id),
                self.open_key(lender, campaign_id),
                self.ledger_key(lender),
                self.replays_key(lender),
            ],
            [transfer_id, campaign_id, category, asked, str(borrower)],
        )
        return int(answer["amount"])

    async def credit(
        self, campaign_id: str, category: str, borrower: int, transfer_id: str, amount: int, lender: int
    ) -> bool:
        """Step 2: add the lender's recorded amount; True if this call added it."""
        self._campaign(campaign_id, category)
        self._shard(borrower)
        self._shard(lender)
        _check_id("transfer_id", transfer_id)
        _check_fen("amount", amount, 1)
        answer = await self._run(
            borrower,
            "credit",
            [
                self.budget_key(borrower, campaign_id),
                self.credited_key(borrower, campaign_id),
                self.ledger_key(borrower),
                self.replays_key(borrower),
            ],
            [transfer_id, campaign_id, category, amount, str(lender)],
        )
        return bool(answer["state"] == "new")

    async def settle(self, campaign_id: str, lender: int, transfer_id: str) -> bool:
        """Step 3, only after the credit was acknowledged; True if this call settled it."""
        self._campaign(campaign_id)
        self._shard(lender)
        _check_id("transfer_id", transfer_id)
        answer = await self._run(
            lender,
            "settle",
            [self.transfers_key(lender, campaign_id), self.open_key(lender, campaign_id), self.replays_key(lender)],
            [transfer_id],
        )
        return bool(answer["state"] == "new")

    async def transfer(
        self, campaign_id: str, category: str, lender: int, borrower: int, asked: int, transfer_id: str | None = None
    ) -> Transfer:
        """The whole transfer: debit, credit, settle, each acknowledged before the next."""
        transfer_id = transfer_id or uuid.uuid4().hex
        amount = await self.debit(campaign_id, category, lender, transfer_id, asked, borrower)
        if amount > 0:
            await self.credit(campaign_id, category, borrower, transfer_id, amount, lender)
            await self.settle(campaign_id, lender, transfer_id)
        return Transfer(transfer_id, lender, borrower, amount)

    # ---- every shard

    async def read(self, campaign_id: str, category: str) -> list[ShardFunds]:
        """Every shard's budget of the category: one pipeline per primary, all at once."""
        self._campaign(campaign_id, category)
        fields = [f"{category}:{name}" for name in ("funded", "total", "reserved", "spent", "refunded")]
        replies = await self._per_shard(lambda pipe, shard: pipe.hmget(self.budget_key(shard, campaign_id), fields))
        return [_funds(shard, values[0]) for shard, values in enumerate(replies)]

    async def rebalance(
        self, campaign_id: str, category: str, *, low_water: int, min_transfer: int = 1
    ) -> list[Transfer]:
        """Move money to the shards whose available is below ``low_water``: each is brought up
        to the even level (Σ available / S) from the shards holding the most above it, richest
        first, so that a crowd hashed to a few shards is not declined while others hold money.
        Transfers under ``min_transfer`` are not made. What a lender gives is what its debit
        finds available at that moment (approvals go on meanwhile). Returns the transfers made."""
        _check_fen("low_water", low_water, 0)
        _check_fen("min_transfer", min_transfer, 1)
        available = [state.available for state in await self.read(campaign_id, category)]
        level = max(0, sum(available)) // self.layout.count
        needy = sorted(
            (s for s in range(self.layout.count) if available[s] < min(low_water, level)), key=available.__getitem__
        )
        lenders = sorted(range(self.layout.count), key=lambda s: -available[s])
        made: list[Transfer] = []
        for borrower in needy:
            for lender in lenders:
                need, surplus = level - available[borrower], available[lender] - level
                if min(need, surplus) < min_transfer:
                    if need < min_transfer:
                        break
                    continue
                moved = await self.transfer(campaign_id, category, lender, borrower, min(need, surplus))
                available[lender] -= moved.amount
                available[borrower] += moved.amount
                if moved.amount > 0:
                    made.append(moved)
        return made

    async def sweep(self, campaign_id: str, min_age_ms: int = 0) -> list[Transfer]:
        """Credit (once) and settle every open transfer of the campaign debited at least
        ``min_age_ms`` ago: what a caller that died between the steps left in flight."""
        self._campaign(campaign_id)
        now_ms = int(time.time() * 1000)

        def queue(pipe: Pipeline, shard: int) -> None:
            pipe.zrangebyscore(self.open_key(shard, campaign_id), "-inf", now_ms - min_age_ms)
            pipe.hgetall(self.transfers_key(shard, campaign_id))

        settled: list[Transfer] = []
        for lender, (open_ids, records) in enumerate(await self._per_shard(queue)):
            by_id = {_text(key): json.loads(value) for key, value in records.items()}
            for transfer_id in map(_text, open_ids):
                record = by_id[transfer_id]
                borrower, amount = int(record["to"]), int(record["amount"])
                await self.credit(campaign_id, record["category"], borrower, transfer_id, amount, lender)
                await self.settle(campaign_id, lender, transfer_id)
                settled.append(Transfer(transfer_id, lender, borrower, amount))
        return settled

    async def audit(self, campaign_id: str, category: str) -> ShardBudgetAudit:
        """Every shard's budget of the category, its open transfers and F."""
        self._campaign(campaign_id, category)
        fields = [f"{category}:{name}" for name in ("funded", "total", "reserved", "spent", "refunded")]

        def queue(pipe: Pipeline, shard: int) -> None:
            pipe.hmget(self.budget_key(shard, campaign_id), fields)
            pipe.zrange(self.open_key(shard, campaign_id), 0, -1)
            pipe.hgetall(self.transfers_key(shard, campaign_id))
            pipe.hgetall(self.credited_key(shard, campaign_id))

        replies = await self._per_shard(queue)
        shards = [_funds(shard, values) for shard, (values, _, _, _) in enumerate(replies)]
        credited = [{_text(key) for key in reply[3]} for reply in replies]
        open_transfers: dict[int, dict[str, dict[str, Any]]] = {}
        in_flight = unsettled = 0
        for lender, (_, open_ids, records, _) in enumerate(replies):
            by_id = {_text(key): json.loads(value) for key, value in records.items()}
            for transfer_id in map(_text, open_ids):
                record = by_id[transfer_id]
                if record["category"] != category:
                    continue
                open_transfers.setdefault(lender, {})[transfer_id] = record
                if transfer_id in credited[int(record["to"])]:
                    unsettled += int(record["amount"])
                else:
                    in_flight += int(record["amount"])
        return ShardBudgetAudit(shards, open_transfers, in_flight, unsettled)

    async def aclose(self) -> None:
        await self._nodes.aclose()

    # ---- calls

    async def _run(self, shard: int, name: str, keys: Sequence[str], args: Sequence[str | int]) -> dict[str, Any]:
        return await run_acked(
            self._nodes,
            _SCRIPTS[name],
            keys,
            args,
            wait_replicas=self.wait_replicas,
            wait_timeout_ms=self.wait_timeout_ms,
            deadline_s=self.deadline_s,
            retried=self.retried,
            label=f"shard_{name} on shard {shard}",
        )

    async def _per_shard(self, queue: Callable[[Pipeline, int], Any]) -> list[list[Any]]:
        """For each shard in order, the replies of the commands ``queue(pipe, shard)`` adds:
        one pipeline per primary (the shards it serves), all primaries at once. Plain reads on
        the primaries; after a redirect, a failover or a dead node, read again with a fresh
        slot map until the deadline."""
        deadline = time.monotonic() + self.deadline_s
        while True:
            try:
                await self._nodes.load_map()
                by_node: dict[tuple[str, int], list[int]] = {}
                for shard in range(self.layout.count):
                    by_node.setdefault(self._nodes.address_of(self.ledger_key(shard)), []).append(shard)
                parts = await asyncio.gather(
                    *(self._read_node(address, shards, queue) for address, shards in by_node.items())
                )
                replies: dict[int, list[Any]] = {}
                for part in parts:
                    replies.update(part)
                return [replies[shard] for shard in range(self.layout.count)]
            except READ_ERRORS as error:
                if time.monotonic() >= deadline:
                    raise EscrowUnavailable(f"shards not read within {self.deadline_s:g} s ({error})") from error
                self.retried["read"] = self.retried.get("read", 0) + 1
                await self._nodes.drop_dead()
                await asyncio.sleep(RETRY_PAUSE_S)
                try:
                    await self._nodes.refresh_map()
                except (*READ_ERRORS, ResponseError):
                    pass  # the next attempt reads with the map it has, or fails the same way

    async def _read_node(
        self, address: tuple[str, int], shards: list[int], queue: Callable[[Pipeline, int], Any]
    ) -> dict[int, list[Any]]:
        async with self._nodes.at(*address).pipeline(transaction=False) as pipe:
            counts = []
            for shard in shards:
                before = len(pipe.command_stack)
                queue(pipe, shard)
                counts.append(len(pipe.command_stack) - before)
            flat = await pipe.execute()
        replies, start = {}, 0
        for shard, count in zip(shards, counts, strict=True):
            replies[shard] = flat[start : start + count]
            start += count
        return replies


def _funds(shard: int, values: Sequence[bytes | None]) -> ShardFunds:
    funded, total, reserved, spent, refunded = (int(value or 0) for value in values)
    return ShardFunds(shard, funded, total, reserved, spent, refunded)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
