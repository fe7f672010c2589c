"""Authorize and ClaimQualification through the gateway on Redis Cluster vs one Redis, in the
same run (issue 16).

``python -m benchmarks.cluster_gateway [--quick] [--only authorize|claim] [--duration-s S]
[--pairs N] [--shards S]`` (standalone, not part of ``make bench``; on the shared machine run it
through the bench lock: ``flock /tmp/h/bench.lock ...``). It starts the local six-node cluster
(storage/cluster_dev.py: 3 primaries, 1 replica each, AOF ``appendfsync always``) and beside it
one standalone ``redis-server`` of the same binary and settings, a scratch PostgreSQL database,
the bench's reference data (benchmarks/services.py: one campaign whose budget never runs out, a
product without a serial, a terminal per client process; the flash crowd's partner app and a
campaign with a region whose qualification quota, 10^9 released at once, never runs out) and
three gateways (``python -m server``, one worker each, the same settings otherwise):

- **one Redis, lean**: the standalone Redis, the lean script client (today's default), no WAIT
  (one Redis has no replica to wait for);
- **cluster**: SUBSIDY_REDIS_CLUSTER_NODES and SUBSIDY_REDIS_SHARDS (server/processes/
  sharded_app.py): redis-py's cluster client, each EVALSHA pipelined with ``WAIT 1`` on its
  shard's primary (``AcknowledgedScripts``);
- **one Redis, redis-py**: the standalone Redis with SUBSIDY_REDIS_CLIENT=redis-py, so that the
  client's share of the difference is told apart from the cluster's own.

Two scenarios, each the same client load (``--concurrency`` in flight from ``--clients``
processes, closed loop), each call by a consumer never seen before, so the calls spread evenly
over the shards:

- **Authorize**: benchmarks/loadgen.py's closed loop (a fresh consumer key per call);
- **ClaimQualification**: a fresh person per call (a new, valid ID number from a run-wide
  counter, so nobody claims twice, in any mode: two modes share the standalone Redis), inside
  the campaign's region from a phone's fix (WGS-84 or GCJ-02, half each), as the flash crowd
  sends them (loadgen's crowd: every claim due at the start, at most ``concurrency / clients``
  unanswered per process, which is the closed loop). A round's list of claims is sized from the
  mode's last measured rate so the loop stays full past the window's end (a round whose list ran
  out first is run again with a longer one); the window counts the ISSUED answers in it, and any
  other answer stops the run, since a decline costs otherwise than an issue.

Rounds alternate (one of each mode and scenario per pair, both orders rotated every pair, so
drift in the machine's load hits each alike). Per round it samples, at the measurement window's
edges, the gateway's CPU (/proc), every redis-server's CPU (/proc) and ``INFO commandstats``
(EVALSHA and WAIT calls and the scripts' ``usec``). The hold and qualification sweepers and the
cluster's keeper are parked (``SUBSIDY_SWEEP_INTERVAL_MS`` one hour) so that every EVALSHA in a
window is the round's call: the authorize or the claim script.

This is a 2-core machine running seven redis-servers, three gateways, PostgreSQL and the
clients: read the per-call costs and the ratios, not the absolute throughput.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import asyncpg
from subsidy_client.v1 import common_pb2

from benchmarks import services
from benchmarks.histogram import Histogram
from benchmarks.loadgen import Claim, ClientPool, CrowdResult, CrowdSpec, PhaseResult, PhaseSpec
from benchmarks.scenarios import FLASH_FIX_AGE_MS_MAX, FLASH_INSIDE
from server.commands.reference import publish_snapshot
from server.config import Config
from server.domain.geo import wgs84_to_gcj02
from server.domain.identity import check_digit
from storage.cluster_dev import ClusterNode, LocalCluster
from storage.devenv import DevServices
from storage.postgres.reference import fetch_reference
from storage.redis.cluster.shards import ShardLayout

DATABASE = "subsidy_bench_cluster"
HOLD_TTL_S = 7 * 86_400  # no hold expires during the run
PARKED_SWEEP_MS = 3_600_000  # the sweepers' EVALSHAs stay out of the windows
T = TypeVar("T")
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
ONE_LEAN, CLUSTER, ONE_REDIS_PY = "one Redis, lean", "cluster", "one Redis, redis-py"
START_DELAY_S = 0.3  # from handing the clients a round to its start
AUTHORIZE, CLAIM = "Authorize", "ClaimQualification"
SCRIPTS = {AUTHORIZE: "authorize", CLAIM: "claim"}
CLAIM_CAMPAIGN_ID = "bench-claims"
CLAIM_QUOTA = 1_000_000_000  # the validator's largest: no shard's slice runs out in a run
CLAIM_RATE_GUESS_PER_CLIENT = 1_500.0  # claims/s a client process is sized for before a mode is measured
CLAIM_SUPPLY_MARGIN = 1.3  # claims beyond the rate's estimate, so the loop stays full to the window's end
CLAIM_ATTEMPTS = 3  # a round whose claims ran out first is run again with twice as many
FIRST_BIRTH_DATE = date(1950, 1, 1)  # people's ID numbers count up from here, 1,000 a day


@dataclass(frozen=True)
class NodeSample:
    evalsha_calls: int
    evalsha_us: int
    wait_calls: int
    cpu_s: float


@dataclass(frozen=True)
class NodeRound:
    address: str
    role: str  # "standalone", "primary" or "replica"
    evalsha_calls: int
    evalsha_us: int
    wait_calls: int
    cpu_s: float

    @property
    def usec_per_call(self) -> float | None:
        return self.evalsha_us / self.evalsha_calls if self.evalsha_calls else None


@dataclass(frozen=True)
class Load:
    """What the client processes report of a round: the window's calls, the outcomes (of the
    window for Authorize, of the whole round for claims: every one ISSUED) and the latency."""

    calls: int
    outcomes: dict[str, int]
    latency: Histogram


@dataclass(frozen=True)
class Round:
    mode: str
    scenario: str  # AUTHORIZE or CLAIM
    pair: int
    window_s: float
    calls: int  # answers inside the window, over every client process
    outcomes: dict[str, int]
    latency: Histogram
    gateway_cpu_s: float
    clients_cpu_s: float
    machine_busy_cores: float
    nodes: list[NodeRound]

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.window_s

    def redis_cpu_us_per_call(self, *roles: str) -> float:
        return sum(node.cpu_s for node in self.nodes if node.role in roles) * 1e6 / self.calls

    @property
    def redis_cpu_us_per_call_all(self) -> float:
        return self.redis_cpu_us_per_call("standalone", "primary", "replica")

    @property
    def gateway_cpu_us_per_call(self) -> float:
        return self.gateway_cpu_s * 1e6 / self.calls

    @property
    def script_usec_per_call(self) -> float:
        """The round's script's usec_per_call over the nodes that ran it (calls-weighted)."""
        calls = sum(node.evalsha_calls for node in self.nodes)
        return sum(node.evalsha_us for node in self.nodes) / calls if calls else float("nan")

    @property
    def evalsha_per_call(self) -> float:
        return sum(node.evalsha_calls for node in self.nodes) / self.calls

    @property
    def wait_per_call(self) -> float:
        return sum(node.wait_calls for node in self.nodes) / self.calls

    @property
    def outside_cores(self) -> float:
        """Machine busy cores not spent by this mode's gateway, its Redis nodes or the clients:
        the other modes' idle processes, PostgreSQL, and whatever else runs on the machine."""
        own = self.gateway_cpu_s + sum(node.cpu_s for node in self.nodes) + self.clients_cpu_s
        return self.machine_busy_cores - own / self.window_s


@dataclass
class Mode:
    name: str
    process: services.ServerProcess
    nodes: list[tuple[ClusterNode, str]]  # the redis-servers this mode's calls reach, by role
    primary_index: dict[int, int] = field(default_factory=dict)  # a replica's index -> its primary's
    shards_of: dict[int, list[int]] = field(default_factory=dict)  # a primary's index -> its consumer shards
    rounds: dict[str, list[Round]] = field(default_factory=dict)  # by scenario
    claims_per_s_per_client: float = CLAIM_RATE_GUESS_PER_CLIENT  # sizes a claim round's list


def sample(node: ClusterNode) -> NodeSample:
    text = node.command_text("INFO", "commandstats")
    evalsha = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", text)
    wait = re.search(r"cmdstat_wait:calls=(\d+)", text)
    assert node.process is not None
    return NodeSample(
        evalsha_calls=int(evalsha.group(1)) if evalsha else 0,
        evalsha_us=int(evalsha.group(2)) if evalsha else 0,
        wait_calls=int(wait.group(1)) if wait else 0,
        cpu_s=services.process_cpu_s(node.process.pid, include_reaped_children=False),
    )


def _sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: LocalCluster, standalone: ClusterNode) -> None:
        self.args = args
        self.cluster = cluster
        self.standalone = standalone
        self.pool = ClientPool(args.clients)
        self.terminals: list[services.Terminal] = []
        self.modes: list[Mode] = []
        self.scenarios = (
            [AUTHORIZE, CLAIM] if args.only is None else [{"authorize": AUTHORIZE, "claim": CLAIM}[args.only]]
        )
        self.partner_secret = secrets.token_urlsafe(32)
        self.people = 0  # ID numbers handed out so far: each claim is a new person's
        self.places = random.Random(16)

    # ---- set-up

    def start(self, pg_admin_dsn: str) -> None:
        dsn = services.with_database(pg_admin_dsn, DATABASE)
        one_prefix, cluster_prefix = "b1" + secrets.token_hex(4), "bc" + secrets.token_hex(4)
        standalone_url = f"redis://{self.standalone.address}/0"
        cluster_nodes = ",".join(f"{host}:{port}" for host, port in self.cluster.startup_nodes)
        document, self.terminals = services.reference_document(self.args.clients)
        # The claims' partner app and campaign: the flash crowd's (its region, 15 m fixes), the
        # whole quota released long ago so that no claim waits for a tranche.
        claims = services.flash_document(
            self.partner_secret, CLAIM_CAMPAIGN_ID, datetime(2020, 1, 1, tzinfo=UTC), CLAIM_QUOTA
        )
        document = {
            **document,
            "partners": claims["partners"],
            "campaigns": document["campaigns"] + claims["campaigns"],
        }
        services.run_async(services.recreate_database(pg_admin_dsn, DATABASE))
        # server.commands.reference.load: migrate, save, publish to the standalone Redis ...
        services.run_async(services.load_gateway_reference(dsn, standalone_url, one_prefix, document))
        # ... and the same snapshot published into every shard of the cluster, each funded its slice.
        cluster_config = Config(
            pg_dsn=dsn,
            redis_prefix=cluster_prefix,
            redis_cluster_nodes=cluster_nodes,
            redis_shards=self.args.shards,
            listen=f"{services.LOOPBACK}:1",
        )
        services.run_async(_publish(cluster_config))
        programme_key = secrets.token_hex(32)

        def gateway(name: str, settings: services.GatewaySettings, prefix: str) -> services.ServerProcess:
            process = services.gateway_process(name, settings, standalone_url, prefix, dsn, HOLD_TTL_S, programme_key)
            process.environment = {**process.environment, "SUBSIDY_SWEEP_INTERVAL_MS": str(PARKED_SWEEP_MS)}
            return process

        lean = gateway("cluster-bench one-redis lean", services.GatewaySettings(), one_prefix)
        sharded = gateway("cluster-bench cluster", services.GatewaySettings(), cluster_prefix)
        sharded.environment = {
            **sharded.environment,
            "SUBSIDY_REDIS_CLUSTER_NODES": cluster_nodes,
            "SUBSIDY_REDIS_SHARDS": str(self.args.shards),
        }
        redis_py = gateway(
            "cluster-bench one-redis redis-py", services.GatewaySettings(redis_client="redis-py"), one_prefix
        )
        primaries = self.cluster.primaries_now()
        layout = ShardLayout(cluster_prefix, self.args.shards)
        shards_of: dict[int, list[int]] = {index: [] for index in range(len(primaries))}
        for shard, keys in enumerate(layout.keys):
            owner = self.cluster.primary_of_slot(self.cluster.slot_of(keys.qualification_quota(CLAIM_CAMPAIGN_ID)))
            shards_of[primaries.index(owner)].append(shard)
        cluster_nodes_by_role: list[tuple[ClusterNode, str]] = [(node, "primary") for node in primaries]
        primary_index = {}
        for index, node in enumerate(primaries):
            for replica in self.cluster.replicas_of(node):
                primary_index[len(cluster_nodes_by_role)] = index
                cluster_nodes_by_role.append((replica, "replica"))
        standalone_nodes = [(self.standalone, "standalone")]
        self.modes = [
            Mode(ONE_LEAN, lean, standalone_nodes),
            Mode(CLUSTER, sharded, cluster_nodes_by_role, primary_index, shards_of),
        ]
        if not self.args.two_modes:
            self.modes.append(Mode(ONE_REDIS_PY, redis_py, standalone_nodes))
        for mode in self.modes:
            services.say(f"starting {mode.name} gateway")
            mode.process.start()
        self.pool.start()

    def stop(self) -> None:
        self.pool.close()
        for mode in self.modes:
            mode.process.stop()

    # ---- rounds

    def measure(self, mode: Mode, scenario: str, pair: int, warmup_s: float, duration_s: float) -> Round | None:
        """One round of ``scenario`` on ``mode``; None when its claims ran out inside the window
        (the mode's rate estimate is doubled: run it again)."""
        start_at = time.monotonic() + START_DELAY_S
        window_start = start_at + warmup_s
        window_end = window_start + duration_s
        edges: list[tuple[float, float, list[NodeSample], services.MachineCpu]] = []

        def snapshot() -> None:
            edges.append(
                (
                    mode.process.cpu_s(),
                    services.pids_cpu_s(self.pool.pids),
                    [sample(node) for node, _ in mode.nodes],
                    services.MachineCpu.read(),
                )
            )

        def sample_edges() -> None:
            _sleep_until(window_start)
            snapshot()
            _sleep_until(window_end)
            snapshot()

        if scenario == AUTHORIZE:
            load: Load | None = self._authorize(mode, start_at, warmup_s, duration_s, sample_edges)
        else:
            load = self._claims(mode, start_at, window_start, window_end, sample_edges)
        if load is None:
            return None
        (gateway_0, clients_0, nodes_0, machine_0), (gateway_1, clients_1, nodes_1, machine_1) = edges
        jiffies = machine_1.total - machine_0.total
        return Round(
            mode=mode.name,
            scenario=scenario,
            pair=pair,
            window_s=duration_s,
            calls=load.calls,
            outcomes=load.outcomes,
            latency=load.latency,
            gateway_cpu_s=gateway_1 - gateway_0,
            clients_cpu_s=clients_1 - clients_0,
            machine_busy_cores=(machine_1.busy - machine_0.busy) / jiffies * (os.cpu_count() or 1) if jiffies else 0.0,
            nodes=[
                NodeRound(
                    address=node.address,
                    role=role,
                    evalsha_calls=after.evalsha_calls - before.evalsha_calls,
                    evalsha_us=after.evalsha_us - before.evalsha_us,
                    wait_calls=after.wait_calls - before.wait_calls,
                    cpu_s=after.cpu_s - before.cpu_s,
                )
                for (node, role), before, after in zip(mode.nodes, nodes_0, nodes_1, strict=True)
            ],
        )

    def _authorize(
        self, mode: Mode, start_at: float, warmup_s: float, duration_s: float, sample_edges: Callable[[], None]
    ) -> Load:
        per_client = self.args.concurrency // self.args.clients
        specs = [
            PhaseSpec(
                target=mode.process.target,
                method="authorize",
                mode="closed",
                start_at=start_at,
                warmup_s=warmup_s,
                duration_s=duration_s,
                terminal_id=terminal.terminal_id,
                secret=terminal.secret,
                campaign_id=services.CAMPAIGN_ID,
                gtin=services.GTIN,
                price_fen=services.PRICE_FEN,
                concurrency=per_client,
                channels=self.args.channels,
            )
            for terminal in self.terminals
        ]
        results: list[PhaseResult] = self.pool.run(specs, on_wait=sample_edges)
        latency = Histogram()
        outcomes: dict[str, int] = {}
        for result in results:
            latency.add(Histogram.decode(result.latency))
            for label, count in result.outcomes.items():
                outcomes[label] = outcomes.get(label, 0) + count
        return Load(sum(result.completed_in_window for result in results), outcomes, latency)

    def _claims(
        self, mode: Mode, start_at: float, window_start: float, window_end: float, sample_edges: Callable[[], None]
    ) -> Load | None:
        """Closed-loop claims: loadgen's crowd with every claim due at ``start_at`` keeps
        ``concurrency / clients`` in flight per process until its list is answered. The list
        outlasts the window (the mode's rate × the round × a margin), checked: at least a loop's
        worth of claims answered after the window in every process, else None."""
        per_client = self.args.concurrency // self.args.clients
        supply = math.ceil(mode.claims_per_s_per_client * (window_end - start_at) * CLAIM_SUPPLY_MARGIN) + per_client
        specs = [
            CrowdSpec(
                target=mode.process.target,
                partner_id=services.PARTNER_ID,
                secret=self.partner_secret,
                campaign_id=CLAIM_CAMPAIGN_ID,
                category=services.FLASH_CATEGORY,
                start_at=start_at,
                claims=tuple(self._new_people(supply)),
                max_in_flight=per_client,
                channels=self.args.channels,
            )
            for _ in self.terminals
        ]
        results: list[CrowdResult] = self.pool.run_crowd(specs, on_wait=sample_edges)
        outcomes: dict[str, int] = {}
        latency = Histogram()
        for result in results:
            latency.add(Histogram.decode(result.service))
            for label, count in result.outcomes.items():
                outcomes[label] = outcomes.get(label, 0) + count
        if set(outcomes) != {"ISSUED"} or any(result.unfinished for result in results):
            raise RuntimeError(f"{mode.name}: claims not all issued ({outcomes}); the window counts issued ones")
        in_window = [sum(window_start <= at < window_end for at, _ in result.issued) for result in results]
        after_window = [sum(at >= window_end for at, _ in result.issued) for result in results]
        rate = max(in_window) / (window_end - window_start)
        if min(after_window) < per_client:
            mode.claims_per_s_per_client = max(2 * mode.claims_per_s_per_client, 2 * rate)
            services.say(f"{mode.name}: the claims ran out before the window's end; again with more")
            return None
        mode.claims_per_s_per_client = rate
        return Load(sum(in_window), outcomes, latency)

    def _new_people(self, count: int) -> list[Claim]:
        """``count`` claims of people never seen in this run: valid ID numbers counted up (1,000
        a birth date), each from a phone inside the campaign's region."""
        claims = []
        for _ in range(count):
            person = self.people
            self.people += 1
            born = FIRST_BIRTH_DATE + timedelta(days=person // 1000)
            first = f"330109{born:%Y%m%d}{person % 1000:03d}"
            latitude, longitude = self.places.choice(FLASH_INSIDE)
            system = common_pb2.COORDINATE_SYSTEM_WGS84
            if person % 2:
                latitude, longitude = wgs84_to_gcj02(latitude, longitude)
                system = common_pb2.COORDINATE_SYSTEM_GCJ02
            fix_age_ms = self.places.randrange(FLASH_FIX_AGE_MS_MAX)
            claims.append(Claim(person, first + check_digit(first), latitude, longitude, system, fix_age_ms, 0.0))
        return claims

    def measured_round(self, mode: Mode, scenario: str, pair: int, warmup_s: float, duration_s: float) -> Round:
        for _ in range(CLAIM_ATTEMPTS):
            measured = self.measure(mode, scenario, pair, warmup_s, duration_s)
            if measured is not None:
                return measured
        raise RuntimeError(f"{mode.name}: the claims ran out in {CLAIM_ATTEMPTS} attempts")

    def run(self) -> None:
        args = self.args
        for scenario in self.scenarios:
            for mode in self.modes:
                services.say(f"warm-up: {scenario}, {mode.name}")
                self.measured_round(mode, scenario, -1, 0.0, args.warmup_s)
        for pair in range(args.pairs):
            # Both orders rotate, so no round always follows the same one.
            scenarios = _rotated(self.scenarios, pair)
            for scenario in scenarios:
                for mode in _rotated(self.modes, pair):
                    measured = self.measured_round(mode, scenario, pair, args.round_warmup_s, args.duration_s)
                    mode.rounds.setdefault(scenario, []).append(measured)
                    services.say(
                        f"pair {pair + 1}/{args.pairs} {scenario} {mode.name}: {measured.calls_per_s:,.0f} calls/s,"
                        f" gateway {measured.gateway_cpu_us_per_call:,.0f} CPU-µs/call,"
                        f" Redis {measured.redis_cpu_us_per_call_all:,.0f} CPU-µs/call,"
                        f" script {measured.script_usec_per_call:.1f} µs, outside {measured.outside_cores:.2f} cores"
                    )


def _rotated(items: list[T], by: int) -> list[T]:
    return items[by % len(items) :] + items[: by % len(items)]


async def _publish(config: Config) -> None:
    connection = await asyncpg.connect(config.pg_dsn, timeout=10)
    try:
        await publish_snapshot(config, await fetch_reference(connection))
    finally:
        await connection.close()


# --------------------------------------------------------------------------- the report


def _spread(values: list[float], digits: int = 0) -> str:
    """median (min–max)"""
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def _ratios(numerator: list[float], denominator: list[float]) -> str:
    """Per-pair ratios: median (min–max)."""
    return _spread([a / b for a, b in zip(numerator, denominator, strict=True)], 2)


def report(bench: Bench, facts: dict[str, str]) -> str:
    args = bench.args
    lines = [
        f"# {' and '.join(bench.scenarios)} through the gateway: Redis Cluster ({args.shards} shards,"
        f" 3 primaries + 3 replicas) vs one Redis ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"{args.pairs} pairs of {args.duration_s:g} s rounds (after {args.round_warmup_s:g} s each),"
        f" closed loop, {args.concurrency} in flight from {args.clients} client processes of"
        f" {args.channels} channels; medians over rounds (range). {facts['load']}; {facts['versions']}.",
        "",
        "Modes: *one Redis, lean* = today's default gateway (lean script client, one pipelined"
        " connection, no WAIT); *cluster* = redis-py's cluster client, each EVALSHA pipelined with"
        " `WAIT 1` on its shard's primary (AcknowledgedScripts); *one Redis, redis-py* ="
        " SUBSIDY_REDIS_CLIENT=redis-py on the same standalone Redis, no WAIT.",
    ]
    if CLAIM in bench.scenarios:
        lines += [
            "",
            "ClaimQualification: a new person (ID number) per claim, from inside the campaign's region,"
            " against a quota that never runs out (every claim ISSUED); each process keeps"
            f" {args.concurrency // args.clients} claims in flight (loadgen's crowd, every claim due at the"
            " start), the window counts the ISSUED answers in it; its latency is send to answer over every"
            " claim of the round, the loop's start and end included.",
        ]
    for scenario in bench.scenarios:
        lines += ["", *_scenario_report(bench, scenario)]
    if len(bench.scenarios) == 2:
        lines += ["", *_claim_vs_authorize(bench)]
    return "\n".join(lines)


def _scenario_report(bench: Bench, scenario: str) -> list[str]:
    by_name = {mode.name: mode.rounds[scenario] for mode in bench.modes}
    script = SCRIPTS[scenario]
    lines = [
        f"## {scenario}",
        "",
        f"| mode | {scenario} calls/s | p50 / p99 ms | gateway CPU-µs/call | Redis CPU-µs/call, all"
        " | primaries | replicas | script usec_per_call | EVALSHA / WAIT per call | outside cores |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for mode in bench.modes:
        rounds = by_name[mode.name]
        latency = Histogram()
        for measured in rounds:
            latency.add(measured.latency)
        on_cluster = mode.name == CLUSTER
        lines.append(
            f"| {mode.name} | {_spread([r.calls_per_s for r in rounds])}"
            f" | {latency.percentile_ms(50):.1f} / {latency.percentile_ms(99):.1f}"
            f" | {_spread([r.gateway_cpu_us_per_call for r in rounds])}"
            f" | {_spread([r.redis_cpu_us_per_call_all for r in rounds])}"
            f" | {_spread([r.redis_cpu_us_per_call('primary', 'standalone') for r in rounds])}"
            f" | {_spread([r.redis_cpu_us_per_call('replica') for r in rounds]) if on_cluster else '-'}"
            f" | {_spread([r.script_usec_per_call for r in rounds], 1)}"
            f" | {statistics.median(r.evalsha_per_call for r in rounds):.2f}"
            f" / {statistics.median(r.wait_per_call for r in rounds):.2f}"
            f" | {_spread([r.outside_cores for r in rounds], 2)} |"
        )
    window = "in the windows" if scenario == AUTHORIZE else "of every claim sent"
    lines += [
        "",
        f"Outcomes ({window}): " + "; ".join(f"{name} {_outcomes(rounds)}" for name, rounds in by_name.items()),
        "",
    ]

    lines += [
        f"The {script} script per node (INFO commandstats `cmdstat_evalsha`; CPU from /proc; a replica's"
        " per-call figure is over its primary's calls):",
        "",
        "| mode | node | role | consumer shards | share of the calls | script usec_per_call"
        " | node CPU-µs per call it served |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for mode in bench.modes:
        if mode.name == ONE_REDIS_PY:
            continue
        rounds = by_name[mode.name]
        for index, (node, role) in enumerate(mode.nodes):
            per_node = [measured.nodes[index] for measured in rounds]
            serving = mode.primary_index.get(index, index)  # a replica applies its primary's writes
            served = [measured.nodes[serving].evalsha_calls for measured in rounds]
            shares = [calls / max(measured.calls, 1) for calls, measured in zip(served, rounds, strict=True)]
            usec = [n.usec_per_call for n in per_node if n.usec_per_call is not None]
            cpu = [n.cpu_s * 1e6 / calls for n, calls in zip(per_node, served, strict=True) if calls]
            shards = mode.shards_of.get(serving)
            lines.append(
                f"| {mode.name} | {node.address} | {role}"
                f" | {', '.join(map(str, shards)) if shards is not None else 'all'}"
                f" | {statistics.median(shares):.2f}"
                f" | {_spread(usec, 1) if usec and role != 'replica' else '-'}"
                f" | {_spread(cpu) if cpu else '-'} |"
            )

    lean, sharded = by_name[ONE_LEAN], by_name[CLUSTER]
    lines += [
        "",
        f"{scenario} ratios, per pair (median (min–max) over the pairs):",
        "",
        _RATIO_HEADER,
        "|---|---:|---:|---:|---:|---:|",
        _ratio_row("cluster / one Redis, lean", sharded, lean),
    ]
    if ONE_REDIS_PY in by_name:
        redis_py = by_name[ONE_REDIS_PY]
        lines += [
            _ratio_row("cluster / one Redis, redis-py", sharded, redis_py),
            _ratio_row("one Redis: redis-py / lean", redis_py, lean),
        ]
    return lines


def _claim_vs_authorize(bench: Bench) -> list[str]:
    """A claim's cost against an Authorize's on each mode, per pair (both ran in every pair), and
    a claim on the cluster against an Authorize on today's one-Redis gateway: the factor a sizing
    from one Redis's Authorize figures takes for a flash crowd on the cluster."""
    by_name = {mode.name: mode for mode in bench.modes}
    lines = [
        "## ClaimQualification / Authorize",
        "",
        "Per pair (median (min–max) over the pairs):",
        "",
        _RATIO_HEADER,
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode in bench.modes:
        lines.append(_ratio_row(f"claim / Authorize, {mode.name}", mode.rounds[CLAIM], mode.rounds[AUTHORIZE]))
    lines.append(
        _ratio_row(
            "claim on the cluster / Authorize on one Redis, lean",
            by_name[CLUSTER].rounds[CLAIM],
            by_name[ONE_LEAN].rounds[AUTHORIZE],
        )
    )
    return lines


_RATIO_HEADER = (
    "| ratio | calls/s | gateway CPU/call | Redis CPU/call, all | Redis CPU/call, primaries only"
    " | script usec_per_call |"
)


def _outcomes(rounds: list[Round]) -> str:
    total: dict[str, int] = {}
    for measured in rounds:
        for label, count in measured.outcomes.items():
            total[label] = total.get(label, 0) + count
    return ", ".join(f"{label} {count:,}" for label, count in sorted(total.items()))


def _ratio_row(name: str, a: list[Round], b: list[Round]) -> str:
    metrics: list[Callable[[Round], float]] = [
        lambda r: r.calls_per_s,
        lambda r: r.gateway_cpu_us_per_call,
        lambda r: r.redis_cpu_us_per_call_all,
        lambda r: r.redis_cpu_us_per_call("primary", "standalone"),
        lambda r: r.script_usec_per_call,
    ]
    cells = [_ratios([metric(r) for r in a], [metric(r) for r in b]) for metric in metrics]
    return f"| {name} | " + " | ".join(cells) + " |"


# --------------------------------------------------------------------------- entry point


def _facts(standalone: ClusterNode) -> dict[str, str]:
    version = re.search(r"redis_version:(\S+)", standalone.command_text("INFO", "server"))
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "load": f"load average at the start {' '.join(load)}, {os.cpu_count()} cores",
        "versions": f"Redis {version.group(1) if version else '?'}, Python {sys.version.split()[0]}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 pairs of 2 s rounds: a smoke run")
    parser.add_argument("--duration-s", type=float, help="measured seconds per round (default 5, quick 2)")
    parser.add_argument("--pairs", type=int, help="rounds of every mode (default 5, quick 2)")
    parser.add_argument("--shards", type=int, default=6, help="consumer shards on the cluster")
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight over all client processes")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels per client process")
    parser.add_argument("--two-modes", action="store_true", help="leave out the one-Redis redis-py gateway")
    parser.add_argument(
        "--only", choices=("authorize", "claim"), help="run one scenario (default: both, in alternating rounds)"
    )
    parser.add_argument("--output", type=Path, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)
    args.duration_s = args.duration_s or (2.0 if args.quick else 5.0)
    args.pairs = args.pairs or (2 if args.quick else 5)
    args.round_warmup_s = 0.5 if args.quick else 1.0
    args.warmup_s = 1.5 if args.quick else 3.0
    if not 1 <= args.pairs <= 20 or not 0 < args.duration_s <= 120:
        parser.error("--pairs 1..20, --duration-s (0, 120]")
    if not 1 <= args.shards <= 1024 or not 1 <= args.clients <= 16:
        parser.error("--shards 1..1024, --clients 1..16")
    if args.concurrency % args.clients or not args.clients <= args.concurrency <= 1024:
        parser.error("--concurrency: a multiple of --clients, at most 1024")
    with (
        tempfile.TemporaryDirectory(prefix="bench-cluster-gateway-") as base,
        LocalCluster(base_dir=Path(base)) as cluster,
    ):
        standalone = cluster.start_standalone()
        facts = _facts(standalone)
        # DevServices resolves Redis too; point it at ours so only PostgreSQL is found (or started).
        os.environ["SUBSIDY_REDIS_URL"] = f"redis://{standalone.address}/0"
        devservices = DevServices(services.ROOT / ".data")
        admin_dsn = devservices.start().pg_dsn
        bench = Bench(args, cluster, standalone)
        try:
            bench.start(admin_dsn)
            bench.run()
        finally:
            bench.stop()
            services.run_async(services.drop_database(admin_dsn, DATABASE))
            devservices.stop()
    text = report(bench, facts)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
