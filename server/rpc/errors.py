"""Errors as google.rpc.Status with exactly one ErrorInfo (and, for an invalid field, a
google.rpc.BadRequest), and how every failure of a handler maps to one (the guard around each
handler, server/rpc/handlers.py, answers with ``to_status(classify(exception))``).

Three causes, three treatments: the caller's bad input (``ApiError`` with a precise code and
reason, or the domain's ``InvalidField`` from a pure check, answered INVALID_ARGUMENT naming
the field), a dependency failing (Redis timeouts become UNAVAILABLE so the caller retries with
the same request_id), and a bug (INTERNAL; the traceback goes to the server log under an
incident id, never to the caller).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import Counter
from subsidy_client.v1 import common_pb2

from server.domain.errors import (
    AlreadyExists,
    IdempotencyConflict,
    InvalidField,
    NotFound,
    NotSupportedHere,
    TooManyLines,
)
from storage.redis.store import UNAVAILABLE

DOMAIN = "subsidy.gateway"
log = logging.getLogger("subsidy.errors")


class ApiError(Exception):
    """A failure the caller should see: a status code and an ErrorReason with metadata."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: int,
        message: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})

    @property
    def reason_name(self) -> str:
        name: str = common_pb2.ErrorReason.Name(self.reason)  # type: ignore[arg-type]
        return name.removeprefix("ERROR_REASON_")


def invalid_field(field: str, message: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        common_pb2.ERROR_REASON_INVALID_FIELD,
        f"{field}: {message}",
        {"field": field},
    )


def to_status(error: ApiError) -> Any:
    """Exactly one ErrorInfo; an invalid field (INVALID_ARGUMENT naming ``metadata.field``) also
    the standard google.rpc.BadRequest with one FieldViolation, for generic gRPC tooling."""
    info = error_details_pb2.ErrorInfo(reason=error.reason_name, domain=DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    field = error.metadata.get("field")
    if field and error.code == grpc.StatusCode.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=field, description=error.message.removeprefix(f"{field}: ")
        )
        bad_request = any_pb2.Any()
        bad_request.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        details.append(bad_request)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


def classify(exception: BaseException) -> ApiError:
    """Maps an exception raised by a handler to what the caller is told."""
    if isinstance(exception, ApiError):
        return exception
    if isinstance(exception, TooManyLines):
        return ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            common_pb2.ERROR_REASON_TOO_MANY_LINES,
            str(exception),
            {"field": exception.field, "max": str(exception.maximum)},
        )
    if isinstance(exception, InvalidField):
        return invalid_field(exception.field, exception.reason)
    if isinstance(exception, NotSupportedHere):
        return ApiError(
            grpc.StatusCode.UNIMPLEMENTED,
            common_pb2.ERROR_REASON_INVALID_FIELD,
            str(exception),
            {"field": exception.field},
        )
    if isinstance(exception, NotFound):
        return ApiError(
            grpc.StatusCode.NOT_FOUND,
            common_pb2.ERROR_REASON_NOT_FOUND,
            str(exception),
            {"kind": exception.kind, "id": exception.identifier},
        )
    if isinstance(exception, AlreadyExists):
        return ApiError(
            grpc.StatusCode.ALREADY_EXISTS,
            common_pb2.ERROR_REASON_ALREADY_EXISTS,
            str(exception),
            {"kind": exception.kind, "id": exception.identifier},
        )
    if isinstance(exception, IdempotencyConflict):
        return ApiError(grpc.StatusCode.ALREADY_EXISTS, common_pb2.ERROR_REASON_IDEMPOTENCY_CONFLICT, str(exception))
    if isinstance(exception, (*UNAVAILABLE, TimeoutError)):
        return ApiError(
            grpc.StatusCode.UNAVAILABLE,
            common_pb2.ERROR_REASON_DEPENDENCY_UNAVAILABLE,
            "a dependency did not answer; retry with the same request_id",
        )
    incident = uuid.uuid4().hex
    log.error("internal error", extra={"incident": incident}, exc_info=exception)
    return ApiError(
        grpc.StatusCode.INTERNAL,
        common_pb2.ERROR_REASON_INTERNAL,
        f"internal error; incident {incident}",
        {"incident": incident},
    )


REJECTED_CALLS = Counter(
    "subsidy_rejected_calls",
    "Calls answered with an error status, by method, status code and reason (every one is counted)",
    ["method", "code", "reason"],
)


class RejectionLog:
    """Logs rejected calls without letting a caller fill the disk: the first rejection of each
    (method, code, reason) in a window is logged, the rest of that window are only counted and
    reported as ``suppressed`` on the next line logged for the same kind. The metric above
    counts every one."""

    def __init__(self, window_s: float = 10.0, kinds_max: int = 1000) -> None:
        self._window_s = window_s
        self._kinds_max = kinds_max
        self._windows: dict[tuple[str, str, str], tuple[float, int]] = {}

    def rejected(self, method: str, code: str, reason: str) -> None:
        REJECTED_CALLS.labels(method, code, reason).inc()
        if code == "NOT_FOUND" and method.rpartition("/")[2].startswith("Get"):
            # A lookup that finds nothing is an answer, not a failure: subsidyctl's `campaign
            # apply` and `merchant onboard` ask whether an object exists before creating it.
            log.debug("nothing found", extra={"method": method, "reason": reason})
            return
        kind = (method, code, reason)
        now = time.monotonic()
        started, suppressed = self._windows.get(kind, (-self._window_s, 0))
        if now - started < self._window_s:
            self._windows[kind] = (started, suppressed + 1)
            return
        if len(self._windows) >= self._kinds_max and kind not in self._windows:
            self._windows.clear()
        self._windows[kind] = (now, 0)
        log.info("call failed", extra={"method": method, "code": code, "reason": reason, "suppressed": suppressed})


class CallSpans(Protocol):
    """Tracing of calls, when SUBSIDY_TRACING is on (server/processes/tracing.py builds one; the
    call guard (server/rpc/handlers.py) gets None otherwise and makes no tracing call): ``start`` as the handler is
    entered, ``end`` with the status code name, the ErrorInfo reason (empty when OK) and the
    response once the call is answered."""

    def start(self, method: str, context: grpc.aio.ServicerContext) -> Any: ...

    def end(self, span: Any, code: str, reason: str, response: Any) -> None: ...
