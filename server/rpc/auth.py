"""Terminal authentication: every call to a subsidy.v1 service is signed by its terminal.

The interceptor verifies the HMAC over the exact request bytes (see
``subsidy_client.signing``), the timestamp window and the nonce's shape, then exposes the
caller (terminal, merchant, nonce) to the handler through a context variable. The merchant
comes from the credential record, never from the request. The nonce is recorded in Redis by
the handler's own script (one round trip on the hot path), so a replayed call is refused.

Credentials are cached in each process and refreshed whenever the published reference
version changes, so a known terminal costs no Redis call to authenticate
(storage/redis/credentials.py).
"""

from __future__ import annotations

import contextvars
import hmac
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from subsidy_client import signing
from subsidy_client.v1 import common_pb2

from server.rpc.errors import ApiError, invalid_field
from storage.redis.credentials import CredentialCache

NONCE_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,64}")
TERMINAL_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Milliseconds since the epoch: ASCII digits only (str.isdigit also accepts other scripts'
# digits) and at most 15 of them, so the number always converts to a float (10**400 does not).
TIMESTAMP_PATTERN = re.compile(r"[0-9]{1,15}")
PROTECTED_PREFIX = "/subsidy.v1."


# Callers: cashier terminals (with their merchant), operators (staff and auditors), partner
# consumer apps (QualificationService) and other service providers (ExchangeService).
TERMINAL, OPERATOR, PARTNER, PROVIDER = "terminal", "operator", "partner", "provider"
# The bureau's own staff (``operators:`` with ``role:`` in reference data): government users
# read (the daily reports; later the live stream, the dashboard and the audit archive), auditors
# take the audit archive only. Every other service names one role, so refuses them both.
GOVERNMENT, AUDITOR = "government", "auditor"


@dataclass(frozen=True)
class Caller:
    """Who is calling: a terminal (with its merchant) or an operator (merchant empty)."""

    terminal_id: str
    merchant_id: str
    nonce: str
    role: str = TERMINAL


current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("current_caller")


def caller(role: str | None = None) -> Caller:
    """The authenticated caller; with ``role``, refuses any other kind of caller."""
    identity = current_caller.get()
    if role is not None and identity.role != role:
        raise ApiError(
            grpc.StatusCode.PERMISSION_DENIED,
            common_pb2.ERROR_REASON_PERMISSION_DENIED,
            f"this method is for {role} credentials",
        )
    return identity


def caller_in(*roles: str) -> Caller:
    """The authenticated caller, when its role is one of ``roles``; PERMISSION_DENIED otherwise."""
    identity = current_caller.get()
    if identity.role not in roles:
        raise ApiError(
            grpc.StatusCode.PERMISSION_DENIED,
            common_pb2.ERROR_REASON_PERMISSION_DENIED,
            f"this method is for {' or '.join(roles)} credentials",
        )
    return identity


def unauthenticated(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, common_pb2.ERROR_REASON_UNAUTHENTICATED, message)


async def claim_operator_nonce(credentials: CredentialCache, identity: Caller) -> None:
    """Operator and provider calls record their nonce here (one Redis call, off the hot path);
    terminal and partner calls record it inside their own script or handler, in the same round
    trip as the call."""
    if identity.role not in (OPERATOR, PROVIDER, GOVERNMENT, AUDITOR):
        return
    if not await credentials.claim_nonce(identity.terminal_id, identity.nonce):
        raise unauthenticated("nonce already used; sign every attempt with a fresh nonce")


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


async def authenticate(
    credentials: CredentialCache,
    clock_skew_s: int,
    method: str,
    body: bytes,
    metadata: dict[str, str],
) -> Caller:
    terminal_id = metadata.get(signing.TERMINAL_HEADER, "")
    timestamp = metadata.get(signing.TIMESTAMP_HEADER, "")
    nonce = metadata.get(signing.NONCE_HEADER, "")
    presented = metadata.get(signing.SIGNATURE_HEADER, "")
    if not (terminal_id and timestamp and nonce and presented):
        raise unauthenticated("missing credential metadata (x-subsidy-terminal, -timestamp, -nonce, -signature)")
    if not (
        TERMINAL_PATTERN.fullmatch(terminal_id)
        and NONCE_PATTERN.fullmatch(nonce)
        and TIMESTAMP_PATTERN.fullmatch(timestamp)
    ):
        raise unauthenticated("malformed credential metadata")
    if abs(time.time() * 1000 - int(timestamp)) > clock_skew_s * 1000:
        raise unauthenticated("timestamp outside the allowed clock skew")
    credential = await credentials.get(terminal_id)
    # Compute a signature even for an unknown terminal, so timing does not reveal which exist.
    secret = credential.secret if credential else "unknown-terminal"
    expected = signing.signature(secret, method, terminal_id, int(timestamp), nonce, body)
    if credential is None or not hmac.compare_digest(expected, presented):
        raise unauthenticated("unknown terminal or bad signature")
    return Caller(terminal_id=terminal_id, merchant_id=credential.merchant_id, nonce=nonce, role=credential.role)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every unary subsidy.v1 call over the raw request bytes."""

    def __init__(
        self,
        credentials: CredentialCache,
        clock_skew_s: int,
        check_peer: Callable[[grpc.aio.ServicerContext, str, bool], None] | None = None,
    ) -> None:
        self._credentials = credentials
        self._clock_skew_s = clock_skew_s
        self._check_peer = check_peer

    async def _transport_check(self, identity: Caller, context: grpc.aio.ServicerContext) -> None:
        """Once the signing credential is resolved: the connection's client certificate must fit
        it (server.rpc.tls.ClientCertificatePolicy; raises UNAUTHENTICATED). Before the nonce is
        claimed and before the handler runs, so a refused call executes nothing."""
        if self._check_peer is not None:
            credential = await self._credentials.get(identity.terminal_id)
            required = credential is not None and credential.require_client_certificate
            self._check_peer(context, identity.terminal_id, required)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(PROTECTED_PREFIX):
            return handler
        if handler.stream_unary is not None:
            return self._stream_unary(handler, method)
        if handler.unary_stream is not None:
            return self._unary_stream(handler, method)
        if handler.unary_unary is None:
            raise RuntimeError(f"{method}: only unary and client-streaming methods are authenticated")
        behavior = handler.unary_unary
        deserialize = handler.request_deserializer

        def keep_bytes(body: bytes) -> tuple[bytes, Any]:
            # The signature covers the bytes as sent, so keep them beside the parsed message.
            # Bytes that do not parse become None and an INVALID_ARGUMENT below, not INTERNAL.
            try:
                return body, deserialize(body)
            except DecodeError:
                return body, None

        async def authenticated(request: tuple[bytes, Any], context: grpc.aio.ServicerContext) -> Any:
            body, message = request
            identity = await authenticate(self._credentials, self._clock_skew_s, method, body, _metadata(context))
            await self._transport_check(identity, context)
            await claim_operator_nonce(self._credentials, identity)
            current_caller.set(identity)
            if message is None:
                raise invalid_field("request", "is not a valid protobuf message for this method")
            return await behavior(message, context)

        return grpc.unary_unary_rpc_method_handler(
            authenticated,
            request_deserializer=keep_bytes,
            response_serializer=handler.response_serializer,
        )

    def _stream_unary(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """Client-streaming calls: the metadata is sent before any message, so the signature
        covers the method, caller, time and nonce with the SHA-256 of empty bytes as the body;
        the stream's content is protected by TLS, not by the signature."""
        behavior = handler.stream_unary

        async def authenticated(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            identity = await authenticate(self._credentials, self._clock_skew_s, method, b"", _metadata(context))
            await self._transport_check(identity, context)
            await claim_operator_nonce(self._credentials, identity)
            current_caller.set(identity)
            return await behavior(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            authenticated,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary_stream(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """Server-streaming calls (a daily report's rows): one request, signed over its bytes
        exactly as a unary call; the handler is an async generator of responses."""
        behavior = handler.unary_stream
        deserialize = handler.request_deserializer

        def keep_bytes(body: bytes) -> tuple[bytes, Any]:
            try:
                return body, deserialize(body)
            except DecodeError:
                return body, None

        async def authenticated(request: tuple[bytes, Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            body, message = request
            identity = await authenticate(self._credentials, self._clock_skew_s, method, body, _metadata(context))
            await self._transport_check(identity, context)
            await claim_operator_nonce(self._credentials, identity)
            current_caller.set(identity)
            if message is None:
                raise invalid_field("request", "is not a valid protobuf message for this method")
            async for response in behavior(message, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            authenticated,
            request_deserializer=keep_bytes,
            response_serializer=handler.response_serializer,
        )
