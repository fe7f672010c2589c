"""Live supervision's pure rules (server/domain/supervision.py) and its settings: the watch
interval, rates from a window of readings, projected exhaustion (zero burn, refunds making the
net burn negative, a budget exactly used up, a budget of 0), alert thresholds, the merchant
surge rule and today's top merchants."""

from __future__ import annotations

import pytest

from server.config import Config, ConfigError
from server.domain.daily_report import DAY, MERCHANT, Figures, ReportRow
from server.domain.errors import InvalidField
from server.domain.supervision import (
    Reading,
    SurgeRule,
    Window,
    crossed_thresholds,
    projected_exhaustion_ms,
    rates,
    remaining_fen,
    top_merchants,
    used_ratio,
    watch_interval_ms,
)

T0 = 1_800_000_000_000


@pytest.mark.parametrize(("requested", "expected"), [(0, 1000), (1000, 1000), (60_000, 60_000), (2500, 2500)])
def test_accepted_intervals(requested: int, expected: int) -> None:
    """0 means one second; 1,000 to 60,000 ms are taken as they are."""
    assert watch_interval_ms(requested) == expected


@pytest.mark.parametrize("requested", [999, 60_001, 1, -1, -1000])
def test_refused_intervals_name_the_field(requested: int) -> None:
    """Outside 1,000..60,000 (and not 0) is refused naming interval_ms."""
    with pytest.raises(InvalidField) as raised:
        watch_interval_ms(requested)
    assert raised.value.field == "interval_ms"


def reading(at_s: float, reserved: int = 0, spent: int = 0, refunded: int = 0, claimed: int = 0) -> Reading:
    return Reading(T0 + int(at_s * 1000), reserved, spent, refunded, claimed)


def test_rates_over_a_minute() -> None:
    """6,000 fen committed and 3 claims over 30 s is 12,000 fen and 6 claims per minute; a
    qualification returned to the pool is not a negative claim."""
    window = [
        reading(0, 0, 0, 0, 10),
        reading(10, 1000, 0, 0, 12),
        reading(20, 0, 3000, 0, 11),
        reading(30, 0, 6000, 0, 12),
    ]
    result = rates(window)
    assert result.burn_fen_per_minute == 12_000
    assert result.claims_per_minute == pytest.approx(6.0)


def test_rates_need_two_readings() -> None:
    assert rates([]).burn_fen_per_minute == 0
    assert rates([reading(0, 500)]).claims_per_minute == 0.0


def test_refunds_make_net_burn_negative_and_nothing_is_projected() -> None:
    """Spent falls by a refund (the scripts lower spent and raise refunded): the net burn is
    negative, and no exhaustion is projected."""
    result = rates([reading(0, 0, 10_000, 0), reading(60, 0, 4_000, 6_000)])
    assert result.burn_fen_per_minute == -6_000
    assert projected_exhaustion_ms(T0, 100_000, 96_000, result.burn_fen_per_minute) is None


def test_zero_burn_projects_nothing() -> None:
    burn = rates([reading(0, 0, 5000), reading(60, 0, 5000)]).burn_fen_per_minute
    assert burn == 0
    assert projected_exhaustion_ms(T0, 100_000, 95_000, burn) is None


def test_projection_at_the_current_rate_rounds_up() -> None:
    """90,000 fen left at 1,000 fen a minute runs out in 90 minutes; 1 fen left at 3 fen a
    minute in 20,000 ms (never earlier than the arithmetic)."""
    assert projected_exhaustion_ms(T0, 100_000, 90_000, 1_000) == T0 + 90 * 60_000
    assert projected_exhaustion_ms(T0, 100_000, 1, 3) == T0 + 20_000
    assert projected_exhaustion_ms(T0, 100_000, 2, 3) == T0 + 40_000


def test_exactly_exhausted_is_now() -> None:
    """A budget used to the fen is exhausted at the reading, whatever the rate (even none)."""
    used = reading(0, 40_000, 60_000)
    assert remaining_fen(100_000, used) == 0
    assert projected_exhaustion_ms(T0, 100_000, 0, 0) == T0
    assert projected_exhaustion_ms(T0, 100_000, 0, 500) == T0
    assert used_ratio(100_000, used) == 1.0


def test_budget_zero() -> None:
    """A budget of 0 has nothing to exhaust, a used ratio of 0 and crosses no threshold."""
    assert projected_exhaustion_ms(T0, 0, 0, 1000) is None
    assert used_ratio(0, reading(0)) == 0.0
    assert crossed_thresholds(0, 0, (80, 90, 100)) == []


def test_thresholds_in_integers() -> None:
    """80 % of 1,000 fen is crossed at exactly 800 fen, not at 799."""
    assert crossed_thresholds(1000, 799, (80, 90, 100)) == []
    assert crossed_thresholds(1000, 800, (80, 90, 100)) == [80]
    assert crossed_thresholds(1000, 1000, (80, 90, 100)) == [80, 90, 100]


def test_window_keeps_a_minute() -> None:
    """Readings older than the window fall out, except the newest one before it, so the span
    covers the whole minute; a repeated instant is ignored."""
    window = Window()
    for second in range(0, 181, 1):
        window.add(reading(second, 0, max(0, second - 120) * 100))  # flat for two minutes, then 100 fen/s
    window.add(reading(180, 0, 999_999))
    assert window.rates().burn_fen_per_minute == 6_000


def test_surge_rule() -> None:
    """Far above its own hourly baseline and at least min_sales: a surge; a flat merchant, or
    too few sales, is not; without history min_sales alone decides."""
    rule = SurgeRule(factor=5.0, min_sales=20, baseline_hours=168)
    assert rule.is_surge(last_hour_sales=30, baseline_sales=168)  # 30 > 5 x 1 per hour
    assert not rule.is_surge(last_hour_sales=30, baseline_sales=30 * 168)  # flat
    assert not rule.is_surge(last_hour_sales=19, baseline_sales=0)  # too few
    assert rule.is_surge(last_hour_sales=20, baseline_sales=0)
    assert not rule.is_surge(last_hour_sales=30, baseline_sales=6 * 168)  # 30 = 5 x 6: not above
    with pytest.raises(ValueError):
        SurgeRule(factor=1.0)
    with pytest.raises(ValueError):
        SurgeRule(min_sales=0)


def row(merchant: str, sales: int, redeemed: int, category: str = "fridge") -> ReportRow:
    return ReportRow(
        DAY,
        MERCHANT,
        None,
        "c-main",
        "Main",
        category,
        merchant,
        merchant.upper(),
        Figures(sales=sales, redeemed_fen=redeemed),
    )


def test_top_merchants_sum_their_categories() -> None:
    rows = [row("m-a", 1, 500), row("m-b", 2, 400), row("m-b", 1, 300, "tv"), row("m-c", 5, 100)]
    top = top_merchants(rows, 2)
    assert [(item.merchant_id, item.sales, item.redeemed_fen) for item in top] == [("m-b", 3, 700), ("m-a", 1, 500)]


@pytest.mark.parametrize(
    "text", ["", "80,,90", "90,80", "80,80", "0,50", "50,101", "8O", "80;90", "1,2,3,4,5,6,7,8,9,10,11"]
)
def test_alert_thresholds_setting_is_validated(text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config(alert_thresholds=text)
    assert "SUBSIDY_ALERT_THRESHOLDS" in str(raised.value)


def test_alert_thresholds_setting() -> None:
    assert Config(alert_thresholds=" 50, 75,100").alert_threshold_percents == (50, 75, 100)
    assert Config.from_env({"SUBSIDY_ALERT_THRESHOLDS": "95"}).alert_threshold_percents == (95,)
    with pytest.raises(ConfigError, match="SUBSIDY_SUPERVISION_POLL_MS"):
        Config(supervision_poll_ms=50)
    with pytest.raises(ConfigError, match="SUBSIDY_SURGE_FACTOR"):
        Config(surge_factor=1.0)


def test_per_campaign_thresholds() -> None:
    """SUBSIDY_ALERT_THRESHOLDS_BY_CAMPAIGN overrides the thresholds of the campaigns it names."""
    config = Config.from_env({"SUBSIDY_ALERT_THRESHOLDS_BY_CAMPAIGN": "c-main=50,75,100; c-voucher=95"})
    assert config.alert_threshold_overrides == {"c-main": (50, 75, 100), "c-voucher": (95,)}
    assert Config().alert_threshold_overrides == {}


@pytest.mark.parametrize("text", ["c-main", "c-main=", "c main=50", "c-main=90,80", "c-main=50;c-main=60", "=50"])
def test_per_campaign_thresholds_are_validated(text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config(alert_thresholds_by_campaign=text)
    assert "SUBSIDY_ALERT_THRESHOLDS_BY_CAMPAIGN" in str(raised.value)
