"""The budget of a campaign category over the consumer shards of a Redis Cluster deployment
(issue 16, docs/scale-out.md 2.1 and "Funding the shards from the published budget"), and its
qualification quota, the same mechanism counted in vouchers (:class:`ShardQuota`, below).

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

**The quota** (:class:`ShardQuota`, ``ShardBudget.quota``): a shard's qualification quota hash
``keys.qualification_quota(campaign)`` gets ``<category>:total`` (and ``pack:<id>:total`` for a
voucher pack), which claim_qualification.lua takes as the shard's quota when it is below the
released one. The same scripts fund, debit and credit it, with ``:claimed`` as what is used
(available = ``total - claimed``; claimed goes down when a qualification returns to the pool),
so the same conservation holds in vouchers: ``Σ total + F = Σ funded`` and ``Σ claimed ≤ Σ
funded``, never past the released quota. Vouchers are no money: quota moves write no event (no
``budget_events`` entry for the ledger to book); their transfers keep their own records
(``<shard tag>:quota_transfers:<campaign>`` and its open and credited sets), so a budget's
sweep or audit never meets a quota transfer and the other way round.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Generic, Protocol, TypeVar

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


class ShardSlice(Protocol):
    """One shard's part of what a campaign category shares out (its budget, its quota)."""

    @property
    def shard(self) -> int: ...
    @property
    def funded(self) -> int: ...
    @property
    def total(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def available(self) -> int: ...


SliceT = TypeVar("SliceT", bound=ShardSlice)


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
    def used(self) -> int:
        return self.reserved + self.spent

    @property
    def available(self) -> int:
        """What authorize.lua would approve here (negative after a budget lowered below use)."""
        return self.total - self.reserved - self.spent


@dataclass(frozen=True)
class ShardQuotaSlice:
    """One shard's qualification quota of a campaign category or pack, in vouchers (a pack's
    count packs claimed)."""

    shard: int
    funded: int
    total: int
    claimed: int  # issued and not returned to the pool

    @property
    def used(self) -> int:
        return self.claimed

    @property
    def available(self) -> int:
        """What claim_qualification.lua would still issue here (below 0 after a lowered quota)."""
        return self.total - self.claimed


@dataclass(frozen=True)
class ShardBudgetAudit(Generic[SliceT]):
    """Every shard of a campaign category and its transfers (exact only while nothing runs: the
    primaries are read one pipeline each, not at one instant). A quota's audit is the same, in
    vouchers (``ShardBudgetAudit[ShardQuotaSlice]``)."""

    shards: list[SliceT]
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
        """Σ (reserved + spent); a quota's Σ claimed."""
        return sum(s.used for s in self.shards)

    @property
    def conserved(self) -> bool:
        """Σ total + F = Σ funded."""
        return self.total + self.in_flight == self.funded

    @property
    def within_budget(self) -> bool:
        """Σ (reserved + spent) ≤ Σ funded (a quota's Σ claimed)."""
        return self.used <= self.funded


class _ShardShares(Generic[SliceT]):
    """What :class:`ShardBudget` and :class:`ShardQuota` share: funding, the three transfer
    steps, rebalance, sweep and audit over the consumer shards (``layout``), on the shard's hash
    ``counts_key`` whose ``USED`` fields count what is used of ``<category>:total``."""

    # The fields of <category>: that count what is used (available = total - their sum).
    USED: ClassVar[tuple[str, ...]]
    # The fields read per shard (funded and total first), and the transfer keys' name.
    FIELDS: ClassVar[tuple[str, ...]]
    TRANSFERS: ClassVar[str]
    # What the amount given to fund() is called in its error.
    RELEASED: ClassVar[str]

    def __init__(
        self,
        cluster: RedisCluster,
        layout: ShardLayout,
        *,
        wait_replicas: int = 1,
        wait_timeout_ms: int = 1000,
        deadline_s: float = 30.0,
        nodes: NodeConnections | None = None,
    ) -> None:
        if wait_replicas < 0:
            raise EscrowError("wait_replicas must be >= 0")
        self.cluster = cluster
        self.layout = layout
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.deadline_s = deadline_s
        self._nodes = nodes if nodes is not None else NodeConnections(cluster)
        # Why calls were retried (a redirect, WAIT short of its replicas, a dead connection).
        self.retried: dict[str, int] = {}

    async def server_time_ms(self, key: str) -> int:
        """Redis TIME on the primary serving ``key``'s slot, in ms: the one clock every keeper
        of a deployment reads (keeper.py), as the scripts read their node's."""
        seconds, microseconds = await (await self._nodes.for_key(key)).time()
        return int(seconds) * 1000 + int(microseconds) // 1000

    # ---- what differs

    def counts_key(self, shard: int, campaign_id: str) -> str:
        """The shard's hash of the category's <category>:funded, :total and the USED fields."""
        raise NotImplementedError

    def event_keys(self, shard: int) -> list[str]:
        """The shard's stream of this module's events, or none."""
        raise NotImplementedError

    def _slice(self, shard: int, values: Sequence[bytes | None]) -> SliceT:
        raise NotImplementedError

    @staticmethod
    def _category(category: str) -> None:
        raise NotImplementedError

    async def _before_funding(self) -> None:
        """Anything to do before the first funding writes (the budget registers its streams)."""

    # ---- keys, all in the shard's slot

    def transfers_key(self, shard: int, campaign_id: str) -> str:
        """Hash: transfer id -> the lender's record (JSON: category, to, asked, amount, state)."""
        return f"{self.layout.keys[shard].tag}:{self.TRANSFERS}:{campaign_id}"

    def open_key(self, shard: int, campaign_id: str) -> str:
        """Sorted set: the lender's transfers not yet settled, by debit time (ms)."""
        return f"{self.layout.keys[shard].tag}:{self.TRANSFERS}_open:{campaign_id}"

    def credited_key(self, shard: int, campaign_id: str) -> str:
        """Hash: transfer id -> "<lender>|<amount>" credited into this shard; kept, so a replay
        adds nothing."""
        return f"{self.layout.keys[shard].tag}:{self.TRANSFERS}_in:{campaign_id}"

    def replays_key(self, shard: int) -> str:
        """Hash: field ``replays``, written by each replayed answer so that its WAIT vouches
        for the first attempt's write (scale-out.md 3)."""
        return f"{self.layout.keys[shard].tag}:budget_replays"

    # ---- input

    def _shard(self, shard: int) -> int:
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < self.layout.count:
            raise EscrowError(f"shard must be an integer from 0 to {self.layout.count - 1}")
        return shard

    def _campaign(self, campaign_id: str, category: str | None = None) -> None:
        _check_id("campaign_id", campaign_id)
        if category is not None:
            self._category(category)

    # ---- funding

    async def _fund(self, campaign_id: str, category: str, released: int, version: int) -> list[int]:
        self._campaign(campaign_id, category)
        _check_fen(self.RELEASED, released, 0)
        _check_fen("version", version, 0)
        targets = split(released, self.layout.count)
        await self._before_funding()
        await asyncio.gather(
            *(
                self._run(
                    shard,
                    "fund",
                    [self.counts_key(shard, campaign_id), self.replays_key(shard), *self.event_keys(shard)],
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
                self.counts_key(lender, campaign_id),
                self.transfers_key(lender, campaign_id),
                self.open_key(lender, campaign_id),
                self.replays_key(lender),
                *self.event_keys(lender),
            ],
            [transfer_id, campaign_id, category, asked, str(borrower), *self.USED],
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
                self.counts_key(borrower, campaign_id),
                self.credited_key(borrower, campaign_id),
                self.replays_key(borrower),
                *self.event_keys(borrower),
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

    async def read(self, campaign_id: str, category: str) -> list[SliceT]:
        """Every shard's budget (or quota) of the category: one pipeline per primary, all at once."""
        self._campaign(campaign_id, category)
        fields = [f"{category}:{name}" for name in self.FIELDS]
        replies = await self._per_shard(lambda pipe, shard: pipe.hmget(self.counts_key(shard, campaign_id), fields))
        return [self._slice(shard, values[0]) for shard, values in enumerate(replies)]

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

    async def audit(self, campaign_id: str, category: str) -> ShardBudgetAudit[SliceT]:
        """Every shard's budget (or quota) of the category, its open transfers and F."""
        self._campaign(campaign_id, category)
        fields = [f"{category}:{name}" for name in self.FIELDS]

        def queue(pipe: Pipeline, shard: int) -> None:
            pipe.hmget(self.counts_key(shard, campaign_id), fields)
            pipe.zrange(self.open_key(shard, campaign_id), 0, -1)
            pipe.hgetall(self.transfers_key(shard, campaign_id))
            pipe.hgetall(self.credited_key(shard, campaign_id))

        replies = await self._per_shard(queue)
        shards = [self._slice(shard, values) for shard, (values, _, _, _) in enumerate(replies)]
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
                    by_node.setdefault(self._nodes.address_of(self.replays_key(shard)), []).append(shard)
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


class ShardBudget(_ShardShares[ShardFunds]):
    """The budgets of a deployment's campaigns over its consumer shards (``layout``)."""

    USED = ("reserved", "spent")
    FIELDS = ("funded", "total", "reserved", "spent", "refunded")
    TRANSFERS = "transfers"
    RELEASED = "released_fen"

    def budget_key(self, shard: int, campaign_id: str) -> str:
        """The hash authorize.lua reads: <category>:total, :reserved, :spent, :refunded, and
        :funded (this module's)."""
        return self.layout.keys[shard].budget(campaign_id)

    def counts_key(self, shard: int, campaign_id: str) -> str:
        return self.budget_key(shard, campaign_id)

    def ledger_key(self, shard: int) -> str:
        """The shard's stream of budget movements (SHARD_FUNDED, TRANSFER_OUT, TRANSFER_IN), which
        the shard writer drains into ``shard_events``. Not the shard's ``ledger`` stream: that one
        carries the sale scripts' events in the one-Redis format, for the ledger writer."""
        return f"{self.layout.keys[shard].tag}:budget_events"

    def event_keys(self, shard: int) -> list[str]:
        return [self.ledger_key(shard)]

    @cached_property
    def quota(self) -> ShardQuota:
        """The qualification quota over the same shards, on this budget's connections (closed by
        its ``aclose``), so that what holds a budget (the keeper) moves the quota too."""
        return ShardQuota(
            self.cluster,
            self.layout,
            wait_replicas=self.wait_replicas,
            wait_timeout_ms=self.wait_timeout_ms,
            deadline_s=self.deadline_s,
            nodes=self._nodes,
        )

    def _slice(self, shard: int, values: Sequence[bytes | None]) -> ShardFunds:
        funded, total, reserved, spent, refunded = (int(value or 0) for value in values)
        return ShardFunds(shard, funded, total, reserved, spent, refunded)

    @staticmethod
    def _category(category: str) -> None:
        if not isinstance(category, str) or not CATEGORY_PATTERN.fullmatch(category):
            raise EscrowError(f"category must match {CATEGORY_PATTERN.pattern}")

    async def _before_funding(self) -> None:
        # The shard writer learns of the streams from the registry: listed before any event.
        await register_streams(
            self._nodes,
            self.layout.prefix,
            [self.ledger_key(shard) for shard in range(self.layout.count)],
            wait_replicas=self.wait_replicas,
            wait_timeout_ms=self.wait_timeout_ms,
            deadline_s=self.deadline_s,
        )

    async def fund(self, campaign_id: str, category: str, released_fen: int, version: int = 0) -> list[int]:
        """Fund every shard with its part of ``released_fen`` (split, the remainder to the first
        shards); returns the targets. Idempotent; a lower amount than before takes the
        difference back from each shard's total. ``version``, the plan's (the publication's
        reference version): a shard that has applied a newer one ignores the call, so a
        stale keeper cannot undo a publication; among calls of one version the last applied wins."""
        return await self._fund(campaign_id, category, released_fen, version)


# What a quota is kept for: a rule's category, or a campaign's voucher pack ("pack:<pack id>",
# the field claim_qualification.lua counts a pack under; pack ids as server/domain/reference.py
# IDENTIFIER).
QUOTA_SUBJECT_PATTERN = re.compile(rf"(?:{CATEGORY_PATTERN.pattern}|pack:[A-Za-z0-9_.-]{{1,64}})")


class ShardQuota(_ShardShares[ShardQuotaSlice]):
    """The qualification quotas of a deployment's campaigns over its consumer shards, counted in
    vouchers (a pack's in packs): ``category`` is a rule's category or ``pack:<pack id>``. Every
    method is ShardBudget's, on the quota hash, with available = ``total - claimed``; nothing is
    written to the budget's event stream."""

    USED = ("claimed",)
    FIELDS = ("funded", "total", "claimed")
    TRANSFERS = "quota_transfers"
    RELEASED = "released"

    def quota_key(self, shard: int, campaign_id: str) -> str:
        """The hash claim_qualification.lua reads: <category>:claimed and <category>:total (the
        shard's quota), and :funded, :funded_version (this module's)."""
        return self.layout.keys[shard].qualification_quota(campaign_id)

    def counts_key(self, shard: int, campaign_id: str) -> str:
        return self.quota_key(shard, campaign_id)

    def event_keys(self, shard: int) -> list[str]:
        return []  # vouchers are no money: no event for the shard ledger

    def _slice(self, shard: int, values: Sequence[bytes | None]) -> ShardQuotaSlice:
        funded, total, claimed = (int(value or 0) for value in values)
        return ShardQuotaSlice(shard, funded, total, claimed)

    @staticmethod
    def _category(category: str) -> None:
        if not isinstance(category, str) or not QUOTA_SUBJECT_PATTERN.fullmatch(category):
            raise EscrowError(f"category must match {QUOTA_SUBJECT_PATTERN.pattern}")

    async def fund(self, campaign_id: str, category: str, released: int, version: int = 0) -> list[int]:
        """Fund every shard with its part of the ``released`` quota (vouchers, or packs): as
        ShardBudget.fund. A shard's total is then at most its part, and claims there issue at
        most that many (claim_qualification.lua takes the smaller of it and the released quota)."""
        return await self._fund(campaign_id, category, released, version)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
