"""Each method handler is wrapped once, at registration (server/rpc/handlers.py, issue 15), not
per call as the grpc.aio interceptors it replaced did: what grpc.aio is handed per call is the
same object every time, subsidy.v1 methods get the deserializer that keeps the signed bytes,
and a method nothing serves is neither answered nor remembered. What the wrappers do per call
(authentication, error statuses, metrics, spans) is proven through a real gateway by the
integration tests (test_hostile_input, test_hardening, test_gateway_metrics, test_tracing, ...)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from subsidy_client.v1 import diagnostics_pb2, diagnostics_pb2_grpc

from server.rpc.auth import Authenticator
from server.rpc.handlers import GuardedServer
from server.services.diagnostics import DiagnosticsService
from storage.redis.credentials import CredentialCache
from storage.redis.keys import Keys

ECHO = "/subsidy.v1.DiagnosticsService/Echo"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class Registrations:
    """Stands in for grpc.aio.Server: records what is registered with it (nothing is served)."""

    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        self.registered.update({f"/{service}/{name}": handler for name, handler in handlers.items()})


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def guarded() -> tuple[GuardedServer, Registrations]:
    server = Registrations()
    # The credential cache is never asked here: no call is made.
    authenticator = Authenticator(CredentialCache(None, Keys("unit")), 300)  # type: ignore[arg-type]
    return GuardedServer(server, authenticator), server


def test_a_registered_method_is_wrapped_once_and_keeps_the_signed_bytes() -> None:
    guard, server = guarded()
    diagnostics_pb2_grpc.add_DiagnosticsServiceServicer_to_server(DiagnosticsService(), guard)
    assert server.generic == [guard]  # the one generic handler of the server: no per-service list
    first = guard.service(Details(ECHO))
    assert first is not None
    assert guard.service(Details(ECHO)) is first  # no new handler, no new closure per call
    # Served through the one generic handler only: grpc.aio's registered methods cost CPU per
    # call in proportion to how many there are (server/rpc/handlers.py).
    assert server.registered == {}
    body = diagnostics_pb2.EchoRequest(payload=b"\x00\xff").SerializeToString()
    kept, message = first.request_deserializer(body)
    assert kept == body and message == diagnostics_pb2.EchoRequest(payload=b"\x00\xff")
    # Bytes that do not parse are kept too, for an INVALID_ARGUMENT after authentication.
    assert first.request_deserializer(b"\xff\xff\xff") == (b"\xff\xff\xff", None)
    assert first.unary_unary is not DiagnosticsService.Echo


def test_a_service_registered_only_generically_is_wrapped_on_first_call_then_kept() -> None:
    guard, _ = guarded()
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), guard)
    first = guard.service(Details(HEALTH_CHECK))
    assert first is not None and first.request_deserializer is not None
    # Not a subsidy.v1 method: unauthenticated, its own deserializer (no kept bytes).
    assert not isinstance(first.request_deserializer(b""), tuple)
    assert guard.service(Details(HEALTH_CHECK)) is first


def test_a_method_nothing_serves_is_not_answered_nor_remembered() -> None:
    guard, _ = guarded()
    diagnostics_pb2_grpc.add_DiagnosticsServiceServicer_to_server(DiagnosticsService(), guard)
    for index in range(3):
        assert guard.service(Details(f"/subsidy.v1.DiagnosticsService/Made{index}")) is None
    assert set(guard._handlers) == {ECHO}


def test_a_bidirectional_subsidy_method_is_refused_at_registration_not_left_unauthenticated() -> None:
    guard, _ = guarded()

    async def chat(requests: Any, context: Any) -> Any:
        yield None

    handler = grpc.stream_stream_rpc_method_handler(chat)
    with pytest.raises(RuntimeError, match="authenticated"):
        guard.add_registered_method_handlers("subsidy.v1.Chat", {"Talk": handler})
    # Outside subsidy.v1 (grpc reflection), a bidirectional stream is left as it is.
    guard.add_registered_method_handlers("grpc.reflection.v1alpha.ServerReflection", {"Info": handler})
    assert guard.service(Details("/grpc.reflection.v1alpha.ServerReflection/Info")) is handler
