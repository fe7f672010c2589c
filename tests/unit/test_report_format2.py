"""Daily report format 2 (claw-backs, complaint counts): the budget identities with claw-backs,
and format-1 reports hashed exactly as before (published reports never change meaning)."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from server.domain.daily_report import (
    DAY_PART,
    BudgetLine,
    ChainHead,
    ContentHasher,
    Figures,
    Flows,
    ReportHeader,
    ReportRow,
    Rule,
    TieOutError,
    budget_line,
)
from server.domain.report_files import about, budget_columns, row_columns

RULE = Rule("c-main", "以旧换新", "fridge", 10_000_000)
# What the format-1 code (before claw-backs) hashed this report to: computed with
# server/domain/daily_report.py as of commit 3c6cd07.
FORMAT_1_HASH = "75d6094d0a69390ad9147a1ef7d0c9a35961ea3f847be231d4b5ab48de350944"


def report(version: int) -> ContentHasher:
    header = ReportHeader(
        date(2026, 3, 10),
        "Asia/Shanghai",
        "00:30",
        datetime(2026, 3, 9, 16, tzinfo=UTC),
        datetime(2026, 3, 10, 16, tzinfo=UTC),
        datetime(2026, 3, 10, 16, 30, tzinfo=UTC),
        "scheduler",
        date(2026, 3, 9),
        "a" * 64,
        (ChainHead("c-main", 42, "b" * 64),),
        format_version=version,
        tickets_opened=7,
        tickets_resolved=8,
        tickets_overdue=9,
    )
    hasher = ContentHasher(header)
    hasher.budget(
        BudgetLine(
            *("c-main", "以旧换新", "fridge", 10_000_000, 10_000_000, 100, 60_000, 1_000, 159_000, 0, 70_000, 10_000),
            *(0, 9_841_000, 159_000, 0),
            clawed_back_fen=5,
            opening_recovered_fen=6,
            closing_recovered_fen=7,
            chain_recovered_fen=8,
        )
    )
    figures = Figures(2, 3, 4, 60_000, 300_000, 1, 1_000, 1, clawbacks=3, clawed_back_fen=4)
    hasher.row(ReportRow("DAY", "MERCHANT", None, "c-main", "以旧换新", "fridge", "m-main", "商户|一", figures))
    return hasher


def test_a_format_1_report_hashes_as_it_did_when_published() -> None:
    """The format-2 fields (here non-zero) are outside a format-1 report's hash; format 2 covers them."""
    assert report(1).hexdigest() == FORMAT_1_HASH
    assert report(2).hexdigest() != FORMAT_1_HASH


def claw_flows(captured: int, refunded: int, clawed: int, recovered_debit: int | None = None) -> Flows:
    flows = Flows()
    flows.add(DAY_PART, "PENDING", "AUTHORIZED", captured, 0)
    flows.add(DAY_PART, "PENDING", "CAPTURED", 0, captured)
    flows.add(DAY_PART, "MERCHANT_RECEIVABLE", "CAPTURED", captured, 0)
    flows.add(DAY_PART, "MERCHANT_RECEIVABLE", "REFUNDED", 0, refunded)
    flows.add(DAY_PART, "MERCHANT_RECEIVABLE", "CLAWED_BACK", 0, clawed)
    flows.add(DAY_PART, "RECOVERED", "CLAWED_BACK", clawed if recovered_debit is None else recovered_debit, 0)
    # Everything written up to the cut is also in the range since the previous cut.
    for (account, event_type), (debit, credit) in list(flows.parts[DAY_PART].items()):
        flows.add("RANGE", account, event_type, debit, credit)
    return flows


@pytest.mark.parametrize("clawed", [0, 1, 58_999, 59_000])
def test_claw_backs_tie_out(clawed: int) -> None:
    """Zero, one fen, and everything not refunded: spent falls by the claw-back, recovered rises
    by it, and the remaining budget does not get it back."""
    line = budget_line(RULE, claw_flows(60_000, 1_000, clawed), None, 0)
    assert line.clawed_back_fen == clawed and line.closing_recovered_fen == clawed
    assert line.closing_spent_fen == 60_000 - 1_000 - clawed
    assert line.remaining_fen == 10_000_000 - 59_000
    follow = budget_line(RULE, Flows(), line, 0)
    assert follow.opening_recovered_fen == follow.closing_recovered_fen == clawed
    assert follow.remaining_fen == line.remaining_fen


def test_a_claw_back_without_its_recovered_posting_does_not_tie_out() -> None:
    with pytest.raises(TieOutError):
        budget_line(RULE, claw_flows(60_000, 0, 10_000, recovered_debit=9_999), None, 0)


def test_the_files_of_a_format_1_report_are_as_they_were() -> None:
    old = ReportHeader(
        date(2026, 3, 10), "Asia/Shanghai", "00:30", *(datetime(2026, 3, 9, tzinfo=UTC),) * 3, "s", None, "", ()
    )
    old = ReportHeader(**{**old.__dict__, "format_version": 1})
    new = ReportHeader(**{**old.__dict__, "format_version": 2, "tickets_overdue": 3})
    assert "clawed_back_fen" not in [column.key for column in row_columns(old) + budget_columns(old)]
    assert [column.key for column in row_columns(new)][-2:] == ["clawbacks", "clawed_back_fen"]
    assert "closing_recovered_fen" in [column.key for column in budget_columns(new)]
    assert not [label for label, _ in about(old) if "tickets" in label]
    assert ("超时投诉 tickets overdue at the day's end", "3") in about(new)
