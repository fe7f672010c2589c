"""CatalogService: the eligible-product catalog (import, get, list, deactivate).

Operator credentials only. A change commits in one PostgreSQL transaction with its audit row
(``storage.postgres.actions.record``) and is then published to the Redis hot path, so the next
authorization sees it.

An import validates every row in memory as the stream arrives (``server.domain.catalog_import``)
and writes in one short transaction at the end (storage/postgres/catalog.py), so a row equal to
what is stored is not touched (its ``updated_at`` stays) and re-importing a file changes
nothing. Sizes: 100,000 rows are ~6 MB on the wire and ~35 MB of checked records
in memory (tracemalloc); the 1,000,000-row bound and one import at a time per process keep an
import under ~400 MB.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client.v1 import catalog_pb2, catalog_pb2_grpc

from server.domain import validation
from server.domain.catalog_import import ERRORS_MAX, ImportCheck, ImportChecker
from server.domain.errors import InvalidField
from server.domain.gtin import is_valid_gtin13
from server.domain.reference import CATEGORY
from server.rpc.auth import OPERATOR, caller
from server.rpc.errors import invalid_field
from server.services.operations import OperatorDeps, begin_action, not_found
from storage.postgres.actions import Action, Scope, earlier_details, publish_scope, record
from storage.postgres.catalog import (
    Written,
    deactivate_product,
    fetch_product,
    list_products,
    write_products,
)
from storage.postgres.pool import Connection, Pool
from storage.postgres.reference import current_reference_version

SERVICE = "/subsidy.v1.CatalogService/"
IMPORT_METHOD = SERVICE + "ImportProducts"
DEACTIVATE_METHOD = SERVICE + "DeactivateProduct"
BATCH_ROWS_MAX = 5_000
IMPORT_ROWS_MAX = 1_000_000
IMPORTS_CONCURRENT_MAX = 1
# Publishing reads the rows back from PostgreSQL and pipelines them to Redis; in chunks, so a
# large import never holds every row's dict at once.
PUBLISH_CHUNK = 10_000
VALUES_PER_ROW_MAX = 64
SOURCE_NAME_MAX = 255
REASON_LENGTH_MAX = 500
PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1_000
FILTER_LENGTH_MAX = 128
MODES = {catalog_pb2.IMPORT_MODE_ALL_OR_NOTHING: "ALL_OR_NOTHING", catalog_pb2.IMPORT_MODE_GOOD_ROWS: "GOOD_ROWS"}


@dataclass(frozen=True)
class Upload:
    """A received import: its header, the action it records, and what checking found."""

    header: catalog_pb2.ImportHeader
    action: Action
    check: ImportCheck


class Replayed(Exception):
    """Raised inside the transaction when another call with the same request_id won the race;
    rolls back this call's writes."""


class CatalogService(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, deps: OperatorDeps) -> None:
        self._deps = deps
        self._imports = asyncio.Semaphore(IMPORTS_CONCURRENT_MAX)

    async def ImportProducts(
        self, requests: AsyncIterator[catalog_pb2.ImportProductsRequest], context: grpc.aio.ServicerContext
    ) -> catalog_pb2.ImportProductsResponse:
        caller(OPERATOR)  # Refuse a terminal before reading a single row.
        async with self._imports:
            upload = await receive_import(requests)
            pool = await self._deps.pool.get()
            async with pool.acquire() as connection:
                earlier = await earlier_details(connection, upload.action)
                if earlier is not None:
                    return await replay_answer(connection, upload, earlier)
                try:
                    details, version, written = await apply_import(connection, upload)
                except Replayed:
                    earlier = await earlier_details(connection, upload.action)
                    assert earlier is not None, "record() found the earlier action"
                    return await replay_answer(connection, upload, earlier)
            await self._publish(pool, written.changed_gtins, version)
        return import_response(upload.check, details, version, replayed=False)

    async def GetProduct(
        self, request: catalog_pb2.GetProductRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.GetProductResponse:
        caller(OPERATOR)
        check_gtin(request.gtin, "gtin")
        pool = await self._deps.pool.get()
        async with pool.acquire() as connection:
            row = await fetch_product(connection, request.gtin)
        if row is None:
            raise not_found("product", request.gtin)
        return catalog_pb2.GetProductResponse(product=product_message(row))

    async def ListProducts(
        self, request: catalog_pb2.ListProductsRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.ListProductsResponse:
        caller(OPERATOR)
        page_size = check_list(request)
        after = decode_page_token(request.page_token)
        pool = await self._deps.pool.get()
        async with pool.acquire() as connection:
            rows = await list_products(
                connection, after, request.category, request.brand, request.include_inactive, page_size + 1
            )
        page = rows[:page_size]
        more = len(rows) > page_size
        return catalog_pb2.ListProductsResponse(
            products=[product_message(row) for row in page],
            next_page_token=encode_page_token(page[-1]["gtin"]) if more else "",
        )

    async def DeactivateProduct(
        self, request: catalog_pb2.DeactivateProductRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.DeactivateProductResponse:
        action = begin_action(DEACTIVATE_METHOD, request, "product", request.gtin)
        check_gtin(request.gtin, "gtin")
        reason = request.reason.strip()
        if not reason or len(reason) > REASON_LENGTH_MAX:
            raise invalid_field("reason", f"must say why, in 1-{REASON_LENGTH_MAX} characters")
        pool = await self._deps.pool.get()
        async with pool.acquire() as connection, connection.transaction():
            row = await fetch_product(connection, request.gtin, lock=True)
            if row is None:
                raise not_found("product", request.gtin)
            details = {"gtin": request.gtin, "reason": reason, "was_active": row["active"]}
            recorded = await record(connection, action, details, Scope(gtins=(request.gtin,)))
            if recorded is not None:
                row = await deactivate_product(connection, request.gtin)
            # A replay changes nothing and answers with the current state.
            version = recorded if recorded is not None else await current_reference_version(connection)
        # A replay publishes again (harmless, and it repairs a first publication that failed)
        # but must not clear the unpublished mark of whichever change holds the current version.
        await publish_scope(pool, self._deps.store.redis, self._deps.store.keys, Scope(gtins=(request.gtin,)), recorded)
        return catalog_pb2.DeactivateProductResponse(product=product_message(row), reference_version=version)

    async def _publish(self, pool: Pool, gtins: Sequence[str], version: int) -> None:
        """Publishes the changed products chunk by chunk; only the last chunk clears the change's
        unpublished mark, so a failure part-way leaves it for the catch-up publisher. Nothing
        changed, nothing published: the Redis reference version stays too."""
        if not gtins:
            return
        chunks = [tuple(gtins[start : start + PUBLISH_CHUNK]) for start in range(0, len(gtins), PUBLISH_CHUNK)]
        for index, chunk in enumerate(chunks):
            clears = version if index == len(chunks) - 1 else None
            await publish_scope(pool, self._deps.store.redis, self._deps.store.keys, Scope(gtins=chunk), clears)


# Receiving an import.


async def receive_import(requests: AsyncIterator[catalog_pb2.ImportProductsRequest]) -> Upload:
    """Reads the header, then every batch, checking rows as they arrive. The action's payload
    hash covers the header and every row, so the same request_id with another file is a
    conflict, and the same file split into other batches is still a replay."""
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("part") != "header":
        raise invalid_field("header", "the first message must be the import header")
    header = first.header
    check_header(header)
    action = begin_action(IMPORT_METHOD, header, "catalog", header.source_name)
    digest = hashlib.sha256(action.payload_hash.encode())
    checker = ImportChecker(header.columns, ERRORS_MAX)
    last_row = 1
    async for message in requests:
        if message.WhichOneof("part") != "rows":
            raise invalid_field("header", "only the first message may be a header")
        last_row = check_batch(message.rows.rows, checker.rows_received, last_row)
        for row in message.rows.rows:
            encoded = row.SerializeToString(deterministic=True)
            digest.update(len(encoded).to_bytes(4, "big") + encoded)
            checker.check(row.row_number, row.values)
    return Upload(header, dataclasses.replace(action, payload_hash=digest.hexdigest()), checker.result())


def check_header(header: catalog_pb2.ImportHeader) -> None:
    try:
        header.request_id = validation.check_request_id(header.request_id)
    except InvalidField as error:
        raise invalid_field("header.request_id", error.reason) from None
    if header.mode not in MODES:
        raise invalid_field("header.mode", "must be IMPORT_MODE_ALL_OR_NOTHING or IMPORT_MODE_GOOD_ROWS")
    if not header.source_name.strip() or len(header.source_name) > SOURCE_NAME_MAX:
        raise invalid_field("header.source_name", f"must name the file, in 1-{SOURCE_NAME_MAX} characters")
    if not header.columns:
        raise invalid_field("header.columns", "must list the file's column names")


def check_batch(rows: Sequence[catalog_pb2.ImportRow], rows_before: int, last_row: int) -> int:
    """Bounds a batch and requires increasing row numbers, so that each row is reported once
    under a number that points into the file; returns the batch's last row number."""
    if len(rows) > BATCH_ROWS_MAX:
        raise invalid_field("rows.rows", f"at most {BATCH_ROWS_MAX} rows per batch")
    if rows_before + len(rows) > IMPORT_ROWS_MAX:
        raise invalid_field("rows", f"at most {IMPORT_ROWS_MAX} rows per import")
    for row in rows:
        if row.row_number <= last_row:
            raise invalid_field("rows.row_number", f"must increase from row to row, after {last_row}")
        if len(row.values) > VALUES_PER_ROW_MAX:
            raise invalid_field("rows.values", f"at most {VALUES_PER_ROW_MAX} values per row")
        last_row = row.row_number
    return last_row


# Writing an import.


async def apply_import(connection: Connection, upload: Upload) -> tuple[dict[str, Any], int, Written]:
    """One transaction: the rows the mode admits, then the audit row with the answer's counts.
    A rejected all-or-nothing import writes no product but is still recorded, so the audit
    trail shows it and a replay gets the same answer."""
    check = upload.check
    apply = bool(check.products) and (check.clean or upload.header.mode == catalog_pb2.IMPORT_MODE_GOOD_ROWS)
    async with connection.transaction():
        written = await write_products(connection, check.products) if apply else Written(0, 0, 0, ())
        details = summary(upload, written, apply)
        version = await record(connection, upload.action, details, Scope(gtins=written.changed_gtins))
        if version is None:
            raise Replayed
    return details, version, written


def summary(upload: Upload, written: Written, applied: bool) -> dict[str, Any]:
    """The answer's counts, stored in the audit row so that a replay returns them."""
    return {
        "source_name": upload.header.source_name,
        "mode": MODES[upload.header.mode],
        "rows_received": upload.check.rows_received,
        "rows_rejected": upload.check.rows_rejected,
        "applied": applied,
        "created": written.created,
        "updated": written.updated,
        "unchanged": written.unchanged,
    }


async def replay_answer(
    connection: Connection, upload: Upload, details: dict[str, Any]
) -> catalog_pb2.ImportProductsResponse:
    """The stored counts; the errors are those of the same rows checked again (checking is a
    pure function of the payload, which the payload hash proved identical). The version is the
    current one: record() stores the details before it bumps the version, so the original
    number is not kept; the import's change is visible at the current version too."""
    return import_response(upload.check, details, await current_reference_version(connection), replayed=True)


def import_response(
    check: ImportCheck, details: dict[str, Any], version: int, replayed: bool
) -> catalog_pb2.ImportProductsResponse:
    return catalog_pb2.ImportProductsResponse(
        rows_received=int(details["rows_received"]),
        rows_rejected=int(details["rows_rejected"]),
        applied=bool(details["applied"]),
        created=int(details["created"]),
        updated=int(details["updated"]),
        unchanged=int(details["unchanged"]),
        errors=[
            catalog_pb2.RowError(row_number=error.row_number, column=error.column, reason=error.reason)
            for error in check.errors
        ],
        errors_truncated=check.errors_truncated,
        reference_version=version,
        replayed=replayed,
    )


# Reading.


def check_gtin(value: str, field: str) -> None:
    if not is_valid_gtin13(value):
        raise invalid_field(field, "must be a GTIN-13 with a valid check digit")


def check_list(request: catalog_pb2.ListProductsRequest) -> int:
    """Validates the filters; returns the page size."""
    if not 0 <= request.page_size <= PAGE_SIZE_MAX:
        raise invalid_field("page_size", f"must be between 1 and {PAGE_SIZE_MAX} (0 means {PAGE_SIZE_DEFAULT})")
    if request.category and not CATEGORY.match(request.category):
        raise invalid_field("category", f"must match {CATEGORY.pattern}")
    if len(request.brand) > FILTER_LENGTH_MAX:
        raise invalid_field("brand", f"at most {FILTER_LENGTH_MAX} characters")
    return request.page_size or PAGE_SIZE_DEFAULT


def encode_page_token(gtin: str) -> str:
    return base64.urlsafe_b64encode(gtin.encode()).decode()


def decode_page_token(token: str) -> str:
    """The last GTIN of the previous page; '' for the first page."""
    if not token:
        return ""
    try:
        gtin = base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise invalid_field("page_token", "is not a token from a previous response") from None
    if not is_valid_gtin13(gtin):
        raise invalid_field("page_token", "is not a token from a previous response")
    return gtin


def product_message(row: Any) -> catalog_pb2.Product:
    updated_at = Timestamp()
    updated_at.FromDatetime(row["updated_at"])
    return catalog_pb2.Product(
        gtin=row["gtin"],
        brand=row["brand"],
        model=row["model"],
        category=row["category"],
        energy_grade=row["energy_grade"],
        reference_price_fen=row["reference_price_fen"],
        serial_required=row["serial_required"],
        active=row["active"],
        updated_at=updated_at,
    )
