"""The escrow reservation script on Redis Cluster vs one Redis, in the same run (issue 16).

``python -m benchmarks.cluster_escrow [--calls N] [--concurrency C] [--shards S]`` (run it
through the bench lock: ``flock /tmp/h/bench.lock ...`` on the shared machine). It starts the
local six-node cluster (storage/cluster_dev.py: 3 primaries, 1 replica each, AOF ``appendfsync
always``) and, beside it, one standalone ``redis-server`` of the same binary and settings, and
reserves 1 fen ``N`` times with ``C`` calls in flight over ``S`` budget shards (uniformly: the
budget is large enough that no shard borrows) in three variants:

- **single**: the standalone Redis, ``EVALSHA escrow_reserve`` alone (one Redis has no replica
  to wait for: today's deployment shape);
- **cluster, WAIT 1**: storage/redis/cluster/escrow.py as designed, each script pipelined with
  ``WAIT 1`` on the slot's primary;
- **cluster, no WAIT**: the same without ``WAIT``, to show what the acknowledgement costs;
- two controls that tell the causes of the difference apart: **cluster without replicas** (a
  second local cluster of 3 primaries and no replica: the cost of replication) and **single
  Redis, C/3 in flight** (what each of the 3 primaries sees: the cost of smaller batches per
  event-loop turn, hence more ``write``/``fsync`` per call).

Per variant and per node it reports the script's ``usec_per_call`` inside Redis (``INFO
commandstats``: the script's own execution), the redis-server process's CPU-µs per call
(``/proc/<pid>/stat``: script + networking + AOF write and fsync + replication; replicas listed
too), and the client's calls/s and latency. This is a 2-core machine running all seven servers
and the client: compare per-call costs side by side, not absolute throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio
from redis.asyncio.cluster import ClusterNode as ClientNode
from redis.asyncio.cluster import RedisCluster

from storage.cluster_dev import ClusterNode, LocalCluster
from storage.redis.cluster.escrow import _SCRIPTS, EscrowBudget, split

CATEGORY = "phone"
TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class NodeSample:
    calls: int  # EVALSHA calls
    script_us: int  # their usec in INFO commandstats
    cpu_us: float  # the process's user + system CPU


@dataclass(frozen=True)
class NodeResult:
    address: str
    role: str
    calls: int
    script_us_per_call: float | None
    cpu_us: float


@dataclass(frozen=True)
class VariantResult:
    name: str
    calls: int
    wall_s: float
    latencies_ms: list[float]
    nodes: list[NodeResult]

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.wall_s

    def cpu_us_per_call(self, role: str) -> float:
        return sum(n.cpu_us for n in self.nodes if n.role == role) / self.calls


def sample(node: ClusterNode) -> NodeSample:
    text = node.command_text("INFO", "commandstats")
    match = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", text)
    calls, script_us = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    assert node.process is not None
    fields = Path(f"/proc/{node.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return NodeSample(calls, script_us, cpu_ticks * TICK_US)


async def _drive(calls: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> tuple[float, list[float]]:
    latencies: list[float] = []
    counter = iter(range(calls))

    async def worker() -> None:
        for number in counter:
            started = time.perf_counter()
            await one(number)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def _measure(
    nodes: list[tuple[ClusterNode, str, ClusterNode | None]],
    before: dict[int, NodeSample],
    name: str,
    calls: int,
    wall: float,
    lat: list[float],
) -> VariantResult:
    results = []
    done_by_port = {}
    for node, role, _ in nodes:
        after = sample(node)
        first = before[node.port]
        done = after.calls - first.calls
        done_by_port[node.port] = done
        results.append(
            NodeResult(
                address=node.address,
                role=role,
                calls=done,
                script_us_per_call=(after.script_us - first.script_us) / done if done else None,
                cpu_us=after.cpu_us - first.cpu_us,
            )
        )
    # A replica applies its primary's writes (not the script): its CPU per call of its primary.
    for index, (_node, _role, primary) in enumerate(nodes):
        if primary is not None:
            results[index] = dataclasses.replace(results[index], calls=done_by_port[primary.port])
    return VariantResult(name, calls, wall, lat, results)


async def run_single(
    node: ClusterNode, calls: int, concurrency: int, shards: int, round_: int, full: int
) -> VariantResult:
    """The escrow_reserve script on one Redis: the shards' keys all on it, no WAIT."""
    client = redis.asyncio.Redis(host="127.0.0.1", port=node.port)
    # Key names only (the cluster client is never used here): the same keys as on the cluster.
    names = EscrowBudget(
        RedisCluster(startup_nodes=[ClientNode("127.0.0.1", 1)]),
        prefix="bench",
        campaign_id=f"single{round_}c{concurrency}",
        category=CATEGORY,
        shards=shards,
    )
    setup, reserve = _SCRIPTS["escrow_setup"], _SCRIPTS["escrow_reserve"]
    for script in (setup, reserve):
        await client.script_load(script.source)
    budget = calls * 2
    for shard, slice_fen in enumerate(split(budget, shards)):
        keys = [names.escrow_key(shard), names.ledger_key(shard)]
        await client.evalsha(setup.sha, 2, *keys, CATEGORY, slice_fen, budget, shards)
    rng = random.Random(1)
    targets = [rng.randrange(shards) for _ in range(calls)]

    async def one(number: int) -> None:
        shard = targets[number]
        keys = [names.escrow_key(shard), names.reservations_key(shard), names.ledger_key(shard)]
        async with client.pipeline(transaction=False) as pipe:
            pipe.evalsha(reserve.sha, 3, *keys, f"s{number}", CATEGORY, 1)
            (answer,) = await pipe.execute()
        assert b"APPROVED" in answer

    before = {node.port: sample(node)}
    wall, latencies = await _drive(calls, concurrency, one)
    await client.aclose()
    name = "single Redis" if concurrency == full else f"single Redis, {concurrency} in flight"
    return _measure([(node, "single", None)], before, name, calls, wall, latencies)


async def run_cluster(
    cluster: LocalCluster, calls: int, concurrency: int, shards: int, wait_replicas: int, round_: int, label: str = ""
) -> VariantResult:
    client = RedisCluster(startup_nodes=[ClientNode(host, port) for host, port in cluster.startup_nodes])
    escrow = EscrowBudget(
        client,
        prefix="bench",
        campaign_id=f"w{wait_replicas}r{round_}",
        category=CATEGORY,
        shards=shards,
        wait_replicas=wait_replicas,
    )
    await escrow.setup(calls * 2)
    rng = random.Random(1)
    targets = [rng.randrange(shards) for _ in range(calls)]

    async def one(number: int) -> None:
        assert (await escrow.reserve(targets[number], f"c{number}", 1)).approved

    primaries = cluster.primaries_now()
    nodes: list[tuple[ClusterNode, str, ClusterNode | None]] = [(node, "primary", None) for node in primaries]
    nodes += [(replica, "replica", node) for node in primaries for replica in cluster.replicas_of(node)]
    before = {node.port: sample(node) for node, _, _ in nodes}
    wall, latencies = await _drive(calls, concurrency, one)
    name = label or (f"cluster, WAIT {wait_replicas}" if wait_replicas else "cluster, no WAIT")
    result = _measure(nodes, before, name, calls, wall, latencies)
    await escrow.aclose()
    await client.aclose()
    return result


def report(results: list[VariantResult], calls: int, concurrency: int, shards: int) -> str:
    lines = [
        f"# escrow_reserve: Redis Cluster vs one Redis ({calls} calls of 1 fen, {concurrency} in flight,"
        f" {shards} shards; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        "| variant | calls/s (client) | latency p50 / p99 ms | primaries' CPU-µs per call"
        " | replicas' CPU-µs per call |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        cuts = statistics.quantiles(result.latencies_ms, n=100)
        replica = result.cpu_us_per_call("replica") if any(n.role == "replica" for n in result.nodes) else None
        primary = result.cpu_us_per_call("primary") + result.cpu_us_per_call("single")
        lines.append(
            f"| {result.name} | {result.calls_per_s:,.0f} | {cuts[49]:.2f} / {cuts[98]:.2f} | {primary:.1f} |"
            f" {'-' if replica is None else f'{replica:.1f}'} |"
        )
    lines += [
        "",
        "| variant | node | role | script calls (a replica: its primary's) | script usec_per_call"
        " | this node's CPU-µs per call |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for node in result.nodes:
            per_call = node.cpu_us / node.calls if node.calls else None
            lines.append(
                f"| {result.name} | {node.address} | {node.role} | {node.calls} |"
                f" {'-' if node.script_us_per_call is None else f'{node.script_us_per_call:.2f}'} |"
                f" {'-' if per_call is None else f'{per_call:.1f}'} |"
            )
    return "\n".join(lines)


async def _main(calls: int, concurrency: int, shards: int, rounds: int) -> str:
    with (
        tempfile.TemporaryDirectory(prefix="bench-cluster-") as base,
        LocalCluster(base_dir=Path(base)) as cluster,
        LocalCluster(base_dir=Path(base), replicas_per_primary=0) as bare,
    ):
        single = cluster.start_standalone()
        per_node = max(concurrency // len(bare.primaries_now()), 1)
        results = []
        for round_ in range(rounds):  # interleaved, so drift in the machine's load hits each alike
            results.append(await run_single(single, calls, concurrency, shards, round_, concurrency))
            # What one primary of the cluster sees: a third of the calls in flight.
            results.append(await run_single(single, calls, per_node, shards, round_, concurrency))
            results.append(await run_cluster(bare, calls, concurrency, shards, 0, round_, "cluster without replicas"))
            results.append(await run_cluster(cluster, calls, concurrency, shards, 1, round_))
            results.append(await run_cluster(cluster, calls, concurrency, shards, 0, round_))
        return report(results, calls, concurrency, shards)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="reservations per variant and round")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--shards", type=int, default=6, help="budget shards")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three variants")
    parser.add_argument("--output", type=Path, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)
    if not 1 <= args.calls <= 10_000_000 or not 1 <= args.concurrency <= 1024 or not 1 <= args.shards <= 1024:
        parser.error("--calls 1..10^7, --concurrency 1..1024, --shards 1..1024")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds 1..10")
    text = asyncio.run(_main(args.calls, args.concurrency, args.shards, args.rounds))
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
