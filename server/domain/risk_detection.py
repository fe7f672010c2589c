"""Offline risk detection's rules (issue 14, section 2): what each detector over the PostgreSQL
ledger calls suspicious, with its threshold, and the states of the case a finding becomes.

The SQL that gathers the figures is storage/postgres/risk.py; the decisions are here, pure, so
that each threshold is written once and unit-tested. The detectors and why they matter:

- ``CAPPED_SHARE`` (merchant): the share of a merchant's subsidised lines whose subsidy is
  exactly the rule's cap, against the same campaign category at every other merchant. Prices
  raised before the discount push a sale to the cap; a merchant doing it sells "at the cap" far
  more often than its peers.
- ``THRESHOLD_CLUSTER`` (merchant): the share of a merchant's lines priced just above a FIXED
  rule's threshold ([threshold, threshold + 5 %]), against the category's other merchants.
  Fabricated or padded sales are priced to the smallest amount that unlocks the voucher.
- ``TERMINAL_BURST`` (terminal): many distinct consumers captured at one terminal within a
  few minutes. A voucher broker redeems the vouchers he bought, one consumer after another,
  faster than a cashier serves real customers.
- ``IMPOSSIBLE_TRAVEL`` (consumer key): one consumer redeeming at physical stores so far apart
  in so little time that nobody could have travelled between them: a shared or sold identity.
- ``LATE_REFUND`` (merchant): refunds of voucher sales made just after the voucher's validity
  ended. A refund after expiry does not put the voucher back in the pool, so a sale made only to
  consume a voucher and undone the next morning turns the voucher into cash or keeps it from
  others.

Thresholds favour precision over recall: each finding is a case a person reviews.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

CAPPED_SHARE = "CAPPED_SHARE"
THRESHOLD_CLUSTER = "THRESHOLD_CLUSTER"
TERMINAL_BURST = "TERMINAL_BURST"
IMPOSSIBLE_TRAVEL = "IMPOSSIBLE_TRAVEL"
LATE_REFUND = "LATE_REFUND"
DETECTORS = (CAPPED_SHARE, THRESHOLD_CLUSTER, TERMINAL_BURST, IMPOSSIBLE_TRAVEL, LATE_REFUND)

MERCHANT, TERMINAL, CONSUMER = "MERCHANT", "TERMINAL", "CONSUMER"

# Share anomalies (CAPPED_SHARE, THRESHOLD_CLUSTER). A merchant is compared with the rest of its
# campaign category (itself left out, so a dominant merchant does not set its own norm). It is
# flagged when all three hold: enough lines to judge (SHARE_MIN_LINES), a share at least
# SHARE_EXCESS_MIN above the norm (a practical difference), and a binomial z-score of at least
# SHARE_Z_MIN (not chance: at z = 4 an honest merchant is flagged about once in 30,000).
SHARE_MIN_LINES = 20
SHARE_EXCESS_MIN = 0.25
SHARE_Z_MIN = 4.0
# The norm is floored so a category where nobody sells at the cap does not make one merchant's
# two capped sales an infinite z-score.
SHARE_NORM_FLOOR = 0.01
# "Just above" a threshold: from the threshold up to 5 % over it.
THRESHOLD_BAND_BP = 500

# TERMINAL_BURST: at least BURST_MIN_CONSUMERS distinct consumers captured at one terminal
# within BURST_WINDOW_S. A cashier ringing up real goods needs about a minute a customer; ten
# customers in five minutes is a person redeeming a stack of vouchers.
BURST_WINDOW_S = 300
BURST_MIN_CONSUMERS = 10

# IMPOSSIBLE_TRAVEL: two consecutive sales of one consumer at physical stores at least
# TRAVEL_MIN_DISTANCE_KM apart (below it: store coordinates' own error, one shopping centre)
# implying more than TRAVEL_MAX_SPEED_KMH (faster than driving across the district) are an
# impossible hop; a consumer with at least TRAVEL_MIN_HOPS of them in the window is flagged.
# Hops further apart than TRAVEL_MAX_GAP_S are never impossible inside a district (about 40 km
# across), so the SQL does not return them.
TRAVEL_MIN_DISTANCE_KM = 2.0
TRAVEL_MAX_SPEED_KMH = 80.0
TRAVEL_MIN_HOPS = 2
TRAVEL_MAX_GAP_S = 3_600
EARTH_RADIUS_KM = 6_371.0088

# LATE_REFUND: a refund within LATE_REFUND_WINDOW_S after the voucher's expiry is "right
# after"; a merchant with at least LATE_REFUND_MIN of them in the window is flagged.
LATE_REFUND_WINDOW_S = 86_400
LATE_REFUND_MIN = 3

# Evidence lists are bounded so a case stays readable and its JSON small.
EVIDENCE_ITEMS_MAX = 20

# Cases.
NEW, REVIEWING, CONFIRMED, DISMISSED = "NEW", "REVIEWING", "CONFIRMED", "DISMISSED"
CASE_STATES = (NEW, REVIEWING, CONFIRMED, DISMISSED)
CLOSED_CASE_STATES = frozenset({CONFIRMED, DISMISSED})
CASE_TRANSITIONS: dict[str, frozenset[str]] = {
    NEW: frozenset({REVIEWING, DISMISSED}),
    REVIEWING: frozenset({CONFIRMED, DISMISSED}),
    CONFIRMED: frozenset(),
    DISMISSED: frozenset(),
}


class InvalidCaseTransition(Exception):
    """A move the case's state does not allow (FAILED_PRECONDITION, INVALID_STATE)."""

    def __init__(self, state: str, to_state: str) -> None:
        super().__init__(f"a case in state {state} cannot move to {to_state}")
        self.state = state
        self.to_state = to_state


def check_case_transition(state: str, to_state: str) -> None:
    if to_state not in CASE_TRANSITIONS.get(state, frozenset()):
        raise InvalidCaseTransition(state, to_state)


@dataclass(frozen=True)
class Finding:
    """One suspicious subject in a window. ``dedup_key`` names it within the window, so running
    the detector again over the same window finds the same key and adds no second case."""

    detector: str
    subject_kind: str
    subject_id: str
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)

    def dedup_key(self, window_from: datetime, window_to: datetime, scope: str = "") -> str:
        parts = [
            self.detector,
            self.subject_kind,
            self.subject_id,
            scope,
            window_from.isoformat(),
            window_to.isoformat(),
        ]
        return "|".join(parts)


# ---- share anomalies ------------------------------------------------------------------------


@dataclass(frozen=True)
class ShareStats:
    """One merchant's lines in a campaign category, and the category's at every merchant."""

    campaign_id: str
    category: str
    merchant_id: str
    hits: int  # the merchant's lines with the property (capped, just above the threshold)
    lines: int  # the merchant's lines
    category_hits: int  # every merchant's, this one included
    category_lines: int


def share_z_score(hits: int, lines: int, norm: float) -> float:
    """How many standard deviations ``hits`` of ``lines`` lies above a binomial with rate ``norm``."""
    norm = min(max(norm, SHARE_NORM_FLOOR), 1 - SHARE_NORM_FLOOR)
    return (hits - lines * norm) / math.sqrt(lines * norm * (1 - norm))


def share_anomaly(detector: str, stats: ShareStats) -> Finding | None:
    """A finding when the merchant's share is anomalous against the rest of the category."""
    if stats.lines < SHARE_MIN_LINES:
        return None
    others = stats.category_lines - stats.lines
    if others <= 0:
        return None  # no peers to compare with
    norm = (stats.category_hits - stats.hits) / others
    share = stats.hits / stats.lines
    if share - norm < SHARE_EXCESS_MIN:
        return None
    z_score = share_z_score(stats.hits, stats.lines, norm)
    if z_score < SHARE_Z_MIN:
        return None
    return Finding(
        detector,
        MERCHANT,
        stats.merchant_id,
        round(z_score, 2),
        {
            "campaign_id": stats.campaign_id,
            "category": stats.category,
            "lines": stats.lines,
            "hits": stats.hits,
            "share": round(share, 4),
            "category_norm": round(norm, 4),
            "z_score": round(z_score, 2),
        },
    )


def threshold_band(threshold_fen: int) -> tuple[int, int]:
    """Line prices counted as "just above" a threshold: both ends included."""
    return threshold_fen, threshold_fen + threshold_fen * THRESHOLD_BAND_BP // 10_000


# ---- terminal bursts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sale:
    subject_id: str  # the terminal (bursts) or the consumer key (travel)
    at: datetime
    other_id: str  # the consumer (bursts) or the store (travel)
    authorization_id: str


def terminal_bursts(sales: Iterable[Sale]) -> Iterator[Finding]:
    """Sales ordered by terminal then time -> one finding per terminal with a burst, whose
    evidence is its largest burst. Holds one terminal's sliding window at a time."""
    current: str | None = None
    window: deque[Sale] = deque()
    best: list[Sale] = []
    for sale in sales:
        if sale.subject_id != current:
            if current is not None and best:
                yield _burst_finding(current, best)
            current, best = sale.subject_id, []
            window.clear()
        window.append(sale)
        while (sale.at - window[0].at).total_seconds() > BURST_WINDOW_S:
            window.popleft()
        consumers = {item.other_id for item in window}
        if len(consumers) >= BURST_MIN_CONSUMERS and len(consumers) > len({item.other_id for item in best}):
            best = list(window)
    if current is not None and best:
        yield _burst_finding(current, best)


def _burst_finding(terminal_id: str, burst: list[Sale]) -> Finding:
    consumers = len({sale.other_id for sale in burst})
    return Finding(
        TERMINAL_BURST,
        TERMINAL,
        terminal_id,
        float(consumers),
        {
            "distinct_consumers": consumers,
            "sales": len(burst),
            "first_at": burst[0].at.isoformat(),
            "last_at": burst[-1].at.isoformat(),
            "window_s": BURST_WINDOW_S,
            "authorization_ids": [sale.authorization_id for sale in burst[:EVIDENCE_ITEMS_MAX]],
        },
    )


# ---- impossible travel ----------------------------------------------------------------------


@dataclass(frozen=True)
class Hop:
    """Two consecutive sales of one consumer at two different physical stores."""

    consumer_key: str
    from_store: str
    to_store: str
    from_merchant: str
    to_merchant: str
    from_at: datetime
    to_at: datetime
    from_latitude: float
    from_longitude: float
    to_latitude: float
    to_longitude: float
    authorization_id: str


def distance_km(latitude_a: float, longitude_a: float, latitude_b: float, longitude_b: float) -> float:
    """Great-circle (haversine) distance on the WGS-84 mean sphere."""
    phi_a, phi_b = math.radians(latitude_a), math.radians(latitude_b)
    d_phi, d_lambda = phi_b - phi_a, math.radians(longitude_b - longitude_a)
    h = math.sin(d_phi / 2) ** 2 + math.cos(phi_a) * math.cos(phi_b) * math.sin(d_lambda / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def impossible(hop: Hop) -> tuple[bool, float, float]:
    """(impossible, distance km, implied speed km/h) of one hop."""
    km = distance_km(hop.from_latitude, hop.from_longitude, hop.to_latitude, hop.to_longitude)
    seconds = max((hop.to_at - hop.from_at).total_seconds(), 1.0)
    speed = km / (seconds / 3_600)
    return km >= TRAVEL_MIN_DISTANCE_KM and speed > TRAVEL_MAX_SPEED_KMH, km, speed


def impossible_travel(hops: Iterable[Hop]) -> Iterator[Finding]:
    """Hops ordered by consumer then time -> one finding per consumer with enough impossible hops."""
    current: str | None = None
    found: list[dict[str, Any]] = []
    merchants: set[str] = set()
    for hop in hops:
        if hop.consumer_key != current:
            if current is not None and len(found) >= TRAVEL_MIN_HOPS:
                yield _travel_finding(current, found, merchants)
            current, found, merchants = hop.consumer_key, [], set()
        is_impossible, km, speed = impossible(hop)
        if is_impossible:
            merchants.update((hop.from_merchant, hop.to_merchant))
            found.append(
                {
                    "from_store": hop.from_store,
                    "to_store": hop.to_store,
                    "from_at": hop.from_at.isoformat(),
                    "to_at": hop.to_at.isoformat(),
                    "distance_km": round(km, 2),
                    "speed_kmh": round(speed, 1),
                    "authorization_id": hop.authorization_id,
                }
            )
    if current is not None and len(found) >= TRAVEL_MIN_HOPS:
        yield _travel_finding(current, found, merchants)


def _travel_finding(consumer_key: str, hops: list[dict[str, Any]], merchants: set[str]) -> Finding:
    return Finding(
        IMPOSSIBLE_TRAVEL,
        CONSUMER,
        consumer_key,
        float(len(hops)),
        {"impossible_hops": len(hops), "merchants": sorted(merchants), "hops": hops[:EVIDENCE_ITEMS_MAX]},
    )


# ---- late refunds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LateRefunds:
    merchant_id: str
    refunds: int  # refunds within LATE_REFUND_WINDOW_S after the voucher expired
    voucher_refunds: int  # every refund of a voucher sale at this merchant in the window
    examples: list[dict[str, Any]]


def late_refund_finding(stats: LateRefunds) -> Finding | None:
    if stats.refunds < LATE_REFUND_MIN:
        return None
    return Finding(
        LATE_REFUND,
        MERCHANT,
        stats.merchant_id,
        float(stats.refunds),
        {
            "late_refunds": stats.refunds,
            "voucher_refunds": stats.voucher_refunds,
            "window_after_expiry_s": LATE_REFUND_WINDOW_S,
            "refunds": stats.examples[:EVIDENCE_ITEMS_MAX],
        },
    )
