"""The processes' HTTP endpoints: ``/metrics`` (Prometheus text) and ``/health`` (JSON).

Served by prometheus_client's own machinery (its WSGI app and threading WSGI server) in a
daemon thread beside the process's event loop, over TLS when the process has a certificate (the
reloadable context of server/rpc/tls.py: a renewed certificate is used by the next connection).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from server.config import Config
from server.rpc.tls import metrics_tls

log = logging.getLogger("subsidy.http")

# What /health reports: (healthy, details); /metrics calls it first too, so that gauges read
# from Redis are fresh at every scrape. A failure answers 503 with the error's type.
Health = Callable[[], tuple[bool, dict[str, Any]]]


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape (a scraper every few seconds would fill the log)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class HttpEndpoint:
    server: ThreadingWSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_http(
    listen: str, registry: CollectorRegistry, health: Health | None, ssl_context: ssl.SSLContext | None
) -> HttpEndpoint:
    metrics_app = make_wsgi_app(registry)

    def respond(start_response: Callable[..., Any], status: str, kind: str, body: bytes) -> Iterable[bytes]:
        start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path not in ("/metrics", "/health"):
            return respond(start_response, "404 Not Found", "text/plain", b"not found\n")
        healthy: bool = True
        details: dict[str, Any] = {}
        if health is not None:
            try:
                healthy, details = health()
            except Exception as error:  # a failed probe is an answer (503), never a dead endpoint
                log.warning("health probe failed", exc_info=True)
                healthy, details = False, {"error": type(error).__name__}
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        body = orjson.dumps({"status": "ok" if healthy else "degraded", **details})
        return respond(start_response, "200 OK" if healthy else "503 Service Unavailable", "application/json", body)

    host, port = listen.rsplit(":", 1)
    server = make_server(host.strip("[]"), int(port), app, ThreadingWSGIServer, handler_class=_QuietHandler)
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name=f"http-{listen}", daemon=True)
    thread.start()
    return HttpEndpoint(server, thread)


def serve_gateway_metrics(config: Config, registry: CollectorRegistry, serving: Callable[[], bool]) -> HttpEndpoint:
    """The gateway's endpoint on SUBSIDY_METRICS_LISTEN: its metrics (server/rpc/metrics.py) and
    /health (200 while serving, 503 once shutting down)."""

    def health() -> tuple[bool, dict[str, Any]]:
        up = serving()
        return up, {"serving": up}

    return serve_http(
        config.metrics_listen, registry, health, metrics_tls(config, config.metrics_listen, "SUBSIDY_METRICS_LISTEN")
    )
