"""CampaignService takes a region in the system officials publish it in (issue 13, item 10):
a GCJ-02 district outline is converted to WGS-84 in the server, answered and enforced in
WGS-84; an unstated system is WGS-84; an unknown system or an invalid polygon is refused
naming the field with nothing saved."""

from __future__ import annotations

import time
import uuid

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

from server.domain.geo import Point, distance_m
from storage.devenv import Services
from tests.conftest import id_number
from tests.integration.test_campaigns import SERVICE, campaign_world, create, valid_campaign
from tests.unit.test_region_coordinates import (
    INSIDE_WEST_LINE_GCJ02,
    OUTSIDE_WEST_LINE_GCJ02,
    XIAOSHAN_GCJ02,
    xiaoshan_wgs84,
)

# Two crossing edges: a polygon shapely finds invalid whatever the system.
BOW_TIE = orjson.dumps(
    {"type": "Polygon", "coordinates": [[[120.1, 30.1], [120.2, 30.2], [120.2, 30.1], [120.1, 30.2], [120.1, 30.1]]]}
).decode()


def xiaoshan_campaign(campaign_id: str, system: int) -> pb.Campaign:
    """A campaign that issues qualifications to phones in Xiaoshan, the outline in GCJ-02."""
    campaign = valid_campaign(campaign_id)
    campaign.region_geojson = orjson.dumps(XIAOSHAN_GCJ02).decode()
    campaign.region_coordinate_system = system  # type: ignore[assignment]
    campaign.qualification_validity_s = 86_400
    return campaign


async def test_a_gcj02_district_is_converted_in_the_server_and_claims_judged_against_it(services: Services) -> None:
    """Created with the GCJ-02 outline: GetCampaign answers the WGS-84 outline (within 0.2 m of
    the file it was drawn from) saying WGS84; a phone 145 m inside the western line, reported in
    GCJ-02 as the map SDK does, is issued, one 190 m outside declined. The same numbers stated as
    WGS-84 put the line about 450 m east, and the inside phone is declined: the stated system
    decides, which is why it is stated."""
    async with campaign_world(services) as (env, operator, terminal):
        await create(operator, xiaoshan_campaign("c-xiaoshan-gcj02", COORDINATE_SYSTEM_GCJ02))
        await create(operator, xiaoshan_campaign("c-xiaoshan-as-wgs84", COORDINATE_SYSTEM_UNSPECIFIED))
        read = await operator._call(
            SERVICE + "GetCampaign", pb.GetCampaignRequest(campaign_id="c-xiaoshan-gcj02"), pb.GetCampaignResponse
        )
        assert read.campaign.region_coordinate_system == COORDINATE_SYSTEM_WGS84
        ring = orjson.loads(read.campaign.region_geojson)["coordinates"][0]
        for (longitude, latitude), (expected_longitude, expected_latitude) in zip(ring, xiaoshan_wgs84(), strict=True):
            assert distance_m(Point(latitude, longitude), Point(expected_latitude, expected_longitude)) < 0.2

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

            inside = await claim("c-xiaoshan-gcj02", INSIDE_WEST_LINE_GCJ02)
            assert inside.decision == qpb.CLAIM_DECISION_ISSUED, inside
            outside = await claim("c-xiaoshan-gcj02", OUTSIDE_WEST_LINE_GCJ02)
            assert outside.decline_reason == qpb.CLAIM_DECLINE_REASON_LOCATION_OUTSIDE_REGION, outside
            misread = await claim("c-xiaoshan-as-wgs84", INSIDE_WEST_LINE_GCJ02)
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
