"""CampaignService takes a region in the system officials publish it in (issue 13, item 10):
Xiaoshan's real boundary as published in GCJ-02 (tests/fixtures/xiaoshan-330109-gcj02.geojson)
is converted to WGS-84 in the server, answered and enforced in WGS-84; an unstated system is
WGS-84; an unknown system or an invalid polygon is refused naming the field with nothing saved."""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import orjson
import pytest
from subsidy_client import QualificationClient, RetryPolicy
from subsidy_client.errors import InvalidArgument
from subsidy_client.v1 import campaign_pb2 as pb
from subsidy_client.v1 import qualification_pb2 as qpb
from subsidy_client.v1.common_pb2 import (
    COORDINATE_SYSTEM_GCJ02,
    COORDINATE_SYSTEM_UNSPECIFIED,
    COORDINATE_SYSTEM_WGS84,
    Location,
)

from server.domain.geo import Point, distance_m, wgs84_to_gcj02
from storage.devenv import Services
from tests.conftest import id_number
from tests.integration.test_campaigns import SERVICE, campaign_world, create, valid_campaign
from tests.unit.test_region_coordinates import (
    INSIDE_330109_WEST_LINE,
    OUTSIDE_330109_WEST_LINE,
    XIAOSHAN_GCJ02,
    xiaoshan_330109_gcj02,
)

# Two crossing edges: a polygon shapely finds invalid whatever the system.
BOW_TIE = orjson.dumps(
    {"type": "Polygon", "coordinates": [[[120.1, 30.1], [120.2, 30.2], [120.2, 30.1], [120.1, 30.2], [120.1, 30.1]]]}
).decode()


def xiaoshan_campaign(campaign_id: str, system: int, region: dict[str, Any] = XIAOSHAN_GCJ02) -> pb.Campaign:
    """A campaign that issues qualifications to phones in Xiaoshan, its region sent as given."""
    campaign = valid_campaign(campaign_id)
    campaign.region_geojson = orjson.dumps(region).decode()
    campaign.region_coordinate_system = system  # type: ignore[assignment]
    campaign.qualification_validity_s = 86_400
    return campaign


async def test_the_published_gcj02_district_is_converted_in_the_server_and_claims_judged_against_it(
    services: Services,
) -> None:
    """Created with Xiaoshan's real boundary as published in GCJ-02: GetCampaign answers it in
    WGS-84, saying so, each vertex the one whose GCJ-02 image is the published vertex (within a
    millimetre); a phone about 190 m inside the western line, reported in GCJ-02 as a map SDK
    does, is issued a qualification, one 200 m outside declined. The same boundary sent with
    the system unset (read as WGS-84) puts the line about 450 m east and declines the inside
    phone: the stated system decides, which is why it is stated."""
    published = xiaoshan_330109_gcj02()
    async with campaign_world(services) as (env, operator, terminal):
        await create(operator, xiaoshan_campaign("c-xiaoshan-gcj02", COORDINATE_SYSTEM_GCJ02, published))
        await create(operator, xiaoshan_campaign("c-xiaoshan-as-wgs84", COORDINATE_SYSTEM_UNSPECIFIED, published))
        read = await operator._call(
            SERVICE + "GetCampaign", pb.GetCampaignRequest(campaign_id="c-xiaoshan-gcj02"), pb.GetCampaignResponse
        )
        assert read.campaign.region_coordinate_system == COORDINATE_SYSTEM_WGS84
        ring = orjson.loads(read.campaign.region_geojson)["coordinates"][0]
        for (longitude, latitude), (given_longitude, given_latitude) in zip(
            ring, published["coordinates"][0], strict=True
        ):
            image = Point(*wgs84_to_gcj02(latitude, longitude))
            assert distance_m(image, Point(given_latitude, given_longitude)) < 0.001

        async with QualificationClient(
            terminal.target, "p-wallet-01", env.credentials["p-wallet-01"], retry=RetryPolicy(max_attempts=1)
        ) as wallet:

            async def claim(campaign_id: str, fix: tuple[float, float]) -> qpb.ClaimQualificationResponse:
                return await wallet.claim(
                    campaign_id=campaign_id,
                    category="fridge",
                    id_number=id_number(),
                    location=Location(
                        latitude=fix[0], longitude=fix[1], coordinate_system=COORDINATE_SYSTEM_GCJ02, accuracy_m=10.0
                    ),
                    fix_time_ms=int(time.time() * 1000),
                )

            inside = await claim("c-xiaoshan-gcj02", INSIDE_330109_WEST_LINE)
            assert inside.decision == qpb.CLAIM_DECISION_ISSUED, inside
            outside = await claim("c-xiaoshan-gcj02", OUTSIDE_330109_WEST_LINE)
            assert outside.decline_reason == qpb.CLAIM_DECLINE_REASON_LOCATION_OUTSIDE_REGION, outside
            misread = await claim("c-xiaoshan-as-wgs84", INSIDE_330109_WEST_LINE)
            assert misread.decline_reason == qpb.CLAIM_DECLINE_REASON_LOCATION_OUTSIDE_REGION, misread


async def test_an_unstated_system_keeps_the_region_as_sent(services: Services) -> None:
    """COORDINATE_SYSTEM_UNSPECIFIED (clients written before the field) and WGS84 store the
    outline unchanged, the region's contract before GCJ-02 was accepted."""
    async with campaign_world(services) as (_env, operator, _terminal):
        for system, campaign_id in (
            (COORDINATE_SYSTEM_UNSPECIFIED, "c-unstated"),
            (COORDINATE_SYSTEM_WGS84, "c-wgs84"),
        ):
            created = await create(operator, xiaoshan_campaign(campaign_id, system))
            assert orjson.loads(created.campaign.region_geojson) == XIAOSHAN_GCJ02
            assert created.campaign.region_coordinate_system == COORDINATE_SYSTEM_WGS84
        without_region = await create(operator, valid_campaign("c-no-region"))
        assert without_region.campaign.region_coordinate_system == COORDINATE_SYSTEM_UNSPECIFIED


@pytest.mark.parametrize(
    ("system", "region", "field"),
    [
        (7, orjson.dumps(XIAOSHAN_GCJ02).decode(), "campaign.region_coordinate_system"),
        (
            COORDINATE_SYSTEM_GCJ02,
            BOW_TIE,
            "campaign.region",
        ),
        (COORDINATE_SYSTEM_GCJ02, '{"type": "Polygon", "coordinates": [[[120.1, 30.1]]]}', "campaign.region"),
        (COORDINATE_SYSTEM_GCJ02, "not json", "campaign.region"),
    ],
    ids=["unknown system", "self-intersecting (a bow tie)", "a single point", "not GeoJSON"],
)
async def test_bad_regions_and_systems_are_refused_naming_the_field(
    services: Services, system: int, region: str, field: str
) -> None:
    """INVALID_ARGUMENT with ErrorInfo metadata.field naming the culprit; nothing recorded."""
    async with campaign_world(services) as (env, operator, _terminal):
        campaign = xiaoshan_campaign("c-bad-region", COORDINATE_SYSTEM_GCJ02)
        campaign.region_geojson = region
        campaign.region_coordinate_system = system  # type: ignore[assignment]
        with pytest.raises(InvalidArgument) as raised:
            await create(operator, campaign, request_id=str(uuid.uuid4()))
        assert raised.value.metadata["field"] == field
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            assert await connection.fetchval("SELECT count(*) FROM operator_actions") == 0
            assert await connection.fetchval("SELECT count(*) FROM campaigns WHERE campaign_id = 'c-bad-region'") == 0
        finally:
            await connection.close()
