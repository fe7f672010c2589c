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
    # The cyclic collector's youngest generation collected every 10,000 net allocations instead
    # of 700: each collection traces the objects of the calls in flight, so 14 times fewer of
    # them trace those objects 14 times less often. Measured (issue 15) with gc.callbacks around
    # the gateway's own Authorize and Echo path, 32 calls in flight, 3 alternations: time in
    # the collector 187-218 ms -> 60-65 ms per 28,000 calls (about 5 us per call). gc.freeze()
    # after start-up was tried instead and saved nothing measurable there (55-138 ms -> 71-209
    # ms: full collections are rare; the young generations are the cost).
    gc.set_threshold(10_000, 10, 10)
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
