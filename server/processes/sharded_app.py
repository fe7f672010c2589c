"""The gateway on a Redis Cluster (issue 16, docs/scale-out.md 2.0): ``create_server`` builds this
one instead when SUBSIDY_REDIS_CLUSTER_NODES and SUBSIDY_REDIS_SHARDS are set.

What it serves: AuthorizationService (Authorize, Capture, Void, Refund, GetAuthorization) and
QualificationService (Claim, Get, List, Cancel) over ``ShardedStore``, each sale and claim in its
consumer's shard (a sale by redemption code alone in the code's, which is its owner's) and every
answer acknowledged by a replica (``AcknowledgedScripts``, WAIT 1); a device serial is reserved
in its home shard first (storage/redis/cluster/serials.py). For the bureau, whatever the
deployment: DailyReportService and ReconciliationService, whose RPCs use only PostgreSQL (the
ledger the writer drains from every shard); SupervisionService, its live fund view
(``WatchFunds``) over every shard's budget and quota counts summed (storage/redis/budget.py
``ShardedBudgetReader``), ListAlerts and GetTodayFigures from PostgreSQL. Diagnostics, health and
reflection; the hold and qualification sweepers of every shard, and the keeper that funds
released tranches and quota and rebalances short shards (keeper.py).
Credentials and roles come from the deployment's own keys on the cluster, as the reference
publication (``subsidyctl reference load`` with the same settings: ``publish_to_shards``, the
shard budget's funding and the plans the keeper reads) writes them: an operator or government
credential is what it is on one Redis.

What it does not serve yet: the campaign, catalog, merchant, credential, block list, reporting,
exchange, complaint and risk case services. They read or publish through one Redis's keys (the
reference data, the block list, the authorization and qualification records, the exchange and
complaint keys), which a cluster deployment holds per shard or not at all; a call to them is
answered UNIMPLEMENTED by gRPC itself (unregistered), rather than served from keys no sale reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from functools import partial

from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from subsidy_client.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    daily_report_pb2,
    daily_report_pb2_grpc,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    qualification_pb2,
    qualification_pb2_grpc,
    reconciliation_pb2,
    reconciliation_pb2_grpc,
    supervision_pb2,
    supervision_pb2_grpc,
)

from server.config import Config, ConfigError, cluster_nodes
from server.domain.daily_report import BusinessCalendar
from server.processes.alert_watch import funds_poller
from server.processes.app import Application, guarded_server, store_limits
from server.processes.sweeper import Step, expiring, sweep_forever
from server.rpc.tls import bind, check_listeners
from server.services.authorization import AuthorizationService
from server.services.daily_reports import DailyReportService
from server.services.diagnostics import DiagnosticsService
from server.services.operations import OperatorDeps
from server.services.qualification import QualificationService
from server.services.reconciliation import ReconciliationService
from server.services.supervision import SupervisionService
from storage.postgres.pool import LazyPool
from storage.redis.budget import ShardedBudgetReader
from storage.redis.cluster.keeper import keep
from storage.redis.cluster.nodes import cluster_client
from storage.redis.cluster.serials import SerialRegistry
from storage.redis.cluster.shard_budget import ShardBudget
from storage.redis.cluster.shards import AcknowledgedScripts, ShardedStore, ShardLayout
from storage.redis.credentials import CredentialCache
from storage.redis.store import RedisStore

log = logging.getLogger("subsidy.app")
SHARDED_SERVICE_NAMES = (
    authorization_pb2.DESCRIPTOR.services_by_name["AuthorizationService"].full_name,
    diagnostics_pb2.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name,
    qualification_pb2.DESCRIPTOR.services_by_name["QualificationService"].full_name,
    daily_report_pb2.DESCRIPTOR.services_by_name["DailyReportService"].full_name,
    reconciliation_pb2.DESCRIPTOR.services_by_name["ReconciliationService"].full_name,
    supervision_pb2.DESCRIPTOR.services_by_name["SupervisionService"].full_name,
)


def postgres_only(pool: LazyPool) -> OperatorDeps:
    """The dependencies of a service whose RPCs use only PostgreSQL (``deps.pool``): no Redis
    store at all, so that a later change reaching for one Redis's keys fails loudly (INTERNAL)
    on a cluster rather than reading keys a cluster deployment does not have."""
    return OperatorDeps(pool, None)  # type: ignore[arg-type]


def shard_sweeps(store: ShardedStore, budget: ShardBudget, config: Config) -> list[list[Step]]:
    """The background loops, each run as its own task: one per shard expiring its due holds
    (that shard's expiry script; concurrent gateways are safe as on one Redis), and one keeping
    the shards funded and balanced (storage/redis/cluster/keeper.py).

    Separate loops because a shard whose slot is lost (its primary and replicas down, or mid
    failover) makes every call there wait out a deadline (5 s for a script, 30 s for the
    keeper's escrow steps): in one loop that would delay, or stop, the expiry of every other
    shard's holds, whose budget would stay reserved for the whole outage."""

    async def keep_shards() -> None:
        kept = await keep(budget, store.layout.control)
        if kept.transfers:
            log.info("shards rebalanced", extra={"count": kept.transfers, "fen": kept.moved_fen})

    def shard_steps(index: int) -> list[Step]:
        shard = store.stores[index]
        steps = [
            expiring("hold", partial(shard.expire_due_holds, config.sweep_batch_size)),
            expiring("qualification", partial(shard.expire_due_qualifications, config.qualification_sweep_batch_size)),
        ]
        if store.serials is not None:  # then its serials' reservations (serials.py settle_due)
            steps.append(expiring("serial", partial(store.serials.settle_due, index, config.sweep_batch_size)))
        return steps

    return [*(shard_steps(index) for index in range(len(store.stores))), [("shard funding", keep_shards)]]


async def create_sharded_server(config: Config) -> Application:
    check_listeners(config)
    startup = cluster_nodes(config.redis_cluster_nodes)
    cluster = cluster_client(startup, timeout_s=config.redis_timeout_s, client_name=config.redis_client_name)
    scripts = AcknowledgedScripts(cluster)
    budgets: ShardedBudgetReader | None = None
    try:
        await scripts.preload()
        layout = ShardLayout(config.redis_prefix, config.redis_shards)
        limits = store_limits(config)
        if not config.programme_key:
            raise ConfigError("a cluster deployment needs SUBSIDY_PROGRAMME_KEY: it derives the authorization ids")
        store = ShardedStore(
            layout,
            [RedisStore(cluster, keys, scripts, limits) for keys in layout.keys],  # type: ignore[arg-type]
            RedisStore(cluster, layout.control, scripts, limits),  # type: ignore[arg-type]
            id_key=hashlib.sha256(b"authorization ids\x00" + config.programme_key.encode()).digest(),
            serials=SerialRegistry(cluster, layout.keys),
        )
        credentials = CredentialCache(cluster, layout.control, nonce_ttl_s=store.nonce_ttl_s)  # type: ignore[arg-type]
        await credentials.refresh()
        grpc_server, server = guarded_server(config, credentials, None)
        authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(
            AuthorizationService(store, config.max_lines, config.programme_key),  # type: ignore[arg-type]
            server,
        )
        qualification_pb2_grpc.add_QualificationServiceServicer_to_server(
            QualificationService(store, config.programme_key, config.local_data_key),  # type: ignore[arg-type]
            server,
        )
        diagnostics_pb2_grpc.add_DiagnosticsServiceServicer_to_server(DiagnosticsService(), server)
        operator_pool = LazyPool(config.pg_dsn)
        calendar = BusinessCalendar(config.report_timezone, config.report_cutoff)
        daily_report_pb2_grpc.add_DailyReportServiceServicer_to_server(
            DailyReportService(postgres_only(operator_pool), calendar), server
        )
        reconciliation_pb2_grpc.add_ReconciliationServiceServicer_to_server(
            ReconciliationService(postgres_only(operator_pool), calendar), server
        )
        budgets = ShardedBudgetReader(cluster, layout.keys)
        poller = funds_poller(config, budgets, operator_pool)
        supervision_pb2_grpc.add_SupervisionServiceServicer_to_server(
            SupervisionService(poller, operator_pool, calendar), server
        )
        health_servicer = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in (*SHARDED_SERVICE_NAMES, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (*SHARDED_SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
        )
        listeners = bind(grpc_server, config)
    except (Exception, asyncio.CancelledError):
        if budgets is not None:
            await budgets.aclose()
        await scripts.aclose()
        await cluster.aclose()
        raise
    application = Application(
        grpc_server,
        listeners.port,
        cluster,  # type: ignore[arg-type]
        store,  # type: ignore[arg-type]
        health_servicer,
        config,
        operator_pool,
        mtls_port=listeners.mtls_port,
        certificates=listeners.reloader,
        poller=poller,
        service_names=SHARDED_SERVICE_NAMES,
        closing=[budgets.aclose, scripts.aclose],
    )
    budget = ShardBudget(cluster, layout)
    application.closing.insert(0, budget.aclose)
    if store.serials is not None:
        application.closing.insert(0, store.serials.aclose)
    for steps in shard_sweeps(store, budget, config):
        application.tasks.append(
            asyncio.create_task(sweep_forever(steps, config.sweep_interval_ms, application.stopping))
        )
    application.tasks.append(
        asyncio.create_task(credentials.run_refresher(config.credentials_refresh_ms, application.stopping))
    )
    return application
