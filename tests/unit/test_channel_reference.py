"""The payment channel's reference at the edge and in the ledger event (issue 12, section 3):
canonicalised once (NFKC, trimmed, case kept), refused outside 1-64 of [A-Za-z0-9_.:-] naming
the field; events carry it when given, and events without it (older ones, and every event
but captures and refunds) still decode, with "" as the reference."""

from __future__ import annotations

import orjson
import pytest

from server.domain.errors import InvalidField
from server.domain.validation import canonical_channel_reference
from storage.postgres.ledger import parse_event

EVENT = {
    "type": "CAPTURED",
    "authorization_id": "a" * 32,
    "campaign": "c-main",
    "merchant": "m-main",
    "terminal": "t-main-01",
    "consumer": "c" * 64,
    "request_id": "r-1",
    "amount_fen": 500,
    "at_ms": 1_700_000_000_000,
    "lines": [{"l": "1", "g": "6970000000017", "c": "fridge", "p": 300_000, "s": 500}],
}


def test_references_are_canonical_or_refused() -> None:
    assert canonical_channel_reference("") == "" and canonical_channel_reference("   ") == ""
    assert canonical_channel_reference(" 4200001234202603010001\n") == "4200001234202603010001"
    assert canonical_channel_reference("ＷＸ－１２") == "WX-12"  # full-width from an IME: NFKC
    assert canonical_channel_reference("wx:Ref.1_a") == "wx:Ref.1_a"  # the channel's case is kept
    assert canonical_channel_reference("x" * 64) == "x" * 64
    for bad in ("x" * 65, "has space", "a/b", "引用", "a\x00b", "a\nb"):
        with pytest.raises(InvalidField) as refused:
            canonical_channel_reference(bad)
        assert refused.value.field == "channel_reference"


def test_events_carry_the_reference_and_older_ones_decode_without_it() -> None:
    older = parse_event("1-0", {b"e": orjson.dumps(EVENT)})
    assert older.record.channel_reference == "" and older.record.amount_fen == 500
    given = parse_event("2-0", {b"e": orjson.dumps({**EVENT, "channel_reference": "4200001234"})})
    assert given.record.channel_reference == "4200001234"
    # The payload is kept as the script wrote it (its digest enters the hash chain).
    assert given.payload["channel_reference"] == "4200001234" and "channel_reference" not in older.payload
