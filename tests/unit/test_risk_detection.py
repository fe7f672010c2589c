"""The offline risk detectors' pure rules (issue 14, section 2): each threshold's edge, and the
case states' moves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from server.domain.risk_detection import (
    BURST_MIN_CONSUMERS,
    BURST_WINDOW_S,
    CAPPED_SHARE,
    CONFIRMED,
    DISMISSED,
    LATE_REFUND_MIN,
    NEW,
    REVIEWING,
    SHARE_MIN_LINES,
    Hop,
    InvalidCaseTransition,
    LateRefunds,
    Sale,
    ShareStats,
    check_case_transition,
    distance_km,
    impossible_travel,
    late_refund_finding,
    share_anomaly,
    terminal_bursts,
    threshold_band,
)

T0 = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


def stats(hits: int, lines: int, category_hits: int, category_lines: int) -> ShareStats:
    return ShareStats("c", "fridge", "m", hits, lines, category_hits, category_lines)


def test_share_anomaly_needs_enough_lines_excess_and_significance() -> None:
    """Flagged only with enough lines, a large excess over the rest of the category and a high z."""
    assert share_anomaly(
        CAPPED_SHARE, stats(SHARE_MIN_LINES, SHARE_MIN_LINES, SHARE_MIN_LINES + 200, 1_000 + SHARE_MIN_LINES)
    )
    assert share_anomaly(CAPPED_SHARE, stats(SHARE_MIN_LINES - 1, SHARE_MIN_LINES - 1, 219, 1_019)) is None
    # 40 % against a norm of 20 %: an excess of 0.20 is below the practical difference.
    assert share_anomaly(CAPPED_SHARE, stats(40, 100, 240, 1_100)) is None
    # 50 % against 20 %, but on 20 lines only: z = 3.35, could be chance.
    assert share_anomaly(CAPPED_SHARE, stats(10, 20, 210, 1_020)) is None
    # No peers: nothing to compare with.
    assert share_anomaly(CAPPED_SHARE, stats(30, 30, 30, 30)) is None
    found = share_anomaly(CAPPED_SHARE, stats(60, 100, 260, 1_100))
    assert found is not None and found.evidence["share"] == 0.6 and found.evidence["category_norm"] == 0.2


def test_threshold_band_is_five_percent_above() -> None:
    assert threshold_band(8_000) == (8_000, 8_400)


def sale(terminal: str, seconds: int, consumer: str) -> Sale:
    return Sale(terminal, T0 + timedelta(seconds=seconds), consumer, f"a{seconds}{consumer}")


def test_bursts_count_distinct_consumers_within_the_window() -> None:
    """N distinct consumers inside the window are a burst; N-1, the same consumer repeated, or
    N spread just wider than the window are not."""
    step = BURST_WINDOW_S // (BURST_MIN_CONSUMERS - 1)
    burst = [sale("t1", index * step, f"c{index}") for index in range(BURST_MIN_CONSUMERS)]
    assert [finding.subject_id for finding in terminal_bursts(burst)] == ["t1"]
    assert not list(terminal_bursts(burst[:-1]))
    assert not list(terminal_bursts([sale("t1", index, "same") for index in range(50)]))
    wide = BURST_WINDOW_S // (BURST_MIN_CONSUMERS - 1) + 1
    assert not list(terminal_bursts([sale("t1", index * wide, f"c{index}") for index in range(BURST_MIN_CONSUMERS)]))
    # Two terminals' sales interleaved by terminal order do not add up.
    half = BURST_MIN_CONSUMERS // 2
    split = [sale("t1", index, f"c{index}") for index in range(half)] + [
        sale("t2", index, f"d{index}") for index in range(half)
    ]
    assert not list(terminal_bursts(split))


def hop(consumer: str, minutes: float, latitude_to: float) -> Hop:
    start = T0 + timedelta(hours=len(consumer))
    return Hop(
        consumer,
        "s1",
        "s2",
        "m1",
        "m2",
        start,
        start + timedelta(minutes=minutes),
        30.0,
        120.0,
        latitude_to,
        120.0,
        "a",
    )


def test_distance_and_impossible_travel() -> None:
    """0.1 degree of latitude is about 11.1 km; two hops of 11 km in 5 minutes are impossible,
    the same in 15 minutes (44 km/h) or a short hop across a shopping centre are not."""
    assert distance_km(30.0, 120.0, 30.1, 120.0) == pytest.approx(11.12, abs=0.01)
    assert [finding.subject_id for finding in impossible_travel([hop("k", 5, 30.1), hop("k", 5, 30.1)])] == ["k"]
    assert not list(impossible_travel([hop("k", 5, 30.1)]))
    assert not list(impossible_travel([hop("k", 15, 30.1), hop("k", 15, 30.1)]))
    assert not list(impossible_travel([hop("k", 0.5, 30.01), hop("k", 0.5, 30.01)]))


def test_late_refunds_threshold() -> None:
    assert late_refund_finding(LateRefunds("m", LATE_REFUND_MIN, 10, [])) is not None
    assert late_refund_finding(LateRefunds("m", LATE_REFUND_MIN - 1, 10, [])) is None


def test_case_transitions() -> None:
    """NEW -> REVIEWING -> CONFIRMED / DISMISSED; NEW may be dismissed; closed cases stay closed."""
    check_case_transition(NEW, REVIEWING)
    check_case_transition(NEW, DISMISSED)
    check_case_transition(REVIEWING, CONFIRMED)
    check_case_transition(REVIEWING, DISMISSED)
    for state, to_state in ((NEW, CONFIRMED), (CONFIRMED, DISMISSED), (DISMISSED, REVIEWING), (REVIEWING, NEW)):
        with pytest.raises(InvalidCaseTransition):
            check_case_transition(state, to_state)
