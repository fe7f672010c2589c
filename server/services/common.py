"""What the servicers share: the payload hash that idempotency compares, the one mapping of
script error codes to gRPC errors, timestamps, and reported locations as domain points."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client.v1 import common_pb2

from server.domain import geo, identity
from server.rpc.errors import ApiError, invalid_field
from storage.redis.contract import Failure

# Script error codes -> what the caller is told.
SCRIPT_ERRORS: Mapping[str, tuple[grpc.StatusCode, int, str]] = {
    "NONCE_REUSED": (
        grpc.StatusCode.UNAUTHENTICATED,
        common_pb2.ERROR_REASON_UNAUTHENTICATED,
        "nonce already used; sign every attempt with a fresh nonce",
    ),
    "IDEMPOTENCY_CONFLICT": (
        grpc.StatusCode.ALREADY_EXISTS,
        common_pb2.ERROR_REASON_IDEMPOTENCY_CONFLICT,
        "request_id was already used with a different payload",
    ),
    "AUTHORIZATION_NOT_FOUND": (
        grpc.StatusCode.NOT_FOUND,
        common_pb2.ERROR_REASON_AUTHORIZATION_NOT_FOUND,
        "no such authorization for this merchant",
    ),
    "INVALID_STATE": (
        grpc.StatusCode.FAILED_PRECONDITION,
        common_pb2.ERROR_REASON_INVALID_STATE,
        "the authorization's state does not allow this call",
    ),
    "CHANNEL_REFERENCE_CONFLICT": (
        grpc.StatusCode.FAILED_PRECONDITION,
        common_pb2.ERROR_REASON_CHANNEL_REFERENCE_CONFLICT,
        "the authorization was captured under another payment-channel reference",
    ),
    "LINE_ALREADY_REFUNDED": (
        grpc.StatusCode.FAILED_PRECONDITION,
        common_pb2.ERROR_REASON_LINE_ALREADY_REFUNDED,
        "the line was already refunded",
    ),
    "TERMINAL_INACTIVE": (
        grpc.StatusCode.PERMISSION_DENIED,
        common_pb2.ERROR_REASON_PERMISSION_DENIED,
        "the terminal is suspended (or no longer bound to this merchant)",
    ),
    "MERCHANT_INACTIVE": (
        grpc.StatusCode.PERMISSION_DENIED,
        common_pb2.ERROR_REASON_PERMISSION_DENIED,
        "the merchant is suspended",
    ),
    "TERMINAL_MERCHANT_MISMATCH": (
        grpc.StatusCode.PERMISSION_DENIED,
        common_pb2.ERROR_REASON_PERMISSION_DENIED,
        "the terminal was re-bound to another merchant; retry shortly",
    ),
}


def payload_hash(method: str, request: Any) -> str:
    """Identifies a request's payload for idempotency: same method and same fields, same hash."""
    return hashlib.sha256(method.encode() + b"\n" + request.SerializeToString(deterministic=True)).hexdigest()


def key_id_number(programme_key: bytes, raw: str, field: str) -> tuple[str, str]:
    """An ID number keyed at the edge, the one place a request's ID number becomes a consumer
    key: ClaimQualification (a partner app's claim) and Authorize (a till that read an ID card)
    both call this, so the two reach the same consumer. Returns (the normalised number, its
    consumer key under the programme key); INVALID_ARGUMENT naming ``field`` when the number
    is absent or not a valid resident ID number, FAILED_PRECONDITION when the gateway has no
    programme key. Callers never store, log or hash the number (docs/privacy.md)."""
    if not programme_key:
        raise ApiError(
            grpc.StatusCode.FAILED_PRECONDITION,
            common_pb2.ERROR_REASON_DEPENDENCY_UNAVAILABLE,
            "the gateway has no programme key configured (SUBSIDY_PROGRAMME_KEY)",
        )
    if not raw:
        raise invalid_field(field, "is required")
    try:
        number = identity.validate_id_number(raw)
    except identity.IdentityError as error:
        raise invalid_field(field, str(error)) from None
    return number, identity.consumer_key(programme_key, number)


def raise_script_error(failure: Failure) -> NoReturn:
    code = failure.error
    if code == "LINE_NOT_FOUND":
        raise invalid_field("line_ids", f"line {failure.line_id} is not part of this authorization")
    if code not in SCRIPT_ERRORS:
        raise RuntimeError(f"script returned unknown error {code}")
    status, reason, message = SCRIPT_ERRORS[code]
    metadata = failure.details()
    if "state" in metadata:
        metadata["state"] = "AUTHORIZATION_STATE_" + metadata["state"]
    raise ApiError(status, reason, message, metadata)


# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
TIMESTAMP_SECONDS_MIN, TIMESTAMP_SECONDS_MAX = -62_135_596_800, 253_402_300_799


TIMESTAMP_RANGE = "is not a valid timestamp (0001-01-01 to 9999-12-31, nanos 0-999999999)"


def timestamp_in_range(stamp: Timestamp) -> bool:
    return TIMESTAMP_SECONDS_MIN <= stamp.seconds <= TIMESTAMP_SECONDS_MAX and 0 <= stamp.nanos <= 999_999_999


def checked_timestamp(stamp: Timestamp, field: str) -> Timestamp:
    """A request's Timestamp, or INVALID_ARGUMENT naming the field when it is no valid
    Timestamp (protobuf's conversions raise ValueError on those, which would be INTERNAL)."""
    if not timestamp_in_range(stamp):
        raise invalid_field(field, TIMESTAMP_RANGE)
    return stamp


def timestamp_ms(milliseconds: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(milliseconds)
    return stamp


# The message's coordinate systems as the domain names them; an unspecified system maps to
# None, which the domain refuses rather than guesses.
COORDINATE_SYSTEMS: Mapping[int, geo.CoordinateSystem] = {
    common_pb2.COORDINATE_SYSTEM_WGS84: geo.CoordinateSystem.WGS84,
    common_pb2.COORDINATE_SYSTEM_GCJ02: geo.CoordinateSystem.GCJ02,
}


def wgs84_point(location: common_pb2.Location) -> geo.Point:
    """A reported location, validated and converted to WGS-84 (raises ``geo.CoordinateError``
    naming the field relative to the location)."""
    return geo.to_wgs84(location.latitude, location.longitude, COORDINATE_SYSTEMS.get(location.coordinate_system))
