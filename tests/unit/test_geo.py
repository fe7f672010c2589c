"""Coordinates: GCJ-02 conversion, validation and the point-in-region test (server.domain.geo)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from subsidy_client.v1 import common_pb2

from server.domain.geo import (
    CoordinateError,
    CoordinateSystem,
    Point,
    Region,
    distance_m,
    gcj02_to_wgs84,
    inside_any,
    region_from_text,
    to_wgs84,
    wgs84_to_gcj02,
)
from server.services.common import wgs84_point

ROOT = Path(__file__).resolve().parents[2]
XIAOSHAN_FILE = ROOT / "examples" / "merchants" / "xiaoshan-region.geojson.yaml"

XIAOSHAN_GOVERNMENT = Point(30.18, 120.26)
BINJIANG_GOVERNMENT = Point(30.208, 120.212)
WEST_LAKE = Point(30.25, 120.14)
XIAOSHAN_AIRPORT = Point(30.23, 120.43)

# Published test vectors of googollee/eviltransform (repeated in its Go, Python and PHP ports):
# (WGS-84 latitude, longitude) -> (GCJ-02 latitude, longitude). An independent implementation
# of the same standard transform, so matching them checks our constants and series term by term.
EVILTRANSFORM_VECTORS = [
    ((31.1774276, 121.5272106), (31.17530398364597, 121.531541859215)),  # Shanghai, Pudong
    ((22.543847, 113.912316), (22.540796131694766, 113.9171764808363)),  # Shenzhen, Nanshan
    ((39.911954, 116.377817), (39.91334545536069, 116.38404722455657)),  # Beijing, Xicheng
]


def xiaoshan() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(XIAOSHAN_FILE.read_text())
    return document


@pytest.mark.parametrize(("wgs84", "gcj02"), EVILTRANSFORM_VECTORS)
def test_forward_transform_matches_the_published_vectors(
    wgs84: tuple[float, float], gcj02: tuple[float, float]
) -> None:
    """WGS-84 -> GCJ-02 reproduces another implementation's vectors to a millionth of a metre."""
    converted = wgs84_to_gcj02(*wgs84)
    assert distance_m(Point(*converted), Point(*gcj02)) < 1e-6


@pytest.mark.parametrize(("wgs84", "gcj02"), EVILTRANSFORM_VECTORS)
def test_gcj02_of_known_places_converts_back_to_their_wgs84_position(
    wgs84: tuple[float, float], gcj02: tuple[float, float]
) -> None:
    """The iterative inverse lands on the original WGS-84 fix (well under the 1 m asked for),
    although the two datums differ there by hundreds of metres."""
    converted = to_wgs84(*gcj02, CoordinateSystem.GCJ02)
    assert distance_m(converted, Point(*wgs84)) < 0.05
    assert distance_m(Point(*gcj02), Point(*wgs84)) > 100


@pytest.mark.parametrize(
    "place", [XIAOSHAN_GOVERNMENT, BINJIANG_GOVERNMENT, WEST_LAKE, XIAOSHAN_AIRPORT, Point(29.87, 120.33)]
)
def test_round_trip_in_hangzhou_is_exact_and_the_offset_is_plausible(place: Point) -> None:
    """wgs -> gcj -> wgs returns within 0.5 m (in fact within a millimetre), and the GCJ-02
    shift in Hangzhou is the few hundred metres, east and a little south, that maps show."""
    gcj_latitude, gcj_longitude = wgs84_to_gcj02(place.latitude, place.longitude)
    back = Point(*gcj02_to_wgs84(gcj_latitude, gcj_longitude))
    assert distance_m(back, place) < 0.001
    offset_m = distance_m(place, Point(gcj_latitude, gcj_longitude))
    assert 300 < offset_m < 600
    assert gcj_longitude > place.longitude  # shifted east ...
    assert gcj_latitude < place.latitude  # ... and south, in this part of China


def test_outside_china_there_is_no_offset() -> None:
    """GCJ-02 applies inside China only: elsewhere both directions are the identity."""
    london = (51.5007, -0.1246)
    sydney = (-33.8568, 151.2153)
    for place in (london, sydney):
        assert wgs84_to_gcj02(*place) == place
        assert gcj02_to_wgs84(*place) == place


def test_wgs84_input_is_returned_unchanged() -> None:
    """A WGS-84 location is already in the regions' datum and is not shifted."""
    assert to_wgs84(30.18, 120.26, CoordinateSystem.WGS84) == XIAOSHAN_GOVERNMENT


@pytest.mark.parametrize(
    ("latitude", "longitude", "system", "field"),
    [
        (91.0, 120.0, CoordinateSystem.WGS84, "latitude"),
        (-90.5, 120.0, CoordinateSystem.WGS84, "latitude"),
        (math.nan, 120.0, CoordinateSystem.WGS84, "latitude"),
        (30.0, 180.5, CoordinateSystem.GCJ02, "longitude"),
        (30.0, math.inf, CoordinateSystem.GCJ02, "longitude"),
        (30.0, -math.nan, CoordinateSystem.GCJ02, "longitude"),
        (30.18, 120.26, None, "coordinate_system"),
    ],
)
def test_invalid_locations_name_the_field(
    latitude: float, longitude: float, system: CoordinateSystem | None, field: str
) -> None:
    """Out-of-range or non-finite degrees and an unspecified datum are refused, naming the field."""
    with pytest.raises(CoordinateError) as raised:
        to_wgs84(latitude, longitude, system)
    assert raised.value.field == field


@pytest.mark.parametrize("system", [common_pb2.COORDINATE_SYSTEM_UNSPECIFIED, 7])
def test_a_message_without_a_known_datum_is_refused(system: int) -> None:
    """The servicers map the message's CoordinateSystem to the domain's; an unspecified or
    unknown value reaches the domain as no system, which it refuses."""
    message = common_pb2.Location(latitude=30.18, longitude=120.26, coordinate_system=system)  # type: ignore[arg-type]
    with pytest.raises(CoordinateError) as raised:
        wgs84_point(message)
    assert raised.value.field == "coordinate_system"
    wgs84 = common_pb2.Location(latitude=30.18, longitude=120.26, coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84)
    assert wgs84_point(wgs84) == XIAOSHAN_GOVERNMENT


def test_extreme_but_valid_coordinates_are_accepted() -> None:
    """The poles and the antimeridian are legal positions (outside China, so not shifted)."""
    assert to_wgs84(90.0, 180.0, CoordinateSystem.GCJ02) == Point(90.0, 180.0)
    assert to_wgs84(-90.0, -180.0, CoordinateSystem.WGS84) == Point(-90.0, -180.0)


def test_xiaoshan_polygon_holds_xiaoshan_and_not_its_neighbours() -> None:
    """The simplified Xiaoshan outline contains the district government and the airport, and
    excludes West Lake (across the Qiantang) and Binjiang's government (across the district line)."""
    region = Region(xiaoshan())
    assert region.covers(XIAOSHAN_GOVERNMENT)
    assert region.covers(XIAOSHAN_AIRPORT)
    assert not region.covers(WEST_LAKE)
    assert not region.covers(BINJIANG_GOVERNMENT)


def test_a_point_on_the_boundary_counts_as_inside() -> None:
    """A vertex of the outline is covered: a shop exactly on the line belongs to the district."""
    assert Region(xiaoshan()).covers(Point(30.160, 120.240))


def test_converting_before_the_region_test_decides_the_side_of_the_line() -> None:
    """A shop 250 m west of the Binjiang line, as AMap reports it (GCJ-02, six decimals): read
    as WGS-84 it would wrongly fall inside Xiaoshan; converted first, it is correctly outside."""
    region = Region(xiaoshan())
    shop_wgs84 = Point(30.19, 120.242)
    shop_gcj02 = (30.187542, 120.246476)  # what the map SDK reports for shop_wgs84
    assert not region.covers(shop_wgs84)
    assert region.covers(Point(*shop_gcj02))
    converted = to_wgs84(*shop_gcj02, CoordinateSystem.GCJ02)
    assert distance_m(converted, shop_wgs84) < 0.1  # six decimals are about 0.1 m
    assert not region.covers(converted)


def test_multipolygon_regions_and_the_any_region_rule() -> None:
    """A MultiPolygon covers each of its parts; a point need only lie in one region of several."""
    west_lake_box = {
        "type": "MultiPolygon",
        "coordinates": [
            [[[120.10, 30.20], [120.18, 30.20], [120.18, 30.28], [120.10, 30.28], [120.10, 30.20]]],
            [[[121.40, 31.10], [121.60, 31.10], [121.60, 31.30], [121.40, 31.30], [121.40, 31.10]]],
        ],
    }
    regions = [Region(xiaoshan()), Region(west_lake_box)]
    assert Region(west_lake_box).covers(WEST_LAKE)
    assert Region(west_lake_box).covers(Point(31.2, 121.5))  # the second part
    assert inside_any(WEST_LAKE, regions)
    assert inside_any(XIAOSHAN_GOVERNMENT, regions)
    assert not inside_any(BINJIANG_GOVERNMENT, regions)
    assert not inside_any(XIAOSHAN_GOVERNMENT, [])


def test_regions_from_database_text_are_prepared_once() -> None:
    """The same GeoJSON text (as PostgreSQL returns jsonb) yields the same prepared region."""
    text = orjson.dumps(xiaoshan()).decode()
    assert region_from_text(text) is region_from_text(text)
    assert region_from_text(text).covers(XIAOSHAN_GOVERNMENT)
