"""Release schedules: how much of a budget (in fen) or a qualification quota (in claims) is
released at a moment, when a campaign releases it in tranches.

One rule, in two languages: ``released`` here and ``released`` in ``storage/redis/lua/_lib.lua``
(which the authorize and claim scripts apply) read the same schedule, the one ``schedule``
builds and ``storage/redis/reference.py`` publishes; tests/integration/test_script_contract.py
runs both on the same schedules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def schedule(tranches: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Tranches of (release time in ms, amount) as the scripts read them: (release time,
    cumulative amount released by then), in time order."""
    steps, cumulative = [], 0
    for moment, amount in sorted(tranches):
        cumulative += amount
        steps.append((moment, cumulative))
    return steps


def released(steps: Sequence[tuple[int, int]], total: int, now_ms: int) -> int:
    """What a ``schedule`` has released by ``now_ms``: the cumulative amount of the last step
    due, at most ``total``; without steps, ``total``."""
    if not steps:
        return total
    amount = 0
    for moment, cumulative in steps:
        if moment <= now_ms:
            amount = cumulative
    return min(amount, total)


def released_by(tranches: Iterable[tuple[int, int]], total: int, now_ms: int) -> int:
    """What tranches of (time in ms, amount) have released by ``now_ms``: the sum of the
    tranches due, at most ``total``; without tranches, ``total``."""
    return released(schedule(tranches), total, now_ms)
