"""Campaign regions given in GCJ-02 (issue 13, item 10): server.domain.reference converts every
vertex to WGS-84 with geo.gcj02_to_wgs84, the conversion a claim's position goes through, and
refuses an unknown system or an invalid polygon naming the field. Tested with Xiaoshan's real
boundary as published in GCJ-02 (tests/fixtures/xiaoshan-330109-gcj02.geojson, source in its
properties) and with the repository's hand-drawn WGS-84 outline, whose GCJ-02 image gives a
WGS-84 truth to compare the conversion with."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from server.domain.geo import CoordinateSystem, Point, Region, distance_m, to_wgs84, wgs84_to_gcj02
from server.domain.reference import ReferenceError, parse_campaign, parse_region

ROOT = Path(__file__).resolve().parents[2]
XIAOSHAN_FILE = ROOT / "examples" / "merchants" / "xiaoshan-region.geojson.yaml"
# The real district boundary as published in GCJ-02 (DataV.GeoAtlas, adcode 330109), simplified;
# the file's properties cite the source and say how it was simplified.
XIAOSHAN_330109_FILE = ROOT / "tests" / "fixtures" / "xiaoshan-330109-gcj02.geojson"

# Places given as a Chinese map gives them (GCJ-02 latitude, longitude), each kilometres from
# the published line, so the simplification (at most about 200 m) cannot decide them.
INSIDE_330109 = {
    "DataV's published centre of the district": (30.162932, 120.27069),
    "Hangzhou Xiaoshan International Airport": (30.236, 120.434),
}
OUTSIDE_330109 = {
    "Binjiang District government, across the western line": (30.205568, 120.216529),
    "West Lake, north of the Qiantang": (30.247694, 120.144734),
}
# Phone fixes (GCJ-02) either side of the western line near 30.20 N, where the published line
# runs north-south at about 120.2335 E: about 190 m inside and 200 m outside it.
INSIDE_330109_WEST_LINE = (30.200, 120.2355)
OUTSIDE_330109_WEST_LINE = (30.200, 120.2315)

# Xiaoshan District, Hangzhou, as a Chinese map shows it (GCJ-02, six decimals, about 0.1 m):
# the GCJ-02 image of the WGS-84 outline in examples/merchants/xiaoshan-region.geojson.yaml
# (hand-simplified from the district's published extent, accurate to about a kilometre; see
# that file), produced once with the forward transform that tests/unit/test_geo.py checks
# against eviltransform's published vectors. What an official copies off AMap looks like this.
XIAOSHAN_GCJ02: dict[str, Any] = {
    "type": "Polygon",
    "coordinates": [
        [
            [120.254472, 30.222543], [120.244476, 30.157542], [120.144724, 30.127688],
            [120.124762, 30.047711], [120.174625, 29.967634], [120.244455, 29.897537],
            [120.334498, 29.847631], [120.424544, 29.917716], [120.474423, 29.997628],
            [120.504318, 30.097542], [120.534215, 30.197459], [120.464477, 30.257661],
            [120.364573, 30.247697], [120.304488, 30.237589], [120.254472, 30.222543],
        ]
    ],
}  # fmt: skip

# Phone fixes as the map SDK reports them (GCJ-02) near the district's western line, which runs
# from 120.140 E, 30.130 N to 120.120 E, 30.050 N in WGS-84 (120.130 E at 30.090 N):
INSIDE_WEST_LINE_GCJ02 = (30.087699, 120.136241)  # WGS-84 30.090 N, 120.1315 E: 145 m inside
OUTSIDE_WEST_LINE_GCJ02 = (30.087704, 120.132749)  # WGS-84 30.090 N, 120.128 E: 190 m outside


def xiaoshan_330109_gcj02() -> dict[str, Any]:
    """The published boundary's geometry (a GeoJSON Polygon in GCJ-02)."""
    geometry: dict[str, Any] = orjson.loads(XIAOSHAN_330109_FILE.read_bytes())["geometry"]
    return geometry


def xiaoshan_wgs84() -> list[list[float]]:
    document: dict[str, Any] = yaml.safe_load(XIAOSHAN_FILE.read_text())
    ring: list[list[float]] = document["coordinates"][0]
    return ring


def test_a_gcj02_district_is_stored_as_its_wgs84_outline() -> None:
    """Each converted vertex lands within 0.2 m of the WGS-84 outline it was drawn from, although
    GCJ-02 puts it about 500 m away (the offset in Hangzhou)."""
    region = parse_region(XIAOSHAN_GCJ02, "campaign.region", CoordinateSystem.GCJ02)
    assert region is not None and region["type"] == "Polygon"
    converted = region["coordinates"][0]
    assert len(converted) == len(xiaoshan_wgs84())
    for (longitude, latitude), (expected_longitude, expected_latitude), (given_longitude, given_latitude) in zip(
        converted, xiaoshan_wgs84(), XIAOSHAN_GCJ02["coordinates"][0], strict=True
    ):
        assert distance_m(Point(latitude, longitude), Point(expected_latitude, expected_longitude)) < 0.2
        assert (
            400 < distance_m(Point(given_latitude, given_longitude), Point(expected_latitude, expected_longitude)) < 700
        )


def test_a_gcj02_phone_fix_is_judged_against_the_gcj02_district_on_the_right_side() -> None:
    """Region and phone both in GCJ-02, both converted: 145 m inside the western line is inside,
    190 m outside is outside. Taking the GCJ-02 outline as WGS-84 (the mistake the explicit
    system prevents) moves the line about 450 m east and puts the inside fix outside."""
    converted = Region(parse_region(XIAOSHAN_GCJ02, "campaign.region", CoordinateSystem.GCJ02))
    inside = to_wgs84(*INSIDE_WEST_LINE_GCJ02, CoordinateSystem.GCJ02)
    outside = to_wgs84(*OUTSIDE_WEST_LINE_GCJ02, CoordinateSystem.GCJ02)
    assert converted.covers(inside)
    assert not converted.covers(outside)
    taken_as_wgs84 = Region(parse_region(XIAOSHAN_GCJ02, "campaign.region", CoordinateSystem.WGS84))
    assert not taken_as_wgs84.covers(inside)


def test_the_published_gcj02_boundary_of_xiaoshan_holds_its_places_after_conversion() -> None:
    """The real district boundary, given in GCJ-02 as DataV publishes it: every converted vertex
    maps forward (the transform checked against eviltransform's vectors) back onto the
    published one within a millimetre, moved about 500 m; the district's centre and the airport
    are inside, Binjiang's government and West Lake outside, each given in GCJ-02 as a map
    reports it and converted like a phone's fix."""
    published = xiaoshan_330109_gcj02()
    region = parse_region(published, "campaign.region", CoordinateSystem.GCJ02)
    assert region is not None
    for (longitude, latitude), (given_longitude, given_latitude) in zip(
        region["coordinates"][0], published["coordinates"][0], strict=True
    ):
        image = Point(*wgs84_to_gcj02(latitude, longitude))
        assert distance_m(image, Point(given_latitude, given_longitude)) < 0.001
        assert 400 < distance_m(Point(latitude, longitude), Point(given_latitude, given_longitude)) < 700
    district = Region(region)
    for name, place in INSIDE_330109.items():
        assert district.covers(to_wgs84(*place, CoordinateSystem.GCJ02)), name
    for name, place in OUTSIDE_330109.items():
        assert not district.covers(to_wgs84(*place, CoordinateSystem.GCJ02)), name


def test_near_the_published_line_only_the_stated_system_puts_a_phone_on_the_right_side() -> None:
    """A phone about 190 m inside Xiaoshan's western line, reported in GCJ-02, is inside the
    converted boundary; one 200 m outside is outside; the boundary taken as WGS-84 (what the
    server did before the system was stated) puts the inside phone outside."""
    published = xiaoshan_330109_gcj02()
    district = Region(parse_region(published, "campaign.region", CoordinateSystem.GCJ02))
    inside = to_wgs84(*INSIDE_330109_WEST_LINE, CoordinateSystem.GCJ02)
    outside = to_wgs84(*OUTSIDE_330109_WEST_LINE, CoordinateSystem.GCJ02)
    assert district.covers(inside)
    assert not district.covers(outside)
    assert not Region(parse_region(published, "campaign.region", CoordinateSystem.WGS84)).covers(inside)


def test_wgs84_and_an_absent_system_keep_the_region_as_given() -> None:
    """WGS-84, stated or absent (the region's contract before the field), is not converted."""
    outline = {"type": "Polygon", "coordinates": [xiaoshan_wgs84()]}
    assert parse_region(outline, "campaign.region", CoordinateSystem.WGS84) == outline
    assert parse_region(outline, "campaign.region") == outline


def test_multipolygons_are_converted_part_by_part_and_altitudes_kept() -> None:
    """Every ring of every part is converted; a position's third number is carried through."""
    ring = [[*position, 12.5] for position in XIAOSHAN_GCJ02["coordinates"][0]]
    region = parse_region(
        {
            "type": "MultiPolygon",
            "coordinates": [[ring], [[[121.0, 29.0], [121.1, 29.0], [121.1, 29.1], [121.0, 29.0]]]],
        },
        "campaign.region",
        CoordinateSystem.GCJ02,
    )
    assert region is not None
    first, second = region["coordinates"]
    assert [position[2] for position in first[0]] == [12.5] * len(ring)
    assert distance_m(Point(first[0][0][1], first[0][0][0]), Point(30.225, 120.250)) < 0.2
    assert distance_m(Point(second[0][0][1], second[0][0][0]), Point(29.0, 121.0)) > 400


def campaign_record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": "c-xiaoshan",
        "starts_at": "2026-01-01T00:00:00+08:00",
        "ends_at": "2026-12-31T00:00:00+08:00",
        "region": copy.deepcopy(XIAOSHAN_GCJ02),
        "rules": [
            {
                "category": "general",
                "kind": "FIXED",
                "threshold_fen": 2000,
                "off_fen": 500,
                "per_person_limit": 1,
                "budget_fen": 10_000,
            }
        ],
    }
    record.update(changes)
    return record


def test_a_reference_record_states_its_region_system() -> None:
    """A campaign file may say region_coordinate_system: GCJ-02; without it the region is WGS-84."""
    gcj02 = parse_campaign(campaign_record(region_coordinate_system="GCJ-02"), "campaign")
    unstated = parse_campaign(campaign_record(), "campaign")
    assert gcj02.region is not None and unstated.region is not None
    assert gcj02.region["coordinates"][0][0] != unstated.region["coordinates"][0][0]
    assert unstated.region == XIAOSHAN_GCJ02


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"region_coordinate_system": "BD-09"}, "campaign.region_coordinate_system"),
        ({"region_coordinate_system": None}, "campaign.region_coordinate_system"),
        (
            {
                "region_coordinate_system": "GCJ-02",
                "region": {
                    "type": "Polygon",
                    "coordinates": [[[120.1, 30.1], [120.2, 30.2], [120.2, 30.1], [120.1, 30.2], [120.1, 30.1]]],
                },
            },
            "campaign.region",
        ),
        (
            {
                "region_coordinate_system": "GCJ-02",
                "region": {
                    "type": "Polygon",
                    "coordinates": [[[120.1, 30.1], [200.0, 30.1], [120.1, 30.2], [120.1, 30.1]]],
                },
            },
            "campaign.region",
        ),
    ],
    ids=["unknown system (Baidu's BD-09)", "system null", "self-intersecting GCJ-02 polygon", "longitude out of range"],
)
def test_bad_regions_and_systems_are_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ReferenceError) as raised:
        parse_campaign(campaign_record(**changes), "campaign")
    assert raised.value.field == field
