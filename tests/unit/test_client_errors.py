"""The Python client raises the class of the ErrorInfo's reason, not of the status code
(subsidy_client/errors.py), and an invalid field carries the standard google.rpc.BadRequest
(server/rpc/errors.py): the server's status read back by the client, without a network."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from subsidy_client import errors
from subsidy_client.v1 import common_pb2

from server.domain.errors import AlreadyExists, IdempotencyConflict, InvalidField, NotFound, TooManyLines
from server.rpc.errors import ApiError, classify, to_status


class FailedCall(grpc.RpcError):
    """What grpc raises for a failed call, built from the status the server sends."""

    def __init__(self, status: Any) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self._status.code
        return code

    def details(self) -> str:
        details: str = self._status.details
        return details

    def trailing_metadata(self) -> Any:
        return self._status.trailing_metadata


def received(error: ApiError) -> errors.SubsidyError:
    return errors.from_rpc_error(FailedCall(to_status(error)))


def test_every_error_reason_of_the_contract_has_its_class() -> None:
    names = {name.removeprefix("ERROR_REASON_") for name in common_pb2.ErrorReason.keys()} - {"UNSPECIFIED"}
    assert names == set(errors.BY_REASON)


@pytest.mark.parametrize(
    ("reason", "base"),
    [
        ("INVALID_FIELD", errors.InvalidArgument),
        ("TOO_MANY_LINES", errors.InvalidArgument),
        ("IDEMPOTENCY_CONFLICT", errors.AlreadyExists),
        ("AUTHORIZATION_NOT_FOUND", errors.NotFound),
        ("INVALID_STATE", errors.FailedPrecondition),
        ("LINE_ALREADY_REFUNDED", errors.InvalidState),
        ("STORE_OUTSIDE_REGION", errors.FailedPrecondition),
        ("DEPENDENCY_UNAVAILABLE", errors.Unavailable),
    ],
)
def test_earlier_class_names_stay_bases(reason: str, base: type[errors.SubsidyError]) -> None:
    """Code that catches the classes earlier versions raised keeps catching these."""
    assert issubclass(errors.BY_REASON[reason], base)


def test_the_class_follows_the_reason_not_the_code() -> None:
    exists = received(classify(AlreadyExists("merchant", "m-1")))
    assert type(exists) is errors.AlreadyExists and not isinstance(exists, errors.IdempotencyConflict)
    conflict = received(classify(IdempotencyConflict()))
    assert type(conflict) is errors.IdempotencyConflict and conflict.reason == "IDEMPOTENCY_CONFLICT"
    outside = received(
        ApiError(
            grpc.StatusCode.FAILED_PRECONDITION,
            common_pb2.ERROR_REASON_STORE_OUTSIDE_REGION,
            "store.location: outside the region of every campaign",
            {"field": "store.location"},
        )
    )
    assert type(outside) is errors.StoreOutsideRegion and not isinstance(outside, errors.InvalidState)
    missing = received(classify(NotFound("campaign", "c-1")))
    assert type(missing) is errors.NotFound and missing.metadata == {"kind": "campaign", "id": "c-1"}


def test_a_status_without_a_known_reason_gets_the_class_of_its_code() -> None:
    assert errors.error_class(grpc.StatusCode.ALREADY_EXISTS, "") is errors.AlreadyExists
    assert errors.error_class(grpc.StatusCode.FAILED_PRECONDITION, "A_REASON_FROM_THE_FUTURE") is (
        errors.FailedPrecondition
    )
    assert errors.error_class(grpc.StatusCode.UNAVAILABLE, "") is errors.Unavailable
    assert errors.error_class(grpc.StatusCode.DATA_LOSS, "") is errors.SubsidyError


def test_an_invalid_field_carries_one_error_info_and_a_bad_request() -> None:
    status = to_status(classify(InvalidField("lines[0].gtin", "must be a GTIN-13 with a valid check digit")))
    error = errors.from_rpc_error(FailedCall(status))
    assert type(error) is errors.InvalidField and error.field == "lines[0].gtin"
    assert error.field_violations == (("lines[0].gtin", "must be a GTIN-13 with a valid check digit"),)
    too_many = received(classify(TooManyLines("lines", 20)))
    assert type(too_many) is errors.TooManyLines and [field for field, _ in too_many.field_violations] == ["lines"]


def test_other_errors_carry_no_bad_request() -> None:
    assert received(classify(NotFound("campaign", "c-1"))).field_violations == ()
    assert received(classify(IdempotencyConflict())).field_violations == ()
