"""Optional OpenTelemetry tracing of the gRPC server (SUBSIDY_TRACING, off by default).

Off, nothing here is imported by the gateway: ``create_server`` imports this module only when
the setting is on, and the call guard then makes no tracing call at all. On, each call gets one
SERVER span, started and ended by the call guard wrapped around every handler
(server/rpc/handlers.py) in the wrapper that already records its metrics, rather than by
opentelemetry-instrumentation-grpc's aio interceptor: that one would add an interceptor and a
proxy of the servicer context to every call, loses the status code of calls answered with
``abort_with_status`` (how every error here is answered: its context proxy only watches
``abort`` and ``set_code``), records the peer address, and records exceptions with their
messages. Spans go through a BatchSpanProcessor (a bounded queue; export on its own thread,
never on the event loop) to an OTLP/gRPC collector, or to stdout for development.

A span carries only what says what happened: ``rpc.system``, ``rpc.service``, ``rpc.method``,
``rpc.grpc.status_code``, the ErrorInfo reason of a failed call (``subsidy.error_reason``) and
an Authorize's decision and decline reason. Never a request's fields, the caller's address,
credentials or an error's message (a message can name the value of a field): no consumer key,
ID number or phone number can reach a span. A caller's W3C ``traceparent`` (gRPC metadata)
makes the span a child of the caller's, and decides sampling; without one, calls are sampled
at SUBSIDY_TRACING_SAMPLE_RATIO.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import grpc
from opentelemetry import propagate
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from subsidy_client.v1 import authorization_pb2

from server.config import Config

log = logging.getLogger("subsidy.tracing")

SERVICE_NAME = "subsidy-gateway"
# The status codes that mark a server span as an error (OpenTelemetry's semantic conventions for
# gRPC servers): the server's fault, not the caller's. A declined or invalid request is an answer.
SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})
STATUS_NUMBERS = {code.name: code.value[0] for code in grpc.StatusCode}
EXPORT_TIMEOUT_MS = 10_000
EXPORT_BATCH_SIZE_MAX = 512


class CallSpans:
    """What the call guard calls per call (server/rpc/errors.py's ``CallSpans`` protocol)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("subsidy.gateway")
        self._attributes: dict[str, dict[str, str]] = {}
        self._decisions: dict[tuple[int, int], tuple[str, str]] = {}

    def start(self, method: str, context: grpc.aio.ServicerContext) -> Any:
        attributes = self._attributes.get(method)
        if attributes is None:
            attributes = self._attributes[method] = method_attributes(method)
        parent = propagate.extract(_carrier(context.invocation_metadata()))
        return self._tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=attributes)

    def end(self, span: Any, code: str, reason: str, response: Any) -> None:
        number = STATUS_NUMBERS.get(code)
        if number is not None:
            span.set_attribute("rpc.grpc.status_code", number)
        if reason:
            span.set_attribute("subsidy.error_reason", reason)
        if code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR))
        if isinstance(response, authorization_pb2.AuthorizeResponse):
            decision, decline_reason = self._decision_names(response.decision, response.decline_reason)
            span.set_attribute("subsidy.decision", decision)
            if decline_reason:
                span.set_attribute("subsidy.decline_reason", decline_reason)
        span.end()

    def _decision_names(self, decision: int, reason: int) -> tuple[str, str]:
        names = self._decisions.get((decision, reason))
        if names is None:
            names = self._decisions[(decision, reason)] = (
                authorization_pb2.Decision.Name(decision),  # type: ignore[arg-type]
                authorization_pb2.DeclineReason.Name(reason) if reason else "",  # type: ignore[arg-type]
            )
        return names

    def shutdown(self) -> None:
        """Exports what is queued (for at most the export timeout) and stops the exporter."""
        self.provider.shutdown()


def method_attributes(method: str) -> dict[str, str]:
    """``/subsidy.v1.AuthorizationService/Authorize`` -> rpc.service and rpc.method."""
    service, _, name = method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _carrier(metadata: Any) -> Mapping[str, str]:
    """The call's text metadata (binary ``-bin`` values are bytes: no propagator reads them)."""
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def exporter_for(config: Config) -> SpanExporter:
    if config.tracing == "console":
        return ConsoleSpanExporter(service_name=SERVICE_NAME)
    # Imported only for otlp: it loads the OTLP protobufs and a gRPC channel of its own.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=config.tracing_endpoint,
        insecure=config.tracing_endpoint.startswith("http://"),
        timeout=EXPORT_TIMEOUT_MS / 1000,
    )


def call_spans(config: Config, exporter: SpanExporter | None = None) -> CallSpans:
    """The tracer of this process: its own TracerProvider (the global one is left alone, so
    tests can build several), sampling by the caller's traceparent, else by ratio, and a
    bounded batch processor in front of the exporter (``exporter`` replaces the configured
    one: the tests' in-memory exporter)."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": SERVICE_NAME}),
        sampler=ParentBased(TraceIdRatioBased(config.tracing_sample_ratio)),
    )
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter if exporter is not None else exporter_for(config),
            max_queue_size=config.tracing_queue_size,
            max_export_batch_size=min(EXPORT_BATCH_SIZE_MAX, config.tracing_queue_size),
            export_timeout_millis=EXPORT_TIMEOUT_MS,
        )
    )
    log.info(
        "tracing on",
        extra={"exporter": config.tracing, "endpoint": config.tracing_endpoint, "ratio": config.tracing_sample_ratio},
    )
    return CallSpans(provider)
