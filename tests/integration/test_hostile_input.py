"""Malformed, hostile and unauthenticated calls: a precise status with a machine-readable
reason, and not one byte of state changed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, signing
from subsidy_client.errors import InvalidArgument, SubsidyError, Unauthenticated
from subsidy_client.v1 import authorization_pb2 as pb

from server.processes.app import Application
from tests.conftest import Environment, consumer_key, serial, snapshot

AUTHORIZE = "/subsidy.v1.AuthorizationService/Authorize"


def valid_request() -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(
        request_id=str(uuid.uuid4()),
        campaign_id="c-main",
        consumer_key=consumer_key(),
        channel=pb.CHANNEL_POS,
        lines=[pb.LineItem(line_id="1", gtin="6970000000017", unit_price_fen=300_000, serial_number=serial())],
    )


def mutate(change: Callable[[pb.AuthorizeRequest], Any]) -> pb.AuthorizeRequest:
    request = valid_request()
    change(request)
    return request


MALFORMED: list[tuple[str, pb.AuthorizeRequest, str]] = [
    ("missing request_id", mutate(lambda r: r.ClearField("request_id")), "request_id"),
    ("request_id not a UUID", mutate(lambda r: setattr(r, "request_id", "abc")), "request_id"),
    ("missing campaign", mutate(lambda r: r.ClearField("campaign_id")), "campaign_id"),
    ("campaign with spaces", mutate(lambda r: setattr(r, "campaign_id", "c main")), "campaign_id"),
    ("missing consumer", mutate(lambda r: r.ClearField("consumer_key")), "consumer_key"),
    ("raw ID as consumer", mutate(lambda r: setattr(r, "consumer_key", "33010219900101123X")), "consumer_key"),
    ("channel unspecified", mutate(lambda r: r.ClearField("channel")), "channel"),
    ("unknown channel value", mutate(lambda r: setattr(r, "channel", 77)), "channel"),
    ("no lines", mutate(lambda r: r.ClearField("lines")), "lines"),
    ("negative price", mutate(lambda r: setattr(r.lines[0], "unit_price_fen", -1)), "lines[0].unit_price_fen"),
    ("zero price", mutate(lambda r: setattr(r.lines[0], "unit_price_fen", 0)), "lines[0].unit_price_fen"),
    ("absurd price", mutate(lambda r: setattr(r.lines[0], "unit_price_fen", 2**62)), "lines[0].unit_price_fen"),
    ("bad check digit", mutate(lambda r: setattr(r.lines[0], "gtin", "6970000000018")), "lines[0].gtin"),
    ("GTIN with letters", mutate(lambda r: setattr(r.lines[0], "gtin", "69700000000AB")), "lines[0].gtin"),
    ("missing line id", mutate(lambda r: r.lines[0].ClearField("line_id")), "lines[0].line_id"),
    ("serial with spaces", mutate(lambda r: setattr(r.lines[0], "serial_number", "S N")), "lines[0].serial_number"),
    ("oversized serial", mutate(lambda r: setattr(r.lines[0], "serial_number", "S" * 65)), "lines[0].serial_number"),
    (
        "repeated line id",
        mutate(lambda r: r.lines.append(pb.LineItem(line_id="1", gtin="6970000000024", unit_price_fen=1000))),
        "lines[1].line_id",
    ),
    (
        "same device twice",
        mutate(
            lambda r: r.lines.append(
                pb.LineItem(
                    line_id="2", gtin=r.lines[0].gtin, unit_price_fen=1000, serial_number=r.lines[0].serial_number
                )
            )
        ),
        "lines[1].serial_number",
    ),
    (
        "oversized item list",
        mutate(
            lambda r: r.lines.extend(
                pb.LineItem(line_id=f"x{index}", gtin="6970000000024", unit_price_fen=1000) for index in range(20)
            )
        ),
        "lines",
    ),
]


@pytest.mark.parametrize(("name", "request_message", "field"), MALFORMED, ids=[case[0] for case in MALFORMED])
async def test_malformed_authorize_is_invalid_argument_and_changes_nothing(
    environment: Environment,
    redis: Redis,
    client: AuthorizationClient,
    name: str,
    request_message: pb.AuthorizeRequest,
    field: str,
) -> None:
    """Each malformed request: INVALID_ARGUMENT, ErrorInfo naming the field and the standard
    BadRequest with one FieldViolation for the same field, Redis untouched."""
    before = await snapshot(redis, environment.keys)
    with pytest.raises(InvalidArgument) as raised:
        await client.send_authorize(request_message)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.reason in ("INVALID_FIELD", "TOO_MANY_LINES")
    assert raised.value.metadata["field"] == field
    [(violation_field, description)] = raised.value.field_violations
    assert violation_field == field and description
    assert await snapshot(redis, environment.keys) == before


async def test_bytes_that_are_not_a_message_are_invalid_argument(
    environment: Environment, client: AuthorizationClient
) -> None:
    """Garbage on the wire (correctly signed) is INVALID_ARGUMENT, not INTERNAL."""
    body = b"\xff\xff\xff\xff\x0f garbage"
    metadata = signing.signed_metadata(environment.credentials["t-main-01"], AUTHORIZE, "t-main-01", body)
    with pytest.raises(InvalidArgument) as raised:
        await client.call_raw(AUTHORIZE, body, metadata)
    assert raised.value.metadata["field"] == "request"


def metadata_with(changes: dict[str, str | None], secret: str, body: bytes) -> list[tuple[str, str]]:
    entries = dict(signing.signed_metadata(secret, AUTHORIZE, "t-main-01", body))
    for key, value in changes.items():
        if value is None:
            entries.pop(key)
        else:
            entries[key] = value
    return list(entries.items())


@pytest.mark.parametrize(
    "changes",
    [
        {signing.SIGNATURE_HEADER: None},
        {signing.TERMINAL_HEADER: None},
        {signing.SIGNATURE_HEADER: "0" * 64},
        {signing.TERMINAL_HEADER: "t-nobody"},
        {signing.TERMINAL_HEADER: "t-other-01"},  # signed with t-main-01's secret
        {signing.TIMESTAMP_HEADER: str(int(time.time() * 1000) - 3_600_000)},
        {signing.TIMESTAMP_HEADER: "yesterday"},
        {signing.NONCE_HEADER: "short"},
    ],
    ids=[
        "no signature",
        "no terminal",
        "wrong signature",
        "unknown terminal",
        "other terminal's id",
        "stale",
        "timestamp not a number",
        "nonce too short",
    ],
)
async def test_bad_credentials_are_unauthenticated_and_change_nothing(
    environment: Environment, redis: Redis, client: AuthorizationClient, changes: dict[str, str | None]
) -> None:
    """Missing, forged, stale or borrowed credentials: UNAUTHENTICATED before any state is read."""
    body = valid_request().SerializeToString()
    before = await snapshot(redis, environment.keys)
    with pytest.raises(Unauthenticated) as raised:
        await client.call_raw(AUTHORIZE, body, metadata_with(changes, environment.credentials["t-main-01"], body))
    assert raised.value.reason == "UNAUTHENTICATED"
    assert await snapshot(redis, environment.keys) == before


async def test_a_replayed_signed_call_is_refused(environment: Environment, client: AuthorizationClient) -> None:
    """A captured call (same nonce) sent again is UNAUTHENTICATED, though its signature is valid."""
    body = valid_request().SerializeToString()
    metadata = signing.signed_metadata(environment.credentials["t-main-01"], AUTHORIZE, "t-main-01", body)
    first = pb.AuthorizeResponse.FromString(await client.call_raw(AUTHORIZE, body, metadata))
    assert first.decision == pb.DECISION_APPROVED
    with pytest.raises(Unauthenticated):
        await client.call_raw(AUTHORIZE, body, metadata)


async def test_a_body_changed_after_signing_is_refused(environment: Environment, client: AuthorizationClient) -> None:
    """The signature covers the bytes: changing the price after signing fails authentication."""
    signed = valid_request()
    metadata = signing.signed_metadata(
        environment.credentials["t-main-01"], AUTHORIZE, "t-main-01", signed.SerializeToString()
    )
    signed.lines[0].unit_price_fen = 100
    with pytest.raises(Unauthenticated):
        await client.call_raw(AUTHORIZE, signed.SerializeToString(), metadata)


async def test_lifecycle_calls_validate_their_ids(client: AuthorizationClient) -> None:
    """Capture/void/refund/get name the malformed field; an unknown id is NOT_FOUND."""
    for call in (client.capture, client.void, client.refund, client.get_authorization):
        with pytest.raises(InvalidArgument) as raised:
            await call("not-an-id")
        assert raised.value.metadata["field"] == "authorization_id"
    with pytest.raises(SubsidyError) as missing:
        await client.capture("0" * 32)
    assert missing.value.reason == "AUTHORIZATION_NOT_FOUND"
    with pytest.raises(InvalidArgument) as bad_request_id:
        await client.capture("0" * 32, request_id="nope")
    assert bad_request_id.value.metadata["field"] == "request_id"


async def test_health_and_reflection_answer_without_credentials(gateway: Application) -> None:
    """Load balancers and grpcurl-style tools need no terminal credential."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "subsidy.v1.AuthorizationService"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for response in reflection.ServerReflectionInfo(iter([request])):
            names = {service.name for service in response.list_services_response.service}
            assert {
                "subsidy.v1.AuthorizationService",
                "subsidy.v1.DiagnosticsService",
                "grpc.health.v1.Health",
            } <= names
            break
