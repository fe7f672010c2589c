"""The shards' ledger streams on a Redis Cluster, read by one consumer group (issue 16,
docs/scale-out.md 2.3).

Each shard writes its money events into its own stream, in its own slot, in the same script as
the change they record. The streams are listed in a registry set (``{<prefix>}:shard-streams``),
written when a shard is set up and before its first event, so the writer learns of new shards
by re-reading it. :class:`ShardStreamReader` reads every registered stream with its consumer
group: one pipeline per primary with an ``XREADGROUP`` per stream of that node (one command
cannot span slots, even on one node: ``CROSSSLOT``), this consumer's unacknowledged entries
first, then new ones; it acknowledges per stream after the caller has stored the entries.

**The replication fence.** A primary hands a reader entries that its replica may not have yet
(replication is asynchronous). If the primary then dies and the replica is promoted, those
entries are gone from Redis, their reservations with them, and the producer, which never got
its ``WAIT`` acknowledgement, retries and writes the event again, possibly under the *same*
entry id. A writer that stored the first version would hold an event Redis no longer has, or a
different event under the id of the new one. So each read is pipelined with a write (an
increment of a per-stream counter) and ``WAIT <replicas>``; replication is one ordered stream,
so once the replica has the increment it has every entry read before it. Entries whose fence
was not acknowledged are not returned; they stay in this consumer's pending list and come back
on the next read (or vanish with the primary, as they should).

Entries are identified by (stream, entry id): entry ids are unique within a stream only, and
two shards on two primaries produce the same ids at the same millisecond.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterDownError, MovedError, ResponseError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.redis.cluster.nodes import NodeConnections
from storage.redis.keys import PREFIX_PATTERN

RETRY_PAUSE_S = 0.05
MAX_BATCH = 10_000
# A node's failures a read survives: the node's streams are skipped this time, read next time.
NODE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, SlotNotCoveredError)


class StreamsUnavailable(Exception):
    """A registry change was not acknowledged by the replicas before the deadline."""


def registry_key(prefix: str) -> str:
    """The set of every shard stream of a deployment (in the deployment's control slot)."""
    if not PREFIX_PATTERN.match(prefix):
        raise ValueError(f"prefix must match {PREFIX_PATTERN.pattern}")
    return "{" + prefix + "}:shard-streams"


def hash_tag(key: str) -> str:
    """The ``{...}`` part of a key (what Redis Cluster hashes); the key must have one."""
    start = key.find("{")
    end = key.find("}", start + 1)
    if start < 0 or end <= start + 1:
        raise ValueError(f"{key!r} has no hash tag")
    return key[start : end + 1]


async def register_streams(
    nodes: NodeConnections,
    prefix: str,
    streams: Sequence[str],
    *,
    wait_replicas: int = 1,
    wait_timeout_ms: int = 1000,
    deadline_s: float = 30.0,
) -> None:
    """Add ``streams`` to the registry, acknowledged by ``wait_replicas`` replicas (a
    registration lost in a failover would hide a shard's events from the writer). Call it
    before the streams' first event; idempotent."""
    key = registry_key(prefix)
    for stream in streams:
        hash_tag(stream)
    deadline = time.monotonic() + deadline_s
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            client = await nodes.for_key(key)
            async with client.pipeline(transaction=False) as pipe:
                pipe.sadd(key, *streams)
                # SADD of members already there writes nothing, and WAIT would then vouch for
                # nothing (it counts this connection's writes): bump a counter too.
                pipe.hincrby(key + ":writes", "registrations", 1)
                pipe.execute_command("WAIT", wait_replicas, wait_timeout_ms)
                replies = await pipe.execute(raise_on_error=False)
            if isinstance(replies[0], ResponseError):
                last = str(replies[0])
                await nodes.refresh_map()
            elif not isinstance(replies[-1], Exception) and int(replies[-1]) >= wait_replicas:
                return
            else:
                last = f"WAIT {wait_replicas} answered {replies[-1]!r}"
        except NODE_ERRORS as error:
            last = f"{type(error).__name__}: {error}"
            await nodes.drop_dead()
            await _refresh_quietly(nodes)
        await asyncio.sleep(RETRY_PAUSE_S)
    raise StreamsUnavailable(f"registering {len(streams)} streams not acknowledged within {deadline_s:g} s ({last})")


@dataclass(frozen=True)
class StreamEntry:
    stream: str
    entry_id: str
    fields: dict[str, str]
    # The fields as read when they are not UTF-8 (``fields`` is then decoded with replacement
    # characters, for logs only): such an entry cannot be stored and is dead-lettered whole.
    raw: dict[bytes, bytes] | None = None

    def as_written(self) -> dict[bytes, bytes]:
        """The entry's fields as the producer wrote them (bytes)."""
        if self.raw is not None:
            return self.raw
        return {name.encode(): value.encode() for name, value in self.fields.items()}


def dead_letter_key(stream: str) -> str:
    """A stream's dead-letter stream: ``<stream>:dead``, in the stream's slot (the same hash
    tag: a key's slot is its first ``{...}``), so the stream's primary sets an entry aside and
    acknowledges it in one transaction."""
    hash_tag(stream)
    return stream + ":dead"


@dataclass(frozen=True)
class StreamsLag:
    """The shard streams' stuck or waiting work: entries not yet acknowledged by the group
    (pending or never delivered) and entries set aside in the dead-letter streams (alert when
    > 0), over every registered stream."""

    streams: int
    backlog: int
    dead_letters: int


@dataclass
class ReaderStats:
    reads: int = 0
    fenced_out: int = 0  # entries held back because their node's fence was not acknowledged
    node_failures: int = 0  # a node's read skipped (dead, moved, loading, not a primary)
    groups_created: int = 0
    claimed: int = 0  # entries taken over from another consumer's pending list
    undecodable: int = 0  # reads of entries whose fields are not UTF-8 (the writer sets them aside)


@dataclass
class ShardStreamReader:
    """Reads every registered shard stream with one consumer group; see the module's doc."""

    cluster: RedisCluster
    prefix: str
    group: str = "ledger-writer"
    consumer: str = "writer-1"
    count: int = 500  # entries per stream per read
    wait_replicas: int = 1
    wait_timeout_ms: int = 1000
    registry_refresh_s: float = 1.0
    # Entries idle this long in another consumer's pending list (a dead writer's) are taken over.
    claim_idle_ms: int = 30_000
    stats: ReaderStats = field(default_factory=ReaderStats)

    def __post_init__(self) -> None:
        if not 0 < self.count <= MAX_BATCH:
            raise ValueError(f"count must be between 1 and {MAX_BATCH}")
        if self.wait_replicas < 0:
            raise ValueError("wait_replicas must be >= 0")
        if not 0 < self.wait_timeout_ms <= 60_000:
            raise ValueError("wait_timeout_ms must be between 1 and 60000")
        if not 0 < self.claim_idle_ms <= 3_600_000:
            raise ValueError("claim_idle_ms must be between 1 and 3600000")
        self.registry = registry_key(self.prefix)
        self.nodes = NodeConnections(self.cluster)
        self._streams: list[str] = []
        self._grouped: set[str] = set()
        self._loaded_at = float("-inf")
        self._claimed_at = float("-inf")

    async def streams(self, *, reload: bool = False) -> list[str]:
        """The registered streams (re-read at most every ``registry_refresh_s``), each with the
        consumer group created (from the stream's start, so nothing written before is missed)."""
        if reload or time.monotonic() - self._loaded_at >= self.registry_refresh_s:
            members = await self.cluster.smembers(self.registry)
            self._streams = sorted(_text(member) for member in members)
            self._loaded_at = time.monotonic()
        for stream in self._streams:
            if stream not in self._grouped:
                await self._create_group(stream)
        return self._streams

    async def _create_group(self, stream: str) -> None:
        try:
            await self.cluster.xgroup_create(stream, self.group, id="0", mkstream=True)
            self.stats.groups_created += 1
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._grouped.add(stream)

    async def _by_node(self, streams: Iterable[str]) -> dict[tuple[str, int], list[str]]:
        await self.nodes.load_map()
        grouped: dict[tuple[str, int], list[str]] = {}
        for stream in streams:
            grouped.setdefault(self.nodes.address_of(stream), []).append(stream)
        return grouped

    async def read(self) -> list[StreamEntry]:
        """This consumer's next entries from every node, only those behind an acknowledged
        fence. A node that fails is skipped (its entries come on a later read)."""
        self.stats.reads += 1
        try:
            streams = await self.streams()
            grouped = await self._by_node(streams)
        except (*NODE_ERRORS, ClusterDownError, TryAgainError, MovedError):
            # The registry's node died or moved (the cluster client gave up its retries).
            await self._node_failed()
            return []
        if time.monotonic() - self._claimed_at >= self.claim_idle_ms / 2000:
            self._claimed_at = time.monotonic()
            await asyncio.gather(*(self._claim_node(address, names) for address, names in grouped.items()))
        results = await asyncio.gather(*(self._read_node(address, names) for address, names in grouped.items()))
        return [entry for entries in results for entry in entries]

    async def _claim_node(self, address: tuple[str, int], streams: list[str]) -> None:
        """Take over entries idle for ``claim_idle_ms`` in other consumers' pending lists (a
        writer that died holding them): they become this consumer's and are read with its own
        pending entries next, behind the fence. Failures are left to the read that follows."""
        try:
            async with self.nodes.at(*address).pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.xautoclaim(
                        stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=self.count, justid=True
                    )
                replies = await pipe.execute(raise_on_error=False)
        except NODE_ERRORS:
            return
        for reply in replies:
            if isinstance(reply, list):  # with JUSTID, redis-py answers the claimed ids
                self.stats.claimed += len(reply)

    async def _read_node(self, address: tuple[str, int], streams: list[str]) -> list[StreamEntry]:
        client = self.nodes.at(*address)
        fence = hash_tag(streams[0]) + ":writer-fence"
        try:
            # A multi-key command must stay in one slot even on one node (CROSSSLOT), so one
            # XREADGROUP per stream, all pipelined: still one round trip per node.
            async with client.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.xreadgroup(self.group, self.consumer, {stream: "0"}, count=self.count)
                    pipe.xreadgroup(self.group, self.consumer, {stream: ">"}, count=self.count)
                pipe.hincrby(fence, self.group, 1)
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
                replies = await pipe.execute(raise_on_error=False)
        except NODE_ERRORS:
            await self._node_failed()
            return []
        *reads, fenced, acked = replies
        entries: list[StreamEntry] = []
        failed = False
        for stream, reply in zip([s for s in streams for _ in (0, 1)], reads, strict=True):
            if isinstance(reply, ResponseError):
                if "NOGROUP" in str(reply):
                    # A group lost with a primary that died before its replica had it: made
                    # again from the stream's start (what was stored is stored idempotently).
                    self._grouped.discard(stream)
                else:  # MOVED, ASK, TRYAGAIN, CLUSTERDOWN, READONLY, LOADING: read it later
                    failed = True
                continue
            found = _entries(reply)
            self.stats.undecodable += sum(entry.raw is not None for entry in found)
            entries.extend(found)
        if isinstance(fenced, ResponseError):
            failed = True
        if failed:
            await self._node_failed()
            if isinstance(fenced, ResponseError):
                return []  # nothing of this node can be vouched for
        if self.wait_replicas and (isinstance(acked, Exception) or int(acked) < self.wait_replicas):
            # Held back: they stay in this consumer's pending list and are read again (with
            # "0") next time, behind a new fence.
            self.stats.fenced_out += len(entries)
            return []
        seen: set[tuple[str, str]] = set()
        unique = []
        for entry in entries:
            if (entry.stream, entry.entry_id) not in seen:
                seen.add((entry.stream, entry.entry_id))
                unique.append(entry)
        return unique

    async def _node_failed(self) -> None:
        self.stats.node_failures += 1
        await self.nodes.drop_dead()
        await _refresh_quietly(self.nodes)
        await asyncio.sleep(RETRY_PAUSE_S)

    async def ack(self, entries: Sequence[StreamEntry]) -> None:
        """Acknowledge stored entries. An acknowledgement lost (a node died) only means the
        entries are read again, and the caller stores them idempotently."""
        by_stream: dict[str, list[str]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry.entry_id)
        try:
            grouped = await self._by_node(by_stream)
        except NODE_ERRORS:
            await self._node_failed()
            return
        for address, streams in grouped.items():
            try:
                async with self.nodes.at(*address).pipeline(transaction=False) as pipe:
                    for stream in streams:
                        pipe.xack(stream, self.group, *by_stream[stream])
                    await pipe.execute(raise_on_error=False)
            except NODE_ERRORS:
                await self._node_failed()

    async def dead_letter(self, refused: Sequence[tuple[StreamEntry, str]]) -> int:
        """Set entries aside, each with the reason it was refused: per stream, one transaction on
        its primary adds each entry whole (its fields as written, plus ``source_id``, the entry
        id, and ``reason``) to the stream's dead-letter stream and acknowledges it. Returns how
        many were set aside; a stream whose transaction failed (its node died or moved) keeps
        its entries pending, and they come back on a later read (an entry whose transaction
        was lost with its primary after it ran may then be set aside twice, never dropped)."""
        by_stream: dict[str, list[tuple[StreamEntry, str]]] = {}
        for entry, reason in refused:
            by_stream.setdefault(entry.stream, []).append((entry, reason))
        done = 0
        try:
            await self.nodes.load_map()
        except NODE_ERRORS:
            await self._node_failed()
            return 0
        for stream, items in by_stream.items():
            try:
                client = self.nodes.at(*self.nodes.address_of(stream))
                async with client.pipeline(transaction=True) as pipe:
                    for entry, reason in items:
                        record = {
                            **entry.as_written(),
                            b"source_id": entry.entry_id.encode(),
                            b"reason": reason.encode(),
                        }
                        pipe.xadd(dead_letter_key(stream), record)  # type: ignore[arg-type]
                    pipe.xack(stream, self.group, *(entry.entry_id for entry, _ in items))
                    await pipe.execute()
                done += len(items)
            except (*NODE_ERRORS, ResponseError):
                await self._node_failed()
        return done

    async def lag(self) -> StreamsLag:
        """The backlog and dead letters of every registered stream, read on the primaries now
        (one pipeline per primary). Raises when a node does not answer."""
        streams = await self.streams(reload=True)
        grouped = await self._by_node(streams)
        backlog = dead = 0
        for address, names in grouped.items():
            client = self.nodes.at(*address)
            async with client.pipeline(transaction=False) as pipe:
                for stream in names:
                    pipe.xinfo_groups(stream)
                    pipe.xlen(stream)
                    pipe.xlen(dead_letter_key(stream))
                replies = await pipe.execute()
            for index, stream in enumerate(names):
                groups, length, dead_length = replies[3 * index : 3 * index + 3]
                dead += int(dead_length)
                mine = next((item for item in groups if _text(item["name"]) == self.group), None)
                if mine is None:
                    backlog += int(length)
                    continue
                backlog += int(mine["pending"])
                if mine.get("lag") is not None:  # Redis 7: entries not yet delivered to the group
                    backlog += int(mine["lag"])
                else:  # unknown after deletions in the range: count them
                    after = "(" + _text(mine["last-delivered-id"])
                    backlog += len(await client.xrange(stream, min=after, count=MAX_BATCH) or [])
        return StreamsLag(len(streams), backlog, dead)

    async def trim(self) -> int:
        """Remove from every stream the entries that *every* group of it has acknowledged
        (below each group's oldest pending entry and its last delivered one), so a stream's
        length is its backlog. Returns the entries removed. A node that fails is skipped."""
        removed = 0
        try:
            grouped = await self._by_node(await self.streams())
        except (*NODE_ERRORS, ClusterDownError, TryAgainError, MovedError):
            return 0
        for address, streams in grouped.items():
            try:
                removed += await self._trim_node(self.nodes.at(*address), streams)
            except (*NODE_ERRORS, ResponseError):
                await self._node_failed()
        return removed

    async def _trim_node(self, client: Any, streams: list[str]) -> int:
        async with client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_groups(stream)
            infos = await pipe.execute()
        keep: dict[str, str] = {}
        async with client.pipeline(transaction=False) as pipe:
            asked = []
            for stream, groups in zip(streams, infos, strict=True):
                if not groups:
                    continue  # no group has read it: nothing is acknowledged
                keep[stream] = min((_after(_text(g["last-delivered-id"])) for g in groups), key=_order)
                for group in groups:
                    if int(group["pending"]):
                        pipe.xpending(stream, _text(group["name"]))
                        asked.append(stream)
            summaries = await pipe.execute() if asked else []
        for stream, summary in zip(asked, summaries, strict=True):
            if summary["pending"] and summary["min"] is not None:
                keep[stream] = min(keep[stream], _text(summary["min"]), key=_order)
        if not keep:
            return 0
        async with client.pipeline(transaction=False) as pipe:
            for stream, first_kept in keep.items():
                pipe.xtrim(stream, minid=first_kept, approximate=False)
            return sum(int(count) for count in await pipe.execute())

    async def backlog(self) -> int:
        """Entries not yet acknowledged by the group (pending or never delivered), over every
        registered stream, read on the primaries now."""
        total = 0
        for stream in await self.streams(reload=True):
            client = await self.nodes.for_key(stream)
            groups = await client.xinfo_groups(stream)
            mine = next((item for item in groups if _text(item["name"]) == self.group), None)
            if mine is None:
                total += int(await client.xlen(stream))
                continue
            total += int(mine["pending"])
            after = "(" + _text(mine["last-delivered-id"])
            total += len(await client.xrange(stream, min=after, count=MAX_BATCH) or [])
        return total

    async def aclose(self) -> None:
        await self.nodes.aclose()


def _entries(reply: Any) -> list[StreamEntry]:
    """XREADGROUP's reply (redis-py's RESP2 shape) as entries; deleted ones left out. Never
    raises on an entry's content: one whose fields are not UTF-8 keeps them as read (``raw``)."""
    found = []
    for stream, messages in reply or []:
        for entry_id, fields in messages:
            if fields is None:
                continue
            try:
                decoded = {_strict(k): _strict(v) for k, v in fields.items()}
                raw = None
            except UnicodeDecodeError:
                decoded = {_text(k): _text(v) for k, v in fields.items()}
                raw = {_bytes(k): _bytes(v) for k, v in fields.items()}
            found.append(StreamEntry(_text(stream), _text(entry_id), decoded, raw))
    return found


async def _refresh_quietly(nodes: NodeConnections) -> None:
    try:
        await nodes.refresh_map()
    except (*NODE_ERRORS, ResponseError):
        pass  # the next call tries again


def _order(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def _after(entry_id: str) -> str:
    """The smallest id after ``entry_id``."""
    milliseconds, sequence = _order(entry_id)
    return f"{milliseconds}-{sequence + 1}"


def _text(value: bytes | str) -> str:
    """Lenient: never raises (bytes that are not UTF-8 become replacement characters)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _strict(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
