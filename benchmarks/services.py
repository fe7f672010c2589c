"""What a benchmark run starts and stops: a dedicated redis-server, the bench databases on the
PostgreSQL that ``storage.devenv`` finds (or starts embedded), the reference data, and server
processes (the gateway as ``python -m server`` and the baseline as
``python -m benchmarks.baseline``), plus CPU accounting from ``/proc``.

Everything listens on 127.0.0.1 only, and everything started here is stopped by ``close()``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import psutil
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BENCH_DATA = ROOT / ".data" / "bench"
LOOPBACK = "127.0.0.1"
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")

REDIS_READY_TIMEOUT_S = 15.0
SERVER_READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
AOF_REWRITE_TIMEOUT_S = 120.0

GATEWAY_DATABASE = "subsidy_bench"
BASELINE_DATABASE = "subsidy_bench_baseline"

# The hot shared budget: one campaign, one category, one product; every call lands on it.
CAMPAIGN_ID = "bench-hot"
CATEGORY = "fridge"
GTIN = "6970000000017"
PRICE_FEN = 300_000  # 20% of it: 60,000 fen subsidy per approval
BUDGET_FEN = 9_999_999_999_999  # the largest budget the validator accepts: ~166 million approvals
MERCHANT_ID = "m-bench"

# The flash crowd: a partner app, and campaigns that issue qualifications in one tranche.
PARTNER_ID = "p-bench-01"
FLASH_CATEGORY = "general"
FLASH_VALIDITY_S = 7 * 86_400  # nothing expires during a run: the sweeper stays idle
# The district the claims must come from (the project's example outline of Xiaoshan District,
# 15 vertices); the crowd's phones are at known points inside and outside it.
REGION_FILE = ROOT / "examples" / "merchants" / "xiaoshan-region.geojson.yaml"


def say(message: str) -> None:
    """Progress on stderr, so stdout stays clean for whoever pipes the run."""
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def with_database(dsn: str, database: str) -> str:
    from server.commands.dev import with_database as swap

    return swap(dsn, database)


# --------------------------------------------------------------------------- CPU accounting


def process_cpu_s(pid: int, *, include_reaped_children: bool) -> float:
    """utime + stime of one process from /proc/<pid>/stat (plus cutime + cstime when asked:
    the CPU of children it has already waited for)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the command name (which may contain spaces) start with the state (field 3).
    fields = raw.rpartition(")")[2].split()
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    ticks = utime + stime + (cutime + cstime if include_reaped_children else 0)
    return ticks / CLOCK_TICKS_PER_S


def tree_pids(root_pid: int) -> list[int]:
    try:
        root = psutil.Process(root_pid)
        return [root_pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process tree: every live process's own time, plus the time of children
    already reaped (counted in their parent's cutime/cstime, never twice)."""
    return sum(process_cpu_s(pid, include_reaped_children=True) for pid in tree_pids(root_pid))


def pids_cpu_s(pids: list[int]) -> float:
    return sum(process_cpu_s(pid, include_reaped_children=False) for pid in pids)


@dataclass(frozen=True)
class MachineCpu:
    """Aggregate CPU counters from /proc/stat (jiffies): busy and total."""

    busy: int
    total: int

    @staticmethod
    def read() -> MachineCpu:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        values = [int(value) for value in first[1:9]]
        idle = values[3] + values[4]  # idle + iowait
        return MachineCpu(busy=sum(values) - idle, total=sum(values))


def postgres_backend_pids(database: str) -> list[int]:
    """PostgreSQL backends connected to ``database``, found by their process title
    (``postgres: <user> <database> <client> <state>``)."""
    found: list[int] = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        title = " ".join(cmdline)
        if title.startswith("postgres:") and f" {database} " in f"{title} ":
            found.append(process.pid)
    return found


# --------------------------------------------------------------------------- Redis


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is not None:
        return found
    from storage.devenv import _find_redis_server

    return _find_redis_server()


class RedisServer:
    """A redis-server for the bench alone, with AOF on and the given appendfsync policy."""

    def __init__(self, name: str, appendfsync: str) -> None:
        if appendfsync not in ("always", "everysec"):
            raise ValueError("appendfsync must be always or everysec")
        self.name = name
        self.appendfsync = appendfsync
        self.directory = BENCH_DATA / f"redis-{name}"
        self.binary = redis_binary()
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        for _ in range(3):  # the free port can be taken between choosing and binding it
            self.port = free_port()
            command = [
                self.binary,
                "--bind",
                LOOPBACK,
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--save",
                "",
                # No automatic AOF rewrite (a fork) in the middle of a round: the bench rewrites
                # the AOF between scenarios instead (Bench.reset_state).
                "--auto-aof-rewrite-percentage",
                "0",
                "--daemonize",
                "no",
                "--logfile",
                str(self.directory / "redis.log"),
            ]
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
            )
            if self._wait_ready():
                say(f"redis[{self.name}]: {self.binary} on {LOOPBACK}:{self.port}, appendfsync {self.appendfsync}")
                return
            self.stop()
        raise RuntimeError(f"redis[{self.name}] did not start; see {self.directory / 'redis.log'}")

    def _wait_ready(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + REDIS_READY_TIMEOUT_S
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    return False
                try:
                    client.ping()
                    return True
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=30, socket_connect_timeout=5)

    def version(self) -> str:
        client = self.client()
        try:
            info: dict[str, Any] = client.info("server")
            return str(info["redis_version"])
        finally:
            client.close()

    def rewrite_aof(self) -> None:
        """BGREWRITEAOF and wait for it, so a phase starts with a small AOF and no rewrite due."""
        client = self.client()
        try:
            client.bgrewriteaof()
            deadline = time.monotonic() + AOF_REWRITE_TIMEOUT_S
            while time.monotonic() < deadline:
                persistence: dict[str, Any] = client.info("persistence")
                if not persistence["aof_rewrite_in_progress"] and not persistence["aof_rewrite_scheduled"]:
                    return
                time.sleep(0.1)
            raise RuntimeError(f"redis[{self.name}]: AOF rewrite did not finish in {AOF_REWRITE_TIMEOUT_S:g} s")
        finally:
            client.close()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def remove_data(self) -> None:
        if self.directory.exists():
            shutil.rmtree(self.directory)


def delete_prefix_keys(client: redis.Redis, prefix: str) -> int:
    """Deletes every key of the bench's hash tag; returns how many."""
    doomed = list(client.scan_iter(match="{" + prefix + "}:*", count=10_000))
    for start in range(0, len(doomed), 1000):
        client.unlink(*doomed[start : start + 1000])
    return len(doomed)


# --------------------------------------------------------------------------- reference data


@dataclass(frozen=True)
class Terminal:
    terminal_id: str
    secret: str


def reference_document(terminal_count: int) -> tuple[dict[str, Any], list[Terminal]]:
    """One campaign with one huge budget (every call approves), one product without a serial
    requirement, one merchant with a terminal per client process. Secrets are set here so the
    gateway's and the baseline's databases agree."""
    terminals = [Terminal(f"t-bench-{index:02d}", secrets.token_urlsafe(32)) for index in range(terminal_count)]
    document: dict[str, Any] = {
        "campaigns": [
            {
                "id": CAMPAIGN_ID,
                "name": "Benchmark: one hot shared budget",
                "status": "ACTIVE",
                "starts_at": "2020-01-01T00:00:00+00:00",
                "ends_at": "2099-01-01T00:00:00+00:00",
                "rules": [
                    {
                        "category": CATEGORY,
                        "kind": "PERCENT",
                        "rates_bp": {"1": 2000},
                        "cap_fen": 200_000,
                        "per_person_limit": 1,
                        "budget_fen": BUDGET_FEN,
                    }
                ],
            }
        ],
        "products": [
            {
                "gtin": GTIN,
                "brand": "Bench",
                "model": "B-1",
                "category": CATEGORY,
                "energy_grade": 1,
                "reference_price_fen": PRICE_FEN,
                "serial_required": False,
            }
        ],
        "merchants": [
            {
                "id": MERCHANT_ID,
                "name": "Benchmark merchant",
                "licence_number": "BENCH",
                "status": "ACTIVE",
                "categories": [],
                "terminals": [
                    {"id": terminal.terminal_id, "status": "ACTIVE", "secret": terminal.secret}
                    for terminal in terminals
                ],
            }
        ],
    }
    return document, terminals


def flash_document(partner_secret: str, campaign_id: str, release_at: datetime, quota: int) -> dict[str, Any]:
    """The bench's partner app and one campaign whose whole qualification quota is one tranche
    released at ``release_at``, claimable from inside the district only."""
    region: dict[str, Any] = yaml.safe_load(REGION_FILE.read_text(encoding="utf-8"))
    return {
        "partners": [{"id": PARTNER_ID, "name": "Bench app", "kind": "APP", "secret": partner_secret}],
        "campaigns": [
            {
                "id": campaign_id,
                "name": "Benchmark: flash crowd",
                "status": "ACTIVE",
                "starts_at": "2020-01-01T00:00:00+00:00",
                "ends_at": "2099-01-01T00:00:00+00:00",
                "qualification_validity_s": FLASH_VALIDITY_S,
                "region": region,
                "rules": [
                    {
                        "category": FLASH_CATEGORY,
                        "kind": "FIXED",
                        "threshold_fen": 2_000,
                        "off_fen": 500,
                        "per_person_limit": 1,
                        "budget_fen": 500 * quota,
                        "qualification_quota": quota,
                        "qualification_tranches": [{"release_at": release_at.isoformat(), "count": quota}],
                    }
                ],
            }
        ],
    }


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)


async def recreate_database(admin_dsn: str, database: str) -> None:
    connection = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()


async def drop_database(admin_dsn: str, database: str) -> None:
    connection = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await connection.close()


async def postgres_facts(dsn: str) -> dict[str, str]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        facts: dict[str, str] = {}
        for setting in ("server_version", "synchronous_commit", "fsync", "wal_sync_method", "shared_buffers"):
            facts[setting] = str(await connection.fetchval(f"SHOW {setting}"))
        return facts
    finally:
        await connection.close()


async def count_ledger_events(dsn: str) -> int:
    """Events the ledger writer has written (the ledger's own table, from the project's
    migrations)."""
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM ledger_events"))
    finally:
        await connection.close()


async def load_gateway_reference(pg_dsn: str, redis_url: str, prefix: str, document: dict[str, Any]) -> None:
    """``server.commands.reference.load``: validate, upsert into PostgreSQL, publish to Redis."""
    from server.commands.reference import load
    from server.config import Config

    path = BENCH_DATA / "reference.yaml"
    write_private(path, yaml.safe_dump(document, sort_keys=False))
    try:
        config = Config(pg_dsn=pg_dsn, redis_url=redis_url, redis_prefix=prefix, listen=f"{LOOPBACK}:1")
        await load(config, path, None)
    finally:
        path.unlink(missing_ok=True)


async def quota_claimed(redis_url: str, prefix: str, campaign_id: str, category: str) -> int:
    """The campaign's claimed-qualifications counter, as the claim script keeps it."""
    from redis.asyncio import Redis

    from storage.redis.keys import Keys

    client = Redis.from_url(redis_url)
    try:
        raw = await client.hget(Keys(prefix).qualification_quota(campaign_id), f"{category}:claimed")
    finally:
        await client.aclose()
    return int(raw or 0)


async def republish_reference(pg_dsn: str, redis_url: str, prefix: str) -> None:
    """``server.reference publish``: rebuild the Redis reference cache from PostgreSQL."""
    from server.commands.reference import publish
    from server.config import Config

    await publish(Config(pg_dsn=pg_dsn, redis_url=redis_url, redis_prefix=prefix, listen=f"{LOOPBACK}:1"))


# --------------------------------------------------------------------------- server processes


@dataclass
class ServerProcess:
    """A server started as a subprocess (its own session), stdout/stderr to a log file."""

    name: str
    argv: list[str]
    environment: Mapping[str, str]
    port: int
    log_path: Path
    tls_ca: str = ""  # the CA of its certificate when it serves TLS
    cwd: Path = ROOT  # the checkout it runs from (another tree's, for the structure scenario)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, *, wait_serving: bool = True) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=dict(self.environment),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        if not wait_serving:
            return
        try:
            self._wait_serving()
        except (Exception, KeyboardInterrupt):
            self.stop()
            raise

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _wait_serving(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        if self.tls_ca:
            with open(self.tls_ca, "rb") as handle:
                channel = grpc.secure_channel(self.target, grpc.ssl_channel_credentials(handle.read()))
        else:
            channel = grpc.insecure_channel(self.target)
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self._process.returncode}); log: {self.log_path}")
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} not SERVING within {SERVER_READY_TIMEOUT_S:g} s; log: {self.log_path}")

    def wait_workers(self, count: int) -> None:
        """With SUBSIDY_WORKERS > 1 the parent spawns workers; wait until they all serve, so
        the CPU of the tree is the CPU of every worker."""
        if count <= 1:
            return
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if len(self.worker_pids()) >= count:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: fewer than {count} workers after {SERVER_READY_TIMEOUT_S:g} s")

    def worker_pids(self) -> list[int]:
        """The processes that serve calls: the workers, or the process itself with one worker
        (multiprocessing also starts an idle resource-tracker child, left out)."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        workers = [child.pid for child in children if "resource_tracker" not in " ".join(child.cmdline())]
        return workers or [self.pid]

    def cpu_s(self) -> float:
        return tree_cpu_s(self.pid)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def clean_environment() -> dict[str, str]:
    """The parent's environment without any SUBSIDY_* setting, so only the bench's apply."""
    return {key: value for key, value in os.environ.items() if not key.startswith("SUBSIDY_")}


@dataclass(frozen=True)
class GatewaySettings:
    workers: int = 1
    use_uvloop: bool = True
    # TLS on the listener (SUBSIDY_TLS_CERT / SUBSIDY_TLS_KEY): PEM files, or "" for plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    # SUBSIDY_TRACING and SUBSIDY_TRACING_ENDPOINT (the tracing scenario's OTLP receiver).
    tracing: str = "off"
    tracing_endpoint: str = ""
    # SUBSIDY_REDIS_CLIENT: the script calls' client (lean, the default, or redis-py).
    redis_client: str = "lean"
    # Run another checkout's gateway (its own code: see tree_environment), not this one's.
    tree: Path | None = None


def gateway_process(
    name: str,
    settings: GatewaySettings,
    redis_url: str,
    prefix: str,
    pg_dsn: str,
    hold_ttl_s: int,
    programme_key: str,
) -> ServerProcess:
    port = free_port()
    environment = clean_environment() | {
        "SUBSIDY_LISTEN": f"{LOOPBACK}:{port}",
        "SUBSIDY_WORKERS": str(settings.workers),
        "SUBSIDY_REDIS_URL": redis_url,
        "SUBSIDY_REDIS_PREFIX": prefix,
        "SUBSIDY_PG_DSN": pg_dsn,
        "SUBSIDY_USE_UVLOOP": "true" if settings.use_uvloop else "false",
        # Holds outlive the run, so the expiry sweeper finds nothing to do during measurement.
        "SUBSIDY_HOLD_TTL_S": str(hold_ttl_s),
        # Qualification claims turn ID numbers into consumer keys with it (>= 32 bytes).
        "SUBSIDY_PROGRAMME_KEY": programme_key,
        "SUBSIDY_LOG_LEVEL": "INFO",
        "SUBSIDY_REDIS_CLIENT": settings.redis_client,
    }
    if settings.tls_cert:
        environment |= {"SUBSIDY_TLS_CERT": settings.tls_cert, "SUBSIDY_TLS_KEY": settings.tls_key}
    if settings.tracing != "off":
        environment |= {"SUBSIDY_TRACING": settings.tracing, "SUBSIDY_TRACING_ENDPOINT": settings.tracing_endpoint}
    if settings.tree is not None:
        environment |= tree_environment(settings.tree)
    return ServerProcess(
        name=name,
        argv=[sys.executable, "-m", "server"],
        environment=environment,
        port=port,
        log_path=BENCH_DATA / "logs" / f"{name.replace(' ', '-')}.log",
        tls_ca=settings.tls_ca,
        cwd=settings.tree or ROOT,
    )


def bare_echo_process(name: str) -> ServerProcess:
    """The floor: a bare grpc.aio Echo server (benchmarks/bare_echo.py), no interceptors."""
    port = free_port()
    return ServerProcess(
        name=name,
        argv=[sys.executable, "-m", "benchmarks.bare_echo", "--listen", f"{LOOPBACK}:{port}"],
        environment=clean_environment(),
        port=port,
        log_path=BENCH_DATA / "logs" / f"{name.replace(' ', '-')}.log",
    )


def otlp_sink_process(name: str) -> ServerProcess:
    """The tracing scenario's OTLP/gRPC receiver (benchmarks/otlp_sink.py)."""
    port = free_port()
    return ServerProcess(
        name=name,
        argv=[sys.executable, "-m", "benchmarks.otlp_sink", "--port", str(port)],
        environment=clean_environment(),
        port=port,
        log_path=BENCH_DATA / "logs" / f"{name.replace(' ', '-')}.log",
    )


# --------------------------------------------------------------------------- other checkouts


def tree_environment(tree: Path) -> dict[str, str]:
    """Makes this interpreter run another checkout's code: its ``server`` and ``storage``
    (``-m`` puts the working directory first on sys.path) and its ``subsidy_client`` (this
    virtualenv's editable install points at this checkout's, so PYTHONPATH goes first).
    The third-party packages are this virtualenv's."""
    return {"PYTHONPATH": f"{tree}:{tree / 'clients' / 'python'}"}


def tree_facts(tree: Path) -> dict[str, Any]:
    """Which code a process started in ``tree`` imports (checked by importing it there, with
    the same interpreter, directory and environment as its gateway), and the tree's commit."""
    probe = (
        "import json, server, storage, subsidy_client;"
        "print(json.dumps({m.__name__: m.__file__ for m in (server, storage, subsidy_client)}))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tree,
        env=clean_environment() | tree_environment(tree),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules: dict[str, str] = json.loads(completed.stdout)
    strays = {name: path for name, path in modules.items() if not Path(path).resolve().is_relative_to(tree.resolve())}
    if strays:
        raise RuntimeError(f"{tree}: these modules would come from another checkout: {strays}")

    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", *arguments], cwd=tree, capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()

    return {
        "tree": str(tree),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_files": len(git("status", "--porcelain", "--untracked-files=no").splitlines()),
        "modules": modules,
    }


def load_tree_reference(tree: Path, pg_dsn: str, redis_url: str, prefix: str, document: dict[str, Any]) -> None:
    """``python -m server.reference load`` of ``tree`` (its own migrations, key layout and
    credential format), into its own database and key prefix."""
    path = BENCH_DATA / f"reference-{prefix}.yaml"
    write_private(path, yaml.safe_dump(document, sort_keys=False))
    environment = (
        clean_environment()
        | tree_environment(tree)
        | {"SUBSIDY_PG_DSN": pg_dsn, "SUBSIDY_REDIS_URL": redis_url, "SUBSIDY_REDIS_PREFIX": prefix}
    )
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "server.reference", "load", str(path)],
            cwd=tree,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        path.unlink(missing_ok=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{tree}: reference load failed: {completed.stderr[-2000:]}")


def baseline_process(
    name: str, redis_url: str, prefix: str, pg_dsn: str, pool_size: int, hold_ttl_s: int
) -> ServerProcess:
    port = free_port()
    environment = clean_environment() | {
        "SUBSIDY_LISTEN": f"{LOOPBACK}:{port}",
        "SUBSIDY_REDIS_URL": redis_url,
        "SUBSIDY_REDIS_PREFIX": prefix,
        "SUBSIDY_PG_DSN": pg_dsn,
        "SUBSIDY_USE_UVLOOP": "true",
        "SUBSIDY_HOLD_TTL_S": str(hold_ttl_s),
        "SUBSIDY_LOG_LEVEL": "INFO",
    }
    return ServerProcess(
        name=name,
        argv=[sys.executable, "-m", "benchmarks.baseline", "--pool-size", str(pool_size)],
        environment=environment,
        port=port,
        log_path=BENCH_DATA / "logs" / f"{name.replace(' ', '-')}.log",
    )


def writer_process(name: str, redis_url: str, prefix: str, pg_dsn: str) -> ServerProcess:
    """The ledger writer, ``python -m server.ledger writer``, as ``make run`` starts it."""
    environment = clean_environment() | {
        "SUBSIDY_REDIS_URL": redis_url,
        "SUBSIDY_REDIS_PREFIX": prefix,
        "SUBSIDY_PG_DSN": pg_dsn,
        "SUBSIDY_LOG_LEVEL": "INFO",
    }
    return ServerProcess(
        name=name,
        argv=[sys.executable, "-m", "server.ledger", "writer"],
        environment=environment,
        port=0,
        log_path=BENCH_DATA / "logs" / f"{name.replace(' ', '-')}.log",
    )


@dataclass(frozen=True)
class LedgerBacklog:
    stream_length: int  # the writer trims acknowledged entries: this is the backlog
    pending: int  # delivered to the writer, not yet acknowledged
    group_exists: bool


def ledger_backlog(client: redis.Redis, prefix: str, group: str) -> LedgerBacklog:
    key = "{" + prefix + "}:ledger"
    length = int(client.xlen(key))
    groups: list[dict[str, Any]] = client.xinfo_groups(key) if client.exists(key) else []
    mine = next((item for item in groups if _text(item["name"]) == group), None)
    return LedgerBacklog(length, int(mine["pending"]) if mine else 0, mine is not None)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


T = TypeVar("T")


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)
