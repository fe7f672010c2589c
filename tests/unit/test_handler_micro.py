"""benchmarks/handler_micro.py still drives the gateway's real wrapped handlers: a signed
Authorize is authenticated, validated and answered APPROVED from the canned script reply, a
signed Echo echoes, and a call with a bad signature is refused (so the harness measures the
authenticated path, not an early failure)."""

from __future__ import annotations

import asyncio

import pytest
from subsidy_client import signing
from subsidy_client.v1 import authorization_pb2, diagnostics_pb2

from benchmarks import handler_micro


def call(method: str, secret: str = handler_micro.SECRET) -> object:
    guarded = handler_micro.handlers()
    handler = guarded.service(handler_micro._Details(method))
    assert handler is not None and handler.request_deserializer is not None
    body = handler_micro.request_bytes(method)
    context = handler_micro.Context(signing.signed_metadata(secret, method, handler_micro.TERMINAL, body))
    return asyncio.run(handler.unary_unary(handler.request_deserializer(body), context))


def test_authorize_is_approved_and_echo_echoes() -> None:
    response = call(handler_micro.AUTHORIZE)
    assert isinstance(response, authorization_pb2.AuthorizeResponse)
    assert response.decision == authorization_pb2.DECISION_APPROVED and response.subsidy_fen == 60_000
    echoed = call(handler_micro.ECHO)
    assert isinstance(echoed, diagnostics_pb2.EchoResponse) and echoed.payload == b"x" * 150


def test_a_bad_signature_is_refused() -> None:
    with pytest.raises(RuntimeError, match="the call failed"):
        call(handler_micro.ECHO, secret="t" * 64)


def test_a_measurement_is_a_positive_cpu_time_per_call() -> None:
    results = asyncio.run(handler_micro.run(calls=64, rounds=1))
    assert set(results) == {"Authorize", "Echo"} and all(value > 0 for value in results.values())
