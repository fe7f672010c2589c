"""MerchantService: merchants, their stores and terminals, and the terminals' credentials.

Operator credentials only. Every mutating call is one PostgreSQL transaction that makes the
change and records it (``storage.postgres.actions.record``: the append-only audit row,
idempotency on the operator's request_id, the reference version); after the commit the merchant, its
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

import grpc
from subsidy_client.v1 import common_pb2, merchant_pb2, merchant_pb2_grpc

from server.domain import geo
from server.domain import merchants as rules
from server.rpc.auth import OPERATOR, caller
from server.rpc.errors import ApiError, invalid_field
from server.services.common import wgs84_point
from server.services.operations import OperatorDeps, begin_action, not_found
from storage.postgres import merchants as merchants_db
from storage.postgres.actions import Action, Scope, publish_scope, record, unpublished_versions
from storage.postgres.pool import Connection, Pool
from storage.postgres.reference import current_reference_version

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


async def load_merchant(connection: Connection, merchant_id: str) -> merchant_pb2.Merchant | None:
    found = await merchants_db.fetch_merchant(connection, merchant_id)
    if found is None:
        return None
    row, stores, terminals = found
    return pb.Merchant(
        merchant_id=row["merchant_id"],
        name=row["name"],
        licence_number=row["licence_number"],
        status=STATUS_VALUES[row["status"]],
        categories=list(row["categories"]),
        stores=[store_message(store) for store in stores],
        terminals=[terminal_message(terminal) for terminal in terminals],
    )


async def load_store(connection: Connection, store_id: str) -> merchant_pb2.Store:
    return store_message(await merchants_db.fetch_store(connection, store_id))


async def check_inside_a_region(connection: Connection, point: geo.Point) -> None:
    """A physical store must lie in the region of at least one campaign that has a region (a
    merchant outside the programme's area could otherwise sell under it). When no campaign
    restricts location, every location is accepted."""
    regions = await merchants_db.campaign_regions(connection)
    if not regions:
        return
    if geo.inside_any(point, (geo.region_from_text(region) for region in regions)):
        return
    raise ApiError(
        grpc.StatusCode.FAILED_PRECONDITION,
        common_pb2.ERROR_REASON_STORE_OUTSIDE_REGION,
        f"store.location: ({point.latitude:.6f}, {point.longitude:.6f}) in WGS-84 lies outside the region"
        f" of every campaign ({len(regions)} with a region)",
        {
            "field": "store.location",
            "wgs84_latitude": f"{point.latitude:.6f}",
            "wgs84_longitude": f"{point.longitude:.6f}",
            "campaigns_with_region": str(len(regions)),
        },
    )


# --- The service ------------------------------------------------------------------------------


class MerchantService(merchant_pb2_grpc.MerchantServiceServicer):
    def __init__(self, deps: OperatorDeps) -> None:
        self._deps = deps

    async def _publish(self, pool: Pool, merchant_id: str, versions: Sequence[int]) -> None:
        """After the commit: the merchant, its terminals and their credentials go to Redis."""
        for version in versions:
            await publish_scope(
                pool, self._deps.store.redis, self._deps.store.keys, Scope(merchant_ids=(merchant_id,)), version
            )

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
                await merchants_db.insert_merchant(
                    connection, merchant.merchant_id, merchant.name, merchant.licence_number, merchant.categories
                )
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
                secret = await merchants_db.insert_terminal(
                    connection, request.terminal_id, store.merchant_id, store.store_id
                )
            terminal = terminal_message(await merchants_db.fetch_terminal(connection, request.terminal_id))
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
            row = await merchants_db.fetch_terminal(connection, request.terminal_id, lock=True)
            merchant_id = row["merchant_id"]
            version = await record(connection, action, {"merchant_id": merchant_id}, Scope(merchant_ids=(merchant_id,)))
            if version is not None:
                secret = await merchants_db.rotate_terminal_secret(connection, request.terminal_id)
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
            previous = await merchants_db.lock_merchant_status(connection, request.merchant_id)
            if previous is None:
                raise not_found("merchant", request.merchant_id)
            details = {"status": status, "previous_status": previous, "reason": request.reason}
            version = await record(connection, action, details, Scope(merchant_ids=(request.merchant_id,)))
            if version is not None:
                await merchants_db.set_merchant_status(connection, request.merchant_id, status)
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
            row = await merchants_db.fetch_terminal(connection, request.terminal_id, lock=True)
            merchant_id = row["merchant_id"]
            details = {"status": status, "previous_status": row["status"], "reason": request.reason}
            version = await record(connection, action, details, Scope(merchant_ids=(merchant_id,)))
            if version is not None:
                await merchants_db.set_terminal_status(connection, request.terminal_id, status)
            terminal = terminal_message(await merchants_db.fetch_terminal(connection, request.terminal_id))
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


async def insert_store(connection: Connection, store: merchant_pb2.Store, point: geo.Point | None) -> None:
    await merchants_db.require_merchant(connection, store.merchant_id)
    if point is not None:
        await check_inside_a_region(connection, point)
    await merchants_db.insert_store(
        connection,
        merchants_db.NewStore(
            store_id=store.store_id,
            merchant_id=store.merchant_id,
            kind=KIND_NAMES[store.kind],
            name=store.name,
            address=store.address,
            latitude=point.latitude if point else None,
            longitude=point.longitude if point else None,
            platform=store.platform,
            shop_url=store.shop_url,
        ),
    )
