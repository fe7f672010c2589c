"""What one Authorize script call costs inside Redis, counted in instructions (noise-free).

``python -m benchmarks.redis_script_cost [--tree DIR ...] [--calls N] [--redis-config NAME=VALUE ...]``:
starts a scratch redis-server (``/usr/bin/redis-server``: AOF on, ``appendfsync always``, and any
``--redis-config`` settings, to measure a setting by running once with it and once without) under valgrind's
callgrind, loads the bench's reference data into it (``benchmarks/services.py``: one campaign with
a huge budget, one product, the bench merchant; a scratch PostgreSQL database on the dev server,
dropped at the end), and for the authorize script of each tree (as that tree's own loader,
``storage/redis/scripts.py``, puts it together, so a change of the loader or the bindings is
measured too; the trees must share the KEYS/ARGV contract; default: this checkout) sends ``--calls`` approvable
one-line Authorizes built as ``benchmarks/redis_direct.py`` builds them (32 pipelined), after 200
unmeasured ones, on reference data restored afresh. It prints the instructions per call of the
whole redis-server, of EVALSHA alone (what ``usec_per_call`` times) and of feeding the AOF.

Instruction counts do not vary with the machine's load, which swings ``usec_per_call`` on the
shared 2-core development VM by more than the differences measured (README, "The authorize script
inside Redis"). Not part of ``make bench``: valgrind runs Redis about 50 times slower.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis

from benchmarks import redis_direct, services
from storage.redis.contract import AUTHORIZE
from storage.redis.scripts import script_source as storage_script_source

WARM_UP_CALLS = 200
DEPTH = 32
DATABASE = "subsidy_script_cost"
PREFIX = "cost"  # the Redis key prefix of the reference data and the calls
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
# Prints the authorize script as the loader of the checkout it runs in builds it.
LOADED = (
    "import sys; from storage.redis.contract import AUTHORIZE; from storage.redis.scripts import script_source;"
    " sys.stdout.write(script_source(AUTHORIZE))"
)
# The callgrind functions reported, by the name callgrind_annotate gives them.
PARTS = {"evalsha": "evalShaCommand", "aof_feed": "propagatePendingCommands"}


def script_source(tree: Path) -> str:
    """The authorize script as the tree's loader builds it (run in a process importing the tree)."""
    return subprocess.run(
        [sys.executable, "-c", LOADED],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def send_all(sock: socket.socket, commands: list[bytes]) -> Counter[str]:
    """The commands, DEPTH at a time; their outcomes (redis_direct.outcome)."""
    outcomes: Counter[str] = Counter()
    buffer, position = b"", 0
    for start in range(0, len(commands), DEPTH):
        batch = commands[start : start + DEPTH]
        sock.sendall(b"".join(batch))
        answered = 0
        while answered < len(batch):
            parsed = redis_direct.parse_reply(buffer, position)
            if parsed is None:
                buffer, position = buffer[position:] + sock.recv(1 << 20), 0
                continue
            reply, position = parsed
            answered += 1
            outcomes[redis_direct.outcome(reply)] += 1
    return outcomes


def inclusive_counts(dump: Path) -> dict[str, int]:
    """Total instructions and the inclusive count of each of PARTS, from a callgrind dump."""
    report = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(dump)], capture_output=True, text=True, check=True
    ).stdout
    counts: dict[str, int] = {}
    for line in report.splitlines():
        fields = line.split()
        if not fields or not fields[0].replace(",", "").isdigit():
            continue
        value = int(fields[0].replace(",", ""))
        if "PROGRAM TOTALS" in line:
            counts["total"] = value
        for part, function in PARTS.items():
            if f":{function} " in line and part not in counts:
                counts[part] = value
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", help="a checkout whose authorize script to count")
    parser.add_argument("--calls", type=int, default=1000, help="measured calls per tree")
    parser.add_argument("--pg-dsn", default=ADMIN_DSN, help="PostgreSQL admin DSN (a scratch database is made)")
    parser.add_argument(
        "--redis-config", action="append", default=[], metavar="NAME=VALUE",
        help="a redis-server setting for the run (e.g. hash-max-listpack-value=256), to measure a setting",
    )  # fmt: skip
    arguments = parser.parse_args()
    if arguments.calls <= 0:
        raise SystemExit("--calls must be positive")
    trees = [tree.resolve() for tree in (arguments.tree or [services.ROOT])]
    settings: list[str] = []
    for setting in arguments.redis_config:
        name, separator, value = setting.partition("=")
        if not separator or not name:
            raise SystemExit(f"--redis-config wants NAME=VALUE, got {setting!r}")
        settings += [f"--{name}", value]
    folder = Path(tempfile.mkdtemp(prefix="script-cost-"))
    with socket.socket() as probe:
        probe.bind((services.LOOPBACK, 0))
        port = probe.getsockname()[1]
    # redis-server in its own session: stopped below by its own pid only.
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/callgrind.%p", "/usr/bin/redis-server",
         "--bind", services.LOOPBACK, "--port", str(port), "--dir", str(folder), "--appendonly", "yes",
         "--appendfsync", "always", "--save", "", *settings],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    dsn = services.with_database(arguments.pg_dsn, DATABASE)
    try:
        client = redis.Redis(host=services.LOOPBACK, port=port)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        document, terminals = services.reference_document(1)
        url = f"redis://{services.LOOPBACK}:{port}/0"
        asyncio.run(services.recreate_database(arguments.pg_dsn, DATABASE))
        asyncio.run(services.load_gateway_reference(dsn, url, PREFIX, document))
        reference: dict[bytes | str, bytes] = {}
        for key in client.keys("*"):
            value = client.dump(key)
            assert isinstance(value, bytes), key
            reference[key] = value
        spec = redis_direct.DirectSpec(
            redis_host=services.LOOPBACK, redis_port=port, prefix=PREFIX, hold_ttl_s=600,
            terminal_id=terminals[0].terminal_id, merchant_id=services.MERCHANT_ID,
            campaign_id=services.CAMPAIGN_ID, gtin=services.GTIN, price_fen=services.PRICE_FEN,
            depth=DEPTH, commands=WARM_UP_CALLS + arguments.calls,
        )  # fmt: skip
        built = redis_direct.build_commands(spec)
        # The SHA the commands were built with: this checkout's script (SCRIPT LOAD's SHA1).
        checkout_sha = hashlib.sha1(storage_script_source(AUTHORIZE).encode()).hexdigest().encode()
        with socket.create_connection((services.LOOPBACK, port)) as sock:
            for number, tree in enumerate(trees, 1):
                client.flushall()
                for key, value in reference.items():
                    client.restore(key, 0, value)
                sha = client.script_load(script_source(tree)).encode()
                commands = [command.replace(checkout_sha, sha) for command in built]
                send_all(sock, commands[:WARM_UP_CALLS])
                subprocess.run(["callgrind_control", "--zero", str(server.pid)], capture_output=True, check=True)
                outcomes = send_all(sock, commands[WARM_UP_CALLS:])
                subprocess.run(["callgrind_control", "--dump", str(server.pid)], capture_output=True, check=True)
                counts = inclusive_counts(folder / f"callgrind.{server.pid}.{number}")
                per_call = {part: value / arguments.calls / 1000 for part, value in counts.items()}
                print(
                    f"{tree}: {per_call.get('total', 0):.1f}k instructions per call, EVALSHA"
                    f" {per_call.get('evalsha', 0):.1f}k, AOF feed {per_call.get('aof_feed', 0):.1f}k;"
                    f" outcomes {dict(outcomes)}",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(30)
        asyncio.run(services.drop_database(arguments.pg_dsn, DATABASE))
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
