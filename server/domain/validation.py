"""Request validation: pure checks that turn malformed input into INVALID_ARGUMENT naming the
field. Runs before any Redis call, so a rejected request changes nothing."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

import grpc
from subsidy_client.v1 import authorization_pb2, common_pb2

from server.domain.gtin import is_valid_gtin13
from server.domain.reference import IDENTIFIER, PRICE_FEN_MAX
from server.errors import ApiError, invalid_field

LINE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
SERIAL = re.compile(r"^[A-Za-z0-9_./-]{1,64}$")
CONSUMER_KEY = re.compile(r"^[0-9a-f]{64}$")
AUTHORIZATION_ID = re.compile(r"^[0-9a-f]{32}$")
# Crockford base32 (no I, L, O, U), 16 characters: 80 random bits.
REDEMPTION_CODE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{16}$")
KNOWN_CHANNELS = frozenset(authorization_pb2.Channel.values()) - {authorization_pb2.CHANNEL_UNSPECIFIED}


def check_request_id(value: str) -> None:
    try:
        parsed = uuid.UUID(value)
    except ValueError as error:
        raise invalid_field("request_id", "must be a UUID") from error
    if str(parsed) != value.lower():
        raise invalid_field("request_id", "must be a UUID in its canonical 36-character form")


def check_authorization_id(value: str) -> None:
    if not AUTHORIZATION_ID.match(value):
        raise invalid_field("authorization_id", "must be 32 lowercase hex characters")


def check_authorize(request: authorization_pb2.AuthorizeRequest, max_lines: int) -> None:
    check_request_id(request.request_id)
    if not IDENTIFIER.match(request.campaign_id):
        raise invalid_field("campaign_id", "must be 1-64 characters of [A-Za-z0-9_.-]")
    if not CONSUMER_KEY.match(request.consumer_key):
        raise invalid_field("consumer_key", "must be 64 lowercase hex characters (HMAC-SHA256)")
    if request.channel not in KNOWN_CHANNELS:
        raise invalid_field("channel", "must be CHANNEL_POS or CHANNEL_ONLINE")
    _check_lines(request.lines, max_lines)
    if request.redemption_code:
        check_redemption_code(request.redemption_code)
        # A qualification is one discount on one unit: its quota counts units, like the budget.
        if len(request.lines) != 1:
            raise invalid_field("lines", "a payment that redeems a qualification has exactly one line")


def check_redemption_code(value: str) -> None:
    if not REDEMPTION_CODE.match(value):
        raise invalid_field("redemption_code", "must be 16 characters of Crockford base32 (0-9, A-Z without I L O U)")


def _check_lines(lines: Sequence[authorization_pb2.LineItem], max_lines: int) -> None:
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
    devices: set[tuple[str, str]] = set()
    for index, line in enumerate(lines):
        path = f"lines[{index}]"
        if not LINE_ID.match(line.line_id):
            raise invalid_field(f"{path}.line_id", "must be 1-32 characters of [A-Za-z0-9_.-]")
        if line.line_id in line_ids:
            raise invalid_field(f"{path}.line_id", "is repeated in this request")
        line_ids.add(line.line_id)
        if not is_valid_gtin13(line.gtin):
            raise invalid_field(f"{path}.gtin", "must be a GTIN-13 with a valid check digit")
        if not 0 < line.unit_price_fen < PRICE_FEN_MAX:
            raise invalid_field(f"{path}.unit_price_fen", f"must be between 1 and {PRICE_FEN_MAX - 1} fen")
        if line.serial_number:
            if not SERIAL.match(line.serial_number):
                raise invalid_field(f"{path}.serial_number", "must be 1-64 characters of [A-Za-z0-9_./-]")
            device = (line.gtin, line.serial_number.upper())
            if device in devices:
                raise invalid_field(f"{path}.serial_number", "the same device appears twice in this request")
            devices.add(device)


def check_lifecycle(request_id: str, authorization_id: str) -> None:
    check_request_id(request_id)
    check_authorization_id(authorization_id)


def check_refund(request: authorization_pb2.RefundRequest, max_lines: int) -> None:
    check_lifecycle(request.request_id, request.authorization_id)
    if len(request.line_ids) > max_lines:
        raise invalid_field("line_ids", f"at most {max_lines} line ids")
    seen: set[str] = set()
    for index, line_id in enumerate(request.line_ids):
        if not LINE_ID.match(line_id):
            raise invalid_field(f"line_ids[{index}]", "must be 1-32 characters of [A-Za-z0-9_.-]")
        if line_id in seen:
            raise invalid_field(f"line_ids[{index}]", "is repeated")
        seen.add(line_id)
