"""CatalogService and `subsidyctl catalog` against a real gateway, PostgreSQL and Redis: imports
apply exactly what their mode says and report every bad row, re-imports change nothing, a
deactivated product is declined on the next authorization, paging is exact, terminals are kept
out.

The module runs its own database and key prefix (its imports would otherwise change the
catalog the other modules' tests rely on)."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import openpyxl
import pytest
from click.testing import CliRunner
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, RetryPolicy, SignedClient
from subsidy_client.errors import IdempotencyConflict, InvalidArgument, NotFound, PermissionDenied
from subsidy_client.v1 import authorization_pb2
from subsidy_client.v1 import catalog_pb2 as pb

from server.ctl import main as subsidyctl
from server.domain.catalog_import import REQUIRED_COLUMNS, read_csv, read_xlsx
from server.domain.gtin import gtin13_check_digit
from server.processes.app import Application
from storage.devenv import Services
from tests.conftest import ROOT, Environment, consumer_key, isolated_environment, running_gateway, serial

SERVICE = "/subsidy.v1.CatalogService/"
COLUMNS = [*REQUIRED_COLUMNS, "active"]
GOOD_ROWS, ALL_OR_NOTHING = pb.IMPORT_MODE_GOOD_ROWS, pb.IMPORT_MODE_ALL_OR_NOTHING


def gtin(series: int, number: int) -> str:
    """A valid GTIN-13; each test uses its own series so the module's tests stay independent."""
    first_twelve = f"69{series:03d}{number:07d}"
    return first_twelve + str(gtin13_check_digit(first_twelve))


def wrong_check_digit(value: str) -> str:
    return value[:12] + str((int(value[12]) + 1) % 10)


@pytest.fixture(scope="module")
async def catalog_env(services: Services) -> AsyncIterator[tuple[Environment, Application]]:
    async with isolated_environment(services) as env, running_gateway(env.config()) as application:
        yield env, application


@pytest.fixture(scope="module")
def env(catalog_env: tuple[Environment, Application]) -> Environment:
    return catalog_env[0]


@pytest.fixture(scope="module")
def target(catalog_env: tuple[Environment, Application]) -> str:
    return f"127.0.0.1:{catalog_env[1].port}"


@pytest.fixture(scope="module")
async def operator(env: Environment, target: str) -> AsyncIterator[SignedClient]:
    client = SignedClient(target, "op-auditor", env.credentials["op-auditor"], deadline_s=30.0)
    yield client
    await client.close()


@pytest.fixture(scope="module")
async def terminal(env: Environment, target: str) -> AsyncIterator[AuthorizationClient]:
    client = AuthorizationClient(
        target, "t-main-01", env.credentials["t-main-01"], deadline_s=5.0, retry=RetryPolicy(max_attempts=1)
    )
    yield client
    await client.close()


@pytest.fixture(scope="module")
async def pg(env: Environment) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(env.pg_dsn, timeout=10)
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
async def cache(env: Environment) -> AsyncIterator[Redis]:
    client = Redis.from_url(env.redis_url, decode_responses=True)
    yield client
    await client.aclose()


def import_messages(
    columns: Sequence[str],
    rows: Sequence[tuple[int, Sequence[str]]],
    mode: pb.ImportMode.ValueType = GOOD_ROWS,
    request_id: str | None = None,
    batch_rows: int = 5_000,
) -> list[pb.ImportProductsRequest]:
    header = pb.ImportHeader(
        request_id=request_id or str(uuid.uuid4()),
        mode=mode,
        source_name="test-file.csv",
        columns=list(columns),
    )
    messages = [pb.ImportProductsRequest(header=header)]
    for start in range(0, len(rows), batch_rows):
        batch = [pb.ImportRow(row_number=number, values=list(values)) for number, values in rows[start:][:batch_rows]]
        messages.append(pb.ImportProductsRequest(rows=pb.ImportRowBatch(rows=batch)))
    return messages


async def send(client: SignedClient, messages: Sequence[pb.ImportProductsRequest]) -> pb.ImportProductsResponse:
    return await client._stream_call(SERVICE + "ImportProducts", messages, pb.ImportProductsResponse, 120.0)


async def import_file(
    client: SignedClient,
    rows: list[tuple[int, list[str]]],
    mode: pb.ImportMode.ValueType = GOOD_ROWS,
    request_id: str | None = None,
) -> pb.ImportProductsResponse:
    """Sends rows as read from a file (the header first) the way subsidyctl does."""
    return await send(client, import_messages(rows[0][1], rows[1:], mode, request_id))


def errors_of(response: pb.ImportProductsResponse) -> list[tuple[int, str, str]]:
    return [(error.row_number, error.column, error.reason) for error in response.errors]


async def stored(pg: asyncpg.Connection, gtins: Sequence[str]) -> dict[str, asyncpg.Record]:
    rows = await pg.fetch("SELECT * FROM products WHERE gtin = ANY($1::text[])", list(gtins))
    return {row["gtin"]: row for row in rows}


async def cached(cache: Redis, env: Environment, gtins: Sequence[str]) -> dict[str, dict[str, str]]:
    """The hot path's product hashes; products absent from Redis are left out."""
    async with cache.pipeline(transaction=False) as pipe:
        for value in gtins:
            pipe.hgetall(env.keys.product(value))
        found = await pipe.execute()
    return {value: fields for value, fields in zip(gtins, found, strict=True) if fields}


def mixed_rows(series: int) -> tuple[list[list[str]], list[str], list[tuple[int, str, str]]]:
    """A file's rows (header first) with three good rows and five bad ones; the good GTINs; the
    errors expected (row, column, reason)."""
    good = [gtin(series, number) for number in (1, 2, 3)]
    rows = [
        COLUMNS,
        [good[0], "Haier", "BCD-510", "fridge", "1", "459900", "yes", "yes"],
        [wrong_check_digit(gtin(series, 4)), "Midea", "MG100", "washer", "1", "199900", "no", "yes"],
        [good[1], "Gree", "KFR-35", "air_conditioner", "2", "369900", "是", ""],
        [gtin(series, 5), "TCL", "75T7H", "tv", "7", "599900", "no", "yes"],
        [gtin(series, 6), "Hisense", "65E3H", "tv", "1", "3299.00", "no", "yes"],
        [gtin(series, 7), "Xiaomi", "Note 13", "phone", "0", "129900", "maybe", "yes"],
        [good[0], "Haier", "BCD-510 again", "fridge", "1", "459900", "yes", "yes"],
        [good[2], "Huawei", "Mate 60", "phone", "0", "599900", "1", "1"],
    ]
    expected = [
        (3, "gtin", f"check digit should be {gtin(series, 4)[12]}, not {wrong_check_digit(gtin(series, 4))[12]}"),
        (5, "energy_grade", "must be between 0 and 5"),
        (6, "reference_price_fen", "not an integer: amounts are whole fen, without a decimal point"),
        (7, "serial_required", "must be true/false, yes/no, 1/0 or 是/否"),
        (8, "gtin", "duplicate GTIN in this file (first at row 2)"),
    ]
    return rows, good, expected


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


async def test_csv_import_of_good_rows_applies_exactly_the_good_rows(
    operator: SignedClient, pg: asyncpg.Connection, cache: Redis, env: Environment, tmp_path: Path
) -> None:
    """GOOD_ROWS: every bad row is reported with its column and reason, the good rows (and only
    they) are in PostgreSQL and published to Redis."""
    rows, good, expected = mixed_rows(101)
    response = await import_file(operator, list(read_csv(write_csv(tmp_path / "mixed.csv", rows))))
    assert errors_of(response) == expected
    assert (response.rows_received, response.rows_rejected, response.applied) == (8, 5, True)
    assert (response.created, response.updated, response.unchanged, response.replayed) == (3, 0, 0, False)
    every_gtin = [row[0] for row in rows[1:]]
    assert sorted(await stored(pg, every_gtin)) == sorted(good)
    assert sorted(await cached(cache, env, every_gtin)) == sorted(good)
    assert (await cached(cache, env, [good[1]]))[good[1]] == {
        "active": "1",
        "category": "air_conditioner",
        "grade": "2",
        "reference_price_fen": "369900",
        "serial_required": "1",
    }
    audit = await pg.fetchrow(
        "SELECT * FROM operator_actions WHERE operator_id = 'op-auditor' AND action LIKE '%ImportProducts'"
        " ORDER BY action_id DESC LIMIT 1"
    )
    assert (audit["target_kind"], audit["target_id"]) == ("catalog", "test-file.csv")
    assert json.loads(audit["details"])["created"] == 3


async def test_xlsx_import_all_or_nothing_writes_nothing_until_the_file_is_clean(
    operator: SignedClient, pg: asyncpg.Connection, cache: Redis, env: Environment, tmp_path: Path
) -> None:
    """ALL_OR_NOTHING with one bad row applies nothing (PostgreSQL and Redis untouched) and
    reports the same errors; once the bad rows are fixed the whole file is applied. GTINs typed
    as numbers in Excel arrive as their 13 digits."""
    rows, good, expected = mixed_rows(102)
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    for index, row in enumerate(rows):
        as_number = index > 0 and row[0].isdigit()
        sheet.append([int(row[0]) if as_number else row[0], *row[1:]])
    path = tmp_path / "mixed.xlsx"
    workbook.save(path)
    every_gtin = [row[0] for row in rows[1:]]

    refused = await import_file(operator, list(read_xlsx(path)), ALL_OR_NOTHING)
    assert errors_of(refused) == expected
    assert (refused.rows_received, refused.rows_rejected, refused.applied, refused.created) == (8, 5, False, 0)
    assert await stored(pg, every_gtin) == {}
    assert await cached(cache, env, every_gtin) == {}

    clean = [row for index, row in enumerate(rows) if index + 1 not in {number for number, _, _ in expected}]
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    for index, row in enumerate(clean):
        sheet.append([int(row[0]) if index else row[0], *row[1:]])
    workbook.save(path)
    applied = await import_file(operator, list(read_xlsx(path)), ALL_OR_NOTHING)
    assert (errors_of(applied), applied.applied, applied.created) == ([], True, 3)
    assert sorted(await stored(pg, every_gtin)) == sorted(good)
    assert sorted(await cached(cache, env, every_gtin)) == sorted(good)


async def test_reimport_changes_nothing_and_a_replay_returns_the_stored_answer(
    operator: SignedClient, pg: asyncpg.Connection, cache: Redis, env: Environment
) -> None:
    """The same file again: everything unchanged, updated_at and the Redis hashes untouched; one
    changed row is the only update. The same request_id again returns the first answer
    (replayed); with other rows it is an idempotency conflict."""
    rows = [
        [str(x) for x in (gtin(103, n), "Midea", f"M{n}", "washer", n % 6, 100_000 + n, "no", "yes")] for n in range(40)
    ]
    file_rows: list[tuple[int, list[str]]] = [
        (1, COLUMNS),
        *((number, row) for number, row in enumerate(rows, start=2)),
    ]
    gtins = [row[0] for row in rows]
    first = await import_file(operator, file_rows)
    assert (first.created, first.updated, first.unchanged) == (40, 0, 0)
    before_pg = {key: row["updated_at"] for key, row in (await stored(pg, gtins)).items()}
    before_redis = await cached(cache, env, gtins)
    actions_before = await pg.fetchval("SELECT count(*) FROM operator_actions")

    again = await import_file(operator, file_rows)
    assert (again.applied, again.created, again.updated, again.unchanged, errors_of(again)) == (True, 0, 0, 40, [])
    assert {key: row["updated_at"] for key, row in (await stored(pg, gtins)).items()} == before_pg
    assert await cached(cache, env, gtins) == before_redis
    assert await pg.fetchval("SELECT count(*) FROM unpublished_changes") == 0

    changed_rows = [*file_rows[:5], (6, [*rows[4][:5], "123456", *rows[4][6:]]), *file_rows[6:]]
    request_id = str(uuid.uuid4())
    changed = await import_file(operator, changed_rows, request_id=request_id)
    assert (changed.created, changed.updated, changed.unchanged) == (0, 1, 39)
    after_pg = await stored(pg, gtins)
    assert [key for key in gtins if after_pg[key]["updated_at"] != before_pg[key]] == [gtins[4]]
    assert (await cached(cache, env, [gtins[4]]))[gtins[4]]["reference_price_fen"] == "123456"

    replayed = await import_file(operator, changed_rows, request_id=request_id)
    assert replayed.replayed
    assert (replayed.rows_received, replayed.created, replayed.updated, replayed.unchanged) == (40, 0, 1, 39)
    with pytest.raises(IdempotencyConflict):
        await import_file(operator, file_rows, request_id=request_id)
    # One audit row per import that acted (again, changed); none for the replay or the conflict.
    assert await pg.fetchval("SELECT count(*) FROM operator_actions") == actions_before + 2


async def test_unchanged_reimport_and_rejected_import_do_not_bump_the_reference_version(
    operator: SignedClient, pg: asyncpg.Connection, cache: Redis, env: Environment
) -> None:
    """Issue 10, item 12: an import that changes no product (the same file again, or an
    all-or-nothing file refused for one bad row) is audited but bumps neither the PostgreSQL
    reference version nor the Redis one (which makes every process reload), and answers with
    the current version. A real change still bumps both."""
    rows = [[gtin(110, n), "Gree", f"G{n}", "air_conditioner", "1", str(300_000 + n), "no", "yes"] for n in range(5)]
    file_rows: list[tuple[int, list[str]]] = [(1, COLUMNS), *((number, row) for number, row in enumerate(rows, 2))]
    first = await import_file(operator, file_rows)
    assert first.created == 5

    async def versions() -> tuple[int, str | None]:
        return await pg.fetchval("SELECT version FROM reference_version"), await cache.get(env.keys.reference_version)

    before = await versions()
    assert first.reference_version == before[0]
    actions_before = await pg.fetchval("SELECT count(*) FROM operator_actions")

    again = await import_file(operator, file_rows)
    assert (again.applied, again.unchanged, again.reference_version) == (True, 5, before[0])
    assert await versions() == before

    bad = [*file_rows, (7, [wrong_check_digit(gtin(110, 9)), "Gree", "G9", "air_conditioner", "1", "1", "no", "yes"])]
    changed_but_refused = [bad[0], (2, [*rows[0][:5], "999999", *rows[0][6:]]), *bad[2:]]
    refused = await import_file(operator, changed_but_refused, ALL_OR_NOTHING)
    assert (refused.applied, refused.rows_rejected, refused.reference_version) == (False, 1, before[0])
    assert await versions() == before
    assert (await cached(cache, env, [rows[0][0]]))[rows[0][0]]["reference_price_fen"] == rows[0][5]
    # Both were audited all the same.
    assert await pg.fetchval("SELECT count(*) FROM operator_actions") == actions_before + 2

    changed = await import_file(operator, changed_but_refused[:-1], ALL_OR_NOTHING)
    assert (changed.applied, changed.updated) == (True, 1)
    after = await versions()
    assert after[0] == before[0] + 1 and changed.reference_version == after[0]
    assert int(after[1] or 0) > int(before[1] or 0)


async def test_a_deactivated_product_is_declined_on_the_next_authorization(
    operator: SignedClient, terminal: AuthorizationClient, pg: asyncpg.Connection, cache: Redis, env: Environment
) -> None:
    """Import a fridge, authorize it (approved), deactivate it: the next authorization is declined
    PRODUCT_NOT_ELIGIBLE. The deactivation is audited with its reason, replays safely, and a later
    import that does not state ``active`` does not bring the product back."""
    fridge = gtin(104, 1)
    file_rows: list[tuple[int, list[str]]] = [
        (1, list(REQUIRED_COLUMNS)),
        (2, [fridge, "Haier", "BCD-470", "fridge", "1", "459900", "no"]),
    ]
    assert (await import_file(operator, file_rows)).created == 1

    async def authorize() -> authorization_pb2.AuthorizeResponse:
        line = Line("1", fridge, 300_000, serial())
        return await terminal.authorize(campaign_id="c-main", consumer_key=consumer_key(), lines=[line])

    assert (await authorize()).decision == authorization_pb2.DECISION_APPROVED

    request = pb.DeactivateProductRequest(request_id=str(uuid.uuid4()), gtin=fridge, reason="energy label revoked")
    response = await operator._call(SERVICE + "DeactivateProduct", request, pb.DeactivateProductResponse)
    assert (response.product.gtin, response.product.active) == (fridge, False)
    assert response.reference_version > 0
    assert (await cached(cache, env, [fridge]))[fridge]["active"] == "0"

    declined = await authorize()
    assert declined.decision == authorization_pb2.DECISION_DECLINED
    assert declined.decline_reason == authorization_pb2.DECLINE_REASON_PRODUCT_NOT_ELIGIBLE

    replay = await operator._call(SERVICE + "DeactivateProduct", request, pb.DeactivateProductResponse)
    assert replay.product.active is False
    details = await pg.fetch(
        "SELECT details FROM operator_actions WHERE target_kind = 'product' AND target_id = $1", fridge
    )
    assert [json.loads(row["details"])["reason"] for row in details] == ["energy label revoked"]

    reimported = await import_file(operator, file_rows)
    assert (reimported.unchanged, (await stored(pg, [fridge]))[fridge]["active"]) == (1, False)
    assert (await authorize()).decline_reason == authorization_pb2.DECLINE_REASON_PRODUCT_NOT_ELIGIBLE


async def test_get_and_deactivate_name_what_is_wrong(operator: SignedClient) -> None:
    """GetProduct and DeactivateProduct validate the GTIN and the reason; an unknown product is
    NOT_FOUND."""
    with pytest.raises(InvalidArgument) as bad_gtin:
        await operator._call(SERVICE + "GetProduct", pb.GetProductRequest(gtin="123"), pb.GetProductResponse)
    assert bad_gtin.value.metadata["field"] == "gtin"
    with pytest.raises(NotFound):
        await operator._call(SERVICE + "GetProduct", pb.GetProductRequest(gtin=gtin(105, 1)), pb.GetProductResponse)
    request = pb.DeactivateProductRequest(request_id=str(uuid.uuid4()), gtin="6970000000017", reason=" ")
    with pytest.raises(InvalidArgument) as no_reason:
        await operator._call(SERVICE + "DeactivateProduct", request, pb.DeactivateProductResponse)
    assert no_reason.value.metadata["field"] == "reason"
    request = pb.DeactivateProductRequest(request_id=str(uuid.uuid4()), gtin=gtin(105, 1), reason="gone")
    with pytest.raises(NotFound):
        await operator._call(SERVICE + "DeactivateProduct", request, pb.DeactivateProductResponse)


async def test_a_terminal_is_refused_every_catalog_method(env: Environment, target: str) -> None:
    """Catalog methods are for operator credentials: a terminal's signed calls get
    PERMISSION_DENIED, the import before any row is read."""
    async with SignedClient(target, "t-main-01", env.credentials["t-main-01"]) as client:
        calls = [
            client._call(SERVICE + "GetProduct", pb.GetProductRequest(gtin="6970000000017"), pb.GetProductResponse),
            client._call(SERVICE + "ListProducts", pb.ListProductsRequest(), pb.ListProductsResponse),
            client._call(
                SERVICE + "DeactivateProduct",
                pb.DeactivateProductRequest(request_id=str(uuid.uuid4()), gtin="6970000000017", reason="x"),
                pb.DeactivateProductResponse,
            ),
            send(client, import_messages(COLUMNS, [(2, ["6970000000017", "a", "b", "fridge", "1", "1", "no", "no"])])),
        ]
        for call in calls:
            with pytest.raises(PermissionDenied):
                await call


async def list_every_page(client: SignedClient, **filters: Any) -> tuple[list[str], int]:
    """Every GTIN listed, following the page tokens; and how many pages it took."""
    listed: list[str] = []
    request = pb.ListProductsRequest(**filters)
    for pages in range(1, 1_000):
        page = await client._call(SERVICE + "ListProducts", request, pb.ListProductsResponse)
        listed += [product.gtin for product in page.products]
        if not page.next_page_token:
            return listed, pages
        request.page_token = page.next_page_token
    raise AssertionError("paging did not end")


async def test_paging_returns_every_product_exactly_once(operator: SignedClient, pg: asyncpg.Connection) -> None:
    """Pages in GTIN order cover the catalog exactly once, with each filter; page sizes are
    bounded and a forged token is refused."""
    rows = [
        [
            gtin(106, n),
            "PageBrand" if n % 3 else "OtherBrand",
            f"P{n}",
            "tablet",
            "0",
            "100000",
            "yes",
            "no" if n % 5 == 0 else "yes",
        ]
        for n in range(1, 251)
    ]
    assert (await import_file(operator, [(1, COLUMNS), *enumerate(rows, start=2)])).created == 250

    everything = [row["gtin"] for row in await pg.fetch("SELECT gtin FROM products ORDER BY gtin")]
    listed, pages = await list_every_page(operator, page_size=7, include_inactive=True)
    assert listed == everything
    assert pages == -(-len(everything) // 7)

    active_tablets = sorted(row[0] for row in rows if row[7] == "yes")
    assert (await list_every_page(operator, page_size=9, category="tablet"))[0] == active_tablets
    branded = sorted(row[0] for row in rows if row[1] == "PageBrand")
    assert (await list_every_page(operator, brand="PageBrand", include_inactive=True))[0] == branded
    assert (await list_every_page(operator, page_size=1000, include_inactive=True))[0] == everything

    for request, field in [
        (pb.ListProductsRequest(page_size=1001), "page_size"),
        (pb.ListProductsRequest(page_size=-1), "page_size"),
        (pb.ListProductsRequest(page_token="bm90IGEgZ3Rpbg=="), "page_token"),
        (pb.ListProductsRequest(page_token="%%%"), "page_token"),
        (pb.ListProductsRequest(category="Tablet"), "category"),
    ]:
        with pytest.raises(InvalidArgument) as refused:
            await operator._call(SERVICE + "ListProducts", request, pb.ListProductsResponse)
        assert refused.value.metadata["field"] == field


async def test_malformed_import_streams_are_refused_and_write_nothing(
    operator: SignedClient, pg: asyncpg.Connection
) -> None:
    """A stream that breaks the protocol (no header first, unknown mode, oversized batch, row
    numbers going back, a second header, a bad request id) is INVALID_ARGUMENT naming the field,
    and nothing is written."""
    good_row = [gtin(107, 1), "Haier", "F1", "fridge", "1", "100", "no", "yes"]
    header_first = import_messages(COLUMNS, [(2, good_row)])
    oversized = import_messages(COLUMNS, [(number, good_row) for number in range(2, 5_003)], batch_rows=5_001)
    backwards = import_messages(COLUMNS, [(3, good_row), (2, good_row)])
    cases = [
        ("header", header_first[1:]),
        ("header", []),
        ("header.mode", import_messages(COLUMNS, [(2, good_row)], mode=pb.IMPORT_MODE_UNSPECIFIED)),
        ("header.mode", import_messages(COLUMNS, [(2, good_row)], mode=pb.ImportMode.ValueType(9))),
        ("header.request_id", import_messages(COLUMNS, [(2, good_row)], request_id="not-a-uuid")),
        ("header.columns", import_messages([], [(2, good_row)])),
        ("rows.rows", oversized),
        ("rows.row_number", backwards),
        ("rows.row_number", import_messages(COLUMNS, [(1, good_row)])),
        ("header", [*header_first, header_first[0]]),
    ]
    actions_before = await pg.fetchval("SELECT count(*) FROM operator_actions")
    for field, messages in cases:
        with pytest.raises(InvalidArgument) as refused:
            await send(operator, messages)
        assert refused.value.metadata["field"] == field, field
    assert await stored(pg, [good_row[0]]) == {}
    assert await pg.fetchval("SELECT count(*) FROM operator_actions") == actions_before


async def test_twenty_thousand_rows_in_batches(
    operator: SignedClient, pg: asyncpg.Connection, cache: Redis, env: Environment
) -> None:
    """The batching path: 20,000 rows in four batches of 5,000 are all written and published
    (not a timing test; see the report for the 100,000-row measurement)."""
    rows = [
        (number + 2, [gtin(108, number), "Bulk", f"B{number}", "washer", str(number % 6), "250000", "no", "yes"])
        for number in range(20_000)
    ]
    response = await send(operator, import_messages(COLUMNS, rows, batch_rows=5_000))
    assert (response.rows_received, response.created, errors_of(response)) == (20_000, 20_000, [])
    gtins = [values[0] for _, values in rows]
    assert len(await stored(pg, gtins)) == 20_000
    assert await cache.exists(*(env.keys.product(value) for value in gtins)) == 20_000
    assert await pg.fetchval("SELECT count(*) FROM unpublished_changes") == 0


async def subsidyctl_process(env: Environment, target: str, *arguments: str) -> tuple[int, str, str]:
    """Runs subsidyctl in its own process, as an operator would, with the credential in the
    environment."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from server.ctl import main; main()",
        *arguments,
        cwd=ROOT,
        env={
            **os.environ,
            "SUBSIDYCTL_TARGET": target,
            "SUBSIDYCTL_OPERATOR": "op-auditor",
            "SUBSIDYCTL_SECRET": env.credentials["op-auditor"],
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_subsidyctl_catalog_commands(env: Environment, target: str, pg: asyncpg.Connection) -> None:
    """`subsidyctl catalog import` of the shipped examples (exit 0 when clean; exit 1 listing every
    bad row otherwise), then list, get and deactivate."""
    examples = ROOT / "examples" / "catalog"
    code, out, _ = await subsidyctl_process(env, target, "catalog", "import", str(examples / "trade-in-products.csv"))
    assert code == 0, out
    assert out.splitlines()[0].split()[:6] == ["RECEIVED", "REJECTED", "APPLIED", "CREATED", "UPDATED", "UNCHANGED"]
    assert out.splitlines()[1].split()[:6] == ["13", "0", "yes", "13", "0", "0"]

    code, out, _ = await subsidyctl_process(
        env, target, "catalog", "import", "--good-rows", str(examples / "mixed-errors.csv")
    )
    assert code == 1
    for expected in ("check digit should be", "must be between 0 and 5", "not an integer", "是/否", "first at row 2"):
        assert expected in out, expected
    assert "scientific notation" in out

    code, out, _ = await subsidyctl_process(env, target, "--json", "catalog", "list", "--category", "fridge", "--all")
    assert code == 0
    listed = [product["gtin"] for product in json.loads(out)["products"]]
    assert {"6920531001014", "6920531002028", "6920531099035"} <= set(listed)

    code, out, _ = await subsidyctl_process(env, target, "catalog", "get", "6920531011044")
    assert code == 0 and "Mate 60" in out
    code, out, _ = await subsidyctl_process(
        env, target, "catalog", "deactivate", "6920531011044", "--reason", "recalled", "--json"
    )
    assert code == 0 and json.loads(out)["product"]["active"] is False
    assert await pg.fetchval("SELECT active FROM products WHERE gtin = '6920531011044'") is False


async def test_subsidyctl_import_of_a_file_that_breaks_midway_commits_nothing(
    env: Environment, target: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """A file unreadable after its first batch was sent (a 200,000-character cell, over the csv
    module's limit) cancels the stream: exit 1 naming the problem, no product written, no import
    recorded."""
    rows = [COLUMNS] + [[gtin(109, n), "Haier", f"F{n}", "fridge", "1", "100000", "no", "yes"] for n in range(5_100)]
    rows.append([gtin(109, 5_100), "Haier", "x" * 200_000, "fridge", "1", "100000", "no", "yes"])
    path = write_csv(tmp_path / "broken.csv", rows)
    actions_before = await pg.fetchval("SELECT count(*) FROM operator_actions")
    code, _, err = await subsidyctl_process(env, target, "catalog", "import", "--good-rows", str(path))
    assert code == 1
    assert "cannot read" in err and "field larger than field limit" in err
    assert await stored(pg, [row[0] for row in rows[1:]]) == {}
    assert await pg.fetchval("SELECT count(*) FROM operator_actions") == actions_before


@pytest.mark.parametrize("command", ["import", "get", "list", "deactivate"])
def test_subsidyctl_catalog_help(command: str) -> None:
    """Every catalog command explains itself without a credential or a server."""
    result = CliRunner().invoke(subsidyctl, ["catalog", command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output
