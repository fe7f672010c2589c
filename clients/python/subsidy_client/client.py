"""A typed asyncio client for terminals and partner apps.

- Signs every attempt (fresh timestamp and nonce) with the terminal's secret.
- Every call has a deadline (``deadline_s``); a retry gets what is left of an overall budget.
- Retries UNAVAILABLE and DEADLINE_EXCEEDED with the *same* request_id, so the gateway's
  idempotency turns a retry into the first answer rather than a second reservation.
- Raises the ``subsidy_client.errors`` class of each failure's ErrorInfo reason.

Example::

    async with AuthorizationClient("127.0.0.1:50051", "t-01", secret) as client:
        response = await client.authorize(campaign_id="demo", consumer_key=key,
                                          lines=[Line("1", "6901234000016", 459900, "SN1")])
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from subsidy_client import signing
from subsidy_client.errors import RETRYABLE_CODES, SubsidyError, from_rpc_error
from subsidy_client.v1 import authorization_pb2 as pb
from subsidy_client.v1 import (
    common_pb2,
    credentials_pb2,
    diagnostics_pb2,
    exchange_pb2,
    merchant_pb2,
    qualification_pb2,
    reporting_pb2,
)

ResponseT = TypeVar("ResponseT", bound=Message)
SERVICE = "/subsidy.v1.AuthorizationService/"
REPORTING = "/subsidy.v1.ReportingService/"
QUALIFICATION = "/subsidy.v1.QualificationService/"
EXCHANGE = "/subsidy.v1.ExchangeService/"
MERCHANT = "/subsidy.v1.MerchantService/"
CREDENTIAL = "/subsidy.v1.CredentialService/"


@dataclass(frozen=True)
class Line:
    line_id: str
    gtin: str
    unit_price_fen: int
    serial_number: str = ""


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the gateway. ``ca_file``: the PEM CA bundle that signed the gateway's certificate
    (None: the system's trusted roots). ``cert_file`` and ``key_file``: this caller's client
    certificate and key for mutual TLS (the certificate must name the caller id that signs the
    calls). ``server_name``: the name to check in the gateway's certificate when it differs from
    the target's host (e.g. a target given as an IP address)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as handle:
                return handle.read()

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def open_channel(target: str, tls: TlsConfig | None = None) -> grpc.aio.Channel:
    """A channel to the gateway: TLS with ``tls``, plaintext without (loopback development)."""
    if tls is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=tls.channel_options())


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 1.0
    total_budget_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff bounds must satisfy 0 <= initial <= max")


class SignedClient:
    """A channel whose every call is signed with one caller's credential (terminal or operator)."""

    def __init__(
        self,
        target: str,
        terminal_id: str,
        secret: str,
        *,
        deadline_s: float = 2.0,
        retry: RetryPolicy | None = None,
        channel: grpc.aio.Channel | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        if deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        self._target = target
        self._terminal_id = terminal_id
        self._secret = secret
        self._deadline_s = deadline_s
        self._retry = retry or RetryPolicy()
        self._owns_channel = channel is None
        self._channel = channel or open_channel(target, tls)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    @property
    def target(self) -> str:
        """The gateway address this client calls."""
        return self._target

    async def _call(self, method: str, request: Message, response_type: type[ResponseT]) -> ResponseT:
        body = request.SerializeToString()
        stub = self._channel.unary_unary(
            method, request_serializer=lambda raw: raw, response_deserializer=response_type.FromString
        )
        started = time.monotonic()
        for attempt in range(1, self._retry.max_attempts + 1):
            remaining_s = self._retry.total_budget_s - (time.monotonic() - started)
            metadata = signing.signed_metadata(self._secret, method, self._terminal_id, body)
            try:
                response: ResponseT = await stub(body, timeout=min(self._deadline_s, remaining_s), metadata=metadata)
                return response
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            last_attempt = attempt == self._retry.max_attempts
            # By status code, not class: a reason that means "missing" under another code
            # (FAILED_PRECONDITION / DEPENDENCY_UNAVAILABLE: no programme key) is not retried.
            if error.code not in RETRYABLE_CODES or last_attempt:
                raise error
            backoff_s = min(self._retry.backoff_max_s, self._retry.backoff_initial_s * 2 ** (attempt - 1))
            backoff_s *= random.uniform(0.5, 1.0)
            if time.monotonic() - started + backoff_s >= self._retry.total_budget_s:
                raise error
            await asyncio.sleep(backoff_s)
        raise AssertionError("unreachable: the loop returns or raises")

    async def echo(self, payload: bytes) -> bytes:
        request = diagnostics_pb2.EchoRequest(payload=payload)
        response = await self._call("/subsidy.v1.DiagnosticsService/Echo", request, diagnostics_pb2.EchoResponse)
        return response.payload

    async def _stream_call(
        self, method: str, requests: Sequence[Message], response_type: type[ResponseT], timeout_s: float
    ) -> ResponseT:
        """A client-streaming call, signed over an empty body (see subsidy_client.signing).
        Not retried: a stream is not replayable from here; the request_id in its first message
        makes a repeated call safe."""
        stub = self._channel.stream_unary(
            method,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        metadata = signing.signed_metadata(self._secret, method, self._terminal_id, b"")
        try:
            response: ResponseT = await stub(iter(requests), timeout=timeout_s, metadata=metadata)
            return response
        except grpc.aio.AioRpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None

    async def call_raw(self, method: str, body: bytes, metadata: Any) -> bytes:
        """Sends raw bytes with caller-chosen metadata: for tests of hostile input."""
        stub = self._channel.unary_unary(
            method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw
        )
        try:
            result: bytes = await stub(body, timeout=self._deadline_s, metadata=metadata)
            return result
        except grpc.aio.AioRpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None


class AuthorizationClient(SignedClient):
    """For terminals and e-commerce checkouts: the authorization hot path."""

    async def authorize(
        self,
        *,
        campaign_id: str,
        lines: Sequence[Line],
        consumer_key: str = "",
        channel: int = pb.CHANNEL_POS,
        request_id: str | None = None,
        redemption_code: str = "",
        consumer_id_number: str = "",
        consumer_location: qualification_pb2.DeviceLocation | None = None,
    ) -> pb.AuthorizeResponse:
        """Who pays: ``consumer_key`` (a partner app holding the programme key), or
        ``consumer_id_number`` (a till that read an ID card; the gateway keys it and forgets
        it), or neither with a ``redemption_code`` (the qualification's owner).
        ``consumer_location``: where the consumer's phone is, for campaigns that require it at
        redemption (location, fix time, mock flag, as a claim's ``device_location``)."""
        request = pb.AuthorizeRequest(
            request_id=request_id or str(uuid.uuid4()),
            campaign_id=campaign_id,
            consumer_key=consumer_key,
            consumer_id_number=consumer_id_number,
            channel=channel,  # type: ignore[arg-type]
            redemption_code=redemption_code,
            lines=[
                pb.LineItem(
                    line_id=line.line_id,
                    gtin=line.gtin,
                    unit_price_fen=line.unit_price_fen,
                    serial_number=line.serial_number,
                )
                for line in lines
            ],
            consumer_location=consumer_location,
        )
        return await self.send_authorize(request)

    async def send_authorize(self, request: pb.AuthorizeRequest) -> pb.AuthorizeResponse:
        """Sends a prepared request as is (for callers that build messages themselves)."""
        return await self._call(SERVICE + "Authorize", request, pb.AuthorizeResponse)

    async def capture(
        self, authorization_id: str, *, request_id: str | None = None, channel_reference: str = ""
    ) -> pb.CaptureResponse:
        request = pb.CaptureRequest(
            request_id=request_id or str(uuid.uuid4()),
            authorization_id=authorization_id,
            channel_reference=channel_reference,
        )
        return await self._call(SERVICE + "Capture", request, pb.CaptureResponse)

    async def void(self, authorization_id: str, *, request_id: str | None = None) -> pb.VoidResponse:
        request = pb.VoidRequest(request_id=request_id or str(uuid.uuid4()), authorization_id=authorization_id)
        return await self._call(SERVICE + "Void", request, pb.VoidResponse)

    async def refund(
        self,
        authorization_id: str,
        line_ids: Sequence[str] = (),
        *,
        request_id: str | None = None,
        channel_reference: str = "",
    ) -> pb.RefundResponse:
        request = pb.RefundRequest(
            request_id=request_id or str(uuid.uuid4()),
            authorization_id=authorization_id,
            line_ids=list(line_ids),
            channel_reference=channel_reference,
        )
        return await self._call(SERVICE + "Refund", request, pb.RefundResponse)

    async def get_authorization(self, authorization_id: str) -> pb.Authorization:
        request = pb.GetAuthorizationRequest(authorization_id=authorization_id)
        response = await self._call(SERVICE + "GetAuthorization", request, pb.GetAuthorizationResponse)
        return response.authorization


class QualificationClient(SignedClient):
    """For partner consumer apps: claiming, reading and cancelling qualifications (vouchers).
    The ID number is sent as typed; the gateway turns it into the consumer key."""

    async def claim(
        self,
        *,
        campaign_id: str,
        category: str,
        id_number: str,
        location: common_pb2.Location,
        fix_time_ms: int,
        mock_location: bool = False,
        phone_number: str = "",
        request_id: str | None = None,
        pack_id: str = "",
    ) -> qualification_pb2.ClaimQualificationResponse:
        """Claims one qualification of ``category``, or with ``pack_id`` (and ``category`` "")
        every voucher of the campaign's pack (the answer's ``qualifications``)."""
        fix_time = Timestamp()
        fix_time.FromMilliseconds(fix_time_ms)
        request = qualification_pb2.ClaimQualificationRequest(
            request_id=request_id or str(uuid.uuid4()),
            campaign_id=campaign_id,
            category=category,
            pack_id=pack_id,
            consumer=qualification_pb2.ConsumerIdentity(id_number=id_number, phone_number=phone_number),
            device_location=qualification_pb2.DeviceLocation(
                location=location, fix_time=fix_time, mock_location=mock_location
            ),
        )
        return await self.send_claim(request)

    async def send_claim(
        self, request: qualification_pb2.ClaimQualificationRequest
    ) -> qualification_pb2.ClaimQualificationResponse:
        return await self._call(
            QUALIFICATION + "ClaimQualification", request, qualification_pb2.ClaimQualificationResponse
        )

    async def get(self, redemption_code: str) -> qualification_pb2.Qualification:
        request = qualification_pb2.GetQualificationRequest(redemption_code=redemption_code)
        response = await self._call(
            QUALIFICATION + "GetQualification", request, qualification_pb2.GetQualificationResponse
        )
        return response.qualification

    async def list(self, id_number: str, campaign_id: str = "") -> list[qualification_pb2.Qualification]:
        request = qualification_pb2.ListQualificationsRequest(
            consumer=qualification_pb2.ConsumerIdentity(id_number=id_number), campaign_id=campaign_id
        )
        response = await self._call(
            QUALIFICATION + "ListQualifications", request, qualification_pb2.ListQualificationsResponse
        )
        return list(response.qualifications)

    async def cancel(
        self, redemption_code: str, *, request_id: str | None = None
    ) -> qualification_pb2.CancelQualificationResponse:
        request = qualification_pb2.CancelQualificationRequest(
            request_id=request_id or str(uuid.uuid4()), redemption_code=redemption_code
        )
        return await self._call(
            QUALIFICATION + "CancelQualification", request, qualification_pb2.CancelQualificationResponse
        )


class ExchangeClient(SignedClient):
    """For the other service providers of the programme: cross-provider duplicate checks."""

    async def check_consumer(self, consumer_key: str, category: str) -> bool:
        request = exchange_pb2.CheckConsumerRequest(consumer_key=consumer_key, category=category)
        response = await self._call(EXCHANGE + "CheckConsumer", request, exchange_pb2.CheckConsumerResponse)
        return response.used

    async def check_serial(self, gtin: str, serial_number: str) -> bool:
        request = exchange_pb2.CheckSerialRequest(gtin=gtin, serial_number=serial_number)
        response = await self._call(EXCHANGE + "CheckSerial", request, exchange_pb2.CheckSerialResponse)
        return response.subsidised


class ReportingClient(SignedClient):
    """For operators (auditors, the bureau): reconciliation and ledger status."""

    async def reconcile(self) -> reporting_pb2.ReconcileResponse:
        request = reporting_pb2.ReconcileRequest()
        return await self._call(REPORTING + "Reconcile", request, reporting_pb2.ReconcileResponse)

    async def get_ledger_status(self) -> reporting_pb2.GetLedgerStatusResponse:
        request = reporting_pb2.GetLedgerStatusRequest()
        return await self._call(REPORTING + "GetLedgerStatus", request, reporting_pb2.GetLedgerStatusResponse)


class MerchantClient(SignedClient):
    """For operators: MerchantService calls (merchants, stores, terminals and their credentials)."""

    async def create_merchant(self, request: merchant_pb2.CreateMerchantRequest) -> merchant_pb2.CreateMerchantResponse:
        return await self._call(MERCHANT + "CreateMerchant", request, merchant_pb2.CreateMerchantResponse)

    async def get_merchant(self, merchant_id: str) -> merchant_pb2.Merchant:
        request = merchant_pb2.GetMerchantRequest(merchant_id=merchant_id)
        response = await self._call(MERCHANT + "GetMerchant", request, merchant_pb2.GetMerchantResponse)
        return response.merchant

    async def create_store(self, request: merchant_pb2.CreateStoreRequest) -> merchant_pb2.CreateStoreResponse:
        return await self._call(MERCHANT + "CreateStore", request, merchant_pb2.CreateStoreResponse)

    async def create_terminal(self, request: merchant_pb2.CreateTerminalRequest) -> merchant_pb2.CreateTerminalResponse:
        return await self._call(MERCHANT + "CreateTerminal", request, merchant_pb2.CreateTerminalResponse)

    async def rotate_terminal_credential(
        self, terminal_id: str, *, request_id: str | None = None
    ) -> merchant_pb2.RotateTerminalCredentialResponse:
        request = merchant_pb2.RotateTerminalCredentialRequest(
            request_id=request_id or str(uuid.uuid4()), terminal_id=terminal_id
        )
        return await self._call(
            MERCHANT + "RotateTerminalCredential", request, merchant_pb2.RotateTerminalCredentialResponse
        )

    async def set_merchant_status(
        self,
        merchant_id: str,
        status: merchant_pb2.PartyStatus.ValueType,
        reason: str = "",
        *,
        request_id: str | None = None,
    ) -> merchant_pb2.SetMerchantStatusResponse:
        request = merchant_pb2.SetMerchantStatusRequest(
            request_id=request_id or str(uuid.uuid4()), merchant_id=merchant_id, status=status, reason=reason
        )
        return await self._call(MERCHANT + "SetMerchantStatus", request, merchant_pb2.SetMerchantStatusResponse)

    async def set_terminal_status(
        self,
        terminal_id: str,
        status: merchant_pb2.PartyStatus.ValueType,
        reason: str = "",
        *,
        request_id: str | None = None,
    ) -> merchant_pb2.SetTerminalStatusResponse:
        request = merchant_pb2.SetTerminalStatusRequest(
            request_id=request_id or str(uuid.uuid4()), terminal_id=terminal_id, status=status, reason=reason
        )
        return await self._call(MERCHANT + "SetTerminalStatus", request, merchant_pb2.SetTerminalStatusResponse)


class CredentialClient(SignedClient):
    """For operators: CredentialService calls (partner, provider and staff credentials)."""

    async def create_credential(
        self,
        credential_id: str,
        role: credentials_pb2.CredentialRole.ValueType,
        display_name: str,
        *,
        request_id: str | None = None,
    ) -> credentials_pb2.CreateCredentialResponse:
        request = credentials_pb2.CreateCredentialRequest(
            request_id=request_id or str(uuid.uuid4()),
            credential_id=credential_id,
            role=role,
            display_name=display_name,
        )
        return await self._call(CREDENTIAL + "CreateCredential", request, credentials_pb2.CreateCredentialResponse)

    async def rotate_credential(
        self, credential_id: str, *, request_id: str | None = None
    ) -> credentials_pb2.RotateCredentialResponse:
        request = credentials_pb2.RotateCredentialRequest(
            request_id=request_id or str(uuid.uuid4()), credential_id=credential_id
        )
        return await self._call(CREDENTIAL + "RotateCredential", request, credentials_pb2.RotateCredentialResponse)

    async def set_credential_status(
        self,
        credential_id: str,
        status: credentials_pb2.CredentialStatus.ValueType,
        reason: str = "",
        *,
        request_id: str | None = None,
    ) -> credentials_pb2.SetCredentialStatusResponse:
        request = credentials_pb2.SetCredentialStatusRequest(
            request_id=request_id or str(uuid.uuid4()), credential_id=credential_id, status=status, reason=reason
        )
        return await self._call(
            CREDENTIAL + "SetCredentialStatus", request, credentials_pb2.SetCredentialStatusResponse
        )

    async def list_credentials(self) -> list[credentials_pb2.Credential]:
        response = await self._call(
            CREDENTIAL + "ListCredentials",
            credentials_pb2.ListCredentialsRequest(),
            credentials_pb2.ListCredentialsResponse,
        )
        return list(response.credentials)


__all__ = [
    "AuthorizationClient",
    "CredentialClient",
    "ExchangeClient",
    "Line",
    "MerchantClient",
    "QualificationClient",
    "ReportingClient",
    "RetryPolicy",
    "SignedClient",
    "SubsidyError",
]
