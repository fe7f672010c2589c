"""Turns a :class:`RunResult` into ``<timestamp>.json``, ``<timestamp>.md`` and
``<timestamp>.png`` under the output directory, plus ``latest.md`` / ``latest.png``.

The headline ratios and their verdicts are computed here, from the measurements alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from benchmarks.histogram import Histogram
from benchmarks.profiling import Profile
from benchmarks.scenarios import (
    OUTSIDE_CORES_DISTURBED,
    Comparison,
    Measurement,
    OpenLoopPoint,
    Ratio,
    RunResult,
    disturbed,
)

TARGET_AUTHORIZE_VS_ECHO = 0.7
TARGET_GATEWAY_VS_BASELINE = 5.0
TARGET_P99_VS_BASELINE = 0.2
TARGET_CPU_VS_ECHO = 1.5
# Issue 15: against the bare grpc.aio Echo floor, and the authorize script driven directly.
TARGET_ECHO_VS_BARE_CPU = 1.10
TARGET_AUTHORIZE_VS_BARE_CPU = 1.6
TARGET_AUTHORIZE_VS_BARE_THROUGHPUT = 0.6
TARGET_SCRIPT_USEC_PER_CALL = 35.0
TARGET_AUTHORIZE_PER_REDIS_CORE = 20_000.0
QUICK_NOTE = (
    "A quick run (a smoke run): every headline below, from shorter rounds and fewer pairs; fewer side"
    " measurements (TLS and tracing one pair each, no bookkeeping timing, no open loop at the gateway's own"
    " maximum or Echo at the baseline's rate, no uvloop-off variant, no profile unless asked for). See"
    " benchmarks/README.md, `--quick`."
)
PACKAGES = ("grpcio", "protobuf", "redis", "hiredis", "asyncpg", "uvloop", "hdrhistogram", "py-spy")


# --------------------------------------------------------------------------- environment


def machine_facts() -> dict[str, Any]:
    """What the numbers depend on, recorded with every result."""
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "python": sys.version.split()[0],
        "packages": versions,
        "cpu_model": model,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "git": git_facts(),
    }


def git_facts() -> dict[str, Any]:
    def run(*arguments: str) -> str:
        try:
            completed = subprocess.run(["git", *arguments], capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return ""
        return completed.stdout.rstrip()

    # Porcelain lines are "XY path": the leading column is significant (" M benchmarks/x.py"),
    # so the output is only right-stripped.
    changed = [line[3:] for line in run("status", "--porcelain").splitlines() if line]
    return {
        "commit": run("rev-parse", "--short=12", "HEAD"),
        "uncommitted_files_outside_benchmarks": sorted(path for path in changed if not path.startswith("benchmarks/")),
    }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    name: str
    target: str
    value: float
    spread: str  # how much the value moved across the rounds it came from
    verdict: str  # PASS, MISS or NOT RUN
    basis: str  # how it was measured


def _pass(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _range(ratio_min: float, ratio_max: float, value: float) -> str:
    if math.isnan(value) or value == 0:
        return "n/a"
    return f"{ratio_min:.2f}–{ratio_max:.2f} (±{(ratio_max - ratio_min) / 2 / value:.0%})"


def _spread(ratio: Ratio) -> str:
    text = _range(ratio.pair_min, ratio.pair_max, ratio.value)
    if ratio.pairs_disturbed:
        text += f"; {ratio.pairs} clean pairs ({ratio.pairs_disturbed} disturbed left out)"
    return text


def verdicts(result: RunResult) -> list[Verdict]:
    found: list[Verdict] = []
    transport = result.comparisons.get("transport")
    baseline = result.comparisons.get("baseline")
    concurrency = result.plan.concurrency
    if transport is not None:
        ratio = transport.throughput
        found.append(
            Verdict(
                "Authorize throughput / Echo throughput",
                f">= {TARGET_AUTHORIZE_VS_ECHO}",
                ratio.value,
                _spread(ratio),
                _pass(ratio.value >= TARGET_AUTHORIZE_VS_ECHO),
                f"closed loop, {concurrency} in flight, {ratio.pairs} A/B pairs, ratio of medians",
            )
        )
    else:
        found.append(Verdict("Authorize throughput / Echo throughput", ">= 0.7", math.nan, "", "NOT RUN", ""))
    if baseline is not None:
        ratio = baseline.throughput
        found.append(
            Verdict(
                "gateway throughput / baseline throughput (hot budget)",
                f">= {TARGET_GATEWAY_VS_BASELINE:g}",
                ratio.value,
                _spread(ratio),
                _pass(ratio.value >= TARGET_GATEWAY_VS_BASELINE),
                f"closed loop, {concurrency} in flight, {ratio.pairs} A/B pairs, ratio of medians",
            )
        )
    else:
        found.append(Verdict("gateway throughput / baseline throughput", ">= 5", math.nan, "", "NOT RUN", ""))
    found.append(p99_verdict(result, baseline))
    if transport is not None:
        ratio = transport.server_cpu
        found.append(
            Verdict(
                "server CPU-ms per 1,000 calls: Authorize / Echo",
                f"<= {TARGET_CPU_VS_ECHO}",
                ratio.value,
                _spread(ratio),
                _pass(ratio.value <= TARGET_CPU_VS_ECHO),
                "/proc utime+stime of the server process tree over each round's window",
            )
        )
    else:
        found.append(Verdict("server CPU-ms per 1,000: Authorize / Echo", "<= 1.5", math.nan, "", "NOT RUN", ""))
    found += floor_verdicts(result)
    found += redis_script_verdicts(result)
    return found


def floor_verdicts(result: RunResult) -> list[Verdict]:
    """Issue 15's targets against the bare grpc.aio Echo (scenario floor); none when not run."""
    echo = result.comparisons.get("floor: echo")
    authorize = result.comparisons.get("floor: authorize")
    if echo is None or authorize is None:
        return []
    basis = "/proc CPU of the server process tree per call, bare Echo / gateway Echo / gateway Authorize rotated"
    return [
        Verdict(
            "server CPU per call: gateway Echo / bare Echo",
            f"<= {TARGET_ECHO_VS_BARE_CPU}",
            echo.server_cpu.value,
            _spread(echo.server_cpu),
            _pass(echo.server_cpu.value <= TARGET_ECHO_VS_BARE_CPU),
            basis,
        ),
        Verdict(
            "server CPU per call: gateway Authorize / bare Echo",
            f"<= {TARGET_AUTHORIZE_VS_BARE_CPU}",
            authorize.server_cpu.value,
            _spread(authorize.server_cpu),
            _pass(authorize.server_cpu.value <= TARGET_AUTHORIZE_VS_BARE_CPU),
            basis,
        ),
        Verdict(
            "throughput: gateway Authorize / bare Echo",
            f">= {TARGET_AUTHORIZE_VS_BARE_THROUGHPUT}",
            authorize.throughput.value,
            _spread(authorize.throughput),
            _pass(authorize.throughput.value >= TARGET_AUTHORIZE_VS_BARE_THROUGHPUT),
            f"closed loop, {result.plan.concurrency} in flight, ratio of medians",
        ),
    ]


def _rounds_spread(values: list[float], digits: int) -> tuple[float, str]:
    """The median over rounds, and the rounds' range with ± half of it relative to the median."""
    middle = _median(values)
    if math.isnan(middle) or middle == 0:
        return middle, "n/a"
    low, high = min(values), max(values)
    return middle, f"rounds {low:,.{digits}f}–{high:,.{digits}f} (±{(high - low) / 2 / middle:.0%})"


def redis_script_verdicts(result: RunResult) -> list[Verdict]:
    """Issue 15's Redis targets (scenario redis_script): medians over its rounds."""
    rounds = result.redis_script
    if not rounds:
        return []
    usec, usec_spread = _rounds_spread([record["evalsha_usec_per_call"] for record in rounds], 1)
    per_core, per_core_spread = _rounds_spread([record["authorize_per_redis_core_s"] for record in rounds], 0)
    shape = (
        f"{rounds[0]['connections']} connections x {rounds[0]['depth']} pipelined EVALSHAs,"
        f" median of {len(rounds)} rounds"
    )
    return [
        Verdict(
            "authorize script µs per call inside Redis (commandstats)",
            f"<= {TARGET_SCRIPT_USEC_PER_CALL:g}",
            usec,
            usec_spread,
            _pass(usec <= TARGET_SCRIPT_USEC_PER_CALL),
            f"EVALSHA usec_per_call after CONFIG RESETSTAT; {shape}",
        ),
        Verdict(
            "Authorize/s per Redis core (appendfsync always)",
            f">= {TARGET_AUTHORIZE_PER_REDIS_CORE:,.0f}",
            per_core,
            per_core_spread,
            _pass(per_core >= TARGET_AUTHORIZE_PER_REDIS_CORE),
            f"approved calls in the window / redis-server CPU-s (/proc); {shape}",
        ),
    ]


def p99_verdict(result: RunResult, baseline: Comparison | None) -> Verdict:
    """Latency is compared at the *same arrival rate* (open loop): at fixed concurrency (closed
    loop) p99 is, by Little's law, concurrency / throughput and says nothing the throughput
    ratio does not. The headline is the *worst* (largest) ratio over the tested rates."""
    name = "gateway p99 / baseline p99 (hot budget)"
    target = f"<= {TARGET_P99_VS_BASELINE:g}"
    if result.open_loop_equal:
        ratios = [
            (gateway.measurement.latency.p99_ms / other.measurement.latency.p99_ms, gateway.fraction)
            for gateway, other in result.open_loop_equal
        ]
        worst, fraction = max(ratios)
        per_pair = [
            f"{min(values):.2f}–{max(values):.2f}"
            for gateway, other in result.open_loop_equal
            for values in (
                [g.latency.p99_ms / b.latency.p99_ms for g, b in zip(gateway.phases, other.phases, strict=True)],
            )
        ]
        spread = "; ".join(
            f"{value:.3f} @{at:.0%} (per pair {pairs})" for (value, at), pairs in zip(ratios, per_pair, strict=True)
        )
        return Verdict(
            name,
            target,
            worst,
            spread,
            _pass(worst <= TARGET_P99_VS_BASELINE),
            f"open loop, same arrival rates ({', '.join(f'{f:.0%}' for _, f in ratios)} of the baseline's"
            f" closed-loop maximum), {len(result.open_loop_equal[0][0].phases)} alternating phase(s) per side and"
            f" rate, histograms merged; the worst rate ({fraction:.0%}) counts",
        )
    if baseline is not None:
        ratio = baseline.p99
        return Verdict(
            name,
            target,
            ratio.value,
            _spread(ratio),
            _pass(ratio.value <= TARGET_P99_VS_BASELINE),
            "closed loop at the same concurrency (open loop not run)",
        )
    return Verdict(name, target, math.nan, "", "NOT RUN", "")


def any_miss(result: RunResult) -> bool:
    return any(verdict.verdict == "MISS" for verdict in verdicts(result))


# --------------------------------------------------------------------------- JSON


def _clean(value: Any) -> Any:
    """NaN and infinity become null (strict JSON); paths and tuples become strings and lists."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _clean(dataclasses.asdict(value))
    return value


def to_json(result: RunResult) -> dict[str, Any]:
    document = _clean(dataclasses.asdict(result))
    document["headline"] = _clean([dataclasses.asdict(verdict) for verdict in verdicts(result)])
    return dict(document)


# --------------------------------------------------------------------------- Markdown


def _ms(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _rate(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}"


def _trouble(measurement: Measurement) -> str:
    parts = []
    if measurement.errors:
        parts.append(f"{measurement.errors} errors")
    if measurement.not_sent:
        parts.append(f"{measurement.not_sent} not sent")
    if measurement.unfinished:
        parts.append(f"{measurement.unfinished} unfinished")
    declined = sum(count for outcome, count in measurement.outcomes.items() if outcome.startswith("DECLINED"))
    if declined:
        parts.append(f"{declined} declined")
    return ", ".join(parts) or "none"


ROUND_HEADER = (
    "| round | calls/s | p50 ms | p99 ms | p99.9 ms | server CPU-ms/1k | store CPU-ms/1k | client CPU-ms/1k"
    " | server cores | machine busy | outside cores | errors |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def _round_row(label: str, measurement: Measurement) -> str:
    if disturbed(measurement):
        label += " (disturbed)"
    return (
        f"| {label} | {_rate(measurement.throughput_per_s)} | {_ms(measurement.latency.p50_ms)}"
        f" | {_ms(measurement.latency.p99_ms)} | {_ms(measurement.latency.p999_ms)}"
        f" | {measurement.server_cpu_ms_per_1k:,.0f} | {measurement.store_cpu_ms_per_1k:,.0f}"
        f" | {measurement.client_cpu_ms_per_1k:,.0f} | {measurement.server_cpu_cores:.2f}"
        f" | {measurement.machine_busy_fraction:.0%} | {measurement.outside_cpu_cores:.2f} | {_trouble(measurement)} |"
    )


def comparison_section(comparison: Comparison) -> list[str]:
    lines = [ROUND_HEADER]
    for index, (a, b) in enumerate(zip(comparison.rounds_a, comparison.rounds_b, strict=True), start=1):
        lines.append(_round_row(f"{index}A {comparison.a}", a))
        lines.append(_round_row(f"{index}B {comparison.b}", b))
    throughput, cpu, p99 = comparison.throughput, comparison.server_cpu, comparison.p99
    lines += [
        "",
        f"- throughput {comparison.a} / {comparison.b}: **{throughput.value:.3f}** (per pair {_spread(throughput)})",
        f"- server CPU-ms per 1,000 calls {comparison.a} / {comparison.b}: **{cpu.value:.3f}**"
        f" (per pair {_spread(cpu)})",
        f"- p99 {comparison.a} / {comparison.b} (closed loop): {p99.value:.3f} (per pair {_spread(p99)})",
        f"- latency over all rounds, {comparison.a}: p50 {_ms(comparison.latency_a.p50_ms)}, p99"
        f" {_ms(comparison.latency_a.p99_ms)}, p99.9 {_ms(comparison.latency_a.p999_ms)} ms; {comparison.b}: p50"
        f" {_ms(comparison.latency_b.p50_ms)}, p99 {_ms(comparison.latency_b.p99_ms)}, p99.9"
        f" {_ms(comparison.latency_b.p999_ms)} ms",
    ]
    return lines


OPEN_HEADER = (
    "| server, call | rate (share of max) | offered/s | achieved/s | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms"
    " | send lag p99 ms | server CPU-ms/1k | errors |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def _open_row(point: OpenLoopPoint) -> str:
    measurement = point.measurement
    lag = measurement.send_lag.p99_ms if measurement.send_lag is not None else math.nan
    return (
        f"| {measurement.server} {measurement.method} | {point.fraction:.0%} of {point.basis} max"
        f" ({_rate(point.basis_per_s)}/s)"
        f" | {_rate(measurement.offered_per_s)} | {_rate(measurement.throughput_per_s)}"
        f" | {_ms(measurement.latency.p50_ms)} | {_ms(measurement.latency.p95_ms)} | {_ms(measurement.latency.p99_ms)}"
        f" | {_ms(measurement.latency.p999_ms)} | {_ms(measurement.latency.max_ms)} | {_ms(lag)}"
        f" | {measurement.server_cpu_ms_per_1k:,.0f} | {_trouble(measurement)} |"
    )


def profile_section(profiles: dict[str, Profile]) -> list[str]:
    authorize, echo = profiles.get("authorize"), profiles.get("echo")
    if authorize is None:
        return []
    lines = [
        f"py-spy `record --native --rate {authorize.rate_hz}` on the gateway process under the same closed loop,"
        f" Authorize ({authorize.samples} samples, {authorize.calls:,} calls) then Echo"
        f" ({echo.samples if echo else 0} samples, {echo.calls if echo else 0:,} calls). The server process's"
        " CPU-ms per 1,000 calls (/proc, same window) attributed to components in proportion to the samples (a"
        " sample is charged to the innermost frame that matches a component; py-spy also samples threads waiting"
        " for a core, so its samples give shares, not times):",
        "",
        "| component | Authorize | Echo | Authorize − Echo |",
        "|---|---:|---:|---:|",
    ]
    names = list(authorize.components_ms_per_1k)
    if echo is not None:
        names += [name for name in echo.components_ms_per_1k if name not in names]
    for name in names:
        a = authorize.components_ms_per_1k.get(name, 0.0)
        e = echo.components_ms_per_1k.get(name, 0.0) if echo else 0.0
        lines.append(f"| {name} | {a:,.0f} | {e:,.0f} | {a - e:+,.0f} |")
    process_e = echo.process_cpu_ms_per_1k if echo else 0.0
    lines += [
        f"| **process CPU (/proc) in the same window** | **{authorize.process_cpu_ms_per_1k:,.0f}**"
        f" | **{process_e:,.0f}** | **{authorize.process_cpu_ms_per_1k - process_e:+,.0f}** |",
        "",
        "Top innermost functions, Authorize (CPU-ms per 1,000 calls):",
        "",
        "| function | ms/1k |",
        "|---|---:|",
    ]
    lines += [f"| `{name}` | {value:,.0f} |" for name, value in authorize.top_self]
    lines += [
        "",
        f"Waiting samples (threads blocked in epoll/poll/futex) are left out: Authorize"
        f" {authorize.waiting_samples}, Echo {echo.waiting_samples if echo else 0}. Raw stacks:"
        f" `{authorize.raw_path}` (flamegraph.pl input).",
    ]
    return lines


def environment_section(result: RunResult) -> list[str]:
    environment = result.environment
    machine = environment.get("machine", {})
    packages = machine.get("packages", {})
    redis_facts = environment.get("redis", {})
    postgres = environment.get("postgres", {})
    git = machine.get("git", {})
    plan = result.plan
    dirty = git.get("uncommitted_files_outside_benchmarks") or []
    return [
        "| | |",
        "|---|---|",
        f"| Python | {machine.get('python', '')} (grpcio {packages.get('grpcio')}, protobuf {packages.get('protobuf')},"
        f" redis-py {packages.get('redis')}, hiredis {packages.get('hiredis')}, asyncpg {packages.get('asyncpg')},"
        f" uvloop {packages.get('uvloop')}) |",
        f"| Redis | {redis_facts.get('version', '')} (`{redis_facts.get('binary', '')}`), dedicated to the bench,"
        f" appendonly yes, appendfsync {redis_facts.get('appendfsync', '')} |",
        f"| PostgreSQL | {postgres.get('server_version', '')} ({'embedded' if postgres.get('embedded') else 'found'};"
        f" synchronous_commit {postgres.get('synchronous_commit', '')}, fsync {postgres.get('fsync', '')},"
        f" wal_sync_method {postgres.get('wal_sync_method', '')},"
        f" shared_buffers {postgres.get('shared_buffers', '')}) |",
        f"| CPU | {machine.get('cpu_model', '')}: {machine.get('cores_logical')} logical cores"
        f" ({machine.get('cores_usable')} usable), {machine.get('memory_gib')} GiB,"
        f" Linux {machine.get('kernel', '')} |",
        f"| load average (1/5/15 min) | before {environment.get('load_average_before')},"
        f" after {environment.get('load_average_after')} |",
        "| machine CPU busy before the run (1 s, nothing of ours running)"
        f" | {environment.get('idle_busy_fraction', 0):.0%} |",
        f"| code | commit {git.get('commit', '')}; "
        + (f"{len(dirty)} uncommitted files outside benchmarks/ (listed in the JSON)" if dirty else "clean tree")
        + " |",
        f"| load | {plan.clients} client processes × {plan.channels} channels (connections); closed loop"
        f" {plan.concurrency} calls in flight; rounds {plan.round_s:g} s (+{plan.round_warmup_s:g} s warm-up),"
        f" open-loop phases {plan.open_loop_s:g} s (+{plan.open_loop_warmup_s:g} s) |",
        "| servers | gateway: `python -m server`, 1 worker, uvloop, the bench's Redis; baseline:"
        f" `python -m benchmarks.baseline`, 1 process, uvloop, asyncpg pool {plan.baseline_pool_size} |",
    ]


def markdown(result: RunResult, png_name: str) -> str:
    plan = result.plan
    found = verdicts(result)
    lines = [
        f"# Benchmark {result.started_at} ({'quick' if plan.quick else 'full'})",
        "",
        f"`{plan.command}` — {result.elapsed_s:.0f} s. Generated by `benchmarks/report.py`;"
        " every number below comes from this run.",
        "",
        *([QUICK_NOTE, ""] if plan.quick else []),
        "## Headline",
        "",
        "| ratio | target | measured | spread | verdict | how |",
        "|---|---|---:|---|---|---|",
    ]
    for verdict in found:
        value = "n/a" if math.isnan(verdict.value) else f"{verdict.value:.3f}"
        lines.append(
            f"| {verdict.name} | {verdict.target} | **{value}** | {verdict.spread} | **{verdict.verdict}**"
            f" | {verdict.basis} |"
        )
    lines += [
        "",
        "Ratios are of the medians over A/B pairs; spread is the range of the per-pair ratios and ± half of it"
        " relative to the value: the noise this run measured. A round is *disturbed* when other programs on the"
        f" machine took more than {OUTSIDE_CORES_DISTURBED} cores during it ('outside cores' below); pairs with a"
        " disturbed round are left out of a ratio when at least 3 clean pairs remain.",
        "",
        f"![latency and throughput]({png_name})",
        "",
        "## Environment",
        "",
        *environment_section(result),
    ]
    if "floor: echo" in result.comparisons:
        lines += ["", "## 0. The floor: a bare grpc.aio Echo server (issue 15)", "", *floor_section(result)]
    if result.redis_script:
        lines += ["", "## 0b. The authorize script driven directly (issue 15)", "", *redis_script_section(result)]
    if "redis_client: lean / redis-py" in result.comparisons:
        lines += [
            "",
            "## 0c. Authorize through the lean Redis path vs redis-py (issue 15)",
            "",
            *redis_client_section(result),
        ]
    transport = result.comparisons.get("transport")
    if transport is not None:
        lines += [
            "",
            "## 2. Transport floor: Authorize vs Echo (same server, A B A B)",
            "",
            *comparison_section(transport),
        ]
        if "transport_rounds" in result.checks:
            lines.append(f"- rounds: {result.checks['transport_rounds']}")
    tls = result.comparisons.get("tls")
    if tls is not None:
        lines += [
            "",
            "## 2b. TLS cost per call: Authorize over TLS vs plaintext (same configuration, A B A B)",
            "",
            *comparison_section(tls),
            *tls_cost(tls),
        ]
    tracing = [comparison for name, comparison in result.comparisons.items() if name.startswith("tracing: ")]
    if tracing:
        lines += [
            "",
            "## 2c. Tracing cost per call: SUBSIDY_TRACING=otlp vs off (same configuration, A B per method, pair by"
            " pair)",
            "",
        ]
        for comparison in tracing:
            lines += [f"### {comparison.name}", "", *comparison_section(comparison), *per_call_delta(comparison), ""]
        lines.append(f"- OTLP receiver: {result.checks.get('tracing', {}).get('receiver', 'not run')}")
        kept = result.checks.get("bookkeeping")
        if kept:
            lines.append(
                f"- the call guard's bookkeeping timed in the bench's process (benchmarks/bookkeeping.py, best of"
                f" {kept['repeats']} runs of {kept['calls']:,} calls): Prometheus metrics"
                f" **{kept['metrics_us_per_call']:.1f} µs** per call; a span (start and end, batch queue)"
                f" **{kept['span_us_per_call']:.1f} µs** on the call's path, then"
                f" {kept['otlp_encoding_us_per_span']:.1f} µs per span in the exporter's thread to encode it"
            )
    structure = [comparison for name, comparison in result.comparisons.items() if name.startswith("structure: ")]
    if structure:
        lines += [
            "",
            "## 2d. Before and after the restructuring: two checkouts' gateways (A B per method, pair by pair)",
            "",
        ]
        for side, facts in result.checks.get("structure", {}).items():
            lines.append(
                f"- {side}: `{facts['tree']}` at `{facts['commit']}` ({facts['uncommitted_files']} uncommitted files),"
                f" modules {', '.join(f'`{path}`' for path in facts['modules'].values())}"
            )
        lines.append("")
        for comparison in structure:
            lines += [f"### {comparison.name}", "", *comparison_section(comparison), *per_call_delta(comparison), ""]
    baseline = result.comparisons.get("baseline")
    if baseline is not None:
        lines += [
            "",
            "## 3. Gateway vs one-PostgreSQL-transaction-per-request baseline (hot shared budget, A B A B)",
            "",
            *comparison_section(baseline),
        ]
        check = result.checks.get("baseline_ledger")
        if check:
            lines.append(
                f"- baseline consistency after its rounds: {check['approved_rows']:,} approved ledger rows, subsidy"
                f" {check['ledger_subsidy_fen']:,} fen = budget reserved {check['budget_reserved_fen']:,} fen:"
                f" {'consistent' if check['consistent'] else 'INCONSISTENT'}"
            )
    if result.open_loop_gateway or result.open_loop_equal:
        lines += [
            "",
            "## 1. Open loop: fixed arrival rates (latency from the intended send time)",
            "",
            OPEN_HEADER,
            *(_open_row(point) for point in result.open_loop_gateway),
            *(
                _open_row(point)
                for index, pair in enumerate(result.open_loop_equal)
                for point in (*pair, *result.open_loop_floor[index : index + 1])
            ),
            "",
            "Rows at a share of the *baseline's* maximum put the gateway, the baseline and Echo (the transport floor:"
            " the same server stack without Redis) at the same arrival rates. Send lag: how late the load generator"
            " actually sent (latency is counted from the intended time regardless).",
        ]
    if result.open_loop_aof:
        lines += [
            "",
            "What `appendfsync always` costs in latency: the gateway on a Redis with `everysec`, then the reference"
            " gateway (`always`), at the same arrival rate:",
            "",
            OPEN_HEADER,
            *(_open_row(point) for point in result.open_loop_aof),
        ]
    lines += ["", "## 4. Server cost (CPU-ms per 1,000 calls, median over rounds)", "", *cost_section(result)]
    scaling = [(name, comparison) for name, comparison in result.comparisons.items() if name.startswith("scaling: ")]
    if scaling:
        lines += [
            "",
            "## 5. Scaling (each variant alternates with the reference gateway)",
            "",
            *scaling_section(scaling),
        ]
    lines += ["", "## 6. Ledger lag", "", *ledger_section(result)]
    lines += ["", "## 7. Flash crowd", "", *flash_section(result)]
    if result.profiles:
        lines += ["", "## Where the time goes (profile)", "", *profile_section(result.profiles)]
    return "\n".join(lines) + "\n"


def tls_cost(comparison: Comparison) -> list[str]:
    """The absolute cost of TLS per call: server CPU and the median latency it adds."""
    cpu_tls = _median([m.server_cpu_ms_per_1k for m in comparison.rounds_a])
    cpu_plain = _median([m.server_cpu_ms_per_1k for m in comparison.rounds_b])
    client_tls = _median([m.client_cpu_ms_per_1k for m in comparison.rounds_a])
    client_plain = _median([m.client_cpu_ms_per_1k for m in comparison.rounds_b])
    # CPU-ms per 1,000 calls is CPU-µs per call.
    return [
        f"- TLS per Authorize: server **{cpu_tls - cpu_plain:+.0f} CPU-µs** per call ({cpu_plain:.0f} → {cpu_tls:.0f}),"
        f" clients {client_tls - client_plain:+.0f} CPU-µs; p50 {comparison.latency_b.p50_ms:.2f} →"
        f" {comparison.latency_a.p50_ms:.2f} ms at the same concurrency. Connections are kept (no handshake per"
        " call), as a terminal keeps its channel.",
    ]


def per_call_delta(comparison: Comparison) -> list[str]:
    """What A costs per call beyond B: server CPU-µs (medians over rounds) and the median latency."""
    cpu_a = _median([m.server_cpu_ms_per_1k for m in comparison.rounds_a])
    cpu_b = _median([m.server_cpu_ms_per_1k for m in comparison.rounds_b])
    per_pair = [
        a.server_cpu_ms_per_1k - b.server_cpu_ms_per_1k
        for a, b in zip(comparison.rounds_a, comparison.rounds_b, strict=True)
    ]
    return [
        f"- {comparison.a} − {comparison.b}: server **{cpu_a - cpu_b:+.0f} CPU-µs** per call"
        f" ({cpu_b:.0f} → {cpu_a:.0f}; per pair {min(per_pair):+.0f} to {max(per_pair):+.0f});"
        f" p50 {comparison.latency_b.p50_ms:.2f} →"
        f" {comparison.latency_a.p50_ms:.2f} ms at the same concurrency",
    ]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return (
        ordered[len(ordered) // 2]
        if len(ordered) % 2
        else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    )


def floor_section(result: RunResult) -> list[str]:
    echo = result.comparisons["floor: echo"]
    authorize = result.comparisons["floor: authorize"]
    bare_rounds = echo.rounds_b

    def row(name: str, rounds: list[Measurement], cpu: Ratio | None, throughput: Ratio | None) -> str:
        calls = [m.throughput_per_s for m in rounds]
        cpu_us = [m.server_cpu_ms_per_1k for m in rounds]  # CPU-ms per 1,000 calls = CPU-µs per call
        cpu_ratio = f"{cpu.value:.2f} ({_spread(cpu)})" if cpu else "1.00"
        throughput_ratio = f"{throughput.value:.2f} ({_spread(throughput)})" if throughput else "1.00"
        return (
            f"| {name} | {_median(calls):,.0f} ({min(calls):,.0f}–{max(calls):,.0f}) |"
            f" {_median(cpu_us):,.0f} ({min(cpu_us):,.0f}–{max(cpu_us):,.0f}) | {cpu_ratio} | {throughput_ratio} |"
        )

    return [
        "| server | calls/s, median (range) | server CPU-µs per call, median (range) | CPU ÷ bare | calls/s ÷ bare |",
        "|---|---:|---:|---:|---:|",
        row("bare grpc.aio Echo (no interceptors, no auth)", bare_rounds, None, None),
        row("the gateway's Echo (call guard + HMAC)", echo.rounds_a, echo.server_cpu, echo.throughput),
        row("the gateway's Authorize", authorize.rounds_a, authorize.server_cpu, authorize.throughput),
        "",
        f"Rotated bare Echo, gateway Echo, gateway Authorize in each of {len(bare_rounds)} triples, closed loop,"
        f" {result.plan.concurrency} in flight; ratios are of the medians, ranges of the per-triple ratios."
        " The bare server (benchmarks/bare_echo.py) is grpc.aio with the gateway's options and uvloop and the"
        " gateway's Echo handler, without interceptors or authentication. Targets (issue 15): Echo CPU"
        f" ≤ {TARGET_ECHO_VS_BARE_CPU} × bare, Authorize CPU ≤ {TARGET_AUTHORIZE_VS_BARE_CPU} × bare, Authorize"
        f" calls/s ≥ {TARGET_AUTHORIZE_VS_BARE_THROUGHPUT} × bare. Rounds:",
        "",
        "| round | calls/s | p50 / p99 ms | server CPU-µs/call | clients cores | outside cores |",
        "|---|---:|---|---:|---:|---:|",
        *(
            f"| {m.label} {index + 1} | {m.throughput_per_s:,.0f} | {m.latency.p50_ms:.1f} / {m.latency.p99_ms:.1f} |"
            f" {m.server_cpu_ms_per_1k:,.0f} | {m.client_cpu_cores:.2f} | {m.outside_cpu_cores:.2f}"
            f"{' (disturbed)' if disturbed(m) else ''} |"
            for index, triple in enumerate(zip(bare_rounds, echo.rounds_a, authorize.rounds_a, strict=True))
            for m in triple
        ),
    ]


def redis_client_section(result: RunResult) -> list[str]:
    lean = result.comparisons["redis_client: lean / bare"]
    redis_py = result.comparisons["redis_client: redis-py / bare"]
    both = result.comparisons["redis_client: lean / redis-py"]
    bare_rounds = lean.rounds_b

    def row(name: str, rounds: list[Measurement], against_bare: Comparison | None) -> str:
        calls = [m.throughput_per_s for m in rounds]
        cpu_us = [m.server_cpu_ms_per_1k for m in rounds]  # CPU-ms per 1,000 calls = CPU-µs per call
        cpu = f"{against_bare.server_cpu.value:.2f} ({_spread(against_bare.server_cpu)})" if against_bare else "1.00"
        throughput = (
            f"{against_bare.throughput.value:.2f} ({_spread(against_bare.throughput)})" if against_bare else "1.00"
        )
        return (
            f"| {name} | {_median(calls):,.0f} ({min(calls):,.0f}–{max(calls):,.0f}) |"
            f" {_median(cpu_us):,.0f} ({min(cpu_us):,.0f}–{max(cpu_us):,.0f}) | {cpu} | {throughput} |"
        )

    return [
        "| server, call | calls/s, median (range) | server CPU-µs per call, median (range) | CPU ÷ bare"
        " | calls/s ÷ bare |",
        "|---|---:|---:|---:|---:|",
        row("bare grpc.aio Echo", bare_rounds, None),
        row("gateway Authorize, SUBSIDY_REDIS_CLIENT=lean", lean.rounds_a, lean),
        row("gateway Authorize, SUBSIDY_REDIS_CLIENT=redis-py", redis_py.rounds_a, redis_py),
        "",
        f"- lean / redis-py: server CPU per call **{both.server_cpu.value:.2f}**"
        f" (per triple {_spread(both.server_cpu)}), calls/s **{both.throughput.value:.2f}**"
        f" (per triple {_spread(both.throughput)}), p99 {both.p99.value:.2f} (per triple {_spread(both.p99)})",
        "",
        f"Two gateways alike but for SUBSIDY_REDIS_CLIENT, and the bare Echo server; {len(bare_rounds)} triples of"
        " bare Echo then Authorize on each gateway (their order swapped every triple), closed loop,"
        f" {result.plan.concurrency} in flight. Rounds:",
        "",
        "| round | calls/s | p50 / p99 ms | server CPU-µs/call | clients cores | outside cores |",
        "|---|---:|---|---:|---:|---:|",
        *(
            f"| {m.label} {index + 1} | {m.throughput_per_s:,.0f} | {m.latency.p50_ms:.1f} / {m.latency.p99_ms:.1f} |"
            f" {m.server_cpu_ms_per_1k:,.0f} | {m.client_cpu_cores:.2f} | {m.outside_cpu_cores:.2f}"
            f"{' (disturbed)' if disturbed(m) else ''} |"
            for index, triple in enumerate(zip(bare_rounds, lean.rounds_a, redis_py.rounds_a, strict=True))
            for m in triple
        ),
    ]


def redis_script_section(result: RunResult) -> list[str]:
    rounds = result.redis_script
    lines = [
        "| round | calls/s | Redis cores | Authorize/s per Redis core | Redis CPU-µs/call | EVALSHA µs/call"
        " (commandstats) | machine busy | outcomes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for record in rounds:
        outcomes = ", ".join(f"{name} {count:,}" for name, count in sorted(record["outcomes"].items()))
        lines.append(
            f"| {record['round']}{' (ran out of commands)' if record['ran_out'] else ''} |"
            f" {record['calls_per_s']:,.0f} | {record['redis_cpu_cores']:.2f} |"
            f" {record['authorize_per_redis_core_s']:,.0f} | {record['redis_cpu_us_per_call']:.1f} |"
            f" {record['evalsha_usec_per_call']:.1f} | {record['machine_busy_fraction']:.0%} | {outcomes} |"
        )
    redis = result.environment.get("redis", {})
    lines += [
        "",
        f"{rounds[0]['connections']} driver processes, one connection each, {rounds[0]['depth']} EVALSHAs in flight"
        " on each, against the bench's dedicated redis-server"
        f" ({redis.get('binary', '?')} {redis.get('version', '?')}, appendfsync {redis.get('appendfsync', '?')}):"
        " every command an approvable one-line Authorize of a new consumer, its KEYS and ARGV built by"
        " storage.redis's RedisStore.authorize (benchmarks/redis_direct.py). Authorize/s per Redis core ="
        " calls answered in the window / the redis-server's CPU-seconds over it (script, AOF write and fsync,"
        " networking); EVALSHA µs/call is the time inside the script alone. Targets (issue 15):"
        f" ≤ {TARGET_SCRIPT_USEC_PER_CALL:g} µs, ≥ {TARGET_AUTHORIZE_PER_REDIS_CORE:,.0f} per core.",
    ]
    return lines


def cost_section(result: RunResult) -> list[str]:
    lines = [
        "| what | server CPU-ms/1k | store | store CPU-ms/1k | client CPU-ms/1k | calls/s |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for comparison in result.comparisons.values():
        for label, rounds in ((comparison.a, comparison.rounds_a), (comparison.b, comparison.rounds_b)):
            if not rounds or (comparison.name != "authorize vs echo" and label == "reference"):
                continue
            lines.append(
                f"| {rounds[0].server}: {rounds[0].method} ({comparison.name}) |"
                f" {_median([m.server_cpu_ms_per_1k for m in rounds]):,.0f} | {rounds[0].store} |"
                f" {_median([m.store_cpu_ms_per_1k for m in rounds]):,.0f} |"
                f" {_median([m.client_cpu_ms_per_1k for m in rounds]):,.0f} |"
                f" {_median([m.throughput_per_s for m in rounds]):,.0f} |"
            )
    lines += [
        "",
        "Server: utime+stime from /proc/<pid>/stat of the server's process tree (children included), over the"
        " measured window, per call completed in it. Store: the bench's redis-server process, or the PostgreSQL"
        " backends serving the baseline's pool. Client: the load generator's processes (what they cost is CPU the"
        " servers could not use: every process here shares the same cores).",
    ]
    return lines


def scaling_section(scaling: list[tuple[str, Comparison]]) -> list[str]:
    lines = [
        "| variant | calls/s (variant / reference) | ratio | server CPU-ms/1k (variant / reference) | ratio"
        " | store CPU-ms/1k (variant / reference) | p99 ms (variant / reference) | per-worker CPU share |",
        "|---|---|---:|---|---:|---|---|---|",
    ]
    for name, comparison in scaling:
        variant, reference = comparison.rounds_a, comparison.rounds_b
        shares = variant[-1].worker_cpu_shares
        lines.append(
            f"| {name.removeprefix('scaling: ')} | {_median([m.throughput_per_s for m in variant]):,.0f} /"
            f" {_median([m.throughput_per_s for m in reference]):,.0f} | {comparison.throughput.value:.2f}"
            f" ({comparison.throughput.pair_min:.2f}–{comparison.throughput.pair_max:.2f}) |"
            f" {_median([m.server_cpu_ms_per_1k for m in variant]):,.0f} /"
            f" {_median([m.server_cpu_ms_per_1k for m in reference]):,.0f} | {comparison.server_cpu.value:.2f} |"
            f" {_median([m.store_cpu_ms_per_1k for m in variant]):,.0f} /"
            f" {_median([m.store_cpu_ms_per_1k for m in reference]):,.0f} |"
            f" {_ms(comparison.latency_a.p99_ms)} / {_ms(comparison.latency_b.p99_ms)} |"
            f" {' / '.join(f'{share:.0%}' for share in shares) if len(shares) > 1 else '—'} |"
        )
    return lines


def ledger_section(result: RunResult) -> list[str]:
    ledger = result.ledger
    if not ledger:
        return ["Not run."]
    if ledger.get("status") != "measured":
        return [f"{ledger.get('status')}."]
    load: Measurement = ledger["load"]
    drained = ledger["drained_after_s"]
    drain_text = f"{drained:.1f} s" if drained is not None else f"not drained within {ledger['drain_timeout_s']:g} s"
    return [
        f"The ledger writer (`python -m server.ledger writer`, group `{ledger['group']}`) ran against the gateway's"
        f" database while the gateway took closed-loop Authorize load ({load.window_s:.0f} s, {load.concurrency} in"
        f" flight). `XLEN {{prefix}}:ledger` (the writer trims what it has acknowledged, so this is the backlog)"
        " and the group's pending count were sampled every 250 ms.",
        "",
        "| gateway calls/s with the writer running | stream length p50 / max during load | pending max"
        " | length when load stopped | time to drain to zero | events written | writer CPU-ms per 1,000 events |",
        "|---:|---|---:|---:|---:|---:|---:|",
        f"| {_rate(load.throughput_per_s)} | {ledger['stream_length_p50']:,} / {ledger['stream_length_max']:,}"
        f" | {ledger['pending_max']:,} | {ledger['stream_length_at_stop']:,} | {drain_text}"
        f" | {ledger['events_written']:,} | {ledger['writer_cpu_ms_per_1k_events']:,.0f} |",
    ]


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def flash_section(result: RunResult) -> list[str]:
    flash = result.flash_crowd
    if flash is None:
        return ["Not run."]
    lines = [
        f"At T a tranche of **{flash.quota:,}** qualifications opens (a fresh campaign each time, its whole quota"
        f" in one `qualification_tranches` entry released at T, claimable from inside Xiaoshan District only) and"
        f" a crowd of **{flash.claims:,} claims from {flash.people:,} people** ({flash.claims - flash.people:,}"
        f" of them claim a second time; {flash.outside_region_people:,} are outside the district) presses within"
        f" {flash.arrival_s:g} s of T ({flash.claims / flash.arrival_s:,.0f}/s), in random order. The partner"
        f" apps keep at most {flash.in_flight:,} claims unanswered at once; a press that finds them all busy"
        f" waits. Server: `{flash.server}` (`SUBSIDY_WORKERS={flash.workers}`). Every claim is a fresh signed"
        " `ClaimQualification` with a valid resident ID number and a phone fix (WGS-84 or GCJ-02, up to 30 s old).",
        "",
        "| crowd | claims/s (T → last answer) | tranche exhausted after | wait p50 / p99 / p99.9 / max ms"
        " | service p50 / p99 / p99.9 ms | issued (people) / counter / quota | declines | server CPU-ms/1k"
        " | store CPU-ms/1k | server cores | worker CPU split | outside cores |",
        "|---|---:|---:|---|---|---|---|---:|---:|---:|---|---:|",
    ]
    for burst in flash.bursts:
        m, service = burst.measurement, burst.service
        label = m.label + (" (disturbed)" if disturbed(m) else "")
        declines = ", ".join(f"{reason} {count:,}" for reason, count in burst.decline_reasons.items())
        errors = f"; **{m.errors:,} errors**" if m.errors else ""
        lines.append(
            f"| {label} | {_rate(m.throughput_per_s)} | {_seconds(burst.exhausted_after_s)}"
            f" | {_ms(m.latency.p50_ms)} / {_ms(m.latency.p99_ms)} / {_ms(m.latency.p999_ms)} / {_ms(m.latency.max_ms)}"
            f" | {_ms(service.p50_ms)} / {_ms(service.p99_ms)} / {_ms(service.p999_ms)}"
            f" | {burst.issued:,} ({burst.issued_people:,}) / {burst.claimed_counter:,} / {flash.quota:,}"
            f" **{'OK' if burst.correct else 'WRONG'}**{errors} | {declines}"
            f" | {m.server_cpu_ms_per_1k:,.0f} | {m.store_cpu_ms_per_1k:,.0f} | {m.server_cpu_cores:.2f}"
            f" | {' / '.join(f'{share:.0%}' for share in m.worker_cpu_shares) or '—'} | {m.outside_cpu_cores:.2f} |"
        )
    throughput, cpu = flash.throughput, flash.server_cpu
    lines += [
        "",
        "Wait: from the press (the claim's due time) to the answer, the latency the person sees (HDR, merged over"
        " the client processes). Service: from the send to the answer. Tranche exhausted: from T to the"
        f" {flash.quota:,}th ISSUED answer. Issued: ISSUED answers (distinct people among them), the campaign's"
        " claimed counter in Redis afterwards, and the quota; all three must be equal or the run fails.",
        "",
        "Reference: `Authorize`, closed loop, on the same server, before the first crowd and after each one:",
        "",
        ROUND_HEADER,
        *(_round_row(f"{index} authorize", m) for index, m in enumerate(flash.references)),
        "",
        f"- claims/s during a crowd / Authorize calls/s (the rounds either side): **{throughput.value:.3f}**"
        f" (per crowd {_spread(throughput)})",
        f"- server CPU-ms per 1,000 calls, claim / Authorize: **{cpu.value:.3f}** (per crowd {_spread(cpu)})",
    ]
    return lines


def flash_summary(result: RunResult) -> list[str]:
    """One line per crowd for stdout: the numbers and the correctness check."""
    flash = result.flash_crowd
    if flash is None:
        return []
    lines = []
    for burst in flash.bursts:
        m = burst.measurement
        lines.append(
            f"{'OK' if burst.correct else 'WRONG':7} flash crowd {m.label}: issued {burst.issued:,} to"
            f" {burst.issued_people:,} people, counter {burst.claimed_counter:,}, quota {flash.quota:,};"
            f" {flash.claims:,} claims at {m.throughput_per_s:,.0f}/s, tranche exhausted after"
            f" {_seconds(burst.exhausted_after_s)}, wait p50/p99/p99.9 {_ms(m.latency.p50_ms)}/{_ms(m.latency.p99_ms)}/"
            f"{_ms(m.latency.p999_ms)} ms"
        )
    lines.append(
        f"{'':7} flash crowd claims/s / Authorize calls/s: {flash.throughput.value:.3f}; server CPU per call"
        f" claim / Authorize: {flash.server_cpu.value:.3f}"
    )
    return lines


# --------------------------------------------------------------------------- plot


def plot(result: RunResult, path: Path) -> None:
    """Three panels: latency by percentile at equal arrival rates (gateway, baseline, Echo);
    the gateway at shares of its own maximum; closed-loop throughput of every A/B side."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (equal_axes, own_axes, throughput_axes) = plt.subplots(1, 3, figsize=(19, 5.8))
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    styles = {"gateway": "-", "baseline": "--", "echo": ":"}
    for index, (gateway, baseline) in enumerate(result.open_loop_equal):
        color = colors[index % len(colors)]
        floor = result.open_loop_floor[index : index + 1]
        for point in (gateway, baseline, *floor):
            kind = "echo" if point.measurement.method == "echo" else point.measurement.server
            _plot_curve(equal_axes, point, styles.get(kind, "-"), color)
    own_points = [*result.open_loop_gateway, *result.open_loop_aof]
    for index, point in enumerate(own_points):
        _plot_curve(own_axes, point, "-" if "everysec" not in point.measurement.server else "-.", colors[index % 5])
    if not own_points:
        own_axes.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=own_axes.transAxes)
    for axes, title in (
        (equal_axes, "Open loop, same arrival rates (share of baseline max)"),
        (own_axes, "Open loop, gateway (share of its own max)"),
    ):
        ticks = [50.0, 90.0, 99.0, 99.9, 99.99]
        axes.set_xticks([_nines(tick) for tick in ticks], [f"p{tick:g}" for tick in ticks])
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axes.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes.set_ylabel("latency from intended send time (ms)")
        axes.set_title(title, fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    labels: list[str] = []
    medians: list[float] = []
    lows: list[float] = []
    highs: list[float] = []
    for comparison in result.comparisons.values():
        for label, rounds in ((comparison.a, comparison.rounds_a), (comparison.b, comparison.rounds_b)):
            if not rounds or label == "reference":
                continue
            values = [m.throughput_per_s for m in rounds]
            middle = _median(values)
            labels.append(
                label if comparison.name != "gateway vs baseline" or label != "gateway" else "gateway (vs bl)"
            )
            medians.append(middle)
            lows.append(middle - min(values))
            highs.append(max(values) - middle)
    positions = list(range(len(labels)))
    throughput_axes.bar(positions, medians, yerr=[lows, highs], capsize=4, color="#4c72b0")
    throughput_axes.set_xticks(positions, labels, rotation=30, ha="right", fontsize=8)
    throughput_axes.set_ylabel("calls/s (median of rounds; bars: min–max)")
    throughput_axes.set_title(f"Closed loop, {result.plan.concurrency} in flight", fontsize=10)
    throughput_axes.grid(True, axis="y", alpha=0.3)
    figure.suptitle(f"subsidy gateway benchmark {result.started_at} ({'quick' if result.plan.quick else 'full'})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _nines(percentile: float) -> float:
    return -math.log10(1.0 - percentile / 100.0)


def _plot_curve(axes: Any, point: OpenLoopPoint, style: str, color: str) -> None:
    curve = Histogram.decode(point.measurement.histogram).percentile_curve()
    if not curve:
        return
    measurement = point.measurement
    axes.plot(
        [_nines(percentile) for percentile, _ in curve],
        [max(value, 0.01) for _, value in curve],
        style,
        color=color,
        label=f"{measurement.server} {measurement.method} @{point.fraction:.0%} ({measurement.offered_per_s:,.0f}/s)",
    )


# --------------------------------------------------------------------------- files


def write(result: RunResult, output: Path) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    stem = result.started_at
    json_path, markdown_path, png_path = (output / f"{stem}.{suffix}" for suffix in ("json", "md", "png"))
    json_path.write_text(json.dumps(to_json(result), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    plot(result, png_path)
    markdown_path.write_text(markdown(result, png_path.name), encoding="utf-8")
    shutil.copyfile(png_path, output / "latest.png")
    (output / "latest.md").write_text(markdown(result, "latest.png"), encoding="utf-8")
    return [json_path, markdown_path, png_path, output / "latest.md", output / "latest.png"]
