"""RiskCaseService: the risk team's cases over the gateway (issue 14, section 2).

Reading (list, get) for operators and the bureau's government users; assigning, moving and
clawing back for operators, each recorded in the operator audit trail under the request's id (a
retry acts once). The cases and their audit are storage's (storage/postgres/risk_cases.py), the
states the domain's (server/domain/risk_detection.py).

A claw-back (README "Claw-back") moves money, so it goes through the money path like a refund:
one Redis script (clawback.lua, RedisStore.claw_back), idempotent on the operator and request
id, whose CLAWED_BACK ledger event the writer posts into the hash-chained ledger. PostgreSQL is
checked first (the case is CONFIRMED) and written last (the audit row, once per request id):
a refusal anywhere writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import grpc
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client.v1 import common_pb2, risk_pb2, risk_pb2_grpc

from server.domain import validation
from server.domain.errors import IdempotencyConflict, InvalidField
from server.domain.reference import IDENTIFIER
from server.domain.risk_detection import (
    CONFIRMED,
    DETECTORS,
    DISMISSED,
    NEW,
    REVIEWING,
    InvalidCaseTransition,
)
from server.rpc.auth import GOVERNMENT, OPERATOR, caller, caller_in
from server.rpc.errors import ApiError, invalid_field
from server.services.common import payload_hash, raise_script_error
from server.services.operations import OperatorDeps
from storage.postgres import risk_cases
from storage.postgres.risk_cases import ClawBack, RiskCase
from storage.redis.complaints import authorization_owner
from storage.redis.contract import Failure

READERS = (OPERATOR, GOVERNMENT)
STATE_TO_PROTO = {
    NEW: risk_pb2.RISK_CASE_STATE_NEW,
    REVIEWING: risk_pb2.RISK_CASE_STATE_REVIEWING,
    CONFIRMED: risk_pb2.RISK_CASE_STATE_CONFIRMED,
    DISMISSED: risk_pb2.RISK_CASE_STATE_DISMISSED,
}
PROTO_TO_STATE: dict[int, str] = {int(value): key for key, value in STATE_TO_PROTO.items()}
NOTE_CHARACTERS_MAX = 2_000
# An authorization has at most SUBSIDY_MAX_LINES lines, itself at most 100.
CLAW_BACK_LINES_MAX = 100


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def case_message(case: RiskCase, with_evidence: bool, clawbacks: Sequence[ClawBack] = ()) -> risk_pb2.RiskCase:
    message = risk_pb2.RiskCase(
        case_id=case.case_id,
        detector=case.detector,
        subject_kind=case.subject_kind,
        subject_id=case.subject_id,
        window_start=_stamp(case.window_start),
        window_end=_stamp(case.window_end),
        score=case.score,
        state=STATE_TO_PROTO[case.state],
        assignee=case.assignee,
        note=case.note,
        detected_by=case.detected_by,
        created_at=_stamp(case.created_at),
        updated_at=_stamp(case.updated_at),
    )
    if with_evidence:
        evidence = Struct()
        evidence.update(case.evidence)
        message.evidence.CopyFrom(evidence)
    for clawed in clawbacks:
        message.clawbacks.append(
            risk_pb2.RiskCaseClawBack(
                authorization_id=clawed.authorization_id,
                merchant_id=clawed.merchant_id,
                line_ids=clawed.line_ids,
                clawed_back_fen=clawed.clawed_back_fen,
                operator_id=clawed.operator_id,
                clawed_back_at=_stamp(clawed.clawed_back_at),
            )
        )
    return message


def invalid_state(error: InvalidCaseTransition) -> ApiError:
    return ApiError(
        grpc.StatusCode.FAILED_PRECONDITION,
        common_pb2.ERROR_REASON_INVALID_STATE,
        str(error),
        {"state": "RISK_CASE_STATE_" + error.state, "to_state": "RISK_CASE_STATE_" + error.to_state},
    )


def _case_id(value: int) -> int:
    if value <= 0:
        raise InvalidField("case_id", "must be a positive case id")
    return value


def _assignee(value: str) -> str:
    if not IDENTIFIER.fullmatch(value):
        raise InvalidField("assignee", "must be an operator id (1-64 of A-Z a-z 0-9 _ . -)")
    return value


class RiskCaseService(risk_pb2_grpc.RiskCaseServiceServicer):
    def __init__(self, deps: OperatorDeps) -> None:
        self._pool = deps.pool
        self._store = deps.store

    async def ListRiskCases(
        self, request: risk_pb2.ListRiskCasesRequest, context: grpc.aio.ServicerContext
    ) -> risk_pb2.ListRiskCasesResponse:
        caller_in(*READERS)
        state = None
        if request.state != risk_pb2.RISK_CASE_STATE_UNSPECIFIED:
            if request.state not in PROTO_TO_STATE:
                raise InvalidField("state", "is not a case state")
            state = PROTO_TO_STATE[request.state]
        if request.detector and request.detector not in DETECTORS:
            raise InvalidField("detector", f"must be one of {', '.join(DETECTORS)}")
        if request.assignee:
            _assignee(request.assignee)
        if not 0 <= request.limit <= risk_cases.LIST_LIMIT_MAX:
            raise InvalidField("limit", f"must be 0 to {risk_cases.LIST_LIMIT_MAX}")
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            found = await risk_cases.list_cases(
                connection, state, request.detector or None, request.assignee or None, request.limit or 100
            )
        return risk_pb2.ListRiskCasesResponse(cases=[case_message(case, False) for case in found])

    async def GetRiskCase(
        self, request: risk_pb2.GetRiskCaseRequest, context: grpc.aio.ServicerContext
    ) -> risk_pb2.GetRiskCaseResponse:
        caller_in(*READERS)
        case_id = _case_id(request.case_id)
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            case = await risk_cases.get(connection, case_id)
            clawed = await risk_cases.clawbacks(connection, case_id)
        return risk_pb2.GetRiskCaseResponse(risk_case=case_message(case, True, clawed))

    async def AssignRiskCase(
        self, request: risk_pb2.AssignRiskCaseRequest, context: grpc.aio.ServicerContext
    ) -> risk_pb2.AssignRiskCaseResponse:
        identity = caller(OPERATOR)
        request_id = validation.check_request_id(request.request_id)
        case_id, assignee = _case_id(request.case_id), _assignee(request.assignee)
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            try:
                case = await risk_cases.assign(connection, case_id, assignee, identity.terminal_id, request_id)
            except InvalidCaseTransition as error:
                raise invalid_state(error) from None
        return risk_pb2.AssignRiskCaseResponse(risk_case=case_message(case, True))

    async def TransitionRiskCase(
        self, request: risk_pb2.TransitionRiskCaseRequest, context: grpc.aio.ServicerContext
    ) -> risk_pb2.TransitionRiskCaseResponse:
        identity = caller(OPERATOR)
        request_id = validation.check_request_id(request.request_id)
        case_id = _case_id(request.case_id)
        to_state = PROTO_TO_STATE.get(request.to_state)
        if to_state not in (REVIEWING, CONFIRMED, DISMISSED):
            raise InvalidField("to_state", "must be REVIEWING, CONFIRMED or DISMISSED")
        note = request.note.strip()
        if len(note) > NOTE_CHARACTERS_MAX:
            raise InvalidField("note", f"is at most {NOTE_CHARACTERS_MAX} characters")
        if to_state in (CONFIRMED, DISMISSED) and not note:
            raise InvalidField("note", "is required to confirm or dismiss a case")
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            try:
                case = await risk_cases.move(connection, case_id, to_state, note, identity.terminal_id, request_id)
            except InvalidCaseTransition as error:
                raise invalid_state(error) from None
        return risk_pb2.TransitionRiskCaseResponse(risk_case=case_message(case, True))

    async def ClawBack(
        self, request: risk_pb2.ClawBackRequest, context: grpc.aio.ServicerContext
    ) -> risk_pb2.ClawBackResponse:
        identity = caller(OPERATOR)
        request_id = validation.check_request_id(request.request_id)
        case_id = _case_id(request.case_id)
        authorization_id = validation.check_authorization_id(request.authorization_id)
        line_ids = validation.canonical_line_ids(request.line_ids, CLAW_BACK_LINES_MAX)
        note = request.note.strip()
        if not note:
            raise InvalidField("note", "is required: why the subsidy is clawed back")
        if len(note) > NOTE_CHARACTERS_MAX:
            raise InvalidField("note", f"is at most {NOTE_CHARACTERS_MAX} characters")
        canonical = risk_pb2.ClawBackRequest(
            request_id=request_id, case_id=case_id, authorization_id=authorization_id, line_ids=line_ids, note=note
        )
        digest = payload_hash("ClawBack", canonical)
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            case = await risk_cases.get(connection, case_id)
            if case.state != CONFIRMED:
                raise ApiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    common_pb2.ERROR_REASON_INVALID_STATE,
                    f"case {case_id} is {case.state}: only a CONFIRMED case claws back",
                    {"state": "RISK_CASE_STATE_" + case.state},
                )
            if await risk_cases.request_taken(connection, identity.terminal_id, request_id, case_id):
                raise IdempotencyConflict
            owner = await authorization_owner(self._store, authorization_id)
            if owner is None:
                raise_script_error(Failure("AUTHORIZATION_NOT_FOUND"))
            made_by = {"MERCHANT": owner.merchant_id, "TERMINAL": owner.terminal_id, "CONSUMER": owner.consumer_key}
            if made_by.get(case.subject_kind) != case.subject_id:
                raise invalid_field(
                    "authorization_id", f"is not a sale of the case's {case.subject_kind.lower()} ({case.subject_id})"
                )
            reply = await self._store.claw_back(
                digest, request_id, identity.terminal_id, case_id, authorization_id, line_ids
            )
            if isinstance(reply, Failure):
                raise_script_error(reply)
            body = reply.body
            details = {
                "authorization_id": authorization_id,
                "merchant_id": body.authorization.merchant_id,
                "line_ids": body.line_ids,
                "clawed_back_fen": body.clawed_back_fen,
                "note": note,
            }
            # Once per request id: a replayed claw-back (Redis answered its stored answer) finds
            # its audit row already written, unless the first call failed right before it.
            async with connection.transaction():
                await risk_cases.audit_clawback(connection, identity.terminal_id, request_id, case_id, details)
        view = body.authorization
        return risk_pb2.ClawBackResponse(
            authorization_id=view.authorization_id,
            merchant_id=view.merchant_id,
            line_ids=body.line_ids,
            clawed_back_fen=body.clawed_back_fen,
            clawed_back_line_ids=[line.line_id for line in view.lines if line.refunded == 2],
            replayed=reply.replayed,
        )
