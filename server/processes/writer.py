"""The ledger writer process (``python -m server.ledger writer``; ``make run`` starts one).

Drains the ledger stream into PostgreSQL (storage/postgres/writer.py), mirrors qualifications
into PostgreSQL in the same process (storage/postgres/qualifications.py), writes the risk events
(storage/postgres/risk_events.py), with SUBSIDY_REDIS_CLUSTER_NODES also drains the Redis Cluster
shards' escrow streams (storage/postgres/shard_writer.py) and, with SUBSIDY_REDIS_SHARDS too, each
consumer shard's ledger stream into the ledger (one LedgerWriter per shard) and its qualification
and risk event streams into the same tables as one Redis's (one QualificationMirror and one
ShardRiskEventWriter per shard), and, with
SUBSIDY_WRITER_METRICS_LISTEN set, serves ``/metrics`` (Prometheus) and ``/health`` (JSON lag
details) on it, over HTTPS when the gateway has a TLS certificate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import ssl
from dataclasses import dataclass
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from server.config import Config, cluster_nodes
from server.processes.alert_watch import run_alert_watch
from server.processes.http import HttpEndpoint, serve_http
from server.processes.publisher import PublishState, run_publisher
from server.processes.report_scheduler import ReportScheduler
from server.rpc.tls import metrics_tls
from storage.postgres.migrate import migrate
from storage.postgres.qualifications import QualificationMirror
from storage.postgres.risk_events import RiskEventWriter, event_row
from storage.postgres.shard_writer import ShardLedgerWriter
from storage.postgres.stream_consumer import StreamConsumer, consumer_backlogs, stream_backlog
from storage.postgres.writer import LedgerWriter, WriterConfig, lag
from storage.redis.cluster.shards import ShardLayout
from storage.redis.cluster.streams import ShardStreamReader
from storage.redis.keys import Keys
from storage.redis.store import sweep_backlog

log = logging.getLogger("subsidy.ledger")


def writer_config(config: Config) -> WriterConfig:
    return WriterConfig(
        pg_dsn=config.pg_dsn,
        redis_url=config.redis_url,
        prefix=config.redis_prefix,
        consumer=config.writer_consumer,
        batch_size=config.writer_batch_size,
        block_ms=config.writer_block_ms,
        claim_idle_ms=config.writer_claim_idle_ms,
        max_deliveries=config.writer_max_deliveries,
        crash_at=config.writer_crash_at,
        crash_after_batches=config.writer_crash_after_batches,
    )


@dataclass
class ShardWriting:
    """The shard writer of this process (Redis Cluster, docs/scale-out.md 2.3) and its task, for
    /metrics and /health: the task ends only on an EventCollision (or a bug in setting it up)."""

    writer: ShardLedgerWriter
    task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def snapshot(self) -> dict[str, Any]:
        details: dict[str, Any] = {"running": self.running, "stats": dataclasses.asdict(self.writer.stats)}
        if self.task is not None and self.task.done() and not self.task.cancelled() and self.task.exception():
            details["stopped_by"] = type(self.task.exception()).__name__
        try:
            details.update(dataclasses.asdict(await self.writer.reader.lag()))
        except Exception as error:  # the cluster unreachable: the shards cannot be drained either
            log.warning("reading the shard streams' lag failed", exc_info=True)
            details["error"] = type(error).__name__
        return details

    @staticmethod
    def healthy(details: dict[str, Any]) -> bool:
        return bool(details["running"]) and "error" not in details and details["dead_letters"] == 0


@dataclass
class ShardLedgers:
    """The consumer shards' ledger writers (SUBSIDY_REDIS_SHARDS, storage/redis/cluster/shards.py):
    one LedgerWriter per shard's ``ledger`` stream, all over one cluster client, for /metrics and
    /health."""

    cluster: RedisCluster
    writers: list[LedgerWriter]

    async def snapshot(self) -> dict[str, Any]:
        """Each shard's lag and stats by shard name; ``error`` names why the cluster could not be read."""
        try:
            lags = await asyncio.gather(*(lag(w.redis, w.keys, w.config.group) for w in self.writers))
        except Exception as error:  # the cluster unreachable: the shards cannot be drained either
            log.warning("reading the shard ledger streams' lag failed", exc_info=True)
            return {"error": type(error).__name__}
        return {
            writer.keys.shard: {
                **dataclasses.asdict(current),
                "backlog": current.backlog,
                "stats": dataclasses.asdict(writer.stats),
            }
            for writer, current in zip(self.writers, lags, strict=True)
        }

    @staticmethod
    def healthy(details: dict[str, Any]) -> bool:
        return "error" not in details and not any(shard["dead_letters"] for shard in details.values())


class ShardRiskEventWriter(RiskEventWriter):
    """The risk event writer of one consumer shard's ``risk_events`` stream (``keys`` the shard's,
    ``redis`` a cluster client). Its rows' ``stream_id`` is ``<entry id>@<shard>``: two shards'
    primaries hand out the same entry ids, and under the bare id the second shard's event would be
    taken for a redelivery of the first's and never written (``ON CONFLICT (stream_id) DO
    NOTHING``), as the shard ledger's event ids are qualified (storage/postgres/writer.py)."""

    def row(self, entry_id: str, fields: dict[bytes, bytes]) -> tuple[Any, ...]:
        return event_row(f"{entry_id}@{self.keys.shard}", fields[b"r"])


@dataclass
class ShardConsumers:
    """The consumer shards' qualification mirrors and risk event writers (SUBSIDY_REDIS_SHARDS):
    one of each per shard's ``qualification_events`` / ``risk_events`` stream, over the shard
    ledgers' cluster client, each its own consumer (``<SUBSIDY_WRITER_CONSUMER>@<shard>``) of the
    group one Redis's uses; for /metrics and /health, by shard and by the name
    ``consumer_backlogs`` gives it on one Redis."""

    consumers: list[tuple[str, StreamConsumer]]  # (qualification_mirror | risk_events, consumer)

    async def snapshot(self) -> dict[str, Any]:
        """Each shard's consumers' backlog, dead letters and stats: shard -> name -> details;
        ``error`` names why the cluster could not be read."""
        try:
            backlogs = await asyncio.gather(*(stream_backlog(c.redis, c.stream) for _, c in self.consumers))
        except Exception as error:  # the cluster unreachable: the shards cannot be drained either
            log.warning("reading the shard qualification and risk event streams' backlog failed", exc_info=True)
            return {"error": type(error).__name__}
        details: dict[str, Any] = {}
        for (name, consumer), backlog in zip(self.consumers, backlogs, strict=True):
            details.setdefault(consumer.keys.shard, {})[name] = {
                **dataclasses.asdict(backlog),
                "stats": dataclasses.asdict(consumer.stats),
            }
        return details

    @staticmethod
    def healthy(details: dict[str, Any]) -> bool:
        return "error" not in details and not any(
            consumer["dead_letters"] for shard in details.values() for consumer in shard.values()
        )


class WriterMetrics:
    """Prometheus gauges and counters of the writer, refreshed from Redis on each scrape."""

    def __init__(
        self,
        writer: LedgerWriter,
        publishing: PublishState | None = None,
        shards: ShardWriting | None = None,
        shard_ledgers: ShardLedgers | None = None,
        shard_consumers: ShardConsumers | None = None,
    ) -> None:
        self.writer = writer
        self.publishing = publishing or PublishState()
        self.shards = shards
        self.shard_ledgers = shard_ledgers
        self.shard_consumers = shard_consumers
        self.registry = CollectorRegistry()
        labels = ["prefix"]
        self.stream_length = Gauge(
            "subsidy_ledger_stream_length", "Entries in the ledger stream", labels, registry=self.registry
        )
        self.backlog = Gauge(
            "subsidy_ledger_backlog", "Events not yet written to PostgreSQL", labels, registry=self.registry
        )
        self.oldest_age = Gauge(
            "subsidy_ledger_oldest_unwritten_age_seconds",
            "Age of the oldest unwritten event",
            labels,
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "subsidy_ledger_dead_letters",
            "Entries in the dead-letter stream (alert when > 0)",
            labels,
            registry=self.registry,
        )
        self.written = Counter(
            "subsidy_ledger_events_written", "Events written to PostgreSQL", labels, registry=self.registry
        )
        self.overdue = Gauge(
            "subsidy_sweeper_overdue",
            "Holds / qualifications past expiry by more than a minute and not yet expired (alert when > 0)",
            [*labels, "kind"],
            registry=self.registry,
        )
        self.set_aside = Gauge(
            "subsidy_sweeper_set_aside",
            "Holds / qualifications whose expiry failed and were set aside (alert when > 0)",
            [*labels, "kind"],
            registry=self.registry,
        )
        self.unpublished_failed = Gauge(
            "subsidy_unpublished_changes",
            "Operator changes committed but not published to Redis, whose last publication failed (alert when > 0)",
            labels,
            registry=self.registry,
        )
        self.unpublished_age = Gauge(
            "subsidy_unpublished_oldest_age_seconds",
            "Age of the oldest operator change not yet published to Redis",
            labels,
            registry=self.registry,
        )
        self.consumer_backlog = Gauge(
            "subsidy_stream_consumer_backlog",
            "Entries of the qualification mirror's / risk event writer's stream not yet written to PostgreSQL",
            [*labels, "consumer"],
            registry=self.registry,
        )
        self.consumer_dead_letters = Gauge(
            "subsidy_stream_consumer_dead_letters",
            "Entries the qualification mirror / risk event writer set aside (alert when > 0)",
            [*labels, "consumer"],
            registry=self.registry,
        )
        self.shard_writer_up = Gauge(
            "subsidy_shard_writer_running",
            "1 while the shard streams' writer runs (Redis Cluster); 0 once it stopped (alert)",
            labels,
            registry=self.registry,
        )
        self.shard_backlog = Gauge(
            "subsidy_shard_stream_backlog",
            "Entries of the Redis Cluster shards' ledger streams not yet written to PostgreSQL",
            labels,
            registry=self.registry,
        )
        self.shard_dead_letters = Gauge(
            "subsidy_shard_stream_dead_letters",
            "Entries of the shards' ledger streams set aside in their dead-letter streams (alert when > 0)",
            labels,
            registry=self.registry,
        )
        shard_labels = [*labels, "shard"]
        self.shard_ledger_backlog = Gauge(
            "subsidy_shard_ledger_backlog",
            "Events of a consumer shard's ledger stream not yet written to PostgreSQL",
            shard_labels,
            registry=self.registry,
        )
        self.shard_ledger_oldest_age = Gauge(
            "subsidy_shard_ledger_oldest_unwritten_age_seconds",
            "Age of the oldest unwritten event of a consumer shard's ledger stream",
            shard_labels,
            registry=self.registry,
        )
        self.shard_ledger_dead_letters = Gauge(
            "subsidy_shard_ledger_dead_letters",
            "Entries in a consumer shard's ledger dead-letter stream (alert when > 0)",
            shard_labels,
            registry=self.registry,
        )
        self.shard_ledger_written = Counter(
            "subsidy_shard_ledger_events_written",
            "Events of a consumer shard's ledger stream written to PostgreSQL",
            shard_labels,
            registry=self.registry,
        )
        consumer_labels = [*shard_labels, "consumer"]
        self.shard_consumer_backlog = Gauge(
            "subsidy_shard_stream_consumer_backlog",
            "Entries of a consumer shard's qualification / risk event stream not yet written to PostgreSQL",
            consumer_labels,
            registry=self.registry,
        )
        self.shard_consumer_dead_letters = Gauge(
            "subsidy_shard_stream_consumer_dead_letters",
            "Entries of a consumer shard's qualification / risk event stream set aside (alert when > 0)",
            consumer_labels,
            registry=self.registry,
        )
        self._written_seen = 0
        self._shard_written_seen: dict[str, int] = {}

    async def snapshot(self) -> dict[str, Any]:
        redis = self.writer.redis
        # The deployment's own writer is on one Redis (its sweepers' and consumers' keys too).
        assert isinstance(redis, Redis), "WriterMetrics.writer drains one Redis's ledger stream"
        current = await lag(redis, self.writer.keys, self.writer.config.group)
        prefix = self.writer.config.prefix
        self.stream_length.labels(prefix).set(current.stream_length)
        self.backlog.labels(prefix).set(current.backlog)
        self.oldest_age.labels(prefix).set(current.oldest_unwritten_age_s)
        self.dead_letters.labels(prefix).set(current.dead_letters)
        self.written.labels(prefix).inc(self.writer.stats.events_written - self._written_seen)
        self._written_seen = self.writer.stats.events_written
        sweeper = await sweep_backlog(redis, self.writer.keys)
        self.overdue.labels(prefix, "hold").set(sweeper.overdue_holds)
        self.overdue.labels(prefix, "qualification").set(sweeper.overdue_qualifications)
        self.set_aside.labels(prefix, "hold").set(sweeper.set_aside_holds)
        self.set_aside.labels(prefix, "qualification").set(sweeper.set_aside_qualifications)
        streams = await consumer_backlogs(redis, self.writer.keys)
        for name, stream in streams.items():
            self.consumer_backlog.labels(prefix, name).set(stream.backlog)
            self.consumer_dead_letters.labels(prefix, name).set(stream.dead_letters)
        publishing = self.publishing.last
        self.unpublished_failed.labels(prefix).set(publishing.failed)
        self.unpublished_age.labels(prefix).set(publishing.oldest_age_s)
        shards = await self.shards.snapshot() if self.shards is not None else None
        if shards is not None:
            self.shard_writer_up.labels(prefix).set(1 if shards["running"] else 0)
            if "error" not in shards:
                self.shard_backlog.labels(prefix).set(shards["backlog"])
                self.shard_dead_letters.labels(prefix).set(shards["dead_letters"])
        shard_ledgers = await self._shard_ledgers(prefix)
        shard_consumers = await self._shard_consumers(prefix)
        return {
            **({"shard_streams": shards} if shards is not None else {}),
            **({"shard_ledgers": shard_ledgers} if shard_ledgers is not None else {}),
            **({"shard_consumers": shard_consumers} if shard_consumers is not None else {}),
            "publishing": {**dataclasses.asdict(publishing), "stuck": self.publishing.stuck},
            **dataclasses.asdict(current),
            "backlog": current.backlog,
            "sweeper": dataclasses.asdict(sweeper),
            "streams": {name: dataclasses.asdict(stream) for name, stream in streams.items()},
            "stats": dataclasses.asdict(self.writer.stats),
        }

    async def _shard_ledgers(self, prefix: str) -> dict[str, Any] | None:
        if self.shard_ledgers is None:
            return None
        details = await self.shard_ledgers.snapshot()
        for writer in self.shard_ledgers.writers:
            shard = writer.keys.shard
            written = writer.stats.events_written
            self.shard_ledger_written.labels(prefix, shard).inc(written - self._shard_written_seen.get(shard, 0))
            self._shard_written_seen[shard] = written
            if shard in details:
                self.shard_ledger_backlog.labels(prefix, shard).set(details[shard]["backlog"])
                self.shard_ledger_oldest_age.labels(prefix, shard).set(details[shard]["oldest_unwritten_age_s"])
                self.shard_ledger_dead_letters.labels(prefix, shard).set(details[shard]["dead_letters"])
        return details

    async def _shard_consumers(self, prefix: str) -> dict[str, Any] | None:
        if self.shard_consumers is None:
            return None
        details = await self.shard_consumers.snapshot()
        if "error" not in details:
            for shard, consumers in details.items():
                for name, consumer in consumers.items():
                    self.shard_consumer_backlog.labels(prefix, shard, name).set(consumer["backlog"])
                    self.shard_consumer_dead_letters.labels(prefix, shard, name).set(consumer["dead_letters"])
        return details


async def serve_metrics(metrics: WriterMetrics, listen: str, ssl_context: ssl.SSLContext | None = None) -> HttpEndpoint:
    """GET /metrics (Prometheus text) and GET /health (JSON: 503 when entries are dead-lettered
    (ledger events, qualification changes, risk events, shard stream events) or the sweepers have
    overdue or set-aside work, or an operator change has stayed unpublished for over a minute:
    publisher.py, or the shard writer has stopped or cannot read the cluster, or a consumer
    shard's ledger, qualification or risk event stream has dead letters or cannot be read), by
    prometheus_client's server in a thread;
    HTTPS with ``ssl_context`` (server.rpc.tls: the gateway's certificate, TLS 1.2+, reloaded
    with it). Every request refreshes the gauges from Redis on the writer's event loop."""
    loop = asyncio.get_running_loop()

    def health() -> tuple[bool, dict[str, Any]]:
        details = asyncio.run_coroutine_threadsafe(metrics.snapshot(), loop).result(timeout=5)
        healthy = details["dead_letters"] == 0 and not any(details["sweeper"].values())
        healthy = healthy and not any(stream["dead_letters"] for stream in details["streams"].values())
        healthy = healthy and ("shard_streams" not in details or ShardWriting.healthy(details["shard_streams"]))
        healthy = healthy and ("shard_ledgers" not in details or ShardLedgers.healthy(details["shard_ledgers"]))
        healthy = healthy and ("shard_consumers" not in details or ShardConsumers.healthy(details["shard_consumers"]))
        return healthy and not details["publishing"]["stuck"], details

    return serve_http(listen, metrics.registry, health, ssl_context)


def shard_writer_of(config: Config) -> ShardLedgerWriter:
    """The writer of every shard stream of the Redis Cluster at SUBSIDY_REDIS_CLUSTER_NODES
    (docs/scale-out.md 2.3); :func:`close_shard_writer` releases it."""
    startup = [ClusterNode(host, port) for host, port in cluster_nodes(config.redis_cluster_nodes)]
    cluster = RedisCluster(startup_nodes=startup, socket_timeout=10)
    reader = ShardStreamReader(cluster, config.redis_prefix, consumer=config.writer_consumer)
    return ShardLedgerWriter(reader, config.pg_dsn)


async def close_shard_writer(shard_writer: ShardLedgerWriter) -> None:
    await shard_writer.close()
    await shard_writer.reader.aclose()
    await shard_writer.reader.cluster.aclose()


def shard_ledgers_of(config: Config) -> ShardLedgers:
    """A LedgerWriter per consumer shard of the deployment (SUBSIDY_REDIS_SHARDS shards of
    SUBSIDY_REDIS_PREFIX on the cluster at SUBSIDY_REDIS_CLUSTER_NODES), each its own consumer
    (``<SUBSIDY_WRITER_CONSUMER>@<shard>``) of its shard's stream, over one cluster client that
    routes each one's commands to its shard's primary; ``cluster.aclose()`` releases it.

    redis-py's cluster client answers MaxConnectionsError past ``max_connections`` connections to
    a node (100 by default), and each shard takes up to five on its node at once: the blocked reads
    (XREADGROUP BLOCK) of its ledger writer, qualification mirror and risk event writer
    (shard_consumers_of), and two reads of a /metrics scrape. Room for that with every shard on one
    node (after failovers one may serve them all), plus the default for the rest."""
    startup = [ClusterNode(host, port) for host, port in cluster_nodes(config.redis_cluster_nodes)]
    cluster = RedisCluster(startup_nodes=startup, socket_timeout=10, max_connections=100 + 5 * config.redis_shards)
    base = writer_config(config)
    writers = [
        LedgerWriter(dataclasses.replace(base, consumer=f"{base.consumer}@{keys.shard}"), cluster, keys)
        for keys in ShardLayout(config.redis_prefix, config.redis_shards).keys
    ]
    return ShardLedgers(cluster, writers)


def shard_consumers_of(config: Config, shard_ledgers: ShardLedgers) -> ShardConsumers:
    """A QualificationMirror and a ShardRiskEventWriter per consumer shard of the deployment, over
    the shard ledgers' cluster client: on a cluster deployment the claim, cancel, expiry and sale
    scripts run in the claimant's shard and write the qualification's new state (and a block's
    risk event) into that shard's streams, as on one Redis into the deployment's. Same groups,
    statements and tables as one Redis's: a mirror's upsert is keyed by the redemption code
    (unique across shards) and ordered by the stream entry id, which only orders one code's
    snapshots, all written by its one shard; risk events' ids are shard-qualified. Batches and the
    idle time after which a dead consumer's entries are taken over are the writer's settings, as
    for the shard ledger writers."""
    # StreamConsumer is typed for one Redis; its commands name one shard's keys, so one slot.
    cluster: Any = shard_ledgers.cluster
    kinds: list[tuple[str, type[StreamConsumer]]] = [
        ("qualification_mirror", QualificationMirror),
        ("risk_events", ShardRiskEventWriter),
    ]
    return ShardConsumers(
        [
            (
                name,
                kind(
                    cluster,
                    keys,
                    config.pg_dsn,
                    f"{config.writer_consumer}@{keys.shard}",
                    batch_size=config.writer_batch_size,
                    block_ms=config.writer_block_ms,
                    claim_idle_ms=config.writer_claim_idle_ms,
                ),
            )
            for keys in ShardLayout(config.redis_prefix, config.redis_shards).keys
            for name, kind in kinds
        ]
    )


async def initialize(cluster: RedisCluster) -> None:
    """Loads the cluster client's slot map before the shards' writers and consumers send their
    first commands all at once. redis-py 8.1's cluster client, left to initialise on those, fails
    some of them (AttributeError 'NoneType' object has no attribute 'writelines', 'Connection
    closed by server': about 550 failed commands in each of two runs of 150 fresh clients sending
    18 at once, none in two runs of 150 initialised first). Each consumer retries, but a shard
    ledger writer's XACK failing so after its commit is taken for PostgreSQL's failure and its
    batch met again as duplicates. Failing here (the cluster unreachable at start) is logged:
    the writers' retry loops do the rest."""
    try:
        await cluster.initialize()
    except Exception:
        log.warning("loading the cluster's slot map at start failed; the shard writers will retry", exc_info=True)


async def run_writer(config: Config) -> None:
    redis = Redis.from_url(config.redis_url, socket_timeout=10)
    connection = await asyncpg.connect(config.pg_dsn, timeout=10)
    try:
        await migrate(connection)
    finally:
        await connection.close()
    writer = LedgerWriter(writer_config(config), redis)
    # Qualifications are not money: their own stream and consumer group, in this same process.
    mirror = QualificationMirror(
        redis,
        Keys(config.redis_prefix),
        config.pg_dsn,
        consumer=config.writer_consumer,
        block_ms=config.writer_block_ms,
    )
    # Risk events (declines by a risk rule, flags): not money either; their own stream and group.
    risk_events = RiskEventWriter(
        redis,
        Keys(config.redis_prefix),
        config.pg_dsn,
        consumer=config.writer_consumer,
        block_ms=config.writer_block_ms,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # Operator changes a gateway committed but failed to publish to Redis (publisher.py).
    publish_state = PublishState()
    publishing = asyncio.create_task(
        run_publisher(config.pg_dsn, redis, Keys(config.redis_prefix), stopping, publish_state)
    )
    # Redis Cluster (SUBSIDY_REDIS_CLUSTER_NODES): the shards' streams too (shard_writer.py).
    shards = ShardWriting(shard_writer_of(config)) if config.redis_cluster_nodes else None
    # And with SUBSIDY_REDIS_SHARDS, each consumer shard's ledger stream into the ledger.
    shard_ledgers = shard_ledgers_of(config) if config.redis_cluster_nodes and config.redis_shards else None
    # And each consumer shard's qualification and risk event streams, over the same cluster client.
    shard_consumers = shard_consumers_of(config, shard_ledgers) if shard_ledgers is not None else None
    if shard_ledgers is not None:  # before anything sends them commands: /health, the writers
        await initialize(shard_ledgers.cluster)
    server = (
        await serve_metrics(
            WriterMetrics(writer, publish_state, shards, shard_ledgers, shard_consumers),
            config.writer_metrics_listen,
            metrics_tls(config),
        )
        if config.writer_metrics_listen
        else None
    )
    mirroring = asyncio.create_task(mirror.run(stopping))
    risk_writing = asyncio.create_task(risk_events.run(stopping))
    # T+1 daily reports: published after each cut-off, missed days caught up (report_scheduler.py).
    reporting = (
        asyncio.create_task(ReportScheduler(config, redis, Keys(config.redis_prefix)).run(stopping))
        if config.report_schedule
        else None
    )
    # Supervision alerts (thresholds, merchant surges) even while no gateway is watched; with
    # SUBSIDY_REDIS_SHARDS over every consumer shard's budgets, through the shard ledgers' client.
    cluster = shard_ledgers.cluster if shard_ledgers is not None else None
    alerting = asyncio.create_task(run_alert_watch(config, redis, stopping, cluster))
    if shards is not None:
        # Ends only on an EventCollision (logged critical): /health then answers 503.
        shards.task = asyncio.create_task(shards.writer.run(stopping))
    shard_writing = [asyncio.create_task(w.run(stopping)) for w in shard_ledgers.writers] if shard_ledgers else []
    if shard_consumers is not None:
        shard_writing += [asyncio.create_task(c.run(stopping)) for _, c in shard_consumers.consumers]
    try:
        await writer.run(stopping)
    finally:
        stopping.set()
        background = [mirroring, risk_writing, alerting, publishing, *([reporting] if reporting else [])]
        background += [shards.task] if shards is not None and shards.task is not None else []
        background += shard_writing
        await asyncio.gather(*background, return_exceptions=True)
        if server is not None:
            server.close()
        if shards is not None:
            await close_shard_writer(shards.writer)
        if shard_ledgers is not None:
            await shard_ledgers.cluster.aclose()
        await redis.aclose()
