"""Ledger events are decoded at the storage boundary (storage/postgres/ledger.py, with the
Structs of storage/redis/contract.py): the posting code reads named fields, never the one-letter
line fields the scripts write; what the writer refused before it still refuses, what it took it
still takes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from server.domain.posting import Posting, postings
from storage.postgres.ledger import LedgerEvent, MalformedEvent, parse_event

LINE = {"l": "1", "g": "6901234000016", "c": "fridge", "p": 459_900, "s": 91_980, "sn": "SN1", "r": 0}
EVENT: dict[str, Any] = {
    "type": "CAPTURED",
    "authorization_id": "a-1",
    "campaign": "c-main",
    "merchant": "m-main",
    "terminal": "t-main-02",
    "authorization_terminal": "t-main-01",
    "consumer": "c" * 64,
    "request_id": "r-1",
    "payload_hash": "h" * 64,
    "amount_fen": 91_980 + 500,
    "at_ms": 1_764_500_000_123,
    "lines": [LINE, {**LINE, "l": "2", "c": "tv", "s": 500, "sn": ""}],
    "state": "CAPTURED",
    "channel": 1,
    "total_fen": 919_800,
    "subsidy_fen": 92_480,
    "refunded_fen": 0,
    "created_ms": 1_764_499_000_000,
    "expires_ms": 1_764_499_600_000,
    "all_lines": [LINE],
    "qualification": "",
}


def entry(payload: Any) -> dict[bytes, bytes]:
    return {b"e": orjson.dumps(payload)}


def test_an_event_is_read_by_name_and_posted_from_its_lines() -> None:
    event = parse_event(b"1764500000123-0", entry(EVENT))
    record = event.record
    assert (record.campaign_id, record.merchant_id, record.terminal_id, record.consumer_key) == (
        "c-main",
        "m-main",
        "t-main-02",
        "c" * 64,
    )
    assert [(line.line_id, line.category, line.subsidy_fen, line.serial_number) for line in record.lines] == [
        ("1", "fridge", 91_980, "SN1"),
        ("2", "tv", 500, ""),
    ]
    assert event.payload == EVENT  # stored and digested as the script wrote it
    assert postings(record.type, record.lines) == [
        Posting("fridge", "MERCHANT_RECEIVABLE", 91_980, 0),
        Posting("fridge", "PENDING", 0, 91_980),
        Posting("tv", "MERCHANT_RECEIVABLE", 500, 0),
        Posting("tv", "PENDING", 0, 500),
    ]


def test_an_older_event_without_the_authorizations_state_defaults_as_before() -> None:
    older = {
        key: value
        for key, value in EVENT.items()
        if key in ("type", "authorization_id", "campaign", "merchant", "terminal", "consumer", "amount_fen", "at_ms")
    }
    record = LedgerEvent("1-0", {**older, "lines": [{"c": "tv", "s": 5, "g": "1"}]}).record
    assert (record.request_id, record.payload_hash, record.authorization_terminal, record.state) == ("", "", "", "")
    assert (record.channel, record.created_ms, record.expires_ms, record.all_lines) == (0, None, None, None)
    assert record.lines[0].serial_number == "" and record.lines[0].line_id == ""


def test_a_well_formed_event_postgresql_will_refuse_is_not_malformed() -> None:
    """The writer's poison test: PostgreSQL's CHECK refuses it, the parser does not."""
    parse_event("2-0", entry({**EVENT, "amount_fen": -5, "lines": []}))


@pytest.mark.parametrize(
    "payload",
    [
        "not an object",
        [EVENT],
        {key: value for key, value in EVENT.items() if key != "campaign"},
        {**EVENT, "type": "SETTLED"},
        {**EVENT, "lines": {}},
        {**EVENT, "lines": [{"g": "1", "s": 5}]},  # no category
        {**EVENT, "lines": [{"c": "tv", "g": "1", "s": -1}]},  # a negative subsidy
        {**EVENT, "lines": [{"c": "tv", "g": "1", "s": "5"}]},
        {**EVENT, "lines": [{"c": "tv", "s": 5}]},  # no GTIN
        {**EVENT, "lines": [{"c": "tv", "g": "1", "s": 5, "sn": None}]},
    ],
)
def test_what_is_no_ledger_event_is_malformed(payload: Any) -> None:
    with pytest.raises(MalformedEvent):
        parse_event("3-0", entry(payload))
    with pytest.raises(MalformedEvent):
        parse_event("4-0", {b"x": b"{}"})
