"""``python -m benchmarks.bare_echo --listen HOST:PORT``: the floor every headline is divided by.

A bare grpc.aio server: the same grpcio, the same server options and uvloop as the gateway
(server/processes/app.py, with server/config.py's defaults), and the gateway's own Echo handler
(``server.services.diagnostics.DiagnosticsService``, generated ``DiagnosticsService`` code), but
no interceptors and no authentication: the clients still sign every call, the server ignores the
metadata. It also serves grpc.health (the bench waits for SERVING, as for the gateway). One
process, its own, like the gateway's single worker.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import uvloop
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from subsidy_client.v1 import diagnostics_pb2_grpc

from server.config import Config
from server.services.diagnostics import DiagnosticsService


def server_options() -> tuple[list[tuple[str, int]], int]:
    """The gateway's grpc.aio server options at its configuration defaults."""
    pending = Config.__dataclass_fields__["max_pending_rpcs"].default
    concurrent = Config.__dataclass_fields__["max_concurrent_rpcs"].default
    assert isinstance(pending, int) and isinstance(concurrent, int)
    options = [
        ("grpc.so_reuseport", 1),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
    ]
    return options, concurrent


async def serve(listen: str) -> None:
    options, concurrent = server_options()
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=concurrent)
    diagnostics_pb2_grpc.add_DiagnosticsServiceServicer_to_server(DiagnosticsService(), server)
    health = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(listen)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_echo", description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    arguments = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(arguments.listen))


if __name__ == "__main__":
    main()
