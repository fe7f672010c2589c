"""DiagnosticsService.Echo: the transport floor on the same stack (call guard, auth)."""

from __future__ import annotations

import grpc
from subsidy_client.v1 import diagnostics_pb2, diagnostics_pb2_grpc

from server.rpc.errors import invalid_field

ECHO_PAYLOAD_BYTES_MAX = 64 * 1024


class DiagnosticsService(diagnostics_pb2_grpc.DiagnosticsServiceServicer):
    async def Echo(
        self, request: diagnostics_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> diagnostics_pb2.EchoResponse:
        if len(request.payload) > ECHO_PAYLOAD_BYTES_MAX:
            raise invalid_field("payload", f"at most {ECHO_PAYLOAD_BYTES_MAX} bytes")
        return diagnostics_pb2.EchoResponse(payload=request.payload)
