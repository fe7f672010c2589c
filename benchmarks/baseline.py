"""The obvious alternative: authorization as one PostgreSQL transaction per request.

What most vendors would build: the same gRPC stack as the gateway (``grpc.aio`` with the same
error guard and authentication wrapped once around each handler by ``GuardedServer``, the same
credential cache read from Redis, the same request validation), but the money state lives in
PostgreSQL and each ``Authorize`` is one transaction that locks the campaign-category budget row:

1. ``INSERT`` the nonce (refused if reused; the gateway claims it inside its Lua script);
2. ``SELECT`` an earlier answer for (terminal, request_id): a replay or a conflict;
3. ``INSERT ... ON CONFLICT DO UPDATE ... WHERE units + n <= limit`` the consumer's usage;
4. ``SELECT ... FOR UPDATE`` the budget row, check what is left, ``UPDATE`` it;
5. ``INSERT`` the authorization/ledger row (it also holds the answer, for idempotent replays);
6. ``COMMIT`` (``synchronous_commit`` as the server has it: on by default, one WAL flush).

The row lock is taken as late as the checks allow (step 4), so it is held for two round trips
plus the commit's WAL flush; every request on one hot budget serializes on it.

Reference data (campaigns, rules, products, merchants, terminals) is read from this database
once at start-up and kept in memory, as the gateway keeps it in Redis: neither side queries
reference data per call. Only ``Authorize`` is implemented. Not modelled: device serials (the
bench's product needs none) and hold expiry. Declines are answered and remembered like the
gateway's.

Run: ``python -m benchmarks.baseline --pool-size N`` with SUBSIDY_LISTEN, SUBSIDY_PG_DSN (the
baseline's own database, prepared by ``prepare_database``), SUBSIDY_REDIS_URL and
SUBSIDY_REDIS_PREFIX (credentials), SUBSIDY_USE_UVLOOP, SUBSIDY_HOLD_TTL_S.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import grpc
import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis
from subsidy_client.v1 import authorization_pb2, authorization_pb2_grpc, common_pb2

from server import logs
from server.config import Config, ConfigError
from server.domain.reference import parse_reference
from server.rpc.auth import TERMINAL, Authenticator, Caller, caller
from server.rpc.errors import ApiError
from server.rpc.handlers import GuardedServer
from server.services import requests
from server.services.common import payload_hash
from storage.postgres.migrate import migrate
from storage.postgres.reference import fetch_reference, save_reference
from storage.redis.credentials import CredentialCache
from storage.redis.keys import Keys

pb = authorization_pb2
log = logging.getLogger("subsidy.bench.baseline")

POOL_SIZE_DEFAULT = 16
POOL_SIZE_MAX = 64
STATEMENT_TIMEOUT_S = 10.0

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS baseline;
CREATE TABLE IF NOT EXISTS baseline.budgets (
    campaign_id   text NOT NULL,
    category      text NOT NULL,
    total_fen     bigint NOT NULL,
    reserved_fen  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, category)
);
CREATE TABLE IF NOT EXISTS baseline.consumer_usage (
    campaign_id   text NOT NULL,
    consumer_key  text NOT NULL,
    category      text NOT NULL,
    units         integer NOT NULL,
    PRIMARY KEY (campaign_id, consumer_key, category)
);
CREATE TABLE IF NOT EXISTS baseline.used_nonces (
    terminal_id  text NOT NULL,
    nonce        text NOT NULL,
    used_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (terminal_id, nonce)
);
CREATE TABLE IF NOT EXISTS baseline.authorizations (
    authorization_id  text PRIMARY KEY,
    terminal_id       text NOT NULL,
    request_id        text NOT NULL,
    payload_hash      text NOT NULL,
    decision          text NOT NULL,
    merchant_id       text NOT NULL,
    campaign_id       text NOT NULL,
    consumer_key      text NOT NULL,
    total_fen         bigint NOT NULL,
    subsidy_fen       bigint NOT NULL,
    lines             jsonb NOT NULL,
    response          bytea NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (terminal_id, request_id)
);
"""

CLAIM_NONCE = (
    "INSERT INTO baseline.used_nonces (terminal_id, nonce) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true"
)
FIND_ANSWER = "SELECT payload_hash, response FROM baseline.authorizations WHERE terminal_id = $1 AND request_id = $2"
TAKE_QUOTA = (
    "INSERT INTO baseline.consumer_usage (campaign_id, consumer_key, category, units) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (campaign_id, consumer_key, category) DO UPDATE"
    " SET units = consumer_usage.units + excluded.units"
    " WHERE consumer_usage.units + excluded.units <= $5 RETURNING units"
)
LOCK_BUDGET = "SELECT total_fen, reserved_fen FROM baseline.budgets WHERE campaign_id = $1 AND category = $2 FOR UPDATE"
RESERVE = "UPDATE baseline.budgets SET reserved_fen = reserved_fen + $3 WHERE campaign_id = $1 AND category = $2"
RECORD = (
    "INSERT INTO baseline.authorizations (authorization_id, terminal_id, request_id, payload_hash, decision,"
    " merchant_id, campaign_id, consumer_key, total_fen, subsidy_fen, lines, response)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12)"
)


# --------------------------------------------------------------------------- reference cache


@dataclass(frozen=True)
class Rule:
    kind: str
    rates_bp: Mapping[str, int]
    cap_fen: int
    threshold_fen: int
    off_fen: int
    price_ceiling_fen: int
    per_person_limit: int


@dataclass(frozen=True)
class Campaign:
    active: bool
    starts_ms: int
    ends_ms: int
    rules: Mapping[str, Rule]


@dataclass(frozen=True)
class Product:
    active: bool
    category: str
    grade: str
    reference_price_fen: int
    serial_required: bool


@dataclass(frozen=True)
class Reference:
    campaigns: Mapping[str, Campaign]
    products: Mapping[str, Product]
    merchants: Mapping[str, tuple[bool, frozenset[str]]]  # active, categories (empty = all)
    terminals: Mapping[str, tuple[bool, str]]  # active, merchant


def _epoch_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


async def load_reference(connection: asyncpg.Connection) -> Reference:
    snapshot = await fetch_reference(connection)
    rules: dict[str, dict[str, Rule]] = {}
    for row in snapshot.rules:
        rates = row["rates_bp"]
        rates = orjson.loads(rates) if isinstance(rates, str) else rates
        rules.setdefault(row["campaign_id"], {})[row["category"]] = Rule(
            kind=row["kind"],
            rates_bp={str(grade): int(rate) for grade, rate in rates.items()},
            cap_fen=row["cap_fen"],
            threshold_fen=row["threshold_fen"],
            off_fen=row["off_fen"],
            price_ceiling_fen=row["price_ceiling_fen"],
            per_person_limit=row["per_person_limit"],
        )
    return Reference(
        campaigns={
            row["campaign_id"]: Campaign(
                active=row["status"] == "ACTIVE",
                starts_ms=_epoch_ms(row["starts_at"]),
                ends_ms=_epoch_ms(row["ends_at"]),
                rules=rules.get(row["campaign_id"], {}),
            )
            for row in snapshot.campaigns
        },
        products={
            row["gtin"]: Product(
                active=row["active"],
                category=row["category"],
                grade=str(row["energy_grade"]),
                reference_price_fen=row["reference_price_fen"],
                serial_required=row["serial_required"],
            )
            for row in snapshot.products
        },
        merchants={
            row["merchant_id"]: (row["status"] == "ACTIVE", frozenset(row["categories"])) for row in snapshot.merchants
        },
        terminals={row["terminal_id"]: (row["status"] == "ACTIVE", row["merchant_id"]) for row in snapshot.terminals},
    )


# --------------------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class PricedLine:
    line_id: str
    gtin: str
    category: str
    unit_price_fen: int
    subsidy_fen: int


@dataclass(frozen=True)
class Decline:
    reason: int
    line_id: str = ""


def line_subsidy(rule: Rule, grade: str, price_fen: int, reference_price_fen: int) -> int | Decline:
    """The subsidy of one line under its rule, as authorize.lua computes it."""
    rate = 0
    if rule.kind == "PERCENT":
        if grade not in rule.rates_bp:
            return Decline(pb.DECLINE_REASON_GRADE_NOT_ELIGIBLE)
        rate = rule.rates_bp[grade]
    if rule.price_ceiling_fen > 0 and price_fen > rule.price_ceiling_fen:
        return Decline(pb.DECLINE_REASON_PRICE_ABOVE_CEILING)
    if reference_price_fen > 0 and price_fen > reference_price_fen:
        return Decline(pb.DECLINE_REASON_PRICE_ABOVE_CEILING)
    if rule.kind == "FIXED":
        if price_fen < rule.threshold_fen:
            return Decline(pb.DECLINE_REASON_PRICE_BELOW_THRESHOLD)
        return min(rule.off_fen, price_fen)
    return min(price_fen * rate // 10_000, rule.cap_fen)


def price_lines(
    reference: Reference, identity: Caller, request: authorization_pb2.AuthorizeRequest, now_ms: int
) -> list[PricedLine] | Decline:
    """Every reference-data check, in the gateway's precedence order."""
    terminal_active, terminal_merchant = reference.terminals.get(identity.terminal_id, (False, ""))
    if not terminal_active:
        return Decline(pb.DECLINE_REASON_TERMINAL_INACTIVE)
    if terminal_merchant != identity.merchant_id:
        raise ApiError(
            grpc.StatusCode.PERMISSION_DENIED,
            common_pb2.ERROR_REASON_PERMISSION_DENIED,
            "the terminal was re-bound to another merchant; retry shortly",
        )
    merchant_active, merchant_scope = reference.merchants.get(identity.merchant_id, (False, frozenset()))
    if not merchant_active:
        return Decline(pb.DECLINE_REASON_MERCHANT_INACTIVE)
    campaign = reference.campaigns.get(request.campaign_id)
    if campaign is None or not campaign.active:
        return Decline(pb.DECLINE_REASON_CAMPAIGN_NOT_FOUND)
    if not campaign.starts_ms <= now_ms < campaign.ends_ms:
        return Decline(pb.DECLINE_REASON_CAMPAIGN_NOT_ACTIVE)
    priced: list[PricedLine] = []
    worst: Decline | None = None
    for line in request.lines:
        outcome = _price_line(campaign, merchant_scope, reference.products.get(line.gtin), line)
        if isinstance(outcome, Decline):
            if worst is None or outcome.reason < worst.reason:
                worst = outcome
        else:
            priced.append(outcome)
    return worst if worst is not None else priced


def _price_line(
    campaign: Campaign, merchant_scope: frozenset[str], product: Product | None, line: authorization_pb2.LineItem
) -> PricedLine | Decline:
    if product is None or not product.active:
        return Decline(pb.DECLINE_REASON_PRODUCT_NOT_ELIGIBLE, line.line_id)
    rule = campaign.rules.get(product.category)
    if rule is None:
        return Decline(pb.DECLINE_REASON_CATEGORY_NOT_COVERED, line.line_id)
    if merchant_scope and product.category not in merchant_scope:
        return Decline(pb.DECLINE_REASON_MERCHANT_CATEGORY_NOT_ALLOWED, line.line_id)
    subsidy = line_subsidy(rule, product.grade, line.unit_price_fen, product.reference_price_fen)
    if isinstance(subsidy, Decline):
        return Decline(subsidy.reason, line.line_id)
    if product.serial_required and not line.serial_number:
        return Decline(pb.DECLINE_REASON_SERIAL_REQUIRED, line.line_id)
    return PricedLine(line.line_id, line.gtin, product.category, line.unit_price_fen, subsidy)


def per_category(lines: list[PricedLine]) -> dict[str, tuple[int, int, str]]:
    """category -> (units, subsidy fen, first line id), categories in sorted order so that
    concurrent transactions lock budget rows in one order (no deadlocks)."""
    totals: dict[str, tuple[int, int, str]] = {}
    for line in lines:
        units, subsidy, first = totals.get(line.category, (0, 0, line.line_id))
        totals[line.category] = (units + 1, subsidy + line.subsidy_fen, first)
    return dict(sorted(totals.items()))


def timestamp_ms(milliseconds: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(milliseconds)
    return stamp


def approved_response(
    authorization_id: str, lines: list[PricedLine], expires_ms: int
) -> authorization_pb2.AuthorizeResponse:
    total = sum(line.unit_price_fen for line in lines)
    subsidy = sum(line.subsidy_fen for line in lines)
    return pb.AuthorizeResponse(
        decision=pb.DECISION_APPROVED,
        authorization_id=authorization_id,
        lines=[
            pb.LineResult(
                line_id=line.line_id,
                gtin=line.gtin,
                category=line.category,
                unit_price_fen=line.unit_price_fen,
                subsidy_fen=line.subsidy_fen,
                payable_fen=line.unit_price_fen - line.subsidy_fen,
            )
            for line in lines
        ],
        total_price_fen=total,
        subsidy_fen=subsidy,
        payable_fen=total - subsidy,
        hold_expires_at=timestamp_ms(expires_ms),
    )


def declined_response(decline: Decline) -> authorization_pb2.AuthorizeResponse:
    return pb.AuthorizeResponse(
        decision=pb.DECISION_DECLINED,
        decline_reason=decline.reason,  # type: ignore[arg-type]
        declined_line_id=decline.line_id,
    )


class _Declined(Exception):
    """Unwinds the transaction's reservations; the decline itself is then recorded."""

    def __init__(self, decline: Decline) -> None:
        super().__init__(decline.reason)
        self.decline = decline


# --------------------------------------------------------------------------- the service


class BaselineAuthorizationService(authorization_pb2_grpc.AuthorizationServiceServicer):
    def __init__(self, pool: asyncpg.Pool, reference: Reference, hold_ttl_s: int, max_lines: int) -> None:
        self._pool = pool
        self._reference = reference
        self._hold_ttl_s = hold_ttl_s
        self._max_lines = max_lines

    async def Authorize(
        self, request: authorization_pb2.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> authorization_pb2.AuthorizeResponse:
        requests.check_authorize(request, self._max_lines)
        identity = caller(TERMINAL)
        digest = payload_hash("Authorize", request)
        async with self._pool.acquire(timeout=STATEMENT_TIMEOUT_S) as connection:
            async with connection.transaction():
                if not await connection.fetchval(CLAIM_NONCE, identity.terminal_id, identity.nonce):
                    raise ApiError(
                        grpc.StatusCode.UNAUTHENTICATED,
                        common_pb2.ERROR_REASON_UNAUTHENTICATED,
                        "nonce already used; sign every attempt with a fresh nonce",
                    )
                earlier = await connection.fetchrow(FIND_ANSWER, identity.terminal_id, request.request_id)
                if earlier is not None:
                    return self._replay(earlier, digest)
                priced = price_lines(self._reference, identity, request, int(time.time() * 1000))
                if isinstance(priced, Decline):
                    return await self._record_decline(connection, identity, request, digest, priced)
                try:
                    # A savepoint, so a decline after the quota was taken gives the quota back.
                    async with connection.transaction():
                        return await self._reserve(connection, identity, request, digest, priced)
                except _Declined as declined:
                    return await self._record_decline(connection, identity, request, digest, declined.decline)

    async def _reserve(
        self,
        connection: asyncpg.Connection,
        identity: Caller,
        request: authorization_pb2.AuthorizeRequest,
        digest: str,
        lines: list[PricedLine],
    ) -> authorization_pb2.AuthorizeResponse:
        campaign = self._reference.campaigns[request.campaign_id]
        categories = per_category(lines)
        for category, (units, _subsidy, first_line) in categories.items():
            limit = campaign.rules[category].per_person_limit
            if (
                await connection.fetchval(TAKE_QUOTA, request.campaign_id, request.consumer_key, category, units, limit)
                is None
            ):
                raise _Declined(Decline(pb.DECLINE_REASON_CONSUMER_LIMIT_REACHED, first_line))
        for category, (_units, subsidy, first_line) in categories.items():
            budget = await connection.fetchrow(LOCK_BUDGET, request.campaign_id, category)
            if budget is None or budget["total_fen"] - budget["reserved_fen"] < subsidy:
                raise _Declined(Decline(pb.DECLINE_REASON_BUDGET_EXHAUSTED, first_line))
            await connection.execute(RESERVE, request.campaign_id, category, subsidy)
        authorization_id = uuid.uuid4().hex
        response = approved_response(authorization_id, lines, int(time.time() * 1000) + self._hold_ttl_s * 1000)
        await connection.execute(
            RECORD,
            authorization_id,
            identity.terminal_id,
            request.request_id,
            digest,
            "APPROVED",
            identity.merchant_id,
            request.campaign_id,
            request.consumer_key,
            response.total_price_fen,
            response.subsidy_fen,
            orjson.dumps([line.__dict__ for line in lines]).decode(),
            response.SerializeToString(),
        )
        return response

    async def _record_decline(
        self,
        connection: asyncpg.Connection,
        identity: Caller,
        request: authorization_pb2.AuthorizeRequest,
        digest: str,
        decline: Decline,
    ) -> authorization_pb2.AuthorizeResponse:
        response = declined_response(decline)
        await connection.execute(
            RECORD,
            uuid.uuid4().hex,
            identity.terminal_id,
            request.request_id,
            digest,
            "DECLINED",
            identity.merchant_id,
            request.campaign_id,
            request.consumer_key,
            0,
            0,
            "[]",
            response.SerializeToString(),
        )
        return response

    async def Capture(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _only_authorize(context)

    async def Void(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _only_authorize(context)

    async def Refund(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _only_authorize(context)

    async def GetAuthorization(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _only_authorize(context)

    @staticmethod
    def _replay(earlier: Any, digest: str) -> authorization_pb2.AuthorizeResponse:
        if earlier["payload_hash"] != digest:
            raise ApiError(
                grpc.StatusCode.ALREADY_EXISTS,
                common_pb2.ERROR_REASON_IDEMPOTENCY_CONFLICT,
                "request_id was already used with a different payload",
            )
        response = pb.AuthorizeResponse.FromString(earlier["response"])
        response.replayed = True
        return response


async def _only_authorize(context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the baseline implements Authorize only")


# --------------------------------------------------------------------------- database


async def prepare_database(dsn: str, document: dict[str, Any]) -> None:
    """The baseline's own database: the project's reference tables (same migrations, same
    loader), its money tables, and one budget row per campaign rule."""
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        await migrate(connection)
        await save_reference(connection, parse_reference(document))
        await connection.execute(SCHEMA)
        await connection.execute(
            "INSERT INTO baseline.budgets (campaign_id, category, total_fen)"
            " SELECT campaign_id, category, budget_fen FROM campaign_rules"
            " ON CONFLICT (campaign_id, category) DO UPDATE SET total_fen = excluded.total_fen"
        )
    finally:
        await connection.close()


async def vacuum(dsn: str) -> None:
    """Between scenarios: clear the hot row's dead versions, as autovacuum eventually would."""
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        await connection.execute(
            "VACUUM (ANALYZE) baseline.budgets, baseline.consumer_usage, baseline.used_nonces, baseline.authorizations"
        )
    finally:
        await connection.close()


async def ledger_matches_budget(dsn: str) -> tuple[int, int, int]:
    """(approved rows, their subsidy sum, reserved on the budget rows): the last two must match."""
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        row = await connection.fetchrow(
            "SELECT count(*) AS approved, coalesce(sum(subsidy_fen), 0) AS subsidy,"
            " (SELECT coalesce(sum(reserved_fen), 0) FROM baseline.budgets) AS reserved"
            " FROM baseline.authorizations WHERE decision = 'APPROVED'"
        )
        assert row is not None
        return int(row["approved"]), int(row["subsidy"]), int(row["reserved"])
    finally:
        await connection.close()


# --------------------------------------------------------------------------- the server


@dataclass
class BaselineServer:
    server: grpc.aio.Server
    port: int
    pool: asyncpg.Pool
    redis: Redis
    refresher: asyncio.Task[None]
    stopping: asyncio.Event

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)
        self.stopping.set()
        await asyncio.gather(self.refresher, return_exceptions=True)
        await self.pool.close()
        await self.redis.aclose()


async def create_baseline_server(config: Config, pool_size: int) -> BaselineServer:
    """Mirrors ``server.processes.app.create_server``: same handler wrapping, options and limits."""
    if not 0 < pool_size <= POOL_SIZE_MAX:
        raise ValueError(f"pool size must be in 1..{POOL_SIZE_MAX}")
    redis = Redis.from_url(config.redis_url, socket_timeout=config.redis_timeout_s)
    pool: asyncpg.Pool | None = None
    try:
        credentials = CredentialCache(redis, Keys(config.redis_prefix))
        await credentials.refresh()
        pool = await asyncpg.create_pool(
            config.pg_dsn, min_size=pool_size, max_size=pool_size, command_timeout=STATEMENT_TIMEOUT_S
        )
        async with pool.acquire() as connection:
            reference = await load_reference(connection)
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.server.max_pending_requests", config.max_pending_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", 2 * config.max_pending_rpcs),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        guarded = GuardedServer(server, Authenticator(credentials, config.auth_clock_skew_s))
        authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(
            BaselineAuthorizationService(pool, reference, config.hold_ttl_s, config.max_lines), guarded
        )
        health_servicer = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, guarded)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        port = server.add_insecure_port(config.listen)
        if port == 0:
            raise RuntimeError(f"could not bind {config.listen}")
    except (Exception, asyncio.CancelledError):
        if pool is not None:
            await pool.close()
        await redis.aclose()
        raise
    stopping = asyncio.Event()
    refresher = asyncio.create_task(credentials.run_refresher(config.credentials_refresh_ms, stopping))
    return BaselineServer(server, port, pool, redis, refresher, stopping)


async def serve(config: Config, pool_size: int) -> None:
    baseline = await create_baseline_server(config, pool_size)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await baseline.server.start()
    log.info("baseline serving", extra={"port": baseline.port, "pool_size": pool_size})
    await stop.wait()
    await baseline.stop(config.shutdown_grace_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE_DEFAULT, help="asyncpg connections (1-64)")
    arguments = parser.parse_args()
    try:
        config = Config.from_env()
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    if not config.pg_dsn:
        parser.error("SUBSIDY_PG_DSN must name the baseline's database")
    logs.configure(config.log_level)
    if config.use_uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config, arguments.pool_size))
    else:
        asyncio.run(serve(config, arguments.pool_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
