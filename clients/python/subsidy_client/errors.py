"""Exceptions raised by the client, one class per machine-readable reason.

Every non-OK status from the gateway carries a google.rpc.Status with one ErrorInfo; the
client reads it and raises the matching subclass of ``SubsidyError``. A business decline is
never an exception: it is an ``AuthorizeResponse`` with ``decision == DECISION_DECLINED``.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class SubsidyError(Exception):
    """A call failed. ``reason`` is the ErrorInfo reason (e.g. INVALID_FIELD), ``metadata`` its
    details (e.g. {"field": "lines[0].gtin"})."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str]) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = metadata


class InvalidArgument(SubsidyError):
    """The request is malformed; ``metadata['field']`` names the field. Do not retry."""


class Unauthenticated(SubsidyError):
    """Credentials are missing, wrong or stale (check the terminal's clock and secret)."""


class PermissionDenied(SubsidyError):
    """Authenticated but not allowed."""


class IdempotencyConflict(SubsidyError):
    """The request_id was already used with a different payload. Use a new request_id."""


class NotFound(SubsidyError):
    """No such authorization for this terminal's merchant."""


class InvalidState(SubsidyError):
    """The authorization's state does not allow the call; ``metadata['state']`` says which."""


class Unavailable(SubsidyError):
    """The gateway or a dependency did not answer; retried automatically with the same request_id."""


class DeadlineExceeded(SubsidyError):
    """The deadline passed; the call may or may not have acted. Retry with the same request_id."""


class InternalError(SubsidyError):
    """A server bug; ``metadata['incident']`` identifies it in the server log."""


BY_CODE: dict[grpc.StatusCode, type[SubsidyError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.ALREADY_EXISTS: IdempotencyConflict,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidState,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: InternalError,
}


def from_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> SubsidyError:
    code = error.code()
    reason, metadata = code.name, {}
    status = rpc_status.from_call(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
    return BY_CODE.get(code, SubsidyError)(code, reason, error.details() or "", metadata)
