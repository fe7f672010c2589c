"""Authorize through the gateway on Redis Cluster vs one Redis, in the same run (issue 16).

``python -m benchmarks.cluster_gateway [--quick] [--duration-s S] [--pairs N] [--shards S]``
(standalone, not part of ``make bench``; on the shared machine run it through the bench lock:
``flock /tmp/h/bench.lock ...``). It starts the local six-node cluster (storage/cluster_dev.py:
3 primaries, 1 replica each, AOF ``appendfsync always``) and beside it one standalone
``redis-server`` of the same binary and settings, a scratch PostgreSQL database, the bench's
reference data (benchmarks/services.py: one campaign whose budget never runs out, a product
without a serial, a terminal per client process) and three gateways (``python -m server``, one
worker each, the same settings otherwise):

- **one Redis, lean**: the standalone Redis, the lean script client (today's default), no WAIT
  (one Redis has no replica to wait for);
- **cluster**: SUBSIDY_REDIS_CLUSTER_NODES and SUBSIDY_REDIS_SHARDS (server/processes/
  sharded_app.py): redis-py's cluster client, each EVALSHA pipelined with ``WAIT 1`` on its
  shard's primary (``AcknowledgedScripts``);
- **one Redis, redis-py**: the standalone Redis with SUBSIDY_REDIS_CLIENT=redis-py, so that the
  client's share of the difference is told apart from the cluster's own.

The bench's load generator (benchmarks/loadgen.py: client processes, closed loop, a fresh
consumer per call, so the calls spread evenly over the shards) drives them in alternating rounds
(one of each mode per pair, the order rotated every pair, so drift in the machine's load hits
each alike). Per round it samples, at the measurement window's edges, the gateway's CPU
(/proc), every redis-server's CPU (/proc) and ``INFO commandstats`` (EVALSHA and WAIT calls and
the script's ``usec``). The hold sweepers are parked (``SUBSIDY_SWEEP_INTERVAL_MS`` one hour)
so that every EVALSHA in a window is an Authorize.

This is a 2-core machine running seven redis-servers, three gateways, PostgreSQL and the
clients: read the per-call costs and the ratios, not the absolute throughput.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from benchmarks import services
from benchmarks.histogram import Histogram
from benchmarks.loadgen import ClientPool, PhaseResult, PhaseSpec
from server.commands.reference import publish_snapshot
from server.config import Config
from storage.cluster_dev import ClusterNode, LocalCluster
from storage.devenv import DevServices
from storage.postgres.reference import fetch_reference

DATABASE = "subsidy_bench_cluster"
HOLD_TTL_S = 7 * 86_400  # no hold expires during the run
PARKED_SWEEP_MS = 3_600_000  # the sweepers' EVALSHAs stay out of the windows
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
ONE_LEAN, CLUSTER, ONE_REDIS_PY = "one Redis, lean", "cluster", "one Redis, redis-py"


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
class Round:
    mode: str
    pair: int
    window_s: float
    calls: int  # Authorize answers inside the window, over every client process
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
        """The authorize script's usec_per_call over the nodes that ran it (calls-weighted)."""
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
    rounds: list[Round] = field(default_factory=list)


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

    # ---- set-up

    def start(self, pg_admin_dsn: str) -> None:
        dsn = services.with_database(pg_admin_dsn, DATABASE)
        one_prefix, cluster_prefix = "b1" + secrets.token_hex(4), "bc" + secrets.token_hex(4)
        standalone_url = f"redis://{self.standalone.address}/0"
        cluster_nodes = ",".join(f"{host}:{port}" for host, port in self.cluster.startup_nodes)
        document, self.terminals = services.reference_document(self.args.clients)
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
        cluster_nodes_by_role: list[tuple[ClusterNode, str]] = [(node, "primary") for node in primaries]
        primary_index = {}
        for index, node in enumerate(primaries):
            for replica in self.cluster.replicas_of(node):
                primary_index[len(cluster_nodes_by_role)] = index
                cluster_nodes_by_role.append((replica, "replica"))
        standalone_nodes = [(self.standalone, "standalone")]
        self.modes = [
            Mode(ONE_LEAN, lean, standalone_nodes),
            Mode(CLUSTER, sharded, cluster_nodes_by_role, primary_index),
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

    def measure(self, mode: Mode, pair: int, warmup_s: float, duration_s: float) -> Round:
        start_at = time.monotonic() + 0.3
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
            _sleep_until(specs[0].window_start)
            snapshot()
            _sleep_until(specs[0].window_end)
            snapshot()

        results: list[PhaseResult] = self.pool.run(specs, on_wait=sample_edges)
        (gateway_0, clients_0, nodes_0, machine_0), (gateway_1, clients_1, nodes_1, machine_1) = edges
        latency = Histogram()
        outcomes: dict[str, int] = {}
        for result in results:
            latency.add(Histogram.decode(result.latency))
            for label, count in result.outcomes.items():
                outcomes[label] = outcomes.get(label, 0) + count
        jiffies = machine_1.total - machine_0.total
        return Round(
            mode=mode.name,
            pair=pair,
            window_s=duration_s,
            calls=sum(result.completed_in_window for result in results),
            outcomes=outcomes,
            latency=latency,
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

    def run(self) -> None:
        args = self.args
        for mode in self.modes:
            services.say(f"warm-up: {mode.name}")
            self.measure(mode, -1, 0.0, args.warmup_s)
        for pair in range(args.pairs):
            # The order rotates, so no mode always follows the same one.
            order = self.modes[pair % len(self.modes) :] + self.modes[: pair % len(self.modes)]
            for mode in order:
                measured = self.measure(mode, pair, args.round_warmup_s, args.duration_s)
                mode.rounds.append(measured)
                services.say(
                    f"pair {pair + 1}/{args.pairs} {mode.name}: {measured.calls_per_s:,.0f} calls/s,"
                    f" gateway {measured.gateway_cpu_us_per_call:,.0f} CPU-µs/call,"
                    f" Redis {measured.redis_cpu_us_per_call_all:,.0f} CPU-µs/call,"
                    f" script {measured.script_usec_per_call:.1f} µs, outside {measured.outside_cores:.2f} cores"
                )


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
    by_name = {mode.name: mode for mode in bench.modes}
    lines = [
        f"# Authorize through the gateway: Redis Cluster ({args.shards} shards, 3 primaries + 3 replicas)"
        f" vs one Redis ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"{args.pairs} pairs of {args.duration_s:g} s rounds (after {args.round_warmup_s:g} s each),"
        f" closed loop, {args.concurrency} in flight from {args.clients} client processes of"
        f" {args.channels} channels; medians over rounds (range). {facts['load']}; {facts['versions']}.",
        "",
        "Modes: *one Redis, lean* = today's default gateway (lean script client, one pipelined"
        " connection, no WAIT); *cluster* = redis-py's cluster client, each EVALSHA pipelined with"
        " `WAIT 1` on its shard's primary (AcknowledgedScripts); *one Redis, redis-py* ="
        " SUBSIDY_REDIS_CLIENT=redis-py on the same standalone Redis, no WAIT.",
        "",
        "| mode | Authorize calls/s | p50 / p99 ms | gateway CPU-µs/call | Redis CPU-µs/call, all"
        " | primaries | replicas | script usec_per_call | EVALSHA / WAIT per call | outside cores |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for mode in bench.modes:
        rounds = mode.rounds
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
    lines += ["", "Outcomes: " + "; ".join(f"{mode.name} {_outcomes(mode.rounds)}" for mode in bench.modes), ""]

    lines += [
        "The authorize script per node (INFO commandstats `cmdstat_evalsha`; CPU from /proc; a replica's"
        " per-call figure is over its primary's calls):",
        "",
        "| mode | node | role | share of the calls | script usec_per_call | node CPU-µs per call it served |",
        "|---|---|---|---:|---:|---:|",
    ]
    for mode in bench.modes:
        if mode.name == ONE_REDIS_PY:
            continue
        for index, (node, role) in enumerate(mode.nodes):
            per_node = [measured.nodes[index] for measured in mode.rounds]
            serving = mode.primary_index.get(index, index)  # a replica applies its primary's writes
            served = [measured.nodes[serving].evalsha_calls for measured in mode.rounds]
            shares = [calls / max(measured.calls, 1) for calls, measured in zip(served, mode.rounds, strict=True)]
            usec = [n.usec_per_call for n in per_node if n.usec_per_call is not None]
            cpu = [n.cpu_s * 1e6 / calls for n, calls in zip(per_node, served, strict=True) if calls]
            lines.append(
                f"| {mode.name} | {node.address} | {role} | {statistics.median(shares):.2f}"
                f" | {_spread(usec, 1) if usec and role != 'replica' else '-'}"
                f" | {_spread(cpu) if cpu else '-'} |"
            )

    lean, sharded = by_name[ONE_LEAN].rounds, by_name[CLUSTER].rounds
    lines += [
        "",
        "Ratios, per pair (median (min–max) over the pairs):",
        "",
        "| ratio | calls/s | gateway CPU/call | Redis CPU/call, all | Redis CPU/call, primaries only"
        " | script usec_per_call |",
        "|---|---:|---:|---:|---:|---:|",
        _ratio_row("cluster / one Redis, lean", sharded, lean),
    ]
    if ONE_REDIS_PY in by_name:
        redis_py = by_name[ONE_REDIS_PY].rounds
        lines += [
            _ratio_row("cluster / one Redis, redis-py", sharded, redis_py),
            _ratio_row("one Redis: redis-py / lean", redis_py, lean),
        ]
    return "\n".join(lines)


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
