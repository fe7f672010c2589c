"""QualificationService: the consumer's ID number becomes a consumer key here, the phone's
location becomes a verdict here, and one script claims, atomically, against the quota.

The raw ID number and phone number live only in the request message: they are validated,
turned into the consumer key (HMAC-SHA256 under the programme key) and masked forms, and are
never stored, logged or hashed into an idempotency record. The masked forms are stored only
sealed under this provider's local data key (server/domain/sealing.py, docs/privacy.md), or not
at all without one: a claim answers with the masks of the numbers it was sent; Get, List and
Cancel with what the stored tokens open to ("" when they open to nothing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from subsidy_client.v1 import common_pb2, qualification_pb2, qualification_pb2_grpc

from server.domain import identity, location, sealing, validation
from server.domain.reference import CATEGORY, IDENTIFIER, PACK_VOUCHERS_MAX
from server.rpc.auth import PARTNER, caller
from server.rpc.errors import ApiError, invalid_field
from server.services.common import (
    CampaignLocations,
    device_point,
    key_id_number,
    payload_hash,
    raise_script_error,
    timestamp_ms,
)
from storage.redis.contract import ClaimDeclined, Failure, QualificationView, VoucherArgs
from storage.redis.store import CancelInput, ClaimInput, RedisStore

pb = qualification_pb2
log = logging.getLogger("subsidy.qualification")

LIST_LIMIT = 100
# The location verdict as the claim script takes it: 0, or the ClaimDeclineReason it answers.
LOCATION_VERDICTS: Mapping[location.Verdict, int] = {
    location.Verdict.ACCEPTED: 0,
    location.Verdict.MOCKED: pb.CLAIM_DECLINE_REASON_LOCATION_MOCKED,
    location.Verdict.STALE: pb.CLAIM_DECLINE_REASON_LOCATION_STALE,
    location.Verdict.INACCURATE: pb.CLAIM_DECLINE_REASON_LOCATION_INACCURATE,
    location.Verdict.OUTSIDE_REGION: pb.CLAIM_DECLINE_REASON_LOCATION_OUTSIDE_REGION,
}


@dataclass(frozen=True)
class Consumer:
    key: str
    masked_id_number: str
    masked_phone_number: str
    phone_digest: str


def qualification_message(
    view: QualificationView, masked_id_number: str, masked_phone_number: str
) -> qualification_pb2.Qualification:
    """The message for a qualification view, with its masks in clear (the view holds them
    sealed, as stored)."""
    return pb.Qualification(
        redemption_code=view.redemption_code,
        state=pb.QualificationState.Value("QUALIFICATION_STATE_" + view.state),
        campaign_id=view.campaign_id,
        category=view.category,
        consumer_key=view.consumer_key,
        issued_at=timestamp_ms(view.issued_ms),
        expires_at=timestamp_ms(view.expires_ms),
        updated_at=timestamp_ms(view.updated_ms),
        authorization_id=view.authorization_id,
        masked_id_number=masked_id_number,
        masked_phone_number=masked_phone_number,
        location_cell=view.location_cell,
        pack_id=view.pack_id,
        threshold_fen=view.threshold_fen,
        off_fen=view.off_fen,
    )


def not_found(code: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        common_pb2.ERROR_REASON_NOT_FOUND,
        "no such qualification for this partner",
        {"kind": "qualification", "id": code},
    )


class QualificationService(qualification_pb2_grpc.QualificationServiceServicer):
    def __init__(self, store: RedisStore, programme_key: str, local_data_key: str = "") -> None:
        self._store = store
        self._programme_key = programme_key.encode()
        self._sealer = sealing.Sealer(local_data_key.encode())
        self._campaigns = CampaignLocations(store)

    def _seal(self, value: str, field: str, code: str, consumer_key: str) -> str:
        sealed = self._sealer.seal(value, field=field, redemption_code=code, consumer_key=consumer_key)
        # Never a mask in clear at rest, whatever a change elsewhere does.
        assert sealing.at_rest_form(sealed)
        return sealed

    def _message(self, view: QualificationView) -> qualification_pb2.Qualification:
        """A stored qualification's message: its masks opened with the local data key."""
        code, consumer_key = view.redemption_code, view.consumer_key
        return qualification_message(
            view,
            self._sealer.open(view.masked_id, field="masked_id", redemption_code=code, consumer_key=consumer_key),
            self._sealer.open(view.masked_phone, field="masked_phone", redemption_code=code, consumer_key=consumer_key),
        )

    def _consumer(self, message: qualification_pb2.ConsumerIdentity, field: str) -> Consumer:
        number, key = key_id_number(self._programme_key, message.id_number, f"{field}.id_number")
        masked_phone = phone_digest = ""
        if message.phone_number:
            try:
                masked_phone = identity.mask_phone(message.phone_number)
            except identity.IdentityError as error:
                raise invalid_field(f"{field}.phone_number", str(error)) from None
            phone_digest = identity.phone_digest(self._programme_key, message.phone_number)
        return Consumer(
            key=key,
            masked_id_number=identity.mask_id_number(number),
            masked_phone_number=masked_phone,
            phone_digest=phone_digest,
        )

    async def ClaimQualification(
        self, request: qualification_pb2.ClaimQualificationRequest, context: grpc.aio.ServicerContext
    ) -> qualification_pb2.ClaimQualificationResponse:
        partner = caller(PARTNER)
        request.request_id = validation.check_request_id(request.request_id)
        if not IDENTIFIER.match(request.campaign_id):
            raise invalid_field("campaign_id", "must be 1-64 characters of [A-Za-z0-9_.-]")
        if request.pack_id:
            # A pack claim names the pack; its vouchers name their categories.
            if not IDENTIFIER.match(request.pack_id):
                raise invalid_field("pack_id", "must be 1-64 characters of [A-Za-z0-9_.-]")
            if request.category:
                raise invalid_field("category", "must be empty when pack_id is set (one of the two)")
        elif not CATEGORY.match(request.category):
            raise invalid_field("category", "must be 1-32 characters of [a-z0-9_]")
        consumer = self._consumer(request.consumer, "consumer")
        device = request.device_location
        now_ms = int(time.time() * 1000)
        point, fix_ms = device_point(device, "device_location", now_ms)
        found = await self._campaigns.get(request.campaign_id)
        verdict = location.Verdict.ACCEPTED
        if found is not None:
            rule, region = found
            verdict = location.verdict(
                point, device.location.accuracy_m, fix_ms, device.mock_location, now_ms, rule, region
            )
        # The idempotency hash covers the request with the ID and phone numbers replaced by
        # keyed digests: a stored hash must not be a way to brute-force an ID number.
        scrubbed = qualification_pb2.ClaimQualificationRequest()
        scrubbed.CopyFrom(request)
        scrubbed.consumer.id_number = consumer.key
        scrubbed.consumer.phone_number = consumer.phone_digest
        # Codes from the store: on a cluster each names the consumer's shard (shards.py).
        code = self._store.new_redemption_code(consumer.key)
        # A pack claim: a candidate code per voucher the largest pack may hold, each with the
        # masks sealed for it; the script issues as many as the pack has (PACK_VOUCHERS_MAX
        # rather than the pack's size, which only the script reads: no extra round trip).
        vouchers = [
            VoucherArgs(
                code=candidate,
                masked_id_number=self._seal(consumer.masked_id_number, "masked_id", candidate, consumer.key),
                masked_phone_number=self._seal(consumer.masked_phone_number, "masked_phone", candidate, consumer.key),
            )
            for candidate in (
                self._store.new_redemption_code(consumer.key)
                for _ in range(PACK_VOUCHERS_MAX if request.pack_id else 0)
            )
        ]
        reply = await self._store.claim(
            ClaimInput(
                payload_hash=payload_hash("ClaimQualification", scrubbed),
                request_id=request.request_id,
                partner_id=partner.terminal_id,
                nonce=partner.nonce,
                campaign_id=request.campaign_id,
                category=request.category,
                consumer_key=consumer.key,
                redemption_code=code,
                location_verdict=LOCATION_VERDICTS[verdict],
                masked_id_number=self._seal(consumer.masked_id_number, "masked_id", code, consumer.key),
                masked_phone_number=self._seal(consumer.masked_phone_number, "masked_phone", code, consumer.key),
                location_cell=location.coarse_cell(point),
                pack_id=request.pack_id,
                vouchers=vouchers,
            )
        )
        if isinstance(reply, Failure):
            if reply.error == "UNKNOWN_PACK":
                raise invalid_field("pack_id", "the campaign has no such pack")
            if reply.error == "UNKNOWN_CATEGORY" and request.pack_id:
                raise invalid_field("pack_id", "the pack names a category the campaign has no rule for")
            if reply.error == "UNKNOWN_CATEGORY":
                raise invalid_field("category", "the campaign has no rule for this category")
            if reply.error == "CATEGORY_IN_PACK":
                raise invalid_field("category", "the campaign issues this category in packs: claim one with pack_id")
            raise_script_error(reply)
        body = reply.body
        replayed = reply.replayed
        if log.isEnabledFor(logging.DEBUG):
            # Identifiers only: never the ID number, phone, consumer key or location.
            log.debug(
                "claim",
                extra={
                    "partner": partner.terminal_id,
                    "request_id": request.request_id,
                    "decision": "DECLINED" if isinstance(body, ClaimDeclined) else "ISSUED",
                    "reason": body.reason if isinstance(body, ClaimDeclined) else 0,
                    "replayed": replayed,
                },
            )
        if isinstance(body, ClaimDeclined):
            return pb.ClaimQualificationResponse(
                decision=pb.CLAIM_DECISION_DECLINED,
                decline_reason=pb.ClaimDeclineReason.ValueType(body.reason),
                replayed=replayed,
            )
        # The numbers of this request are the claim's (the payload hash covers their keyed
        # digests), so its masks answer for a replay too, with or without a local data key. An
        # answer stored before packs has no list: its one qualification.
        issued = [
            qualification_message(view, consumer.masked_id_number, consumer.masked_phone_number)
            for view in (body.qualifications or [body.qualification])
        ]
        return pb.ClaimQualificationResponse(
            decision=pb.CLAIM_DECISION_ISSUED,
            qualification=issued[0],
            qualifications=issued,
            replayed=replayed,
        )

    async def _claim_read_nonce(self) -> str:
        partner = caller(PARTNER)
        if not await self._store.claim_nonce(partner.terminal_id, partner.nonce):
            raise_script_error(Failure("NONCE_REUSED"))
        return partner.terminal_id

    async def GetQualification(
        self, request: qualification_pb2.GetQualificationRequest, context: grpc.aio.ServicerContext
    ) -> qualification_pb2.GetQualificationResponse:
        caller(PARTNER)
        request.redemption_code = validation.check_redemption_code(request.redemption_code)
        partner_id = await self._claim_read_nonce()
        view = await self._store.get_qualification(request.redemption_code, partner_id)
        if view is None:
            raise not_found(request.redemption_code)
        return pb.GetQualificationResponse(qualification=self._message(view))

    async def ListQualifications(
        self, request: qualification_pb2.ListQualificationsRequest, context: grpc.aio.ServicerContext
    ) -> qualification_pb2.ListQualificationsResponse:
        caller(PARTNER)
        consumer = self._consumer(request.consumer, "consumer")
        if request.campaign_id and not IDENTIFIER.match(request.campaign_id):
            raise invalid_field("campaign_id", "must be 1-64 characters of [A-Za-z0-9_.-]")
        partner_id = await self._claim_read_nonce()
        views = await self._store.list_qualifications(consumer.key, partner_id, request.campaign_id, LIST_LIMIT)
        return pb.ListQualificationsResponse(qualifications=[self._message(view) for view in views])

    async def CancelQualification(
        self, request: qualification_pb2.CancelQualificationRequest, context: grpc.aio.ServicerContext
    ) -> qualification_pb2.CancelQualificationResponse:
        partner = caller(PARTNER)
        request.request_id = validation.check_request_id(request.request_id)
        request.redemption_code = validation.check_redemption_code(request.redemption_code)
        reply = await self._store.cancel_qualification(
            CancelInput(
                payload_hash=payload_hash("CancelQualification", request),
                request_id=request.request_id,
                partner_id=partner.terminal_id,
                nonce=partner.nonce,
                redemption_code=request.redemption_code,
            )
        )
        if isinstance(reply, Failure):
            error = reply.error
            if error == "QUALIFICATION_NOT_FOUND":
                raise not_found(request.redemption_code)
            if error == "INVALID_STATE":
                raise ApiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    common_pb2.ERROR_REASON_INVALID_STATE,
                    "only an ISSUED qualification can be cancelled",
                    {"state": "QUALIFICATION_STATE_" + reply.state},
                )
            raise_script_error(reply)
        return pb.CancelQualificationResponse(
            qualification=self._message(reply.body.qualification), replayed=reply.replayed
        )
