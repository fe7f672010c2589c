"""Coordinates: validation, GCJ-02 to WGS-84 conversion, and point-in-region tests.

Pure functions. Campaign regions are GeoJSON in WGS-84 (longitude, latitude), while Chinese map
SDKs (AMap, Tencent, and Google Maps inside China) report GCJ-02, an obfuscated datum that
shifts points by a few hundred metres in a smooth, position-dependent way. A store given in
GCJ-02 must be converted before it is tested against a region, or a shop near a district line
lands on the wrong side of it.

The GCJ-02 forward transform below is the standard published one (the Krasovsky 1940 ellipsoid
constants with the well-known trigonometric offset series); the same series is used by every
open implementation (e.g. googollee/eviltransform), whose published test vectors it reproduces
exactly. There is no closed-form inverse, so ``gcj02_to_wgs84`` iterates the forward transform.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import shapely.geometry
import shapely.prepared

# Krasovsky 1940 ellipsoid, as the GCJ-02 algorithm defines it.
KRASOVSKY_SEMI_MAJOR_AXIS_M = 6378245.0
KRASOVSKY_ECCENTRICITY_SQUARED = 0.00669342162296594323

# The rectangle inside which the GCJ-02 offset applies; outside it GCJ-02 equals WGS-84. This is
# the bounding box every implementation uses: it also covers parts of neighbouring countries,
# where map SDKs report WGS-84 anyway, so a point there given as GCJ-02 is shifted needlessly.
CHINA_LONGITUDE_MIN, CHINA_LONGITUDE_MAX = 72.004, 137.8347
CHINA_LATITUDE_MIN, CHINA_LATITUDE_MAX = 0.8293, 55.8271

# The inverse stops when a step moves the estimate less than this (about 0.01 mm), or after the
# bound below; in practice it converges in 3-4 steps because the offset varies slowly.
INVERSE_TOLERANCE_DEG = 1e-10
INVERSE_ITERATIONS_MAX = 20

MEAN_EARTH_RADIUS_M = 6371008.8


class CoordinateSystem(enum.Enum):
    """The datum a reported position is given in."""

    WGS84 = "WGS-84"
    GCJ02 = "GCJ-02"


class CoordinateError(ValueError):
    """A location that cannot be used; ``field`` names the culprit (relative to the location)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Point:
    """A WGS-84 position in degrees."""

    latitude: float
    longitude: float


def is_outside_china(latitude: float, longitude: float) -> bool:
    return not (
        CHINA_LONGITUDE_MIN <= longitude <= CHINA_LONGITUDE_MAX and CHINA_LATITUDE_MIN <= latitude <= CHINA_LATITUDE_MAX
    )


def _latitude_offset(x: float, y: float) -> float:
    """The published series for the latitude shift; x, y are degrees from (105 E, 35 N)."""
    offset = -100.0 + 2.0 * x + 3.0 * y + 0.2 * y * y + 0.1 * x * y + 0.2 * math.sqrt(abs(x))
    offset += (20.0 * math.sin(6.0 * x * math.pi) + 20.0 * math.sin(2.0 * x * math.pi)) * 2.0 / 3.0
    offset += (20.0 * math.sin(y * math.pi) + 40.0 * math.sin(y / 3.0 * math.pi)) * 2.0 / 3.0
    offset += (160.0 * math.sin(y / 12.0 * math.pi) + 320.0 * math.sin(y * math.pi / 30.0)) * 2.0 / 3.0
    return offset


def _longitude_offset(x: float, y: float) -> float:
    """The published series for the longitude shift; x, y are degrees from (105 E, 35 N)."""
    offset = 300.0 + x + 2.0 * y + 0.1 * x * x + 0.1 * x * y + 0.1 * math.sqrt(abs(x))
    offset += (20.0 * math.sin(6.0 * x * math.pi) + 20.0 * math.sin(2.0 * x * math.pi)) * 2.0 / 3.0
    offset += (20.0 * math.sin(x * math.pi) + 40.0 * math.sin(x / 3.0 * math.pi)) * 2.0 / 3.0
    offset += (150.0 * math.sin(x / 12.0 * math.pi) + 300.0 * math.sin(x / 30.0 * math.pi)) * 2.0 / 3.0
    return offset


def wgs84_to_gcj02(latitude: float, longitude: float) -> tuple[float, float]:
    """The GCJ-02 (latitude, longitude) a Chinese map shows for a WGS-84 position."""
    if is_outside_china(latitude, longitude):
        return latitude, longitude
    x, y = longitude - 105.0, latitude - 35.0
    radians = latitude / 180.0 * math.pi
    magic = 1.0 - KRASOVSKY_ECCENTRICITY_SQUARED * math.sin(radians) ** 2
    root = math.sqrt(magic)
    # The series gives metres-like units; scale them by the ellipsoid's radii of curvature
    # (meridional for latitude, prime vertical times cos(latitude) for longitude).
    meridional_m = KRASOVSKY_SEMI_MAJOR_AXIS_M * (1.0 - KRASOVSKY_ECCENTRICITY_SQUARED) / (magic * root)
    parallel_m = KRASOVSKY_SEMI_MAJOR_AXIS_M / root * math.cos(radians)
    shift_latitude = _latitude_offset(x, y) * 180.0 / (meridional_m * math.pi)
    shift_longitude = _longitude_offset(x, y) * 180.0 / (parallel_m * math.pi)
    return latitude + shift_latitude, longitude + shift_longitude


def gcj02_to_wgs84(latitude: float, longitude: float) -> tuple[float, float]:
    """The WGS-84 position whose GCJ-02 image is the given point, to well under a centimetre.

    Fixed-point iteration: move the estimate by the error of its forward image. The offset's
    gradient is tiny (it changes by metres over kilometres), so each step shrinks the error
    about a thousandfold; the one-step approximation many libraries use is off by 1-2 m."""
    if is_outside_china(latitude, longitude):
        return latitude, longitude
    estimate_latitude, estimate_longitude = latitude, longitude
    for _ in range(INVERSE_ITERATIONS_MAX):
        image_latitude, image_longitude = wgs84_to_gcj02(estimate_latitude, estimate_longitude)
        error_latitude, error_longitude = image_latitude - latitude, image_longitude - longitude
        estimate_latitude -= error_latitude
        estimate_longitude -= error_longitude
        if max(abs(error_latitude), abs(error_longitude)) < INVERSE_TOLERANCE_DEG:
            break
    return estimate_latitude, estimate_longitude


def check_coordinates(latitude: float, longitude: float) -> None:
    """Refuses NaN, infinities and out-of-range degrees, naming the field."""
    if not math.isfinite(latitude) or not -90.0 <= latitude <= 90.0:
        raise CoordinateError("latitude", "must be a finite number of degrees between -90 and 90")
    if not math.isfinite(longitude) or not -180.0 <= longitude <= 180.0:
        raise CoordinateError("longitude", "must be a finite number of degrees between -180 and 180")


def to_wgs84(latitude: float, longitude: float, system: CoordinateSystem | None) -> Point:
    """Validates a reported location and returns it in WGS-84.

    An unspecified system (None: ``COORDINATE_SYSTEM_UNSPECIFIED`` in the message) is refused
    rather than guessed, since guessing wrong moves the point by hundreds of metres."""
    check_coordinates(latitude, longitude)
    if system is CoordinateSystem.WGS84:
        return Point(latitude, longitude)
    if system is CoordinateSystem.GCJ02:
        converted_latitude, converted_longitude = gcj02_to_wgs84(latitude, longitude)
        return Point(converted_latitude, converted_longitude)
    raise CoordinateError("coordinate_system", "must be COORDINATE_SYSTEM_WGS84 or COORDINATE_SYSTEM_GCJ02")


def region_to_wgs84(geojson: Mapping[str, Any], system: CoordinateSystem) -> dict[str, Any]:
    """A GeoJSON Polygon or MultiPolygon given in ``system``, with every position in WGS-84.

    Officials publish district boundaries in GCJ-02 (Chinese boundary data and every map SDK
    use it); each vertex goes through the same ``gcj02_to_wgs84`` a claim's position does, so a
    region and a phone's point reported in the same system land on the same side of the line.
    The caller has checked the structure (shapely parsed it) and the degree ranges. A third
    number in a position (altitude) is kept as it is."""
    if system is CoordinateSystem.WGS84:
        return dict(geojson)
    polygons = [geojson["coordinates"]] if geojson["type"] == "Polygon" else geojson["coordinates"]
    converted = [[[_position_to_wgs84(position) for position in ring] for ring in polygon] for polygon in polygons]
    return {**geojson, "coordinates": converted[0] if geojson["type"] == "Polygon" else converted}


def _position_to_wgs84(position: Sequence[float]) -> list[float]:
    latitude, longitude = gcj02_to_wgs84(float(position[1]), float(position[0]))
    return [longitude, latitude, *position[2:]]


def distance_m(first: Point, second: Point) -> float:
    """Great-circle distance on a spherical Earth (haversine); good to about 0.5% here."""
    phi_1, phi_2 = math.radians(first.latitude), math.radians(second.latitude)
    delta_phi = phi_2 - phi_1
    delta_lambda = math.radians(second.longitude - first.longitude)
    half_chord = math.sin(delta_phi / 2) ** 2 + math.cos(phi_1) * math.cos(phi_2) * math.sin(delta_lambda / 2) ** 2
    return 2 * MEAN_EARTH_RADIUS_M * math.asin(math.sqrt(half_chord))


class Region:
    """A GeoJSON Polygon or MultiPolygon (WGS-84 longitude, latitude), prepared once so that
    repeated point tests are fast."""

    def __init__(self, geojson: Any) -> None:
        self._prepared = shapely.prepared.prep(shapely.geometry.shape(geojson))

    def covers(self, point: Point) -> bool:
        """True when the point lies inside or on the boundary: a shop exactly on the district
        line belongs to the district."""
        return bool(self._prepared.covers(shapely.geometry.Point(point.longitude, point.latitude)))


@functools.lru_cache(maxsize=128)
def region_from_text(geojson_text: str) -> Region:
    """A prepared region from its GeoJSON text (as PostgreSQL returns jsonb), cached by text:
    the same text always means the same geometry, and campaigns are few."""
    return Region(orjson.loads(geojson_text))


def inside_any(point: Point, regions: Iterable[Region]) -> bool:
    return any(region.covers(point) for region in regions)


def stores_inside(region_text: str, stores: Iterable[tuple[str, float | None, float | None]]) -> set[str]:
    """The ids of the stores (id, WGS-84 latitude, longitude) that the region covers, on its
    boundary included (``Region.covers``, the test a store's registration passes). A store
    without a location (an online shop) is inside no region."""
    region = region_from_text(region_text)
    return {
        store_id
        for store_id, latitude, longitude in stores
        if latitude is not None and longitude is not None and region.covers(Point(latitude, longitude))
    }
