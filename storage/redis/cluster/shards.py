"""Consumer shards on a Redis Cluster: each shard a whole deployment's key set in one hash slot
(issue 16, docs/scale-out.md section "2.0 As built").

A shard is ``Keys(prefix, "s<k>.<salt>")``: every key the scripts name carries the tag
``{prefix:s<k>.<salt>}``, so the authorize, capture, void, refund and expiry scripts run
*unchanged* inside one shard, with its own copy of the reference data, its slice of every
budget, its consumers' counters, its authorizations, holds, idempotency answers, nonces and its
own ledger stream. What picks the shard:

- a sale: its consumer key (``shard_of_consumer``), so the per-person rules and the budget check
  meet in one script, as on one Redis;
- a capture, void, refund, expiry or read of an authorization: its id, which hashes to its shard
  (drawn so, ``new_authorization_id``, or for a sale with device serials derived so,
  ``authorization_ids``): no lookup, no extra round trip; a retry of the sale (same payload,
  same consumer) lands in the same shard and replays its answer from the idempotency record.

The salt places shard *k* in the *k*-th of *S* equal slot ranges (the smallest salt that does),
so shards spread over the primaries evenly whatever CRC16 does with the names. Device serials
are reserved in their own home shards (serials.py). A qualification lives in its owner's shard:
its code is drawn to name that shard (``new_redemption_code``), so a claim, a sale by the code
alone, a cancel and a read find it from the code, and the claim checks that shard's slice of the
quota (shard_budget.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import secrets
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import msgspec
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ExecAbortError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.domain.errors import NotSupportedHere
from server.domain.validation import CROCKFORD, new_redemption_code
from storage.postgres.reference import ReferenceSnapshot
from storage.redis import reference
from storage.redis.cluster.acked import EscrowError, EscrowUnavailable, LuaScript, not_run, run_acked, send_with_wait
from storage.redis.cluster.nodes import NodeConnections
from storage.redis.cluster.serials import GRACE_MS as SERIAL_GRACE_MS
from storage.redis.cluster.serials import Action, SerialRegistry
from storage.redis.contract import (
    DECLINE_REASONS,
    Answer,
    AuthorizationView,
    AuthorizeAnswer,
    Cancelled,
    ClaimAnswer,
    Declined,
    Failure,
    QualificationView,
    Refunded,
    Reply,
    Settled,
)
from storage.redis.keys import Keys
from storage.redis.scripts import Scripts
from storage.redis.store import AuthorizeInput, CancelInput, ClaimInput, LifecycleInput, RedisStore

SLOTS = 16384
MAX_SHARDS = 1024
MAX_SALT = 999_999  # the tag pattern's six digits (storage/redis/keys.py SHARD_PATTERN)
RETRY_PAUSE_S = 0.05
# A redemption code's last two characters, chosen to name its shard.
SUFFIXES = tuple(f"{first}{second}".encode() for first in CROCKFORD for second in CROCKFORD)
log = logging.getLogger("subsidy.shards")


class ShardingNotSupported(NotSupportedHere):
    """A request this first slice of cluster mode cannot serve yet (a line with a device serial,
    a redemption code): refused before anything is written (UNIMPLEMENTED at the gRPC edge)."""


def shard_tag(prefix: str, shard: int, count: int) -> str:
    """The shard's part of the hash tag: ``s<shard>.<salt>`` with the smallest salt whose slot
    falls in the shard's equal range of the 16,384 slots."""
    low, high = shard * SLOTS // count, (shard + 1) * SLOTS // count
    for salt in range(MAX_SALT + 1):
        name = f"s{shard}.{salt}"
        if low <= key_slot(f"{{{prefix}:{name}}}".encode()) < high:
            return name
    raise AssertionError(f"no salt places shard {shard} of {count}")  # 16 slots a range: ~1,000 tries at most


@dataclass(frozen=True)
class ShardLayout:
    """A deployment's shards: how many, their key sets, and what routes a call to one."""

    prefix: str
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise ValueError(f"shard count must be 1..{MAX_SHARDS}, not {self.count}")
        Keys(self.prefix)  # validates the prefix

    @cached_property
    def keys(self) -> tuple[Keys, ...]:
        """Each shard's key set, in shard order."""
        return tuple(Keys(self.prefix, shard_tag(self.prefix, shard, self.count)) for shard in range(self.count))

    @cached_property
    def control(self) -> Keys:
        """The deployment's own key set (``{prefix}``): credentials, block lists' source, the
        reference version, schema: what is not per shard."""
        return Keys(self.prefix)

    def shard_of_consumer(self, consumer_key: str) -> int:
        return zlib.crc32(consumer_key.encode()) % self.count

    def shard_of_id(self, identifier: str) -> int:
        """The shard an authorization id names (``new_authorization_id`` drew it so)."""
        return zlib.crc32(identifier.encode()) % self.count

    def authorization_ids(self, shard: int, id_key: bytes, terminal_id: str, request_id: str) -> Iterator[str]:
        """The ids a sale with device serials may take, in order: 32 hex characters of
        HMAC(``id_key``, terminal, request id, n) for n = 0, 1, ..., those that hash to ``shard``
        (one in ``count`` on average). Derived, not drawn: a retry of the sale on any gateway
        names the same authorization, so the serials it reserves before the script (serials.py)
        are reserved once; ShardedStore takes the first not used by another sale."""
        message = f"{terminal_id}\x00{request_id}\x00".encode()
        for attempt in itertools.count():
            candidate = hmac.new(id_key, message + str(attempt).encode(), hashlib.sha256).hexdigest()[:32]
            if self.shard_of_id(candidate) == shard:
                yield candidate

    def new_authorization_id(self, shard: int) -> str:
        """32 random hex characters, as on one Redis, drawn until they hash to ``shard``
        (``count`` draws on average)."""
        while True:
            candidate = os.urandom(16).hex()
            if self.shard_of_id(candidate) == shard:
                return candidate


class NotAcknowledged(RedisConnectionError):
    """The script ran on the shard's primary but no replica confirmed it within the WAIT
    timeout (or the connection died mid-call): the answer is not given, since a failover could
    still take it back. A ConnectionError, so the caller answers UNAVAILABLE ("retry with the
    same request_id"); the client's retry, re-signed with a new nonce, replays the first answer
    if it survived and acts once if it did not."""


class AcknowledgedScripts(Scripts):
    """The sale scripts on a cluster, each answer vouched for by the shard's replicas: the
    EVALSHA goes to the primary of its first key's slot on a plain connection, pipelined with
    ``WAIT <replicas> <timeout>`` (a WAIT covers only the writes of its own connection:
    storage/redis/cluster/nodes.py). What cannot have run the script (MOVED, ASK, CLUSTERDOWN,
    TRYAGAIN, READONLY, LOADING, NOSCRIPT, a dead connection) is re-sent until ``deadline_s``. An
    answer the replicas did not confirm is never given: NotAcknowledged, and the till re-signs."""

    def __init__(
        self, cluster: RedisCluster, *, wait_replicas: int = 1, wait_timeout_ms: int = 200, deadline_s: float = 5.0
    ) -> None:
        super().__init__(cluster)  # type: ignore[arg-type]  # it only registers and loads scripts: both clients can
        if wait_replicas < 0 or wait_timeout_ms < 1 or deadline_s <= 0:
            raise ValueError("wait_replicas >= 0, wait_timeout_ms >= 1 and deadline_s > 0")
        self.nodes = NodeConnections(cluster)
        self.wait_replicas, self.wait_timeout_ms, self.deadline_s = wait_replicas, wait_timeout_ms, deadline_s
        self.retried: dict[str, int] = {}  # why calls were re-sent (tests and metrics)

    async def aclose(self) -> None:
        await self.nodes.aclose()
        await super().aclose()

    def _count(self, reason: str) -> None:
        self.retried[reason] = self.retried.get(reason, 0) + 1

    async def _relearn(self) -> None:
        """Reload the slot map, pausing before the next try; a map that cannot be read yet (the
        cluster mid-failover) is tried again next time. Dead nodes' clients are kept, not dropped
        (``NodeConnections.drop_dead``): the map no longer routes to them, a broken connection is
        remade on its next use, and closing a node's client closes it under every call using it,
        which those calls meet as an unexpected error, not a connection error (INTERNAL answers
        while a slot moved under load: tests/integration/test_cluster_gateway_faults.py)."""
        try:
            await self.nodes.refresh_map()
        except (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, SlotNotCoveredError) as error:
            self._count("map:" + type(error).__name__)
        await asyncio.sleep(RETRY_PAUSE_S)

    async def _redis_py_call(self, loaded: AsyncScript, arguments: tuple[Any, ...]) -> Any:
        deadline = time.monotonic() + self.deadline_s
        ask: tuple[str, int] | None = None
        last = "no attempt"
        lost = False  # a connection died during an attempt: that attempt may have run the script
        while time.monotonic() < deadline:
            try:
                reply, acknowledged = await send_with_wait(
                    self.nodes,
                    arguments[1],
                    ("EVALSHA", loaded.sha, *arguments),
                    self.wait_replicas,
                    self.wait_timeout_ms,
                    ask,
                )
            except (RedisConnectionError, RedisTimeoutError, OSError, SlotNotCoveredError) as error:
                # A node died or changed role (a failover): learn the new map and send it again.
                # Safe for money: if the lost attempt did run, this one is refused NONCE_REUSED
                # (its nonce is taken), which is turned into NotAcknowledged below.
                last, lost = f"{type(error).__name__}: {error}", True
                self._count("connection")
                await self._relearn()
                continue
            asked, ask = ask, None
            reason = not_run(reply)
            if reason is not None:
                self._count(reason)
                if reason == "noscript":  # a promoted replica's script cache may be empty
                    node = self.nodes.at(*asked) if asked else await self.nodes.for_key(arguments[1])
                    await node.script_load(loaded.script)
                elif reason == "ask":
                    ask = (reply.host, int(reply.port))  # the slot is migrating: follow it once
                else:
                    last = f"{type(reply).__name__}: {reply}"
                    await self._relearn()
                continue
            if isinstance(reply, Exception):
                raise reply
            if lost and reply[0] == b"error" and b"NONCE_REUSED" in reply[1]:
                raise NotAcknowledged(f"the call may have run before its connection was lost ({last})")
            if isinstance(acknowledged, Exception) or int(acknowledged) < self.wait_replicas:
                self._count("wait")
                raise NotAcknowledged(f"WAIT {self.wait_replicas} answered {acknowledged!r}")
            return reply
        raise NotAcknowledged(f"no primary took the call within {self.deadline_s:g} s: {last}")


class ShardedStore:
    """The sale path of ``RedisStore`` over a layout's shards: each call routed to one shard's
    ``RedisStore``, which runs the same script there. ``stores[k]`` serves ``layout.keys[k]``;
    ``control`` serves the deployment's own keys (the nonces of read-only calls); ``serials``, the
    device serials' owner records in their home shards (serials.py; without it, a sale with a
    serial is refused); ``id_key`` derives the authorization ids."""

    def __init__(
        self,
        layout: ShardLayout,
        stores: Sequence[RedisStore],
        control: RedisStore,
        *,
        id_key: bytes,
        serials: SerialRegistry | None = None,
    ) -> None:
        if [store.keys for store in stores] != list(layout.keys) or control.keys != layout.control:
            raise ValueError("one RedisStore per shard, in order, on its keys; and one on the control keys")
        if not id_key:
            raise ValueError("the authorization id key must not be empty")
        self.layout = layout
        self.stores = tuple(stores)
        self.control = control
        self.id_key = id_key
        self.serials = serials

    @property
    def nonce_ttl_s(self) -> int:
        return self.control.nonce_ttl_s

    async def claim_nonce(self, terminal_id: str, nonce: str) -> bool:
        """For read-only calls (GetAuthorization): in the deployment's own keys."""
        return await self.control.claim_nonce(terminal_id, nonce)

    async def get_authorization(
        self, authorization_id: str, terminal_id: str, merchant_id: str
    ) -> AuthorizationView | str | None:
        """In the shard the id names, with that shard's copy of the terminal and the merchant."""
        return await self._of(authorization_id).get_authorization(authorization_id, terminal_id, merchant_id)

    def _of(self, authorization_id: str) -> RedisStore:
        return self.stores[self.layout.shard_of_id(authorization_id)]

    async def authorize(self, request: AuthorizeInput) -> Reply[AuthorizeAnswer]:
        """In the consumer's shard. A sale without device serials runs under an id drawn to name
        that shard (the caller's random one is replaced), as on one Redis. A sale with serials
        runs under an id derived from the sale (``_derived_id``) and reserves the serials in their
        home shards first (serials.py): one held by another sale declines it
        SERIAL_ALREADY_SUBSIDISED before the script runs, unless an earlier attempt of the same
        request answered (then the script replays that answer).

        Reservations are released here only after the script *declined* the sale: its answer is
        then stored, so no other attempt of the request can approve it later. Anything else (a
        refusal such as NONCE_REUSED, the decline above, an exception) leaves them to the sweep,
        which releases them past their expiry unless the sale lives: a concurrent attempt of the
        same request shares the reservation, and releasing it here could unguard its approval."""
        serials = sorted({line.serial_number for line in request.lines if line.serial_number})
        if serials and self.serials is None:
            index = next(i for i, line in enumerate(request.lines) if line.serial_number)
            raise ShardingNotSupported(f"lines[{index}].serial_number", "a device serial is not served by this store")
        shard = self._shard_of_sale(request)
        store = self.stores[shard]
        if not serials or self.serials is None:
            routed = msgspec.structs.replace(request, authorization_id=self.layout.new_authorization_id(shard))
            return await store.authorize(routed)
        authorization_id, answered = await self._derived_id(shard, request)
        routed = msgspec.structs.replace(request, authorization_id=authorization_id)
        expires_ms = int(time.time() * 1000) + store.hold_ttl_s * 1000 + SERIAL_GRACE_MS
        reserved = await self.serials.reserve(serials, authorization_id, expires_ms)
        held = [serial for serial in serials if reserved[serial].state == "held"]
        if held and not answered:
            line = next(line for line in request.lines if line.serial_number in held)
            return Answer(Declined(DECLINE_REASONS["SERIAL_ALREADY_SUBSIDISED"], line.line_id), False)
        reply = await store.authorize(routed)
        if not isinstance(reply, Failure) and isinstance(reply.body, Declined) and not held:
            # A declined sale holds nothing (stored: every attempt of the request replays it).
            await self.serials.settle(serials, authorization_id, "release")
        return reply

    def _shard_of_sale(self, request: AuthorizeInput) -> int:
        """The consumer's shard; for a till that sent only a redemption code, the code's, which
        is its owner's (``new_redemption_code``). A sale naming a consumer and a code goes to the
        consumer's shard even when the code names another: the code cannot be that consumer's
        (its owner's counters are elsewhere), so the script there declines it
        QUALIFICATION_NOT_FOUND, as on one Redis, and the consumer's own counters are the ones
        checked. Neither (the edge refuses that) goes to the terminal's shard, to be declined
        by the script as on one Redis."""
        if request.consumer_key:
            return self.layout.shard_of_consumer(request.consumer_key)
        if request.redemption_code:
            return self.layout.shard_of_id(request.redemption_code)
        return self.layout.shard_of_id(request.terminal_id)

    async def _derived_id(self, shard: int, request: AuthorizeInput) -> tuple[str, bool]:
        """The id of a sale with serials, and whether the request has a stored answer: the first
        of ``ShardLayout.authorization_ids`` not taken by another sale. A retry within the
        idempotency window gets the same id (its answer is stored), so its reservations are its
        first attempt's; a request id reused after the window, whose first id names an
        authorization without a stored answer, moves on to the next id rather than overwrite it."""
        store = self.stores[shard]
        for authorization_id in self.layout.authorization_ids(
            shard, self.id_key, request.terminal_id, request.request_id
        ):
            async with store.redis.pipeline(transaction=False) as pipe:
                pipe.exists(store.keys.authorization(authorization_id))
                pipe.exists(store.keys.idempotency(request.terminal_id, request.request_id))
                taken, answered = await pipe.execute()
            if answered or not taken:
                return authorization_id, bool(answered)
        raise AssertionError("authorization_ids is endless")

    # ---- qualifications: each issued, redeemed, cancelled and expired in its owner's shard

    def new_redemption_code(self, consumer_key: str) -> str:
        """A redemption code naming the consumer's shard: 14 random characters (70 bits, from
        validation.new_redemption_code) and the first two-character suffix, from a random start
        among the 1,024, whose code hashes to that shard (``count`` tries on average, a new stem
        when none of the 1,024 does). Drawing whole codes until one fits cost ``count`` × 4.5 µs
        on the event loop (a pack's 11 codes at 1,024 shards: 50 ms); a suffix try is a CRC32
        of 16 bytes. A sale by the code alone, a cancel and a read then find the owner's shard,
        with its per-person counters, quota slice and the qualification, from the code."""
        shard, count = self.layout.shard_of_consumer(consumer_key), self.layout.count
        while True:
            stem = new_redemption_code()[:14]
            running = zlib.crc32(stem.encode())  # the stem's CRC, continued over each suffix
            start = secrets.randbelow(len(SUFFIXES))
            for suffix in itertools.chain(SUFFIXES[start:], SUFFIXES[:start]):
                if zlib.crc32(suffix, running) % count == shard:  # ShardLayout.shard_of_id(code)
                    return stem + suffix.decode()

    async def claim(self, request: ClaimInput) -> Reply[ClaimAnswer]:
        """In the claimant's shard, against that shard's slice of the quota (shard_budget.py's
        quota funding): the unchanged claim script. Its codes must name the shard."""
        shard = self.layout.shard_of_consumer(request.consumer_key)
        codes = [request.redemption_code, *(voucher.code for voucher in request.vouchers)]
        if any(self.layout.shard_of_id(code) != shard for code in codes):
            raise ValueError("a claim's redemption codes must name the consumer's shard (new_redemption_code)")
        return await self.stores[shard].claim(request)

    async def cancel_qualification(self, request: CancelInput) -> Reply[Cancelled]:
        return await self.stores[self.layout.shard_of_id(request.redemption_code)].cancel_qualification(request)

    async def get_qualification(self, redemption_code: str, partner_id: str) -> QualificationView | None:
        return await self.stores[self.layout.shard_of_id(redemption_code)].get_qualification(
            redemption_code, partner_id
        )

    async def list_qualifications(
        self, consumer_key: str, partner_id: str, campaign_id: str, limit: int
    ) -> list[QualificationView]:
        store = self.stores[self.layout.shard_of_consumer(consumer_key)]
        return await store.list_qualifications(consumer_key, partner_id, campaign_id, limit)

    async def location_rule(self, campaign_id: str) -> tuple[float, int, str] | None:
        """The campaign's location rule as published: every shard holds the same copy, so the
        first shard that answers (a shard whose slot is lost is skipped)."""
        failure: Exception | None = None
        for store in self.stores:
            try:
                return await store.location_rule(campaign_id)
            except (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, SlotNotCoveredError) as error:
                failure = error
        assert failure is not None
        raise failure

    async def capture(self, request: LifecycleInput) -> Reply[Settled]:
        """Captured: its serials are the device's for good (a lost confirmation is made by the
        sweep, which finds the authorization captured)."""
        reply = await self._of(request.authorization_id).capture(request)
        await self._settle_lines(reply, request.authorization_id, "confirm", refunded_only=False)
        return reply

    async def void(self, request: LifecycleInput) -> Reply[Settled]:
        reply = await self._of(request.authorization_id).void(request)
        await self._settle_lines(reply, request.authorization_id, "release", refunded_only=False)
        return reply

    async def refund(self, request: LifecycleInput, line_ids: Sequence[str]) -> Reply[Refunded]:
        """Refunded lines give their devices back (a serial whose line was refunded is free)."""
        reply = await self._of(request.authorization_id).refund(request, line_ids)
        await self._settle_lines(reply, request.authorization_id, "release", refunded_only=True)
        return reply

    async def _settle_lines(
        self, reply: Reply[Settled] | Reply[Refunded], authorization_id: str, action: Action, *, refunded_only: bool
    ) -> None:
        if self.serials is None or isinstance(reply, Failure):
            return
        serials = [
            line.serial_number
            for line in reply.body.authorization.lines
            if line.serial_number and (line.refunded == 1 or not refunded_only)
        ]
        if not serials:
            return
        try:
            await self.serials.settle(serials, authorization_id, action)
        except (EscrowUnavailable, EscrowError) as error:
            # The call's own answer stands. A lost confirmation or a lost void's release is made
            # by the sweep (the reservation is still pending); a lost refund's release is not (the
            # record was confirmed): the device stays counted, which fails safe.
            log.warning("serials not settled", extra={"action": action, "error": type(error).__name__})


PUBLISHED = LuaScript.load("shard_published")
VERSION = LuaScript.load("shard_version")
# What a publication's MULTI may meet and survive by writing again (after a pause and a new slot
# map): the slot moved or is moving (MOVED, ASK, TRYAGAIN, and EXECABORT for a MULTI whose
# commands were redirected), the node is not (yet) a primary (READONLY; LOADING is a
# ConnectionError), the cluster is down (CLUSTERDOWN, MASTERDOWN). By type: redis-py strips the
# error's first word from its text.
TRANSIENT = (AskError, TryAgainError, ClusterDownError, ReadOnlyError, ExecAbortError)


class PublicationIncomplete(EscrowUnavailable):
    """Some shard's copy of the reference (or the deployment's credentials) was not
    acknowledged by its replicas before the deadline: the reference version is not moved, and
    publishing again (the same snapshot or a newer one) completes it. A ConnectionError, like
    every other "the cluster cannot take this now"."""


async def _write_acknowledged(
    nodes: NodeConnections,
    keys: Keys,
    queue: Callable[[Any], None],
    *,
    wait_replicas: int,
    wait_timeout_ms: int,
    deadline_s: float,
) -> None:
    """Writes what ``queue`` queues into ``keys``' slot in one MULTI on its primary, with a fresh
    marker, until a replica has it: the marker is read back through ``run_acked`` (WAIT on its
    connection, after a write: shard_published.lua), and a marker without this write's token (a
    failover took the MULTI back before its replica had it) writes the whole MULTI again. Each
    MULTI is the complete state of its keys, so writing it twice changes nothing."""
    token = os.urandom(16).hex()
    marker, acknowledged = f"{keys.tag}:published", f"{keys.tag}:published_ack"
    deadline = time.monotonic() + deadline_s
    retried: dict[str, int] = {}
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            client = await nodes.for_key(marker)
            async with client.pipeline(transaction=True) as pipe:
                queue(pipe)
                pipe.set(marker, token)
                await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError, OSError, SlotNotCoveredError, ResponseError) as error:
            if isinstance(error, ResponseError) and not isinstance(error, TRANSIENT):
                raise  # a wrong type or a bad command: a defect, not an outage
            last = f"{type(error).__name__}: {str(error)[:200]}"
            await asyncio.sleep(RETRY_PAUSE_S)
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError, ResponseError):
                await nodes.refresh_map()
            continue
        try:
            answer = await run_acked(
                nodes,
                PUBLISHED,
                [marker, acknowledged],
                [token],
                wait_replicas=wait_replicas,
                wait_timeout_ms=wait_timeout_ms,
                deadline_s=max(deadline - time.monotonic(), RETRY_PAUSE_S),
                retried=retried,
                label=f"publication of {keys.tag}",
            )
        except EscrowUnavailable as error:
            last = str(error)
            break
        if answer["present"]:
            return
        last = "the write was taken back by a failover"
    raise PublicationIncomplete(f"publication of {keys.tag} not acknowledged within {deadline_s:g} s ({last})")


async def publish_to_shards(
    cluster: RedisCluster,
    layout: ShardLayout,
    snapshot: ReferenceSnapshot,
    *,
    wait_replicas: int = 1,
    wait_timeout_ms: int = 1000,
    deadline_s: float = 30.0,
) -> int:
    """Writes the snapshot into every shard (campaigns, rules, packs, merchants, stores,
    terminals and products in one MULTI on its primary) and the credentials into the
    deployment's own keys, each acknowledged by ``wait_replicas`` replicas (``_write_acknowledged``),
    then moves the reference version; returns it. A shard that cannot be acknowledged within
    ``deadline_s`` raises PublicationIncomplete before the version moves: the shards written
    so far hold the new snapshot, the others the previous one, until a publication completes.

    Why acknowledged: an unacknowledged write is what a failover takes back, and a copy of the
    reference taken back in one shard would leave it selling under the previous one (a
    suspended campaign or terminal, a revoked credential, a lowered price still in force there).

    Each shard gets the rules *without* tranches and no budget total: on a cluster, a shard's
    ``<category>:total`` is its funded slice of what the schedule has released
    (storage/redis/cluster/shard_budget.py), so the script's ``released()`` is the whole total.
    A suspension reaches each shard when its MULTI runs and all of them when this returns."""
    rules = reference.rules_by_campaign(snapshot, tranches=False)
    placement = reference.store_placement(snapshot)
    nodes = NodeConnections(cluster)
    write = partial(
        _write_acknowledged, nodes, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms, deadline_s=deadline_s
    )
    try:

        def shard_copy(keys: Keys) -> Callable[[Any], None]:
            def queue(pipe: Any) -> None:
                reference.write_sale_reference(pipe, keys, snapshot, rules, placement)
                reference.queue_products(pipe, keys, snapshot.products)

            return queue

        await asyncio.gather(*(write(keys, shard_copy(keys)) for keys in layout.keys))
        control = layout.control
        await write(control, lambda pipe: reference.write_credentials(pipe, control, snapshot))
        try:
            moved = await run_acked(
                nodes,
                VERSION,
                [control.reference_version],
                [],
                wait_replicas=wait_replicas,
                wait_timeout_ms=wait_timeout_ms,
                deadline_s=deadline_s,
                retried={},
                label="the reference version",
            )
        except EscrowUnavailable as error:
            raise PublicationIncomplete(str(error)) from error
    finally:
        await nodes.aclose()
    version: int = moved["version"]
    return version
