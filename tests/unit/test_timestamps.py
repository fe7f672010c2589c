"""A Timestamp outside google.protobuf.Timestamp's range in a request is INVALID_ARGUMENT naming
the field, never INTERNAL (protobuf's conversions raise ValueError on it; found by the fuzzer)."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client.v1 import campaign_pb2

from server.rpc.errors import ApiError
from server.services.campaigns import campaign_document
from server.services.common import TIMESTAMP_SECONDS_MAX, TIMESTAMP_SECONDS_MIN, checked_timestamp


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(TIMESTAMP_SECONDS_MAX + 1, 0), (TIMESTAMP_SECONDS_MIN - 1, 0), (2**63 - 1, 0), (0, -1), (0, 10**9)],
)
def test_a_timestamp_out_of_range_names_its_field(seconds: int, nanos: int) -> None:
    with pytest.raises(ApiError) as raised:
        checked_timestamp(Timestamp(seconds=seconds, nanos=nanos), "x.at")
    assert raised.value.metadata["field"] == "x.at"


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(TIMESTAMP_SECONDS_MAX, 999_999_999), (TIMESTAMP_SECONDS_MIN, 0), (0, 0)]
)
def test_the_range_limits_are_valid(seconds: int, nanos: int) -> None:
    assert checked_timestamp(Timestamp(seconds=seconds, nanos=nanos), "x").seconds == seconds


def test_a_campaign_window_out_of_range_is_invalid_argument() -> None:
    message = campaign_pb2.Campaign(campaign_id="c-x")
    message.starts_at.seconds = 10**15
    with pytest.raises(ApiError) as raised:
        campaign_document(message)
    assert raised.value.metadata["field"] == "campaign.starts_at"
