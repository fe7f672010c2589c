"""Qualifications mirrored into PostgreSQL, and restored from it after a Redis loss.

Every script that changes a qualification appends its new state to the qualification stream
(``mirror_qualification`` in _lib.lua). ``QualificationMirror`` runs in the ledger writer
process beside the ledger writer: a consumer of its own group on that stream (stream_consumer.py)
that upserts each snapshot into ``qualifications`` and only then acknowledges and deletes the
entries. Delivery
is at least once; a snapshot never overwrites a newer one (the stream entry id orders them),
so redelivery after a crash and two mirrors racing are both harmless.

On a Redis Cluster deployment (SUBSIDY_REDIS_SHARDS, docs/scale-out.md 2.0) the writer process
runs one mirror per consumer shard, on that shard's stream (``Keys`` of the shard, a cluster
client: server/processes/writer.py ``shard_consumers_of``), into the same table. Stream entry ids
repeat across shards, but here they only order one redemption code's snapshots, and those all come
from one stream: a script writes the snapshot of the qualification hash it holds in the same slot
as the stream, and a code (unique across shards) has its hash in one shard only, its claimant's.
``restore_qualifications`` is one Redis's only.

Masks are kept only in their at-rest form (a sealed token or ``""``, docs/privacy.md): a
snapshot carrying anything else (one written before masks were sealed) is stored with them
blank, and at start the mirror blanks what Redis kept in clear (storage/redis/masks.py).

``restore_qualifications`` is the rebuild's half for qualifications: the hashes, each
campaign's claimed count, each consumer's holdings, the consumer lists, the expiry set and each
authorization's link to its qualification, all derived from the mirrored rows.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from server.domain.sealing import at_rest_form
from storage.postgres.audit import advance_stream_id
from storage.postgres.ledger import from_ms, to_ms
from storage.postgres.stream_consumer import StreamConsumer
from storage.redis.keys import Keys
from storage.redis.masks import scrub_clear_masks
from storage.redis.store import text

log = logging.getLogger("subsidy.qualifications")
GROUP = "qualification-mirror"
# States whose qualification is out of the pool (counted against the quota and the person).
OUT_OF_POOL = ("ISSUED", "RESERVED", "REDEEMED")

UPSERT = """
INSERT INTO qualifications (redemption_code, state, campaign_id, category, consumer_key, partner_id,
    issued_at, expires_at, updated_at, authorization_id, refund_policy, masked_id_number,
    masked_phone_number, location_cell, request_id, last_event_ms, last_event_seq, pack_id, threshold_fen,
    off_fen)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)
ON CONFLICT (redemption_code) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at,
    authorization_id = excluded.authorization_id, last_event_ms = excluded.last_event_ms,
    last_event_seq = excluded.last_event_seq
WHERE (qualifications.last_event_ms, qualifications.last_event_seq)
    < (excluded.last_event_ms, excluded.last_event_seq)
"""


def at_rest(value: str) -> str:
    """A mask as it may be stored: a sealed token or "", never a mask in clear."""
    return value if at_rest_form(value) else ""


def snapshot_row(entry_id: str, payload: dict[str, Any]) -> tuple[Any, ...]:
    """A stream entry as the upsert's parameters; KeyError, ValueError, TypeError or
    OverflowError when malformed."""
    milliseconds, sequence = entry_id.split("-")
    return (
        payload["code"],
        payload["state"],
        payload["campaign"],
        payload["category"],
        payload["consumer"],
        payload["partner"],
        from_ms(int(payload["issued_ms"])),
        from_ms(int(payload["expires_ms"])),
        from_ms(int(payload["updated_ms"])),
        payload.get("authorization", ""),
        payload.get("refund_policy", "COUNT_AS_USED"),
        at_rest(str(payload.get("masked_id", ""))),
        at_rest(str(payload.get("masked_phone", ""))),
        payload.get("cell", ""),
        payload.get("request_id", ""),
        int(milliseconds),
        int(sequence),
        # A pack's voucher: its pack and its own amounts (migration 0018).
        payload.get("pack", ""),
        int(payload.get("threshold_fen", 0)),
        int(payload.get("off_fen", 0)),
    )


class QualificationMirror(StreamConsumer):
    group = GROUP
    statement = UPSERT
    default_consumer = "mirror-1"
    what = "the qualification mirror"
    item = "qualification event"
    log = log

    @property
    def stream(self) -> str:
        return self.keys.qualification_events

    def row(self, entry_id: str, fields: dict[bytes, bytes]) -> tuple[Any, ...]:
        return snapshot_row(entry_id, orjson.loads(fields[b"q"]))

    async def prepare(self) -> None:
        try:
            await scrub_clear_masks(self.redis, self.keys)
        except redis_errors.RedisError:
            log.warning("blanking masks stored in clear failed; retried at the next start", exc_info=True)


@dataclass(frozen=True)
class MirrorDifference:
    """A qualification counter on which Redis and the qualification mirror disagree: ``mirror``
    is what the mirrored rows imply (not the ledger's: claims are not money)."""

    kind: str  # qualification or voucher_pack
    key: str
    mirror: int
    redis: int


# A counter of the qualification hashes: (campaign, consumer key, field); the consumer key is ""
# for the campaign's quota hash (Keys.qualification_quota), else the holder hash's.
CounterKey = tuple[str, str, str]


def _pack_counters(pack_claims: Counter[tuple[str, str, str, str, str]]) -> Counter[CounterKey]:
    """The packs' counters from their claims' vouchers still out: per campaign and pack,
    "claimed" (claims holding the pack: the quota's count); per consumer and pack, "" (held),
    ":issued" (claimed this round, whatever became of it) and ":live" (the held claim's vouchers
    still out)."""
    counters: Counter[CounterKey] = Counter()
    for (campaign_id, consumer_key, pack_id, _, _), out in pack_claims.items():
        counters[(campaign_id, consumer_key, f"pack:{pack_id}:issued")] += 1
        if out:
            counters[(campaign_id, "", f"pack:{pack_id}:claimed")] += 1
            counters[(campaign_id, consumer_key, f"pack:{pack_id}")] += 1
            counters[(campaign_id, consumer_key, f"pack:{pack_id}:live")] += out
    return counters


def qualification_counters(rows: Iterable[Mapping[str, Any]]) -> Counter[CounterKey]:
    """What the quota and holder hashes hold for these mirrored qualifications (the scripts'
    HINCRBYs, recounted): per campaign, ``<category>:claimed`` (out of the pool) and the packs'
    ``pack:<id>:claimed``; per consumer, ``<category>`` (held), ``<category>:issued`` (ever
    issued: claim once per round) and the packs' fields (``_pack_counters``)."""
    counters: Counter[CounterKey] = Counter()
    # Pack vouchers count against their pack, not their category (return_qualification in
    # _lib.lua): per claim of a pack (campaign, consumer, pack, partner, request id), how many
    # of its vouchers are still out of the pool; the claim holds the pack while any is.
    pack_claims: Counter[tuple[str, str, str, str, str]] = Counter()
    for row in rows:
        campaign_id, consumer_key = row["campaign_id"], row["consumer_key"]
        if row["pack_id"]:
            claim = (campaign_id, consumer_key, row["pack_id"], row["partner_id"], row["request_id"])
            pack_claims[claim] += row["state"] in OUT_OF_POOL
            continue
        # Every qualification ever issued to a person, whatever its state: claim once per round.
        counters[(campaign_id, consumer_key, f"{row['category']}:issued")] += 1
        if row["state"] in OUT_OF_POOL:
            counters[(campaign_id, "", f"{row['category']}:claimed")] += 1
            counters[(campaign_id, consumer_key, row["category"])] += 1
    counters.update(_pack_counters(pack_claims))
    return counters


async def reconcile_qualifications(connection: asyncpg.Connection, redis: Redis, keys: Keys) -> list[MirrorDifference]:
    """Every counter of the quota and holder hashes on which Redis and the mirrored rows
    disagree (zero and absent are the same): kind ``voucher_pack`` for a pack's, else
    ``qualification``; the key ``quota:<campaign>:<field>`` or
    ``holder:<campaign>:<consumer key>:<field>``. Meaningful with the qualification stream
    drained (``consumer_backlogs``), as the ledger's comparison is with the ledger stream drained."""
    return mirror_differences(await mirrored_counters(connection), await held_counters(redis, keys))


async def mirrored_counters(connection: asyncpg.Connection) -> Counter[CounterKey]:
    """What the quota and holder hashes should hold, from every mirrored row (a cluster
    deployment's shards' rows all land in the one table)."""
    rows = await connection.fetch(
        "SELECT campaign_id, consumer_key, category, state, pack_id, partner_id, request_id FROM qualifications"
    )
    return qualification_counters(rows)


async def held_counters(redis: Redis, keys: Keys) -> Counter[CounterKey]:
    """What the quota and holder hashes of one key set hold, every field as it is (on a cluster,
    ``redis`` a cluster client and ``keys`` one shard's: their keys share its slot)."""
    held: Counter[CounterKey] = Counter()
    async for raw_key in redis.scan_iter(match=keys.qualification_quota("*"), count=1000):
        campaign_id = text(raw_key).removeprefix(keys.qualification_quota(""))
        for field, value in (await redis.hgetall(raw_key)).items():
            held[(campaign_id, "", text(field))] = int(value)
    async for raw_key in redis.scan_iter(match=keys.qualification_holder("*", "*"), count=1000):
        campaign_id, consumer_key = text(raw_key).removeprefix(keys.qualification_holder("", "")[:-1]).split(":", 1)
        for field, value in (await redis.hgetall(raw_key)).items():
            held[(campaign_id, consumer_key, text(field))] = int(value)
    return held


def mirror_differences(mirrored: Counter[CounterKey], held: Counter[CounterKey]) -> list[MirrorDifference]:
    """Every counter on which the two disagree, as ``reconcile_qualifications`` names them."""
    differences = []
    for key in sorted(set(mirrored) | set(held)):
        if mirrored[key] != held[key]:
            campaign_id, consumer_key, field = key
            kind = "voucher_pack" if field.startswith("pack:") else "qualification"
            name = f"holder:{campaign_id}:{consumer_key}:{field}" if consumer_key else f"quota:{campaign_id}:{field}"
            differences.append(MirrorDifference(kind, name, mirrored[key], held[key]))
    return differences


async def restore_qualifications(connection: asyncpg.Connection, redis: Redis, keys: Keys) -> int:
    """Rewrites every qualification key of Redis from the mirrored rows; returns how many
    qualifications it restored. Part of ``rebuild`` (run with the streams drained)."""
    rows = await connection.fetch("SELECT * FROM qualifications ORDER BY issued_at")
    stale = []
    for pattern in ("qual", "qquota", "qholder", "quals"):
        stale += [key async for key in redis.scan_iter(match=f"{keys.tag}:{pattern}:*")]
    # Which qualification each payment redeemed, from the ledger (the mirror keeps only each
    # qualification's latest holder): voided and refunded payments keep showing their code.
    links = await connection.fetch(
        "SELECT authorization_id, payload->>'qualification' AS code FROM ledger_events"
        " WHERE event_type = 'AUTHORIZED' AND coalesce(payload->>'qualification', '') <> ''"
    )
    async with redis.pipeline(transaction=True) as pipe:
        for key in stale:
            pipe.delete(key)
        pipe.delete(keys.qualification_expiry)
        for link in links:
            pipe.hset(keys.authorization(link["authorization_id"]), "qualification", link["code"])
        for row in rows:
            code = row["redemption_code"]
            pipe.hset(
                keys.qualification(code),
                mapping={
                    "code": code,
                    "state": row["state"],
                    "campaign": row["campaign_id"],
                    "category": row["category"],
                    "consumer": row["consumer_key"],
                    "partner": row["partner_id"],
                    "issued_ms": to_ms(row["issued_at"]),
                    "expires_ms": to_ms(row["expires_at"]),
                    "updated_ms": to_ms(row["updated_at"]),
                    "authorization": row["authorization_id"],
                    "refund_policy": row["refund_policy"],
                    "masked_id": row["masked_id_number"],
                    "masked_phone": row["masked_phone_number"],
                    "cell": row["location_cell"],
                    "request_id": row["request_id"],
                },
            )
            pipe.zadd(keys.consumer_qualifications(row["consumer_key"]), {code: to_ms(row["issued_at"])})
            if row["pack_id"]:
                pipe.hset(
                    keys.qualification(code),
                    mapping={"pack": row["pack_id"], "threshold_fen": row["threshold_fen"], "off_fen": row["off_fen"]},
                )
            if row["state"] == "ISSUED":
                pipe.zadd(keys.qualification_expiry, {code: to_ms(row["expires_at"])})
        for (campaign_id, consumer_key, field), count in qualification_counters(rows).items():
            if consumer_key:
                pipe.hset(keys.qualification_holder(campaign_id, consumer_key), field, count)
            else:
                pipe.hset(keys.qualification_quota(campaign_id), field, count)
        await pipe.execute()
    newest = await connection.fetchrow(
        "SELECT last_event_ms, last_event_seq FROM qualifications ORDER BY last_event_ms DESC, last_event_seq DESC"
        " LIMIT 1"
    )
    if newest is not None:
        # Snapshots are ordered by stream id: ids below the table's newest would be ignored.
        last = f"{newest['last_event_ms']}-{newest['last_event_seq']}"
        await advance_stream_id(redis, keys.qualification_events, GROUP, last)
    return len(rows)
