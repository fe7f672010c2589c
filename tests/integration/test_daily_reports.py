"""T+1 daily reports (issue 12, section 1), cut from a real PostgreSQL ledger.

Generated days (server/domain/ledger_sim.py: authorizations with captures, voids, expiries,
whole and partial refunds, events crossing midnight) go through the ledger writer's own
``write_batch`` (double entry, hash chain), then reports are published and checked against an
oracle computed here from the events alone: every figure of every merchant row and total, the
distinct counts, every budget identity to the fen, and the last closing balances against the
ledger's own balances. A report does not change when late events arrive: they appear in the
next report as adjustments.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from server.domain.daily_report import (
    ADJUSTMENT,
    CATEGORY_TOTAL,
    DAY,
    DISTRICT_TOTAL,
    MERCHANT,
    BudgetLine,
    BusinessCalendar,
    DayNotClosed,
    ReportHeader,
    ReportRow,
)
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from storage.devenv import Services
from storage.postgres import daily_reports
from storage.postgres.audit import ledger_counters
from tests.conftest import Environment, isolated_environment

CALENDAR = BusinessCalendar("Asia/Shanghai", "00:30")
FIRST_DAY = date(2026, 3, 1)
CAMPAIGNS = (
    SimCampaign("c-main", ("fridge", "phone", "tv")),
    SimCampaign("c-voucher", ("general",), rate_bp=1000, cap_fen=500),
)
MERCHANTS = ("m-main", "m-other", *(f"m-sim-{index:03d}" for index in range(40)))


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def day_start(day: date) -> datetime:
    return CALENDAR.bounds(day)[0]


def after_cutoff(day: date) -> datetime:
    """A moment just after ``day`` closed."""
    return CALENDAR.closes_at(day) + timedelta(minutes=1)


def generated(days: int, payments: int, seed: int = 7, **overrides: Any) -> list[tuple[str, dict[str, Any]]]:
    settings = SimSettings(
        campaigns=CAMPAIGNS, merchants=MERCHANTS, seed=seed, refund_share=0.2, partial_refund_share=0.3, **overrides
    )
    start, end = day_start(FIRST_DAY), CALENDAR.bounds(FIRST_DAY + timedelta(days=days - 1))[1]
    return list(simulate(settings, ms(start), ms(end), payments))


async def write(connection: asyncpg.Connection, events: Sequence[tuple[str, dict[str, Any]]]) -> None:
    await daily_reports.write_simulated(connection, events, batch=500)


@asynccontextmanager
async def ledger_database(services: Services) -> AsyncIterator[tuple[Environment, asyncpg.Connection]]:
    async with isolated_environment(services) as env:
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            yield env, connection
        finally:
            await connection.close()


@dataclass
class Expected:
    """The oracle's figures for one row key."""

    consumers: set[str] = field(default_factory=set)
    merchants: set[str] = field(default_factory=set)
    sales: int = 0
    units: int = 0
    redeemed_fen: int = 0
    order_fen: int = 0
    refunds: int = 0
    refunded_fen: int = 0

    def figures(self) -> dict[str, int]:
        return {
            "consumers": len(self.consumers),
            "sales": self.sales,
            "units": self.units,
            "redeemed_fen": self.redeemed_fen,
            "order_fen": self.order_fen,
            "refunds": self.refunds,
            "refunded_fen": self.refunded_fen,
            "merchants": len(self.merchants),
        }


def oracle(events: Iterable[tuple[str, dict[str, Any]]], kind: str, dated: bool) -> dict[tuple[Any, ...], Expected]:
    """Expected rows of ``kind`` from events alone: per (campaign, category, merchant[, day]),
    per (campaign, category) and the district total."""
    result: dict[tuple[Any, ...], Expected] = defaultdict(Expected)
    if kind == DAY:
        result[(DAY, DISTRICT_TOTAL, "", "", "", None)] = Expected()  # a day always has its total
    for _, event in events:
        if event["type"] not in ("CAPTURED", "REFUNDED"):
            continue
        original = CALENDAR.day_of(datetime.fromtimestamp(event["at_ms"] / 1000, UTC)) if dated else None
        by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for line in event["lines"]:
            by_category[line["c"]].append(line)
        for category, lines in by_category.items():
            keys = [
                (kind, MERCHANT, event["campaign"], category, event["merchant"], original),
                (kind, CATEGORY_TOTAL, event["campaign"], category, "", None),
                (kind, DISTRICT_TOTAL, "", "", "", None),
            ]
            for key in keys:
                expected = result[key]
                if event["type"] == "CAPTURED":
                    expected.sales += 1
                    expected.units += len(lines)
                    expected.redeemed_fen += sum(line["s"] for line in lines)
                    expected.order_fen += sum(line["p"] for line in lines)
                    expected.consumers.add(event["consumer"])
                    expected.merchants.add(event["merchant"])
                else:
                    expected.refunds += 1
                    expected.refunded_fen += sum(line["s"] for line in lines)
    return result


def of_day(events: Iterable[tuple[str, dict[str, Any]]], day: date) -> list[tuple[str, dict[str, Any]]]:
    start, end = CALENDAR.bounds(day)
    return [item for item in events if ms(start) <= item[1]["at_ms"] < ms(end)]


async def stored(connection: asyncpg.Connection, day: date) -> tuple[ReportHeader, list[BudgetLine], list[ReportRow]]:
    async with daily_reports.reading(connection):
        header = await daily_reports.header(connection, day)
        assert header is not None, f"no report for {day}"
        budgets = [line async for line in daily_reports.stream_budgets(connection, day)]
        rows = [row async for row in daily_reports.stream_rows(connection, day)]
    return header, budgets, rows


def row_map(rows: Iterable[ReportRow], kind: str) -> dict[tuple[Any, ...], dict[str, int]]:
    return {
        (row.kind, row.level, row.campaign_id, row.category, row.merchant_id, row.original_date): {
            name: getattr(row.figures, name)
            for name in (
                "consumers",
                "sales",
                "units",
                "redeemed_fen",
                "order_fen",
                "refunds",
                "refunded_fen",
                "merchants",
            )
        }
        for row in rows
        if row.kind == kind
    }


def expected_map(expected: dict[tuple[Any, ...], Expected]) -> dict[tuple[Any, ...], dict[str, int]]:
    return {key: value.figures() for key, value in expected.items()}


def assert_ties_out(budgets: Sequence[BudgetLine], rows: Sequence[ReportRow]) -> None:
    """The published identities, checked again from the stored numbers alone."""
    for line in budgets:
        assert line.opening_spent_fen + line.captured_fen - line.refunded_fen == line.closing_spent_fen, line
        held = line.opening_held_fen + line.held_fen - line.captured_fen - line.released_hold_fen
        assert held == line.closing_held_fen, line
        assert line.remaining_fen == line.budget_fen - line.closing_spent_fen - line.closing_held_fen
    for kind in (DAY, ADJUSTMENT):
        merchants = [row for row in rows if row.kind == kind and row.level == MERCHANT]
        totals = [row for row in rows if row.kind == kind and row.level == CATEGORY_TOTAL]
        for total in totals:
            under = [row for row in merchants if (row.campaign_id, row.category) == (total.campaign_id, total.category)]
            for name in ("sales", "units", "redeemed_fen", "order_fen", "refunds", "refunded_fen"):
                assert getattr(total.figures, name) == sum(getattr(row.figures, name) for row in under), (total, name)
        district = [row for row in rows if row.kind == kind and row.level == DISTRICT_TOTAL]
        if kind == DAY or merchants:
            assert len(district) == 1
            for name in ("sales", "units", "redeemed_fen", "order_fen", "refunds", "refunded_fen"):
                assert getattr(district[0].figures, name) == sum(getattr(row.figures, name) for row in totals)
                assert getattr(district[0].figures, name) == sum(getattr(row.figures, name) for row in merchants)
    for line in budgets:
        rows_of = [
            row
            for row in rows
            if row.level == CATEGORY_TOTAL and (row.campaign_id, row.category) == (line.campaign_id, line.category)
        ]
        assert sum(row.figures.redeemed_fen for row in rows_of) == line.captured_fen
        assert sum(row.figures.refunded_fen for row in rows_of) == line.refunded_fen


async def test_generated_days_tie_out_to_the_fen(services: Services) -> None:
    """Three generated days (refunds, partial refunds, voids, expiries, events across
    midnight), all in the ledger before the first cut: each day's rows equal the oracle's,
    the budgets chain from one day's closing to the next day's opening, and the last closing
    equals the ledger's own balances."""
    events = generated(days=3, payments=3000)
    kinds = {event["type"] for _, event in events}
    assert kinds == {"AUTHORIZED", "CAPTURED", "VOIDED", "EXPIRED", "REFUNDED"}
    partial = [event for _, event in events if event["type"] == "REFUNDED" and event["state"] == "PARTIALLY_REFUNDED"]
    assert partial, "the generated days hold partial refunds"
    async with ledger_database(services) as (_, connection):
        await write(connection, events)
        last_day = FIRST_DAY + timedelta(days=2)
        result = await daily_reports.publish_closed_days(connection, CALENDAR, after_cutoff(last_day), "test")
        assert [header.business_date for header in result.published] == [
            FIRST_DAY + timedelta(days=offset) for offset in range(3)
        ]
        previous: list[BudgetLine] = []
        last_header: ReportHeader | None = None
        for offset in range(3):
            day = FIRST_DAY + timedelta(days=offset)
            header, budgets, rows = await stored(connection, day)
            assert await daily_reports.verify(connection, day) is True
            assert header.adjustment_rows == 0
            assert row_map(rows, DAY) == expected_map(oracle(of_day(events, day), DAY, dated=False))
            assert_ties_out(budgets, rows)
            if previous:
                assert [(line.closing_spent_fen, line.closing_held_fen) for line in previous] == [
                    (line.opening_spent_fen, line.opening_held_fen) for line in budgets
                ]
                assert last_header is not None and header.previous_hash == last_header.content_hash
            previous, last_header = budgets, header
        # The last report's closing balances are the ledger's balances at the end of that day
        # (everything was written, nothing happened after it).
        balances = (await ledger_counters(connection)).budget
        for line in previous:
            assert line.closing_spent_fen == balances.get((line.campaign_id, line.category, "spent"), 0)
            assert line.closing_held_fen == balances.get((line.campaign_id, line.category, "reserved"), 0)
        captured = sum(line["s"] for _, event in events if event["type"] == "CAPTURED" for line in event["lines"])
        assert sum(line.captured_fen for line in previous) + sum(line.opening_spent_fen for line in previous) - sum(
            line.refunded_fen for line in previous
        ) == sum(line.closing_spent_fen for line in previous)
        assert captured > 0


async def test_late_events_appear_as_next_days_adjustments(services: Services) -> None:
    """The writer is down from 23:00 on day 1 until after day 1's cut: the day's report is
    cut without that hour. When the events arrive, day 1's report does not change (same rows,
    same hash, still verifies); day 2's report carries them as adjustments dated day 1, and
    every entry is counted exactly once across the two reports."""
    day1, day2 = FIRST_DAY, FIRST_DAY + timedelta(days=1)
    events = generated(days=2, payments=2000, seed=11)
    outage = ms(day_start(day2) - timedelta(hours=1))
    on_time = [item for item in events if item[1]["at_ms"] < outage]
    late = [item for item in events if item[1]["at_ms"] >= outage]
    async with ledger_database(services) as (_, connection):
        await write(connection, on_time)
        first = await daily_reports.publish_closed_days(connection, CALENDAR, after_cutoff(day1), "test")
        assert [header.business_date for header in first.published] == [day1]
        before = await stored(connection, day1)

        await write(connection, late)
        # Asking again for day 1 changes nothing: it is published.
        again = await daily_reports.publish_closed_days(connection, CALENDAR, after_cutoff(day1), "test", up_to=day1)
        assert again.published == []
        assert await stored(connection, day1) == before
        assert await daily_reports.verify(connection, day1) is True

        second = await daily_reports.publish_closed_days(connection, CALENDAR, after_cutoff(day2), "test")
        assert [header.business_date for header in second.published] == [day2]
        assert await stored(connection, day1) == before
        header, budgets, rows = await stored(connection, day2)
        assert header.previous_hash == before[0].content_hash
        assert header.adjustment_rows > 0
        late_of_day1 = of_day(late, day1)
        assert late_of_day1, "the outage hour had events"
        assert row_map(rows, ADJUSTMENT) == expected_map(oracle(late_of_day1, ADJUSTMENT, dated=True))
        assert row_map(rows, DAY) == expected_map(oracle(of_day(events, day2), DAY, dated=False))
        assert_ties_out(budgets, rows)
        # Day 1's report has the day without its last hour, exactly.
        assert row_map(before[2], DAY) == expected_map(oracle(of_day(on_time, day1), DAY, dated=False))
        # Across both reports every capture and refund is counted once.
        captured = sum(line["s"] for _, event in events if event["type"] == "CAPTURED" for line in event["lines"])
        refunded = sum(line["s"] for _, event in events if event["type"] == "REFUNDED" for line in event["lines"])
        reports = [before[1], budgets]
        assert sum(line.captured_fen for lines in reports for line in lines) == captured
        assert sum(line.refunded_fen for lines in reports for line in lines) == refunded


async def test_catch_up_after_downtime_and_days_without_sales(services: Services) -> None:
    """Nothing published for days (the writer was down): one call publishes every closed day
    in order, including a day without a single event (zero rows but its district total and
    its budgets, carried over); later days' events already in the ledger are not counted in
    earlier days (they are ahead of the cut's day, not in it)."""
    events = [
        item
        for item in generated(days=4, payments=1500, seed=5)
        if CALENDAR.day_of(datetime.fromtimestamp(item[1]["at_ms"] / 1000, UTC)) != FIRST_DAY + timedelta(days=2)
    ]
    async with ledger_database(services) as (_, connection):
        await write(connection, events)
        last = FIRST_DAY + timedelta(days=3)
        result = await daily_reports.publish_closed_days(
            connection, CALENDAR, after_cutoff(last) + timedelta(days=5), "test", up_to=last
        )
        assert [header.business_date for header in result.published] == [
            FIRST_DAY + timedelta(days=n) for n in range(4)
        ]
        _, budgets, rows = await stored(connection, FIRST_DAY + timedelta(days=2))
        assert [row.level for row in rows] == [DISTRICT_TOTAL]
        assert rows[0].figures.sales == 0
        _, previous, _ = await stored(connection, FIRST_DAY + timedelta(days=1))
        assert [(line.closing_spent_fen, line.closing_held_fen) for line in previous] == [
            (line.closing_spent_fen, line.closing_held_fen) for line in budgets
        ]
        for offset in range(4):
            _, budgets, rows = await stored(connection, FIRST_DAY + timedelta(days=offset))
            assert_ties_out(budgets, rows)
            day = FIRST_DAY + timedelta(days=offset)
            assert row_map(rows, DAY) == expected_map(oracle(of_day(events, day), DAY, dated=False))


async def test_a_day_not_closed_is_refused_and_publishing_is_idempotent(services: Services) -> None:
    events = generated(days=1, payments=200, seed=3)
    async with ledger_database(services) as (_, connection):
        await write(connection, events)
        before_cutoff = CALENDAR.closes_at(FIRST_DAY) - timedelta(minutes=1)
        with pytest.raises(DayNotClosed):
            await daily_reports.publish_closed_days(connection, CALENDAR, before_cutoff, "test", up_to=FIRST_DAY)
        assert (await daily_reports.publish_closed_days(connection, CALENDAR, before_cutoff, "test")).published == []
        first = await daily_reports.publish_closed_days(connection, CALENDAR, after_cutoff(FIRST_DAY), "test")
        assert len(first.published) == 1
        again = await daily_reports.publish_closed_days(connection, CALENDAR, after_cutoff(FIRST_DAY), "test")
        assert again.published == [] and again.last_published == FIRST_DAY


async def test_an_empty_ledger_publishes_nothing(services: Services) -> None:
    async with ledger_database(services) as (_, connection):
        result = await daily_reports.publish_closed_days(connection, CALENDAR, after_cutoff(FIRST_DAY), "test")
        assert result.published == [] and result.last_published is None


async def test_published_reports_are_append_only_and_tampering_is_found(services: Services) -> None:
    """UPDATE, DELETE and TRUNCATE of a published report are refused by the database; a row
    altered behind its back (triggers bypassed) no longer matches the content hash."""
    events = generated(days=1, payments=300, seed=9)
    async with ledger_database(services) as (_, connection):
        await write(connection, events)
        await daily_reports.publish_closed_days(connection, CALENDAR, after_cutoff(FIRST_DAY), "test")
        for statement in (
            "UPDATE daily_report_rows SET redeemed_fen = redeemed_fen + 1",
            "DELETE FROM daily_report_budgets",
            "TRUNCATE daily_reports",
            "UPDATE daily_reports SET content_hash = 'x'",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute(statement)
        assert await daily_reports.verify(connection, FIRST_DAY) is True
        await connection.execute("SET session_replication_role = replica")  # bypasses triggers
        try:
            await connection.execute(
                "UPDATE daily_report_rows SET redeemed_fen = redeemed_fen + 1"
                " WHERE business_date = $1 AND position = 1",
                FIRST_DAY,
            )
        finally:
            await connection.execute("SET session_replication_role = origin")
        assert await daily_reports.verify(connection, FIRST_DAY) is False
