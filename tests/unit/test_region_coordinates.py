"""Campaign regions given in GCJ-02 (issue 13, item 10): server.domain.reference converts every
vertex to WGS-84 with geo.gcj02_to_wgs84, the conversion a claim's position goes through, and
refuses an unknown system or an invalid polygon naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.domain.geo import CoordinateSystem, Point, Region, distance_m, to_wgs84
from server.domain.reference import ReferenceError, parse_campaign, parse_region

ROOT = Path(__file__).resolve().parents[2]
XIAOSHAN_FILE = ROOT / "examples" / "merchants" / "xiaoshan-region.geojson.yaml"

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
