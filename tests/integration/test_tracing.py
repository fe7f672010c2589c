"""Optional OpenTelemetry tracing of the gRPC server (SUBSIDY_TRACING; server/processes/tracing.py):
on, every call's span reaches a real OTLP/gRPC receiver (the collector's TraceService from
opentelemetry-proto, served here) with what happened and nothing personal; off, the gateway
does not even import the tracing SDK."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy
from subsidy_client.errors import InvalidArgument
from subsidy_client.v1 import diagnostics_pb2, diagnostics_pb2_grpc

from tests.conftest import ROOT, Environment, consumer_key, id_number, running_gateway, serial
from tests.integration.test_qualifications import XIAOSHAN_GOVERNMENT, now_ms, wgs84

AUTHORIZE = "subsidy.v1.AuthorizationService/Authorize"
CLAIM = "subsidy.v1.QualificationService/ClaimQualification"
ECHO = "subsidy.v1.DiagnosticsService/Echo"
# What a span may say about a call: nothing else is allowed in, so nothing personal can be.
ALLOWED_ATTRIBUTES = {
    "rpc.system",
    "rpc.service",
    "rpc.method",
    "rpc.grpc.status_code",
    "subsidy.error_reason",
    "subsidy.decision",
    "subsidy.decline_reason",
}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every export request it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[Any]:
        return [
            span
            for request in self.requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]


@asynccontextmanager
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, port
    finally:
        await server.stop(0)


def attributes(span: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for attribute in span.attributes:
        value = attribute.value
        found[attribute.key] = value.int_value if value.HasField("int_value") else value.string_value
    return found


async def test_each_call_has_a_span_at_the_otlp_collector_with_nothing_personal(environment: Environment) -> None:
    """Approved, declined and invalid Authorize calls, a claim carrying an ID and a phone number,
    and an unauthenticated Echo carrying a caller's traceparent: each one SERVER span at the
    collector once the gateway stops (the batch is flushed), named by method, with its status
    code, ErrorInfo reason and decision; the Echo's span continues the caller's trace; no
    attribute outside the allowed few, and no consumer key, ID number, phone number or secret
    anywhere in what was exported."""
    person, phone, key = id_number(), "13812345678", consumer_key()
    async with collector() as (receiver, port):
        config = environment.config(tracing="otlp", tracing_endpoint=f"http://127.0.0.1:{port}")
        async with running_gateway(config) as gateway:
            target = f"127.0.0.1:{gateway.port}"
            terminal = AuthorizationClient(
                target, "t-main-01", environment.credentials["t-main-01"], retry=RetryPolicy(1)
            )
            wallet = QualificationClient(
                target, "p-wallet-01", environment.credentials["p-wallet-01"], retry=RetryPolicy(1)
            )
            try:
                approved = await terminal.authorize(
                    campaign_id="c-main", consumer_key=key, lines=[Line("1", "6970000000017", 300_000, serial())]
                )
                declined = await terminal.authorize(
                    campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", "6970000000109", 1)]
                )
                with pytest.raises(InvalidArgument):
                    await terminal.authorize(campaign_id="c-main", consumer_key="nope", lines=[Line("1", "1", 1)])
                await wallet.claim(
                    campaign_id="c-qual",
                    category="general",
                    id_number=person,
                    location=wgs84(XIAOSHAN_GOVERNMENT),
                    fix_time_ms=now_ms(),
                    phone_number=phone,
                )
            finally:
                await terminal.close()
                await wallet.close()
            async with grpc.aio.insecure_channel(target) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await diagnostics_pb2_grpc.DiagnosticsServiceStub(channel).Echo(
                        diagnostics_pb2.EchoRequest(),
                        metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),),
                        timeout=5,
                    )
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        spans = receiver.spans()

    assert approved.decision == 1 and declined.decision == 2
    by_name: dict[str, list[Any]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert len(by_name[AUTHORIZE]) == 3 and len(by_name[CLAIM]) == 1 and len(by_name[ECHO]) == 1, sorted(by_name)
    assert all(span.kind == span.SPAN_KIND_SERVER for span in spans)
    approved_span, declined_span, invalid_span = (attributes(span) for span in by_name[AUTHORIZE])
    assert approved_span == {
        "rpc.system": "grpc",
        "rpc.service": "subsidy.v1.AuthorizationService",
        "rpc.method": "Authorize",
        "rpc.grpc.status_code": 0,
        "subsidy.decision": "DECISION_APPROVED",
    }
    assert declined_span["subsidy.decline_reason"] == "DECLINE_REASON_PRODUCT_NOT_ELIGIBLE"
    assert invalid_span["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert invalid_span["subsidy.error_reason"] == "INVALID_FIELD"
    assert attributes(by_name[CLAIM][0])["rpc.grpc.status_code"] == 0
    echo = by_name[ECHO][0]
    assert attributes(echo)["subsidy.error_reason"] == "UNAUTHENTICATED"
    assert echo.trace_id.hex() == TRACE_ID and echo.parent_span_id.hex() == PARENT_SPAN_ID
    assert {key for span in spans for key in attributes(span)} <= ALLOWED_ATTRIBUTES
    exported = b"".join(request.SerializeToString() for request in receiver.requests)
    for secret in (person, phone, key, environment.credentials["t-main-01"], environment.credentials["p-wallet-01"]):
        assert secret.encode() not in exported


IMPORTS_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from server.config import Config
    from server.processes.app import create_server
    from subsidy_client import AuthorizationClient, Line, RetryPolicy

    async def main():
        config = Config.from_env()
        application = await create_server(config)
        await application.start()
        client = AuthorizationClient(
            f"127.0.0.1:{application.port}", "t-main-01", sys.argv[1], retry=RetryPolicy(1)
        )
        try:
            await client.authorize(
                campaign_id="c-main", consumer_key="ab" * 32, lines=[Line("1", "6970000000109", 1)]
            )
        finally:
            await client.close()
            await application.stop()
        tracing = sorted(
            name for name in sys.modules
            if name.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter", "opentelemetry.propagat"))
            or name == "server.processes.tracing"
        )
        print("MODULES " + json.dumps(tracing))

    asyncio.run(main())
    """
)


def loaded_tracing_modules(environment: Environment, tracing: str) -> list[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SUBSIDY_")} | {
        "SUBSIDY_LISTEN": "127.0.0.1:0",
        "SUBSIDY_PG_DSN": environment.pg_dsn,
        "SUBSIDY_REDIS_URL": environment.redis_url,
        "SUBSIDY_REDIS_PREFIX": environment.prefix,
        "SUBSIDY_SWEEP_INTERVAL_MS": "3600000",
        "SUBSIDY_LOG_LEVEL": "WARNING",
        "SUBSIDY_TRACING": tracing,
    }
    completed = subprocess.run(
        [sys.executable, "-c", IMPORTS_SCRIPT, environment.credentials["t-main-01"]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("MODULES "))
    modules: list[str] = json.loads(line.removeprefix("MODULES "))
    return modules


async def test_with_tracing_off_the_gateway_imports_no_tracing_sdk(environment: Environment) -> None:
    """A gateway process with SUBSIDY_TRACING unset serves an Authorize without importing the
    tracing SDK, an exporter, a propagator or server/processes/tracing.py (redis-py imports
    OpenTelemetry's metrics API when it is installed: that is redis-py's, and is not checked
    here); with SUBSIDY_TRACING=console the same script does import them, so the check can
    fail."""
    off, on = await asyncio.gather(
        asyncio.to_thread(loaded_tracing_modules, environment, "off"),
        asyncio.to_thread(loaded_tracing_modules, environment, "console"),
    )
    assert off == []
    assert "server.processes.tracing" in on and "opentelemetry.sdk.trace" in on
