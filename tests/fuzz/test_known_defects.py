"""Defects the fuzzer (tests/fuzz/engine.py) found: one minimal regression test each. While a
defect is not fixed its test is a strict xfail and its inputs are listed in
engine.KNOWN_DEFECTS (left out of the draws); when the fix lands the mark and the entry go, so
the fuzzer draws those inputs again. Fixed so far: a claim's out-of-range fix_time (was
INTERNAL, now INVALID_ARGUMENT naming device_location.fix_time)."""

from __future__ import annotations

import time
import uuid

import pytest
from subsidy_client import QualificationClient, RetryPolicy
from subsidy_client.errors import InvalidArgument
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from tests.conftest import Environment, id_number

INT64_MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(INT64_MAX, 0), (-INT64_MAX - 1, 0), (253_402_300_800, 0), (0, -1), (int(time.time()), 10**9)],
    ids=["int64-max", "int64-min", "year-10000", "negative-nanos", "nanos-one-second"],
)
async def test_claim_with_a_fix_time_outside_the_timestamp_range_is_invalid_argument(
    environment: Environment, gateway: object, seconds: int, nanos: int
) -> None:
    """A claim otherwise valid (a partner app, a real ID number, inside Xiaoshan) whose
    device_location.fix_time is no valid google.protobuf.Timestamp."""
    request = qpb.ClaimQualificationRequest(
        request_id=str(uuid.uuid4()),
        campaign_id="c-qual",
        category="general",
        consumer=qpb.ConsumerIdentity(id_number=id_number()),
    )
    request.device_location.location.CopyFrom(
        common_pb2.Location(
            latitude=30.18, longitude=120.26, coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84, accuracy_m=20
        )
    )
    request.device_location.fix_time.seconds = seconds
    request.device_location.fix_time.nanos = nanos
    port = gateway.port  # type: ignore[attr-defined]
    async with QualificationClient(
        f"127.0.0.1:{port}",
        "p-wallet-01",
        environment.credentials["p-wallet-01"],
        retry=RetryPolicy(max_attempts=1),
    ) as wallet:
        with pytest.raises(InvalidArgument) as raised:
            await wallet.send_claim(request)
    assert raised.value.metadata["field"] == "device_location.fix_time"
