"""AuthorizationService: validates, calls one script, turns its answer into a response."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from subsidy_client.v1 import authorization_pb2, authorization_pb2_grpc

from server.domain import location, validation
from server.rpc.auth import TERMINAL, caller
from server.services import requests
from server.services.common import (
    CampaignLocations,
    device_point,
    key_id_number,
    payload_hash,
    raise_script_error,
    timestamp_ms,
)
from storage.redis.contract import Answer, AuthorizationView, AuthorizeAnswer, Declined, Failure, Line
from storage.redis.store import AuthorizeInput, LifecycleInput, LineInput, RedisStore

pb = authorization_pb2
log = logging.getLogger("subsidy.authorization")

# Location at redemption: what the script is told about the phone's location, applied only
# when the campaign requires it. A payment without one is LOCATION_REQUIRED; a judged one is 0
# or the DeclineReason of the claim's verdict (server/domain/location.py).
LOCATION_REQUIRED = pb.DECLINE_REASON_LOCATION_REQUIRED
LOCATION_VERDICTS: Mapping[location.Verdict, int] = {
    location.Verdict.ACCEPTED: 0,
    location.Verdict.MOCKED: pb.DECLINE_REASON_LOCATION_MOCKED,
    location.Verdict.STALE: pb.DECLINE_REASON_LOCATION_STALE,
    location.Verdict.INACCURATE: pb.DECLINE_REASON_LOCATION_INACCURATE,
    location.Verdict.OUTSIDE_REGION: pb.DECLINE_REASON_LOCATION_OUTSIDE_REGION,
}


# A line's r in the authorization's hash: 1 once refunded (refund.lua), 2 once clawed back
# (clawback.lua). LineResult.refunded and LineResult.clawed_back say which.
REFUNDED = 1
CLAWED_BACK = 2


def add_line_results(target: Any, lines: Sequence[Line]) -> None:
    """Each line as a LineResult, built in place in ``target`` (a message's repeated ``lines``)
    rather than as messages copied in afterwards (issue 15)."""
    add = target.add
    for line in lines:
        add(
            line_id=line.line_id,
            gtin=line.gtin,
            category=line.category,
            unit_price_fen=line.unit_price_fen,
            subsidy_fen=line.subsidy_fen,
            payable_fen=line.unit_price_fen - line.subsidy_fen,
            refunded=line.refunded == REFUNDED,
        )


def authorization_message(view: AuthorizationView) -> authorization_pb2.Authorization:
    message = pb.Authorization(
        authorization_id=view.authorization_id,
        state=pb.AuthorizationState.Value("AUTHORIZATION_STATE_" + view.state),
        campaign_id=view.campaign_id,
        merchant_id=view.merchant_id,
        terminal_id=view.terminal_id,
        channel=pb.Channel.ValueType(view.channel),
        total_price_fen=view.total_price_fen,
        subsidy_fen=view.subsidy_fen,
        refunded_subsidy_fen=view.refunded_fen,
        created_at=timestamp_ms(view.created_ms),
        hold_expires_at=timestamp_ms(view.hold_expires_ms),
        updated_at=timestamp_ms(view.updated_ms),
        redemption_code=view.redemption_code,
        channel_reference=view.channel_reference,
    )
    add_line_results(message.lines, view.lines)
    # Claw-backs (clawback.lua marks a line r = 2) are shown here and not in add_line_results:
    # an Authorize answer never has one, and its hot path keeps building one field less.
    clawed_back_fen = 0
    for result, line in zip(message.lines, view.lines, strict=True):
        if line.refunded == CLAWED_BACK:
            result.clawed_back = True
            clawed_back_fen += line.subsidy_fen
    message.clawed_back_fen = clawed_back_fen
    return message


def authorize_response(answer: Answer[AuthorizeAnswer]) -> authorization_pb2.AuthorizeResponse:
    body = answer.body
    if isinstance(body, Declined):
        return pb.AuthorizeResponse(
            decision=pb.DECISION_DECLINED,
            decline_reason=pb.DeclineReason.ValueType(body.reason),
            declined_line_id=body.line_id,
            replayed=answer.replayed,
        )
    view = body.authorization
    # Lines and the expiry are built in place in the response, not as messages then copied in
    # (4.4-4.5 against 5.5-8.0 us for a one-line approval, timeit here; issue 15).
    response = pb.AuthorizeResponse(
        decision=pb.DECISION_APPROVED,
        authorization_id=view.authorization_id,
        total_price_fen=view.total_price_fen,
        subsidy_fen=view.subsidy_fen,
        payable_fen=view.total_price_fen - view.subsidy_fen,
        replayed=answer.replayed,
    )
    add_line_results(response.lines, view.lines)
    response.hold_expires_at.FromMilliseconds(view.hold_expires_ms)
    return response


class AuthorizationService(authorization_pb2_grpc.AuthorizationServiceServicer):
    def __init__(self, store: RedisStore, max_lines: int, programme_key: str = "") -> None:
        self._store = store
        self._max_lines = max_lines
        self._programme_key = programme_key.encode()
        self._campaigns = CampaignLocations(store)

    async def _location_verdict(self, request: authorization_pb2.AuthorizeRequest) -> int:
        """The phone's location judged as a claim's, from this process's copy of the campaign's
        rule and region (no Redis call while it is under a second old). Validated whatever the
        campaign (a malformed location is INVALID_ARGUMENT naming the field); the script applies
        the verdict only when the campaign requires it. The point is dropped here."""
        if not request.HasField("consumer_location"):
            return LOCATION_REQUIRED
        device = request.consumer_location
        now_ms = int(time.time() * 1000)
        point, fix_ms = device_point(device, "consumer_location", now_ms)
        found = await self._campaigns.get(request.campaign_id, recheck_missing=True)
        if found is None:
            # No such campaign published: the script declines CAMPAIGN_NOT_FOUND before this
            # matters (one published since would see this, never an unjudged location accepted).
            return pb.DECLINE_REASON_CAMPAIGN_NOT_FOUND
        rule, region = found
        verdict = location.verdict(
            point, device.location.accuracy_m, fix_ms, device.mock_location, now_ms, rule, region
        )
        return LOCATION_VERDICTS[verdict]

    async def Authorize(
        self, request: authorization_pb2.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> authorization_pb2.AuthorizeResponse:
        requests.check_authorize(request, self._max_lines)
        identity = caller(TERMINAL)
        if request.consumer_id_number:
            # Keyed here exactly as ClaimQualification keys it, then dropped from the request:
            # the idempotency hash and everything after see the consumer key, never the number.
            _, request.consumer_key = key_id_number(
                self._programme_key, request.consumer_id_number, "consumer_id_number"
            )
            request.ClearField("consumer_id_number")
        location_verdict = await self._location_verdict(request)
        reply = await self._store.authorize(
            AuthorizeInput(
                payload_hash=payload_hash("Authorize", request),
                request_id=request.request_id,
                terminal_id=identity.terminal_id,
                merchant_id=identity.merchant_id,
                nonce=identity.nonce,
                campaign_id=request.campaign_id,
                consumer_key=request.consumer_key,
                channel=request.channel,
                # 128 random bits as 32 hex characters, the form every authorization id has
                # (validation.AUTHORIZATION_ID); uuid4().hex cost ~3 us more per call.
                authorization_id=os.urandom(16).hex(),
                redemption_code=request.redemption_code,
                lines=[
                    LineInput(line.line_id, line.gtin, line.unit_price_fen, line.serial_number)
                    for line in request.lines
                ],
                location_verdict=location_verdict,
            )
        )
        if isinstance(reply, Failure):
            raise_script_error(reply)
        response = authorize_response(reply)
        if log.isEnabledFor(logging.DEBUG):
            # Identifiers only: never the consumer key, prices or serials.
            log.debug(
                "authorize",
                extra={
                    "terminal": identity.terminal_id,
                    "request_id": request.request_id,
                    "decision": pb.Decision.Name(response.decision),
                    "reason": pb.DeclineReason.Name(response.decline_reason),
                    "replayed": response.replayed,
                },
            )
        return response

    def _lifecycle_input(self, method: str, request: Any, channel_reference: str = "") -> LifecycleInput:
        identity = caller(TERMINAL)
        return LifecycleInput(
            payload_hash=payload_hash(method, request),
            request_id=request.request_id,
            terminal_id=identity.terminal_id,
            merchant_id=identity.merchant_id,
            nonce=identity.nonce,
            authorization_id=request.authorization_id,
            channel_reference=channel_reference,
        )

    async def Capture(
        self, request: authorization_pb2.CaptureRequest, context: grpc.aio.ServicerContext
    ) -> authorization_pb2.CaptureResponse:
        requests.check_capture(request)
        reply = await self._store.capture(self._lifecycle_input("Capture", request, request.channel_reference))
        if isinstance(reply, Failure):
            raise_script_error(reply)
        return pb.CaptureResponse(
            authorization=authorization_message(reply.body.authorization),
            replayed=reply.replayed,
        )

    async def Void(
        self, request: authorization_pb2.VoidRequest, context: grpc.aio.ServicerContext
    ) -> authorization_pb2.VoidResponse:
        requests.check_lifecycle(request)
        reply = await self._store.void(self._lifecycle_input("Void", request))
        if isinstance(reply, Failure):
            raise_script_error(reply)
        return pb.VoidResponse(
            authorization=authorization_message(reply.body.authorization),
            replayed=reply.replayed,
        )

    async def Refund(
        self, request: authorization_pb2.RefundRequest, context: grpc.aio.ServicerContext
    ) -> authorization_pb2.RefundResponse:
        requests.check_refund(request, self._max_lines)
        reply = await self._store.refund(
            self._lifecycle_input("Refund", request, request.channel_reference), list(request.line_ids)
        )
        if isinstance(reply, Failure):
            raise_script_error(reply)
        return pb.RefundResponse(
            authorization=authorization_message(reply.body.authorization),
            refunded_subsidy_fen=reply.body.refunded_fen,
            replayed=reply.replayed,
        )

    async def GetAuthorization(
        self, request: authorization_pb2.GetAuthorizationRequest, context: grpc.aio.ServicerContext
    ) -> authorization_pb2.GetAuthorizationResponse:
        authorization_id = validation.check_authorization_id(request.authorization_id)
        identity = caller(TERMINAL)
        if not await self._store.claim_nonce(identity.terminal_id, identity.nonce):
            raise_script_error(Failure("NONCE_REUSED"))
        view = await self._store.get_authorization(authorization_id, identity.terminal_id, identity.merchant_id)
        if view is None:
            raise_script_error(Failure("AUTHORIZATION_NOT_FOUND"))
        if isinstance(view, str):
            raise_script_error(Failure(view))
        return pb.GetAuthorizationResponse(authorization=authorization_message(view))
