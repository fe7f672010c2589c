"""The daily cross-provider exchange file: format, signature and validation (pure, no I/O).

Service providers of the programme tell each other, once a day, which consumers (by consumer
key, never an ID number) and which device serials they subsidised, so that a second subsidy
through another provider is declined. The file is JSON Lines in UTF-8::

    {"format": "subsidy-exchange/1", "provider": "p-1", "date": "2026-03-01", "consumers": 1, "serials": 1}
    {"kind": "consumer", "consumer_key": "<64 hex>", "category": "fridge"}
    {"kind": "serial", "gtin": "6970000000017", "serial": "SN1"}
    {"signature": "<hex HMAC-SHA256(exchange key, every byte before this line)>"}

Consumer records come first, then serial records, each kind in strictly ascending order (so
sorted and without duplicates, and the same facts always give the same bytes). The signature
is checked before anything else is read; then the header, every record and the counts. Any
failure rejects the whole file with an error naming its line: a file is taken whole or not
at all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, NamedTuple

from server.domain.gtin import is_valid_gtin13

FORMAT = "subsidy-exchange/1"
KEY_BYTES_MIN = 32
# A district programme subsidises some thousands of devices a day; the limits leave two orders
# of magnitude of room while bounding what one file can make us parse and hold in memory.
RECORDS_MAX = 2_000_000
FILE_BYTES_MAX = 512 * 1024 * 1024

PROVIDER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
CONSUMER_KEY = re.compile(r"^[0-9a-f]{64}\Z")
CATEGORY = re.compile(r"^[a-z0-9_]{1,32}\Z")
# Serials are compared without regard to case, so the file carries the canonical upper-case
# form; visible ASCII only, since other providers' serial formats are wider than ours.
SERIAL = re.compile(r"^[\x21-\x7e]{1,64}\Z")
DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
SIGNATURE = re.compile(r"^[0-9a-f]{64}\Z")

HEADER_FIELDS = {"format", "provider", "date", "consumers", "serials"}
CONSUMER_FIELDS = {"kind", "consumer_key", "category"}
SERIAL_FIELDS = {"kind", "gtin", "serial"}


class ConsumerRecord(NamedTuple):
    consumer_key: str
    category: str


class SerialRecord(NamedTuple):
    gtin: str
    serial: str


@dataclass(frozen=True)
class ExchangeFile:
    """One provider's facts for one day (China Standard Time)."""

    provider_id: str
    day: date
    consumers: tuple[ConsumerRecord, ...]
    serials: tuple[SerialRecord, ...]


class ExchangeFileError(ValueError):
    """A file that cannot be trusted or read; ``line`` is 1-based (0: the file as a whole)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.message = message


def canonical_serial(serial: str) -> str:
    """The form serial keys and files use: upper case (as ``server.domain.validation.canonical_serial`` does)."""
    return serial.upper()


def is_valid_serial(serial: str) -> bool:
    return bool(SERIAL.match(serial))


def sign(key: bytes, body: bytes) -> str:
    _check_key(key)
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def encode(
    provider_id: str,
    day: date,
    consumers: Iterable[ConsumerRecord],
    serials: Iterable[SerialRecord],
    key: bytes,
) -> bytes:
    """The signed file: records sorted and deduplicated, each validated as ``parse`` would."""
    _check_key(key)
    consumer_records = sorted(set(consumers))
    serial_records = sorted({SerialRecord(gtin, canonical_serial(serial)) for gtin, serial in serials})
    if not PROVIDER_ID.match(provider_id):
        raise ValueError(f"provider id must match {PROVIDER_ID.pattern}")
    if len(consumer_records) + len(serial_records) > RECORDS_MAX:
        raise ValueError(f"at most {RECORDS_MAX} records fit in one file")
    for consumer in consumer_records:
        _check_consumer(0, consumer)
    for device in serial_records:
        _check_serial(0, device)
    lines = [
        _dumps(
            {
                "format": FORMAT,
                "provider": provider_id,
                "date": day.isoformat(),
                "consumers": len(consumer_records),
                "serials": len(serial_records),
            }
        )
    ]
    lines += [_dumps({"kind": "consumer", "consumer_key": k, "category": c}) for k, c in consumer_records]
    lines += [_dumps({"kind": "serial", "gtin": g, "serial": s}) for g, s in serial_records]
    body = b"".join(line + b"\n" for line in lines)
    return body + _dumps({"signature": sign(key, body)}) + b"\n"


def parse(data: bytes, key: bytes) -> ExchangeFile:
    """The file's contents, or ExchangeFileError naming the first line at fault. The signature
    is verified before any line is interpreted."""
    _check_key(key)
    if len(data) > FILE_BYTES_MAX:
        raise ExchangeFileError(0, f"the file is larger than {FILE_BYTES_MAX} bytes")
    body, signature_line, signature_number = _split_signature(data)
    signature = _object(signature_number, signature_line)
    if set(signature) != {"signature"} or not isinstance(signature["signature"], str):
        raise ExchangeFileError(signature_number, 'the last line must be {"signature": "<hex>"}')
    if not SIGNATURE.match(signature["signature"]):
        raise ExchangeFileError(signature_number, "the signature must be 64 lowercase hex characters")
    if not hmac.compare_digest(sign(key, body), signature["signature"]):
        raise ExchangeFileError(
            signature_number, "the signature does not match: the file was altered or signed with another key"
        )
    lines = body.split(b"\n")[:-1]  # the body ends with the newline before the signature
    header = _object(1, lines[0])
    provider_id, day, consumer_count, serial_count = _header(header)
    if len(lines) - 1 != consumer_count + serial_count:
        raise ExchangeFileError(
            1, f"the header announces {consumer_count + serial_count} records but the file has {len(lines) - 1}"
        )
    consumers = [_consumer(number, _object(number, lines[number - 1])) for number in range(2, consumer_count + 2)]
    serials = [
        _serial(number, _object(number, lines[number - 1]))
        for number in range(consumer_count + 2, consumer_count + serial_count + 2)
    ]
    _check_order(2, consumers)
    _check_order(consumer_count + 2, serials)
    return ExchangeFile(provider_id, day, tuple(consumers), tuple(serials))


def _check_key(key: bytes) -> None:
    if len(key) < KEY_BYTES_MIN:
        raise ValueError(f"the exchange key must be at least {KEY_BYTES_MIN} bytes")


def _dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _split_signature(data: bytes) -> tuple[bytes, bytes, int]:
    """(every byte before the signature line, the signature line, its line number)."""
    if not data.endswith(b"\n"):
        raise ExchangeFileError(0, "the file must end with a newline after the signature line")
    content = data[:-1]
    cut = content.rfind(b"\n")
    if cut < 0:
        raise ExchangeFileError(1, "the file has no header before its signature line")
    return content[: cut + 1], content[cut + 1 :], content.count(b"\n") + 1


def _object(number: int, line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ExchangeFileError(number, "not valid UTF-8") from error
    except json.JSONDecodeError as error:
        raise ExchangeFileError(number, f"not a JSON object: {error.msg}") from error
    if not isinstance(value, dict):
        raise ExchangeFileError(number, "not a JSON object")
    return value


def _header(header: dict[str, Any]) -> tuple[str, date, int, int]:
    if set(header) != HEADER_FIELDS:
        raise ExchangeFileError(1, f"the header must have exactly the fields {sorted(HEADER_FIELDS)}")
    if header["format"] != FORMAT:
        raise ExchangeFileError(1, f"unknown format {header['format']!r}; this reader knows {FORMAT!r}")
    provider_id = header["provider"]
    if not isinstance(provider_id, str) or not PROVIDER_ID.match(provider_id):
        raise ExchangeFileError(1, f"provider must match {PROVIDER_ID.pattern}")
    if not isinstance(header["date"], str) or not DATE.match(header["date"]):
        raise ExchangeFileError(1, "date must be YYYY-MM-DD")
    try:
        day = date.fromisoformat(header["date"])
    except ValueError as error:
        raise ExchangeFileError(1, "date is not a calendar date") from error
    counts = []
    for name in ("consumers", "serials"):
        count = header[name]
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= RECORDS_MAX:
            raise ExchangeFileError(1, f"{name} must be an integer between 0 and {RECORDS_MAX}")
        counts.append(count)
    if sum(counts) > RECORDS_MAX:
        raise ExchangeFileError(1, f"at most {RECORDS_MAX} records fit in one file")
    return provider_id, day, counts[0], counts[1]


def _consumer(number: int, record: dict[str, Any]) -> ConsumerRecord:
    if record.get("kind") != "consumer" or set(record) != CONSUMER_FIELDS:
        raise ExchangeFileError(number, f"expected a consumer record with exactly the fields {sorted(CONSUMER_FIELDS)}")
    consumer = ConsumerRecord(record["consumer_key"], record["category"])
    _check_consumer(number, consumer)
    return consumer


def _serial(number: int, record: dict[str, Any]) -> SerialRecord:
    if record.get("kind") != "serial" or set(record) != SERIAL_FIELDS:
        raise ExchangeFileError(number, f"expected a serial record with exactly the fields {sorted(SERIAL_FIELDS)}")
    device = SerialRecord(record["gtin"], record["serial"])
    _check_serial(number, device)
    return device


def _check_consumer(number: int, consumer: ConsumerRecord) -> None:
    if not isinstance(consumer.consumer_key, str) or not CONSUMER_KEY.match(consumer.consumer_key):
        raise ExchangeFileError(number, "consumer_key must be 64 lowercase hex characters")
    if not isinstance(consumer.category, str) or not CATEGORY.match(consumer.category):
        raise ExchangeFileError(number, f"category must match {CATEGORY.pattern}")


def _check_serial(number: int, device: SerialRecord) -> None:
    if not isinstance(device.gtin, str) or not is_valid_gtin13(device.gtin):
        raise ExchangeFileError(number, "gtin must be a GTIN-13 with a valid check digit")
    if not isinstance(device.serial, str) or not is_valid_serial(device.serial):
        raise ExchangeFileError(number, "serial must be 1-64 visible ASCII characters")
    if device.serial != canonical_serial(device.serial):
        raise ExchangeFileError(number, "serial must be in canonical upper case")


def _check_order(first_number: int, records: Sequence[tuple[str, str]]) -> None:
    for offset in range(1, len(records)):
        if not records[offset - 1] < records[offset]:
            raise ExchangeFileError(
                first_number + offset, "records must be in strictly ascending order (sorted, no duplicates)"
            )
