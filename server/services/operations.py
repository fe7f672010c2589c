"""What every operator service shares: the lazily opened PostgreSQL pool, the audit trail with
its idempotency on (operator, request_id), and publishing committed changes to the hot path.

An operator call runs one PostgreSQL transaction that makes the change, records the action in
``operator_actions`` (append-only) and increments ``reference_version``; after the commit it
publishes the changed objects to Redis. If that publication fails, the reference publisher in
the ledger-writer process notices Redis is behind the PostgreSQL version and republishes
within a second (``storage/redis/reference.py``, ``catch_up``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import orjson
from redis.asyncio import Redis
from subsidy_client.v1 import common_pb2

from server.domain import validation
from server.rpc.auth import OPERATOR, caller
from server.rpc.errors import ApiError
from server.services.common import payload_hash
from storage.postgres.reference import bump_reference_version, fetch_reference
from storage.redis.keys import Keys
from storage.redis.reference import publish_reference
from storage.redis.store import RedisStore


class LazyPool:
    """A small PostgreSQL pool opened on first use, so that a gateway that only authorizes never
    connects to PostgreSQL."""

    def __init__(self, dsn: str, max_size: int = 4) -> None:
        self._dsn = dsn
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                if not self._dsn:
                    raise RuntimeError("SUBSIDY_PG_DSN is not configured; operator services need PostgreSQL")
                self._pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=self._max_size, timeout=10)
            return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


@dataclass(frozen=True)
class OperatorDeps:
    """What the operator services share: the lazily opened pool and the Redis store."""

    pool: LazyPool
    store: RedisStore

    @property
    def redis(self) -> Redis:
        return self.store.redis

    @property
    def keys(self) -> Keys:
        return self.store.keys


def not_found(kind: str, identifier: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        common_pb2.ERROR_REASON_NOT_FOUND,
        f"no {kind} {identifier}",
        {"kind": kind, "id": identifier},
    )


def already_exists(kind: str, identifier: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.ALREADY_EXISTS,
        common_pb2.ERROR_REASON_ALREADY_EXISTS,
        f"{kind} {identifier} exists already",
        {"kind": kind, "id": identifier},
    )


@dataclass(frozen=True)
class Action:
    """One operator action: who, which request, what, on what."""

    operator_id: str
    request_id: str
    action: str
    target_kind: str
    target_id: str
    payload_hash: str


def begin_action(method: str, request: Any, target_kind: str, target_id: str) -> Action:
    """Validates the request id and names the action; the caller must hold an operator credential."""
    identity = caller(OPERATOR)
    request.request_id = validation.check_request_id(request.request_id)
    return Action(
        identity.terminal_id, request.request_id, method, target_kind, target_id, payload_hash(method, request)
    )


@dataclass(frozen=True)
class Scope:
    """The reference objects a change touched, to publish after its commit."""

    campaign_ids: tuple[str, ...] = ()
    merchant_ids: tuple[str, ...] = ()
    gtins: tuple[str, ...] = ()


async def record(connection: asyncpg.Connection, action: Action, details: dict[str, Any], scope: Scope) -> int | None:
    """Writes the audit row in the caller's transaction, bumps the reference version and notes
    the scope as unpublished. Returns the new version, or None when this (operator, request_id)
    already acted with the same payload (a replay: answer with the current state, change
    nothing); raises IDEMPOTENCY_CONFLICT when it acted with a different payload.

    An action whose scope is empty changed no reference object (a catalog re-imported
    unchanged, an all-or-nothing import refused): it is audited, but the version stays and the
    current one is returned, so no process reloads anything for it."""
    inserted = await connection.fetchval(
        "INSERT INTO operator_actions (operator_id, request_id, action, target_kind, target_id, payload_hash, details)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) ON CONFLICT (operator_id, request_id) DO NOTHING"
        " RETURNING action_id",
        action.operator_id,
        action.request_id,
        action.action,
        action.target_kind,
        action.target_id,
        action.payload_hash,
        orjson.dumps(details, default=str).decode(),
    )
    if inserted is None:
        earlier = await connection.fetchval(
            "SELECT payload_hash FROM operator_actions WHERE operator_id = $1 AND request_id = $2",
            action.operator_id,
            action.request_id,
        )
        if earlier != action.payload_hash:
            raise ApiError(
                grpc.StatusCode.ALREADY_EXISTS,
                common_pb2.ERROR_REASON_IDEMPOTENCY_CONFLICT,
                "request_id was already used with a different payload",
            )
        return None
    if not (scope.campaign_ids or scope.merchant_ids or scope.gtins):
        current: int = await connection.fetchval("SELECT version FROM reference_version")
        return current
    version = await bump_reference_version(connection)
    await connection.execute(
        "INSERT INTO unpublished_changes (version, campaign_ids, merchant_ids, gtins) VALUES ($1, $2, $3, $4)",
        version,
        list(scope.campaign_ids),
        list(scope.merchant_ids),
        list(scope.gtins),
    )
    return version


async def publish_scope(pool: asyncpg.Pool, redis: Redis, keys: Keys, scope: Scope, version: int | None) -> int:
    """Publishes just the named objects after their transaction committed, then clears the
    change's unpublished mark; returns the Redis reference version."""
    async with pool.acquire() as connection:
        snapshot = await fetch_reference(
            connection,
            campaign_ids=list(scope.campaign_ids),
            merchant_ids=list(scope.merchant_ids),
            gtins=list(scope.gtins),
            operator_ids=[],
        )
        published = await publish_reference(redis, keys, snapshot)
        if version is not None:
            await connection.execute("DELETE FROM unpublished_changes WHERE version = $1", version)
    return published


async def catch_up(pool: asyncpg.Pool, redis: Redis, keys: Keys, older_than_s: float = 0.5) -> int:
    """Publishes changes whose own publication did not complete (the call failed between commit
    and publish); returns how many it published."""
    async with pool.acquire() as connection:
        rows = await connection.fetch(
            "SELECT * FROM unpublished_changes WHERE created_at < now() - make_interval(secs => $1) ORDER BY version",
            older_than_s,
        )
    for row in rows:
        scope = Scope(tuple(row["campaign_ids"]), tuple(row["merchant_ids"]), tuple(row["gtins"]))
        await publish_scope(pool, redis, keys, scope, row["version"])
    return len(rows)
