"""An OTLP/gRPC trace receiver for the tracing scenario: ``python -m benchmarks.otlp_sink --port N``.

It answers OpenTelemetry's collector ``TraceService/Export`` (opentelemetry-proto) and only
counts what it is sent, so the traced gateway exports to a real endpoint over a real gRPC
channel, as it would to a collector, at the cost of no more than decoding. On SIGTERM it prints
``spans N requests M`` and exits; the bench reads that line from its log.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self.requests = 0

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests += 1
        self.spans += sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def serve(port: int) -> None:
    sink = Sink()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("serving", flush=True)
    await stop.wait()
    await server.stop(1)
    print(f"spans {sink.spans} requests {sink.requests}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.otlp_sink", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
