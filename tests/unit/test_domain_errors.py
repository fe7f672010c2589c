"""The domain's InvalidField reaches the caller exactly as a servicer's own INVALID_ARGUMENT
would (server/rpc/errors.py): the same code, reason, message and metadata."""

from __future__ import annotations

import grpc
import pytest
from redis import exceptions as redis_errors
from subsidy_client.v1 import common_pb2

from server.domain import validation
from server.domain.errors import InvalidField, TooManyLines
from server.rpc.errors import classify, invalid_field


def test_an_invalid_field_is_invalid_argument_naming_the_field() -> None:
    error = classify(InvalidField("lines[0].gtin", "must be a GTIN-13 with a valid check digit"))
    expected = invalid_field("lines[0].gtin", "must be a GTIN-13 with a valid check digit")
    assert (error.code, error.reason, error.message, error.metadata) == (
        expected.code,
        expected.reason,
        expected.message,
        expected.metadata,
    )
    assert error.metadata == {"field": "lines[0].gtin"}
    assert error.message == "lines[0].gtin: must be a GTIN-13 with a valid check digit"


def test_too_many_lines_keeps_its_own_reason_and_the_maximum() -> None:
    error = classify(TooManyLines("lines", 50))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == common_pb2.ERROR_REASON_TOO_MANY_LINES
    assert error.message == "lines: at most 50 lines per request"
    assert error.metadata == {"field": "lines", "max": "50"}


def test_the_pure_checks_name_the_field_path() -> None:
    lines = [validation.Line("1", "6970000000017", 100, "SN1"), validation.Line("2", "6970000000017", 100, "sn1")]
    try:
        validation.canonical_lines(lines, 10)
    except InvalidField as error:
        assert (error.field, error.reason) == (
            "lines[1].serial_number",
            "the same device appears twice in this request",
        )
    else:
        raise AssertionError("a repeated device was accepted")
    assert validation.canonical_line_ids([" a ", "B"], 10) == ["a", "B"]


@pytest.mark.parametrize(
    "exception",
    [
        redis_errors.ConnectionError("gone"),
        redis_errors.TimeoutError("slow"),
        redis_errors.ClusterDownError("The cluster is down"),
        redis_errors.MasterDownError("Link with MASTER is down"),
        redis_errors.SlotNotCoveredError("no node for slot 42"),
        redis_errors.TryAgainError("keys split by a migration"),
    ],
    ids=type,
)
def test_redis_and_cluster_outages_are_unavailable_never_internal(exception: Exception) -> None:
    """On a cluster a slot without a primary (a failover under way, a lost slot) is an outage
    like a dead connection: UNAVAILABLE with the retry advice (it was INTERNAL with an incident
    for CLUSTERDOWN, a slot missing from the client's map and TRYAGAIN)."""
    error = classify(exception)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == common_pb2.ERROR_REASON_DEPENDENCY_UNAVAILABLE
    assert "retry with the same request_id" in error.message
