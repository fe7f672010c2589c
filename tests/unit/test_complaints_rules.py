"""The complaints desk's pure rules: ticket moves, ticket text, and the SLA's business days
across weekends and at the 0 / 1 / maximum boundaries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from server.domain import complaints
from server.domain.complaints import (
    IN_PROGRESS,
    OPEN,
    REJECTED,
    RESOLVED,
    SLA_BUSINESS_DAYS_MAX,
    InvalidTransition,
    SlaPolicy,
    add_business_days,
    canonical_text,
    check_transition,
    sla_status,
)
from server.domain.errors import InvalidField
from server.domain.identity import check_digit

SHANGHAI = ZoneInfo("Asia/Shanghai")


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=SHANGHAI)


# 2026-12-04 is a Friday, 12-05 Saturday, 12-06 Sunday, 12-07 Monday.
FRIDAY_15 = local(2026, 12, 4, 15)


def test_valid_moves_are_exactly_the_documented_ones() -> None:
    """OPEN -> IN_PROGRESS | RESOLVED | REJECTED, IN_PROGRESS -> RESOLVED | REJECTED; nothing else."""
    allowed = {
        (OPEN, IN_PROGRESS),
        (OPEN, RESOLVED),
        (OPEN, REJECTED),
        (IN_PROGRESS, RESOLVED),
        (IN_PROGRESS, REJECTED),
    }
    for state in complaints.STATES:
        for to_state in complaints.STATES:
            if (state, to_state) in allowed:
                check_transition(state, to_state)
            else:
                with pytest.raises(InvalidTransition):
                    check_transition(state, to_state)


def test_text_is_nfkc_trimmed_and_bounded() -> None:
    """Full-width characters fold to ASCII, CR LF becomes LF, and the limit counts the result."""
    assert canonical_text("  ＡＢＣ１２３\r\n第二行  ", "text") == "ABC123\n第二行"
    assert len(canonical_text("退" * 2000, "text")) == 2000
    with pytest.raises(InvalidField, match="at most 2000"):
        canonical_text("退" * 2001, "text")
    # NFKC can lengthen text: the limit applies after it (U+FDFA is 18 characters in NFKC).
    with pytest.raises(InvalidField, match="at most 10"):
        canonical_text("\ufdfa", "text", chars_max=10)


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
def test_empty_text_is_refused(value: str) -> None:
    with pytest.raises(InvalidField, match="is required"):
        canonical_text(value, "text")


@pytest.mark.parametrize("character", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\u202e", "\u2066", "\ue000", "\ud800"])
def test_control_and_unassigned_characters_are_refused(character: str) -> None:
    """C0 and C1 controls, DEL, bidi overrides and isolates, private use, lone surrogates."""
    with pytest.raises(InvalidField) as raised:
        canonical_text(f"abc{character}def", "text")
    assert raised.value.field == "text"
    assert f"U+{ord(character):04X}" in raised.value.reason


def test_newline_tab_and_emoji_are_text() -> None:
    assert canonical_text("第一\t二\n三 👍", "text") == "第一\t二\n三 👍"


def test_one_business_day_over_a_weekend() -> None:
    """Friday 15:00 + 1 business day is Monday 15:00; + 5 is the next Friday 15:00."""
    assert add_business_days(FRIDAY_15, 1, SHANGHAI) == local(2026, 12, 7, 15).astimezone(UTC)
    assert add_business_days(FRIDAY_15, 5, SHANGHAI) == local(2026, 12, 11, 15).astimezone(UTC)


def test_weekday_within_a_week() -> None:
    monday_9 = local(2026, 12, 7, 9)
    assert add_business_days(monday_9, 1, SHANGHAI) == local(2026, 12, 8, 9).astimezone(UTC)
    assert add_business_days(monday_9, 4, SHANGHAI) == local(2026, 12, 11, 9).astimezone(UTC)
    assert add_business_days(monday_9, 5, SHANGHAI) == local(2026, 12, 14, 9).astimezone(UTC)


@pytest.mark.parametrize("opened", [local(2026, 12, 5, 10, 30), local(2026, 12, 6, 23, 59)])
def test_opened_at_the_weekend_counts_from_monday_midnight(opened: datetime) -> None:
    """0 days: due Monday 00:00; 1 day: Tuesday 00:00."""
    assert add_business_days(opened, 0, SHANGHAI) == local(2026, 12, 7).astimezone(UTC)
    assert add_business_days(opened, 1, SHANGHAI) == local(2026, 12, 8).astimezone(UTC)


def test_zero_days_on_a_weekday_is_due_at_once() -> None:
    assert add_business_days(FRIDAY_15, 0, SHANGHAI) == FRIDAY_15.astimezone(UTC)


def test_maximum_days_span_six_weeks() -> None:
    """30 business days from a Friday are six calendar weeks later, same hour."""
    assert add_business_days(FRIDAY_15, SLA_BUSINESS_DAYS_MAX, SHANGHAI) == (FRIDAY_15 + timedelta(weeks=6)).astimezone(
        UTC
    )


def test_business_day_is_shanghai_not_utc() -> None:
    """Friday 23:30 in Shanghai is Friday 15:30 UTC: the next business day is Monday, not Saturday."""
    friday_late = local(2026, 12, 4, 23, 30).astimezone(UTC)
    assert add_business_days(friday_late, 1, SHANGHAI) == local(2026, 12, 7, 23, 30).astimezone(UTC)
    # Saturday 00:30 Shanghai is still Friday in UTC; it counts from Monday.
    saturday_early = local(2026, 12, 5, 0, 30).astimezone(UTC)
    assert add_business_days(saturday_early, 1, SHANGHAI) == local(2026, 12, 8).astimezone(UTC)


def test_naive_or_negative_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        add_business_days(datetime(2026, 12, 4), 1, SHANGHAI)
    with pytest.raises(ValueError):
        add_business_days(FRIDAY_15, -1, SHANGHAI)


def test_policy_bounds() -> None:
    """0 and the maximum are valid; beyond them, or a first reply due after resolution, is not."""
    SlaPolicy(0, 0)
    SlaPolicy(SLA_BUSINESS_DAYS_MAX, SLA_BUSINESS_DAYS_MAX)
    for first, resolution in ((-1, 5), (1, SLA_BUSINESS_DAYS_MAX + 1), (3, 2)):
        with pytest.raises(ValueError):
            SlaPolicy(first, resolution)
    with pytest.raises(ValueError):
        SlaPolicy(1, 5, "Mars/Olympus")


def test_overdue_flags() -> None:
    """A deadline missed is flagged whether the work is still undone or was done late; work done
    exactly at the deadline is on time."""
    policy = SlaPolicy(1, 5)
    first_due, resolution_due = policy.deadlines(FRIDAY_15)
    on_time = sla_status(first_due, resolution_due, first_due, resolution_due, resolution_due + timedelta(days=30))
    assert not on_time.any
    waiting = sla_status(first_due, resolution_due, None, None, first_due + timedelta(seconds=1))
    assert waiting.first_reply_overdue and not waiting.resolution_overdue
    late = sla_status(first_due, resolution_due, first_due + timedelta(seconds=1), None, first_due)
    assert late.first_reply_overdue
    never_closed = sla_status(first_due, resolution_due, first_due, None, resolution_due + timedelta(seconds=1))
    assert never_closed.resolution_overdue and not never_closed.first_reply_overdue


def test_day_start_is_the_business_time_zone_midnight() -> None:
    policy = SlaPolicy()
    assert policy.day_start(local(2026, 12, 4, 0, 10).astimezone(UTC)) == local(2026, 12, 4).astimezone(UTC)
    assert policy.business_date(local(2026, 12, 4, 0, 10).astimezone(UTC)).isoformat() == "2026-12-04"


def test_config_bounds_agree_with_the_rules() -> None:
    """server/config.py cannot import the domain; its bound must be the domain's, and every
    configuration it accepts must build a policy."""
    from server.config import TICKET_SLA_BUSINESS_DAYS_MAX, Config, ConfigError

    assert TICKET_SLA_BUSINESS_DAYS_MAX == SLA_BUSINESS_DAYS_MAX
    config = Config(ticket_first_reply_business_days=0, ticket_resolution_business_days=SLA_BUSINESS_DAYS_MAX)
    SlaPolicy(config.ticket_first_reply_business_days, config.ticket_resolution_business_days, config.report_timezone)
    for first, resolution in ((2, 1), (0, SLA_BUSINESS_DAYS_MAX + 1), (-1, 1)):
        with pytest.raises(ConfigError, match="SUBSIDY_TICKET_"):
            Config(ticket_first_reply_business_days=first, ticket_resolution_business_days=resolution)
    with pytest.raises(ConfigError, match="SUBSIDY_TICKET_DAILY_LIMIT_PER_CONSUMER"):
        Config(ticket_daily_limit_per_consumer=0)


def test_personal_numbers_in_text_are_refused_without_being_repeated() -> None:
    """A resident ID number (check character right, full-width digits folded by NFKC first) or a
    mobile number in the text is refused; the reason gives the position, never the number. An
    order number of 18 digits whose check character is wrong, and shorter numbers, are text."""
    first = "33010919900101123"
    number = first + check_digit(first)
    wrong = first + ("0" if number[-1] != "0" else "1")
    for text in (f"我的身份证 {number}", "电话１３８１２３４５６７８请回电", f"x{number.lower()}y"):
        with pytest.raises(InvalidField) as raised:
            canonical_text(text, "text")
        assert number not in raised.value.reason and "13812345678" not in raised.value.reason
    assert canonical_text(f"订单号 {wrong}", "text") == f"订单号 {wrong}"
    assert canonical_text("金额 1380 元, 编号 123456789012", "text") == "金额 1380 元, 编号 123456789012"
