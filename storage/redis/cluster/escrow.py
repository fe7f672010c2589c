"""Escrow budget shards on Redis Cluster (issue 16, docs/scale-out.md section 2.1): standalone,
not used by the gateway yet.

A campaign category's budget B is split over S shards, each in its own hash slot
(``{<prefix>:<campaign>:s<i>}``), so that an approval is one script in one slot. A shard that
runs short borrows from another by a transfer in three steps, each a script in one slot and
idempotent on the transfer id:

1. **debit** (lender): take up to the asked amount of its unreserved allocation, record the
   transfer (amount, borrower, DEBITED) and list it as open;
2. **credit** (borrower): add the recorded amount, once per transfer id;
3. **settle** (lender): the record becomes CREDITED and leaves the open set, only after 2 was
   acknowledged.

Invariant I1: Σ alloc + F = B at every instant, where F is the amount of DEBITED records not yet
credited (in flight); I2: Σ reserved ≤ B, since each shard keeps reserved ≤ alloc. A crash
between 1 and 2 leaves money in F; :meth:`EscrowBudget.sweep` credits and settles it once.

**Durability across a failover.** Each script is pipelined with ``WAIT <replicas> <timeout>`` on
the same connection (one round trip) and its effect counts only when WAIT says the replicas have
it: an answer given, or the next step of a transfer started, only then. Otherwise the call is
retried with the same ids, which is safe whether the first write survived or not. With one
replica per primary and ``WAIT 1``, a primary killed after an acknowledgement hands its slots to
a replica that has the write (scale-out.md section 3 says what this does not cover).

The cluster client (``redis.asyncio.cluster.RedisCluster``) keeps the slot map; each step is
sent on a plain connection to the slot's primary so that the WAIT follows the script on the
same connection (the cluster client's own pipeline may re-send commands one by one after a
redirect, on other connections, where a WAIT would vouch for nothing). MOVED refreshes the slot
map, ASK is followed with ASKING, TRYAGAIN / CLUSTERDOWN / a dead connection are retried until
``deadline_s``; then :class:`EscrowUnavailable` (``acked.run_acked``, shared with the consumer
shards' budget transfers in shard_budget.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

# The errors live in acked.py (shared with shard_budget.py) and are still imported from here.
from storage.redis.cluster.acked import EscrowConflict as EscrowConflict
from storage.redis.cluster.acked import EscrowError as EscrowError
from storage.redis.cluster.acked import EscrowUnavailable as EscrowUnavailable
from storage.redis.cluster.acked import LuaScript, run_acked
from storage.redis.cluster.nodes import NodeConnections
from storage.redis.cluster.streams import register_streams
from storage.redis.keys import PREFIX_PATTERN

ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
CATEGORY_PATTERN = re.compile(r"[a-z0-9_]{1,32}")
# Every amount stays below 2^53 so that the scripts' doubles are exact; 10^15 fen is ten
# trillion yuan, far above any campaign.
MAX_FEN = 10**15
MAX_SHARDS = 1024
SLOTS = 16384


@dataclass(frozen=True)
class Reservation:
    approved: bool
    shard: int
    available: int  # the shard's unreserved allocation after this call
    new: bool  # this call reserved (False: the id had been reserved before, or a decline)


@dataclass(frozen=True)
class Transfer:
    transfer_id: str
    lender: int
    borrower: int
    amount: int


@dataclass(frozen=True)
class ShardState:
    shard: int
    slice: int
    alloc: int
    reserved: int
    reservations: int  # ids in the reservations hash
    open_transfers: dict[str, dict[str, Any]]  # id -> record, DEBITED and not settled
    credited: dict[str, int]  # transfer id -> amount credited into this shard


@dataclass(frozen=True)
class Audit:
    """A snapshot of every shard (exact only while no call runs: the shards are read one by one)."""

    budget: int
    shards: list[ShardState]
    in_flight: int  # F: debited, not yet credited
    debited_credited_unsettled: int  # credited but the lender's record still open

    @property
    def alloc(self) -> int:
        return sum(s.alloc for s in self.shards)

    @property
    def reserved(self) -> int:
        return sum(s.reserved for s in self.shards)

    @property
    def conserved(self) -> bool:
        """I1: Σ alloc + F = B."""
        return self.alloc + self.in_flight == self.budget


def _check_id(what: str, value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise EscrowError(f"{what} must match {ID_PATTERN.pattern}")
    return value


def _check_fen(what: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_FEN:
        raise EscrowError(f"{what} must be an integer from {minimum} to {MAX_FEN}")
    return value


def split(budget: int, shards: int) -> list[int]:
    """Each shard's initial slice: equal, the remainder to the first shards, summing to budget."""
    base, rest = divmod(budget, shards)
    return [base + (1 if i < rest else 0) for i in range(shards)]


_SCRIPTS = {
    name: LuaScript.load(name)
    for name in ("escrow_setup", "escrow_reserve", "escrow_debit", "escrow_credit", "escrow_settle")
}


class EscrowBudget:
    """One campaign category's budget over ``shards`` slots of a Redis Cluster."""

    def __init__(
        self,
        cluster: RedisCluster,
        *,
        prefix: str,
        campaign_id: str,
        category: str,
        shards: int,
        wait_replicas: int = 1,
        wait_timeout_ms: int = 1000,
        deadline_s: float = 30.0,
    ) -> None:
        if not PREFIX_PATTERN.match(prefix):
            raise EscrowError(f"prefix must match {PREFIX_PATTERN.pattern}")
        _check_id("campaign_id", campaign_id)
        if not CATEGORY_PATTERN.fullmatch(category):
            raise EscrowError(f"category must match {CATEGORY_PATTERN.pattern}")
        if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
            raise EscrowError(f"shards must be an integer from 1 to {MAX_SHARDS}")
        if wait_replicas < 0:
            raise EscrowError("wait_replicas must be >= 0")
        self.cluster = cluster
        self.prefix = prefix
        self.campaign_id = campaign_id
        self.category = category
        self.shards = shards
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.deadline_s = deadline_s
        self._nodes = NodeConnections(cluster)
        self._tags: dict[int, str] = {}
        # Why calls were retried (a redirect, WAIT short of its replicas, a dead connection):
        # counts for tests and metrics.
        self.retried: dict[str, int] = {}

    # ---- keys

    def tag(self, shard: int) -> str:
        """The shard's hash tag ``{<prefix>:<campaign>:s<shard>.<salt>}``: the smallest salt
        that puts shard i in the i-th of S equal ranges of the 16,384 slots, so the shards
        spread evenly over the primaries however the slots are divided among them (a plain
        ``s<i>`` lets CRC16 put several shards of a campaign on one node)."""
        tag = self._tags.get(shard)
        if tag is None:
            low, high = shard * SLOTS // self.shards, (shard + 1) * SLOTS // self.shards
            salt = 0
            while True:
                tag = f"{self.prefix}:{self.campaign_id}:s{shard}.{salt}"
                if low <= key_slot(tag.encode()) < high:
                    break
                salt += 1
            tag = "{" + tag + "}"
            self._tags[shard] = tag
        return tag

    def escrow_key(self, shard: int) -> str:
        """Hash: <category>:slice (the initial share), :alloc (owned now), :reserved."""
        return f"{self.tag(shard)}:escrow"

    def reservations_key(self, shard: int) -> str:
        return f"{self.tag(shard)}:resv"

    def transfers_key(self, shard: int) -> str:
        """Hash: transfer id -> the lender's record (JSON)."""
        return f"{self.tag(shard)}:xout"

    def open_key(self, shard: int) -> str:
        """Sorted set: the lender's transfers not yet settled, by debit time (ms)."""
        return f"{self.tag(shard)}:xopen"

    def credited_key(self, shard: int) -> str:
        """Hash: transfer id -> amount credited into this shard; kept, so a replay adds nothing."""
        return f"{self.tag(shard)}:xin"

    def ledger_key(self, shard: int) -> str:
        return f"{self.tag(shard)}:ledger"

    def shard_of(self, consumer_key: str) -> int:
        """The consumer's shard: their per-person keys and this budget slice share its slot."""
        digest = hashlib.sha256(consumer_key.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.shards

    def _check_shard(self, shard: int) -> int:
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < self.shards:
            raise EscrowError(f"shard must be an integer from 0 to {self.shards - 1}")
        return shard

    # ---- calls

    async def setup(self, budget: int) -> list[int]:
        """Split ``budget`` over the shards (once; a second call with the same budget is a
        no-op, another budget is an EscrowConflict on the first shard that differs)."""
        _check_fen("budget", budget, 0)
        slices = split(budget, self.shards)
        # The writer learns of the shards' streams from the registry: listed before any event.
        await register_streams(
            self._nodes,
            self.prefix,
            [self.ledger_key(shard) for shard in range(self.shards)],
            wait_replicas=self.wait_replicas,
            wait_timeout_ms=self.wait_timeout_ms,
            deadline_s=self.deadline_s,
        )
        for shard, slice_fen in enumerate(slices):
            await self._run(
                shard,
                "escrow_setup",
                [self.escrow_key(shard), self.ledger_key(shard)],
                [self.category, slice_fen, budget, self.shards],
            )
        return slices

    async def reserve(self, shard: int, reservation_id: str, amount: int) -> Reservation:
        """Reserve ``amount`` from ``shard`` alone (no borrowing), idempotent on the id."""
        self._check_shard(shard)
        _check_id("reservation_id", reservation_id)
        _check_fen("amount", amount, 1)
        answer = await self._run(
            shard,
            "escrow_reserve",
            [self.escrow_key(shard), self.reservations_key(shard), self.ledger_key(shard)],
            [reservation_id, self.category, amount],
        )
        return Reservation(
            approved=answer["decision"] == "APPROVED",
            shard=shard,
            available=int(answer["available"]),
            new=answer.get("state") == "new",
        )

    async def debit(self, lender: int, transfer_id: str, asked: int, borrower: int) -> int:
        """Step 1: the amount the lender gave (0 to ``asked``), recorded under the id."""
        self._check_shard(lender)
        self._check_shard(borrower)
        if lender == borrower:
            raise EscrowError("a shard cannot lend to itself")
        _check_id("transfer_id", transfer_id)
        _check_fen("asked", asked, 1)
        answer = await self._run(
            lender,
            "escrow_debit",
            [self.escrow_key(lender), self.transfers_key(lender), self.open_key(lender), self.ledger_key(lender)],
            [transfer_id, self.category, asked, str(borrower)],
        )
        return int(answer["amount"])

    async def credit(self, borrower: int, transfer_id: str, amount: int, lender: int) -> bool:
        """Step 2: add the lender's recorded amount; True if this call added it."""
        self._check_shard(borrower)
        _check_id("transfer_id", transfer_id)
        _check_fen("amount", amount, 1)
        answer = await self._run(
            borrower,
            "escrow_credit",
            [self.escrow_key(borrower), self.credited_key(borrower), self.ledger_key(borrower)],
            [transfer_id, self.category, amount, str(lender)],
        )
        return bool(answer["state"] == "new")

    async def settle(self, lender: int, transfer_id: str) -> bool:
        """Step 3, only after the credit was acknowledged; True if this call settled it."""
        self._check_shard(lender)
        _check_id("transfer_id", transfer_id)
        answer = await self._run(
            lender,
            "escrow_settle",
            [self.transfers_key(lender), self.open_key(lender), self.escrow_key(lender)],
            [transfer_id],
        )
        return bool(answer["state"] == "new")

    async def borrow(self, borrower: int, lender: int, asked: int, transfer_id: str | None = None) -> Transfer:
        """The whole transfer: debit, credit, settle, each acknowledged before the next."""
        transfer_id = transfer_id or uuid.uuid4().hex
        amount = await self.debit(lender, transfer_id, asked, borrower)
        if amount > 0:
            await self.credit(borrower, transfer_id, amount, lender)
            await self.settle(lender, transfer_id)
        return Transfer(transfer_id, lender, borrower, amount)

    async def reserve_or_borrow(
        self,
        shard: int,
        reservation_id: str,
        amount: int,
        *,
        chunk: int = 1,
        rng: random.Random | None = None,
    ) -> Reservation:
        """Reserve from ``shard``; when short, borrow at least ``chunk`` (and what is missing)
        from the other shards in random order until one gives, then reserve again. Declined
        only after a pass over every other shard gave nothing: the budget may then still have a
        few fen in flight or in a shard that a concurrent transfer just filled (scale-out.md
        2.1: declines may come just before exhaustion, never after it)."""
        rng = rng or random.Random()
        while True:
            reservation = await self.reserve(shard, reservation_id, amount)
            if reservation.approved:
                return reservation
            need = max(amount - reservation.available, chunk)
            lenders = [s for s in range(self.shards) if s != shard]
            rng.shuffle(lenders)
            for lender in lenders:
                if (await self.borrow(shard, lender, need)).amount > 0:
                    break
            else:
                return reservation

    async def sweep(self, min_age_ms: int = 0) -> list[Transfer]:
        """Credit (once) and settle every open transfer debited at least ``min_age_ms`` ago:
        what a borrower that died between the steps left in flight."""
        settled: list[Transfer] = []
        await self.refresh()
        now_ms = int(time.time() * 1000)
        for lender in range(self.shards):
            client = await self._node_client(self.transfers_key(lender))
            ids = await client.zrangebyscore(self.open_key(lender), "-inf", now_ms - min_age_ms)
            for raw_id in ids:
                transfer_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                raw = await client.hget(self.transfers_key(lender), transfer_id)
                if raw is None:
                    continue
                record = json.loads(raw)
                borrower, amount = int(record["to"]), int(record["amount"])
                await self.credit(borrower, transfer_id, amount, lender)
                await self.settle(lender, transfer_id)
                settled.append(Transfer(transfer_id, lender, borrower, amount))
        return settled

    async def audit(self, budget: int) -> Audit:
        """Every shard's allocation, reservations and transfers, and F."""
        shards: list[ShardState] = []
        await self.refresh()
        for shard in range(self.shards):
            client = await self._node_client(self.escrow_key(shard))
            async with client.pipeline(transaction=False) as pipe:
                pipe.hmget(
                    self.escrow_key(shard),
                    [f"{self.category}:slice", f"{self.category}:alloc", f"{self.category}:reserved"],
                )
                pipe.hlen(self.reservations_key(shard))
                pipe.zrange(self.open_key(shard), 0, -1)
                pipe.hgetall(self.transfers_key(shard))
                pipe.hgetall(self.credited_key(shard))
                fields, count, open_ids, transfers, credited = await pipe.execute()
            open_set = {_text(i) for i in open_ids}
            shards.append(
                ShardState(
                    shard=shard,
                    slice=int(fields[0] or 0),
                    alloc=int(fields[1] or 0),
                    reserved=int(fields[2] or 0),
                    reservations=int(count),
                    open_transfers={_text(k): json.loads(v) for k, v in transfers.items() if _text(k) in open_set},
                    credited={_text(k): int(v) for k, v in credited.items()},
                )
            )
        in_flight = unsettled = 0
        for state in shards:
            for transfer_id, record in state.open_transfers.items():
                if transfer_id in shards[int(record["to"])].credited:
                    unsettled += int(record["amount"])
                else:
                    in_flight += int(record["amount"])
        return Audit(budget=budget, shards=shards, in_flight=in_flight, debited_credited_unsettled=unsettled)

    async def refresh(self) -> None:
        """Reload the slot map (reads go to the primaries it names; a failover moved them)."""
        await self.cluster.initialize()
        await self.cluster.nodes_manager.initialize()

    async def aclose(self) -> None:
        await self._nodes.aclose()

    # ---- one acknowledged script call

    async def _node_client(self, key: str) -> redis.asyncio.Redis:
        return await self._nodes.for_key(key)

    async def _run(self, shard: int, name: str, keys: Sequence[str], args: Sequence[str | int]) -> dict[str, Any]:
        """Run the script on the slot's primary, acknowledged by the replicas (acked.py)."""
        return await run_acked(
            self._nodes,
            _SCRIPTS[name],
            keys,
            args,
            wait_replicas=self.wait_replicas,
            wait_timeout_ms=self.wait_timeout_ms,
            deadline_s=self.deadline_s,
            retried=self.retried,
            label=f"{name} on shard {shard}",
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
