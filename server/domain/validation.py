"""Request validation: pure checks of plain values that raise ``InvalidField`` naming the
field (the gRPC edge answers INVALID_ARGUMENT). Runs before any Redis call, so a rejected
request changes nothing; server/services/requests.py applies these rules to the request
messages.

Identifiers are canonicalised here, once, at the edge, and only the canonical form goes on to
become a key or enter a payload hash: Unicode NFKC (full-width digits and letters from a
scanner or an IME become ASCII), surrounding whitespace dropped (a scanner's trailing newline),
then a whole-string match (``fullmatch``: ``$`` would accept a final newline) and one case per
identifier (UUIDs, hex keys and authorization ids lower case; serials and redemption codes upper
case). So ``S``, ``s``, ``S\n`` and ``Ｓ`` are one device, and anything else is an error naming
the field.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from server.domain.errors import InvalidField, TooManyLines
from server.domain.gtin import is_valid_gtin13
from server.domain.reference import IDENTIFIER, PRICE_FEN_MAX

LINE_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}")
SERIAL = re.compile(r"[A-Z0-9_./-]{1,64}")
CONSUMER_KEY = re.compile(r"[0-9a-f]{64}")
AUTHORIZATION_ID = re.compile(r"[0-9a-f]{32}")
GTIN = re.compile(r"[0-9]{13}")
# Crockford base32 (no I, L, O, U), 16 characters: 80 random bits.
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
REDEMPTION_CODE = re.compile(r"[0-9A-HJKMNP-TV-Z]{16}")
UUID_FORM = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# A payment channel's transaction id (an acquirer's or wallet's order or refund number): long
# digit strings or the channel's own letters, kept as text and in the channel's case.
CHANNEL_REFERENCE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class LineValues(Protocol):
    """One line of a payment as the rules read it (the request's LineItem has these fields)."""

    @property
    def line_id(self) -> str: ...

    @property
    def gtin(self) -> str: ...

    @property
    def unit_price_fen(self) -> int: ...

    @property
    def serial_number(self) -> str: ...


class Line(NamedTuple):
    """A line as plain values."""

    line_id: str
    gtin: str
    unit_price_fen: int
    serial_number: str


def canonical(value: str) -> str:
    """The one form of an identifier: NFKC, without surrounding whitespace."""
    return unicodedata.normalize("NFKC", value).strip()


def canonical_request_id(value: str) -> str:
    """A UUID in its 36-character hyphenated form, lower case (any case accepted)."""
    form = canonical(value).lower()
    if not UUID_FORM.fullmatch(form):
        raise InvalidField("request_id", "must be a UUID in its 36-character hyphenated form")
    return form  # lower-case 8-4-4-4-12 hex is already str(uuid.UUID(form)), without its ~3 us


def check_request_id(value: str) -> str:
    """Validates a request id and returns its canonical form, which is what becomes a key."""
    return canonical_request_id(value)


def canonical_authorization_id(value: str) -> str:
    form = canonical(value).lower()
    if not AUTHORIZATION_ID.fullmatch(form):
        raise InvalidField("authorization_id", "must be 32 hex characters")
    return form


def check_authorization_id(value: str) -> str:
    return canonical_authorization_id(value)


def canonical_channel_reference(value: str) -> str:
    """The payment channel's reference of a capture or refund; "" when none was given. Case is
    kept: it is the channel's identifier, matched as the channel's file spells it."""
    form = canonical(value)
    if form == "":
        return ""
    if not CHANNEL_REFERENCE.fullmatch(form):
        raise InvalidField("channel_reference", "must be 1-64 characters of [A-Za-z0-9_.:-]")
    return form


def canonical_consumer_key(value: str, field: str = "consumer_key") -> str:
    form = canonical(value).lower()
    if not CONSUMER_KEY.fullmatch(form):
        raise InvalidField(field, "must be 64 hex characters (HMAC-SHA256)")
    return form


def canonical_serial(value: str, field: str = "serial_number") -> str:
    """One device, one key: serials are compared without regard to case ("sn1" is "SN1")."""
    form = canonical(value).upper()
    if not SERIAL.fullmatch(form):
        raise InvalidField(field, "must be 1-64 characters of [A-Za-z0-9_./-]")
    return form


def canonical_redemption_code(value: str) -> str:
    form = canonical(value).upper()
    if not REDEMPTION_CODE.fullmatch(form):
        raise InvalidField("redemption_code", "must be 16 characters of Crockford base32 (0-9, A-Z without I L O U)")
    return form


def check_redemption_code(value: str) -> str:
    return canonical_redemption_code(value)


def new_redemption_code() -> str:
    """16 characters of Crockford base32: 80 random bits, unguessable and easy to type."""
    number = int.from_bytes(secrets.token_bytes(10), "big")
    return "".join(CROCKFORD[(number >> (5 * index)) & 31] for index in range(16))


def canonical_campaign_id(value: str, field: str = "campaign_id") -> str:
    form = canonical(value)
    if not IDENTIFIER.fullmatch(form):
        raise InvalidField(field, "must be 1-64 characters of [A-Za-z0-9_.-]")
    return form


def canonical_lines(lines: Sequence[LineValues], max_lines: int) -> list[tuple[str, str, str]]:
    """Validates a payment's lines and returns, in order, each one's canonical (line id, GTIN,
    serial): ids unique, GTIN-13 with a valid check digit, a price within bounds, serials
    canonical and each device once (a device is its serial, whatever GTIN it is sold under: see
    Keys.serial)."""
    if not lines:
        raise InvalidField("lines", "at least one line is required")
    if len(lines) > max_lines:
        raise TooManyLines("lines", max_lines)
    line_ids: set[str] = set()
    devices: set[str] = set()
    canonical_forms: list[tuple[str, str, str]] = []
    for index, line in enumerate(lines):
        path = f"lines[{index}]"
        line_id = canonical(line.line_id)
        if not LINE_ID.fullmatch(line_id):
            raise InvalidField(f"{path}.line_id", "must be 1-32 characters of [A-Za-z0-9_.-]")
        if line_id in line_ids:
            raise InvalidField(f"{path}.line_id", "is repeated in this request")
        line_ids.add(line_id)
        gtin = canonical(line.gtin)
        if not GTIN.fullmatch(gtin) or not is_valid_gtin13(gtin):
            raise InvalidField(f"{path}.gtin", "must be a GTIN-13 with a valid check digit")
        if not 0 < line.unit_price_fen < PRICE_FEN_MAX:
            raise InvalidField(f"{path}.unit_price_fen", f"must be between 1 and {PRICE_FEN_MAX - 1} fen")
        serial = line.serial_number
        if serial:
            serial = canonical_serial(serial, f"{path}.serial_number")
            if serial in devices:
                raise InvalidField(f"{path}.serial_number", "the same device appears twice in this request")
            devices.add(serial)
        canonical_forms.append((line_id, gtin, serial))
    return canonical_forms


def canonical_line_ids(line_ids: Sequence[str], max_lines: int, field: str = "line_ids") -> list[str]:
    """The line ids a refund names, canonical, each once."""
    if len(line_ids) > max_lines:
        raise InvalidField(field, f"at most {max_lines} line ids")
    seen: set[str] = set()
    forms = []
    for index, line_id in enumerate(line_ids):
        form = canonical(line_id)
        if not LINE_ID.fullmatch(form):
            raise InvalidField(f"{field}[{index}]", "must be 1-32 characters of [A-Za-z0-9_.-]")
        if form in seen:
            raise InvalidField(f"{field}[{index}]", "is repeated")
        seen.add(form)
        forms.append(form)
    return forms
