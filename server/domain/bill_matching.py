"""Matching a channel's settlement lines against the ledger's captures and refunds of the same
business day (docs/reconciliation.md). Pure: lines and ledger items in, one result per file
line and per ledger item the file lacks out.

Both sides arrive sorted by authorization id, and a group (one authorization's lines and
items) is matched on its own, so matching a day of any size holds one group at a time: a
merge join. Within a group:

- A line repeating an earlier line's kind and channel transaction id is DUPLICATE_IN_FILE
  (difference: its whole amount, which the file claims twice).
- A payment line pairs with the authorization's capture, a refund line with one of its
  refunds: first the ledger item whose channel reference is the line's transaction id, else one
  recorded without a reference (a refund of the same amount first, then the earliest). A ledger
  item recorded with another reference does not pair: the channel and we name different
  transactions.
- A pair whose subsidy (and, for payments, order amount when the file has one) agree is
  MATCHED, otherwise AMOUNT_MISMATCH (difference: channel - ledger).
- An unpaired line is MISSING_IN_LEDGER (difference: its amount); an unpaired ledger item
  MISSING_IN_CHANNEL (difference: minus its amount).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from server.domain.settlement_file import PAYMENT, REFUND, ChannelLine

MATCHED = "MATCHED"
AMOUNT_MISMATCH = "AMOUNT_MISMATCH"
MISSING_IN_LEDGER = "MISSING_IN_LEDGER"
MISSING_IN_CHANNEL = "MISSING_IN_CHANNEL"
DUPLICATE_IN_FILE = "DUPLICATE_IN_FILE"
BAD_LINE = "BAD_LINE"
STATUSES = (MATCHED, AMOUNT_MISMATCH, MISSING_IN_LEDGER, MISSING_IN_CHANNEL, DUPLICATE_IN_FILE, BAD_LINE)
EXCEPTIONS = tuple(status for status in STATUSES if status != MATCHED)


class LedgerItem(NamedTuple):
    """A captured payment or a refund of the day, as the ledger holds it."""

    event_id: str
    kind: str  # PAYMENT (a CAPTURED event) or REFUND (a REFUNDED event)
    authorization_id: str
    merchant_id: str
    channel_reference: str  # "" when none was given
    subsidy_fen: int  # captured subsidy, or subsidy refunded
    order_fen: int  # a capture's total price of its lines (0 for refunds)
    occurred_at: datetime


class Result(NamedTuple):
    """One result line, in the column order of ``reconciliation_lines`` after run and position."""

    status: str
    kind: str
    line_number: int  # 0: a ledger item the file lacks
    channel_txn_id: str
    authorization_id: str
    ledger_event_id: str
    ledger_channel_reference: str
    merchant_id: str
    channel_subsidy_fen: int
    ledger_subsidy_fen: int
    channel_order_fen: int
    ledger_order_fen: int
    difference_fen: int
    order_difference_fen: int
    channel_time: datetime | None
    ledger_time: datetime | None
    error: str


def _paired(line: ChannelLine, item: LedgerItem) -> Result:
    difference = line.amount_fen - item.subsidy_fen
    order_difference = 0
    channel_order = 0
    ledger_order = item.order_fen if line.kind == PAYMENT else 0
    if line.kind == PAYMENT and line.order_fen is not None:
        channel_order = line.order_fen
        order_difference = channel_order - ledger_order
    status = MATCHED if difference == 0 and order_difference == 0 else AMOUNT_MISMATCH
    return Result(
        status,
        line.kind,
        line.line_number,
        line.channel_txn_id,
        line.authorization_id,
        item.event_id,
        item.channel_reference,
        item.merchant_id,
        line.amount_fen,
        item.subsidy_fen,
        channel_order,
        ledger_order,
        difference,
        order_difference,
        line.time,
        item.occurred_at,
        "",
    )


def _line_only(line: ChannelLine, status: str) -> Result:
    order = line.order_fen if line.kind == PAYMENT and line.order_fen is not None else 0
    return Result(
        status,
        line.kind,
        line.line_number,
        line.channel_txn_id,
        line.authorization_id,
        "",
        "",
        "",
        line.amount_fen,
        0,
        order,
        0,
        line.amount_fen,
        order,
        line.time,
        None,
        "",
    )


def _ledger_only(item: LedgerItem) -> Result:
    return Result(
        MISSING_IN_CHANNEL,
        item.kind,
        0,
        "",
        item.authorization_id,
        item.event_id,
        item.channel_reference,
        item.merchant_id,
        0,
        item.subsidy_fen,
        0,
        item.order_fen,
        -item.subsidy_fen,
        -item.order_fen,
        None,
        item.occurred_at,
        "",
    )


def _partner(line: ChannelLine, candidates: list[LedgerItem]) -> LedgerItem | None:
    """The ledger item a line pairs with (removed from ``candidates``), or None."""
    chosen = next((item for item in candidates if item.channel_reference == line.channel_txn_id), None)
    if chosen is None:
        unreferenced = [item for item in candidates if item.channel_reference == ""]
        chosen = next((item for item in unreferenced if item.subsidy_fen == line.amount_fen), None)
        if chosen is None and unreferenced:
            chosen = unreferenced[0]
    if chosen is not None:
        candidates.remove(chosen)
    return chosen


def match_group(lines: Sequence[ChannelLine], items: Sequence[LedgerItem]) -> list[Result]:
    """Results for one authorization: its file lines (in file order) and ledger items (in
    ledger order). Lines' results come in line order, then the ledger items no line took."""
    open_items = {PAYMENT: [item for item in items if item.kind == PAYMENT], REFUND: []}
    open_items[REFUND] = [item for item in items if item.kind == REFUND]
    seen: set[tuple[str, str]] = set()
    results: list[Result] = []
    for line in lines:
        key = (line.kind, line.channel_txn_id)
        if key in seen:
            results.append(_line_only(line, DUPLICATE_IN_FILE))
            continue
        seen.add(key)
        partner = _partner(line, open_items[line.kind])
        results.append(_line_only(line, MISSING_IN_LEDGER) if partner is None else _paired(line, partner))
    results.extend(_ledger_only(item) for item in (*open_items[PAYMENT], *open_items[REFUND]))
    return results


def merge(lines: Iterable[ChannelLine], items: Iterable[LedgerItem]) -> Iterator[Result]:
    """Every result of a day: ``lines`` and ``items`` each sorted by authorization id (lines
    then by line number, items by ledger order). One group in memory at a time."""
    line_iter, item_iter = iter(lines), iter(items)
    line = next(line_iter, None)
    item = next(item_iter, None)
    while line is not None or item is not None:
        if item is None or (line is not None and line.authorization_id < item.authorization_id):
            assert line is not None
            key = line.authorization_id
        elif line is None or item.authorization_id < line.authorization_id:
            key = item.authorization_id
        else:
            key = line.authorization_id
        group_lines: list[ChannelLine] = []
        while line is not None and line.authorization_id == key:
            group_lines.append(line)
            previous = line
            line = next(line_iter, None)
            assert line is None or (line.authorization_id, line.line_number) > (
                previous.authorization_id,
                previous.line_number,
            ), "lines must come sorted by authorization id and line number"
        group_items: list[LedgerItem] = []
        while item is not None and item.authorization_id == key:
            group_items.append(item)
            item = next(item_iter, None)
            assert item is None or item.authorization_id >= key, "ledger items must come sorted by authorization id"
        yield from match_group(group_lines, group_items)


@dataclass
class Summary:
    """Counts and fen differences per status, and the two sides' net subsidy (payments minus
    refunds): channel_net - ledger_net equals the signed sum of the paired and missing lines'
    differences (refunds count negative); duplicates and bad lines are outside both nets."""

    counts: dict[str, list[int]] = field(default_factory=dict)
    channel_net_subsidy_fen: int = 0
    ledger_net_subsidy_fen: int = 0
    ledger_items: int = 0

    def add(self, result: Result) -> None:
        entry = self.counts.setdefault(result.status, [0, 0])
        entry[0] += 1
        entry[1] += result.difference_fen
        sign = -1 if result.kind == REFUND else 1
        if result.status in (MATCHED, AMOUNT_MISMATCH, MISSING_IN_LEDGER):
            self.channel_net_subsidy_fen += sign * result.channel_subsidy_fen
        if result.status in (MATCHED, AMOUNT_MISMATCH, MISSING_IN_CHANNEL):
            self.ledger_net_subsidy_fen += sign * result.ledger_subsidy_fen
            self.ledger_items += 1

    @property
    def exception_lines(self) -> int:
        return sum(lines for status, (lines, _) in self.counts.items() if status != MATCHED)


def mirror(item: LedgerItem, line_number: int, channel_txn_id: str) -> ChannelLine:
    """The channel line that agrees with a ledger item (for generated files: tests, the
    benchmark and make run's demo day)."""
    payment = item.kind == PAYMENT
    return ChannelLine(
        line_number,
        item.kind,
        item.channel_reference or channel_txn_id,
        item.authorization_id,
        item.order_fen if payment else None,
        item.subsidy_fen if payment else 0,
        0 if payment else item.subsidy_fen,
        item.occurred_at,
    )
