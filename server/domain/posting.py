"""Double-entry posting rules and the hash chain: pure functions, no I/O.

Each ledger event moves one amount per category between two accounts of the campaign:

| event      | debit               | credit              |
|------------|---------------------|---------------------|
| AUTHORIZED | PENDING             | AVAILABLE           |
| CAPTURED   | MERCHANT_RECEIVABLE | PENDING             |
| VOIDED     | AVAILABLE           | PENDING             |
| EXPIRED    | AVAILABLE           | PENDING             |
| REFUNDED   | AVAILABLE           | MERCHANT_RECEIVABLE |
| CLAWED_BACK| RECOVERED           | MERCHANT_RECEIVABLE |

Balances are debits minus credits: PENDING is the held subsidy (Redis ``reserved``),
MERCHANT_RECEIVABLE the captured subsidy still owed to merchants, RECOVERED the subsidy clawed
back from fraudulent sales (Redis ``clawed_back``; Redis ``spent`` is MERCHANT_RECEIVABLE plus
RECOVERED: clawed-back money stays used, it never returns to AVAILABLE to be granted again), and
AVAILABLE is minus the budget in use. Every event's debits equal its credits, so the whole
ledger balances.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

GENESIS_HASH = "0" * 64
FLOWS: Mapping[str, tuple[str, str]] = {
    "AUTHORIZED": ("PENDING", "AVAILABLE"),
    "CAPTURED": ("MERCHANT_RECEIVABLE", "PENDING"),
    "VOIDED": ("AVAILABLE", "PENDING"),
    "EXPIRED": ("AVAILABLE", "PENDING"),
    "REFUNDED": ("AVAILABLE", "MERCHANT_RECEIVABLE"),
    "CLAWED_BACK": ("RECOVERED", "MERCHANT_RECEIVABLE"),
}
# Unit changes to a consumer's per-category usage, and whether the event releases serials. A
# claw-back frees neither: the sale was fraudulent, the person's right and the device were used.
USAGE_DELTA: Mapping[str, int] = {
    "AUTHORIZED": 1,
    "CAPTURED": 0,
    "VOIDED": -1,
    "EXPIRED": -1,
    "REFUNDED": -1,
    "CLAWED_BACK": 0,
}


@dataclass(frozen=True)
class Posting:
    category: str
    account: str
    debit_fen: int
    credit_fen: int


class PostedLine(Protocol):
    """What posting needs of an event's line (storage decodes the events into these)."""

    @property
    def category(self) -> str: ...

    @property
    def subsidy_fen(self) -> int: ...


def amounts_by_category(lines: Iterable[PostedLine]) -> dict[str, int]:
    sums: dict[str, int] = {}
    for line in lines:
        sums[line.category] = sums.get(line.category, 0) + line.subsidy_fen
    return sums


def postings(event_type: str, lines: Iterable[PostedLine]) -> list[Posting]:
    """The balanced postings of one event, in category order; zero amounts post nothing."""
    debit_account, credit_account = FLOWS[event_type]
    result: list[Posting] = []
    for category, amount in sorted(amounts_by_category(lines).items()):
        if amount == 0:
            continue
        result.append(Posting(category, debit_account, amount, 0))
        result.append(Posting(category, credit_account, 0, amount))
    return result


def entry_hash(
    prev_hash: str,
    campaign_id: str,
    entry_seq: int,
    event_id: str,
    authorization_id: str,
    posting: Posting,
    merchant_id: str,
    occurred_ms: int,
    event_digest: str,
) -> str:
    """SHA-256 over the previous hash, every field of the entry and its event's content digest:
    altering, removing or reordering any entry, or altering its event, breaks every hash after it."""
    material = "|".join(
        (
            prev_hash,
            campaign_id,
            str(entry_seq),
            event_id,
            authorization_id,
            posting.category,
            posting.account,
            merchant_id,
            str(posting.debit_fen),
            str(posting.credit_fen),
            str(occurred_ms),
            event_digest,
        )
    )
    return hashlib.sha256(material.encode()).hexdigest()
