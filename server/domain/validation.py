"""Request validation: pure checks that turn malformed input into INVALID_ARGUMENT naming the
field. Runs before any Redis call, so a rejected request changes nothing.

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
import unicodedata
import uuid
from collections.abc import Sequence

import grpc
from subsidy_client.v1 import authorization_pb2, common_pb2

from server.domain.gtin import is_valid_gtin13
from server.domain.reference import IDENTIFIER, PRICE_FEN_MAX
from server.rpc.errors import ApiError, invalid_field

LifecycleRequest = authorization_pb2.CaptureRequest | authorization_pb2.VoidRequest | authorization_pb2.RefundRequest

LINE_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}")
SERIAL = re.compile(r"[A-Z0-9_./-]{1,64}")
CONSUMER_KEY = re.compile(r"[0-9a-f]{64}")
AUTHORIZATION_ID = re.compile(r"[0-9a-f]{32}")
GTIN = re.compile(r"[0-9]{13}")
# Crockford base32 (no I, L, O, U), 16 characters: 80 random bits.
REDEMPTION_CODE = re.compile(r"[0-9A-HJKMNP-TV-Z]{16}")
UUID_FORM = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
KNOWN_CHANNELS = frozenset(authorization_pb2.Channel.values()) - {authorization_pb2.CHANNEL_UNSPECIFIED}


def canonical(value: str) -> str:
    """The one form of an identifier: NFKC, without surrounding whitespace."""
    return unicodedata.normalize("NFKC", value).strip()


def canonical_request_id(value: str) -> str:
    """A UUID in its 36-character hyphenated form, lower case (any case accepted)."""
    form = canonical(value).lower()
    if not UUID_FORM.fullmatch(form):
        raise invalid_field("request_id", "must be a UUID in its 36-character hyphenated form")
    return str(uuid.UUID(form))


def check_request_id(value: str) -> str:
    """Validates a request id and returns its canonical form, which is what becomes a key."""
    return canonical_request_id(value)


def canonical_authorization_id(value: str) -> str:
    form = canonical(value).lower()
    if not AUTHORIZATION_ID.fullmatch(form):
        raise invalid_field("authorization_id", "must be 32 hex characters")
    return form


def check_authorization_id(value: str) -> str:
    return canonical_authorization_id(value)


def canonical_consumer_key(value: str, field: str = "consumer_key") -> str:
    form = canonical(value).lower()
    if not CONSUMER_KEY.fullmatch(form):
        raise invalid_field(field, "must be 64 hex characters (HMAC-SHA256)")
    return form


def canonical_serial(value: str, field: str = "serial_number") -> str:
    """One device, one key: serials are compared without regard to case ("sn1" is "SN1")."""
    form = canonical(value).upper()
    if not SERIAL.fullmatch(form):
        raise invalid_field(field, "must be 1-64 characters of [A-Za-z0-9_./-]")
    return form


def canonical_redemption_code(value: str) -> str:
    form = canonical(value).upper()
    if not REDEMPTION_CODE.fullmatch(form):
        raise invalid_field("redemption_code", "must be 16 characters of Crockford base32 (0-9, A-Z without I L O U)")
    return form


def check_redemption_code(value: str) -> str:
    return canonical_redemption_code(value)


def check_authorize(request: authorization_pb2.AuthorizeRequest, max_lines: int) -> authorization_pb2.AuthorizeRequest:
    """Validates an Authorize request and canonicalises it in place (returned for convenience):
    every key and the payload hash are derived from the canonical form, so a request and its
    re-spelt retry are the same request."""
    out = request
    out.request_id = canonical_request_id(request.request_id)
    out.campaign_id = canonical(request.campaign_id)
    if not IDENTIFIER.fullmatch(out.campaign_id):
        raise invalid_field("campaign_id", "must be 1-64 characters of [A-Za-z0-9_.-]")
    out.consumer_key = canonical_consumer_key(request.consumer_key)
    if request.channel not in KNOWN_CHANNELS:
        raise invalid_field("channel", "must be CHANNEL_POS or CHANNEL_ONLINE")
    _check_lines(out.lines, max_lines)
    if request.redemption_code:
        out.redemption_code = canonical_redemption_code(request.redemption_code)
        # A qualification is one discount on one unit: its quota counts units, like the budget.
        if len(request.lines) != 1:
            raise invalid_field("lines", "a payment that redeems a qualification has exactly one line")
    return out


def _check_lines(lines: Sequence[authorization_pb2.LineItem], max_lines: int) -> None:
    """Validates and canonicalises the lines in place (``lines`` is the canonical copy's)."""
    if not lines:
        raise invalid_field("lines", "at least one line is required")
    if len(lines) > max_lines:
        raise ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            common_pb2.ERROR_REASON_TOO_MANY_LINES,
            f"lines: at most {max_lines} lines per request",
            {"field": "lines", "max": str(max_lines)},
        )
    line_ids: set[str] = set()
    # A device is its serial, whatever GTIN it is sold under (see Keys.serial).
    devices: set[str] = set()
    for index, line in enumerate(lines):
        path = f"lines[{index}]"
        line.line_id = canonical(line.line_id)
        if not LINE_ID.fullmatch(line.line_id):
            raise invalid_field(f"{path}.line_id", "must be 1-32 characters of [A-Za-z0-9_.-]")
        if line.line_id in line_ids:
            raise invalid_field(f"{path}.line_id", "is repeated in this request")
        line_ids.add(line.line_id)
        line.gtin = canonical(line.gtin)
        if not GTIN.fullmatch(line.gtin) or not is_valid_gtin13(line.gtin):
            raise invalid_field(f"{path}.gtin", "must be a GTIN-13 with a valid check digit")
        if not 0 < line.unit_price_fen < PRICE_FEN_MAX:
            raise invalid_field(f"{path}.unit_price_fen", f"must be between 1 and {PRICE_FEN_MAX - 1} fen")
        if line.serial_number:
            line.serial_number = canonical_serial(line.serial_number, f"{path}.serial_number")
            if line.serial_number in devices:
                raise invalid_field(f"{path}.serial_number", "the same device appears twice in this request")
            devices.add(line.serial_number)


def check_lifecycle(request: LifecycleRequest) -> None:
    """Canonicalises a Capture / Void / Refund request's identifiers in place."""
    request.request_id = canonical_request_id(request.request_id)
    request.authorization_id = canonical_authorization_id(request.authorization_id)


def check_refund(request: authorization_pb2.RefundRequest, max_lines: int) -> None:
    check_lifecycle(request)
    if len(request.line_ids) > max_lines:
        raise invalid_field("line_ids", f"at most {max_lines} line ids")
    seen: set[str] = set()
    for index, line_id in enumerate(request.line_ids):
        form = canonical(line_id)
        if not LINE_ID.fullmatch(form):
            raise invalid_field(f"line_ids[{index}]", "must be 1-32 characters of [A-Za-z0-9_.-]")
        if form in seen:
            raise invalid_field(f"line_ids[{index}]", "is repeated")
        seen.add(form)
        request.line_ids[index] = form
