"""Checking the ledger: chain verification, reconciliation with Redis, and rebuilding Redis.

- ``verify``: recomputes every campaign's hash chain from its first entry and reports the first
  break (an altered, removed or inserted entry), and checks that debits equal credits.
- ``reconcile``: compares every Redis budget, consumer-usage and serial counter with the sums
  over the ledger and lists each difference, to the fen.
- ``rebuild``: restores those Redis counters (and the authorizations and pending holds) from
  PostgreSQL after a Redis loss.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from server.domain.posting import GENESIS_HASH, Posting, entry_hash
from storage.postgres.ledger import payload_digest, to_ms
from storage.redis.keys import Keys


@dataclass(frozen=True)
class ChainBreak:
    campaign_id: str
    entry_seq: int
    problem: str


@dataclass(frozen=True)
class VerifyReport:
    entries_checked: int
    debit_fen: int
    credit_fen: int
    breaks: list[ChainBreak]
    unbalanced_events: list[str]

    @property
    def ok(self) -> bool:
        return not self.breaks and not self.unbalanced_events and self.debit_fen == self.credit_fen


async def verify(connection: asyncpg.Connection) -> VerifyReport:
    """Recomputes each campaign's chain in sequence order; the first break per campaign is reported."""
    breaks: list[ChainBreak] = []
    checked = debit_total = credit_total = 0
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        # Heads and entries from one snapshot, so a batch committing meanwhile is not a "break".
        heads = {
            row["campaign_id"]: (row["last_seq"], row["last_hash"])
            for row in await connection.fetch("SELECT * FROM ledger_chain_heads")
        }
        campaigns = [
            row["campaign_id"] for row in await connection.fetch("SELECT DISTINCT campaign_id FROM ledger_entries")
        ]
        for campaign_id in sorted(set(campaigns) | set(heads)):
            expected_prev, expected_seq, broken = GENESIS_HASH, 0, False
            async for row in connection.cursor(
                "SELECT entry.*, event.payload AS event_payload FROM ledger_entries AS entry"
                " JOIN ledger_events AS event USING (event_id) WHERE entry.campaign_id = $1 ORDER BY entry.entry_seq",
                campaign_id,
                prefetch=2000,
            ):
                checked += 1
                debit_total += row["debit_fen"]
                credit_total += row["credit_fen"]
                if broken:
                    continue
                expected_seq += 1
                posting = Posting(row["category"], row["account"], row["debit_fen"], row["credit_fen"])
                digest = entry_hash(
                    row["prev_hash"],
                    campaign_id,
                    row["entry_seq"],
                    row["event_id"],
                    row["authorization_id"],
                    posting,
                    row["merchant_id"],
                    to_ms(row["occurred_at"]),
                    payload_digest(orjson.loads(row["event_payload"])),
                )
                problem = ""
                if row["entry_seq"] != expected_seq:
                    problem = f"sequence jumps to {row['entry_seq']} (an entry is missing)"
                elif row["prev_hash"] != expected_prev:
                    problem = "prev_hash does not match the previous entry's hash"
                elif digest != row["entry_hash"]:
                    problem = "entry or its event does not match its hash (altered)"
                if problem:
                    breaks.append(ChainBreak(campaign_id, expected_seq, problem))
                    broken = True
                expected_prev = row["entry_hash"]
            head = heads.get(campaign_id)
            if not broken and head is not None and (head[0], head[1]) != (expected_seq, expected_prev):
                breaks.append(ChainBreak(campaign_id, expected_seq + 1, "entries after this one are missing"))
        unbalanced = await connection.fetch(
            "SELECT event_id FROM ledger_entries GROUP BY event_id HAVING sum(debit_fen) <> sum(credit_fen)"
        )
    return VerifyReport(checked, debit_total, credit_total, breaks, [row["event_id"] for row in unbalanced])


@dataclass(frozen=True)
class Difference:
    kind: str  # budget, usage or serial
    key: str
    ledger: int | str
    redis: int | str


@dataclass
class Counters:
    """Money state in one comparable shape, from either side."""

    budget: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (campaign, category, field)
    # (campaign, consumer, category or day:<day>:<merchant>)
    usage: dict[tuple[str, str, str], int] = field(default_factory=dict)
    serials: dict[str, str] = field(default_factory=dict)  # serial -> authorization (a device is its serial)

    def nonzero(self) -> Counters:
        return Counters(
            {key: value for key, value in self.budget.items() if value},
            {key: value for key, value in self.usage.items() if value},
            dict(self.serials),
        )


ACCOUNT_FIELDS = {"PENDING": "reserved", "MERCHANT_RECEIVABLE": "spent", "RECOVERED": "clawed_back"}


async def ledger_counters(connection: asyncpg.Connection) -> Counters:
    counters = Counters()
    balances = await connection.fetch(
        "SELECT campaign_id, category, account, sum(debit_fen) - sum(credit_fen) AS balance FROM ledger_entries"
        " WHERE account <> 'AVAILABLE' GROUP BY campaign_id, category, account"
    )
    for row in balances:
        key = (row["campaign_id"], row["category"], ACCOUNT_FIELDS[row["account"]])
        counters.budget[key] = counters.budget.get(key, 0) + int(row["balance"])
        # Redis spent is the budget used: still owed to merchants (MERCHANT_RECEIVABLE) or
        # clawed back from them (RECOVERED, not granted again).
        if row["account"] == "RECOVERED":
            spent = (row["campaign_id"], row["category"], "spent")
            counters.budget[spent] = counters.budget.get(spent, 0) + int(row["balance"])
    refunded = await connection.fetch(
        "SELECT campaign_id, line->>'c' AS category, sum((line->>'s')::bigint) AS amount"
        " FROM ledger_events, jsonb_array_elements(lines) AS line WHERE event_type = 'REFUNDED'"
        " GROUP BY campaign_id, line->>'c'"
    )
    for row in refunded:
        counters.budget[(row["campaign_id"], row["category"], "refunded")] = int(row["amount"])
    # A line counts one unit, unless it carries u: a basket voucher counts once, on its first
    # line, and a refund of part of a basket gives nothing back (refund.lua).
    usage = await connection.fetch(
        "SELECT campaign_id, consumer_key, line->>'c' AS category,"
        " sum(coalesce((line->>'u')::int, 1) * CASE event_type WHEN 'AUTHORIZED' THEN 1"
        " WHEN 'CAPTURED' THEN 0 WHEN 'CLAWED_BACK' THEN 0 ELSE -1 END) AS units"
        " FROM ledger_events, jsonb_array_elements(lines) AS line"
        " GROUP BY campaign_id, consumer_key, line->>'c'"
    )
    for row in usage:
        counters.usage[(row["campaign_id"], row["consumer_key"], row["category"])] = int(row["units"])
    # Per-merchant daily limits: an authorization counted on a programme day carries it in every
    # event (``day``); it holds its slot unless voided or expired (a refund keeps it). The Redis
    # field is ``day:<day>:<merchant>`` in the consumer's usage hash.
    days = await connection.fetch(
        "SELECT campaign_id, consumer_key, merchant_id, (payload->>'day')::bigint AS day,"
        " sum(CASE event_type WHEN 'AUTHORIZED' THEN 1 WHEN 'VOIDED' THEN -1 WHEN 'EXPIRED' THEN -1 ELSE 0 END)"
        " AS payments FROM ledger_events WHERE payload ? 'day'"
        " GROUP BY campaign_id, consumer_key, merchant_id, payload->>'day'"
    )
    for row in days:
        field_name = f"day:{row['day']}:{row['merchant_id']}"
        counters.usage[(row["campaign_id"], row["consumer_key"], field_name)] = int(row["payments"])
    # A serial is held from the authorization until a void, expiry or refund of its line (a
    # claw-back keeps it: the device was sold, fraudulently).
    serials = await connection.fetch(
        "SELECT line->>'sn' AS serial, authorization_id, sum(CASE event_type"
        " WHEN 'AUTHORIZED' THEN 1 WHEN 'CAPTURED' THEN 0 WHEN 'CLAWED_BACK' THEN 0 ELSE -1 END) AS held"
        " FROM ledger_events, jsonb_array_elements(lines) AS line WHERE line->>'sn' <> ''"
        " GROUP BY line->>'sn', authorization_id HAVING sum(CASE event_type WHEN 'AUTHORIZED' THEN 1"
        " WHEN 'CAPTURED' THEN 0 WHEN 'CLAWED_BACK' THEN 0 ELSE -1 END) > 0"
    )
    for row in serials:
        counters.serials[row["serial"]] = row["authorization_id"]
    return counters


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def redis_counters(redis: Redis, keys: Keys) -> Counters:
    counters = Counters()
    tag = keys.tag
    async for raw_key in redis.scan_iter(match=f"{tag}:budget:*", count=1000):
        campaign_id = _text(raw_key).removeprefix(f"{tag}:budget:")
        for raw_field, raw_value in (await redis.hgetall(raw_key)).items():
            category, name = _text(raw_field).rsplit(":", 1)
            if name != "total":
                counters.budget[(campaign_id, category, name)] = int(raw_value)
    async for raw_key in redis.scan_iter(match=f"{tag}:usage:*", count=1000):
        campaign_id, consumer_key = _text(raw_key).removeprefix(f"{tag}:usage:").split(":", 1)
        for raw_field, raw_value in (await redis.hgetall(raw_key)).items():
            counters.usage[(campaign_id, consumer_key, _text(raw_field))] = int(raw_value)
    async for raw_key in redis.scan_iter(match=f"{tag}:serial:*", count=1000):
        serial = _text(raw_key).removeprefix(f"{tag}:serial:")
        owner = await redis.get(raw_key)
        # Serials other providers reported (storage/redis/exchange.py, "peer:<id>") are not in our ledger.
        if owner is not None and not _text(owner).startswith("peer:"):
            counters.serials[serial] = _text(owner)
    return counters


def compare(ledger: Counters, redis: Counters) -> list[Difference]:
    """Every counter on which the two sides disagree (zero and absent are the same)."""
    left, right = ledger.nonzero(), redis.nonzero()
    differences: list[Difference] = []
    for key in sorted(set(left.budget) | set(right.budget)):
        if left.budget.get(key, 0) != right.budget.get(key, 0):
            differences.append(Difference("budget", ":".join(key), left.budget.get(key, 0), right.budget.get(key, 0)))
    for key in sorted(set(left.usage) | set(right.usage)):
        if left.usage.get(key, 0) != right.usage.get(key, 0):
            differences.append(Difference("usage", ":".join(key), left.usage.get(key, 0), right.usage.get(key, 0)))
    for device in sorted(set(left.serials) | set(right.serials)):
        if left.serials.get(device, "") != right.serials.get(device, ""):
            differences.append(
                Difference("serial", device, left.serials.get(device, ""), right.serials.get(device, ""))
            )
    return differences


async def reconcile(connection: asyncpg.Connection, redis: Redis, keys: Keys) -> list[Difference]:
    return compare(await ledger_counters(connection), await redis_counters(redis, keys))


async def rebuild(connection: asyncpg.Connection, redis: Redis, keys: Keys) -> Counters:
    """Restores Redis money state from the ledger: budget reserved/spent/refunded/clawed_back, consumer usage,
    serials, and the authorizations with their pending holds. Run it after a Redis loss, with
    the reference data re-published first (``server.reference publish``)."""
    counters = await ledger_counters(connection)
    stale = [key async for key in redis.scan_iter(match=f"{keys.tag}:usage:*")]
    stale += [key async for key in redis.scan_iter(match=f"{keys.tag}:serial:*")]
    budgets: dict[str, dict[str, int]] = defaultdict(dict)
    async for raw_key in redis.scan_iter(match=f"{keys.tag}:budget:*"):
        for raw_field in await redis.hkeys(raw_key):
            if not _text(raw_field).endswith(":total"):
                budgets[_text(raw_key)][_text(raw_field)] = 0
    for (campaign_id, category, name), value in counters.budget.items():
        budgets[keys.budget(campaign_id)][f"{category}:{name}"] = value
    # Each with the programme day it was counted on (its AUTHORIZED event's), so that a void or
    # expiry after the rebuild gives the daily slot back.
    # And with the payment channel's reference its capture carried (GetAuthorization shows it).
    authorizations = await connection.fetch(
        "SELECT held.*, coalesce((event.payload->>'day')::bigint, 0) AS day,"
        " coalesce(captured.channel_reference, '') AS channel_reference"
        " FROM authorizations AS held LEFT JOIN ledger_events AS event"
        " ON event.authorization_id = held.authorization_id AND event.event_type = 'AUTHORIZED'"
        " LEFT JOIN ledger_events AS captured"
        " ON captured.authorization_id = held.authorization_id AND captured.event_type = 'CAPTURED'"
    )
    last_event = await connection.fetchrow(
        "SELECT event_ms, event_seq FROM ledger_events ORDER BY event_ms DESC, event_seq DESC LIMIT 1"
    )
    async with redis.pipeline(transaction=True) as pipe:
        for key in stale:
            pipe.delete(key)
        for budget_key, fields in budgets.items():
            if fields:
                pipe.hset(budget_key, mapping=fields)  # type: ignore[arg-type]
        for (campaign_id, consumer_key, category), units in counters.usage.items():
            if units:
                pipe.hset(keys.usage(campaign_id, consumer_key), category, units)
        for serial, authorization_id in counters.serials.items():
            pipe.set(keys.serial(serial), authorization_id)
        for row in authorizations:
            pipe.hset(keys.authorization(row["authorization_id"]), mapping=_authorization_hash(row))  # type: ignore[arg-type]
            if row["state"] == "PENDING":
                pipe.zadd(keys.holds, {row["authorization_id"]: to_ms(row["hold_expires_at"])})
        await pipe.execute()
    if last_event is not None:
        await advance_stream_id(
            redis, keys.ledger, "ledger-writer", f"{last_event['event_ms']}-{last_event['event_seq']}"
        )
    return counters


async def advance_stream_id(redis: Redis, stream: str, group: str, last_written: str) -> None:
    """A new stream must never hand out an id PostgreSQL already holds (a Redis clock behind
    the old one would): create it with its consumer group and move its last id past
    ``last_written``."""
    client: Any = redis
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis_errors.ResponseError as error:  # BUSYGROUP: the group exists already
        if "BUSYGROUP" not in str(error):
            raise
    info = await client.xinfo_stream(stream)
    current = _text(info["last-generated-id"])
    if tuple(map(int, current.split("-"))) < tuple(map(int, last_written.split("-"))):
        await client.execute_command("XSETID", stream, last_written)


def _authorization_hash(row: Any) -> dict[str, Any]:
    return {
        "id": row["authorization_id"],
        "state": row["state"],
        "campaign": row["campaign_id"],
        "merchant": row["merchant_id"],
        "terminal": row["terminal_id"],
        "consumer": row["consumer_key"],
        "channel": row["channel"],
        "lines": orjson.dumps(orjson.loads(row["lines"])).decode(),
        "total_fen": row["total_price_fen"],
        "subsidy_fen": row["subsidy_fen"],
        "refunded_fen": row["refunded_fen"],
        "created_ms": to_ms(row["created_at"]),
        "expires_ms": to_ms(row["hold_expires_at"]),
        "updated_ms": to_ms(row["updated_at"]),
        "request_id": "",
        "last_request_id": "",
        "day": row["day"],
        **({"channel_reference": row["channel_reference"]} if row["channel_reference"] else {}),
    }
