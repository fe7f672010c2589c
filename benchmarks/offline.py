"""The driver the offline benchmarks share (daily report, reconciliation, risk detection): a
fresh database on the PostgreSQL that storage/devenv.py finds or starts, each phase in a child
process of its own (so that its peak memory, ru_maxrss, is its own), the database dropped at the
end unless kept, and the results written as JSON with the machine they ran on.

Each benchmark module keeps what is its own (its phases, its arguments, its summary table) and
calls ``run`` from its ``main``; a child process is the same module run with ``--phase NAME
--dsn DSN`` plus the arguments ``phase_arguments`` gives.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(module: str, name: str, dsn: str, arguments: Sequence[str]) -> dict[str, Any]:
    """Runs one phase in a child process (``python -m <module> --phase <name>``) and returns
    what it measured: the JSON object on its last line of output, plus ``process_s``, the
    child's whole life (interpreter start and imports included)."""
    command = [sys.executable, "-m", module, "--phase", name, "--dsn", dsn, *arguments]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"phase {name} failed (exit status {completed.returncode})")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - started, 1)
    return result


async def recreate(admin_dsn: str, database: str, drop_only: bool = False) -> None:
    """Drops the benchmark's database (even with sessions still connected) and, unless
    ``drop_only``, creates it empty."""
    connection = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        if not drop_only:
            await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()


def run(
    module: str,
    database: str,
    phases: Sequence[str],
    phase_arguments: Callable[[Path], list[str]],
    keep: bool,
) -> dict[str, Any]:
    """Runs ``phases`` in order against a fresh ``database``, each in its own process, printing
    progress to stderr; ``phase_arguments(folder)`` gives each child's arguments (``folder`` is
    a scratch directory the phases share, removed afterwards). Returns the phases' results by
    name plus ``environment``."""
    from server.commands.dev import with_database
    from storage.devenv import DevServices

    results: dict[str, Any] = {}
    with DevServices(ROOT / ".data") as found, tempfile.TemporaryDirectory() as raw:
        dsn = with_database(found.pg_dsn, database)
        asyncio.run(recreate(found.pg_dsn, database))
        try:
            for name in phases:
                print(f"{name} ...", file=sys.stderr, flush=True)
                results[name] = phase(module, name, dsn, phase_arguments(Path(raw)))
                print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
        finally:
            if not keep:
                asyncio.run(recreate(found.pg_dsn, database, drop_only=True))
    results["environment"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        # How busy the machine was (1, 5 and 15 minutes), since these machines are shared.
        "load_average": os.getloadavg(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return results


def save(results: dict[str, Any], output: Path, stem: str, summary: str) -> Path:
    """Writes ``<output>/<stem>-<UTC stamp>.json``, prints the Markdown summary, returns the path."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{stem}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(summary)
    return path
