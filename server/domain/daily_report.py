"""T+1 daily statistics: the business calendar, the report's figures, its budget lines and their
tie-outs, and the content hash. Pure: no I/O (the SQL is storage/postgres/daily_reports.py).

**The business day** is a calendar day in ``timezone`` (Asia/Shanghai): [00:00, 24:00) local.
It **closes** at ``cutoff`` (HH:MM) on the following day, a grace period for events still on
their way into the ledger; only a closed day can be published.

**What a report holds.** Every ledger entry belongs to exactly one published report. The
report of day D is cut from the ledger as it stands at that moment: the chain head of every
campaign (its last ``entry_seq``, and that entry's hash) is recorded as the report's
watermark ``W_D``. Because the writer numbers a campaign's entries under a lock on the chain
head, in commit order, "entry_seq <= W_D" is exactly "was in the ledger when D was cut", and
it stays true whatever arrives later. Then, with ``W_{D-1}`` the previous report's watermark:

- **the day** (kind DAY): entries whose event time falls in D and whose ``entry_seq <= W_D``;
- **adjustments** (kind ADJUSTMENT): entries of earlier days that the previous report had not
  seen: ``W_{D-1} < entry_seq <= W_D`` and event time before D. They keep their own date
  (``original_date``); a closed report is never recomputed.

So "late" is decided by the ledger's own insertion order, never by comparing clocks: an
event is late for its day when its entries got sequence numbers after that day's cut.

**Figures** per campaign x category x merchant (and totals), from the entries on
MERCHANT_RECEIVABLE (a capture debits it, a refund credits it) and their events:
``consumers`` distinct consumer keys with a sale, ``sales`` captured payments with a line in
the category, ``units`` their lines, ``redeemed_fen`` (核销金额) the subsidy captured,
``order_fen`` (订单金额) the price of those lines, ``refunds`` refund events, ``refunded_fen``
(核销退款金额) the subsidy refunded, ``merchants`` (核销商家数) distinct merchants with a sale.
Additive figures add up exactly: the merchants' rows of a campaign x category equal its
total, and the totals of every campaign x category equal the district total. Distinct counts
(consumers, merchants) are counted again at each level: a consumer buying from two merchants
is one person in the total.

**Budgets** (campaign x category): the spent balance (MERCHANT_RECEIVABLE) and the held
balance (PENDING) at the day's opening (the previous report's closing) and closing, with the
movements of the day and its adjustments: ``opening + captured - refunded - clawed back =
closing`` and ``opening held + held - captured - released = closing held``, to the fen. The closing
balances are computed independently of the movements (from the previous report's whole-chain
balance, the entries between the two watermarks, and the entries already in the ledger for
later days), so the identities are checked, not assumed; a report that does not tie out is
not published.

**Format 2** (from migration 0021) adds claw-backs (a confirmed fraud's subsidy taken back from
the merchant: CLAWED_BACK events, debit RECOVERED, credit MERCHANT_RECEIVABLE): per row
``clawbacks`` and ``clawed_back_fen`` (追回金额), per budget the day's ``clawed_back_fen`` and the
RECOVERED balance (``opening + clawed back = closing recovered``, checked the same way; the
remaining budget leaves it out: recovered money is not granted again), and in the header the
complaints desk's day (tickets opened, closed RESOLVED or REJECTED, and open at the day's end
past a deadline). A format-1 report (published before) is hashed, verified and shown exactly as
it was: its content hash covers the format-1 fields only, and the new ones read 0.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from server.domain.budget import released_by
from server.domain.errors import InvalidField

FORMAT_VERSION = 2
DEFAULT_TIMEZONE = "Asia/Shanghai"
DEFAULT_CUTOFF = "00:30"
DAY, ADJUSTMENT = "DAY", "ADJUSTMENT"
KINDS = (DAY, ADJUSTMENT)
MERCHANT, CATEGORY_TOTAL, DISTRICT_TOTAL = "MERCHANT", "CATEGORY_TOTAL", "DISTRICT_TOTAL"
LEVELS = (MERCHANT, CATEGORY_TOTAL, DISTRICT_TOTAL)
CUTOFF_PATTERN = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
DATE_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
SCHEDULER = "scheduler"


class TieOutError(Exception):
    """A report whose figures do not add up: a defect or an altered ledger. Never published."""


class DayNotClosed(Exception):
    """A report asked for a day whose cut-off has not passed yet."""

    def __init__(self, day: date, closes_at: datetime) -> None:
        super().__init__(f"{day.isoformat()} closes at {_iso(closes_at)}; it cannot be published before")
        self.day = day
        self.closes_at = closes_at


def parse_business_date(value: str, field_name: str = "business_date") -> date:
    """``YYYY-MM-DD``; anything else is INVALID_ARGUMENT naming the field."""
    text = value.strip()
    if not DATE_PATTERN.fullmatch(text):
        raise InvalidField(field_name, "must be a date YYYY-MM-DD")
    try:
        return date.fromisoformat(text)
    except ValueError as error:
        raise InvalidField(field_name, "is not a calendar date") from error


@dataclass(frozen=True)
class BusinessCalendar:
    """Business days in ``timezone``; a day closes at ``cutoff`` on the following day."""

    timezone: str = DEFAULT_TIMEZONE
    cutoff: str = DEFAULT_CUTOFF

    def __post_init__(self) -> None:
        if not CUTOFF_PATTERN.fullmatch(self.cutoff):
            raise ValueError(f"cut-off must be HH:MM (00:00-23:59), got {self.cutoff!r}")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown time zone {self.timezone!r}") from error

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def cutoff_time(self) -> time:
        hours, minutes = self.cutoff.split(":")
        return time(int(hours), int(minutes))

    def bounds(self, day: date) -> tuple[datetime, datetime]:
        """The day's [start, end) as UTC instants."""
        start = datetime.combine(day, time(0), tzinfo=self.zone)
        end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=self.zone)
        return start.astimezone(UTC), end.astimezone(UTC)

    def closes_at(self, day: date) -> datetime:
        return datetime.combine(day + timedelta(days=1), self.cutoff_time, tzinfo=self.zone).astimezone(UTC)

    def day_of(self, moment: datetime) -> date:
        return moment.astimezone(self.zone).date()

    def last_closed_day(self, now: datetime) -> date:
        """The latest day whose cut-off has passed at ``now``."""
        day = self.day_of(now) - timedelta(days=1)
        while self.closes_at(day) > now:
            day -= timedelta(days=1)
        return day


@dataclass(frozen=True)
class Figures:
    consumers: int = 0
    sales: int = 0
    units: int = 0
    redeemed_fen: int = 0
    order_fen: int = 0
    refunds: int = 0
    refunded_fen: int = 0
    merchants: int = 0
    # Format 2: claw-back events and the subsidy they took back (no longer owed to the merchant).
    clawbacks: int = 0
    clawed_back_fen: int = 0


FIGURE_NAMES = tuple(item.name for item in fields(Figures))
# What a format-1 report's content hash covers, of a row's figures and of a budget line.
FIGURE_NAMES_V1 = FIGURE_NAMES[:8]
# Figures that add up across rows; consumers and merchants are distinct counts.
ADDITIVE = ("sales", "units", "redeemed_fen", "order_fen", "refunds", "refunded_fen", "clawbacks", "clawed_back_fen")


def add(left: Figures, right: Figures) -> Figures:
    return Figures(**{name: getattr(left, name) + getattr(right, name) for name in FIGURE_NAMES})


@dataclass(frozen=True)
class ReportRow:
    kind: str
    level: str
    original_date: date | None
    campaign_id: str
    campaign_name: str
    category: str
    merchant_id: str
    merchant_name: str
    figures: Figures

    def material(self, version: int = FORMAT_VERSION) -> str:
        names = FIGURE_NAMES_V1 if version < 2 else FIGURE_NAMES
        values = [
            self.kind,
            self.level,
            self.original_date.isoformat() if self.original_date else "",
            self.campaign_id,
            self.campaign_name,
            self.category,
            self.merchant_id,
            self.merchant_name,
            *(str(getattr(self.figures, name)) for name in names),
        ]
        return "row|" + "|".join(_escape(value) for value in values)


@dataclass(frozen=True)
class BudgetLine:
    campaign_id: str
    campaign_name: str
    category: str
    budget_fen: int  # the rule's whole budget when the report was cut
    released_fen: int  # of which released by the day's end (tranches)
    opening_spent_fen: int
    captured_fen: int
    refunded_fen: int
    closing_spent_fen: int
    opening_held_fen: int
    held_fen: int
    released_hold_fen: int  # holds voided or expired
    closing_held_fen: int
    remaining_fen: int  # budget_fen - closing spent - closing held - closing recovered
    chain_spent_fen: int  # whole-chain balances at the report's chain head
    chain_held_fen: int
    # Format 2: the day's claw-backs and the RECOVERED balance (clawed back, not re-granted).
    clawed_back_fen: int = 0
    opening_recovered_fen: int = 0
    closing_recovered_fen: int = 0
    chain_recovered_fen: int = 0

    def material(self, version: int = FORMAT_VERSION) -> str:
        values = [getattr(self, item.name) for item in fields(self)]
        if version < 2:
            values = values[:BUDGET_FIELDS_V1]
        return "budget|" + "|".join(_escape(str(value)) for value in values)


BUDGET_FIELDS_V1 = 16  # budget_fen ... chain_held_fen, with the names: what format 1 hashed


@dataclass(frozen=True)
class ChainHead:
    campaign_id: str
    seq: int
    hash: str


@dataclass(frozen=True)
class ReportHeader:
    business_date: date
    timezone: str
    cutoff: str
    day_starts_at: datetime
    day_ends_at: datetime
    cut_at: datetime
    published_by: str
    previous_date: date | None
    previous_hash: str
    chain_heads: tuple[ChainHead, ...]
    budget_count: int = 0
    row_count: int = 0
    adjustment_rows: int = 0
    format_version: int = FORMAT_VERSION
    content_hash: str = ""
    # Format 2: the complaints desk's day (README "Complaints desk"), in the report's time zone.
    tickets_opened: int = 0
    tickets_resolved: int = 0  # closed RESOLVED or REJECTED during the day
    tickets_overdue: int = 0  # open at the day's end and past a deadline then

    def material(self) -> str:
        values = [
            f"subsidy-daily-report/v{self.format_version}",
            self.business_date.isoformat(),
            self.timezone,
            self.cutoff,
            _iso(self.day_starts_at),
            _iso(self.day_ends_at),
            _iso(self.cut_at),
            self.published_by,
            self.previous_date.isoformat() if self.previous_date else "",
            self.previous_hash,
            ";".join(f"{head.campaign_id}:{head.seq}:{head.hash}" for head in self.chain_heads),
        ]
        if self.format_version >= 2:
            values += [str(self.tickets_opened), str(self.tickets_resolved), str(self.tickets_overdue)]
        return "header|" + "|".join(_escape(value) for value in values)

    def watermark(self) -> dict[str, int]:
        return {head.campaign_id: head.seq for head in self.chain_heads}


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n")


class ContentHasher:
    """SHA-256 over the header, then every budget line, then every row, in stored order, one
    canonical line each: recomputable from the stored report (and, later, by an archive's own
    verification script) to prove it unaltered."""

    def __init__(self, header: ReportHeader) -> None:
        self._digest = hashlib.sha256()
        self._version = header.format_version
        self._line(header.material())
        self.budgets = 0
        self.rows = 0

    def _line(self, text: str) -> None:
        self._digest.update(text.encode())
        self._digest.update(b"\n")

    def budget(self, line: BudgetLine) -> None:
        self.budgets += 1
        self._line(line.material(self._version))

    def row(self, row: ReportRow) -> None:
        self.rows += 1
        self._line(row.material(self._version))

    def hexdigest(self) -> str:
        digest = self._digest.copy()
        digest.update(f"end|{self.budgets}|{self.rows}".encode())
        return digest.hexdigest()


# Budget movements, as the storage layer sums them: per (campaign, category), per part of the
# ledger, per (account, event type): (debit, credit).
DAY_PART, LATE_PART, RANGE_PART, AHEAD_PART = "DAY", "LATE", "RANGE", "AHEAD"
Sums = Mapping[tuple[str, str], tuple[int, int]]


@dataclass(frozen=True)
class Rule:
    campaign_id: str
    campaign_name: str
    category: str
    budget_fen: int
    tranches: tuple[tuple[int, int], ...] = ()  # (release ms, amount)


@dataclass
class Flows:
    """One budget's sums per part of the ledger: DAY, the day's entries up to this cut; LATE,
    earlier days' entries new since the previous cut (the adjustments); RANGE, the other
    entries new since the previous cut (this day's and later days'); AHEAD, later days'
    entries up to this cut, whenever written."""

    parts: dict[str, dict[tuple[str, str], tuple[int, int]]] = field(default_factory=dict)

    def add(self, part: str, account: str, event_type: str, debit: int, credit: int) -> None:
        bucket = self.parts.setdefault(part, {})
        old_debit, old_credit = bucket.get((account, event_type), (0, 0))
        bucket[(account, event_type)] = (old_debit + debit, old_credit + credit)

    def debit(self, parts: Iterable[str], account: str, *event_types: str) -> int:
        return sum(
            self.parts.get(part, {}).get((account, event_type), (0, 0))[0]
            for part in parts
            for event_type in event_types
        )

    def credit(self, parts: Iterable[str], account: str, *event_types: str) -> int:
        return sum(
            self.parts.get(part, {}).get((account, event_type), (0, 0))[1]
            for part in parts
            for event_type in event_types
        )

    def balance(self, parts: Iterable[str], account: str) -> int:
        total = 0
        for part in parts:
            for (entry_account, _), (debit, credit) in self.parts.get(part, {}).items():
                if entry_account == account:
                    total += debit - credit
        return total


EVENT_TYPES = ("AUTHORIZED", "CAPTURED", "VOIDED", "EXPIRED", "REFUNDED", "CLAWED_BACK")
SPENT, HELD, RECOVERED = "MERCHANT_RECEIVABLE", "PENDING", "RECOVERED"


def budget_line(rule: Rule, flows: Flows, previous: BudgetLine | None, day_end_ms: int) -> BudgetLine:
    """One budget's line, with both identities checked (TieOutError otherwise)."""
    moved = (DAY_PART, LATE_PART)
    captured = flows.debit(moved, SPENT, "CAPTURED")
    refunded = flows.credit(moved, SPENT, "REFUNDED")
    clawed_back = flows.credit(moved, SPENT, "CLAWED_BACK")
    held = flows.debit(moved, HELD, "AUTHORIZED")
    captured_from_hold = flows.credit(moved, HELD, "CAPTURED")
    released_hold = flows.credit(moved, HELD, "VOIDED", "EXPIRED")
    # Only a capture debits the spent account and only a refund or a claw-back credits it; a
    # capture moves exactly what it takes from the held account, a claw-back exactly what it
    # puts in the recovered one, and nothing else touches that.
    spent_debits = flows.debit(moved, SPENT, *EVENT_TYPES)
    spent_credits = flows.credit(moved, SPENT, *EVENT_TYPES)
    if (
        spent_debits != captured
        or spent_credits != refunded + clawed_back
        or captured != captured_from_hold
        or flows.debit(moved, RECOVERED, *EVENT_TYPES) != clawed_back
        or flows.credit(moved, RECOVERED, *EVENT_TYPES) != 0
    ):
        raise TieOutError(f"{rule.campaign_id}/{rule.category}: postings outside the posting rules")
    opening_spent = previous.closing_spent_fen if previous else 0
    opening_held = previous.closing_held_fen if previous else 0
    opening_recovered = previous.closing_recovered_fen if previous else 0
    # Independently of the movements: the whole chain's balance at this cut, less what it
    # already holds for later days.
    chain_spent = (previous.chain_spent_fen if previous else 0) + flows.balance((LATE_PART, RANGE_PART), SPENT)
    chain_held = (previous.chain_held_fen if previous else 0) + flows.balance((LATE_PART, RANGE_PART), HELD)
    chain_recovered = (previous.chain_recovered_fen if previous else 0) + flows.balance(
        (LATE_PART, RANGE_PART), RECOVERED
    )
    closing_spent = chain_spent - flows.balance((AHEAD_PART,), SPENT)
    closing_held = chain_held - flows.balance((AHEAD_PART,), HELD)
    closing_recovered = chain_recovered - flows.balance((AHEAD_PART,), RECOVERED)
    name = f"{rule.campaign_id}/{rule.category}"
    if opening_spent + captured - refunded - clawed_back != closing_spent:
        raise TieOutError(
            f"{name}: opening {opening_spent} + captured {captured} - refunded {refunded}"
            f" - clawed back {clawed_back} != closing {closing_spent}"
        )
    if opening_recovered + clawed_back != closing_recovered:
        raise TieOutError(
            f"{name}: recovered opening {opening_recovered} + clawed back {clawed_back} != closing {closing_recovered}"
        )
    if opening_held + held - captured - released_hold != closing_held:
        raise TieOutError(
            f"{name}: held opening {opening_held} + {held} - captured {captured} - released {released_hold}"
            f" != closing {closing_held}"
        )
    return BudgetLine(
        campaign_id=rule.campaign_id,
        campaign_name=rule.campaign_name,
        category=rule.category,
        budget_fen=rule.budget_fen,
        released_fen=released_by(list(rule.tranches), rule.budget_fen, day_end_ms - 1),
        opening_spent_fen=opening_spent,
        captured_fen=captured,
        refunded_fen=refunded,
        closing_spent_fen=closing_spent,
        opening_held_fen=opening_held,
        held_fen=held,
        released_hold_fen=released_hold,
        closing_held_fen=closing_held,
        remaining_fen=rule.budget_fen - closing_spent - closing_held - closing_recovered,
        chain_spent_fen=chain_spent,
        chain_held_fen=chain_held,
        clawed_back_fen=clawed_back,
        opening_recovered_fen=opening_recovered,
        closing_recovered_fen=closing_recovered,
        chain_recovered_fen=chain_recovered,
    )


class RowChecker:
    """Checks the rows as they stream past, in stored order (per kind: each campaign x
    category's merchant rows then its total, then the district total): every additive figure
    of a total is the sum of the rows under it, and a distinct count lies between the largest
    and the sum of those under it. Memory: one group's merchant ids at a time."""

    def __init__(self) -> None:
        self._kind = ""
        self._group: tuple[str, str, str] | None = None
        self._group_sum = Figures()
        self._group_merchants: set[str] = set()
        self._group_consumers_max = 0
        self._closed: set[tuple[str, str, str]] = set()
        self._kind_sum = Figures()
        self._kind_max = Figures()
        self._kinds_done: list[str] = []
        self.category_totals: dict[tuple[str, str, str], Figures] = {}

    def _fail(self, row: ReportRow, problem: str) -> TieOutError:
        where = "/".join(part for part in (row.kind, row.campaign_id, row.category, row.merchant_id) if part)
        return TieOutError(f"row {where} ({row.level}): {problem}")

    def add(self, row: ReportRow) -> None:
        if row.kind not in KINDS or row.level not in LEVELS:
            raise self._fail(row, "unknown kind or level")
        if row.kind != self._kind:
            if self._kind and self._kind not in self._kinds_done:
                raise self._fail(row, f"the {self._kind} rows ended without a district total")
            if row.kind in self._kinds_done:
                raise self._fail(row, "rows out of order")
            self._kind, self._kind_sum, self._kind_max = row.kind, Figures(), Figures()
        if self._kind in self._kinds_done:
            raise self._fail(row, "a row after the district total")
        key = (row.kind, row.campaign_id, row.category)
        if row.level == MERCHANT:
            if self._group != key:
                if self._group is not None or key in self._closed:
                    raise self._fail(row, "merchant rows of one campaign and category are not together")
                self._group, self._group_sum, self._group_merchants = key, Figures(), set()
                self._group_consumers_max = 0
            self._group_sum = add(self._group_sum, row.figures)
            if row.figures.sales:
                self._group_merchants.add(row.merchant_id)
            self._group_consumers_max = max(self._group_consumers_max, row.figures.consumers)
            if row.figures.merchants != (1 if row.figures.sales else 0):
                raise self._fail(row, "a merchant row counts itself once when it has sales")
        elif row.level == CATEGORY_TOTAL:
            if key in self._closed or (self._group is not None and self._group != key):
                raise self._fail(row, "a total apart from its rows")
            expected = self._group_sum
            for name in ADDITIVE:
                if getattr(row.figures, name) != getattr(expected, name):
                    raise self._fail(row, f"{name} {getattr(row.figures, name)} != sum {getattr(expected, name)}")
            if row.figures.merchants != len(self._group_merchants):
                raise self._fail(row, f"merchants {row.figures.merchants} != {len(self._group_merchants)}")
            if not self._group_consumers_max <= row.figures.consumers <= expected.consumers:
                raise self._fail(row, "distinct consumers outside [largest row, sum of rows]")
            self._closed.add(key)
            self._group = None
            self.category_totals[key] = row.figures
            self._kind_sum = add(self._kind_sum, row.figures)
            self._kind_max = Figures(
                consumers=max(self._kind_max.consumers, row.figures.consumers),
                merchants=max(self._kind_max.merchants, row.figures.merchants),
            )
        else:
            if self._group is not None:
                raise self._fail(row, "a district total before its campaign totals")
            for name in ADDITIVE:
                if getattr(row.figures, name) != getattr(self._kind_sum, name):
                    raise self._fail(row, f"{name} {getattr(row.figures, name)} != sum {getattr(self._kind_sum, name)}")
            for name in ("consumers", "merchants"):
                value = getattr(row.figures, name)
                if not getattr(self._kind_max, name) <= value <= getattr(self._kind_sum, name):
                    raise self._fail(row, f"distinct {name} outside [largest total, sum of totals]")
            self._kinds_done.append(row.kind)

    def finish(self, budgets: Sequence[BudgetLine]) -> None:
        """After the last row: every kind closed by its district total, and the day's and the
        adjustments' captured and refunded subsidy per budget equal to the budget lines'."""
        if self._group is not None or (self._kind and self._kind not in self._kinds_done):
            raise TieOutError("the rows end without their totals")
        if DAY not in self._kinds_done:
            raise TieOutError("no district total for the day")
        for line in budgets:
            redeemed = refunded = clawed_back = 0
            for kind in KINDS:
                totals = self.category_totals.get((kind, line.campaign_id, line.category), Figures())
                redeemed += totals.redeemed_fen
                refunded += totals.refunded_fen
                clawed_back += totals.clawed_back_fen
            if (redeemed, refunded, clawed_back) != (line.captured_fen, line.refunded_fen, line.clawed_back_fen):
                raise TieOutError(
                    f"{line.campaign_id}/{line.category}: rows captured {redeemed}, refunded {refunded},"
                    f" clawed back {clawed_back}; budget captured {line.captured_fen}, refunded {line.refunded_fen},"
                    f" clawed back {line.clawed_back_fen}"
                )
        known = {(line.campaign_id, line.category) for line in budgets}
        for _, campaign_id, category in self.category_totals:
            if (campaign_id, category) not in known:
                raise TieOutError(f"{campaign_id}/{category}: rows without a budget line")


def district_total(kind: str, figures: Figures | None = None) -> ReportRow:
    return ReportRow(kind, DISTRICT_TOTAL, None, "", "", "", "", "", figures or Figures())


def yuan(fen: int) -> str:
    """Exact yuan with two decimals from integer fen: 91980 -> "919.80", -5 -> "-0.05"."""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), 100)
    return f"{sign}{whole}.{cents:02d}"
