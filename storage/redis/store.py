"""The money path's Redis operations: one script call each.

``authorize`` is the hot path: exactly one EVALSHA, no other Redis command and no
PostgreSQL. Capture, void and refund first read the authorization's immutable fields
(campaign, consumer, lines) to name every key the script touches, then run their script,
which re-checks those fields; two round trips off the hot path keep "keys only via KEYS".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from storage.redis.keys import Keys
from storage.redis.scripts import Reply, Scripts


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


@dataclass(frozen=True)
class LifecycleInput:
    payload_hash: str
    request_id: str
    terminal_id: str
    merchant_id: str
    nonce: str
    authorization_id: str


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
        ]
        for line in request.lines:
            script_keys.append(keys.product(line.gtin))
            # A line without a serial still takes a key slot so line i's keys stay at a fixed
            # offset; the script never touches it.
            script_keys.append(keys.serial(line.gtin, line.serial_number))
            args.extend([line.line_id, line.gtin, line.unit_price_fen, line.serial_number])
        return await self._scripts.call("authorize", script_keys, args)

    async def _lifecycle_keys(self, authorization_id: str) -> tuple[list[str], str, str] | None:
        """The keys of an authorization's lifecycle scripts, from its immutable fields."""
        key = self.keys.authorization(authorization_id)
        campaign, consumer, raw_lines = await self.redis.hmget(key, ["campaign", "consumer", "lines"])
        if campaign is None or consumer is None or raw_lines is None:
            return None
        campaign_id, consumer_key = text(campaign), text(consumer)
        keys = [
            key,
            self.keys.holds,
            self.keys.budget(campaign_id),
            self.keys.usage(campaign_id, consumer_key),
            self.keys.ledger,
        ]
        for line in orjson.loads(raw_lines):
            if line["sn"]:
                keys.append(self.keys.serial(line["g"], line["sn"]))
        return keys, campaign_id, consumer_key

    async def _lifecycle(self, name: str, request: LifecycleInput, extra: Sequence[str]) -> Reply:
        found = await self._lifecycle_keys(request.authorization_id)
        if found is None:
            return NOT_FOUND
        base_keys, campaign_id, consumer_key = found
        script_keys = [
            *base_keys[:5],
            self.keys.idempotency(request.terminal_id, request.request_id),
            self.keys.nonce(request.terminal_id, request.nonce),
            self.keys.terminal(request.terminal_id),
            self.keys.merchant(request.merchant_id),
            *base_keys[5:],
        ]
        args: list[str | int] = [
            request.payload_hash,
            request.request_id,
            request.merchant_id,
            self._limits.idempotency_ttl_s,
            self._limits.nonce_ttl_s,
            campaign_id,
            consumer_key,
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

    async def get_authorization(self, authorization_id: str, merchant_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(self.keys.authorization(authorization_id))
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
        seconds, microseconds = await self.redis.time()
        now_ms = seconds * 1000 + microseconds // 1000
        due = await self.redis.zrangebyscore(self.keys.holds, "-inf", now_ms, start=0, num=limit)
        expired = 0
        for raw_id in due:
            authorization_id = text(raw_id)  # type: ignore[arg-type]  # plain members: no scores asked
            found = await self._lifecycle_keys(authorization_id)
            if found is None:
                await self.redis.zrem(self.keys.holds, authorization_id)
                continue
            reply = await self._scripts.call("expire_hold", found[0], [])
            expired += 1 if reply.body.get("expired") else 0
        return expired


def text(value: bytes | str) -> str:
    """redis-py returns bytes (decode_responses is off for speed); names and ids are ASCII."""
    return value.decode() if isinstance(value, bytes) else value


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
    }
