"""A typed wrapper over HdrHistogram (``hdrh``, which ships no type information).

Latencies are recorded in microseconds, from 1 µs to 60 s, with 3 significant digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LATENCY_US_MIN = 1
LATENCY_US_MAX = 60_000_000
SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 95.0, 99.0, 99.9)


class Histogram:
    def __init__(self, raw: Any = None) -> None:
        self._raw: Any = raw if raw is not None else HdrHistogram(LATENCY_US_MIN, LATENCY_US_MAX, SIGNIFICANT_DIGITS)

    def record_us(self, value_us: int) -> None:
        self._raw.record_value(min(max(value_us, LATENCY_US_MIN), LATENCY_US_MAX))

    def add(self, other: Histogram) -> None:
        self._raw.add(other._raw)

    @property
    def count(self) -> int:
        return int(self._raw.get_total_count())

    def percentile_ms(self, percentile: float) -> float:
        return int(self._raw.get_value_at_percentile(percentile)) / 1000.0

    def max_ms(self) -> float:
        return int(self._raw.get_max_value()) / 1000.0

    def mean_ms(self) -> float:
        return float(self._raw.get_mean_value()) / 1000.0

    def encode(self) -> str:
        """The standard compressed, base64 HDR encoding (readable by any HdrHistogram library)."""
        encoded: bytes = self._raw.encode()
        return encoded.decode("ascii")

    @staticmethod
    def decode(encoded: str) -> Histogram:
        return Histogram(HdrHistogram.decode(encoded.encode("ascii")))

    def percentile_curve(self, points: int = 60) -> list[tuple[float, float]]:
        """(percentile, latency ms) pairs spaced on 1/(1-p), for a latency-by-percentile plot."""
        curve: list[tuple[float, float]] = []
        if self.count == 0:
            return curve
        for index in range(points):
            # From p50 to p99.99, evenly spaced in log10(1 / (1 - p)).
            nines = 0.30103 + (4.0 - 0.30103) * index / (points - 1)
            percentile = 100.0 * (1.0 - 10.0**-nines)
            curve.append((percentile, self.percentile_ms(percentile)))
        return curve


@dataclass(frozen=True)
class LatencySummary:
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float

    @staticmethod
    def of(histogram: Histogram) -> LatencySummary:
        return LatencySummary(
            count=histogram.count,
            p50_ms=histogram.percentile_ms(50.0),
            p95_ms=histogram.percentile_ms(95.0),
            p99_ms=histogram.percentile_ms(99.0),
            p999_ms=histogram.percentile_ms(99.9),
            max_ms=histogram.max_ms(),
            mean_ms=histogram.mean_ms(),
        )
