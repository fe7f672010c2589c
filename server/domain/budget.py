"""Release schedules: how much of a budget (in fen) or a qualification quota (in claims) is
released at a moment, when a campaign releases it in tranches."""

from __future__ import annotations


def released_by(tranches: list[tuple[int, int]], total: int, now_ms: int) -> int:
    """What a release schedule of (time in ms, amount) has released by ``now_ms``: the sum of the
    tranches due, at most ``total``; without tranches, ``total``."""
    if not tranches:
        return total
    return min(total, sum(amount for moment, amount in tranches if moment <= now_ms))
