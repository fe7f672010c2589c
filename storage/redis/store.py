"""The money path's Redis operations: one script call each.

``authorize`` is the hot path: exactly one EVALSHA, no other Redis command and no
PostgreSQL. Capture, void and refund first read the authorization's immutable fields
(campaign, consumer, lines) to name every key the script touches, then run their script,
which re-checks those fields; two round trips off the hot path keep "keys only via KEYS".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from storage.redis.keys import Keys
from storage.redis.scripts import Reply, Scripts

log = logging.getLogger("subsidy.store")

# Redis not answering: a condition of the server, never of one item, so a sweep stops there.
UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError)


@dataclass(frozen=True)
class LineInput:
    line_id: str
    gtin: str
    unit_price_fen: int
    serial_number: str


@dataclass(frozen=True)
class AuthorizeInput:
    payload_hash: str
    request_id: str
    terminal_id: str
    merchant_id: str
    nonce: str
    campaign_id: str
    consumer_key: str
    channel: int
    authorization_id: str
    lines: Sequence[LineInput]
    redemption_code: str = ""


@dataclass(frozen=True)
class LifecycleInput:
    payload_hash: str
    request_id: str
    terminal_id: str
    merchant_id: str
    nonce: str
    authorization_id: str


@dataclass(frozen=True)
class ClaimInput:
    payload_hash: str
    request_id: str
    partner_id: str
    nonce: str
    campaign_id: str
    category: str
    consumer_key: str
    redemption_code: str
    # 0, or the ClaimDeclineReason the location check produced.
    location_verdict: int
    masked_id_number: str
    masked_phone_number: str
    location_cell: str


@dataclass(frozen=True)
class CancelInput:
    payload_hash: str
    request_id: str
    partner_id: str
    nonce: str
    redemption_code: str


@dataclass(frozen=True)
class StoreLimits:
    hold_ttl_s: int
    idempotency_ttl_s: int
    nonce_ttl_s: int

    def __post_init__(self) -> None:
        for name in ("hold_ttl_s", "idempotency_ttl_s", "nonce_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


NOT_FOUND = Reply(kind="error", body={"error": "AUTHORIZATION_NOT_FOUND"})


class RedisStore:
    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts, limits: StoreLimits) -> None:
        self.redis = redis
        self.keys = keys
        self._scripts = scripts
        self._limits = limits

    @property
    def nonce_ttl_s(self) -> int:
        return self._limits.nonce_ttl_s

    async def authorize(self, request: AuthorizeInput) -> Reply:
        keys = self.keys
        script_keys = [
            keys.nonce(request.terminal_id, request.nonce),
            keys.idempotency(request.terminal_id, request.request_id),
            keys.terminal(request.terminal_id),
            keys.merchant(request.merchant_id),
            keys.campaign(request.campaign_id),
            keys.rules(request.campaign_id),
            keys.budget(request.campaign_id),
            keys.usage(request.campaign_id, request.consumer_key),
            keys.authorization(request.authorization_id),
            keys.holds,
            keys.ledger,
            # Without a code the script never reads this key; it still holds the slot.
            keys.qualification(request.redemption_code),
            keys.external_consumer(request.consumer_key),
            keys.qualification_events,
        ]
        args: list[str | int] = [
            request.payload_hash,
            request.request_id,
            request.terminal_id,
            request.merchant_id,
            request.campaign_id,
            request.consumer_key,
            request.channel,
            request.authorization_id,
            self._limits.hold_ttl_s,
            self._limits.idempotency_ttl_s,
            self._limits.nonce_ttl_s,
            len(request.lines),
            request.redemption_code,
        ]
        for line in request.lines:
            script_keys.append(keys.product(line.gtin))
            # A line without a serial still takes a key slot so line i's keys stay at a fixed
            # offset; the script never touches it.
            script_keys.append(keys.serial(line.serial_number))
            args.extend([line.line_id, line.gtin, line.unit_price_fen, line.serial_number])
        return await self._scripts.call("authorize", script_keys, args)

    async def _lifecycle_keys(self, authorization_id: str) -> LifecycleKeys | None:
        """The keys of an authorization's lifecycle scripts, from its immutable fields."""
        key = self.keys.authorization(authorization_id)
        campaign, consumer, raw_lines, code = await self.redis.hmget(
            key, ["campaign", "consumer", "lines", "qualification"]
        )
        if campaign is None or consumer is None or raw_lines is None:
            return None
        campaign_id, consumer_key = text(campaign), text(consumer)
        base = [
            key,
            self.keys.holds,
            self.keys.budget(campaign_id),
            self.keys.usage(campaign_id, consumer_key),
            self.keys.ledger,
        ]
        serials = [self.keys.serial(line["sn"]) for line in orjson.loads(raw_lines) if line["sn"]]
        qualification = self._qualification_keys(text(code) if code else "", campaign_id, consumer_key)
        return LifecycleKeys(base, qualification, serials, campaign_id, consumer_key)

    def _qualification_keys(self, code: str, campaign_id: str, consumer_key: str) -> list[str]:
        """A qualification's hash, its campaign's quota, its holder's claims, the expiry set and
        the qualification stream (placeholders the scripts never touch when ``code`` is empty)."""
        return [
            self.keys.qualification(code),
            self.keys.qualification_quota(campaign_id),
            self.keys.qualification_holder(campaign_id, consumer_key),
            self.keys.qualification_expiry,
            self.keys.qualification_events,
        ]

    async def _lifecycle(self, name: str, request: LifecycleInput, extra: Sequence[str]) -> Reply:
        found = await self._lifecycle_keys(request.authorization_id)
        if found is None:
            return NOT_FOUND
        script_keys = [
            *found.base,
            self.keys.idempotency(request.terminal_id, request.request_id),
            self.keys.nonce(request.terminal_id, request.nonce),
            self.keys.terminal(request.terminal_id),
            self.keys.merchant(request.merchant_id),
            *found.qualification,
            *found.serials,
        ]
        args: list[str | int] = [
            request.payload_hash,
            request.request_id,
            request.merchant_id,
            self._limits.idempotency_ttl_s,
            self._limits.nonce_ttl_s,
            found.campaign_id,
            found.consumer_key,
            request.terminal_id,
            *extra,
        ]
        return await self._scripts.call(name, script_keys, args)

    async def capture(self, request: LifecycleInput) -> Reply:
        return await self._lifecycle("capture", request, ())

    async def void(self, request: LifecycleInput) -> Reply:
        return await self._lifecycle("void", request, ())

    async def refund(self, request: LifecycleInput, line_ids: Sequence[str]) -> Reply:
        return await self._lifecycle("refund", request, line_ids)

    async def location_rule(self, campaign_id: str) -> tuple[float, int, str] | None:
        """The campaign's location rule for claims as published: the largest accuracy radius in
        metres, the oldest fix age in seconds, and its region's GeoJSON text ("" without a
        region); None when the campaign has none."""
        accuracy, age, region = await self.redis.hmget(
            self.keys.campaign(campaign_id), ["loc_accuracy_m", "loc_age_s", "region"]
        )
        if accuracy is None or age is None:
            return None
        return float(accuracy), int(age), text(region) if region else ""

    async def get_authorization(
        self, authorization_id: str, terminal_id: str, merchant_id: str
    ) -> dict[str, Any] | str | None:
        """The authorization's view for the calling terminal's merchant; None when absent or
        another merchant's; "TERMINAL_INACTIVE" / "MERCHANT_INACTIVE" when the caller is
        suspended (suspension stops every call of a credential, reads included). One round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.terminal(terminal_id), ["status", "merchant"])
            pipe.hget(self.keys.merchant(merchant_id), "status")
            pipe.hgetall(self.keys.authorization(authorization_id))
            terminal, merchant_status, raw = await pipe.execute()
        if terminal[0] != b"ACTIVE" or terminal[1] is None or text(terminal[1]) != merchant_id:
            return "TERMINAL_INACTIVE"
        if merchant_status != b"ACTIVE":
            return "MERCHANT_INACTIVE"
        if not raw:
            return None
        fields = {text(key): text(value) for key, value in raw.items()}
        if fields["merchant"] != merchant_id:
            return None
        return authorization_view(fields)

    async def claim_nonce(self, terminal_id: str, nonce: str) -> bool:
        """For read-only calls, whose scripts-free path records the nonce on its own."""
        claimed = await self.redis.set(self.keys.nonce(terminal_id, nonce), b"1", nx=True, ex=self._limits.nonce_ttl_s)
        return bool(claimed)

    async def expire_due_holds(self, limit: int) -> int:
        """Expires up to ``limit`` holds whose expiry has passed; returns how many it expired.

        Every server process runs this; two processes racing on one hold are safe because the
        script changes state only while the hold is PENDING.
        """
        due = await self._due(self.keys.holds, limit)
        expired = 0
        for raw_id in due:
            authorization_id = text(raw_id)
            try:
                found = await self._lifecycle_keys(authorization_id)
                if found is None:
                    await self.redis.zrem(self.keys.holds, authorization_id)
                    continue
                reply = await self._scripts.call("expire_hold", [*found.base, *found.qualification, *found.serials], [])
            except UNAVAILABLE:
                raise  # Redis is down, not this hold: the next sweep tries again
            except Exception as error:  # this hold's data breaks its expiry: never block the rest
                await self._set_aside(self.keys.holds, self.keys.holds_set_aside, authorization_id, "hold", error)
                continue
            expired += 1 if reply.body.get("expired") else 0
        return expired

    async def _set_aside(self, schedule: str, aside: str, member: str, kind: str, error: Exception) -> None:
        """Moves one member out of a sweeper's schedule into its set-aside set, in one MULTI, so
        the sweep goes on with the rest and the item is reported (reconcile, metrics, health)
        until an operator requeues it. Logged once per item: it leaves the schedule here."""
        seconds, microseconds = await self.redis.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(aside, {member: seconds * 1000 + microseconds // 1000})
            pipe.zrem(schedule, member)
            moved = (await pipe.execute())[1]
        if moved:
            log.error(
                "expiry failed; set aside",
                extra={"kind": kind, "id": member, "error": type(error).__name__, "detail": str(error)[:200]},
            )

    async def requeue_set_aside(self) -> int:
        return await requeue_set_aside(self.redis, self.keys)

    async def _due(self, schedule: str, limit: int) -> list[bytes]:
        """Up to ``limit`` members of a sorted set scored by a time (ms) that Redis TIME has passed."""
        seconds, microseconds = await self.redis.time()
        now_ms = seconds * 1000 + microseconds // 1000
        due = await self.redis.zrangebyscore(schedule, "-inf", now_ms, start=0, num=limit)
        return [member for member in due if isinstance(member, bytes)]  # plain members: no scores asked

    async def claim(self, request: ClaimInput) -> Reply:
        keys = self.keys
        script_keys = [
            keys.nonce(request.partner_id, request.nonce),
            keys.idempotency(request.partner_id, request.request_id),
            keys.campaign(request.campaign_id),
            keys.rules(request.campaign_id),
            keys.qualification_quota(request.campaign_id),
            keys.qualification_holder(request.campaign_id, request.consumer_key),
            keys.external_consumer(request.consumer_key),
            keys.qualification(request.redemption_code),
            keys.consumer_qualifications(request.consumer_key),
            keys.qualification_expiry,
            keys.qualification_events,
        ]
        args: list[str | int] = [
            request.payload_hash,
            request.request_id,
            request.partner_id,
            request.campaign_id,
            request.category,
            request.consumer_key,
            request.redemption_code,
            request.location_verdict,
            self._limits.idempotency_ttl_s,
            self._limits.nonce_ttl_s,
            request.masked_id_number,
            request.masked_phone_number,
            request.location_cell,
        ]
        return await self._scripts.call("claim_qualification", script_keys, args)

    async def cancel_qualification(self, request: CancelInput) -> Reply:
        campaign, consumer = await self.redis.hmget(
            self.keys.qualification(request.redemption_code), ["campaign", "consumer"]
        )
        if campaign is None or consumer is None:
            return Reply(kind="error", body={"error": "QUALIFICATION_NOT_FOUND"})
        campaign_id, consumer_key = text(campaign), text(consumer)
        script_keys = [
            self.keys.nonce(request.partner_id, request.nonce),
            self.keys.idempotency(request.partner_id, request.request_id),
            *self._qualification_keys(request.redemption_code, campaign_id, consumer_key),
        ]
        args: list[str | int] = [
            request.payload_hash,
            request.request_id,
            request.partner_id,
            self._limits.idempotency_ttl_s,
            self._limits.nonce_ttl_s,
            campaign_id,
            consumer_key,
        ]
        return await self._scripts.call("cancel_qualification", script_keys, args)

    async def get_qualification(self, redemption_code: str, partner_id: str) -> dict[str, Any] | None:
        """The qualification's view; None when absent or claimed through another partner."""
        raw = await self.redis.hgetall(self.keys.qualification(redemption_code))
        fields = {text(key): text(value) for key, value in raw.items()}
        if not fields or fields.get("partner") != partner_id:
            return None
        return qualification_view(fields)

    async def list_qualifications(
        self, consumer_key: str, partner_id: str, campaign_id: str, limit: int
    ) -> list[dict[str, Any]]:
        """The consumer's qualifications through this partner (and campaign), newest first."""
        codes = await self.redis.zrevrange(self.keys.consumer_qualifications(consumer_key), 0, -1)
        views: list[dict[str, Any]] = []
        for start in range(0, len(codes), 100):
            async with self.redis.pipeline(transaction=False) as pipe:
                for code in codes[start : start + 100]:
                    pipe.hgetall(self.keys.qualification(text(code)))  # type: ignore[arg-type]  # no scores asked
                records = await pipe.execute()
            for raw in records:
                fields = {text(key): text(value) for key, value in raw.items()}
                if fields and fields["partner"] == partner_id and campaign_id in ("", fields["campaign"]):
                    views.append(qualification_view(fields))
                    if len(views) == limit:
                        return views
        return views

    async def expire_due_qualifications(self, limit: int) -> int:
        """Expires up to ``limit`` ISSUED qualifications past their validity; returns how many.
        Concurrent sweepers and a racing redemption are safe: the script acts only on ISSUED."""
        due = await self._due(self.keys.qualification_expiry, limit)
        expired = 0
        for raw_code in due:
            code = text(raw_code)
            campaign, consumer = await self.redis.hmget(self.keys.qualification(code), ["campaign", "consumer"])
            if campaign is None or consumer is None:
                await self.redis.zrem(self.keys.qualification_expiry, code)
                continue
            script_keys = self._qualification_keys(code, text(campaign), text(consumer))
            try:
                reply = await self._scripts.call("expire_qualification", script_keys, [code])
            except UNAVAILABLE:
                raise
            except Exception as error:  # a poison qualification never blocks the rest
                aside = self.keys.qualifications_set_aside
                await self._set_aside(self.keys.qualification_expiry, aside, code, "qualification", error)
                continue
            expired += 1 if reply.body.get("expired") else 0
        return expired


def text(value: bytes | str) -> str:
    """redis-py returns bytes (decode_responses is off for speed); names and ids are ASCII."""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class LifecycleKeys:
    """An authorization's keys for its lifecycle scripts (see lifecycle_keys in _lib.lua)."""

    base: list[str]
    qualification: list[str]
    serials: list[str]
    campaign_id: str
    consumer_key: str


def qualification_view(fields: dict[str, str]) -> dict[str, Any]:
    """The same view the scripts return (qualification_view in _lib.lua), from a raw hash."""
    return {
        "code": fields["code"],
        "state": fields["state"],
        "campaign": fields["campaign"],
        "category": fields["category"],
        "consumer": fields["consumer"],
        "issued_ms": int(fields["issued_ms"]),
        "expires_ms": int(fields["expires_ms"]),
        "updated_ms": int(fields["updated_ms"]),
        "authorization": fields.get("authorization", ""),
        "masked_id": fields.get("masked_id", ""),
        "masked_phone": fields.get("masked_phone", ""),
        "cell": fields.get("cell", ""),
    }


def authorization_view(fields: dict[str, str]) -> dict[str, Any]:
    """The same view the scripts return (auth_view in _lib.lua), from a raw hash."""
    return {
        "id": fields["id"],
        "state": fields["state"],
        "campaign": fields["campaign"],
        "merchant": fields["merchant"],
        "terminal": fields["terminal"],
        "channel": int(fields["channel"]),
        "lines": orjson.loads(fields["lines"]),
        "total_fen": int(fields["total_fen"]),
        "subsidy_fen": int(fields["subsidy_fen"]),
        "refunded_fen": int(fields["refunded_fen"]),
        "created_ms": int(fields["created_ms"]),
        "expires_ms": int(fields["expires_ms"]),
        "updated_ms": int(fields["updated_ms"]),
        "qualification": fields.get("qualification", ""),
    }


@dataclass(frozen=True)
class SweepBacklog:
    """What the sweepers have not done: overdue work (past its expiry by more than the grace,
    still waiting) and poison items set aside. Every number is 0 on a healthy deployment."""

    overdue_holds: int
    overdue_qualifications: int
    set_aside_holds: int
    set_aside_qualifications: int

    @property
    def total(self) -> int:
        return self.overdue_holds + self.overdue_qualifications + self.set_aside_holds + self.set_aside_qualifications


async def requeue_set_aside(redis: Redis, keys: Keys) -> int:
    """Puts every set-aside hold and qualification back on its schedule, due now (after the
    defect that poisoned them is fixed; ``python -m server.ledger requeue-set-aside``). An item
    that fails again is set aside again. Returns how many were requeued."""
    requeued = 0
    for aside, schedule in (
        (keys.holds_set_aside, keys.holds),
        (keys.qualifications_set_aside, keys.qualification_expiry),
    ):
        members = [text(member) for member in await redis.zrange(aside, 0, -1)]  # type: ignore[arg-type]  # no scores asked
        for member in members:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.zadd(schedule, {member: 0})
                pipe.zrem(aside, member)
                await pipe.execute()
            requeued += 1
    return requeued


# Work this long past its expiry and still scheduled is overdue: the sweepers run every
# SUBSIDY_SWEEP_INTERVAL_MS (a second by default), so a minute means they are not keeping up.
OVERDUE_GRACE_MS = 60_000


async def sweep_backlog(redis: Redis, keys: Keys, grace_ms: int = OVERDUE_GRACE_MS) -> SweepBacklog:
    """Counted on Redis's clock, in one pipelined round trip."""
    seconds, microseconds = await redis.time()
    cutoff = seconds * 1000 + microseconds // 1000 - grace_ms
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(keys.holds, "-inf", cutoff)
        pipe.zcount(keys.qualification_expiry, "-inf", cutoff)
        pipe.zcard(keys.holds_set_aside)
        pipe.zcard(keys.qualifications_set_aside)
        replies = await pipe.execute()
    return SweepBacklog(*(int(value) for value in replies))
