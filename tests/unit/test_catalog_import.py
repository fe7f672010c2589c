"""Catalog import checking and file readers: every problem reported with its row, column and a
precise reason; CSV and XLSX read the way an operator sees them in a spreadsheet."""

from __future__ import annotations

from pathlib import Path

import openpyxl
import pytest

from server.domain.catalog_import import (
    REQUIRED_COLUMNS,
    ImportChecker,
    ProductRecord,
    RowError,
    check_rows,
    estimate_rows,
    read_csv,
    read_rows,
    read_xlsx,
)

COLUMNS = [*REQUIRED_COLUMNS, "active"]
GOOD = ["6970000000017", "Haier", "BCD-510", "fridge", "1", "459900", "yes", "true"]


def row(**changes: str) -> list[str]:
    values = dict(zip(COLUMNS, GOOD, strict=True))
    values.update(changes)
    return [values[column] for column in COLUMNS]


def test_a_good_row_becomes_a_product() -> None:
    """Every column is converted: trimmed text, integers, booleans."""
    check = check_rows(COLUMNS, [(2, ["  6970000000017 ", " Haier ", "BCD-510", "fridge", "1", "459900", "是", "否"])])
    assert check.errors == []
    assert check.products == [ProductRecord("6970000000017", "Haier", "BCD-510", "fridge", 1, 459_900, True, False)]
    assert (check.rows_received, check.rows_rejected) == (1, 0)


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("gtin", "6970000000018", "check digit should be 7, not 8"),
        ("gtin", "697000000001", "must be 13 digits, not 12"),
        ("gtin", "69700000000A7", "must contain only the digits 0-9"),
        ("gtin", "6.97E+12", "is in scientific notation, so digits were lost; format the column as text"),
        ("gtin", "", "is required"),
        ("brand", " ", "is required"),
        ("model", "M" * 129, "is longer than 128 characters"),
        ("model", "A\tB", "contains control characters (line breaks, tabs)"),
        ("category", "Fridge", "must be 1-32 characters of a-z, 0-9 and _ (for example air_conditioner)"),
        ("energy_grade", "one", "not an integer"),
        ("energy_grade", "6", "must be between 0 and 5"),
        ("energy_grade", "-1", "must be between 0 and 5"),
        ("energy_grade", "1.5", "not an integer"),
        ("reference_price_fen", "4599.00", "not an integer: amounts are whole fen, without a decimal point"),
        ("reference_price_fen", "459,900", "not an integer"),
        ("reference_price_fen", "10000000001", "must be between 0 and 10000000000"),
        ("serial_required", "maybe", "must be true/false, yes/no, 1/0 or 是/否"),
        ("serial_required", "", "is required"),
        ("active", "sometimes", "must be true/false, yes/no, 1/0 or 是/否"),
    ],
)
def test_each_bad_cell_is_reported_with_its_reason(column: str, value: str, reason: str) -> None:
    """A bad cell rejects its row with exactly one error naming the column and why."""
    check = check_rows(COLUMNS, [(7, row(**{column: value}))])
    assert check.errors == [RowError(7, column, reason)]
    assert (check.rows_rejected, check.products) == (1, [])


def test_every_problem_of_a_row_is_reported() -> None:
    """Problems are not reported one at a time: a row with three bad cells gets three errors."""
    check = check_rows(COLUMNS, [(3, row(gtin="6970000000018", energy_grade="9", serial_required="?"))])
    assert [error.column for error in check.errors] == ["gtin", "energy_grade", "serial_required"]
    assert check.rows_rejected == 1


@pytest.mark.parametrize(
    ("word", "value"),
    [(w, True) for w in ("true", "YES", "1", "是")] + [(w, False) for w in ("False", "no", "0", "否")],
)
def test_boolean_words(word: str, value: bool) -> None:
    """true/false, yes/no, 1/0 and 是/否 in any case."""
    check = check_rows(COLUMNS, [(2, row(serial_required=word))])
    assert check.products[0].serial_required is value


def test_an_empty_or_missing_active_cell_means_not_stated() -> None:
    """Without an ``active`` value the import does not decide (an existing product keeps its
    state), whether the column is absent or the cell empty."""
    without_column = check_rows(list(REQUIRED_COLUMNS), [(2, GOOD[:7])])
    empty_cell = check_rows(COLUMNS, [(2, row(active=" "))])
    assert without_column.products[0].active is None
    assert empty_cell.products[0].active is None


def test_duplicate_gtins_point_at_the_first_row_across_batches() -> None:
    """A GTIN seen before is rejected naming its first row, even when the rows arrive in
    different batches; the first occurrence stays good."""
    checker = ImportChecker(COLUMNS)
    checker.check(2, row())
    checker.check(3, row(gtin="6970000000024"))
    checker.check(9, row(model="other"))
    result = checker.result()
    assert result.errors == [RowError(9, "gtin", "duplicate GTIN in this file (first at row 2)")]
    assert [product.gtin for product in result.products] == ["6970000000017", "6970000000024"]


def test_header_problems_are_row_one() -> None:
    """A missing required column rejects every row without repeating itself per row; an
    unknown column is reported but its values are ignored; names are trimmed and case-blind."""
    columns = [" GTIN", "Brand", "model", "category", "energy_grade", "reference_price_fen", "colour"]
    check = check_rows(columns, [(2, [*GOOD[:6], "red"]), (3, [*GOOD[:6], "blue"])])
    assert check.errors == [
        RowError(1, "colour", "unknown column; known: " + ", ".join(COLUMNS)),
        RowError(1, "serial_required", "missing required column"),
    ]
    assert (check.rows_received, check.rows_rejected, check.products) == (2, 2, [])


def test_unknown_column_alone_still_reads_rows() -> None:
    """An unknown column is not fatal: rows are read (GOOD_ROWS applies them); the file is not
    clean, so an all-or-nothing import applies nothing."""
    check = check_rows([*COLUMNS, "notes"], [(2, [*row(), "a note"])])
    assert len(check.products) == 1
    assert not check.clean


def test_duplicate_column_is_fatal() -> None:
    """Two columns of the same name cannot be read either way."""
    check = check_rows([*COLUMNS, "brand"], [(2, [*row(), "Midea"])])
    assert RowError(1, "brand", "duplicate column (also column 2)") in check.errors
    assert check.products == []


def test_values_under_no_column() -> None:
    """Extra empty cells are fine (spreadsheets pad rows); a value past the header is not."""
    padded = check_rows([*COLUMNS, ""], [(2, [*row(), "", ""])])
    stray = check_rows(COLUMNS, [(4, [*row(), "", "stray"])])
    assert padded.errors == [] and len(padded.products) == 1
    assert stray.errors == [RowError(4, "", "has a value in column 10, which has no name in the header")]


def test_short_rows_report_the_missing_cells() -> None:
    """A row cut short reports each required cell it lacks."""
    check = check_rows(COLUMNS, [(5, GOOD[:5])])
    assert [(error.column, error.reason) for error in check.errors] == [
        ("reference_price_fen", "is required"),
        ("serial_required", "is required"),
    ]


def test_errors_are_capped_but_rejected_rows_counted() -> None:
    """At most errors_max errors are kept; rows_rejected still counts every bad row."""
    checker = ImportChecker(COLUMNS, errors_max=3)
    for number in range(2, 12):
        checker.check(number, row(energy_grade="x"))
    result = checker.result()
    assert (len(result.errors), result.errors_truncated, result.rows_rejected) == (3, True, 10)


def write_csv(path: Path, text: str, encoding: str) -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_with_bom_blank_lines_and_quoted_newline(tmp_path: Path) -> None:
    """UTF-8 with a byte-order mark (Excel's "CSV UTF-8"); blank lines are skipped but keep their
    number; a quoted value spanning lines is one row."""
    text = 'gtin,brand\r\n6970000000017,海尔\r\n\r\n6970000000024,"two\nlines"\r\n6970000000031,x\r\n'
    path = write_csv(tmp_path / "bom.csv", text, "utf-8-sig")
    assert list(read_csv(path)) == [
        (1, ["gtin", "brand"]),
        (2, ["6970000000017", "海尔"]),
        (4, ["6970000000024", "two\nlines"]),
        (5, ["6970000000031", "x"]),
    ]


def test_csv_in_gb18030(tmp_path: Path) -> None:
    """What Excel on a Chinese-locale Windows saves as "CSV (Comma delimited)" reads correctly."""
    path = write_csv(tmp_path / "gbk.csv", "gtin,brand\n6970000000017,美的\n", "gb18030")
    assert list(read_csv(path))[1] == (2, ["6970000000017", "美的"])


def test_xlsx_numbers_become_their_digits(tmp_path: Path) -> None:
    """A GTIN typed as a number (int or float) becomes its 13 digits, not 6.97e+12; integral
    floats lose their ".0"; booleans and empty cells become text; empty rows are skipped."""
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.append(COLUMNS)
    sheet.append([6970000000017, "Haier", "F1", "fridge", 1, 459900.0, True, None])
    sheet.append([])
    sheet.append([6970000000024.0, "Midea", 2.5, "fridge", 2.0, 1, False, "no"])
    path = tmp_path / "products.xlsx"
    workbook.save(path)
    assert list(read_xlsx(path)) == [
        (1, COLUMNS),
        (2, ["6970000000017", "Haier", "F1", "fridge", "1", "459900", "true", ""]),
        (4, ["6970000000024", "Midea", "2.5", "fridge", "2", "1", "false", "no"]),
    ]
    assert estimate_rows(path) == 3


def test_read_rows_picks_the_reader_by_extension(tmp_path: Path) -> None:
    """.csv and .xlsx are read; anything else is refused by name."""
    path = write_csv(tmp_path / "a.CSV", "gtin\n", "utf-8")
    assert list(read_rows(path)) == [(1, ["gtin"])]
    with pytest.raises(ValueError, match=r"expected a \.csv or \.xlsx file, not \.txt"):
        read_rows(tmp_path / "products.txt")


def test_the_shipped_examples() -> None:
    """examples/catalog/trade-in-products.csv is all good rows covering the programme's
    categories; mixed-errors.csv has good rows and deliberately bad ones."""
    examples = Path(__file__).resolve().parents[2] / "examples" / "catalog"
    rows = list(read_csv(examples / "trade-in-products.csv"))
    good = check_rows(rows[0][1], rows[1:])
    assert good.errors == [] and len(good.products) >= 12
    assert {product.category for product in good.products} >= {
        "fridge",
        "washer",
        "tv",
        "air_conditioner",
        "computer",
        "water_heater",
        "phone",
        "tablet",
        "smartwatch",
    }
    mixed_rows = list(read_csv(examples / "mixed-errors.csv"))
    mixed = check_rows(mixed_rows[0][1], mixed_rows[1:])
    assert mixed.products and mixed.errors
