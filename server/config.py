"""Server configuration from environment variables, validated at start-up.

Every variable is optional except where ``make run`` provides it; a bad value stops the
server before it binds, with a message naming the variable.
"""

from __future__ import annotations

import itertools
import os
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_LISTEN = "127.0.0.1:50051"
LISTEN_PATTERN = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})\Z")
# An origin as a browser sends it (RFC 6454 serialisation): scheme, host, optional port.
PUBLIC_ORIGIN_PATTERN = re.compile(r"https?://(\[[0-9a-f:]+\]|[a-z0-9]([a-z0-9.-]*[a-z0-9])?)(:[1-9][0-9]{0,4})?")
# The longest ticket SLA period, in business days: server/domain/complaints.SLA_BUSINESS_DAYS_MAX
# (settings import nothing of the server; tests/unit/test_complaints_rules.py checks they agree).
TICKET_SLA_BUSINESS_DAYS_MAX = 30
TRACING_ENDPOINT_PATTERN = re.compile(r"^https?://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})\Z")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the variable."""


@dataclass(frozen=True)
class Config:
    listen: str = DEFAULT_LISTEN
    workers: int = 1
    pg_dsn: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "sg"
    redis_timeout_s: float = 2.0
    redis_pool_size: int = 64
    # The CLIENT SETNAME of the gateway's Redis connections (CLIENT LIST tells them apart).
    redis_client_name: str = "subsidy-gateway"
    # The client of the money path's script calls: lean (storage/redis/lean.py: one pipelined
    # connection per process, at most SUBSIDY_REDIS_POOL_SIZE calls in flight) or redis-py (its
    # pool of up to SUBSIDY_REDIS_POOL_SIZE connections). Everything else always uses redis-py;
    # a rediss:// URL keeps redis-py for the scripts too (the lean path has no TLS).
    redis_client: str = "lean"
    hold_ttl_s: int = 900
    idempotency_ttl_s: int = 86_400
    auth_clock_skew_s: int = 300
    max_lines: int = 20
    sweep_interval_ms: int = 1000
    sweep_batch_size: int = 500
    credentials_refresh_ms: int = 1000
    shutdown_grace_s: float = 10.0
    max_concurrent_rpcs: int = 4096
    max_pending_rpcs: int = 10_000
    use_uvloop: bool = True
    writer_consumer: str = "writer-1"
    # Redis Cluster (issue 16, docs/scale-out.md): "host:port,..." of some of its nodes. Empty
    # (the default): one Redis only. Set: the ledger writer also drains the shards' streams.
    redis_cluster_nodes: str = ""
    # With SUBSIDY_REDIS_CLUSTER_NODES: the number of consumer shards (1-1024; 0, the default:
    # none). Set, the gateway serves the sale path in the shards (server/processes/sharded_app.py,
    # docs/scale-out.md 2.0) and the ledger writer drains each shard's ledger stream.
    redis_shards: int = 0
    writer_batch_size: int = 500
    writer_block_ms: int = 200
    writer_claim_idle_ms: int = 30_000
    writer_max_deliveries: int = 5
    writer_metrics_listen: str = ""
    # The gateway's /metrics and /health (Prometheus; with SUBSIDY_WORKERS > 1 served by the
    # parent process for every worker); empty: not served.
    metrics_listen: str = ""
    # OpenTelemetry tracing of the gRPC server (server/processes/tracing.py): off (the default:
    # nothing of the tracing SDK is imported and calls make no OpenTelemetry call), otlp (spans
    # in batches to an OTLP/gRPC collector at tracing_endpoint; http:// is plaintext, https://
    # TLS) or console (spans on stdout, for development). Calls are sampled at
    # tracing_sample_ratio unless the caller's traceparent decides; at most tracing_queue_size
    # spans wait for export, more are dropped (never blocking a call).
    tracing: str = "off"
    tracing_endpoint: str = "http://127.0.0.1:4317"
    tracing_sample_ratio: float = 1.0
    tracing_queue_size: int = 2048
    # Fault injection for the crash tests only: before_commit, after_commit or after_ack.
    writer_crash_at: str = ""
    writer_crash_after_batches: int = 1
    log_level: str = "INFO"
    # The programme key: consumer key = HMAC-SHA256(programme key, ID number). The same key at
    # every service provider of the programme; at least 32 bytes. Without it, claims are refused.
    programme_key: str = ""
    # Sweeper of qualifications past their validity (runs beside the hold sweeper).
    qualification_sweep_batch_size: int = 500
    # The complaints desk (server/domain/complaints.py): first reply and resolution due within
    # these many business days (Monday to Friday in report_timezone; 0 to 30), and at most
    # ticket_daily_limit_per_consumer tickets a day from one consumer (per merchant:
    # ticket_daily_limit_per_merchant), counted in PostgreSQL in the ticket's own transaction.
    ticket_first_reply_business_days: int = 1
    ticket_resolution_business_days: int = 5
    ticket_daily_limit_per_consumer: int = 5
    ticket_daily_limit_per_merchant: int = 50
    # Cross-provider exchange: this provider's id in exchange files, and the key shared with
    # the other providers that signs and verifies the daily files (at least 32 bytes).
    provider_id: str = "local"
    exchange_key: str = ""
    # Transport security (server/rpc/tls.py, README "Security"): PEM certificate chain and key for
    # SUBSIDY_LISTEN and the writer's metrics listener; a client CA turns on mutual TLS (on
    # SUBSIDY_MTLS_LISTEN when set, else on SUBSIDY_LISTEN); a file of revoked client
    # certificates; plaintext on a non-loopback address only with allow_plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    mtls_listen: str = ""
    tls_revoked: str = ""
    allow_plaintext: bool = False
    # This provider's own key for personal data at rest (masked ID and phone numbers, sealed
    # with AES-256-GCM; see docs/privacy.md): at least 32 bytes, never shared, kept off the
    # database hosts. Without it no mask is stored and Get/List return them empty.
    local_data_key: str = ""
    # T+1 daily reports (server/domain/daily_report.py): a business day is a calendar day in
    # this IANA time zone and closes at this HH:MM on the following day (a grace period for
    # events still on their way into the ledger); the ledger writer process publishes closed
    # days, checking every report_check_interval_s, unless report_schedule is off.
    report_timezone: str = "Asia/Shanghai"
    report_cutoff: str = "00:30"
    report_schedule: bool = True
    report_check_interval_s: int = 60
    # The bureau's web dashboard (server/processes/dashboard.py, ``subsidyctl dashboard``): its
    # HTTP listener (HTTPS with SUBSIDY_TLS_CERT/KEY); the gateway it calls, signed with each
    # user's own government credential (empty: SUBSIDY_LISTEN, a wildcard host read as
    # loopback) and the CA that signed the gateway's certificate when the gateway is TLS (empty:
    # the system's roots); a session ends after dashboard_session_idle_s without a request and
    # dashboard_session_max_s after login; at most dashboard_max_sessions at once; a browser
    # more than dashboard_sse_buffer snapshots behind is disconnected (it reconnects).
    dashboard_listen: str = ""
    dashboard_gateway: str = ""
    dashboard_gateway_ca: str = ""
    dashboard_session_idle_s: int = 1800
    dashboard_session_max_s: int = 28_800
    dashboard_max_sessions: int = 200
    dashboard_sse_buffer: int = 8
    # The dashboard's address as browsers see it when a reverse proxy serves it (TLS ended at
    # the proxy): "https://host[:port]", no path. Sign-in and sign-out posts must come from this
    # origin instead of the listener's own, and https here makes the session cookie Secure.
    dashboard_public_origin: str = ""
    # Live fund supervision (server/services/supervision.py, README "Live supervision"): the
    # per-process poller reads every budget each supervision_poll_ms while anyone watches; a
    # watcher more than supervision_queue_size snapshots behind is dropped. A budget alert is
    # raised once per threshold reached (alert_thresholds: whole percents, increasing); a
    # merchant surges when its captures in the last hour number at least surge_min_sales and
    # exceed surge_factor times its hourly average over the surge_baseline_hours before,
    # checked every surge_check_interval_s.
    supervision_poll_ms: int = 1000
    supervision_queue_size: int = 8
    alert_thresholds: str = "80,90,100"
    # Per-campaign overrides, "c-main=50,75,100;c-voucher=95" (SUBSIDY_ALERT_THRESHOLDS_BY_CAMPAIGN).
    alert_thresholds_by_campaign: str = ""
    surge_factor: float = 5.0
    surge_min_sales: int = 20
    surge_baseline_hours: int = 168
    surge_check_interval_s: int = 60
    # The ledger writer process checks thresholds and surges this often whether or not anyone
    # watches (server/processes/alert_watch.py); 0: only watched gateways raise alerts.
    alert_check_interval_s: int = 10

    def __post_init__(self) -> None:
        if not LISTEN_PATTERN.match(self.listen):
            raise ConfigError(f"SUBSIDY_LISTEN must be host:port, got {self.listen!r}")
        _positive("SUBSIDY_WORKERS", self.workers, 64)
        _positive("SUBSIDY_HOLD_TTL_S", self.hold_ttl_s, 7 * 86_400)
        _positive("SUBSIDY_IDEMPOTENCY_TTL_S", self.idempotency_ttl_s, 90 * 86_400)
        _positive("SUBSIDY_AUTH_CLOCK_SKEW_S", self.auth_clock_skew_s, 3600)
        _positive("SUBSIDY_MAX_LINES", self.max_lines, 100)
        _positive("SUBSIDY_SWEEP_INTERVAL_MS", self.sweep_interval_ms, 3_600_000)
        _positive("SUBSIDY_SWEEP_BATCH_SIZE", self.sweep_batch_size, 10_000)
        _positive("SUBSIDY_CREDENTIALS_REFRESH_MS", self.credentials_refresh_ms, 3_600_000)
        _positive("SUBSIDY_REDIS_POOL_SIZE", self.redis_pool_size, 10_000)
        _positive("SUBSIDY_MAX_CONCURRENT_RPCS", self.max_concurrent_rpcs, 100_000)
        _positive("SUBSIDY_MAX_PENDING_RPCS", self.max_pending_rpcs, 1_000_000)
        if not 0 < self.redis_timeout_s <= 60:
            raise ConfigError("SUBSIDY_REDIS_TIMEOUT_S must be in (0, 60]")
        if not 0 <= self.shutdown_grace_s <= 300:
            raise ConfigError("SUBSIDY_SHUTDOWN_GRACE_S must be in [0, 300]")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", self.redis_prefix):
            raise ConfigError("SUBSIDY_REDIS_PREFIX must be 1-40 characters of [A-Za-z0-9_.-]")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("SUBSIDY_REDIS_URL must start with redis://, rediss:// or unix://")
        if self.redis_client not in ("lean", "redis-py"):
            raise ConfigError(f"SUBSIDY_REDIS_CLIENT must be lean or redis-py, got {self.redis_client!r}")
        cluster_nodes(self.redis_cluster_nodes)
        if not 0 <= self.redis_shards <= 1024:
            raise ConfigError(f"SUBSIDY_REDIS_SHARDS must be 0 to 1024, got {self.redis_shards}")
        if self.redis_shards and not self.redis_cluster_nodes:
            raise ConfigError("SUBSIDY_REDIS_SHARDS needs SUBSIDY_REDIS_CLUSTER_NODES (the shards are on a cluster)")
        _positive("SUBSIDY_WRITER_BATCH_SIZE", self.writer_batch_size, 10_000)
        _positive("SUBSIDY_WRITER_BLOCK_MS", self.writer_block_ms, 60_000)
        _positive("SUBSIDY_WRITER_CLAIM_IDLE_MS", self.writer_claim_idle_ms, 3_600_000)
        _positive("SUBSIDY_WRITER_MAX_DELIVERIES", self.writer_max_deliveries, 1000)
        if self.writer_metrics_listen and not LISTEN_PATTERN.match(self.writer_metrics_listen):
            raise ConfigError("SUBSIDY_WRITER_METRICS_LISTEN must be host:port")
        if self.metrics_listen and not LISTEN_PATTERN.match(self.metrics_listen):
            raise ConfigError("SUBSIDY_METRICS_LISTEN must be host:port")
        if self.tracing not in ("off", "otlp", "console"):
            raise ConfigError(f"SUBSIDY_TRACING must be off, otlp or console, got {self.tracing!r}")
        if not TRACING_ENDPOINT_PATTERN.match(self.tracing_endpoint):
            raise ConfigError(
                f"SUBSIDY_TRACING_ENDPOINT must be http://host:port or https://host:port, got {self.tracing_endpoint!r}"
            )
        if not 0 < self.tracing_sample_ratio <= 1:
            raise ConfigError("SUBSIDY_TRACING_SAMPLE_RATIO must be in (0, 1]")
        _positive("SUBSIDY_TRACING_QUEUE_SIZE", self.tracing_queue_size, 1_000_000)
        if self.writer_crash_at not in ("", "before_commit", "after_commit", "after_ack"):
            raise ConfigError("SUBSIDY_WRITER_CRASH_AT must be before_commit, after_commit or after_ack")
        if self.programme_key and len(self.programme_key.encode()) < 32:
            raise ConfigError("SUBSIDY_PROGRAMME_KEY must be at least 32 bytes")
        if self.exchange_key and len(self.exchange_key.encode()) < 32:
            raise ConfigError("SUBSIDY_EXCHANGE_KEY must be at least 32 bytes")
        if self.local_data_key and len(self.local_data_key.encode()) < 32:
            raise ConfigError("SUBSIDY_LOCAL_DATA_KEY must be at least 32 bytes")
        if self.local_data_key and self.local_data_key in (self.programme_key, self.exchange_key):
            raise ConfigError("SUBSIDY_LOCAL_DATA_KEY must differ from the shared programme and exchange keys")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.provider_id):
            raise ConfigError("SUBSIDY_PROVIDER_ID must be 1-64 characters of [A-Za-z0-9_.-]")
        for variable, days in (
            ("SUBSIDY_TICKET_FIRST_REPLY_BUSINESS_DAYS", self.ticket_first_reply_business_days),
            ("SUBSIDY_TICKET_RESOLUTION_BUSINESS_DAYS", self.ticket_resolution_business_days),
        ):
            if not 0 <= days <= TICKET_SLA_BUSINESS_DAYS_MAX:
                raise ConfigError(f"{variable} must be between 0 and {TICKET_SLA_BUSINESS_DAYS_MAX}, got {days}")
        if self.ticket_first_reply_business_days > self.ticket_resolution_business_days:
            raise ConfigError(
                "SUBSIDY_TICKET_FIRST_REPLY_BUSINESS_DAYS must not exceed SUBSIDY_TICKET_RESOLUTION_BUSINESS_DAYS"
            )
        _positive("SUBSIDY_TICKET_DAILY_LIMIT_PER_CONSUMER", self.ticket_daily_limit_per_consumer, 1000)
        _positive("SUBSIDY_TICKET_DAILY_LIMIT_PER_MERCHANT", self.ticket_daily_limit_per_merchant, 10_000)
        _positive("SUBSIDY_QUALIFICATION_SWEEP_BATCH_SIZE", self.qualification_sweep_batch_size, 10_000)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("SUBSIDY_TLS_CERT and SUBSIDY_TLS_KEY go together: set both or neither")
        if (self.tls_client_ca or self.tls_revoked) and not self.tls_cert:
            raise ConfigError("SUBSIDY_TLS_CLIENT_CA and SUBSIDY_TLS_REVOKED need SUBSIDY_TLS_CERT and SUBSIDY_TLS_KEY")
        if self.mtls_listen and not (self.tls_client_ca and LISTEN_PATTERN.match(self.mtls_listen)):
            raise ConfigError("SUBSIDY_MTLS_LISTEN must be host:port and needs SUBSIDY_TLS_CLIENT_CA")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("SUBSIDY_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        if not re.fullmatch(r"([01][0-9]|2[0-3]):[0-5][0-9]", self.report_cutoff):
            raise ConfigError(f"SUBSIDY_REPORT_CUTOFF must be HH:MM (00:00-23:59), got {self.report_cutoff!r}")
        try:
            zoneinfo.ZoneInfo(self.report_timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as error:
            raise ConfigError(f"SUBSIDY_REPORT_TIMEZONE: unknown time zone {self.report_timezone!r}") from error
        _positive("SUBSIDY_REPORT_CHECK_INTERVAL_S", self.report_check_interval_s, 86_400)
        for variable, address in (
            ("SUBSIDY_DASHBOARD_LISTEN", self.dashboard_listen),
            ("SUBSIDY_DASHBOARD_GATEWAY", self.dashboard_gateway),
        ):
            if address and not LISTEN_PATTERN.match(address):
                raise ConfigError(f"{variable} must be host:port, got {address!r}")
        _positive("SUBSIDY_DASHBOARD_SESSION_IDLE_S", self.dashboard_session_idle_s, 86_400)
        _positive("SUBSIDY_DASHBOARD_SESSION_MAX_S", self.dashboard_session_max_s, 7 * 86_400)
        if self.dashboard_session_idle_s > self.dashboard_session_max_s:
            raise ConfigError("SUBSIDY_DASHBOARD_SESSION_IDLE_S must not exceed SUBSIDY_DASHBOARD_SESSION_MAX_S")
        _positive("SUBSIDY_DASHBOARD_MAX_SESSIONS", self.dashboard_max_sessions, 100_000)
        _positive("SUBSIDY_DASHBOARD_SSE_BUFFER", self.dashboard_sse_buffer, 1000)
        origin = PUBLIC_ORIGIN_PATTERN.fullmatch(self.dashboard_public_origin)
        if self.dashboard_public_origin and (origin is None or int((origin[3] or ":1")[1:]) > 65535):
            raise ConfigError(
                "SUBSIDY_DASHBOARD_PUBLIC_ORIGIN must be http(s)://host[:port] in lowercase, no path or"
                f" trailing slash (as a browser sends it in Origin), got {self.dashboard_public_origin!r}"
            )
        if not 100 <= self.supervision_poll_ms <= 60_000:
            raise ConfigError(
                f"SUBSIDY_SUPERVISION_POLL_MS must be between 100 and 60000, got {self.supervision_poll_ms}"
            )
        _positive("SUBSIDY_SUPERVISION_QUEUE_SIZE", self.supervision_queue_size, 1000)
        self.alert_threshold_percents  # noqa: B018 (validates SUBSIDY_ALERT_THRESHOLDS)
        self.alert_threshold_overrides  # noqa: B018 (validates SUBSIDY_ALERT_THRESHOLDS_BY_CAMPAIGN)
        if not 1.0 < self.surge_factor <= 1000.0:
            raise ConfigError(f"SUBSIDY_SURGE_FACTOR must be above 1 and at most 1000, got {self.surge_factor}")
        _positive("SUBSIDY_SURGE_MIN_SALES", self.surge_min_sales, 1_000_000)
        _positive("SUBSIDY_SURGE_BASELINE_HOURS", self.surge_baseline_hours, 90 * 24)
        _positive("SUBSIDY_SURGE_CHECK_INTERVAL_S", self.surge_check_interval_s, 86_400)
        if not 0 <= self.alert_check_interval_s <= 3600:
            raise ConfigError(
                f"SUBSIDY_ALERT_CHECK_INTERVAL_S must be between 0 and 3600, got {self.alert_check_interval_s}"
            )

    @property
    def alert_threshold_percents(self) -> tuple[int, ...]:
        """SUBSIDY_ALERT_THRESHOLDS as percents: 1 to 10 whole numbers from 1 to 100, strictly
        increasing (``80,90,100``)."""
        return _percents("SUBSIDY_ALERT_THRESHOLDS", self.alert_thresholds)

    @property
    def alert_threshold_overrides(self) -> dict[str, tuple[int, ...]]:
        """SUBSIDY_ALERT_THRESHOLDS_BY_CAMPAIGN: per-campaign overrides of the thresholds,
        ``c-main=50,75,100;c-voucher=95`` (a campaign id, ``=``, its percents; ``;`` between)."""
        variable = "SUBSIDY_ALERT_THRESHOLDS_BY_CAMPAIGN"
        overrides: dict[str, tuple[int, ...]] = {}
        for item in filter(None, (part.strip() for part in self.alert_thresholds_by_campaign.split(";"))):
            campaign_id, equals, percents = item.partition("=")
            campaign_id = campaign_id.strip()
            if not equals or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", campaign_id):
                raise ConfigError(f"{variable}: {item!r} is not <campaign id>=<percents>, e.g. c-main=50,75,100")
            if campaign_id in overrides:
                raise ConfigError(f"{variable}: campaign {campaign_id} is given twice")
            overrides[campaign_id] = _percents(f"{variable} ({campaign_id})", percents)
        return overrides

    @property
    def port(self) -> int:
        match = LISTEN_PATTERN.match(self.listen)
        assert match is not None
        return int(match.group(2))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        env = os.environ if environ is None else environ
        defaults = cls()
        values: dict[str, object] = {}
        for name, default in defaults.__dict__.items():
            variable = "SUBSIDY_" + name.upper()
            if variable not in env:
                continue
            values[name] = _convert(variable, env[variable], default)
        return cls(**values)  # type: ignore[arg-type]


def _percents(variable: str, text: str) -> tuple[int, ...]:
    """1 to 10 whole percentages from 1 to 100, strictly increasing: ``80,90,100``."""
    parts = [part.strip() for part in text.split(",")]
    if not 1 <= len(parts) <= 10 or not all(part.isascii() and part.isdigit() for part in parts):
        raise ConfigError(f"{variable} must list 1 to 10 whole percentages, e.g. 80,90,100; got {text!r}")
    values = tuple(int(part) for part in parts)
    if not all(1 <= value <= 100 for value in values) or any(b <= a for a, b in itertools.pairwise(values)):
        raise ConfigError(f"{variable} must be strictly increasing percentages from 1 to 100; got {text!r}")
    return values


def cluster_nodes(text: str) -> list[tuple[str, int]]:
    """SUBSIDY_REDIS_CLUSTER_NODES as (host, port) pairs: 0 to 32 ``host:port``, comma-separated."""
    if not text:
        return []
    found = []
    for part in text.split(","):
        host, _, port = part.strip().rpartition(":")
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host) or not (port.isascii() and port.isdigit()):
            raise ConfigError(f"SUBSIDY_REDIS_CLUSTER_NODES must list host:port pairs, got {part.strip()!r}")
        if not 1 <= int(port) <= 65535:
            raise ConfigError(f"SUBSIDY_REDIS_CLUSTER_NODES: port must be 1-65535, got {port}")
        found.append((host, int(port)))
    if len(found) > 32:
        raise ConfigError(f"SUBSIDY_REDIS_CLUSTER_NODES lists at most 32 nodes, got {len(found)}")
    return found


def _positive(variable: str, value: int, maximum: int) -> None:
    if not 0 < value <= maximum:
        raise ConfigError(f"{variable} must be between 1 and {maximum}, got {value}")


def _convert(variable: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as error:
        raise ConfigError(f"{variable}: cannot read {raw!r} as {type(default).__name__}") from error
    return raw
