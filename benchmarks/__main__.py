"""``python -m benchmarks`` (``make bench``): the benchmark suite.

Starts what it needs (a dedicated redis-server with AOF, the bench databases on the PostgreSQL
that ``storage.devenv`` finds or starts embedded, the gateway, the baseline, the client
processes), runs the scenarios, and writes ``<timestamp>.json``, ``.md`` and ``.png`` plus
``latest.md`` under ``--output``. Progress goes to stderr; the headline table to stdout.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from benchmarks import report
from benchmarks.loadgen import CLIENT_PROCESSES_MAX, CONCURRENCY_MAX, CROWD_CLAIMS_MAX
from benchmarks.scenarios import DEFAULT_SCENARIOS, SCENARIOS, Bench, Plan, RunResult, run_profiles, run_scenarios
from benchmarks.services import ROOT, MachineCpu, say

DURATION_S_MAX = 120.0
PAIRS_MAX = 20
IDLE_SAMPLE_S = 1.0
FLASH_CLAIMS_MIN = 100
# The crowd presses at 20,000 a second from the opening (the default crowd within its first
# second: about 10 times what the gateway answers here), and the partner apps keep at most 1,024
# claims waiting on the gateway at once.
FLASH_PRESSES_PER_S = 20_000.0
FLASH_IN_FLIGHT = 1024


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (< 2 min): every headline, short rounds, fewer of them, fewer side measurements",
    )
    parser.add_argument(
        "--duration-s",
        type=float,
        help="measured seconds of each A/B round and open-loop phase (default 5, --quick 1; quick open-loop"
        " phases twice that); the ledger-lag load lasts twice as long, each profile 3 (quick) or 4 times",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all but structure)",
    )
    parser.add_argument(
        "--before-tree",
        type=Path,
        help="structure scenario: a checkout of the commit to compare with (e.g. a git worktree)",
    )
    parser.add_argument(
        "--after-tree", type=Path, help="structure scenario: the checkout measured as after (default: this one)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results", help="results directory")
    parser.add_argument(
        "--pairs", type=int, help="A/B pairs per comparison (default 5, --quick 3; --quick's tls and tracing: 1)"
    )
    parser.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed loop: calls in flight in all (default 32)")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels (connections) per client process")
    parser.add_argument("--baseline-pool-size", type=int, default=16, help="the baseline's asyncpg pool (default 16)")
    parser.add_argument(
        "--flash-claims",
        type=int,
        help="flash crowd: claims in each crowd (default 20,000, --quick 2,000); three quarters of them are"
        " distinct people, the rest claim a second time",
    )
    parser.add_argument(
        "--flash-quota", type=int, help="flash crowd: qualifications in the tranche (default a tenth of the claims)"
    )
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        help="py-spy the gateway after the scenarios: when a target is missed (auto, the default), always, or"
        " never (the default with --quick)",
    )
    return parser.parse_args(argv)


def build_plan(arguments: argparse.Namespace, command: str) -> Plan:
    scenarios = tuple(name.strip() for name in arguments.scenarios.split(",") if name.strip())
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    quick = bool(arguments.quick)
    round_s = float(arguments.duration_s or (1.0 if quick else 5.0))
    if not 0.5 <= round_s <= DURATION_S_MAX:
        raise ValueError(f"--duration-s must be between 0.5 and {DURATION_S_MAX:g}")
    pairs = int(arguments.pairs or (3 if quick else 5))
    if not 1 <= pairs <= PAIRS_MAX:
        raise ValueError(f"--pairs must be between 1 and {PAIRS_MAX}")
    if not 1 <= arguments.clients <= CLIENT_PROCESSES_MAX:
        raise ValueError(f"--clients must be between 1 and {CLIENT_PROCESSES_MAX}")
    if not arguments.clients <= arguments.concurrency <= CONCURRENCY_MAX or arguments.concurrency % arguments.clients:
        raise ValueError(f"--concurrency must be a multiple of --clients, at most {CONCURRENCY_MAX}")
    flash_claims = int(arguments.flash_claims or (2_000 if quick else 20_000))
    if not FLASH_CLAIMS_MIN <= flash_claims <= CROWD_CLAIMS_MAX * arguments.clients:
        raise ValueError(f"--flash-claims must be between {FLASH_CLAIMS_MIN} and {CROWD_CLAIMS_MAX:,} per client")
    flash_people = flash_claims * 3 // 4
    trees = [tree for tree in (arguments.before_tree, arguments.after_tree) if tree is not None]
    for tree in trees:
        if not (tree / "server" / "__main__.py").is_file():
            raise ValueError(f"{tree} is not a checkout of this project (no server/__main__.py)")
    if "structure" in scenarios and arguments.before_tree is None:
        raise ValueError("the structure scenario needs --before-tree")
    flash_quota = int(arguments.flash_quota or flash_claims // 10)
    if not 1 <= flash_quota <= flash_people // 2:
        raise ValueError("--flash-quota must be between 1 and half the crowd's people (three eighths of the claims)")
    return Plan(
        quick=quick,
        # Stable order: the open loop needs the closed-loop maxima the comparisons measure.
        scenarios=tuple(name for name in SCENARIOS if name in scenarios),
        round_s=round_s,
        round_warmup_s=0.5 if quick else 1.0,
        pairs=pairs,
        side_pairs=1 if quick else pairs,
        scaling_pairs=1 if quick else max(1, min(pairs, 3)),
        open_loop_s=2 * round_s if quick else round_s,
        open_loop_pairs=1 if quick else 2,
        open_loop_warmup_s=0.5 if quick else 2.0,
        open_loop_fractions=(0.7,) if quick else (0.5, 0.7, 0.9),
        ledger_s=2 * round_s,
        drain_timeout_s=60.0 if quick else 120.0,
        initial_warmup_s=1.5 if quick else 5.0,
        flash_quota=flash_quota,
        flash_claims=flash_claims,
        flash_people=flash_people,
        flash_bursts=1 if quick else max(1, min(pairs, 3)),
        flash_in_flight=FLASH_IN_FLIGHT,
        flash_arrival_s=flash_claims / FLASH_PRESSES_PER_S,
        clients=arguments.clients,
        channels=arguments.channels,
        concurrency=arguments.concurrency,
        baseline_pool_size=arguments.baseline_pool_size,
        profile=arguments.profile or ("never" if quick else "auto"),
        profile_s=3 * round_s if quick else 4 * round_s,
        output=arguments.output,
        command=command,
        before_tree=arguments.before_tree.resolve() if arguments.before_tree else None,
        after_tree=arguments.after_tree.resolve() if arguments.after_tree else None,
    )


def idle_busy_fraction() -> float:
    """How busy the machine is before the bench starts anything: the background it runs on."""
    before = MachineCpu.read()
    time.sleep(IDLE_SAMPLE_S)
    after = MachineCpu.read()
    total = after.total - before.total
    return (after.busy - before.busy) / total if total else 0.0


def _stop_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    arguments = parse_arguments(argv)
    try:
        plan = build_plan(arguments, " ".join(["python -m benchmarks", *argv]))
    except ValueError as error:
        print(f"benchmarks: {error}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    result = RunResult(plan, started_at=datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
    result.environment = {
        "machine": report.machine_facts(),
        "load_average_before": report.load_average(),
        "idle_busy_fraction": idle_busy_fraction(),
    }
    started = time.monotonic()
    bench = Bench(plan)
    status = 0
    try:
        result.environment |= bench.start()
        run_scenarios(bench, result)
        if plan.profile == "always" or (plan.profile == "auto" and report.any_miss(result)):
            run_profiles(bench, result)
    except KeyboardInterrupt:
        say("benchmarks: interrupted; stopping what was started, writing what was measured")
        result.checks["interrupted"] = True
        status = 130
    except Exception:
        say(f"benchmarks: failed:\n{traceback.format_exc()}")
        result.checks["failure"] = traceback.format_exc()
        status = 1
    finally:
        bench.close()
    result.elapsed_s = time.monotonic() - started
    result.finished_at = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    result.environment["load_average_after"] = report.load_average()
    paths = report.write(result, plan.output)
    say("benchmarks: wrote " + ", ".join(str(path.relative_to(ROOT)) for path in paths if path.is_relative_to(ROOT)))
    for verdict in report.verdicts(result):
        print(f"{verdict.verdict:7} {verdict.name}: {verdict.value:.3f} (target {verdict.target})")
    for line in report.flash_summary(result):
        print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
