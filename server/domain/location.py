"""The location rules of a claim: pure functions from a device's report to a verdict.

A claim's location is accepted only when the device does not report a mock provider, the fix
is recent enough, its accuracy radius small enough, and the point (converted to WGS-84 first)
lies in the campaign's region. The precise point is used for the verdict and then dropped;
only a coarse cell of about a kilometre is kept with the qualification.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from server.domain.geo import CoordinateError, Point, Region

# A device clock may run a little ahead of the server's; a fix further in the future is a
# forged or broken timestamp.
FUTURE_TOLERANCE_MS = 60_000
# Beyond this a "fix" is no position at all (GPS reports metres to a few kilometres).
ACCURACY_M_MAX = 1_000_000.0


class Verdict(enum.Enum):
    """A claim's location verdict. The declines are listed in their order of precedence, the
    order of the ClaimDeclineReason values they are answered with (server/services/qualification.py)."""

    ACCEPTED = "accepted"
    MOCKED = "mocked"
    STALE = "stale"
    INACCURATE = "inaccurate"
    OUTSIDE_REGION = "outside_region"


@dataclass(frozen=True)
class LocationRule:
    max_accuracy_m: float
    max_age_s: int


def check_fix(accuracy_m: float, fix_ms: int, now_ms: int) -> None:
    """Refuses an accuracy or fix time that cannot be real, naming the field; a merely poor or
    old fix is not an error but a decline (see ``verdict``)."""
    if not math.isfinite(accuracy_m) or not 0.0 < accuracy_m <= ACCURACY_M_MAX:
        raise CoordinateError("accuracy_m", f"must be a radius in metres, above 0 and at most {ACCURACY_M_MAX:.0f}")
    if fix_ms <= 0:
        raise CoordinateError("fix_time", "is required")
    if fix_ms > now_ms + FUTURE_TOLERANCE_MS:
        raise CoordinateError("fix_time", "is in the future")


def verdict(
    point: Point,
    accuracy_m: float,
    fix_ms: int,
    mock_location: bool,
    now_ms: int,
    rule: LocationRule,
    region: Region | None,
) -> Verdict:
    """ACCEPTED or the first decline that applies, in the order of precedence of ``Verdict``."""
    if mock_location:
        return Verdict.MOCKED
    if now_ms - fix_ms > rule.max_age_s * 1000:
        return Verdict.STALE
    if accuracy_m > rule.max_accuracy_m:
        return Verdict.INACCURATE
    if region is not None and not region.covers(point):
        return Verdict.OUTSIDE_REGION
    return Verdict.ACCEPTED


def coarse_cell(point: Point) -> str:
    """The point rounded to 0.01 degree (about 1.1 km north-south), enough for support and
    fraud analysis by area, not enough to track a person."""
    return f"{point.latitude:.2f},{point.longitude:.2f}"
