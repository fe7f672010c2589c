"""The audit archive's verify.py (server/commands/audit_verify.py) reproduces the ledger's
hashes with the standard library alone: the event digest orjson computes (compact, keys
sorted, UTF-8) and the entry hash of server/domain/posting.py, on awkward payloads too."""

from __future__ import annotations

from typing import Any

import pytest

from server.commands import audit_verify
from server.domain.posting import FLOWS, Posting, entry_hash
from storage.postgres.ledger import payload_digest

PAYLOADS: list[dict[str, Any]] = [
    {"type": "CAPTURED", "campaign": "c-main", "amount_fen": 91980, "at_ms": 1764500000123, "lines": []},
    {"b": "冰箱 一级能效", "a": ['\u0001\n\t"\\/', "é", "😀"], "z": {"y": None, "x": True, "w": -0}},
    {"nested": [{"s": 1, "c": "电视"}, {"c": "a", "s": 2**62}], "empty": {}, "list": []},
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_event_digest_is_orjsons(payload: dict[str, Any]) -> None:
    assert audit_verify.canonical_digest(payload) == payload_digest(payload)


def test_the_entry_hash_and_postings_are_the_ledgers() -> None:
    lines = [{"c": "tv", "s": 700, "g": "1", "sn": ""}, {"c": "fridge", "s": 300, "g": "2"}, {"c": "tv", "s": 5}]
    # As server/domain/posting.py posts it: by category, debit then credit, amounts summed.
    assert audit_verify.expected_postings("REFUNDED", lines) == [
        ("fridge", "AVAILABLE", 300, 0),
        ("fridge", "MERCHANT_RECEIVABLE", 0, 300),
        ("tv", "AVAILABLE", 705, 0),
        ("tv", "MERCHANT_RECEIVABLE", 0, 705),
    ]
    assert audit_verify.FLOWS == dict(FLOWS)
    posting = Posting("fridge", "AVAILABLE", 300, 0)
    entry = {
        "prev_hash": "ab" * 32,
        "campaign_id": "c-main",
        "entry_seq": 42,
        "event_id": "1764500000123-0",
        "authorization_id": "a-1",
        "category": posting.category,
        "account": posting.account,
        "merchant_id": "m-main",
        "debit_fen": posting.debit_fen,
        "credit_fen": posting.credit_fen,
        "occurred_ms": 1764500000123,
    }
    digest = payload_digest(PAYLOADS[0])
    assert audit_verify.entry_hash(entry, digest) == entry_hash(
        "ab" * 32, "c-main", 42, "1764500000123-0", "a-1", posting, "m-main", 1764500000123, digest
    )
