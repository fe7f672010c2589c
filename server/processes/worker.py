"""One worker process: its own event loop (uvloop unless disabled), pools and server.

Kept apart from the parent (server/processes/gateway.py, run as ``python -m server``) so that
spawned worker processes import only what a worker needs, by name.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from server import logs
from server.config import Config
from server.processes.app import create_server

log = logging.getLogger("subsidy.worker")


async def serve(config: Config) -> None:
    application = await create_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if application.certificates is not None:
        # SIGHUP: re-read the TLS certificate files now (they are also re-read when they change).
        loop.add_signal_handler(signal.SIGHUP, application.certificates.request_reload)
    await application.start()
    # What start-up built (modules, protobuf descriptors, grpc, the caches) lives as long as the
    # process: moved out of the collector's generations, the full collections that would trace
    # it again and again never do (issue 15; measured in make bench's structure scenario).
    gc.collect()
    gc.freeze()
    await stop.wait()
    log.info("shutting down")
    await application.stop()


def run_worker(config: Config) -> None:
    logs.configure(config.log_level)
    if config.use_uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config))
    else:
        asyncio.run(serve(config))
