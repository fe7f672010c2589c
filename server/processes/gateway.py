"""Runs the gateway: ``python -m server`` (configuration from SUBSIDY_* variables).

With SUBSIDY_WORKERS > 1 the parent starts that many worker processes, each with its own
event loop and pools, all bound to the same port through SO_REUSEPORT (the kernel spreads
connections across them). SIGTERM or SIGINT to the parent is forwarded; each worker stops
gracefully (health NOT_SERVING, drain, close pools).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from server import logs
from server.config import Config, ConfigError
from server.processes.http import serve_gateway_metrics
from server.processes.worker import run_worker
from server.rpc.tls import check_listeners

log = logging.getLogger("subsidy.main")


def run_workers(config: Config) -> int:
    context = multiprocessing.get_context("spawn")
    endpoint, metrics_dir = None, None
    if config.metrics_listen:
        # prometheus_client's multiprocess mode: each worker (a fresh interpreter, which reads
        # this variable when it imports prometheus_client) writes its values to files here, and
        # this parent serves them all on one endpoint.
        metrics_dir = tempfile.mkdtemp(prefix="subsidy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        endpoint = serve_gateway_metrics(config, registry, lambda: True)
    worker_config = dataclasses.replace(config, metrics_listen="")
    workers = [
        context.Process(target=run_worker, args=(worker_config,), name=f"worker-{index}")
        for index in range(config.workers)
    ]
    for worker in workers:
        worker.start()

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if config.tls_cert:
        signal.signal(signal.SIGHUP, forward)  # each worker re-reads its TLS certificate files
    failed = 0
    for worker in workers:
        worker.join()
        failed += worker.exitcode != 0
    if endpoint is not None and metrics_dir is not None:
        endpoint.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if failed else 0


def main() -> int:
    try:
        config = Config.from_env()
        check_listeners(config)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    if config.workers == 1:
        run_worker(config)
        return 0
    log.info("starting workers", extra={"workers": config.workers, "listen": config.listen})
    return run_workers(config)


if __name__ == "__main__":
    sys.exit(main())
