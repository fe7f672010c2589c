"""Live fund supervision, the pure part: how often a watcher may be sent a snapshot, the rates
a sliding window of budget readings gives, when a budget runs out at that rate, which alert
thresholds a budget has crossed, and when a merchant's sales are a surge.

The poller (server/services/supervision.py) reads every budget's counters once per second and
keeps the last minute of readings per budget here; everything below is arithmetic on them, so
it is tested without Redis, PostgreSQL or a clock.

Counters are the scripts' own (storage/redis/budget.py): ``reserved`` (holds), ``spent``
(captured, already net of refunds: a refund lowers spent and raises ``refunded``) and the
qualifications ``claimed`` (lowered when a qualification returns to the pool). So a budget's
committed money is reserved + spent and its remaining money budget - reserved - spent.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from server.domain.daily_report import DAY, MERCHANT, ReportRow
from server.domain.errors import InvalidField

INTERVAL_MS_DEFAULT = 1_000
INTERVAL_MS_MIN = 1_000
INTERVAL_MS_MAX = 60_000
WINDOW_MS = 60_000
MINUTE_MS = 60_000


def watch_interval_ms(requested: int, field: str = "interval_ms") -> int:
    """The interval between a watcher's snapshots: 0 means the default (one second); otherwise
    1,000 to 60,000 ms (never more often than the poller reads)."""
    if requested == 0:
        return INTERVAL_MS_DEFAULT
    if not INTERVAL_MS_MIN <= requested <= INTERVAL_MS_MAX:
        raise InvalidField(field, f"must be 0 (one second) or {INTERVAL_MS_MIN} to {INTERVAL_MS_MAX} milliseconds")
    return requested


@dataclass(frozen=True)
class Reading:
    """One budget's counters at one poll (Redis TIME, in ms)."""

    at_ms: int
    reserved_fen: int
    spent_fen: int
    refunded_fen: int
    claimed: int

    @property
    def committed_fen(self) -> int:
        return self.reserved_fen + self.spent_fen


@dataclass(frozen=True)
class Rates:
    claims_per_minute: float
    burn_fen_per_minute: int


NO_RATES = Rates(0.0, 0)


class Window:
    """The readings of one budget over the last ``window_ms`` (plus the newest reading older
    than that, so the span always covers the whole window once it has filled). Bounded: one
    reading per poll, and polls are at least a second apart, so at most window/poll + 2."""

    def __init__(self, window_ms: int = WINDOW_MS, max_readings: int = 256) -> None:
        if window_ms <= 0 or max_readings < 2:
            raise ValueError("window_ms must be positive and max_readings at least 2")
        self._window_ms = window_ms
        self._readings: deque[Reading] = deque(maxlen=max_readings)

    def add(self, reading: Reading) -> None:
        if self._readings and reading.at_ms <= self._readings[-1].at_ms:
            return  # the same instant read twice (or a clock step back) adds nothing
        self._readings.append(reading)
        while len(self._readings) > 2 and self._readings[1].at_ms <= reading.at_ms - self._window_ms:
            self._readings.popleft()

    def rates(self) -> Rates:
        return rates(list(self._readings))


def rates(readings: Sequence[Reading]) -> Rates:
    """Per-minute rates over the readings (oldest first): claims are the increases of the
    claimed counter (a return to the pool is not a negative claim); burn is the change of
    reserved + spent, so refunds and released holds make it smaller or negative."""
    if len(readings) < 2:
        return NO_RATES
    first, last = readings[0], readings[-1]
    span_ms = last.at_ms - first.at_ms
    if span_ms <= 0:
        return NO_RATES
    claims = sum(max(0, later.claimed - earlier.claimed) for earlier, later in itertools.pairwise(readings))
    burn = (last.committed_fen - first.committed_fen) * MINUTE_MS / span_ms
    return Rates(claims * MINUTE_MS / span_ms, round(burn))


def remaining_fen(budget_fen: int, reading: Reading) -> int:
    return budget_fen - reading.committed_fen


def used_ratio(budget_fen: int, reading: Reading) -> float:
    """Committed over budget, clamped to 0..1; 0 for a budget of 0 (nothing to use up)."""
    if budget_fen <= 0:
        return 0.0
    return min(1.0, max(0.0, reading.committed_fen / budget_fen))


def projected_exhaustion_ms(now_ms: int, budget_fen: int, remaining: int, burn_fen_per_minute: int) -> int | None:
    """When ``remaining`` reaches zero at the burn rate: ``now_ms`` when it is zero or less
    already, None when nothing burns (zero or negative net burn) or the budget is 0 (there is
    nothing to exhaust). Rounded up to the millisecond, so it is never earlier than the math."""
    if budget_fen <= 0:
        return None
    if remaining <= 0:
        return now_ms
    if burn_fen_per_minute <= 0:
        return None
    return now_ms + -(-remaining * MINUTE_MS // burn_fen_per_minute)


def crossed_thresholds(budget_fen: int, committed_fen: int, thresholds: Iterable[int]) -> list[int]:
    """The thresholds (percent) the budget has reached: committed * 100 >= threshold * budget,
    in integers so 80 % of 1,000 fen is crossed at exactly 800 fen. A budget of 0 crosses none."""
    if budget_fen <= 0:
        return []
    return [threshold for threshold in thresholds if committed_fen * 100 >= threshold * budget_fen]


@dataclass(frozen=True)
class SurgeRule:
    """A merchant surges when its captured sales in the last hour are at least ``min_sales`` and
    more than ``factor`` times its own average per hour over the ``baseline_hours`` before that
    hour (a merchant without history has a baseline of 0, so ``min_sales`` alone decides)."""

    factor: float = 5.0
    min_sales: int = 20
    baseline_hours: int = 7 * 24

    def __post_init__(self) -> None:
        if not 1.0 < self.factor <= 1000.0:
            raise ValueError("surge factor must be above 1 and at most 1000")
        if not 1 <= self.min_sales <= 1_000_000:
            raise ValueError("surge min_sales must be 1 to 1,000,000")
        if not 1 <= self.baseline_hours <= 90 * 24:
            raise ValueError("surge baseline_hours must be 1 to 2160")

    def baseline_per_hour(self, baseline_sales: int) -> float:
        return baseline_sales / self.baseline_hours

    def is_surge(self, last_hour_sales: int, baseline_sales: int) -> bool:
        if last_hour_sales < self.min_sales:
            return False
        return last_hour_sales > self.factor * self.baseline_per_hour(baseline_sales)


@dataclass(frozen=True)
class MerchantTotal:
    merchant_id: str
    merchant_name: str
    sales: int
    redeemed_fen: int
    order_fen: int
    refunded_fen: int


def top_merchants(rows: Iterable[ReportRow], limit: int) -> list[MerchantTotal]:
    """The day's merchants by redeemed subsidy (then sales, then id), summed over their
    campaign x category rows of the day (not adjustments)."""
    totals: dict[str, list[int]] = {}
    names: dict[str, str] = {}
    for row in rows:
        if row.kind != DAY or row.level != MERCHANT:
            continue
        figures = row.figures
        total = totals.setdefault(row.merchant_id, [0, 0, 0, 0])
        total[0] += figures.sales
        total[1] += figures.redeemed_fen
        total[2] += figures.order_fen
        total[3] += figures.refunded_fen
        names[row.merchant_id] = row.merchant_name
    ranked = sorted(totals.items(), key=lambda item: (-item[1][1], -item[1][0], item[0]))
    return [MerchantTotal(merchant, names[merchant], *figures) for merchant, figures in ranked[:limit]]
