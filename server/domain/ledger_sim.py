"""Simulated ledger days: a deterministic stream of ledger events shaped exactly like the ones
the Lua scripts emit (storage/redis/lua/_lib.lua, ``emit``), for the daily-report tests, the
report benchmark and ``make run``'s demo day.

Payments arrive through the window at random moments; each is authorized (one to three
lines, mostly one), then captured, voided or left to expire at its hold's end; a captured
payment may later be refunded whole, or one line at a time (a partial refund, sometimes
followed by the rest). Events fall where their time falls: a hold taken at 23:59 is captured
the next day, a refund days later. Events due after the window's end are not emitted (those
holds are still pending, those refunds not yet made). Pure and bounded: events come out in
time order from a heap of the ones already due later, never the whole day in memory.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

HOLD_TTL_MS = 900_000


@dataclass(frozen=True)
class SimCampaign:
    campaign_id: str
    categories: Sequence[str]
    rate_bp: int = 2000
    cap_fen: int = 200_000


@dataclass(frozen=True)
class SimSettings:
    campaigns: Sequence[SimCampaign]
    merchants: Sequence[str]
    seed: int = 1
    capture_share: float = 0.75
    void_share: float = 0.13  # the rest expire
    refund_share: float = 0.08  # of captured payments, refunded whole
    partial_refund_share: float = 0.07  # of captured payments with several lines, one line refunded
    consumers: int = 0  # distinct consumers to draw from (0: about two payments per consumer)
    serial_prefix: str = "SIM"


@dataclass
class _Authorization:
    authorization_id: str
    campaign_id: str
    merchant_id: str
    terminal_id: str
    consumer: str
    lines: list[dict[str, Any]]
    created_ms: int
    expires_ms: int
    total_fen: int
    subsidy_fen: int
    state: str = "PENDING"
    refunded_fen: int = 0


@dataclass(order=True)
class _Due:
    at_ms: int
    order: int
    action: str = field(compare=False)
    authorization: _Authorization = field(compare=False)
    line_ids: tuple[str, ...] = field(compare=False, default=())


def _event(kind: str, auth: _Authorization, lines: list[dict[str, Any]], amount: int, at_ms: int) -> dict[str, Any]:
    request_id = hashlib.sha256(f"{auth.authorization_id}:{kind}:{at_ms}".encode()).hexdigest()[:32]
    return {
        "type": kind,
        "authorization_id": auth.authorization_id,
        "campaign": auth.campaign_id,
        "merchant": auth.merchant_id,
        "terminal": auth.terminal_id,
        "authorization_terminal": auth.terminal_id,
        "consumer": auth.consumer,
        "request_id": "" if kind == "EXPIRED" else request_id,
        "payload_hash": "",
        "amount_fen": amount,
        "at_ms": at_ms,
        "lines": [dict(line) for line in lines],
        "state": auth.state,
        "channel": 1,
        "total_fen": auth.total_fen,
        "subsidy_fen": auth.subsidy_fen,
        "refunded_fen": auth.refunded_fen,
        "created_ms": auth.created_ms,
        "expires_ms": auth.expires_ms,
        "all_lines": [dict(line) for line in auth.lines],
        "qualification": "",
    }


def simulate(
    settings: SimSettings, start_ms: int, end_ms: int, payments: int, until_ms: int | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(stream entry id, event payload) in time order, for ``payments`` payments authorized
    in [start_ms, end_ms); events due at or after ``until_ms`` (default ``end_ms``) are left
    out: with ``until_ms`` an hour past the end, every hold of the window is settled."""
    until = end_ms if until_ms is None else until_ms
    rng = random.Random(settings.seed)
    consumers = settings.consumers or max(1, payments // 2)
    # Some merchants are busier than others: weights 1/rank^0.8 (a mild Zipf).
    weights = list(itertools.accumulate(1 / (rank + 1) ** 0.8 for rank in range(len(settings.merchants))))
    due: list[_Due] = []
    counter = 0
    # Authorization moments in order: sorted uniform draws, generated lazily.
    moment = float(start_ms)
    last_ms, same_ms = -1, 0

    def schedule(at_ms: int, action: str, auth: _Authorization, line_ids: tuple[str, ...] = ()) -> None:
        nonlocal counter
        counter += 1
        if at_ms < until:
            heapq.heappush(due, _Due(at_ms, counter, action, auth, line_ids))

    def stamp(at_ms: int) -> str:
        nonlocal last_ms, same_ms
        if at_ms == last_ms:
            same_ms += 1
        else:
            last_ms, same_ms = at_ms, 0
        return f"{at_ms}-{same_ms}"

    remaining = payments
    while remaining or due:
        next_authorization = None
        if remaining:
            # The next of `remaining` sorted uniform points in (moment, end): the minimum of them.
            moment += (end_ms - moment) * (1 - rng.random() ** (1 / remaining))
            next_authorization = min(int(moment), end_ms - 1)
        if due and (next_authorization is None or due[0].at_ms <= next_authorization):
            item = heapq.heappop(due)
            yield stamp(item.at_ms), _act(item, settings, rng, schedule)
            continue
        assert next_authorization is not None
        remaining -= 1
        auth = _authorize(settings, rng, consumers, weights, next_authorization, counter)
        yield stamp(next_authorization), _event("AUTHORIZED", auth, auth.lines, auth.subsidy_fen, next_authorization)
        draw = rng.random()
        if draw < settings.capture_share:
            schedule(next_authorization + rng.randint(1_000, 120_000), "CAPTURE", auth)
        elif draw < settings.capture_share + settings.void_share:
            schedule(next_authorization + rng.randint(1_000, 300_000), "VOID", auth)
        else:
            schedule(auth.expires_ms, "EXPIRE", auth)


def _authorize(
    settings: SimSettings, rng: random.Random, consumers: int, weights: list[float], at_ms: int, counter: int
) -> _Authorization:
    campaign = settings.campaigns[rng.randrange(len(settings.campaigns))]
    rank = min(bisect.bisect(weights, rng.random() * weights[-1]), len(weights) - 1)
    merchant_id = settings.merchants[rank]
    count = 1 if rng.random() < 0.8 else rng.randint(2, 3)
    authorization_id = hashlib.sha256(f"{settings.seed}:{at_ms}:{counter}:{rng.random()}".encode()).hexdigest()[:32]
    lines: list[dict[str, Any]] = []
    for index in range(count):
        category = campaign.categories[rng.randrange(len(campaign.categories))]
        price = rng.randint(50, 9_999) * 100 + rng.choice((0, 0, 0, 50, 99))
        subsidy = max(1, min(price * campaign.rate_bp // 10_000, campaign.cap_fen))
        serial = f"{settings.serial_prefix}{authorization_id[:12].upper()}{index}"
        lines.append({"l": str(index + 1), "g": "6901234000016", "c": category, "p": price, "s": subsidy, "sn": serial})
        lines[-1]["r"] = 0
    consumer = hashlib.sha256(f"{settings.seed}:consumer:{rng.randrange(consumers)}".encode()).hexdigest()
    return _Authorization(
        authorization_id=authorization_id,
        campaign_id=campaign.campaign_id,
        merchant_id=merchant_id,
        terminal_id=f"{merchant_id}-t1"[:64],
        consumer=consumer,
        lines=lines,
        total_fen=sum(int(line["p"]) for line in lines),
        subsidy_fen=sum(int(line["s"]) for line in lines),
        created_ms=at_ms,
        expires_ms=at_ms + HOLD_TTL_MS,
    )


def _act(item: _Due, settings: SimSettings, rng: random.Random, schedule: Any) -> dict[str, Any]:
    auth, at_ms = item.authorization, item.at_ms
    if item.action == "CAPTURE":
        auth.state = "CAPTURED"
        event = _event("CAPTURED", auth, auth.lines, auth.subsidy_fen, at_ms)
        draw = rng.random()
        if draw < settings.refund_share:
            schedule(at_ms + rng.randint(600_000, 3 * 86_400_000), "REFUND", auth)
        elif draw < settings.refund_share + settings.partial_refund_share and len(auth.lines) > 1:
            first = rng.choice(auth.lines)["l"]
            schedule(at_ms + rng.randint(600_000, 86_400_000), "REFUND", auth, (first,))
        return event
    if item.action in ("VOID", "EXPIRE"):
        auth.state = "VOIDED" if item.action == "VOID" else "EXPIRED"
        return _event(auth.state, auth, auth.lines, auth.subsidy_fen, at_ms)
    chosen = [line for line in auth.lines if line["r"] == 0 and (not item.line_ids or line["l"] in item.line_ids)]
    for line in chosen:
        line["r"] = 1
    amount = sum(int(line["s"]) for line in chosen)
    auth.refunded_fen += amount
    auth.state = "REFUNDED" if all(line["r"] for line in auth.lines) else "PARTIALLY_REFUNDED"
    if auth.state == "PARTIALLY_REFUNDED" and rng.random() < 0.5:
        schedule(at_ms + rng.randint(600_000, 86_400_000), "REFUND", auth)
    return _event("REFUNDED", auth, chosen, amount, at_ms)
