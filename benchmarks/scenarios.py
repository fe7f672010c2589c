"""The scenarios: what is measured, against what, in which order.

A :class:`Bench` owns the run's processes (a dedicated Redis, the bench databases, the gateway,
the baseline, the client pool) and measures one *phase* at a time: every client process drives
the same server for the same window while this process samples CPU at the window's edges.

Comparisons alternate short rounds (A B A B ...) within one run, so that drift in the machine's
background load hits both sides alike; each comparison reports the ratio of the medians and the
spread of the per-pair ratios as its noise.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

from subsidy_client.v1 import common_pb2

from benchmarks import baseline as baseline_module
from benchmarks import bookkeeping, redis_direct, services
from benchmarks.histogram import Histogram, LatencySummary
from benchmarks.loadgen import Claim, ClientPool, CrowdResult, CrowdSpec, PhaseResult, PhaseSpec
from benchmarks.profiling import Profile, summarize_profile
from benchmarks.services import (
    BENCH_DATA,
    GatewaySettings,
    MachineCpu,
    RedisServer,
    ServerProcess,
    Terminal,
    say,
)
from server.commands.certs import issue, make_ca
from server.domain.geo import wgs84_to_gcj02
from server.domain.identity import check_digit
from storage.devenv import DevServices

SCENARIOS = (
    "floor",
    "redis_client",
    "redis_script",
    "transport",
    "tls",
    "tracing",
    "baseline",
    "open_loop",
    "scaling",
    "ledger_lag",
    "flash_crowd",
    "structure",
)
# ``structure`` compares two checkouts and needs --before-tree: only run when named.
DEFAULT_SCENARIOS = tuple(name for name in SCENARIOS if name != "structure")
HOLD_TTL_S = 7 * 86_400  # no hold expires during a run: the sweeper stays idle
# The Echo payload is as long as a serialized one-line AuthorizeRequest, so both calls carry
# about the same bytes in each direction.
ECHO_PAYLOAD_BYTES = 150


@dataclass(frozen=True)
class Plan:
    """Everything a run does, fixed before it starts (the CLI builds it)."""

    quick: bool
    scenarios: tuple[str, ...]
    round_s: float  # one A/B round's measured window
    round_warmup_s: float  # unmeasured lead-in of each round
    pairs: int  # A/B pairs per comparison
    side_pairs: int  # A/B pairs of the side comparisons (tls, tracing)
    scaling_pairs: int
    open_loop_s: float
    open_loop_warmup_s: float
    open_loop_fractions: tuple[float, ...]
    open_loop_pairs: int  # gateway/baseline/Echo turns at each equal rate
    ledger_s: float  # ledger lag: seconds of load with the writer running
    drain_timeout_s: float  # ledger lag: longest wait for the backlog to reach zero
    initial_warmup_s: float  # once per server, before anything is measured
    flash_quota: int  # flash crowd: qualifications in the tranche
    flash_claims: int  # claims in the crowd
    flash_people: int  # distinct people among them (the rest claim a second time)
    flash_bursts: int  # crowds, each on a fresh campaign, between Authorize reference rounds
    flash_in_flight: int  # claims unanswered at once, all client processes together
    flash_arrival_s: float  # the crowd's presses are spread uniformly over this long after the opening
    clients: int
    channels: int  # per client process
    concurrency: int  # closed loop, all client processes together
    baseline_pool_size: int
    profile: str  # "auto" (when a target is missed), "always" or "never"
    profile_s: float
    output: Path
    command: str
    # The structure scenario: the checkout measured as "before", and as "after" (None: this one).
    before_tree: Path | None = None
    after_tree: Path | None = None


# --------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class CpuSnapshot:
    at: float
    server_s: float
    workers_s: tuple[float, ...]
    store_s: float
    clients_s: float
    machine: MachineCpu


@dataclass(frozen=True)
class Measurement:
    """One phase against one server: throughput, latency, and CPU per 1,000 calls."""

    label: str
    server: str
    method: str
    mode: str
    concurrency: int
    offered_per_s: float
    window_s: float
    throughput_per_s: float
    latency: LatencySummary
    send_lag: LatencySummary | None
    outcomes: dict[str, int]
    errors: int
    not_sent: int
    unfinished: int
    server_cpu_ms_per_1k: float
    server_cpu_cores: float
    worker_cpu_shares: tuple[float, ...]
    store: str
    store_cpu_ms_per_1k: float
    client_cpu_ms_per_1k: float
    client_cpu_cores: float
    machine_busy_fraction: float
    # Busy CPU of the machine not spent by the server, its store or the clients: other
    # programs on the machine (e.g. a test suite). Rounds where it is high were disturbed.
    outside_cpu_cores: float
    histogram: str  # HDR, encoded (microseconds)
    send_lag_histogram: str = ""


def merge(measurements: list[Measurement]) -> Measurement:
    """Several phases of the same load on the same server as one: histograms merged, rates
    and CPU per call weighted by the calls of each phase."""
    first = measurements[0]
    if len(measurements) == 1:
        return first
    latency, send_lag = Histogram(), Histogram()
    outcomes: Counter[str] = Counter()
    for measurement in measurements:
        latency.add(Histogram.decode(measurement.histogram))
        if measurement.send_lag_histogram:
            send_lag.add(Histogram.decode(measurement.send_lag_histogram))
        outcomes.update(measurement.outcomes)
    calls = [m.throughput_per_s * m.window_s for m in measurements]
    total_calls, total_s = sum(calls), sum(m.window_s for m in measurements)

    def per_call(name: str) -> float:
        spent = sum(getattr(m, name) * count for m, count in zip(measurements, calls, strict=True))
        return spent / total_calls if total_calls else math.nan

    def per_second(name: str) -> float:
        return float(sum(getattr(m, name) * m.window_s for m in measurements)) / total_s

    return Measurement(
        label=first.label,
        server=first.server,
        method=first.method,
        mode=first.mode,
        concurrency=first.concurrency,
        offered_per_s=first.offered_per_s,
        window_s=total_s,
        throughput_per_s=total_calls / total_s,
        latency=LatencySummary.of(latency),
        send_lag=LatencySummary.of(send_lag) if first.send_lag is not None else None,
        outcomes=dict(outcomes),
        errors=sum(m.errors for m in measurements),
        not_sent=sum(m.not_sent for m in measurements),
        unfinished=sum(m.unfinished for m in measurements),
        server_cpu_ms_per_1k=per_call("server_cpu_ms_per_1k"),
        server_cpu_cores=per_second("server_cpu_cores"),
        worker_cpu_shares=first.worker_cpu_shares,
        store=first.store,
        store_cpu_ms_per_1k=per_call("store_cpu_ms_per_1k"),
        client_cpu_ms_per_1k=per_call("client_cpu_ms_per_1k"),
        client_cpu_cores=per_second("client_cpu_cores"),
        machine_busy_fraction=per_second("machine_busy_fraction"),
        outside_cpu_cores=per_second("outside_cpu_cores"),
        histogram=latency.encode(),
        send_lag_histogram=send_lag.encode(),
    )


@dataclass
class Target:
    """A server under test and the store process(es) it spends CPU in."""

    name: str
    process: ServerProcess
    store: str
    store_pids: Callable[[], list[int]]
    workers: int = 1


@dataclass(frozen=True)
class Ratio:
    """A / B over alternating rounds: ratio of the medians, and the per-pair spread."""

    value: float
    pair_min: float
    pair_max: float
    pairs: int  # pairs the value and range come from
    pairs_disturbed: int = 0  # pairs left out: another program took CPU during one of the rounds

    @property
    def noise(self) -> float:
        """Half the per-pair range, relative to the value: the ± this comparison carries."""
        if self.value == 0 or math.isnan(self.value):
            return math.nan
        return (self.pair_max - self.pair_min) / 2 / self.value

    @staticmethod
    def of(a: Sequence[float], b: Sequence[float], clean: Sequence[bool] | None = None) -> Ratio:
        """Ratio of the medians over the clean pairs when at least ``CLEAN_PAIRS_MIN`` are
        clean, else over all pairs; the range is over the same pairs."""
        keep = list(clean) if clean is not None else [True] * len(a)
        if sum(keep) < CLEAN_PAIRS_MIN:
            keep = [True] * len(a)
        a = [value for value, kept in zip(a, keep, strict=True) if kept]
        b = [value for value, kept in zip(b, keep, strict=True) if kept]
        per_pair = [x / y if y else math.nan for x, y in zip(a, b, strict=True)]
        median_b = statistics.median(b)
        value = statistics.median(a) / median_b if median_b else math.nan
        return Ratio(
            value=value,
            pair_min=min(per_pair),
            pair_max=max(per_pair),
            pairs=len(per_pair),
            pairs_disturbed=len(keep) - len(per_pair),
        )


# A round is disturbed when programs other than the server, its store and the clients took this
# much CPU during its window (the machine's other tenants, e.g. a test suite). Fixed before any
# result was looked at; pairs with a disturbed round leave the headline ratios when enough clean
# pairs remain, and are shown, marked, either way.
OUTSIDE_CORES_DISTURBED = 0.25
CLEAN_PAIRS_MIN = 3


def disturbed(measurement: Measurement) -> bool:
    return measurement.outside_cpu_cores > OUTSIDE_CORES_DISTURBED


@dataclass(frozen=True)
class Comparison:
    """Alternating closed-loop rounds of A and B at the same concurrency."""

    name: str
    a: str
    b: str
    rounds_a: list[Measurement]
    rounds_b: list[Measurement]
    throughput: Ratio
    server_cpu: Ratio
    latency_a: LatencySummary  # merged over A's rounds
    latency_b: LatencySummary
    p99: Ratio  # per-round p99, A / B


@dataclass(frozen=True)
class OpenLoopPoint:
    """An open-loop phase at ``fraction`` of ``basis_per_s`` (a closed-loop maximum)."""

    fraction: float
    basis: str  # whose maximum: "gateway" or "baseline"
    basis_per_s: float
    measurement: Measurement  # the phases merged
    phases: list[Measurement] = field(default_factory=list)  # alternating with other servers


@dataclass(frozen=True)
class FlashBurst:
    """One flash crowd: a tranche of ``quota`` opens at T and the crowd's claims arrive."""

    campaign_id: str
    # The burst as one phase: claims/s from the opening to the last answer, latency from each
    # claim's due time (the press of the button), CPU from the opening to the last answer.
    measurement: Measurement
    service: LatencySummary  # from the send to the answer (the server and its queue)
    service_histogram: str
    exhausted_after_s: float | None  # from the opening to the quota-th ISSUED answer
    issued: int  # ISSUED answers
    issued_people: int  # distinct people among them
    claimed_counter: int  # the campaign's claimed counter in Redis afterwards
    decline_reasons: dict[str, int]
    correct: bool  # issued == issued_people == claimed_counter == quota, and no errors


@dataclass(frozen=True)
class FlashCrowd:
    server: str
    workers: int
    quota: int
    claims: int
    people: int
    outside_region_people: int
    in_flight: int
    arrival_s: float
    bursts: list[FlashBurst]
    # Authorize, closed loop, on the same server: before the first burst and after each one.
    references: list[Measurement]
    throughput: Ratio  # burst claims/s / Authorize calls/s (mean of the rounds either side)
    server_cpu: Ratio  # server CPU-ms per 1,000: claims / Authorize


@dataclass
class RunResult:
    plan: Plan
    environment: dict[str, Any] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    open_loop_gateway: list[OpenLoopPoint] = field(default_factory=list)
    open_loop_equal: list[tuple[OpenLoopPoint, OpenLoopPoint]] = field(default_factory=list)  # (gateway, baseline)
    open_loop_floor: list[OpenLoopPoint] = field(default_factory=list)  # Echo at the equal-load rates
    open_loop_aof: list[OpenLoopPoint] = field(default_factory=list)  # AOF everysec, then always
    ledger: dict[str, Any] = field(default_factory=dict)
    # The authorize script driven directly (scenario redis_script): one dict per round.
    redis_script: list[dict[str, Any]] = field(default_factory=list)
    flash_crowd: FlashCrowd | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""
    elapsed_s: float = 0.0


def summarize(
    label: str,
    target: Target,
    spec: PhaseSpec,
    offered_per_s: float,
    results: list[PhaseResult],
    before: CpuSnapshot,
    after: CpuSnapshot,
) -> Measurement:
    latency = Histogram()
    send_lag = Histogram()
    outcomes: Counter[str] = Counter()
    for result in results:
        latency.add(Histogram.decode(result.latency))
        send_lag.add(Histogram.decode(result.send_lag))
        outcomes.update(result.outcomes)
    window_s = after.at - before.at
    completed = sum(result.completed_in_window for result in results)
    per_1k = 1_000_000.0 / completed if completed else math.nan  # seconds -> ms per 1,000 calls
    workers_used = [end - start for start, end in zip(before.workers_s, after.workers_s, strict=False)]
    workers_total = sum(workers_used)
    machine_total = after.machine.total - before.machine.total
    machine_busy_s = (after.machine.busy - before.machine.busy) / services.CLOCK_TICKS_PER_S
    ours_s = (
        (after.server_s - before.server_s) + (after.store_s - before.store_s) + (after.clients_s - before.clients_s)
    )
    good = {"APPROVED", "OK"}
    return Measurement(
        label=label,
        server=target.name,
        method=spec.method,
        mode=spec.mode,
        concurrency=spec.concurrency * len(results),
        offered_per_s=offered_per_s,
        window_s=window_s,
        throughput_per_s=completed / window_s,
        latency=LatencySummary.of(latency),
        send_lag=LatencySummary.of(send_lag) if spec.mode == "open" else None,
        outcomes=dict(outcomes),
        errors=sum(count for outcome, count in outcomes.items() if outcome not in good),
        not_sent=sum(result.not_sent for result in results),
        unfinished=sum(result.unfinished for result in results),
        server_cpu_ms_per_1k=(after.server_s - before.server_s) * per_1k,
        server_cpu_cores=(after.server_s - before.server_s) / window_s,
        worker_cpu_shares=tuple(used / workers_total for used in workers_used) if workers_total else (),
        store=target.store,
        store_cpu_ms_per_1k=(after.store_s - before.store_s) * per_1k,
        client_cpu_ms_per_1k=(after.clients_s - before.clients_s) * per_1k,
        client_cpu_cores=(after.clients_s - before.clients_s) / window_s,
        machine_busy_fraction=(after.machine.busy - before.machine.busy) / machine_total if machine_total else 0.0,
        outside_cpu_cores=max(machine_busy_s - ours_s, 0.0) / window_s,
        histogram=latency.encode(),
        send_lag_histogram=send_lag.encode() if spec.mode == "open" else "",
    )


def _sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------- the bench


class Bench:
    """Starts what a run needs, measures phases, stops everything it started."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.prefix = "bench" + secrets.token_hex(4)
        self.programme_key = secrets.token_hex(32)  # the gateways' SUBSIDY_PROGRAMME_KEY
        self.redis: dict[str, RedisServer] = {}
        self.servers: list[ServerProcess] = []
        self.targets: dict[str, Target] = {}
        self.terminals: list[Terminal] = []
        self.document: dict[str, Any] = {}
        self.admin_dsn = ""
        self.gateway_dsn = ""
        self.baseline_dsn = ""
        self.pool = ClientPool(plan.clients)
        self._devservices: Any = None
        self._started = time.monotonic()

    # ---- lifecycle

    def start(self) -> dict[str, Any]:
        """Starts Redis, PostgreSQL (found or embedded), the databases, the reference data, the
        gateway, the baseline and the clients; returns the environment facts for the report."""
        main_redis = self.start_redis("always")
        # DevServices resolves Redis too; point it at ours so only PostgreSQL is found/started.
        os.environ["SUBSIDY_REDIS_URL"] = main_redis.url
        self._devservices = DevServices(services.ROOT / ".data")
        found = self._devservices.start()
        self.admin_dsn = found.pg_dsn
        self.gateway_dsn = services.with_database(self.admin_dsn, services.GATEWAY_DATABASE)
        self.baseline_dsn = services.with_database(self.admin_dsn, services.BASELINE_DATABASE)
        self.document, self.terminals = services.reference_document(self.plan.clients)
        services.run_async(services.recreate_database(self.admin_dsn, services.GATEWAY_DATABASE))
        services.run_async(
            services.load_gateway_reference(self.gateway_dsn, main_redis.url, self.prefix, self.document)
        )
        self.log("reference data loaded (gateway database, Redis)")
        self.start_gateway("gateway", GatewaySettings(), main_redis)
        if {"baseline", "open_loop"} & set(self.plan.scenarios):
            services.run_async(services.recreate_database(self.admin_dsn, services.BASELINE_DATABASE))
            services.run_async(baseline_module.prepare_database(self.baseline_dsn, self.document))
            self.start_baseline(main_redis)
        self.pool.start()
        self.log(f"{self.plan.clients} client processes ready (pids {self.pool.pids})")
        for target in self.targets.values():
            self.warm(target)
        return {
            "redis": {
                "binary": main_redis.binary,
                "version": main_redis.version(),
                "appendonly": "yes",
                "appendfsync": main_redis.appendfsync,
                "dedicated": True,
            },
            "postgres": {
                **services.run_async(services.postgres_facts(self.admin_dsn)),
                "embedded": found.pg_embedded,
            },
            "key_prefix": self.prefix,
        }

    def start_redis(self, appendfsync: str) -> RedisServer:
        server = RedisServer(appendfsync, appendfsync)
        server.start()
        self.redis[appendfsync] = server
        return server

    def start_gateway(self, name: str, settings: GatewaySettings, redis_server: RedisServer) -> Target:
        process = services.gateway_process(
            name, settings, redis_server.url, self.prefix, self.gateway_dsn, HOLD_TTL_S, self.programme_key
        )
        process.start()
        process.wait_workers(settings.workers)
        self.servers.append(process)
        self.log(
            f"{name}: python -m server on {process.target} (workers {settings.workers},"
            f" uvloop {settings.use_uvloop}, redis appendfsync {redis_server.appendfsync})"
        )
        target = Target(
            name, process, f"redis ({redis_server.appendfsync})", lambda: [redis_server.pid], settings.workers
        )
        self.targets[name] = target
        return target

    def start_baseline(self, redis_server: RedisServer) -> Target:
        process = services.baseline_process(
            "baseline", redis_server.url, self.prefix, self.baseline_dsn, self.plan.baseline_pool_size, HOLD_TTL_S
        )
        process.start()
        self.servers.append(process)
        self.log(f"baseline: python -m benchmarks.baseline on {process.target} (pool {self.plan.baseline_pool_size})")
        target = Target(
            "baseline",
            process,
            "postgres backends",
            lambda: services.postgres_backend_pids(services.BASELINE_DATABASE),
        )
        self.targets["baseline"] = target
        return target

    def stop_target(self, name: str) -> None:
        target = self.targets.pop(name)
        target.process.stop()
        self.servers.remove(target.process)

    def close(self) -> None:
        self.pool.close()
        for process in reversed(self.servers):
            process.stop()
        self.servers.clear()
        for redis_server in self.redis.values():
            client = redis_server.client()
            try:
                services.delete_prefix_keys(client, self.prefix)
            except Exception as error:  # the server may already be gone; its data goes next anyway
                say(f"redis[{redis_server.name}]: could not delete bench keys: {error}")
            finally:
                client.close()
            redis_server.stop()
            redis_server.remove_data()
        self.redis.clear()
        if self.admin_dsn:
            for database in (services.GATEWAY_DATABASE, services.BASELINE_DATABASE):
                try:
                    services.run_async(services.drop_database(self.admin_dsn, database))
                except Exception as error:
                    say(f"postgres: could not drop {database}: {error}")
        if self._devservices is not None:
            self._devservices.stop()

    def log(self, message: str) -> None:
        say(f"[{time.monotonic() - self._started:7.1f}s] {message}")

    # ---- state between scenarios

    def reset_state(self) -> None:
        """Between scenarios: empty the bench Redis (then republish the reference data and
        rewrite the AOF, so no phase carries the last one's memory or a due AOF rewrite) and
        vacuum the baseline's tables (fair to it: the hot row's dead versions go)."""
        for redis_server in self.redis.values():
            client = redis_server.client()
            try:
                client.flushall()
            finally:
                client.close()
            services.run_async(services.republish_reference(self.gateway_dsn, redis_server.url, self.prefix))
            redis_server.rewrite_aof()
        if "baseline" in self.targets:
            services.run_async(baseline_module.vacuum(self.baseline_dsn))

    # ---- phases

    def _specs(
        self,
        target: Target,
        method: str,
        mode: str,
        start_at: float,
        warmup_s: float,
        duration_s: float,
        *,
        concurrency: int = 0,
        rate_per_s: float = 0.0,
    ) -> list[PhaseSpec]:
        clients = self.plan.clients
        return [
            PhaseSpec(
                target=target.process.target,
                method=method,
                mode=mode,
                start_at=start_at,
                warmup_s=warmup_s,
                duration_s=duration_s,
                terminal_id=self.terminals[worker].terminal_id,
                secret=self.terminals[worker].secret,
                campaign_id=services.CAMPAIGN_ID,
                gtin=services.GTIN,
                price_fen=services.PRICE_FEN,
                concurrency=max(1, concurrency // clients) if mode == "closed" else 0,
                rate_per_s=rate_per_s / clients if mode == "open" else 0.0,
                offset_s=worker / rate_per_s if mode == "open" else 0.0,
                echo_payload_bytes=ECHO_PAYLOAD_BYTES,
                channels=self.plan.channels,
                tls_ca=target.process.tls_ca,
            )
            for worker in range(clients)
        ]

    def _snapshot(self, target: Target, store_pids: list[int], worker_pids: list[int]) -> CpuSnapshot:
        return CpuSnapshot(
            at=time.monotonic(),
            server_s=target.process.cpu_s(),
            workers_s=tuple(services.process_cpu_s(pid, include_reaped_children=False) for pid in worker_pids),
            store_s=services.pids_cpu_s(store_pids),
            clients_s=services.pids_cpu_s(self.pool.pids),
            machine=MachineCpu.read(),
        )

    def measure(
        self,
        label: str,
        target: Target,
        method: str,
        mode: str,
        *,
        warmup_s: float,
        duration_s: float,
        concurrency: int = 0,
        rate_per_s: float = 0.0,
        during: Callable[[float, float], None] | None = None,
    ) -> Measurement:
        """One phase; ``during(window_start, window_end)`` runs here while the clients work
        (after the window-start CPU sample)."""
        start_at = time.monotonic() + 0.3
        specs = self._specs(
            target, method, mode, start_at, warmup_s, duration_s, concurrency=concurrency, rate_per_s=rate_per_s
        )
        store_pids = target.store_pids()
        worker_pids = target.process.worker_pids()
        edges: list[CpuSnapshot] = []

        def sample_edges() -> None:
            _sleep_until(specs[0].window_start)
            edges.append(self._snapshot(target, store_pids, worker_pids))
            if during is not None:
                during(specs[0].window_start, specs[0].window_end)
            _sleep_until(specs[0].window_end)
            edges.append(self._snapshot(target, store_pids, worker_pids))

        results = self.pool.run(specs, on_wait=sample_edges)
        measurement = summarize(label, target, specs[0], rate_per_s, results, edges[0], edges[1])
        self.log(describe(measurement))
        return measurement

    def warm(self, target: Target) -> None:
        """Connections, caches and allocator warm before anything counts."""
        method = "authorize"
        self.measure(
            f"warm-up {target.name}",
            target,
            method,
            "closed",
            warmup_s=0.0,
            duration_s=self.plan.initial_warmup_s,
            concurrency=self.plan.concurrency,
        )
        if target.name == "gateway":
            self.measure(
                "warm-up echo",
                target,
                "echo",
                "closed",
                warmup_s=0.0,
                duration_s=max(1.0, self.plan.initial_warmup_s / 2),
                concurrency=self.plan.concurrency,
            )

    def closed_round(self, label: str, target: Target, method: str) -> Measurement:
        return self.measure(
            label,
            target,
            method,
            "closed",
            warmup_s=self.plan.round_warmup_s,
            duration_s=self.plan.round_s,
            concurrency=self.plan.concurrency,
        )

    def alternate(self, name: str, a: tuple[str, Target, str], b: tuple[str, Target, str], pairs: int) -> Comparison:
        """A B A B ... closed-loop rounds at the same concurrency."""
        rounds_a: list[Measurement] = []
        rounds_b: list[Measurement] = []
        for index in range(pairs):
            self.log(f"{name}: pair {index + 1}/{pairs}")
            rounds_a.append(self.closed_round(a[0], a[1], a[2]))
            rounds_b.append(self.closed_round(b[0], b[1], b[2]))
        return compare(name, a[0], b[0], rounds_a, rounds_b)


def compare(name: str, a: str, b: str, rounds_a: list[Measurement], rounds_b: list[Measurement]) -> Comparison:
    clean = [not disturbed(x) and not disturbed(y) for x, y in zip(rounds_a, rounds_b, strict=True)]
    merged_a, merged_b = Histogram(), Histogram()
    for measurement in rounds_a:
        merged_a.add(Histogram.decode(measurement.histogram))
    for measurement in rounds_b:
        merged_b.add(Histogram.decode(measurement.histogram))
    return Comparison(
        name=name,
        a=a,
        b=b,
        rounds_a=rounds_a,
        rounds_b=rounds_b,
        throughput=Ratio.of([m.throughput_per_s for m in rounds_a], [m.throughput_per_s for m in rounds_b], clean),
        server_cpu=Ratio.of(
            [m.server_cpu_ms_per_1k for m in rounds_a], [m.server_cpu_ms_per_1k for m in rounds_b], clean
        ),
        latency_a=LatencySummary.of(merged_a),
        latency_b=LatencySummary.of(merged_b),
        p99=Ratio.of([m.latency.p99_ms for m in rounds_a], [m.latency.p99_ms for m in rounds_b], clean),
    )


def describe(measurement: Measurement) -> str:
    offered = f" offered {measurement.offered_per_s:,.0f}/s" if measurement.mode == "open" else ""
    trouble = ""
    if measurement.errors or measurement.not_sent or measurement.unfinished:
        trouble = f" errors {measurement.errors} not-sent {measurement.not_sent} unfinished {measurement.unfinished}"
    return (
        f"  {measurement.label:<24} {measurement.mode:<6}{offered} {measurement.throughput_per_s:8,.0f}/s"
        f" p50 {measurement.latency.p50_ms:6.2f} p99 {measurement.latency.p99_ms:7.2f} ms"
        f" server {measurement.server_cpu_ms_per_1k:6.0f} CPU-ms/1k, clients {measurement.client_cpu_cores:4.2f} cores,"
        f" machine {measurement.machine_busy_fraction:4.0%} busy,"
        f" outside {measurement.outside_cpu_cores:4.2f} cores{trouble}"
    )


# --------------------------------------------------------------------------- scenarios


def run_transport(bench: Bench, result: RunResult) -> None:
    """Scenario 2 (and the CPU headline): Authorize vs Echo on the same gateway, alternating.

    A quick run that ran the floor takes the floor's gateway Authorize and Echo rounds instead of
    measuring rounds of its own: each of its triples already runs the two on the same gateway,
    one after the other, at the same concurrency (it keeps --quick under 2 minutes)."""
    floor_echo = result.comparisons.get("floor: echo")
    floor_authorize = result.comparisons.get("floor: authorize")
    if bench.plan.quick and floor_echo is not None and floor_authorize is not None:
        result.comparisons["transport"] = compare(
            "authorize vs echo", "authorize", "echo", floor_authorize.rounds_a, floor_echo.rounds_a
        )
        result.checks["transport_rounds"] = TRANSPORT_FROM_FLOOR
        bench.log("transport: quick, the floor's gateway Authorize and Echo rounds")
        return
    gateway = bench.targets["gateway"]
    result.comparisons["transport"] = bench.alternate(
        "authorize vs echo", ("authorize", gateway, "authorize"), ("echo", gateway, "echo"), bench.plan.pairs
    )


TRANSPORT_FROM_FLOOR = (
    "quick run: the gateway Authorize and Echo rounds of the floor's triples (section 0), paired triple by triple"
)

# The redis_script scenario: driver processes (one connection each) and EVALSHAs in flight on each.
REDIS_DIRECT_CONNECTIONS = 4
REDIS_DIRECT_DEPTH = 32


def run_floor(bench: Bench, result: RunResult) -> None:
    """The floor (issue 15): a bare grpc.aio Echo server (benchmarks/bare_echo.py: same grpcio,
    options and uvloop, the gateway's Echo handler, no interceptors, no authentication) in its
    own process, rotated with the gateway's Echo and Authorize in every pair (bare Echo, gateway
    Echo, gateway Authorize), closed loop, same concurrency. Both gateway methods are divided by
    the bare Echo of the same pairs."""
    process = services.bare_echo_process("bare echo")
    process.start()
    bench.servers.append(process)
    target = Target("bare", process, "none", list)
    bench.targets["bare"] = target
    bench.log(f"bare echo: python -m benchmarks.bare_echo on {process.target}")
    try:
        bench.measure(
            "warm-up bare echo",
            target,
            "echo",
            "closed",
            warmup_s=0.0,
            duration_s=bench.plan.initial_warmup_s,
            concurrency=bench.plan.concurrency,
        )
        gateway = bench.targets["gateway"]
        bare: list[Measurement] = []
        echo: list[Measurement] = []
        authorize: list[Measurement] = []
        for index in range(bench.plan.pairs):
            bench.log(f"floor: triple {index + 1}/{bench.plan.pairs}")
            bare.append(bench.closed_round("bare echo", target, "echo"))
            echo.append(bench.closed_round("gateway echo", gateway, "echo"))
            authorize.append(bench.closed_round("gateway authorize", gateway, "authorize"))
        result.comparisons["floor: echo"] = compare("floor: echo / bare", "gateway echo", "bare echo", echo, bare)
        result.comparisons["floor: authorize"] = compare(
            "floor: authorize / bare", "gateway authorize", "bare echo", authorize, bare
        )
    finally:
        bench.stop_target("bare")


def run_redis_client(bench: Bench, result: RunResult) -> None:
    """The lean Redis path against redis-py (issue 15), in one run: a second gateway configured
    as the reference one (SUBSIDY_REDIS_CLIENT=lean, the default) but with SUBSIDY_REDIS_CLIENT=
    redis-py, and the bare grpc.aio Echo server; each triple runs bare Echo, then Authorize on
    the two gateways (their order swapped every triple, so a drift of the machine does not
    favour one), closed loop, same concurrency. Both Authorizes are divided by the bare Echo of
    the same triples, and lean by redis-py."""
    bare_process = services.bare_echo_process("bare echo")
    bare_process.start()
    bench.servers.append(bare_process)
    bare_target = Target("bare", bare_process, "none", list)
    bench.targets["bare"] = bare_target
    redis_server = bench.redis["always"]
    name = "gateway redis-py"
    try:
        redis_py = bench.start_gateway(name, GatewaySettings(redis_client="redis-py"), redis_server)
        lean = bench.targets["gateway"]
        if not bench.plan.quick:  # quick: a smoke run, each round's own warm-up only
            bench.measure(
                "warm-up bare echo",
                bare_target,
                "echo",
                "closed",
                warmup_s=0.0,
                duration_s=bench.plan.initial_warmup_s,
                concurrency=bench.plan.concurrency,
            )
            bench.warm(redis_py)
        bare: list[Measurement] = []
        through_lean: list[Measurement] = []
        through_redis_py: list[Measurement] = []
        triples = 1 if bench.plan.quick else bench.plan.pairs  # quick: one keeps --quick under 2 minutes
        for index in range(triples):
            bench.log(f"redis_client: triple {index + 1}/{triples}")
            bare.append(bench.closed_round("bare echo", bare_target, "echo"))
            order = [("lean", lean, through_lean), ("redis-py", redis_py, through_redis_py)]
            for label, target, rounds in order if index % 2 == 0 else reversed(order):
                rounds.append(bench.closed_round(f"authorize {label}", target, "authorize"))
        result.comparisons["redis_client: lean / bare"] = compare(
            "redis_client: authorize lean / bare", "authorize lean", "bare echo", through_lean, bare
        )
        result.comparisons["redis_client: redis-py / bare"] = compare(
            "redis_client: authorize redis-py / bare", "authorize redis-py", "bare echo", through_redis_py, bare
        )
        result.comparisons["redis_client: lean / redis-py"] = compare(
            "redis_client: authorize lean / redis-py",
            "authorize lean",
            "authorize redis-py",
            through_lean,
            through_redis_py,
        )
    finally:
        if name in bench.targets:
            bench.stop_target(name)
        bench.stop_target("bare")


def run_redis_script(bench: Bench, result: RunResult) -> None:
    """The authorize script driven directly (benchmarks/redis_direct.py): pipelined EVALSHAs of
    approvable Authorizes from several connections against the bench's dedicated Redis
    (appendfsync always), its reference data republished and the script loaded as the gateway
    loads it. Each round: CONFIG RESETSTAT at the window's start, the redis-server's CPU and
    INFO commandstats over the window; the bench's Redis is emptied and republished between
    rounds (every approval leaves an authorization, a hold and a ledger entry behind)."""
    redis_server = bench.redis["always"]
    plan = bench.plan
    rounds = 1 if plan.quick else plan.pairs  # quick: one round keeps --quick under 2 minutes
    warmup_s = plan.round_warmup_s
    per_connection = math.ceil(redis_direct.BUILD_CEILING_PER_S * (warmup_s + plan.round_s) / REDIS_DIRECT_CONNECTIONS)
    for index in range(rounds):
        if index:
            bench.reset_state()
        services.run_async(redis_direct.preload_scripts(redis_server.url))
        spec = redis_direct.DirectSpec(
            redis_host=services.LOOPBACK,
            redis_port=redis_server.port,
            prefix=bench.prefix,
            hold_ttl_s=HOLD_TTL_S,
            terminal_id=bench.terminals[0].terminal_id,
            merchant_id=services.MERCHANT_ID,
            campaign_id=services.CAMPAIGN_ID,
            gtin=services.GTIN,
            price_fen=services.PRICE_FEN,
            depth=REDIS_DIRECT_DEPTH,
            commands=per_connection,
            warmup_s=warmup_s,
            duration_s=plan.round_s,
        )
        record = redis_script_round(redis_server, spec, index + 1)
        result.redis_script.append(record)
        bench.log(
            f"  redis script round {index + 1}/{rounds}: {record['calls_per_s']:,.0f} calls/s,"
            f" {record['authorize_per_redis_core_s']:,.0f} per Redis core"
            f" ({record['redis_cpu_cores']:.2f} cores), EVALSHA {record['evalsha_usec_per_call']:.1f} µs/call,"
            f" outcomes {record['outcomes']}{' (ran out of commands)' if record['ran_out'] else ''}"
        )


def redis_script_round(redis_server: RedisServer, spec: redis_direct.DirectSpec, number: int) -> dict[str, Any]:
    """One round of the redis_script scenario; its measurements as a JSON-ready dict."""
    window: dict[str, Any] = {}

    def sample(window_start: float, window_end: float) -> None:
        client = redis_server.client()
        try:
            _sleep_until(window_start)
            client.config_resetstat()
            window["cpu_start"] = services.process_cpu_s(redis_server.pid, include_reaped_children=False)
            window["machine_start"] = MachineCpu.read()
            window["at_start"] = time.monotonic()
            _sleep_until(window_end)
            window["cpu_end"] = services.process_cpu_s(redis_server.pid, include_reaped_children=False)
            window["machine_end"] = MachineCpu.read()
            window["at_end"] = time.monotonic()
            window["commandstats"] = client.info("commandstats")
        finally:
            client.close()

    results = redis_direct.run_round(spec, REDIS_DIRECT_CONNECTIONS, sample)
    calls = sum(item.completed_in_window for item in results)
    outcomes: Counter[str] = Counter()
    for item in results:
        outcomes.update(item.outcomes)
    elapsed = window["at_end"] - window["at_start"]
    redis_cpu_s = window["cpu_end"] - window["cpu_start"]
    machine_start, machine_end = window["machine_start"], window["machine_end"]
    machine_total = machine_end.total - machine_start.total
    evalsha = window["commandstats"].get("cmdstat_evalsha", {})
    record = {
        "round": number,
        "connections": REDIS_DIRECT_CONNECTIONS,
        "depth": REDIS_DIRECT_DEPTH,
        "window_s": elapsed,
        "calls": calls,
        "calls_per_s": calls / elapsed if elapsed else math.nan,
        "redis_cpu_cores": redis_cpu_s / elapsed if elapsed else math.nan,
        "authorize_per_redis_core_s": calls / redis_cpu_s if redis_cpu_s else math.nan,
        "redis_cpu_us_per_call": 1e6 * redis_cpu_s / calls if calls else math.nan,
        "evalsha_calls": int(evalsha.get("calls", 0)),
        "evalsha_usec_per_call": float(evalsha.get("usec_per_call", math.nan)),
        "machine_busy_fraction": (
            (machine_end.busy - machine_start.busy) / machine_total if machine_total else math.nan
        ),
        "outcomes": dict(outcomes),
        "ran_out": any(item.ran_out for item in results),
    }
    return record


def run_tls(bench: Bench, result: RunResult) -> None:
    """What TLS costs per Authorize: a second gateway, configured as the reference one but with
    TLS on its listener (ECDSA P-256 certificate from a CA made for the run; TLS 1.3 is what
    gRPC negotiates), alternating with the plaintext reference gateway. Connections are kept
    across calls, as terminals keep theirs, so this is the steady per-call cost (record
    encryption, framing), not the handshake's."""
    folder = services.BENCH_DATA / "certs"
    ca = make_ca("Benchmark CA")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(ca.certificate_pem)
    issue(ca, services.LOOPBACK, server=True, ips=[services.LOOPBACK]).write(
        folder / "server.pem", folder / "server.key"
    )
    settings = GatewaySettings(
        tls_cert=str(folder / "server.pem"), tls_key=str(folder / "server.key"), tls_ca=str(folder / "ca.pem")
    )
    target = bench.start_gateway("gateway tls", settings, bench.redis["always"])
    try:
        if not bench.plan.quick:
            bench.warm(target)
        result.comparisons["tls"] = bench.alternate(
            "tls vs plaintext",
            ("tls", target, "authorize"),
            ("plaintext", bench.targets["gateway"], "authorize"),
            bench.plan.side_pairs,
        )
    finally:
        bench.stop_target("gateway tls")


def run_baseline(bench: Bench, result: RunResult) -> None:
    """Scenario 3: the gateway vs one PostgreSQL transaction per request, same hot budget."""
    result.comparisons["baseline"] = bench.alternate(
        "gateway vs baseline",
        ("gateway", bench.targets["gateway"], "authorize"),
        ("baseline", bench.targets["baseline"], "authorize"),
        bench.plan.pairs,
    )
    approved, subsidy, reserved = services.run_async(baseline_module.ledger_matches_budget(bench.baseline_dsn))
    result.checks["baseline_ledger"] = {
        "approved_rows": approved,
        "ledger_subsidy_fen": subsidy,
        "budget_reserved_fen": reserved,
        "consistent": subsidy == reserved,
    }


def closed_loop_maximum(bench: Bench, result: RunResult, name: str) -> float:
    """The median closed-loop Authorize throughput of ``name`` measured so far in this run, or
    a fresh closed-loop round when none was."""
    for comparison in result.comparisons.values():
        for rounds in (comparison.rounds_a, comparison.rounds_b):
            if rounds and rounds[0].server == name and rounds[0].method == "authorize":
                return statistics.median(m.throughput_per_s for m in rounds)
    return bench.closed_round(f"{name} max", bench.targets[name], "authorize").throughput_per_s


def run_open_loop(bench: Bench, result: RunResult) -> None:
    """Scenario 1, open loop: fixed arrival rates as fractions of the closed-loop maxima.

    First the gateway at fractions of its own maximum. Then, at each fraction of the
    *baseline's* maximum (a load both can carry), the gateway, the baseline and Echo (the
    transport floor) in turn, ``open_loop_pairs`` times, so a disturbance from outside lands on
    all three alike; each side's phases are merged. A quick run measures only what the p99
    headline needs: the gateway and the baseline at the baseline's rates (it keeps --quick
    under 2 minutes)."""
    plan = bench.plan
    if not plan.quick:
        gateway_max = closed_loop_maximum(bench, result, "gateway")
        for fraction in plan.open_loop_fractions:
            result.open_loop_gateway.append(open_point(bench, "gateway", fraction, "gateway", gateway_max))
    if "baseline" not in bench.targets:
        return
    baseline_max = closed_loop_maximum(bench, result, "baseline")
    turns = [("gateway", "gateway", "authorize"), ("baseline", "baseline", "authorize")]
    if not plan.quick:
        turns.append(("echo", "gateway", "echo"))
    for fraction in plan.open_loop_fractions:
        sides: dict[str, list[Measurement]] = {side: [] for side, _, _ in turns}
        for _ in range(plan.open_loop_pairs):
            for side, name, method in turns:
                sides[side].append(open_phase(bench, name, fraction, "baseline", baseline_max, method))
        points = {
            side: OpenLoopPoint(fraction, "baseline", baseline_max, merge(phases), phases)
            for side, phases in sides.items()
        }
        result.open_loop_equal.append((points["gateway"], points["baseline"]))
        if "echo" in points:
            result.open_loop_floor.append(points["echo"])


def open_phase(
    bench: Bench, name: str, fraction: float, basis: str, basis_per_s: float, method: str = "authorize"
) -> Measurement:
    return bench.measure(
        f"{name} {method} @{fraction:.0%} of {basis} max",
        bench.targets[name],
        method,
        "open",
        warmup_s=bench.plan.open_loop_warmup_s,
        duration_s=bench.plan.open_loop_s,
        rate_per_s=fraction * basis_per_s,
    )


def open_point(
    bench: Bench, name: str, fraction: float, basis: str, basis_per_s: float, method: str = "authorize"
) -> OpenLoopPoint:
    measurement = open_phase(bench, name, fraction, basis, basis_per_s, method)
    return OpenLoopPoint(fraction, basis, basis_per_s, measurement, [measurement])


AOF_LATENCY_FRACTION = 0.5
SCALING_VARIANTS = (
    ("2 workers", GatewaySettings(workers=2, use_uvloop=True), "always"),
    ("uvloop off", GatewaySettings(workers=1, use_uvloop=False), "always"),
    ("AOF everysec", GatewaySettings(workers=1, use_uvloop=True), "everysec"),
)


# A quick run leaves uvloop off out (it keeps --quick under 2 minutes).
QUICK_SCALING_VARIANTS = ("2 workers", "AOF everysec")


def run_scaling(bench: Bench, result: RunResult) -> None:
    """Scenario 5: each variant alternates with the reference gateway (1 worker, uvloop on,
    AOF always), one variant at a time, so only one extra server is up."""
    reference = bench.targets["gateway"]
    for variant, settings, appendfsync in SCALING_VARIANTS:
        if bench.plan.quick and variant not in QUICK_SCALING_VARIANTS:
            continue
        redis_server = bench.redis.get(appendfsync) or bench.start_redis(appendfsync)
        if appendfsync != "always":
            services.run_async(services.republish_reference(bench.gateway_dsn, redis_server.url, bench.prefix))
        name = "gateway " + variant
        target = bench.start_gateway(name, settings, redis_server)
        try:
            if not bench.plan.quick:
                bench.warm(target)
            comparison = bench.alternate(
                f"{variant} vs reference",
                (variant, target, "authorize"),
                ("reference", reference, "authorize"),
                bench.plan.scaling_pairs,
            )
            result.comparisons["scaling: " + variant] = comparison
            if appendfsync != "always" and not bench.plan.quick:
                # What an fsync per write costs in latency: both at the same moderate rate.
                basis = statistics.median(m.throughput_per_s for m in comparison.rounds_b)
                result.open_loop_aof = [
                    open_point(bench, name, AOF_LATENCY_FRACTION, "gateway", basis),
                    open_point(bench, "gateway", AOF_LATENCY_FRACTION, "gateway", basis),
                ]
        finally:
            bench.stop_target(name)


def run_ledger_lag(bench: Bench, result: RunResult) -> None:
    """Scenario 6: the ledger writer (``python -m server.ledger writer``, its own process, as
    ``make run`` starts it) drains the stream while the gateway takes closed-loop Authorize
    load. Sampled every 250 ms: ``XLEN {prefix}:ledger`` (the writer trims what it has
    acknowledged, so the length is the backlog) and the group's pending count; after the load
    stops, the time until both are zero. When the writer is not there, says so and measures
    nothing."""
    try:
        from storage.postgres.writer import WriterConfig
    except ImportError:
        result.ledger = {"status": "not measured: ledger writer not built"}
        return
    # The group the writer uses by default (server.ledger does not override it).
    group = WriterConfig(pg_dsn="", redis_url="", prefix=bench.prefix).group
    plan, gateway = bench.plan, bench.targets["gateway"]
    redis_server = bench.redis["always"]
    writer = services.writer_process("ledger-writer", redis_server.url, bench.prefix, bench.gateway_dsn)
    writer.start(wait_serving=False)
    bench.servers.append(writer)
    client = redis_server.client()
    try:
        deadline = time.monotonic() + 30.0
        while not services.ledger_backlog(client, bench.prefix, group).group_exists:
            if time.monotonic() > deadline or not writer.running():
                raise RuntimeError(f"the ledger writer did not create its group; log: {writer.log_path}")
            time.sleep(0.1)
        samples: list[tuple[float, int, int]] = []

        def sample(window_start: float, window_end: float) -> None:
            while time.monotonic() < window_end - 0.25:
                backlog = services.ledger_backlog(client, bench.prefix, group)
                samples.append((time.monotonic() - window_start, backlog.stream_length, backlog.pending))
                time.sleep(0.25)

        writer_cpu_before = writer.cpu_s()
        load = bench.measure(
            "gateway + ledger writer",
            gateway,
            "authorize",
            "closed",
            warmup_s=plan.round_warmup_s,
            duration_s=plan.ledger_s,
            concurrency=plan.concurrency,
            during=sample,
        )
        load_stopped = time.monotonic()
        at_stop = services.ledger_backlog(client, bench.prefix, group)
        drained_after_s: float | None = None
        while time.monotonic() - load_stopped < plan.drain_timeout_s:
            backlog = services.ledger_backlog(client, bench.prefix, group)
            if backlog.stream_length == 0 and backlog.pending == 0:
                drained_after_s = time.monotonic() - load_stopped
                break
            time.sleep(0.1)
        writer_cpu_s = writer.cpu_s() - writer_cpu_before
        events = services.run_async(services.count_ledger_events(bench.gateway_dsn))
    finally:
        client.close()
        writer.stop()
        bench.servers.remove(writer)
    lengths = sorted(length for _, length, _ in samples) or [0]
    result.ledger = {
        "status": "measured",
        "group": group,
        "load": load,
        "stream_length_p50": lengths[len(lengths) // 2],
        "stream_length_max": lengths[-1],
        "pending_max": max((pending for _, _, pending in samples), default=0),
        "stream_length_at_stop": at_stop.stream_length,
        "drained_after_s": drained_after_s,
        "drain_timeout_s": plan.drain_timeout_s,
        "events_written": events,
        "writer_cpu_ms_per_1k_events": writer_cpu_s * 1_000_000 / events if events else math.nan,
        "writer_cpu_s": writer_cpu_s,
        "samples": samples,
    }


# The crowd: a tenth claims a second time (a double tap, or a second phone), a few are outside
# the district; everyone's phone reports a fresh GPS fix, from the system API (WGS-84) or a map
# SDK (GCJ-02), half each.
FLASH_LEAD_S = 2.0  # from loading the campaign to the tranche's opening
FLASH_OUTSIDE_SHARE = 0.02
FLASH_FIX_AGE_MS_MAX = 30_000
FLASH_WARMUP_CLAIMS = 400
# Known places (WGS-84), from examples/merchants/xiaoshan-region.geojson.yaml and tests/unit/test_geo.py.
FLASH_INSIDE = ((30.18, 120.26), (30.23, 120.43), (30.05, 120.33), (29.95, 120.30), (30.10, 120.45))
FLASH_OUTSIDE = ((30.208, 120.212), (30.25, 120.14))


def resident_id_number(rng: random.Random) -> str:
    """A valid 18-character resident ID number (Hangzhou region code, a real birth date, the
    GB 11643 check character): as tests/conftest.py makes them."""
    born = date(1950, 1, 1) + timedelta(days=rng.randrange(365 * 50))
    first = f"330109{born:%Y%m%d}{rng.randrange(1000):03d}"
    return first + check_digit(first)


def crowd_claims(claims: int, people: int, arrival_s: float, rng: random.Random) -> tuple[list[Claim], int]:
    """``claims`` presses by ``people`` distinct people (each presses once, ``claims - people``
    of them twice), in random order, due uniformly over ``arrival_s``; returns them ordered by
    due time, and how many people are outside the district."""
    numbers: list[str] = []
    seen: set[str] = set()
    while len(numbers) < people:
        number = resident_id_number(rng)
        if number not in seen:
            seen.add(number)
            numbers.append(number)
    outside = set(rng.sample(range(people), round(people * FLASH_OUTSIDE_SHARE)))
    places: list[tuple[float, float, int]] = []
    for person in range(people):
        latitude, longitude = rng.choice(FLASH_OUTSIDE if person in outside else FLASH_INSIDE)
        if person % 2:
            latitude, longitude = wgs84_to_gcj02(latitude, longitude)
            places.append((latitude, longitude, common_pb2.COORDINATE_SYSTEM_GCJ02))
        else:
            places.append((latitude, longitude, common_pb2.COORDINATE_SYSTEM_WGS84))
    order = list(range(people)) + rng.sample(range(people), claims - people)
    rng.shuffle(order)
    offsets = sorted(rng.uniform(0.0, arrival_s) for _ in order)
    crowd = [
        Claim(person, numbers[person], *places[person], rng.randrange(FLASH_FIX_AGE_MS_MAX), offset)
        for person, offset in zip(order, offsets, strict=True)
    ]
    return crowd, len(outside)


def crowd_measurement(
    label: str, target: Target, in_flight: int, results: list[CrowdResult], before: CpuSnapshot, after: CpuSnapshot
) -> Measurement:
    """The burst as a :class:`Measurement`: throughput over the opening to the last answer,
    latency from each claim's due time, CPU over the snapshots (the opening to just after the
    last answer: the server is idle in between)."""
    latency, send_lag = Histogram(), Histogram()
    outcomes: Counter[str] = Counter()
    for result in results:
        latency.add(Histogram.decode(result.wait))
        send_lag.add(Histogram.decode(result.send_lag))
        outcomes.update(result.outcomes)
    answered = sum(result.answered for result in results)
    window_s = max(result.last_answered for result in results) - before.at
    cpu_window_s = after.at - before.at
    per_1k = 1_000_000.0 / answered if answered else math.nan
    workers_used = [end - start for start, end in zip(before.workers_s, after.workers_s, strict=False)]
    workers_total = sum(workers_used)
    machine_total = after.machine.total - before.machine.total
    machine_busy_s = (after.machine.busy - before.machine.busy) / services.CLOCK_TICKS_PER_S
    ours_s = (
        (after.server_s - before.server_s) + (after.store_s - before.store_s) + (after.clients_s - before.clients_s)
    )
    return Measurement(
        label=label,
        server=target.name,
        method="claim",
        mode="burst",
        concurrency=in_flight,
        offered_per_s=math.nan,
        window_s=window_s,
        throughput_per_s=answered / window_s,
        latency=LatencySummary.of(latency),
        send_lag=LatencySummary.of(send_lag),
        outcomes=dict(outcomes),
        errors=sum(count for outcome, count in outcomes.items() if not outcome.startswith(("ISSUED", "DECLINED_"))),
        not_sent=0,
        unfinished=sum(result.unfinished for result in results),
        server_cpu_ms_per_1k=(after.server_s - before.server_s) * per_1k,
        server_cpu_cores=(after.server_s - before.server_s) / cpu_window_s,
        worker_cpu_shares=tuple(used / workers_total for used in workers_used) if workers_total else (),
        store=target.store,
        store_cpu_ms_per_1k=(after.store_s - before.store_s) * per_1k,
        client_cpu_ms_per_1k=(after.clients_s - before.clients_s) * per_1k,
        client_cpu_cores=(after.clients_s - before.clients_s) / cpu_window_s,
        machine_busy_fraction=(after.machine.busy - before.machine.busy) / machine_total if machine_total else 0.0,
        outside_cpu_cores=max(machine_busy_s - ours_s, 0.0) / cpu_window_s,
        histogram=latency.encode(),
        send_lag_histogram=send_lag.encode(),
    )


def flash_burst(
    bench: Bench, target: Target, partner_secret: str, label: str, quota: int, crowd: list[Claim]
) -> FlashBurst:
    """Loads a fresh campaign whose one tranche of ``quota`` opens ``FLASH_LEAD_S`` from now,
    lets the crowd loose at the opening, and checks what was issued."""
    plan = bench.plan
    redis_server = bench.redis["always"]
    campaign_id = "bench-flash-" + secrets.token_hex(4)
    opening = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1 + FLASH_LEAD_S)
    services.run_async(
        services.load_gateway_reference(
            bench.gateway_dsn,
            redis_server.url,
            bench.prefix,
            services.flash_document(partner_secret, campaign_id, opening, quota),
        )
    )
    # CLOCK_MONOTONIC is what the clients schedule by; the script compares the opening with
    # Redis's clock (the same machine's wall clock).
    start_at = time.monotonic() + (opening.timestamp() - time.time())
    clients = plan.clients
    specs = [
        CrowdSpec(
            target=target.process.target,
            partner_id=services.PARTNER_ID,
            secret=partner_secret,
            campaign_id=campaign_id,
            category=services.FLASH_CATEGORY,
            start_at=start_at,
            claims=tuple(crowd[worker::clients]),
            max_in_flight=max(1, plan.flash_in_flight // clients),
            channels=plan.channels,
        )
        for worker in range(clients)
    ]
    store_pids = target.store_pids()
    worker_pids = target.process.worker_pids()
    edges: list[CpuSnapshot] = []

    def opening_edge() -> None:
        _sleep_until(start_at)
        edges.append(bench._snapshot(target, store_pids, worker_pids))

    results = bench.pool.run_crowd(specs, on_wait=opening_edge)
    edges.append(bench._snapshot(target, store_pids, worker_pids))
    measurement = crowd_measurement(label, target, plan.flash_in_flight, results, edges[0], edges[1])
    service = Histogram()
    for result in results:
        service.add(Histogram.decode(result.service))
    issued = sorted(moment for result in results for moment, _ in result.issued)
    issued_people = len({person for result in results for _, person in result.issued})
    claimed = services.run_async(
        services.quota_claimed(redis_server.url, bench.prefix, campaign_id, services.FLASH_CATEGORY)
    )
    burst = FlashBurst(
        campaign_id=campaign_id,
        measurement=measurement,
        service=LatencySummary.of(service),
        service_histogram=service.encode(),
        exhausted_after_s=issued[quota - 1] - start_at if len(issued) >= quota else None,
        issued=len(issued),
        issued_people=issued_people,
        claimed_counter=claimed,
        decline_reasons={
            outcome.removeprefix("DECLINED_"): count
            for outcome, count in sorted(measurement.outcomes.items(), key=lambda item: -item[1])
            if outcome.startswith("DECLINED_")
        },
        correct=len(issued) == issued_people == claimed == quota and measurement.errors == 0,
    )
    bench.log(describe_burst(burst, quota))
    return burst


def describe_burst(burst: FlashBurst, quota: int) -> str:
    measurement = burst.measurement
    exhausted = f"{burst.exhausted_after_s:.2f} s" if burst.exhausted_after_s is not None else "never"
    return (
        f"  {measurement.label:<24} {measurement.throughput_per_s:8,.0f} claims/s over {measurement.window_s:.1f} s,"
        f" wait p50 {measurement.latency.p50_ms:,.0f} p99 {measurement.latency.p99_ms:,.0f}"
        f" p99.9 {measurement.latency.p999_ms:,.0f} ms, service p99 {burst.service.p99_ms:,.0f} ms;"
        f" tranche exhausted after {exhausted}; issued {burst.issued:,} to {burst.issued_people:,} people,"
        f" counter {burst.claimed_counter:,}, quota {quota:,}: {'OK' if burst.correct else 'WRONG'};"
        f" declines {burst.decline_reasons}; server {measurement.server_cpu_ms_per_1k:,.0f} CPU-ms/1k,"
        f" outside {measurement.outside_cpu_cores:4.2f} cores"
        + (f", errors {measurement.errors}" if measurement.errors else "")
    )


FLASH_SETTINGS = GatewaySettings(workers=2, use_uvloop=True)


def run_flash_crowd(bench: Bench, result: RunResult) -> None:
    """Scenario 7: at T a tranche of ``flash_quota`` qualifications opens and a crowd of
    ``flash_claims`` claims (``flash_people`` people, the rest claiming twice) arrives, at most
    ``flash_in_flight`` unanswered at once, against a 2-worker gateway. Authorize rounds on the
    same server before the first crowd and after each give the reference. Fails the run when a
    crowd was not issued exactly the quota, once per person."""
    plan = bench.plan
    partner_secret = secrets.token_urlsafe(32)
    name = "gateway 2 workers (flash)"
    target = bench.start_gateway(name, FLASH_SETTINGS, bench.redis["always"])
    rng = random.Random()
    try:
        if not bench.plan.quick:  # quick: the warm-up crowd and each round's own warm-up only
            bench.warm(target)
        # The claim path warm too (region, HMAC, the campaign cache); not measured.
        warm_crowd, _ = crowd_claims(FLASH_WARMUP_CLAIMS, FLASH_WARMUP_CLAIMS, 0.5, rng)
        flash_burst(bench, target, partner_secret, "warm-up crowd", FLASH_WARMUP_CLAIMS // 4, warm_crowd)
        references = [bench.closed_round("authorize (reference)", target, "authorize")]
        bursts: list[FlashBurst] = []
        outside = 0
        for index in range(plan.flash_bursts):
            bench.log(f"flash crowd {index + 1}/{plan.flash_bursts}")
            crowd, outside = crowd_claims(plan.flash_claims, plan.flash_people, plan.flash_arrival_s, rng)
            bursts.append(flash_burst(bench, target, partner_secret, f"crowd {index + 1}", plan.flash_quota, crowd))
            references.append(bench.closed_round("authorize (reference)", target, "authorize"))
    finally:
        bench.stop_target(name)
    # The Authorize rounds either side of each burst are its reference.
    around = list(pairwise(references))
    clean = [
        not (disturbed(burst.measurement) or disturbed(before) or disturbed(after))
        for burst, (before, after) in zip(bursts, around, strict=True)
    ]
    result.flash_crowd = FlashCrowd(
        server=name,
        workers=FLASH_SETTINGS.workers,
        quota=plan.flash_quota,
        claims=plan.flash_claims,
        people=plan.flash_people,
        outside_region_people=outside,
        in_flight=plan.flash_in_flight,
        arrival_s=plan.flash_arrival_s,
        bursts=bursts,
        references=references,
        throughput=Ratio.of(
            [burst.measurement.throughput_per_s for burst in bursts],
            [(r0.throughput_per_s + r1.throughput_per_s) / 2 for r0, r1 in around],
            clean,
        ),
        server_cpu=Ratio.of(
            [burst.measurement.server_cpu_ms_per_1k for burst in bursts],
            [(r0.server_cpu_ms_per_1k + r1.server_cpu_ms_per_1k) / 2 for r0, r1 in around],
            clean,
        ),
    )
    result.checks["flash_crowd"] = [
        {
            "campaign_id": burst.campaign_id,
            "quota": plan.flash_quota,
            "issued": burst.issued,
            "issued_people": burst.issued_people,
            "claimed_counter": burst.claimed_counter,
            "errors": burst.measurement.errors,
            "correct": burst.correct,
        }
        for burst in bursts
    ]
    wrong = [index + 1 for index, burst in enumerate(bursts) if not burst.correct]
    if wrong:
        raise RuntimeError(
            f"flash crowd: crowd(s) {wrong} were not issued exactly the quota of {plan.flash_quota:,}, once per"
            f" person, without errors: {result.checks['flash_crowd']}"
        )


def alternate_methods(
    bench: Bench, name: str, a: tuple[str, Target], b: tuple[str, Target], methods: tuple[str, ...], pairs: int
) -> dict[str, Comparison]:
    """A and B alternate for each method within every pair (A B per method, then the next
    pair), so a drift in the machine's load lands on both sides of every comparison alike."""
    rounds: dict[str, tuple[list[Measurement], list[Measurement]]] = {method: ([], []) for method in methods}
    for index in range(pairs):
        bench.log(f"{name}: pair {index + 1}/{pairs}")
        for method in methods:
            rounds[method][0].append(bench.closed_round(f"{a[0]} {method}", a[1], method))
            rounds[method][1].append(bench.closed_round(f"{b[0]} {method}", b[1], method))
    return {
        method: compare(f"{name}: {method}", f"{a[0]} {method}", f"{b[0]} {method}", *rounds[method])
        for method in methods
    }


def run_tracing(bench: Bench, result: RunResult) -> None:
    """What SUBSIDY_TRACING=otlp costs per call: a second gateway, configured as the reference
    one but tracing every call (one span each, BatchSpanProcessor, the OTLP/gRPC exporter) to a
    receiver of its own (benchmarks/otlp_sink.py, whose CPU is counted with the store's),
    alternating with the reference gateway (tracing off) on Authorize and on Echo. After the
    rounds the traced gateway stops (flushing its queue) and the receiver reports how many
    spans it got. Then (not in a quick run) the call guard's bookkeeping is timed in this
    process (benchmarks/bookkeeping.py)."""
    sink = services.otlp_sink_process("otlp sink")
    sink.start(wait_serving=False)
    bench.servers.append(sink)
    redis_server = bench.redis["always"]
    name = "gateway traced"
    try:
        settings = GatewaySettings(tracing="otlp", tracing_endpoint=f"http://{sink.target}")
        target = bench.start_gateway(name, settings, redis_server)
        target.store = f"redis ({redis_server.appendfsync}) + OTLP receiver"
        target.store_pids = lambda: [redis_server.pid, sink.pid]
        if not bench.plan.quick:
            bench.warm(target)
        comparisons = alternate_methods(
            bench,
            "tracing",
            ("traced", target),
            ("untraced", bench.targets["gateway"]),
            ("authorize", "echo"),
            bench.plan.side_pairs,
        )
        result.comparisons.update({comparison.name: comparison for comparison in comparisons.values()})
    finally:
        if name in bench.targets:
            bench.stop_target(name)
        sink.stop()
        bench.servers.remove(sink)
    received = [line for line in sink.log_path.read_text().splitlines() if line.startswith("spans ")]
    result.checks["tracing"] = {"receiver": received[-1] if received else "no count (receiver did not stop cleanly)"}
    if bench.plan.quick:  # quick: left out, it keeps --quick under 2 minutes
        return
    bench.log("bookkeeping: the call guard's metrics and a span, timed in this process")
    result.checks["bookkeeping"] = bookkeeping.measure()
    bench.log(f"  {result.checks['bookkeeping']}")


def run_structure(bench: Bench, result: RunResult) -> None:
    """The whole of issue 11's restructuring, before against after, in one run: a gateway from
    each checkout (``--before-tree``; ``--after-tree``, else this one), each running its own
    code (checked: tree_facts) on this virtualenv's packages, each with its reference data
    loaded by its own ``python -m server.reference load`` into its own database and key prefix
    of the bench's Redis. They alternate on Authorize and on Echo, pair by pair."""
    plan = bench.plan
    if plan.before_tree is None:
        raise RuntimeError("the structure scenario needs --before-tree (a checkout of the commit to compare with)")
    trees = {"before": plan.before_tree, "after": plan.after_tree or services.ROOT}
    redis_server = bench.redis["always"]
    facts: dict[str, Any] = {}
    targets: dict[str, Target] = {}
    databases = {side: f"{services.GATEWAY_DATABASE}_{side}" for side in trees}
    try:
        for side, tree in trees.items():
            facts[side] = services.tree_facts(tree)
            bench.log(f"structure: {side} = {tree} at {facts[side]['commit']}, modules {facts[side]['modules']}")
            dsn = services.with_database(bench.admin_dsn, databases[side])
            services.run_async(services.recreate_database(bench.admin_dsn, databases[side]))
            services.load_tree_reference(tree, dsn, redis_server.url, f"{bench.prefix}{side}", bench.document)
            process = services.gateway_process(
                f"gateway {side}",
                GatewaySettings(tree=tree),
                redis_server.url,
                f"{bench.prefix}{side}",
                dsn,
                HOLD_TTL_S,
                bench.programme_key,
            )
            process.start()
            bench.servers.append(process)
            targets[side] = Target(
                f"gateway {side}", process, f"redis ({redis_server.appendfsync})", lambda: [redis_server.pid]
            )
            bench.targets[targets[side].name] = targets[side]
            bench.warm(targets[side])
        comparisons = alternate_methods(
            bench,
            "structure",
            ("after", targets["after"]),
            ("before", targets["before"]),
            ("authorize", "echo"),
            plan.pairs,
        )
        result.comparisons.update({comparison.name: comparison for comparison in comparisons.values()})
    finally:
        for target in targets.values():
            bench.stop_target(target.name)
        for side in trees:
            try:
                services.run_async(services.drop_database(bench.admin_dsn, databases[side]))
            except Exception as error:
                say(f"postgres: could not drop {databases[side]}: {error}")
        client = redis_server.client()
        try:
            for side in trees:
                services.delete_prefix_keys(client, f"{bench.prefix}{side}")
        finally:
            client.close()
    result.checks["structure"] = facts


RUNNERS: dict[str, Callable[[Bench, RunResult], None]] = {
    "floor": run_floor,
    "redis_client": run_redis_client,
    "redis_script": run_redis_script,
    "transport": run_transport,
    "tls": run_tls,
    "tracing": run_tracing,
    "structure": run_structure,
    "baseline": run_baseline,
    "open_loop": run_open_loop,
    "scaling": run_scaling,
    "ledger_lag": run_ledger_lag,
    "flash_crowd": run_flash_crowd,
}


def run_scenarios(bench: Bench, result: RunResult) -> None:
    for name in bench.plan.scenarios:
        bench.log(f"scenario {name}")
        bench.reset_state()
        RUNNERS[name](bench, result)


# --------------------------------------------------------------------------- profiling

# py-spy's default (blocking) sampling with --native stalls the server at high rates (at 250 Hz
# the gateway fell from ~800 to ~40 calls/s); at 50 Hz it costs it about a fifth of its
# throughput, which leaves the profile's proportions representative.
PY_SPY_RATE_HZ = 50


def py_spy_binary() -> str:
    candidate = Path(sys.executable).parent / "py-spy"
    found = str(candidate) if candidate.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy not found (it is a dev dependency: make venv)")
    return found


def profile_gateway(bench: Bench, method: str, duration_s: float, directory: Path) -> Profile:
    """``py-spy record --native`` on the gateway process while the clients drive ``method``
    closed-loop; summarized per 1,000 calls completed meanwhile."""
    target = bench.targets["gateway"]
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / f"{method}.pyspy.txt"
    raw.unlink(missing_ok=True)

    def record(window_start: float, window_end: float) -> None:
        del window_start
        command = [
            py_spy_binary(),
            "record",
            "--native",
            "--rate",
            str(PY_SPY_RATE_HZ),
            "--duration",
            str(max(1, int(window_end - time.monotonic()))),
            "--pid",
            str(target.process.pid),
            "--format",
            "raw",
            "--output",
            str(raw),
        ]
        completed = subprocess.run(command, capture_output=True, timeout=duration_s + 60, check=False)
        if completed.returncode != 0:
            say(f"py-spy failed ({completed.returncode}): {completed.stderr.decode(errors='replace')[-500:]}")

    measurement = bench.measure(
        f"profile {method}",
        target,
        method,
        "closed",
        warmup_s=1.0,
        duration_s=duration_s,
        concurrency=bench.plan.concurrency,
        during=record,
    )
    calls = round(measurement.throughput_per_s * measurement.window_s)
    return summarize_profile(method, raw, PY_SPY_RATE_HZ, calls, measurement.server_cpu_ms_per_1k)


def run_profiles(bench: Bench, result: RunResult) -> None:
    """Where the time goes: the same closed loop for Authorize and for Echo under py-spy, so
    the difference between the two profiles is what Authorize adds to the transport floor."""
    bench.log("profile: py-spy --native on the gateway, Authorize then Echo")
    bench.reset_state()
    directory = BENCH_DATA / "profiles"
    for method in ("authorize", "echo"):
        result.profiles[method] = profile_gateway(bench, method, bench.plan.profile_s, directory)
