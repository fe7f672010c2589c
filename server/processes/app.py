"""The application factory: ``create_server(config)`` builds a started-but-not-serving-yet
gRPC server with its services (each method handler wrapped once with authentication and the
error guard: server/rpc/handlers.py) and background tasks; ``Application.stop``
drains it. ``server.processes.worker`` runs one per worker process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from subsidy_client.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    blocklist_pb2,
    blocklist_pb2_grpc,
    campaign_pb2,
    campaign_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    complaints_pb2,
    complaints_pb2_grpc,
    credentials_pb2,
    credentials_pb2_grpc,
    daily_report_pb2,
    daily_report_pb2_grpc,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    exchange_pb2,
    exchange_pb2_grpc,
    merchant_pb2,
    merchant_pb2_grpc,
    qualification_pb2,
    qualification_pb2_grpc,
    reconciliation_pb2,
    reconciliation_pb2_grpc,
    reporting_pb2,
    reporting_pb2_grpc,
    risk_pb2,
    risk_pb2_grpc,
    supervision_pb2,
    supervision_pb2_grpc,
)

from server.config import Config
from server.domain.complaints import SlaPolicy
from server.domain.daily_report import BusinessCalendar
from server.processes.alert_watch import funds_poller
from server.processes.http import HttpEndpoint, serve_gateway_metrics
from server.processes.sweeper import run_sweeper
from server.rpc.auth import Authenticator
from server.rpc.handlers import GuardedServer
from server.rpc.tls import CertificateReloader, ClientCertificatePolicy, bind, check_listeners
from server.services.authorization import AuthorizationService
from server.services.blocklist import BlockListService
from server.services.campaigns import CampaignService
from server.services.catalog import CatalogService
from server.services.complaints import ComplaintService, DailyLimits
from server.services.credentials import CredentialService
from server.services.daily_reports import DailyReportService
from server.services.diagnostics import DiagnosticsService
from server.services.exchange import ExchangeService
from server.services.merchants import MerchantService
from server.services.operations import OperatorDeps
from server.services.qualification import QualificationService
from server.services.reconciliation import ReconciliationService
from server.services.reporting import ReportingService
from server.services.risk_cases import RiskCaseService
from server.services.supervision import FundsPoller, SupervisionService
from storage.postgres.pool import LazyPool
from storage.redis.budget import BudgetReader
from storage.redis.credentials import CredentialCache
from storage.redis.keys import Keys
from storage.redis.lean import LeanRedis
from storage.redis.migrations import migrate_issued_counts, migrate_serial_keys
from storage.redis.scripts import Scripts
from storage.redis.store import RedisStore, StoreLimits

if TYPE_CHECKING:
    from server.processes.tracing import CallSpans

log = logging.getLogger("subsidy.app")
SERVICE_NAMES = (
    authorization_pb2.DESCRIPTOR.services_by_name["AuthorizationService"].full_name,
    diagnostics_pb2.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name,
    reporting_pb2.DESCRIPTOR.services_by_name["ReportingService"].full_name,
    daily_report_pb2.DESCRIPTOR.services_by_name["DailyReportService"].full_name,
    reconciliation_pb2.DESCRIPTOR.services_by_name["ReconciliationService"].full_name,
    campaign_pb2.DESCRIPTOR.services_by_name["CampaignService"].full_name,
    catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name,
    merchant_pb2.DESCRIPTOR.services_by_name["MerchantService"].full_name,
    credentials_pb2.DESCRIPTOR.services_by_name["CredentialService"].full_name,
    qualification_pb2.DESCRIPTOR.services_by_name["QualificationService"].full_name,
    exchange_pb2.DESCRIPTOR.services_by_name["ExchangeService"].full_name,
    complaints_pb2.DESCRIPTOR.services_by_name["ComplaintService"].full_name,
    risk_pb2.DESCRIPTOR.services_by_name["RiskCaseService"].full_name,
    blocklist_pb2.DESCRIPTOR.services_by_name["BlockListService"].full_name,
    supervision_pb2.DESCRIPTOR.services_by_name["SupervisionService"].full_name,
)


@dataclass
class Application:
    server: grpc.aio.Server
    port: int
    redis: Redis
    store: RedisStore
    health: health_async.HealthServicer
    config: Config
    operator_pool: LazyPool
    # The mutual-TLS listener's port (SUBSIDY_MTLS_LISTEN, else 0) and the certificate files'
    # reloader (None without TLS; SIGHUP calls its request_reload).
    mtls_port: int = 0
    certificates: CertificateReloader | None = None
    # The /metrics and /health endpoint (SUBSIDY_METRICS_LISTEN; None when not served here).
    metrics: HttpEndpoint | None = None
    # The spans of SUBSIDY_TRACING (None when off: server/processes/tracing.py is not imported).
    spans: CallSpans | None = None
    # The live supervision poller (runs only while WatchFunds streams are open).
    poller: FundsPoller | None = None
    # The money path's lean Redis client (None with SUBSIDY_REDIS_CLIENT=redis-py or TLS).
    lean: LeanRedis | None = None
    # The services registered (set SERVING by start): all of them on one Redis, fewer on a
    # cluster (server/processes/sharded_app.py); and what else stop must close.
    service_names: tuple[str, ...] = SERVICE_NAMES
    closing: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.server.start()
        for name in (*self.service_names, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_listen:
            self.metrics = serve_gateway_metrics(self.config, REGISTRY, lambda: not self.stopping.is_set())
        log.info("serving", extra={"port": self.port})

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING first (load balancers move away), then drain in-flight
        calls for up to the grace period, then stop background tasks and close the pool."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.shutdown_grace_s)
        self.stopping.set()
        if self.metrics is not None:
            self.metrics.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.poller is not None:
            await self.poller.stop()
        await self.operator_pool.close()
        if self.lean is not None:
            await self.lean.aclose()
        for close in self.closing:
            await close()
        await self.redis.aclose()
        if self.spans is not None:
            await asyncio.to_thread(self.spans.shutdown)
        log.info("stopped")


def store_limits(config: Config) -> StoreLimits:
    return StoreLimits(
        hold_ttl_s=config.hold_ttl_s,
        idempotency_ttl_s=config.idempotency_ttl_s,
        # Twice the accepted skew (a timestamp can be early or late), plus a margin for the
        # clocks of the gateway and Redis differing.
        nonce_ttl_s=2 * config.auth_clock_skew_s + 60,
        # The programme day of per-merchant daily limits: the daily reports' business day.
        programme_timezone=config.report_timezone,
    )


def guarded_server(
    config: Config, credentials: CredentialCache, spans: CallSpans | None
) -> tuple[grpc.aio.Server, GuardedServer]:
    """The grpc.aio server and the registrar every service goes through: no grpc.aio interceptors
    (each costs an async pipeline and a re-wrapped handler per call), each handler wrapped once
    with authentication and the error guard (server/rpc/handlers.py)."""
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            # gRPC core cancels calls queued beyond 1,000 (soft) waiting for the application to
            # pick them up, which a flash crowd reaches at once; queue more, still bounded.
            ("grpc.server.max_pending_requests", config.max_pending_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", 2 * config.max_pending_rpcs),
        ],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    authenticator = Authenticator(credentials, config.auth_clock_skew_s, ClientCertificatePolicy.from_config(config))
    return grpc_server, GuardedServer(grpc_server, authenticator, spans)


async def create_server(config: Config) -> Application:
    if config.redis_shards:
        # A Redis Cluster deployment: the sale path in consumer shards (issue 16).
        from server.processes.sharded_app import create_sharded_server

        return await create_sharded_server(config)
    check_listeners(config)
    spans: CallSpans | None = None
    if config.tracing != "off":
        from server.processes.tracing import call_spans  # only then: off imports no tracing SDK

        spans = call_spans(config)
    # A bounded pool that queues callers for a free connection (for at most the Redis timeout)
    # rather than failing at once when a burst exceeds it.
    pool = BlockingConnectionPool.from_url(
        config.redis_url,
        max_connections=config.redis_pool_size,
        timeout=config.redis_timeout_s,
        socket_timeout=config.redis_timeout_s,
        socket_connect_timeout=config.redis_timeout_s,
        # A call that finds its connection closed by the server (a Redis restart, CLIENT KILL,
        # an idle timeout) is retried once on a fresh connection: every script is idempotent by
        # request_id, so a second attempt never acts twice (at worst its nonce is refused and the
        # client re-signs). A connection idle for 30 s is PINGed before use (not every call: the
        # hot path stays one round trip).
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis_errors.ConnectionError],
        client_name=config.redis_client_name,
    )
    redis = Redis(connection_pool=pool)
    # The money path's script calls: the lean pipelined client unless SUBSIDY_REDIS_CLIENT
    # says redis-py or the URL needs what it lacks (TLS): storage/redis/lean.py.
    lean = (
        LeanRedis.from_url(
            config.redis_url,
            client_name=config.redis_client_name,
            timeout_s=config.redis_timeout_s,
            max_in_flight=config.redis_pool_size,
        )
        if config.redis_client == "lean"
        else None
    )
    try:
        keys = Keys(config.redis_prefix)
        scripts = Scripts(redis, lean)
        await scripts.preload()
        await migrate_serial_keys(redis, keys)
        await migrate_issued_counts(redis, keys)
        store = RedisStore(
            redis,
            keys,
            scripts,
            store_limits(config),
        )
        credentials = CredentialCache(redis, keys, nonce_ttl_s=store.nonce_ttl_s)
        await credentials.refresh()
        grpc_server, server = guarded_server(config, credentials, spans)
        authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(
            AuthorizationService(store, config.max_lines, config.programme_key), server
        )
        diagnostics_pb2_grpc.add_DiagnosticsServiceServicer_to_server(DiagnosticsService(), server)
        operator_pool = LazyPool(config.pg_dsn)
        deps = OperatorDeps(operator_pool, store)
        reporting_pb2_grpc.add_ReportingServiceServicer_to_server(ReportingService(deps), server)
        reconciliation_pb2_grpc.add_ReconciliationServiceServicer_to_server(
            ReconciliationService(deps, BusinessCalendar(config.report_timezone, config.report_cutoff)), server
        )
        daily_report_pb2_grpc.add_DailyReportServiceServicer_to_server(
            DailyReportService(deps, BusinessCalendar(config.report_timezone, config.report_cutoff)), server
        )
        campaign_pb2_grpc.add_CampaignServiceServicer_to_server(CampaignService(deps), server)
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server(CatalogService(deps), server)
        merchant_pb2_grpc.add_MerchantServiceServicer_to_server(MerchantService(deps), server)
        credentials_pb2_grpc.add_CredentialServiceServicer_to_server(CredentialService(deps), server)
        qualification_pb2_grpc.add_QualificationServiceServicer_to_server(
            QualificationService(store, config.programme_key, config.local_data_key), server
        )
        exchange_pb2_grpc.add_ExchangeServiceServicer_to_server(ExchangeService(store, operator_pool), server)
        risk_pb2_grpc.add_RiskCaseServiceServicer_to_server(RiskCaseService(deps), server)
        blocklist_pb2_grpc.add_BlockListServiceServicer_to_server(BlockListService(deps), server)
        complaints_pb2_grpc.add_ComplaintServiceServicer_to_server(
            ComplaintService(
                deps,
                SlaPolicy(
                    config.ticket_first_reply_business_days,
                    config.ticket_resolution_business_days,
                    config.report_timezone,
                ),
                DailyLimits(config.ticket_daily_limit_per_consumer, config.ticket_daily_limit_per_merchant),
                config.programme_key,
                config.local_data_key,
                config.max_lines,
            ),
            server,
        )
        poller = funds_poller(config, BudgetReader(redis, keys), operator_pool)
        supervision_pb2_grpc.add_SupervisionServiceServicer_to_server(
            SupervisionService(poller, operator_pool, BusinessCalendar(config.report_timezone, config.report_cutoff)),
            server,
        )
        health_servicer = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in (*SERVICE_NAMES, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # On the grpc.aio server itself: it picks its asyncio servicer by the server's type, and a
        # bidirectional stream is neither authenticated nor counted (as before).
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server)
        listeners = bind(grpc_server, config)
    except (Exception, asyncio.CancelledError):
        if lean is not None:
            await lean.aclose()
        await redis.aclose()
        if spans is not None:
            spans.shutdown()
        raise
    application = Application(
        grpc_server,
        listeners.port,
        redis,
        store,
        health_servicer,
        config,
        operator_pool,
        mtls_port=listeners.mtls_port,
        certificates=listeners.reloader,
        spans=spans,
        poller=poller,
        lean=lean,
    )
    application.tasks.append(asyncio.create_task(run_sweeper(store, config, application.stopping)))
    application.tasks.append(
        asyncio.create_task(credentials.run_refresher(config.credentials_refresh_ms, application.stopping))
    )
    return application
