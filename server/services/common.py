"""What the servicers share: the payload hash that idempotency compares, the one mapping of
script error codes to gRPC errors, timestamps, reported locations as domain points, and each
campaign's location rule and region as a process caches them (a claim's and a payment's)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any, NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client.v1 import common_pb2, qualification_pb2

from server.domain import geo, identity, location
from server.rpc.errors import ApiError, invalid_field
from storage.redis.contract import Failure
from storage.redis.store import RedisStore

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
    "MERCHANT_SUSPENDED": (
        grpc.StatusCode.FAILED_PRECONDITION,
        common_pb2.ERROR_REASON_MERCHANT_SUSPENDED,
        "the merchant is on the block list: its pending holds cannot be captured until the block is lifted",
    ),
    "LINE_ALREADY_REFUNDED": (
        grpc.StatusCode.FAILED_PRECONDITION,
        common_pb2.ERROR_REASON_LINE_ALREADY_REFUNDED,
        "the line was already refunded",
    ),
    "LINE_CLAWED_BACK": (
        grpc.StatusCode.FAILED_PRECONDITION,
        common_pb2.ERROR_REASON_INVALID_STATE,
        "the line's subsidy was clawed back (a confirmed risk case): it cannot be refunded or clawed back again",
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
    if code == "VOUCHER_NEEDS_ONE_LINE":
        raise invalid_field("lines", "a payment that redeems a qualification of a per-line rule has exactly one line")
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


def device_point(device: qualification_pb2.DeviceLocation, field: str, now_ms: int) -> tuple[geo.Point, int]:
    """A phone's reported location (a claim's ``device_location``, a payment's
    ``consumer_location``, named by ``field``) validated and converted to WGS-84: (the point, the
    fix time in ms). INVALID_ARGUMENT naming the field for what cannot be real (no location, a
    coordinate out of range or not a number, no or an unknown coordinate system, an accuracy
    that is no radius, no fix time or one from the future); a merely poor or old fix is not an
    error but a verdict (``location.verdict``)."""
    if not device.HasField("location"):
        raise invalid_field(f"{field}.location", "is required")
    # A fix time outside the Timestamp range is refused like any other impossible fix time,
    # after the location and the accuracy (the order the fields are checked in).
    in_range = not device.HasField("fix_time") or timestamp_in_range(device.fix_time)
    fix_ms = device.fix_time.ToMilliseconds() if device.HasField("fix_time") and in_range else 0
    try:
        point = wgs84_point(device.location)
        location.check_fix(device.location.accuracy_m, fix_ms if in_range else now_ms, now_ms)
        if not in_range:
            raise geo.CoordinateError("fix_time", TIMESTAMP_RANGE)
    except geo.CoordinateError as error:
        prefix = field if error.field == "fix_time" else f"{field}.location"
        raise invalid_field(f"{prefix}.{error.field}", error.reason) from None
    return point, fix_ms


# How long a process trusts its copy of a campaign's location rule and region.
CAMPAIGN_CACHE_S = 1.0


class CampaignLocations:
    """Each campaign's location rule and prepared region, re-read from Redis at most once a
    second per campaign (an operator's change reaches every process within that). Shared by
    ClaimQualification and Authorize: the verdict is computed here, in the gateway, and the
    script only applies it, so the hot path stays one script call."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._cached: dict[str, tuple[float, tuple[location.LocationRule, geo.Region | None] | None]] = {}

    async def get(
        self, campaign_id: str, *, recheck_missing: bool = False
    ) -> tuple[location.LocationRule, geo.Region | None] | None:
        """The campaign's rule and region, None when it is not published. ``recheck_missing``
        re-reads a campaign cached as absent instead of trusting that for the second (a payment
        must not be judged without the rule of a campaign published a moment ago)."""
        now = time.monotonic()
        cached = self._cached.get(campaign_id)
        if cached is not None and now - cached[0] < CAMPAIGN_CACHE_S and (cached[1] is not None or not recheck_missing):
            return cached[1]
        published = await self._store.location_rule(campaign_id)
        found = None
        if published is not None:
            accuracy_m, age_s, region_text = published
            found = (
                location.LocationRule(max_accuracy_m=accuracy_m, max_age_s=age_s),
                geo.region_from_text(region_text) if region_text else None,
            )
        if len(self._cached) > 1000:
            self._cached.clear()
        self._cached[campaign_id] = (now, found)
        return found
