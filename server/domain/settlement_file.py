"""A payment channel's daily settlement file, read line by line into checked channel lines,
with every problem reported by line, column and reason (docs/reconciliation.md).

Pure: nothing here touches a database or the network. The file is comma-separated text; a
``ColumnMapping`` says which of its columns hold what (the documented standard format, or a
real acquirer's or wallet's bill: Chinese headers, a backtick before each value so spreadsheets
keep long digit strings as text, yuan with two decimals, a summary header and line at the end).
Amounts become integer fen exactly (decimal text to integer, never through a float); a value
with more than two decimals is refused. Line numbers are the file's physical lines (the header
is line 1), the numbering an operator sees in an editor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from server.domain.validation import AUTHORIZATION_ID, CHANNEL_REFERENCE

PAYMENT, REFUND = "PAYMENT", "REFUND"
FEN, YUAN = "FEN", "YUAN"
ISO8601 = "ISO8601"
# Bounds: an amount above 10^12 fen (10 billion yuan) in one line is a corrupt file.
AMOUNT_FEN_MAX = 10**12
LINE_FIELDS_MAX = 64
FIELD_LENGTH_MAX = 256
FEN_PATTERN = re.compile(r"[0-9]{1,13}")
YUAN_PATTERN = re.compile(r"([0-9]{1,11})(?:\.([0-9]{1,2}))?")
CHANNEL_NAME = re.compile(r"[a-z0-9_-]{1,64}")


class FileRefused(Exception):
    """The file as a whole cannot be read (no header, a mapped column missing, summary totals
    that disagree with the lines): nothing of it is imported, in any mode."""

    def __init__(self, line_number: int, column: str, reason: str) -> None:
        super().__init__(f"line {line_number}" + (f", column {column}" if column else "") + f": {reason}")
        self.line_number = line_number
        self.column = column
        self.reason = reason


@dataclass(frozen=True)
class LineError:
    """One problem: the line's number in the file, the column's name (empty: the whole line), why."""

    line_number: int
    column: str
    reason: str


@dataclass(frozen=True)
class ColumnMapping:
    """Which column holds what, and how values are written. The defaults are the documented
    standard format: ``channel_txn_id,authorization_id,captured_fen,subsidy_fen,refund_fen,time,status``."""

    name: str = "standard"
    channel_txn_id: str = "channel_txn_id"
    authorization_id: str = "authorization_id"
    order_amount: str = "captured_fen"
    subsidy_amount: str = "subsidy_fen"
    refund_amount: str = "refund_fen"
    time: str = "time"
    status: str = "status"
    refund_txn_id: str = ""
    payment_status_values: tuple[str, ...] = ("SUCCESS",)
    refund_status_values: tuple[str, ...] = ("REFUND",)
    ignore_status_values: tuple[str, ...] = ()
    amount_unit: str = FEN
    trailer_marker: str = ""
    trailer_count: str = ""
    trailer_subsidy_total: str = ""
    trailer_refund_total: str = ""
    time_format: str = ISO8601
    time_zone: str = "Asia/Shanghai"

    def __post_init__(self) -> None:
        if self.amount_unit not in (FEN, YUAN):
            raise ValueError(f"amount_unit must be {FEN} or {YUAN}, got {self.amount_unit!r}")
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown time_zone {self.time_zone!r}") from error
        for name in ("channel_txn_id", "authorization_id", "subsidy_amount", "time", "status"):
            if not getattr(self, name).strip():
                raise ValueError(f"the mapping must name the {name} column")
        if not self.payment_status_values or not self.refund_status_values:
            raise ValueError("the mapping must name the payment and refund status values")
        overlap = set(self.payment_status_values) & set(self.refund_status_values)
        if overlap:
            raise ValueError(f"status values both payment and refund: {sorted(overlap)}")

    def required_columns(self) -> list[tuple[str, str]]:
        """(what, the file's column name) for every mapped column."""
        pairs = [
            ("channel_txn_id", self.channel_txn_id),
            ("authorization_id", self.authorization_id),
            ("subsidy_amount", self.subsidy_amount),
            ("time", self.time),
            ("status", self.status),
            ("order_amount", self.order_amount),
            ("refund_amount", self.refund_amount),
            ("refund_txn_id", self.refund_txn_id),
        ]
        return [(what, column) for what, column in pairs if column]

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class ChannelLine(NamedTuple):
    """One transaction line of the file, checked. ``order_fen`` is None when the mapping has no
    order column (then order amounts are not compared)."""

    line_number: int
    kind: str  # PAYMENT or REFUND
    channel_txn_id: str  # the payment's id; a refund's own id for refund lines
    authorization_id: str
    order_fen: int | None
    subsidy_fen: int  # of a payment
    refund_fen: int  # subsidy refunded, of a refund
    time: datetime  # UTC

    @property
    def amount_fen(self) -> int:
        """The subsidy this line moves: a payment's subsidy, a refund's subsidy refunded."""
        return self.subsidy_fen if self.kind == PAYMENT else self.refund_fen


class BadLine(NamedTuple):
    line_number: int
    error: LineError


@dataclass
class FileTotals:
    """What the lines read add up to (checked against the summary line when there is one)."""

    lines: int = 0
    ignored: int = 0
    subsidy_fen: int = 0
    refund_fen: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


def clean(value: str) -> str:
    """A field without surrounding spaces and the leading backtick real bills put before
    values so spreadsheets keep long digit strings as text."""
    text = value.strip()
    if text.startswith("`"):
        text = text[1:].strip()
    return text


def fen_of(text: str, unit: str) -> int:
    """An amount as integer fen; "" is 0. Raises ValueError naming the problem."""
    if text == "":
        return 0
    if unit == FEN:
        if not FEN_PATTERN.fullmatch(text):
            raise ValueError("must be a whole number of fen (digits only)")
        amount = int(text)
    else:
        found = YUAN_PATTERN.fullmatch(text)
        if found is None:
            if re.fullmatch(r"[0-9]+\.[0-9]{3,}", text):
                raise ValueError("has more than two decimals (yuan amounts are exact to the fen)")
            raise ValueError("must be yuan with at most two decimals, e.g. 23.80")
        whole, decimals = found.group(1), found.group(2) or ""
        amount = int(whole) * 100 + int(decimals.ljust(2, "0") or "0")
    if amount > AMOUNT_FEN_MAX:
        raise ValueError(f"is above {AMOUNT_FEN_MAX} fen")
    return amount


class SettlementReader:
    """Reads a file's rows (lists of strings, as ``csv.reader`` yields them, with their line
    numbers) into ``ChannelLine`` and ``BadLine`` items; ignored statuses are counted only.
    Raises ``FileRefused`` for what makes the whole file unreadable."""

    def __init__(self, mapping: ColumnMapping) -> None:
        self.mapping = mapping
        self.totals = FileTotals()
        self._zone = ZoneInfo(mapping.time_zone)
        self._index: dict[str, int] = {}
        self._payment = frozenset(mapping.payment_status_values)
        self._refund = frozenset(mapping.refund_status_values)
        self._ignore = frozenset(mapping.ignore_status_values)
        self._trailer_header: list[str] | None = None
        self._trailer_seen = False
        self._trailer_header_line = 0

    def read(self, rows: Iterable[tuple[int, Sequence[str]]]) -> Iterator[ChannelLine | BadLine]:
        header_seen = False
        for line_number, raw in rows:
            values = [clean(value) for value in raw]
            if not any(values):
                continue
            if not header_seen:
                self._header(line_number, values)
                header_seen = True
                continue
            if self._trailer_seen:
                raise FileRefused(line_number, "", "a line after the summary line")
            if self._trailer_header is not None:
                self._check_trailer(line_number, values)
                self._trailer_seen = True
                continue
            if self.mapping.trailer_marker and values[0].startswith(self.mapping.trailer_marker):
                self._trailer_header = values
                self._trailer_header_line = line_number
                continue
            item = self._line(line_number, values)
            if item is not None:
                yield item
        if not header_seen:
            raise FileRefused(1, "", "the file is empty (no header line)")
        if self._trailer_header is not None and not self._trailer_seen:
            raise FileRefused(self._trailer_header_line, "", "the summary header has no summary line after it")

    def _header(self, line_number: int, values: list[str]) -> None:
        if len(values) > LINE_FIELDS_MAX:
            raise FileRefused(line_number, "", f"more than {LINE_FIELDS_MAX} columns")
        for position, name in enumerate(values):
            self._index.setdefault(name, position)
        for what, column in self.mapping.required_columns():
            if column not in self._index:
                raise FileRefused(line_number, column, f"the header has no column {column!r} (the mapping's {what})")

    def _value(self, values: list[str], column: str) -> str:
        position = self._index[column]
        return values[position] if position < len(values) else ""

    def _line(self, line_number: int, values: list[str]) -> ChannelLine | BadLine | None:
        mapping = self.mapping
        if len(values) != len(self._index) and len(values) < max(self._index.values()) + 1:
            return BadLine(line_number, LineError(line_number, "", f"{len(values)} fields, the header has more"))
        if any(len(value) > FIELD_LENGTH_MAX for value in values):
            return BadLine(
                line_number, LineError(line_number, "", f"a field longer than {FIELD_LENGTH_MAX} characters")
            )
        self.totals.lines += 1
        status = self._value(values, mapping.status)
        self.totals.by_status[status] = self.totals.by_status.get(status, 0) + 1
        problems: list[LineError] = []
        amounts: dict[str, int] = {}
        for what, column in (
            ("order", mapping.order_amount),
            ("subsidy", mapping.subsidy_amount),
            ("refund", mapping.refund_amount),
        ):
            if not column:
                continue
            try:
                amounts[what] = fen_of(self._value(values, column), mapping.amount_unit)
            except ValueError as error:
                problems.append(LineError(line_number, column, str(error)))
        # Totals count every transaction line, as the channel's summary does.
        self.totals.subsidy_fen += amounts.get("subsidy", 0)
        self.totals.refund_fen += amounts.get("refund", 0)
        if status in self._ignore:
            self.totals.ignored += 1
            return None
        if status in self._payment:
            kind = PAYMENT
        elif status in self._refund:
            kind = REFUND
        else:
            problems.append(LineError(line_number, mapping.status, f"unknown status {status[:32]!r}"))
            kind = ""
        txn_column = mapping.refund_txn_id if kind == REFUND and mapping.refund_txn_id else mapping.channel_txn_id
        channel_txn_id = self._value(values, txn_column)
        if not CHANNEL_REFERENCE.fullmatch(channel_txn_id):
            problems.append(LineError(line_number, txn_column, "must be 1-64 characters of [A-Za-z0-9_.:-]"))
        authorization_id = self._value(values, mapping.authorization_id).lower()
        if not AUTHORIZATION_ID.fullmatch(authorization_id):
            problems.append(LineError(line_number, mapping.authorization_id, "must be our authorization id (32 hex)"))
        moment = self._time(line_number, self._value(values, mapping.time), problems)
        if problems or moment is None:
            return BadLine(line_number, problems[0])
        return ChannelLine(
            line_number,
            kind,
            channel_txn_id,
            authorization_id,
            amounts.get("order") if mapping.order_amount else None,
            amounts.get("subsidy", 0),
            amounts.get("refund", 0),
            moment,
        )

    def _time(self, line_number: int, text: str, problems: list[LineError]) -> datetime | None:
        column = self.mapping.time
        try:
            if self.mapping.time_format == ISO8601:
                moment = datetime.fromisoformat(text)
            else:
                moment = datetime.strptime(text, self.mapping.time_format)
        except ValueError:
            problems.append(LineError(line_number, column, f"is not a time in the format {self.mapping.time_format}"))
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=self._zone)
        return moment.astimezone(UTC)

    def _check_trailer(self, line_number: int, values: list[str]) -> None:
        assert self._trailer_header is not None
        names = self._trailer_header
        summary = {name: values[index] if index < len(values) else "" for index, name in enumerate(names)}
        mapping = self.mapping
        checks = (
            (mapping.trailer_count, self.totals.lines, None),
            (mapping.trailer_subsidy_total, self.totals.subsidy_fen, mapping.amount_unit),
            (mapping.trailer_refund_total, self.totals.refund_fen, mapping.amount_unit),
        )
        for column, read, unit in checks:
            if not column:
                continue
            if column not in summary:
                raise FileRefused(self._trailer_header_line, column, f"the summary has no column {column!r}")
            try:
                stated = int(summary[column]) if unit is None else fen_of(summary[column], unit)
            except ValueError as error:
                raise FileRefused(line_number, column, f"summary value {error}") from None
            if stated != read:
                unit_name = "" if unit is None else " fen"
                raise FileRefused(
                    line_number, column, f"the summary says {summary[column]}, the lines add up to {read}{unit_name}"
                )


def mapping_from_dict(document: dict[str, object]) -> ColumnMapping:
    """A mapping from a YAML/JSON document: ``name``, ``columns`` (what -> the file's column),
    ``statuses`` (payment / refund / ignore: lists), ``amount_unit``, ``trailer`` (marker,
    count, subsidy_total, refund_total), ``time_format``, ``time_zone``. Unknown keys are errors."""
    known = {"name", "columns", "statuses", "amount_unit", "trailer", "time_format", "time_zone"}
    unknown = set(document) - known
    if unknown:
        raise ValueError(f"unknown mapping keys: {sorted(unknown)}")
    values: dict[str, object] = {}
    if "name" in document:
        values["name"] = str(document["name"])
    columns = document.get("columns") or {}
    if not isinstance(columns, dict):
        raise ValueError("columns must be a mapping of what -> the file's column name")
    allowed = {
        "channel_txn_id",
        "authorization_id",
        "order_amount",
        "subsidy_amount",
        "refund_amount",
        "time",
        "status",
        "refund_txn_id",
    }
    for what, column in columns.items():
        if what not in allowed:
            raise ValueError(f"unknown column role {what!r} (known: {sorted(allowed)})")
        values[what] = "" if column is None else str(column)
    statuses = document.get("statuses") or {}
    if not isinstance(statuses, dict):
        raise ValueError("statuses must be a mapping with payment, refund and ignore lists")
    for key, target in (
        ("payment", "payment_status_values"),
        ("refund", "refund_status_values"),
        ("ignore", "ignore_status_values"),
    ):
        if key in statuses:
            found = statuses[key]
            if not isinstance(found, list):
                raise ValueError(f"statuses.{key} must be a list")
            values[target] = tuple(str(item) for item in found)
    if "amount_unit" in document:
        values["amount_unit"] = str(document["amount_unit"]).upper()
    trailer = document.get("trailer") or {}
    if not isinstance(trailer, dict):
        raise ValueError("trailer must be a mapping (marker, count, subsidy_total, refund_total)")
    for key, target in (
        ("marker", "trailer_marker"),
        ("count", "trailer_count"),
        ("subsidy_total", "trailer_subsidy_total"),
        ("refund_total", "trailer_refund_total"),
    ):
        if key in trailer:
            values[target] = str(trailer[key] or "")
    for key in ("time_format", "time_zone"):
        if key in document:
            values[key] = str(document[key])
    return ColumnMapping(**values)  # type: ignore[arg-type]


STANDARD_COLUMNS = ("channel_txn_id", "authorization_id", "captured_fen", "subsidy_fen", "refund_fen", "time", "status")


def standard_line(line: ChannelLine) -> str:
    """One line of the documented standard format (amounts in fen, ISO 8601 time)."""
    status = "SUCCESS" if line.kind == PAYMENT else "REFUND"
    order = "" if line.order_fen is None else str(line.order_fen)
    refund = str(line.refund_fen) if line.kind == REFUND else "0"
    subsidy = str(line.subsidy_fen) if line.kind == PAYMENT else "0"
    moment = line.time.isoformat(timespec="seconds")
    return f"{line.channel_txn_id},{line.authorization_id},{order},{subsidy},{refund},{moment},{status}\r\n"


def standard_file(lines: Iterable[ChannelLine]) -> Iterator[str]:
    """A settlement file in the standard format, line by line (header first)."""
    yield ",".join(STANDARD_COLUMNS) + "\r\n"
    for line in lines:
        yield standard_line(line)
