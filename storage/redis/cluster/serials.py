"""Device serials on a cluster deployment (issue 16, docs/scale-out.md 2.2 and 2.0): one subsidy
per device across every consumer shard.

A sale runs in its consumer's shard, but a device may be sold to anyone, so its serial's
uniqueness cannot live there. Each serial has a **home shard** (a hash of the serial, not of the
consumer) holding its owner record ``<home tag>:serial_owner:<serial>`` ("P:<authorization id>"
while the sale's hold lives, "C:<id>" once captured) and the home shard's pending set
``<home tag>:serial_pending`` (serial by the reservation's expiry). ShardedStore
(shards.py) reserves a sale's serials *before* its authorize script runs (one script per serial,
all at once, each acknowledged by a replica: ``acked.run_acked``), confirms them after a capture,
and releases them after a decline, a void or a refund of their line. The authorization id is
derived from the terminal and the request id, so a retry of the sale on any gateway reserves
under the same id (a no-op) and replays the first answer.

Nothing here trusts a step to have happened: :meth:`SerialRegistry.settle_due` (every cluster
gateway's sweep) takes the reservations past their expiry and asks the authorization itself,
in the shard its id names: captured, confirm; still pending, look again at its new expiry;
voided, expired, refunded, declined or never made, release. A gateway killed between the
reservation and the sale, a sale refused or declined before its script stored an answer, a lost
void's release, a lost confirmation: each is settled by the sweep. A lost release after a
*refund* is not (the record was confirmed, no longer pending): the device stays counted, which
fails safe (never twice).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio.cluster import RedisCluster

from storage.redis.cluster.acked import LuaScript, run_acked
from storage.redis.cluster.nodes import NodeConnections
from storage.redis.contract import LINES
from storage.redis.keys import Keys

# A reservation is looked at this long after its sale's hold expires (the hold's own sweep goes
# first, so the sweep of serials finds the authorization settled).
GRACE_MS = 5_000
_SCRIPTS = {name: LuaScript.load(f"serial_{name}") for name in ("reserve", "settle")}
Action = Literal["confirm", "release", "extend"]


@dataclass(frozen=True)
class Reserved:
    """What reserving a serial for an authorization found: ``new``, ``again`` (this
    authorization holds it already: a retry) or ``held`` by another authorization (``by``)."""

    state: str
    by: str = ""


class SerialRegistry:
    """The owner records of device serials over a layout's consumer shards (their home shards)."""

    def __init__(
        self,
        cluster: RedisCluster,
        shard_keys: Sequence[Keys],
        *,
        wait_replicas: int = 1,
        wait_timeout_ms: int = 500,
        deadline_s: float = 5.0,
    ) -> None:
        self.cluster = cluster
        self.shard_keys = tuple(shard_keys)
        self.wait_replicas, self.wait_timeout_ms, self.deadline_s = wait_replicas, wait_timeout_ms, deadline_s
        self._nodes = NodeConnections(cluster)
        self.retried: dict[str, int] = {}

    async def aclose(self) -> None:
        await self._nodes.aclose()

    def home(self, serial: str) -> int:
        """The serial's home shard (a hash of the serial: any consumer's sale of the device meets
        the same record)."""
        return zlib.crc32(b"serial:" + serial.encode()) % len(self.shard_keys)

    def owner_key(self, serial: str) -> str:
        return f"{self.shard_keys[self.home(serial)].tag}:serial_owner:{serial}"

    def pending_key(self, shard: int) -> str:
        return f"{self.shard_keys[shard].tag}:serial_pending"

    def replays_key(self, shard: int) -> str:
        return f"{self.shard_keys[shard].tag}:serial_replays"

    def _keys(self, serial: str) -> list[str]:
        home = self.home(serial)
        return [self.owner_key(serial), self.pending_key(home), self.replays_key(home)]

    async def _run(self, name: str, serial: str, args: Sequence[str | int]) -> dict[str, Any]:
        return await run_acked(
            self._nodes,
            _SCRIPTS[name],
            self._keys(serial),
            args,
            wait_replicas=self.wait_replicas,
            wait_timeout_ms=self.wait_timeout_ms,
            deadline_s=self.deadline_s,
            retried=self.retried,
            label=f"serial_{name}",
        )

    async def reserve(self, serials: Sequence[str], authorization_id: str, expires_ms: int) -> dict[str, Reserved]:
        """Each serial reserved for the authorization until ``expires_ms`` unless another holds
        it; all at once. Raises EscrowUnavailable when a home shard does not acknowledge in time
        (what was reserved is settled by the sweep)."""
        answers = await asyncio.gather(
            *(self._run("reserve", serial, [serial, authorization_id, expires_ms]) for serial in serials)
        )
        pairs = zip(serials, answers, strict=True)
        return {serial: Reserved(answer["state"], answer.get("by", "")) for serial, answer in pairs}

    async def settle(self, serials: Sequence[str], authorization_id: str, action: Action, expires_ms: int = 0) -> None:
        """Confirm, release or extend the serials' reservations by this authorization (a serial
        held by another is left alone); all at once."""
        await asyncio.gather(
            *(self._run("settle", serial, [serial, authorization_id, action, expires_ms]) for serial in serials)
        )

    async def settle_due(self, shard: int, limit: int) -> int:
        """The sweep of one home shard (each has its own loop, so a lost slot stalls only its
        own): up to ``limit`` reservations past their expiry, each settled by what its
        authorization says now. Returns how many were settled."""
        now_ms = int(time.time() * 1000)
        settled = 0
        due = await self.cluster.zrangebyscore(self.pending_key(shard), "-inf", now_ms, start=0, num=limit)
        for raw in due:
            serial = raw.decode() if isinstance(raw, bytes) else str(raw)
            held = await self.cluster.get(self.owner_key(serial))
            if held is None:
                await self.cluster.zrem(self.pending_key(shard), serial)
                continue
            authorization_id = (held.decode() if isinstance(held, bytes) else held)[2:]
            action, expires_ms = await self._fate(serial, authorization_id)
            await self.settle([serial], authorization_id, action, expires_ms)
            settled += 1
        return settled

    async def _fate(self, serial: str, authorization_id: str) -> tuple[Action, int]:
        """What the authorization says of its reservation of ``serial``: its state and its line's."""
        shard = zlib.crc32(authorization_id.encode()) % len(self.shard_keys)  # ShardLayout.shard_of_id
        state, expires, raw_lines = await self.cluster.hmget(
            self.shard_keys[shard].authorization(authorization_id), ["state", "expires_ms", "lines"]
        )
        if state is None or expires is None or raw_lines is None:
            return "release", 0  # never made: a gateway stopped between the reservation and the sale
        if state == b"PENDING":
            return "extend", int(expires) + GRACE_MS
        if state in (b"CAPTURED", b"PARTIALLY_REFUNDED", b"REFUNDED"):
            line = next((line for line in LINES.decode(raw_lines) if line.serial_number == serial), None)
            # Its line refunded: the device is free again; kept, or clawed back (a confirmed
            # fraud keeps the device counted): subsidised for good.
            return ("release" if line is not None and line.refunded == 1 else "confirm"), 0
        return "release", 0  # voided or expired
