"""The daily exchange file: what is signed is what is read, and nothing else is accepted."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import date

import pytest

from server.domain.exchange_file import (
    FORMAT,
    ConsumerRecord,
    ExchangeFileError,
    SerialRecord,
    encode,
    parse,
)

KEY = b"k" * 32
DAY = date(2026, 3, 1)
ALICE = "a" * 64
BOB = "b" * 64
FRIDGE_G1 = "6970000000017"
AIR_CONDITIONER = "6970000000116"


def sample() -> bytes:
    return encode(
        "p-peer-01",
        DAY,
        [ConsumerRecord(BOB, "fridge"), ConsumerRecord(ALICE, "tv"), ConsumerRecord(BOB, "fridge")],
        [SerialRecord(FRIDGE_G1, "sn-2"), SerialRecord(AIR_CONDITIONER, "SN-1"), SerialRecord(FRIDGE_G1, "SN-2")],
        KEY,
    )


def resign(lines: list[dict[str, object]], key: bytes = KEY) -> bytes:
    """A file built by hand and signed correctly, to reach the checks behind the signature."""
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return body + json.dumps({"signature": hmac.new(key, body, hashlib.sha256).hexdigest()}).encode() + b"\n"


def header(consumers: int, serials: int) -> dict[str, object]:
    return {"format": FORMAT, "provider": "p-peer-01", "date": "2026-03-01", "consumers": consumers, "serials": serials}


def test_round_trip_sorts_deduplicates_and_canonicalises() -> None:
    """Encoding sorts each kind, drops duplicates (case-insensitively for serials) and parsing
    gives back exactly those records."""
    parsed = parse(sample(), KEY)
    assert parsed.provider_id == "p-peer-01"
    assert parsed.day == DAY
    assert parsed.consumers == (ConsumerRecord(ALICE, "tv"), ConsumerRecord(BOB, "fridge"))
    assert parsed.serials == (SerialRecord(FRIDGE_G1, "SN-2"), SerialRecord(AIR_CONDITIONER, "SN-1"))


def test_the_layout_is_the_documented_one() -> None:
    """Header, consumers, serials, signature: one JSON object per line, newline-terminated."""
    lines = sample().decode().splitlines()
    assert json.loads(lines[0]) == header(2, 2)
    assert [json.loads(line)["kind"] for line in lines[1:-1]] == ["consumer", "consumer", "serial", "serial"]
    assert set(json.loads(lines[-1])) == {"signature"}
    assert sample().endswith(b"\n")


def test_same_facts_same_bytes() -> None:
    """The order records are given in does not change the file, so two exports of one day match."""
    shuffled = encode(
        "p-peer-01",
        DAY,
        [ConsumerRecord(ALICE, "tv"), ConsumerRecord(BOB, "fridge")],
        [SerialRecord(FRIDGE_G1, "SN-2"), SerialRecord(AIR_CONDITIONER, "SN-1")],
        KEY,
    )
    assert shuffled == sample()


def test_an_empty_day_is_a_valid_file() -> None:
    """A day without sales still produces a signed file, so the peer can tell it from a missing one."""
    parsed = parse(encode("p-peer-01", DAY, [], [], KEY), KEY)
    assert parsed.consumers == () and parsed.serials == ()


@pytest.mark.parametrize("position", [0, 40, 120, -70])
def test_any_altered_byte_is_rejected(position: int) -> None:
    """Flipping one byte anywhere (header, record, signature) fails the signature check."""
    data = bytearray(sample())
    data[position] ^= 0x01
    with pytest.raises(ExchangeFileError) as raised:
        parse(bytes(data), KEY)
    assert "signature" in str(raised.value) or "JSON" in str(raised.value)


def test_a_changed_record_is_rejected_naming_the_signature_line() -> None:
    """A plausible edit (another consumer key) is still caught, on the signature line."""
    data = sample().replace(ALICE.encode(), ("c" * 64).encode())
    with pytest.raises(ExchangeFileError, match="signature does not match") as raised:
        parse(data, KEY)
    assert raised.value.line == len(data.splitlines())


def test_a_wrong_key_is_rejected() -> None:
    with pytest.raises(ExchangeFileError, match="signature does not match"):
        parse(sample(), b"x" * 32)


def test_keys_shorter_than_32_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        encode("p", DAY, [], [], b"short")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        parse(sample(), b"short")


def test_a_truncated_file_is_rejected() -> None:
    """A file cut short loses its signature line."""
    data = sample()
    with pytest.raises(ExchangeFileError):
        parse(data[: len(data) // 2], KEY)
    with pytest.raises(ExchangeFileError, match="must end with a newline"):
        parse(data[:-1], KEY)
    with pytest.raises(ExchangeFileError):
        parse(b"", KEY)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"kind": "consumer", "consumer_key": "A" * 64, "category": "tv"}, "consumer_key"),
        ({"kind": "consumer", "consumer_key": "a" * 63, "category": "tv"}, "consumer_key"),
        ({"kind": "consumer", "consumer_key": ALICE, "category": "TV!"}, "category"),
        ({"kind": "consumer", "consumer_key": ALICE, "category": 3}, "category"),
        ({"kind": "consumer", "consumer_key": ALICE, "category": "tv", "id_number": "x"}, "exactly the fields"),
        ({"kind": "serial", "gtin": FRIDGE_G1, "serial": "SN1"}, "expected a consumer record"),
    ],
)
def test_a_bad_consumer_record_names_its_line(record: dict[str, object], message: str) -> None:
    """Even correctly signed, a record that is not a consumer key and category is refused with
    its line number; no extra field (an ID number, say) is tolerated."""
    data = resign([header(2, 0), {"kind": "consumer", "consumer_key": ALICE, "category": "fridge"}, record])
    with pytest.raises(ExchangeFileError, match=message) as raised:
        parse(data, KEY)
    assert raised.value.line == 3
    assert str(raised.value).startswith("line 3: ")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"kind": "serial", "gtin": "6970000000018", "serial": "SN1"}, "check digit"),
        ({"kind": "serial", "gtin": FRIDGE_G1, "serial": "sn1"}, "upper case"),
        ({"kind": "serial", "gtin": FRIDGE_G1, "serial": "SN 1"}, "visible ASCII"),
        ({"kind": "serial", "gtin": FRIDGE_G1, "serial": "S" * 65}, "visible ASCII"),
        ({"kind": "serial", "gtin": FRIDGE_G1, "serial": ""}, "visible ASCII"),
        ({"kind": "serial", "gtin": FRIDGE_G1}, "exactly the fields"),
    ],
)
def test_a_bad_serial_record_names_its_line(record: dict[str, object], message: str) -> None:
    data = resign([header(1, 1), {"kind": "consumer", "consumer_key": ALICE, "category": "fridge"}, record])
    with pytest.raises(ExchangeFileError, match=message) as raised:
        parse(data, KEY)
    assert raised.value.line == 3


def test_unsorted_or_duplicated_records_name_the_line() -> None:
    serial = {"kind": "serial", "gtin": FRIDGE_G1, "serial": "SN1"}
    with pytest.raises(ExchangeFileError, match="strictly ascending") as raised:
        parse(resign([header(0, 2), serial, serial]), KEY)
    assert raised.value.line == 3
    consumers = [
        {"kind": "consumer", "consumer_key": BOB, "category": "fridge"},
        {"kind": "consumer", "consumer_key": ALICE, "category": "fridge"},
    ]
    with pytest.raises(ExchangeFileError, match="strictly ascending") as raised:
        parse(resign([header(2, 0), *consumers]), KEY)
    assert raised.value.line == 3


def test_counts_must_match_the_records() -> None:
    """A header announcing more or fewer records than the file holds is refused on line 1."""
    record = {"kind": "consumer", "consumer_key": ALICE, "category": "fridge"}
    for announced in (header(2, 0), header(0, 0), header(0, 1)):
        with pytest.raises(ExchangeFileError) as raised:
            parse(resign([announced, record]), KEY)
        if announced["serials"] == 1:
            assert raised.value.line == 2  # one record, announced as a serial: read as one and refused
        else:
            assert raised.value.line == 1
            assert "announces" in str(raised.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "subsidy-exchange/2"}, "unknown format"),
        ({"provider": "p peer"}, "provider"),
        ({"date": "2026-02-30"}, "calendar date"),
        ({"date": "01/03/2026"}, "YYYY-MM-DD"),
        ({"consumers": -1}, "consumers"),
        ({"serials": True}, "serials"),
        ({"extra": 1}, "exactly the fields"),
    ],
)
def test_a_bad_header_is_refused_on_line_1(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ExchangeFileError, match=message) as raised:
        parse(resign([{**header(0, 0), **changes}]), KEY)
    assert raised.value.line == 1


def test_not_json_and_not_utf8_name_the_line() -> None:
    body = json.dumps(header(1, 0)).encode() + b"\n" + b"\xff\xfe\n"
    signed = body + json.dumps({"signature": hmac.new(KEY, body, hashlib.sha256).hexdigest()}).encode() + b"\n"
    with pytest.raises(ExchangeFileError, match="UTF-8") as raised:
        parse(signed, KEY)
    assert raised.value.line == 2
    body = json.dumps(header(1, 0)).encode() + b"\n[1, 2]\n"
    signed = body + json.dumps({"signature": hmac.new(KEY, body, hashlib.sha256).hexdigest()}).encode() + b"\n"
    with pytest.raises(ExchangeFileError, match="JSON object") as raised:
        parse(signed, KEY)
    assert raised.value.line == 2


def test_encode_refuses_what_parse_would_refuse() -> None:
    """An exporter bug cannot produce a file that its peers would reject."""
    with pytest.raises(ExchangeFileError, match="consumer_key"):
        encode("p", DAY, [ConsumerRecord("not-a-key", "tv")], [], KEY)
    with pytest.raises(ExchangeFileError, match="gtin"):
        encode("p", DAY, [], [SerialRecord("123", "SN1")], KEY)
    with pytest.raises(ValueError, match="provider id"):
        encode("p peer", DAY, [], [], KEY)
