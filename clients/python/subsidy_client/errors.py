"""Exceptions raised by the client, one class per machine-readable reason.

Every non-OK status from the gateway carries a google.rpc.Status with one ErrorInfo, whose
``reason`` is an ``ErrorReason`` name (protos/subsidy/v1/common.proto) without its prefix; the
client raises the class of that reason (``BY_REASON``), not of the status code, so an object
that already exists is ``AlreadyExists`` and not an idempotency conflict, and a store outside
every region is ``StoreOutsideRegion`` and not a lifecycle state. A status without an ErrorInfo
(the connection failed, the local deadline passed) or with a reason this version does not know
gets the class of its code (``BY_CODE``).

The classes form a tree whose inner nodes are the names earlier versions raised, so code that
catches them keeps working::

    SubsidyError
    ├── InvalidArgument ── InvalidField, TooManyLines
    ├── Unauthenticated
    ├── PermissionDenied
    ├── AlreadyExists ── IdempotencyConflict
    ├── NotFound ── AuthorizationNotFound
    ├── FailedPrecondition ── InvalidState ── LineAlreadyRefunded
    │                      └─ StoreOutsideRegion
    ├── Unavailable ── DependencyUnavailable
    ├── DeadlineExceeded
    └── InternalError

An invalid field also comes with the standard ``google.rpc.BadRequest``: its field violations
are ``field_violations`` (``(field, description)`` pairs). A business decline is never an
exception: it is an ``AuthorizeResponse`` with ``decision == DECISION_DECLINED``.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class SubsidyError(Exception):
    """A call failed. ``reason`` is the ErrorInfo reason (e.g. INVALID_FIELD), ``metadata`` its
    details (e.g. {"field": "lines[0].gtin"}), ``field_violations`` the BadRequest's
    ``(field, description)`` pairs (invalid fields only)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: dict[str, str],
        field_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = metadata
        self.field_violations = tuple(field_violations)


# --- One base per status code (the classes earlier versions raised) ---------------------------


class InvalidArgument(SubsidyError):
    """The request is malformed; ``metadata['field']`` names the field. Do not retry."""


class Unauthenticated(SubsidyError):
    """Credentials are missing, wrong or stale (check the terminal's clock and secret)."""


class PermissionDenied(SubsidyError):
    """Authenticated but not allowed (a suspended terminal or merchant, another role's method)."""


class AlreadyExists(SubsidyError):
    """An object with this id exists already; ``metadata['kind']`` and ``['id']`` name it."""


class NotFound(SubsidyError):
    """No such object: ``metadata['kind']`` and ``['id']`` name it (``AuthorizationNotFound``:
    no such authorization for this terminal's merchant)."""


class FailedPrecondition(SubsidyError):
    """The system is not in a state that allows the call."""


class Unavailable(SubsidyError):
    """The gateway or a dependency did not answer; retried automatically with the same request_id."""


class ResourceExhausted(SubsidyError):
    """The caller reached a limit or did not keep up; retry later (not at once)."""


class DeadlineExceeded(SubsidyError):
    """The deadline passed; the call may or may not have acted. Retry with the same request_id."""


class InternalError(SubsidyError):
    """A server bug; ``metadata['incident']`` identifies it in the server log."""


# --- One class per ErrorReason --------------------------------------------------------------------


class InvalidField(InvalidArgument):
    """A field is missing, malformed or out of range: ``field`` names it."""

    @property
    def field(self) -> str:
        return self.metadata.get("field", "")


class TooManyLines(InvalidArgument):
    """More lines than the gateway accepts (``metadata['max']``)."""


class IdempotencyConflict(AlreadyExists):
    """The request_id was already used with a different payload (or method). Use a new request_id."""


class AuthorizationNotFound(NotFound):
    """No such authorization for this terminal's merchant."""


class InvalidState(FailedPrecondition):
    """The object's state does not allow the call; ``metadata['state']`` says which."""


class LineAlreadyRefunded(InvalidState):
    """A refund names a line that was already refunded."""


class StoreOutsideRegion(FailedPrecondition):
    """A physical store's location lies outside every campaign's region (``metadata['field']``)."""


class DependencyUnavailable(Unavailable):
    """A dependency of the gateway (Redis, a key it is not given) did not answer or is missing."""


class RateLimited(ResourceExhausted):
    """The caller reached a limit on how often it may do this (``metadata['limit']`` names it);
    retry after it resets."""


class SlowConsumer(ResourceExhausted):
    """A stream (WatchFunds) was dropped because it was not read fast enough; open it again."""


class ChannelReferenceConflict(FailedPrecondition):
    """A Capture names an authorization already captured under another payment-channel
    reference: one authorization is one channel payment."""


class MerchantSuspended(FailedPrecondition):
    """The merchant is blocked: its pending holds are kept but cannot be captured until the
    block is lifted."""


BY_REASON: dict[str, type[SubsidyError]] = {
    "INVALID_FIELD": InvalidField,
    "TOO_MANY_LINES": TooManyLines,
    "IDEMPOTENCY_CONFLICT": IdempotencyConflict,
    "UNAUTHENTICATED": Unauthenticated,
    "AUTHORIZATION_NOT_FOUND": AuthorizationNotFound,
    "INVALID_STATE": InvalidState,
    "LINE_ALREADY_REFUNDED": LineAlreadyRefunded,
    "DEPENDENCY_UNAVAILABLE": DependencyUnavailable,
    "INTERNAL": InternalError,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "PERMISSION_DENIED": PermissionDenied,
    "NOT_FOUND": NotFound,
    "ALREADY_EXISTS": AlreadyExists,
    "STORE_OUTSIDE_REGION": StoreOutsideRegion,
    "RATE_LIMITED": RateLimited,
    "SLOW_CONSUMER": SlowConsumer,
    "CHANNEL_REFERENCE_CONFLICT": ChannelReferenceConflict,
    "MERCHANT_SUSPENDED": MerchantSuspended,
}

BY_CODE: dict[grpc.StatusCode, type[SubsidyError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.INTERNAL: InternalError,
}

# Status codes the client retries (with the same request_id): the call may not have arrived.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def error_class(code: grpc.StatusCode, reason: str) -> type[SubsidyError]:
    """The class for a reason; for an unknown or absent one, the class of the status code."""
    return BY_REASON.get(reason) or BY_CODE.get(code, SubsidyError)


def from_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> SubsidyError:
    code = error.code()
    reason, metadata, violations = "", {}, []
    status = rpc_status.from_call(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations += [(item.field, item.description) for item in bad_request.field_violations]
    kind = error_class(code, reason)
    return kind(code, reason or code.name, error.details() or "", metadata, violations)
