"""The money path's Redis operations: one script call each.

``authorize`` is the hot path: exactly one EVALSHA, no other Redis command and no
PostgreSQL. Capture, void and refund first read the authorization's immutable fields
(campaign, consumer, lines) to name every key the script touches, then run their script,
which re-checks those fields; two round trips off the hot path keep "keys only via KEYS".
Each script's KEYS, ARGV and answer are declared in ``storage/redis/contract.py``; the
answers come back decoded into its Structs (``Answer`` or ``Failure``).
"""

from __future__ import annotations

import logging
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from server.domain.validation import new_redemption_code
from storage.redis.contract import (
    AUTHORIZE,
    CANCEL,
    CAPTURE,
    CLAIM,
    CLAW_BACK,
    DECLINE_REASONS,
    EXPIRE_HOLD,
    EXPIRE_QUALIFICATION,
    LINES,
    REFUND,
    VOID,
    AuthorizationView,
    AuthorizeAnswer,
    AuthorizeArgs,
    AuthorizeKeys,
    CancelArgs,
    CancelKeys,
    Cancelled,
    ChannelLifecycleArgs,
    ClaimAnswer,
    ClaimArgs,
    ClaimKeys,
    ClawBackArgs,
    ClawBackKeys,
    ClawedBack,
    ExpireQualificationArgs,
    Failure,
    HoldKeys,
    LifecycleArgs,
    LifecycleKeys,
    LineArgs,
    LineKeys,
    NoArgs,
    QualificationKeys,
    QualificationView,
    Refunded,
    Reply,
    Settled,
    VoucherArgs,
)
from storage.redis.keys import Keys
from storage.redis.scripts import Scripts

log = logging.getLogger("subsidy.store")

# Redis not answering: a condition of the server, never of one item, so a sweep stops there.
# On a cluster also a slot without a primary (CLUSTERDOWN, or no node for it in the client's
# map) and a key caught in a slot migration past the client's retries (TRYAGAIN).
UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterDownError,
    redis_errors.SlotNotCoveredError,
    redis_errors.TryAgainError,
)


# One line of an Authorize: its ARGV as authorize.lua reads them (line id, GTIN, unit price in
# fen, serial or "").
LineInput = LineArgs


class AuthorizeInput(msgspec.Struct, frozen=True, gc=False):
    """What Authorize passes the store. A frozen msgspec Struct, not a frozen dataclass: built
    once per Authorize, it costs ~0.4 us against ~2.5 us (issue 15); no field refers back to it."""

    payload_hash: str
    request_id: str
    terminal_id: str
    merchant_id: str
    nonce: str
    campaign_id: str
    consumer_key: str  # "" when the redemption code's owner pays (resolved by the script)
    channel: int
    authorization_id: str
    lines: Sequence[LineInput]
    redemption_code: str = ""
    # Location at redemption: the service's verdict on the phone's location (0: accepted, else
    # the LOCATION_* DeclineReason), applied by the script only when the campaign requires it.
    # The default, LOCATION_REQUIRED, is a request that sent none.
    location_verdict: int = DECLINE_REASONS["LOCATION_REQUIRED"]


@dataclass(frozen=True)
class LifecycleInput:
    payload_hash: str
    request_id: str
    terminal_id: str
    merchant_id: str
    nonce: str
    authorization_id: str
    # Capture's and refund's: the payment channel's transaction id ("" when none).
    channel_reference: str = ""


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
    # A pack claim: the pack, and as many candidate codes with their sealed masks as the largest
    # pack may hold (the script issues the first ones); category and redemption_code unused.
    pack_id: str = ""
    vouchers: Sequence[VoucherArgs] = ()


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
    # The programme's time zone: its calendar day is the day of per-merchant daily limits (the
    # business day of the daily reports, SUBSIDY_REPORT_TIMEZONE).
    programme_timezone: str = "Asia/Shanghai"

    def __post_init__(self) -> None:
        for name in ("hold_ttl_s", "idempotency_ttl_s", "nonce_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        zoneinfo.ZoneInfo(self.programme_timezone)  # an unknown zone fails here, not per call

    def day_offset_ms(self) -> int:
        """The programme time zone's UTC offset now, in ms: authorize.lua adds it to Redis TIME
        to find the programme day (the server's clock picks the offset, never the terminal's)."""
        offset = datetime.now(zoneinfo.ZoneInfo(self.programme_timezone)).utcoffset()
        return int(offset.total_seconds() * 1000) if offset is not None else 0


NOT_FOUND = Failure("AUTHORIZATION_NOT_FOUND")


class RedisStore:
    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts, limits: StoreLimits) -> None:
        self.redis = redis
        self.keys = keys
        self._scripts = scripts
        self._limits = limits

    @property
    def nonce_ttl_s(self) -> int:
        return self._limits.nonce_ttl_s

    @property
    def hold_ttl_s(self) -> int:
        return self._limits.hold_ttl_s

    async def authorize(self, request: AuthorizeInput) -> Reply[AuthorizeAnswer]:
        keys, limits = self.keys, self._limits
        return await self._scripts.call(
            AUTHORIZE,
            AuthorizeKeys(
                nonce=keys.nonce(request.terminal_id, request.nonce),
                idempotency=keys.idempotency(request.terminal_id, request.request_id),
                terminal=keys.terminal(request.terminal_id),
                merchant=keys.merchant(request.merchant_id),
                campaign=keys.campaign(request.campaign_id),
                rules=keys.rules(request.campaign_id),
                budget=keys.budget(request.campaign_id),
                # Without a consumer key (a redemption code alone) these two are the prefixes
                # the script completes with the qualification's owner: still one EVALSHA.
                usage=keys.usage(request.campaign_id, request.consumer_key),
                authorization=keys.authorization(request.authorization_id),
                holds=keys.holds,
                ledger=keys.ledger,
                # Without a code the script never reads this key; it still holds the slot.
                qualification=keys.qualification(request.redemption_code),
                external_consumer=keys.external_consumer(request.consumer_key),
                qualification_events=keys.qualification_events,
                # Read only when the campaign binds redemption to its region.
                region_stores=keys.region_stores(request.campaign_id),
                blocks=keys.blocks,
                risk_events=keys.risk_events,
                # Touched only when the campaign sets the limit; the consumer's is a prefix the
                # script completes without a consumer key, like usage.
                velocity_terminal=keys.velocity(request.campaign_id, "t", request.terminal_id),
                velocity_merchant=keys.velocity(request.campaign_id, "m", request.merchant_id),
                velocity_consumer=keys.velocity(request.campaign_id, "c", request.consumer_key),
                price_mix=keys.price_mix(request.campaign_id),
            ),
            AuthorizeArgs(
                payload_hash=request.payload_hash,
                request_id=request.request_id,
                terminal_id=request.terminal_id,
                merchant_id=request.merchant_id,
                campaign_id=request.campaign_id,
                consumer_key=request.consumer_key,
                channel=request.channel,
                authorization_id=request.authorization_id,
                hold_ttl_s=limits.hold_ttl_s,
                idempotency_ttl_s=limits.idempotency_ttl_s,
                nonce_ttl_s=limits.nonce_ttl_s,
                redemption_code=request.redemption_code,
                day_offset_ms=limits.day_offset_ms(),
                location_verdict=request.location_verdict,
            ),
            # A line without a serial still names a serial key, never touched, so that every
            # line has both of its keys.
            key_tail=[LineKeys(keys.product(line.gtin), keys.serial(line.serial_number)) for line in request.lines],
            arg_tail=request.lines,
        )

    async def _hold_keys(self, authorization_id: str) -> HoldFound | None:
        """The keys of an authorization's hold scripts, from its immutable fields."""
        key = self.keys.authorization(authorization_id)
        campaign, consumer, raw_lines, code = await self.redis.hmget(
            key, ["campaign", "consumer", "lines", "qualification"]
        )
        if campaign is None or consumer is None or raw_lines is None:
            return None
        campaign_id, consumer_key = text(campaign), text(consumer)
        qualification = self._qualification_keys(text(code) if code else "", campaign_id, consumer_key)
        hold = HoldKeys(
            authorization=key,
            holds=self.keys.holds,
            budget=self.keys.budget(campaign_id),
            usage=self.keys.usage(campaign_id, consumer_key),
            ledger=self.keys.ledger,
            qualification=qualification.qualification,
            qualification_quota=qualification.qualification_quota,
            qualification_holder=qualification.qualification_holder,
            qualification_expiry=qualification.qualification_expiry,
            qualification_events=qualification.qualification_events,
        )
        serials = [self.keys.serial(line.serial_number) for line in LINES.decode(raw_lines) if line.serial_number]
        return HoldFound(hold, serials, campaign_id, consumer_key)

    def _qualification_keys(self, code: str, campaign_id: str, consumer_key: str) -> QualificationKeys:
        """A qualification's hash, its campaign's quota, its holder's claims, the expiry set and
        the qualification stream (placeholders the scripts never touch when ``code`` is empty)."""
        return QualificationKeys(
            qualification=self.keys.qualification(code),
            qualification_quota=self.keys.qualification_quota(campaign_id),
            qualification_holder=self.keys.qualification_holder(campaign_id, consumer_key),
            qualification_expiry=self.keys.qualification_expiry,
            qualification_events=self.keys.qualification_events,
        )

    async def _lifecycle(self, request: LifecycleInput) -> tuple[LifecycleKeys, LifecycleArgs, list[str]] | None:
        """Capture's, void's and refund's KEYS, ARGV and serial keys; None when the
        authorization does not exist."""
        found = await self._hold_keys(request.authorization_id)
        if found is None:
            return None
        hold = found.hold
        keys = LifecycleKeys(
            nonce=self.keys.nonce(request.terminal_id, request.nonce),
            idempotency=self.keys.idempotency(request.terminal_id, request.request_id),
            terminal=self.keys.terminal(request.terminal_id),
            merchant=self.keys.merchant(request.merchant_id),
            authorization=hold.authorization,
            holds=hold.holds,
            budget=hold.budget,
            usage=hold.usage,
            ledger=hold.ledger,
            qualification=hold.qualification,
            qualification_quota=hold.qualification_quota,
            qualification_holder=hold.qualification_holder,
            qualification_expiry=hold.qualification_expiry,
            qualification_events=hold.qualification_events,
            blocks=self.keys.blocks,
        )
        args = LifecycleArgs(
            payload_hash=request.payload_hash,
            request_id=request.request_id,
            merchant_id=request.merchant_id,
            idempotency_ttl_s=self._limits.idempotency_ttl_s,
            nonce_ttl_s=self._limits.nonce_ttl_s,
            campaign_id=found.campaign_id,
            consumer_key=found.consumer_key,
            terminal_id=request.terminal_id,
        )
        return keys, args, found.serials

    async def capture(self, request: LifecycleInput) -> Reply[Settled]:
        found = await self._lifecycle(request)
        if found is None:
            return NOT_FOUND
        keys, args, serials = found
        return await self._scripts.call(
            CAPTURE, keys, ChannelLifecycleArgs(*args, request.channel_reference), key_tail=serials
        )

    async def void(self, request: LifecycleInput) -> Reply[Settled]:
        found = await self._lifecycle(request)
        if found is None:
            return NOT_FOUND
        keys, args, serials = found
        return await self._scripts.call(VOID, keys, args, key_tail=serials)

    async def refund(self, request: LifecycleInput, line_ids: Sequence[str]) -> Reply[Refunded]:
        found = await self._lifecycle(request)
        if found is None:
            return NOT_FOUND
        keys, args, serials = found
        return await self._scripts.call(
            REFUND, keys, ChannelLifecycleArgs(*args, request.channel_reference), key_tail=serials, arg_tail=line_ids
        )

    async def claw_back(
        self,
        payload_hash: str,
        request_id: str,
        operator_id: str,
        risk_case: int,
        authorization_id: str,
        line_ids: Sequence[str],
    ) -> Reply[ClawedBack]:
        """An operator's claw-back of captured lines (clawback.lua): the authorization's campaign
        read first to name its budget, then one script call."""
        key = self.keys.authorization(authorization_id)
        campaign = await self.redis.hget(key, "campaign")
        if campaign is None:
            return NOT_FOUND
        campaign_id = text(campaign)
        return await self._scripts.call(
            CLAW_BACK,
            ClawBackKeys(
                idempotency=self.keys.idempotency("operator:" + operator_id, request_id),
                authorization=key,
                budget=self.keys.budget(campaign_id),
                ledger=self.keys.ledger,
            ),
            ClawBackArgs(
                payload_hash=payload_hash,
                request_id=request_id,
                idempotency_ttl_s=self._limits.idempotency_ttl_s,
                campaign_id=campaign_id,
                operator_id=operator_id,
                risk_case=risk_case,
            ),
            arg_tail=line_ids,
        )

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
    ) -> AuthorizationView | str | None:
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
                found = await self._hold_keys(authorization_id)
                if found is None:
                    await self.redis.zrem(self.keys.holds, authorization_id)
                    continue
                reply = await self._scripts.call(EXPIRE_HOLD, found.hold, NoArgs(), key_tail=found.serials)
            except UNAVAILABLE:
                raise  # Redis is down, not this hold: the next sweep tries again
            except Exception as error:  # this hold's data breaks its expiry: never block the rest
                await self._set_aside(self.keys.holds, self.keys.holds_set_aside, authorization_id, "hold", error)
                continue
            expired += 1 if not isinstance(reply, Failure) and reply.body.expired else 0
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

    def new_redemption_code(self, consumer_key: str) -> str:
        """A new code for a claim of ``consumer_key`` (any code: one Redis has every key)."""
        return new_redemption_code()

    async def claim(self, request: ClaimInput) -> Reply[ClaimAnswer]:
        keys, limits = self.keys, self._limits
        return await self._scripts.call(
            CLAIM,
            ClaimKeys(
                nonce=keys.nonce(request.partner_id, request.nonce),
                idempotency=keys.idempotency(request.partner_id, request.request_id),
                campaign=keys.campaign(request.campaign_id),
                rules=keys.rules(request.campaign_id),
                qualification_quota=keys.qualification_quota(request.campaign_id),
                qualification_holder=keys.qualification_holder(request.campaign_id, request.consumer_key),
                external_consumer=keys.external_consumer(request.consumer_key),
                qualification=keys.qualification(request.redemption_code),
                consumer_qualifications=keys.consumer_qualifications(request.consumer_key),
                qualification_expiry=keys.qualification_expiry,
                qualification_events=keys.qualification_events,
                blocks=keys.blocks,
                risk_events=keys.risk_events,
            ),
            ClaimArgs(
                payload_hash=request.payload_hash,
                request_id=request.request_id,
                partner_id=request.partner_id,
                campaign_id=request.campaign_id,
                category=request.category,
                consumer_key=request.consumer_key,
                redemption_code=request.redemption_code,
                location_verdict=request.location_verdict,
                idempotency_ttl_s=limits.idempotency_ttl_s,
                nonce_ttl_s=limits.nonce_ttl_s,
                masked_id_number=request.masked_id_number,
                masked_phone_number=request.masked_phone_number,
                location_cell=request.location_cell,
                pack_id=request.pack_id,
            ),
            key_tail=[keys.qualification(voucher.code) for voucher in request.vouchers],
            arg_tail=request.vouchers,
        )

    async def cancel_qualification(self, request: CancelInput) -> Reply[Cancelled]:
        campaign, consumer = await self.redis.hmget(
            self.keys.qualification(request.redemption_code), ["campaign", "consumer"]
        )
        if campaign is None or consumer is None:
            return Failure("QUALIFICATION_NOT_FOUND")
        campaign_id, consumer_key = text(campaign), text(consumer)
        qualification = self._qualification_keys(request.redemption_code, campaign_id, consumer_key)
        return await self._scripts.call(
            CANCEL,
            CancelKeys(
                nonce=self.keys.nonce(request.partner_id, request.nonce),
                idempotency=self.keys.idempotency(request.partner_id, request.request_id),
                qualification=qualification.qualification,
                qualification_quota=qualification.qualification_quota,
                qualification_holder=qualification.qualification_holder,
                qualification_expiry=qualification.qualification_expiry,
                qualification_events=qualification.qualification_events,
            ),
            CancelArgs(
                payload_hash=request.payload_hash,
                request_id=request.request_id,
                partner_id=request.partner_id,
                idempotency_ttl_s=self._limits.idempotency_ttl_s,
                nonce_ttl_s=self._limits.nonce_ttl_s,
                campaign_id=campaign_id,
                consumer_key=consumer_key,
            ),
        )

    async def get_qualification(self, redemption_code: str, partner_id: str) -> QualificationView | None:
        """The qualification's view; None when absent or claimed through another partner."""
        raw = await self.redis.hgetall(self.keys.qualification(redemption_code))
        fields = {text(key): text(value) for key, value in raw.items()}
        if not fields or fields.get("partner") != partner_id:
            return None
        return qualification_view(fields)

    async def list_qualifications(
        self, consumer_key: str, partner_id: str, campaign_id: str, limit: int
    ) -> list[QualificationView]:
        """The consumer's qualifications through this partner (and campaign), newest first."""
        codes = await self.redis.zrevrange(self.keys.consumer_qualifications(consumer_key), 0, -1)
        views: list[QualificationView] = []
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
                reply = await self._scripts.call(EXPIRE_QUALIFICATION, script_keys, ExpireQualificationArgs(code))
            except UNAVAILABLE:
                raise
            except Exception as error:  # a poison qualification never blocks the rest
                aside = self.keys.qualifications_set_aside
                await self._set_aside(self.keys.qualification_expiry, aside, code, "qualification", error)
                continue
            expired += 1 if not isinstance(reply, Failure) and reply.body.expired else 0
        return expired


def text(value: bytes | str) -> str:
    """redis-py returns bytes (decode_responses is off for speed); names and ids are ASCII."""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class HoldFound:
    """An authorization's keys for its hold scripts (expire_hold, and with the caller's keys
    capture, void and refund), named from its immutable fields."""

    hold: HoldKeys
    serials: list[str]  # the serial keys of its lines that carry a serial, in line order
    campaign_id: str
    consumer_key: str


def qualification_view(fields: dict[str, str]) -> QualificationView:
    """The same view the scripts return (qualification_view in _lib.lua), from a raw hash."""
    return QualificationView(
        redemption_code=fields["code"],
        state=fields["state"],  # type: ignore[arg-type]  # written by the scripts: one of the states
        campaign_id=fields["campaign"],
        category=fields["category"],
        consumer_key=fields["consumer"],
        issued_ms=int(fields["issued_ms"]),
        expires_ms=int(fields["expires_ms"]),
        updated_ms=int(fields["updated_ms"]),
        authorization_id=fields.get("authorization", ""),
        masked_id=fields.get("masked_id", ""),
        masked_phone=fields.get("masked_phone", ""),
        location_cell=fields.get("cell", ""),
        pack_id=fields.get("pack", ""),
        threshold_fen=int(fields.get("threshold_fen", "0")),
        off_fen=int(fields.get("off_fen", "0")),
    )


def authorization_view(fields: dict[str, str]) -> AuthorizationView:
    """The same view the scripts return (auth_view in _lib.lua), from a raw hash."""
    return AuthorizationView(
        authorization_id=fields["id"],
        state=fields["state"],  # type: ignore[arg-type]  # written by the scripts: one of the states
        campaign_id=fields["campaign"],
        merchant_id=fields["merchant"],
        terminal_id=fields["terminal"],
        channel=int(fields["channel"]),
        lines=LINES.decode(fields["lines"]),
        total_price_fen=int(fields["total_fen"]),
        subsidy_fen=int(fields["subsidy_fen"]),
        refunded_fen=int(fields["refunded_fen"]),
        created_ms=int(fields["created_ms"]),
        hold_expires_ms=int(fields["expires_ms"]),
        updated_ms=int(fields["updated_ms"]),
        redemption_code=fields.get("qualification", ""),
        channel_reference=fields.get("channel_reference", ""),
    )


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
