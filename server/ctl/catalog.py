"""subsidyctl catalog: import, get, list, deactivate eligible products."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, cast

import click
from google.protobuf.message import Message
from rich.progress import TaskID
from subsidy_client import SignedClient, SubsidyError
from subsidy_client.v1 import catalog_pb2 as pb

from server.ctl.common import GATEWAY, Settings, emit, json_option, new_request_id, pass_settings, run, steps
from server.domain.catalog_import import HEADER_ROW, REQUIRED_COLUMNS, estimate_rows, read_rows

SERVICE = "/subsidy.v1.CatalogService/"
BATCH_ROWS = 5_000
# The whole stream shares one deadline: generous, since a million-row XLSX takes minutes to read.
IMPORT_TIMEOUT_S = 1_800.0
LIST_PAGES_MAX = 10_000
Rows = Iterator[tuple[int, list[str]]]


@click.group()
def catalog() -> None:
    """The eligible-product catalog."""


# import


class ImportStream:
    """The import's messages, read from the file only as gRPC sends them, so a large file is
    never held in memory and the progress bar follows what was sent. A read error is kept and
    re-raised: gRPC then cancels the call before the end of the stream, so the server commits
    nothing of a half-read file."""

    def __init__(
        self,
        header: pb.ImportHeader,
        rows: Rows,
        advance: Callable[[int], None],
        sent: Callable[[], None] = lambda: None,
    ) -> None:
        self._header = header
        self._rows = rows
        self._advance = advance
        self._sent = sent
        self.failure: Exception | None = None

    def __iter__(self) -> Iterator[pb.ImportProductsRequest]:
        yield pb.ImportProductsRequest(header=self._header)
        try:
            while batch := list(islice(self._rows, BATCH_ROWS)):
                rows = [pb.ImportRow(row_number=number, values=values) for number, values in batch]
                yield pb.ImportProductsRequest(rows=pb.ImportRowBatch(rows=rows))
                self._advance(len(batch))
            self._sent()
        except Exception as error:  # openpyxl and csv raise many kinds for a damaged file
            self.failure = error
            raise


def open_rows(path: Path) -> tuple[list[str], Rows]:
    """The header's column names and an iterator over the data rows."""
    try:
        rows = read_rows(path)
        first = next(rows, None)
    except Exception as error:  # openpyxl and csv raise many kinds for a damaged file
        raise click.ClickException(f"cannot read {path}: {error}") from None
    if first is None or first[0] != HEADER_ROW:
        raise click.ClickException(f"{path} is empty: row 1 must name the columns ({', '.join(REQUIRED_COLUMNS)})")
    return first[1], rows


async def send_import(client: SignedClient, stream: ImportStream, path: Path) -> pb.ImportProductsResponse:
    try:
        # _stream_call only iterates its argument once; the stream is read lazily on purpose.
        requests = cast(Sequence[Message], stream)
        return await client._stream_call(
            SERVICE + "ImportProducts", requests, pb.ImportProductsResponse, IMPORT_TIMEOUT_S
        )
    except (SubsidyError, asyncio.CancelledError):
        # A read error inside the stream makes gRPC cancel the call locally (CancelledError).
        if stream.failure is not None:
            raise click.ClickException(f"cannot read {path}: {stream.failure}") from None
        raise


def show_import(settings: Settings, response: pb.ImportProductsResponse) -> None:
    """The summary, then every reported problem (or the whole answer as JSON)."""
    totals = {
        "received": response.rows_received,
        "rejected": response.rows_rejected,
        "applied": "yes" if response.applied else "no",
        "created": response.created,
        "updated": response.updated,
        "unchanged": response.unchanged,
        "reference_version": response.reference_version,
        "replayed": "yes" if response.replayed else "no",
    }
    emit(settings, response, [totals])
    if settings.json_output or not response.errors:
        return
    click.echo()
    problems = [
        {"row": error.row_number, "column": error.column or "(row)", "reason": error.reason}
        for error in response.errors
    ]
    emit(settings, response, problems)
    if response.errors_truncated:
        click.echo(f"(only the first {len(response.errors)} problems are listed)", err=True)


@catalog.command("import", short_help="Import products from a CSV or XLSX file.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--all-or-nothing/--good-rows",
    "all_or_nothing",
    default=True,
    show_default=True,
    help="apply nothing if any row is bad, or apply the good rows and report the bad ones",
)
@json_option
@pass_settings
def import_products(settings: Settings, file: Path, all_or_nothing: bool) -> None:
    """Import products from FILE (.csv or .xlsx). Row 1 names the columns: gtin, brand, model,
    category, energy_grade (0-5), reference_price_fen, serial_required (true/false, yes/no, 1/0,
    是/否) and optionally active. Every bad row is listed with its column and reason; the exit
    status is 1 when any row was rejected. Importing the same file again changes nothing. A
    progress bar (rows sent, on stderr) follows a long import."""
    columns, rows = open_rows(file)
    mode = pb.IMPORT_MODE_ALL_OR_NOTHING if all_or_nothing else pb.IMPORT_MODE_GOOD_ROWS
    header = pb.ImportHeader(request_id=new_request_id(), mode=mode, source_name=file.name, columns=columns)
    with steps(settings.json_output) as progress:
        # An unknown total (an XLSX without a recorded dimension) counts rows without a percentage.
        sending = progress.add(f"sending {file.name}", estimate_rows(file))
        applying: list[TaskID] = []

        def sent() -> None:
            progress.finish(sending)
            applying.append(progress.add("the gateway checks and applies them"))

        stream = ImportStream(header, rows, lambda count: progress.advance(sending, count), sent)
        response = run(settings, lambda client: send_import(client, stream, file))
        for task in applying:
            progress.finish(task)
    show_import(settings, response)
    if response.rows_rejected:
        if not response.applied:
            click.echo("nothing was applied; fix the rows above (or use --good-rows)", err=True)
        raise click.exceptions.Exit(1)


# get, list, deactivate


def product_row(product: pb.Product) -> dict[str, Any]:
    return {
        "gtin": product.gtin,
        "brand": product.brand,
        "model": product.model,
        "category": product.category,
        "grade": product.energy_grade,
        "reference_price": f"{product.reference_price_fen / 100:.2f}" if product.reference_price_fen else "",
        "serial": "required" if product.serial_required else "",
        "active": "yes" if product.active else "no",
    }


@catalog.command("get", short_help="Show one product.")
@click.argument("gtin")
@json_option
@pass_settings
def get(settings: Settings, gtin: str) -> None:
    """Show one product (reference price in yuan in the table, fen in JSON)."""

    async def action(client: SignedClient) -> pb.GetProductResponse:
        return await client._call(SERVICE + "GetProduct", pb.GetProductRequest(gtin=gtin), pb.GetProductResponse)

    response = run(settings, action)
    emit(settings, response, [product_row(response.product)])


async def list_pages(
    client: SignedClient, request: pb.ListProductsRequest, every_page: bool
) -> pb.ListProductsResponse:
    """One page, or every page followed to the end (bounded) gathered into one answer."""
    gathered = pb.ListProductsResponse()
    for _ in range(LIST_PAGES_MAX):
        page = await client._call(SERVICE + "ListProducts", request, pb.ListProductsResponse)
        gathered.products.extend(page.products)
        gathered.next_page_token = page.next_page_token
        if not every_page or not page.next_page_token:
            return gathered
        request.page_token = page.next_page_token
    raise click.ClickException(f"stopped after {LIST_PAGES_MAX} pages; use a larger --page-size")


@catalog.command("list")
@click.option("--category", default="", help="only this category (e.g. fridge)")
@click.option("--brand", default="", help="only this brand, exactly as stored")
@click.option("--include-inactive", is_flag=True, help="also list deactivated products")
@click.option("--page-size", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--page-token", default="", help="continue from a previous page's token")
@click.option("--all", "every_page", is_flag=True, help="follow the pages to the end")
@json_option
@pass_settings
def list_products(
    settings: Settings,
    category: str,
    brand: str,
    include_inactive: bool,
    page_size: int,
    page_token: str,
    every_page: bool,
) -> None:
    """List products in GTIN order, one page (or --all)."""
    request = pb.ListProductsRequest(
        page_size=page_size,
        page_token=page_token,
        category=category,
        brand=brand,
        include_inactive=include_inactive,
    )
    response = run(settings, lambda client: list_pages(client, request, every_page))
    emit(settings, response, [product_row(product) for product in response.products])
    if response.next_page_token and not settings.json_output:
        click.echo(f"more: --page-token {response.next_page_token}", err=True)


@catalog.command("deactivate", short_help="Make a product ineligible.")
@click.argument("gtin")
@click.option("--reason", required=True, help="why, for the audit trail")
@json_option
@pass_settings
def deactivate(settings: Settings, gtin: str, reason: str) -> None:
    """Make a product ineligible: the next authorization of GTIN is declined PRODUCT_NOT_ELIGIBLE."""
    request = pb.DeactivateProductRequest(request_id=new_request_id(), gtin=gtin, reason=reason)

    async def action(client: SignedClient) -> pb.DeactivateProductResponse:
        return await client._call(SERVICE + "DeactivateProduct", request, pb.DeactivateProductResponse)

    response = run(settings, action)
    emit(settings, response, [{**product_row(response.product), "reference_version": response.reference_version}])


SECTION = GATEWAY
COMMANDS = (catalog,)
