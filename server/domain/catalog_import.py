"""Catalog import: raw rows (strings, as read from a CSV or XLSX file) checked into product
records, with every problem reported by row, column and reason.

Pure: nothing here touches a database or the network. The readers turn a file into
``(row_number, values)`` pairs with the header as row 1, the numbering an operator sees in a
spreadsheet, so that a reported row number points at the right line.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, NamedTuple

import openpyxl

from server.domain.gtin import gtin13_check_digit
from server.domain.reference import CATEGORY, PRICE_FEN_MAX

REQUIRED_COLUMNS = (
    "gtin",
    "brand",
    "model",
    "category",
    "energy_grade",
    "reference_price_fen",
    "serial_required",
)
OPTIONAL_COLUMNS = ("active",)
KNOWN_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
HEADER_ROW = 1
# Bounds on what one row may carry; a product name longer than this is a pasting accident.
COLUMNS_MAX = 32
TEXT_LENGTH_MAX = 128
ERRORS_MAX = 10_000
TRUE_WORDS = frozenset({"true", "yes", "1", "是"})
FALSE_WORDS = frozenset({"false", "no", "0", "否"})
INTEGER = re.compile(r"^[+-]?[0-9]{1,19}\Z")
DECIMAL = re.compile(r"^[+-]?[0-9]*\.[0-9]+\Z")
# What Excel writes into a CSV for a long number in a General-formatted cell: the digits past
# the fifteenth are gone, so the GTIN cannot be recovered from the file.
SCIENTIFIC = re.compile(r"^[0-9](\.[0-9]+)?[eE][+]?[0-9]+\Z")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class RowError:
    """One problem: the row's number in the file, the column (empty: the whole row), why."""

    row_number: int
    column: str
    reason: str


class ProductRecord(NamedTuple):
    """A checked row, in the column order of the import table (a tuple, so it can be copied to
    PostgreSQL as is). ``active`` is None when the file does not say: an existing product keeps
    its state and a new one is active, so a file without the column never reactivates a product
    an operator deactivated."""

    gtin: str
    brand: str
    model: str
    category: str
    energy_grade: int
    reference_price_fen: int
    serial_required: bool
    active: bool | None


@dataclass(frozen=True)
class ImportCheck:
    """What checking a whole file found."""

    rows_received: int
    rows_rejected: int
    products: list[ProductRecord]
    errors: list[RowError]
    errors_truncated: bool

    @property
    def clean(self) -> bool:
        """True when the file has no problem at all, header included."""
        return not self.errors


class CellError(ValueError):
    """A cell that cannot become its field; the message is the reason shown to the operator."""


def parse_gtin(text: str) -> str:
    value = text.strip()
    if not value:
        raise CellError("is required")
    if SCIENTIFIC.match(value):
        raise CellError("is in scientific notation, so digits were lost; format the column as text")
    if not (value.isascii() and value.isdigit()):
        raise CellError("must contain only the digits 0-9")
    if len(value) != 13:
        raise CellError(f"must be 13 digits, not {len(value)}")
    expected = gtin13_check_digit(value[:12])
    if int(value[12]) != expected:
        raise CellError(f"check digit should be {expected}, not {value[12]}")
    return value


def parse_text(text: str) -> str:
    value = text.strip()
    if not value:
        raise CellError("is required")
    if len(value) > TEXT_LENGTH_MAX:
        raise CellError(f"is longer than {TEXT_LENGTH_MAX} characters")
    if CONTROL.search(value):
        raise CellError("contains control characters (line breaks, tabs)")
    return value


def parse_category(text: str) -> str:
    value = text.strip()
    if not value:
        raise CellError("is required")
    if not CATEGORY.match(value):
        raise CellError("must be 1-32 characters of a-z, 0-9 and _ (for example air_conditioner)")
    return value


def parse_integer(text: str, low: int, high: int, unit: str = "") -> int:
    value = text.strip()
    if not value:
        raise CellError("is required")
    if not INTEGER.match(value):
        if unit and DECIMAL.match(value):
            # 4599.00 is most likely yuan; guessing would be a hundredfold error either way.
            raise CellError(f"not an integer: amounts are whole {unit}, without a decimal point")
        raise CellError("not an integer")
    number = int(value)
    if not low <= number <= high:
        raise CellError(f"must be between {low} and {high}")
    return number


def parse_grade(text: str) -> int:
    return parse_integer(text, 0, 5)


def parse_price(text: str) -> int:
    return parse_integer(text, 0, PRICE_FEN_MAX, unit="fen")


def parse_boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    if not value:
        raise CellError("is required")
    raise CellError("must be true/false, yes/no, 1/0 or 是/否")


def parse_active(text: str) -> bool | None:
    return None if not text.strip() else parse_boolean(text)


PARSERS = {
    "gtin": parse_gtin,
    "brand": parse_text,
    "model": parse_text,
    "category": parse_category,
    "energy_grade": parse_grade,
    "reference_price_fen": parse_price,
    "serial_required": parse_boolean,
    "active": parse_active,
}


def normalize_column(name: str) -> str:
    return name.strip().lstrip("\ufeff").strip().lower()


def check_columns(columns: Sequence[str]) -> tuple[dict[str, int], list[RowError], bool]:
    """Maps each known column to its position; returns the header's problems (row 1) and
    whether they are fatal (no row can be read: a required column missing or repeated). An
    unknown column is a problem but not fatal: its values are ignored, yet an all-or-nothing
    import refuses it, since it is most often a misspelt optional column."""
    positions: dict[str, int] = {}
    errors: list[RowError] = []
    fatal = False
    if len(columns) > COLUMNS_MAX:
        return {}, [RowError(HEADER_ROW, "", f"has {len(columns)} columns; at most {COLUMNS_MAX}")], True
    for index, raw in enumerate(columns):
        name = normalize_column(raw)
        if not name:
            continue  # Trailing empty header cells are common; values under them are checked per row.
        if name in positions:
            errors.append(RowError(HEADER_ROW, raw, f"duplicate column (also column {positions[name] + 1})"))
            fatal = True
        elif name not in KNOWN_COLUMNS:
            errors.append(RowError(HEADER_ROW, raw, f"unknown column; known: {', '.join(KNOWN_COLUMNS)}"))
        else:
            positions[name] = index
    for name in REQUIRED_COLUMNS:
        if name not in positions:
            errors.append(RowError(HEADER_ROW, name, "missing required column"))
            fatal = True
    return positions, errors, fatal


class ImportChecker:
    """Checks rows as they arrive (an import streams in batches) and remembers each GTIN's first
    row, so that a duplicate is caught across batches. Keeps at most ``errors_max`` errors but
    counts every rejected row."""

    def __init__(self, columns: Sequence[str], errors_max: int = ERRORS_MAX) -> None:
        if errors_max < 0:
            raise ValueError("errors_max must not be negative")
        self.errors_max = errors_max
        self.rows_received = 0
        self.rows_rejected = 0
        self.products: list[ProductRecord] = []
        self.errors: list[RowError] = []
        self.errors_truncated = False
        positions, header_errors, self._fatal = check_columns(columns)
        # Each field of ProductRecord in order, with its position in a row (None: no column).
        self._readers = [(name, positions.get(name), PARSERS[name]) for name in ProductRecord._fields]
        # Positions whose header cell is empty: a value there belongs to no column.
        self._unnamed = frozenset(index for index, name in enumerate(columns) if not normalize_column(name))
        self._width = len(columns)
        self._first_rows: dict[str, int] = {}
        self._note(header_errors)

    def check(self, row_number: int, values: Sequence[str]) -> None:
        self.rows_received += 1
        if self._fatal:
            # The header's errors already say why; repeating them for every row helps nobody.
            self.rows_rejected += 1
            return
        record, problems = self._parse(row_number, values)
        if record is None:
            self.rows_rejected += 1
            self._note(problems)
        else:
            self.products.append(record)

    def result(self) -> ImportCheck:
        return ImportCheck(
            rows_received=self.rows_received,
            rows_rejected=self.rows_rejected,
            products=self.products,
            errors=self.errors,
            errors_truncated=self.errors_truncated,
        )

    def _note(self, problems: Iterable[RowError]) -> None:
        for problem in problems:
            if len(self.errors) < self.errors_max:
                self.errors.append(problem)
            else:
                self.errors_truncated = True

    def _parse(self, row_number: int, values: Sequence[str]) -> tuple[ProductRecord | None, list[RowError]]:
        # The hot loop of an import (100,000 rows took 1.9-2.7 s on a busy 2-core machine): one
        # pass over the fields, no dicts.
        problems = self._check_width(row_number, values)
        fields: list[Any] = []
        for name, position, parse in self._readers:
            text = values[position] if position is not None and position < len(values) else ""
            try:
                fields.append(parse(text))
            except CellError as error:
                problems.append(RowError(row_number, name, str(error)))
                fields.append(None)
        gtin = fields[0]  # ProductRecord's first field
        if gtin is not None:
            first = self._first_rows.setdefault(gtin, row_number)
            if first != row_number:
                problems.append(RowError(row_number, "gtin", f"duplicate GTIN in this file (first at row {first})"))
        if problems:
            return None, problems
        return ProductRecord._make(fields), []

    def _check_width(self, row_number: int, values: Sequence[str]) -> list[RowError]:
        """A value under no column is refused; empty cells there are fine (spreadsheets pad)."""
        if len(values) <= self._width and not self._unnamed:
            return []
        for index, value in enumerate(values):
            if (index >= self._width or index in self._unnamed) and value.strip():
                return [RowError(row_number, "", f"has a value in column {index + 1}, which has no name in the header")]
        return []


def check_rows(columns: Sequence[str], rows: Iterable[tuple[int, Sequence[str]]]) -> ImportCheck:
    """Checks a whole file's rows at once (the header's column names, then the data rows)."""
    checker = ImportChecker(columns)
    for row_number, values in rows:
        checker.check(row_number, values)
    return checker.result()


# Readers.


def detect_encoding(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """UTF-8 (with or without a byte-order mark), else GB18030: what Excel on a Chinese-locale
    Windows writes for "CSV (Comma delimited)". One streaming pass, so a large file is never
    held in memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as handle:
        try:
            while chunk := handle.read(chunk_bytes):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "gb18030"
    return "utf-8-sig"


def is_blank(values: Sequence[str]) -> bool:
    return not any(value.strip() for value in values)


def read_csv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yields (row_number, values) with the header as row 1; blank lines are skipped but keep
    their number. A quoted value spanning lines is one row, as in a spreadsheet."""
    encoding = detect_encoding(path)
    with path.open(newline="", encoding=encoding) as handle:
        for row_number, values in enumerate(csv.reader(handle), start=1):
            if row_number == HEADER_ROW or not is_blank(values):
                yield row_number, values


def cell_text(value: object) -> str:
    """An XLSX cell as the text an operator sees. A GTIN typed as a number arrives as an int or
    a float (6970000000017.0); it must become its 13 digits, not "6.970000000017e+12"."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Below 2**53 an integral float is exact, so int() recovers every digit of a GTIN.
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)


def read_xlsx(path: Path) -> Iterator[tuple[int, list[str]]]:
    """The first worksheet's rows, streamed (read-only mode), with cached formula results."""
    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        sheet = workbook.worksheets[0]
        for row_number, cells in enumerate(sheet.iter_rows(values_only=True), start=1):
            values = [cell_text(cell) for cell in cells]
            if row_number == HEADER_ROW or not is_blank(values):
                yield row_number, values
    finally:
        workbook.close()


def read_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """CSV or XLSX, by the file's extension."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path)
    if suffix in (".xlsx", ".xlsm"):
        return read_xlsx(path)
    raise ValueError(f"expected a .csv or .xlsx file, not {suffix or 'a file without an extension'}")


def estimate_rows(path: Path) -> int | None:
    """Data rows in the file, for a progress bar: the line count of a CSV (exact unless a value
    spans lines), the recorded dimension of an XLSX sheet (None when the file has none)."""
    if path.suffix.lower() == ".csv":
        with path.open("rb") as handle:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
        return max(lines - 1, 0)
    workbook = openpyxl.load_workbook(path, read_only=True)
    try:
        rows = workbook.worksheets[0].max_row
    finally:
        workbook.close()
    return max(rows - 1, 0) if isinstance(rows, int) else None
