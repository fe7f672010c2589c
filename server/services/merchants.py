"""MerchantService: merchants, their stores and terminals, and the terminals' credentials.

Operator credentials only. Every mutating call is one PostgreSQL transaction that makes the
change and records it (``server.services.operations.record``: the append-only audit row, idempotency on
the operator's request_id, the reference version); after the commit the merchant, its
terminals and their credentials are published to Redis, so that a suspension reaches the next
authorization and a rotated secret replaces the old one within the credential cache's refresh
interval (``SUBSIDY_CREDENTIALS_REFRESH_MS``, one second by default).

Replays: a request_id that already acted with the same payload changes nothing and answers with
the current state. A secret leaves the server once, in the answer of the call that issued it: a
replayed CreateTerminal or RotateTerminalCredential returns the terminal with an empty
``secret``. A caller that lost that first answer rotates the credential (a new request_id).

``reference_version`` in the answers is the PostgreSQL reference version the change produced
(for a replay, the current one, which is at least that).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc
from subsidy_client.v1 import common_pb2, merchant_pb2, merchant_pb2_grpc

from server.domain import geo
from server.domain import merchants as rules
from server.rpc.auth import OPERATOR, caller
from server.rpc.errors import ApiError, invalid_field
from server.services.common import wgs84_point
from server.services.operations import (
    Action,
    OperatorDeps,
    Scope,
    already_exists,
    begin_action,
    not_found,
    publish_scope,
    record,
)
from storage.postgres.reference import issue_terminal_secret

pb = merchant_pb2
log = logging.getLogger("subsidy.merchants")

STATUS_NAMES: dict[merchant_pb2.PartyStatus.ValueType, str] = {
    pb.PARTY_STATUS_ACTIVE: "ACTIVE",
    pb.PARTY_STATUS_SUSPENDED: "SUSPENDED",
}
STATUS_VALUES = {name: value for value, name in STATUS_NAMES.items()}
KIND_NAMES: dict[merchant_pb2.StoreKind.ValueType, str] = {
    pb.STORE_KIND_PHYSICAL: "PHYSICAL",
    pb.STORE_KIND_ONLINE: "ONLINE",
}
KIND_VALUES = {name: value for value, name in KIND_NAMES.items()}

# --- Messages checked with the pure rules (server/domain/merchants.py) -------------------------


def check_merchant(merchant: merchant_pb2.Merchant) -> None:
    rules.check_identifier(merchant.merchant_id, "merchant.merchant_id")
    rules.check_text(merchant.name, "merchant.name", rules.NAME_LENGTH_MAX)
    rules.check_licence_number(merchant.licence_number, "merchant.licence_number")
    rules.check_categories(merchant.categories, "merchant.categories")
    if merchant.status not in (pb.PARTY_STATUS_UNSPECIFIED, pb.PARTY_STATUS_ACTIVE):
        raise invalid_field("merchant.status", "a merchant starts ACTIVE; suspend it with SetMerchantStatus")
    if merchant.stores:
        raise invalid_field("merchant.stores", "create stores with CreateStore")
    if merchant.terminals:
        raise invalid_field("merchant.terminals", "create terminals with CreateTerminal")


def check_store(store: merchant_pb2.Store) -> geo.Point | None:
    """Validates a new store; returns its WGS-84 location (None for an online shop)."""
    rules.check_identifier(store.store_id, "store.store_id")
    rules.check_identifier(store.merchant_id, "store.merchant_id")
    rules.check_text(store.name, "store.name", rules.NAME_LENGTH_MAX)
    if store.kind == pb.STORE_KIND_PHYSICAL:
        return _check_physical(store)
    if store.kind == pb.STORE_KIND_ONLINE:
        _check_online(store)
        return None
    raise invalid_field("store.kind", "must be STORE_KIND_PHYSICAL or STORE_KIND_ONLINE")


def _check_physical(store: merchant_pb2.Store) -> geo.Point:
    rules.check_text(store.address, "store.address", rules.ADDRESS_LENGTH_MAX)
    # A physical shop has no platform; refusing stray fields keeps a record's meaning unambiguous.
    if store.platform:
        raise invalid_field("store.platform", "is for online stores only")
    if store.shop_url:
        raise invalid_field("store.shop_url", "is for online stores only")
    if not store.HasField("location"):
        raise invalid_field("store.location", "is required for a physical store")
    rules.check_accuracy(store.location.accuracy_m, "store.location.accuracy_m")
    try:
        return wgs84_point(store.location)
    except geo.CoordinateError as error:
        raise invalid_field(f"store.location.{error.field}", error.reason) from None


def _check_online(store: merchant_pb2.Store) -> None:
    rules.check_platform(store.platform, "store.platform")
    rules.check_shop_url(store.shop_url, "store.shop_url")
    if store.address:
        raise invalid_field("store.address", "is for physical stores only")
    if store.HasField("location"):
        raise invalid_field("store.location", "an online store has no location")


def check_status(status: merchant_pb2.PartyStatus.ValueType, reason: str) -> str:
    """Validates a status change; returns the status name as stored."""
    if status not in STATUS_NAMES:
        raise invalid_field("status", "must be PARTY_STATUS_ACTIVE or PARTY_STATUS_SUSPENDED")
    # A suspension stops a merchant's sales: the audit trail must say why.
    rules.check_text(reason, "reason", rules.REASON_LENGTH_MAX, required=status == pb.PARTY_STATUS_SUSPENDED)
    return STATUS_NAMES[status]


# --- Rows to messages -------------------------------------------------------------------------

MERCHANT_COLUMNS = "merchant_id, name, licence_number, status, categories"
STORE_COLUMNS = "store_id, merchant_id, kind, name, address, latitude, longitude, platform, shop_url"
TERMINAL_COLUMNS = "terminal_id, merchant_id, coalesce(store_id, '') AS store_id, status"


def store_message(row: Any) -> merchant_pb2.Store:
    store = pb.Store(
        store_id=row["store_id"],
        merchant_id=row["merchant_id"],
        kind=KIND_VALUES[row["kind"]],
        name=row["name"],
        address=row["address"],
        platform=row["platform"],
        shop_url=row["shop_url"],
    )
    if row["latitude"] is not None:
        # Stored converted: whatever datum the caller used, the store reads back in WGS-84.
        store.location.CopyFrom(
            common_pb2.Location(
                latitude=row["latitude"],
                longitude=row["longitude"],
                coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84,
            )
        )
    return store


def terminal_message(row: Any) -> merchant_pb2.Terminal:
    return pb.Terminal(
        terminal_id=row["terminal_id"],
        merchant_id=row["merchant_id"],
        store_id=row["store_id"],
        status=STATUS_VALUES[row["status"]],
    )


async def load_merchant(connection: asyncpg.Connection, merchant_id: str) -> merchant_pb2.Merchant | None:
    row = await connection.fetchrow(f"SELECT {MERCHANT_COLUMNS} FROM merchants WHERE merchant_id = $1", merchant_id)
    if row is None:
        return None
    stores = await connection.fetch(
        f"SELECT {STORE_COLUMNS} FROM stores WHERE merchant_id = $1 ORDER BY store_id", merchant_id
    )
    terminals = await connection.fetch(
        f"SELECT {TERMINAL_COLUMNS} FROM terminals WHERE merchant_id = $1 ORDER BY terminal_id", merchant_id
    )
    return pb.Merchant(
        merchant_id=row["merchant_id"],
        name=row["name"],
        licence_number=row["licence_number"],
        status=STATUS_VALUES[row["status"]],
        categories=list(row["categories"]),
        stores=[store_message(store) for store in stores],
        terminals=[terminal_message(terminal) for terminal in terminals],
    )


async def load_store(connection: asyncpg.Connection, store_id: str) -> merchant_pb2.Store:
    row = await connection.fetchrow(f"SELECT {STORE_COLUMNS} FROM stores WHERE store_id = $1", store_id)
    if row is None:
        raise not_found("store", store_id)
    return store_message(row)


async def load_terminal(connection: asyncpg.Connection, terminal_id: str, *, lock: bool = False) -> Any:
    """The terminal's row; with ``lock``, held until the transaction ends so that concurrent
    changes to one terminal apply one after the other."""
    suffix = " FOR UPDATE" if lock else ""
    row = await connection.fetchrow(
        f"SELECT {TERMINAL_COLUMNS} FROM terminals WHERE terminal_id = $1{suffix}", terminal_id
    )
    if row is None:
        raise not_found("terminal", terminal_id)
    return row


async def current_reference_version(connection: asyncpg.Connection) -> int:
    version: int = await connection.fetchval("SELECT version FROM reference_version")
    return version


async def unpublished_versions(connection: asyncpg.Connection, merchant_id: str) -> list[int]:
    """Committed changes of exactly this merchant whose publication has not been confirmed,
    including the caller's own. Publishing the merchant's current state covers them all, so a
    retry after a failed publication (the client retries UNAVAILABLE with the same request_id,
    which is then a replay) brings Redis up to date instead of leaving it to the catch-up."""
    rows = await connection.fetch(
        "SELECT version FROM unpublished_changes WHERE merchant_ids = ARRAY[$1]::text[]"
        " AND cardinality(campaign_ids) = 0 AND cardinality(gtins) = 0 ORDER BY version",
        merchant_id,
    )
    return [row["version"] for row in rows]


async def check_inside_a_region(connection: asyncpg.Connection, point: geo.Point) -> None:
    """A physical store must lie in the region of at least one campaign that has a region (a
    merchant outside the programme's area could otherwise sell under it). When no campaign
    restricts location, every location is accepted."""
    rows = await connection.fetch(
        "SELECT region::text AS region FROM campaigns WHERE region IS NOT NULL AND jsonb_typeof(region) = 'object'"
    )
    if not rows:
        return
    if geo.inside_any(point, (geo.region_from_text(row["region"]) for row in rows)):
        return
    raise ApiError(
        grpc.StatusCode.FAILED_PRECONDITION,
        common_pb2.ERROR_REASON_STORE_OUTSIDE_REGION,
        f"store.location: ({point.latitude:.6f}, {point.longitude:.6f}) in WGS-84 lies outside the region"
        f" of every campaign ({len(rows)} with a region)",
        {
            "field": "store.location",
            "wgs84_latitude": f"{point.latitude:.6f}",
            "wgs84_longitude": f"{point.longitude:.6f}",
            "campaigns_with_region": str(len(rows)),
        },
    )


# --- The service ------------------------------------------------------------------------------


class MerchantService(merchant_pb2_grpc.MerchantServiceServicer):
    def __init__(self, deps: OperatorDeps) -> None:
        self._deps = deps

    async def _publish(self, pool: asyncpg.Pool, merchant_id: str, versions: Sequence[int]) -> None:
        """After the commit: the merchant, its terminals and their credentials go to Redis."""
        for version in versions:
            await publish_scope(pool, self._deps.redis, self._deps.keys, Scope(merchant_ids=(merchant_id,)), version)

    @staticmethod
    def _log(action: Action, version: int | None) -> None:
        log.info(
            "merchant action",
            extra={
                "action": action.action,
                "target": f"{action.target_kind}:{action.target_id}",
                "operator": action.operator_id,
                "request_id": action.request_id,
                "replayed": version is None,
            },
        )

    async def CreateMerchant(
        self, request: merchant_pb2.CreateMerchantRequest, context: grpc.aio.ServicerContext
    ) -> merchant_pb2.CreateMerchantResponse:
        merchant = request.merchant
        action = begin_action("CreateMerchant", request, "merchant", merchant.merchant_id)
        check_merchant(merchant)
        details = {
            "name": merchant.name,
            "licence_number": merchant.licence_number,
            "categories": list(merchant.categories),
        }
        pool = await self._deps.pool.get()
        async with pool.acquire() as connection, connection.transaction():
            version = await record(connection, action, details, Scope(merchant_ids=(merchant.merchant_id,)))
            if version is not None:
                inserted = await connection.fetchval(
                    "INSERT INTO merchants (merchant_id, name, licence_number, status, categories)"
                    " VALUES ($1, $2, $3, 'ACTIVE', $4) ON CONFLICT (merchant_id) DO NOTHING RETURNING merchant_id",
                    merchant.merchant_id,
                    merchant.name,
                    merchant.licence_number,
                    list(merchant.categories),
                )
                if inserted is None:
                    raise already_exists("merchant", merchant.merchant_id)
            current = await load_merchant(connection, merchant.merchant_id)
            reference_version = version if version is not None else await current_reference_version(connection)
            pending = await unpublished_versions(connection, merchant.merchant_id)
        self._log(action, version)
        await self._publish(pool, merchant.merchant_id, pending)
        return pb.CreateMerchantResponse(merchant=current, reference_version=reference_version)

    async def GetMerchant(
        self, request: merchant_pb2.GetMerchantRequest, context: grpc.aio.ServicerContext
    ) -> merchant_pb2.GetMerchantResponse:
        caller(OPERATOR)
        rules.check_identifier(request.merchant_id, "merchant_id")
        pool = await self._deps.pool.get()
        # One snapshot, so the stores and terminals belong to the merchant as read.
        async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
            merchant = await load_merchant(connection, request.merchant_id)
        if merchant is None:
            raise not_found("merchant", request.merchant_id)
        return pb.GetMerchantResponse(merchant=merchant)

    async def CreateStore(
        self, request: merchant_pb2.CreateStoreRequest, context: grpc.aio.ServicerContext
    ) -> merchant_pb2.CreateStoreResponse:
        store = request.store
        action = begin_action("CreateStore", request, "store", store.store_id)
        point = check_store(store)
        pool = await self._deps.pool.get()
        async with pool.acquire() as connection, connection.transaction():
            version = await record(
                connection, action, store_details(store, point), Scope(merchant_ids=(store.merchant_id,))
            )
            if version is not None:
                await insert_store(connection, store, point)
            current = await load_store(connection, store.store_id)
            pending = await unpublished_versions(connection, store.merchant_id)
        self._log(action, version)
        # Stores are not on the hot path, but publishing clears the change's unpublished mark.
        await self._publish(pool, store.merchant_id, pending)
        return pb.CreateStoreResponse(store=current)

    async def CreateTerminal(
        self, request: merchant_pb2.CreateTerminalRequest, context: grpc.aio.ServicerContext
    ) -> merchant_pb2.CreateTerminalResponse:
        action = begin_action("CreateTerminal", request, "terminal", request.terminal_id)
        rules.check_identifier(request.terminal_id, "terminal_id")
        rules.check_identifier(request.store_id, "store_id")
        pool = await self._deps.pool.get()
        secret = ""
        async with pool.acquire() as connection, connection.transaction():
            # The store decides the merchant: a terminal always sells for its store's merchant.
            store = await load_store(connection, request.store_id)
            details = {"merchant_id": store.merchant_id, "store_id": store.store_id}
            version = await record(connection, action, details, Scope(merchant_ids=(store.merchant_id,)))
            if version is not None:
                secret = await insert_terminal(connection, request.terminal_id, store)
            terminal = terminal_message(await load_terminal(connection, request.terminal_id))
            reference_version = version if version is not None else await current_reference_version(connection)
            pending = await unpublished_versions(connection, store.merchant_id)
        self._log(action, version)
        await self._publish(pool, store.merchant_id, pending)
        return pb.CreateTerminalResponse(terminal=terminal, secret=secret, reference_version=reference_version)

    async def RotateTerminalCredential(
        self, request: merchant_pb2.RotateTerminalCredentialRequest, context: grpc.aio.ServicerContext
    ) -> merchant_pb2.RotateTerminalCredentialResponse:
        action = begin_action("RotateTerminalCredential", request, "terminal", request.terminal_id)
        rules.check_identifier(request.terminal_id, "terminal_id")
        pool = await self._deps.pool.get()
        secret = ""
        async with pool.acquire() as connection, connection.transaction():
            row = await load_terminal(connection, request.terminal_id, lock=True)
            merchant_id = row["merchant_id"]
            version = await record(connection, action, {"merchant_id": merchant_id}, Scope(merchant_ids=(merchant_id,)))
            if version is not None:
                secret = issue_terminal_secret()
                await connection.execute(
                    "UPDATE terminals SET secret = $2, updated_at = now() WHERE terminal_id = $1",
                    request.terminal_id,
                    secret,
                )
            reference_version = version if version is not None else await current_reference_version(connection)
            pending = await unpublished_versions(connection, merchant_id)
        self._log(action, version)
        await self._publish(pool, merchant_id, pending)
        return pb.RotateTerminalCredentialResponse(
            terminal=terminal_message(row), secret=secret, reference_version=reference_version
        )

    async def SetMerchantStatus(
        self, request: merchant_pb2.SetMerchantStatusRequest, context: grpc.aio.ServicerContext
    ) -> merchant_pb2.SetMerchantStatusResponse:
        action = begin_action("SetMerchantStatus", request, "merchant", request.merchant_id)
        rules.check_identifier(request.merchant_id, "merchant_id")
        status = check_status(request.status, request.reason)
        pool = await self._deps.pool.get()
        async with pool.acquire() as connection, connection.transaction():
            previous = await connection.fetchval(
                "SELECT status FROM merchants WHERE merchant_id = $1 FOR UPDATE", request.merchant_id
            )
            if previous is None:
                raise not_found("merchant", request.merchant_id)
            details = {"status": status, "previous_status": previous, "reason": request.reason}
            version = await record(connection, action, details, Scope(merchant_ids=(request.merchant_id,)))
            if version is not None:
                await connection.execute(
                    "UPDATE merchants SET status = $2, updated_at = now() WHERE merchant_id = $1",
                    request.merchant_id,
                    status,
                )
            merchant = await load_merchant(connection, request.merchant_id)
            reference_version = version if version is not None else await current_reference_version(connection)
            pending = await unpublished_versions(connection, request.merchant_id)
        self._log(action, version)
        await self._publish(pool, request.merchant_id, pending)
        return pb.SetMerchantStatusResponse(merchant=merchant, reference_version=reference_version)

    async def SetTerminalStatus(
        self, request: merchant_pb2.SetTerminalStatusRequest, context: grpc.aio.ServicerContext
    ) -> merchant_pb2.SetTerminalStatusResponse:
        action = begin_action("SetTerminalStatus", request, "terminal", request.terminal_id)
        rules.check_identifier(request.terminal_id, "terminal_id")
        status = check_status(request.status, request.reason)
        pool = await self._deps.pool.get()
        async with pool.acquire() as connection, connection.transaction():
            row = await load_terminal(connection, request.terminal_id, lock=True)
            merchant_id = row["merchant_id"]
            details = {"status": status, "previous_status": row["status"], "reason": request.reason}
            version = await record(connection, action, details, Scope(merchant_ids=(merchant_id,)))
            if version is not None:
                await connection.execute(
                    "UPDATE terminals SET status = $2, updated_at = now() WHERE terminal_id = $1",
                    request.terminal_id,
                    status,
                )
            terminal = terminal_message(await load_terminal(connection, request.terminal_id))
            reference_version = version if version is not None else await current_reference_version(connection)
            pending = await unpublished_versions(connection, merchant_id)
        self._log(action, version)
        await self._publish(pool, merchant_id, pending)
        return pb.SetTerminalStatusResponse(terminal=terminal, reference_version=reference_version)


# --- Writes -----------------------------------------------------------------------------------


def store_details(store: merchant_pb2.Store, point: geo.Point | None) -> dict[str, Any]:
    """What the audit trail keeps of a new store: the fields as given and the WGS-84 point."""
    details: dict[str, Any] = {
        "merchant_id": store.merchant_id,
        "kind": KIND_NAMES[store.kind],
        "name": store.name,
        "address": store.address,
        "platform": store.platform,
        "shop_url": store.shop_url,
    }
    if point is not None:
        details["location_given"] = {
            "latitude": store.location.latitude,
            "longitude": store.location.longitude,
            "coordinate_system": common_pb2.CoordinateSystem.Name(store.location.coordinate_system),
        }
        details["wgs84"] = {"latitude": point.latitude, "longitude": point.longitude}
    return details


async def insert_store(connection: asyncpg.Connection, store: merchant_pb2.Store, point: geo.Point | None) -> None:
    if await connection.fetchval("SELECT 1 FROM merchants WHERE merchant_id = $1", store.merchant_id) is None:
        raise not_found("merchant", store.merchant_id)
    if point is not None:
        await check_inside_a_region(connection, point)
    inserted = await connection.fetchval(
        "INSERT INTO stores (store_id, merchant_id, kind, name, address, latitude, longitude, platform, shop_url)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (store_id) DO NOTHING RETURNING store_id",
        store.store_id,
        store.merchant_id,
        KIND_NAMES[store.kind],
        store.name,
        store.address,
        point.latitude if point else None,
        point.longitude if point else None,
        store.platform,
        store.shop_url,
    )
    if inserted is None:
        raise already_exists("store", store.store_id)


async def insert_terminal(connection: asyncpg.Connection, terminal_id: str, store: merchant_pb2.Store) -> str:
    """Creates an ACTIVE terminal bound to the store; returns its new secret."""
    # Terminals and operators share one credential namespace in Redis: a terminal named like an
    # operator would overwrite that operator's credential when published.
    if await connection.fetchval("SELECT 1 FROM operators WHERE operator_id = $1", terminal_id) is not None:
        raise already_exists("operator", terminal_id)
    secret = issue_terminal_secret()
    inserted = await connection.fetchval(
        "INSERT INTO terminals (terminal_id, merchant_id, store_id, status, secret) VALUES ($1, $2, $3, 'ACTIVE', $4)"
        " ON CONFLICT (terminal_id) DO NOTHING RETURNING terminal_id",
        terminal_id,
        store.merchant_id,
        store.store_id,
        secret,
    )
    if inserted is None:
        raise already_exists("terminal", terminal_id)
    return secret
