"""Reference data commands.

``python -m server.reference load FILE`` validates a YAML or JSON file, upserts it into
PostgreSQL in one transaction, publishes everything to Redis and writes the terminals'
credentials to a file readable only by its owner.

``python -m server.reference publish`` rebuilds the Redis reference cache from PostgreSQL.

Without SUBSIDY_PG_DSN / SUBSIDY_REDIS_URL both use the services ``make run`` recorded in
.data/services.json; a service that does not answer is one line on stderr and exit status 3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import yaml
from redis.asyncio import Redis

from server.commands.common import EXIT_USAGE, missing_pg_dsn, require_services, run_command, use_recorded_services
from server.config import Config, ConfigError
from server.domain.reference import ReferenceData, ReferenceError, parse_reference
from storage.postgres.migrate import migrate
from storage.postgres.reference import fetch_reference, save_reference
from storage.redis.keys import Keys
from storage.redis.reference import publish_reference

PROG = "python -m server.reference"


def read_reference(path: Path) -> ReferenceData:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise ReferenceError("(file)", "must be a mapping with campaigns, products and merchants")
    return parse_reference(document)


def write_credentials(path: Path, credentials: dict[str, str], data: ReferenceData, target: str) -> None:
    """Credentials for demo clients and onboarding, by kind of caller, mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = orjson.loads(path.read_bytes()) if path.exists() else {}
    kinds = {terminal.terminal_id: "terminals" for merchant in data.merchants for terminal in merchant.terminals}
    kinds.update({operator.operator_id: "operators" for operator in data.operators})
    kinds.update(
        {partner.partner_id: "partners" if partner.kind == "APP" else "providers" for partner in data.partners}
    )
    document: dict[str, Any] = {"target": target}
    for kind in ("terminals", "operators", "partners", "providers"):
        document[kind] = existing.get(kind, {})
        document[kind].update({caller: secret for caller, secret in credentials.items() if kinds.get(caller) == kind})
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(orjson.dumps(document, option=orjson.OPT_INDENT_2))


async def load(config: Config, path: Path, credentials_out: Path | None) -> int:
    data = read_reference(path)
    connection = await asyncpg.connect(config.pg_dsn, timeout=10)
    redis = Redis.from_url(config.redis_url)
    try:
        await migrate(connection)
        credentials = await save_reference(connection, data)
        version = await publish_reference(redis, Keys(config.redis_prefix), await fetch_reference(connection))
    finally:
        await connection.close()
        await redis.aclose()
    if credentials_out is not None:
        write_credentials(credentials_out, credentials, data, config.listen)
    print(
        f"loaded {path}: {len(data.campaigns)} campaigns, {len(data.products)} products,"
        f" {len(data.merchants)} merchants, {len(data.operators)} operators, {len(data.partners)} partners;"
        f" reference version {version}",
        file=sys.stderr,
    )
    return version


async def publish(config: Config) -> int:
    connection = await asyncpg.connect(config.pg_dsn, timeout=10)
    redis = Redis.from_url(config.redis_url)
    try:
        version = await publish_reference(redis, Keys(config.redis_prefix), await fetch_reference(connection))
    finally:
        await connection.close()
        await redis.aclose()
    print(f"published reference version {version}", file=sys.stderr)
    return version


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    load_parser = commands.add_parser("load", help="load a YAML/JSON reference file")
    load_parser.add_argument("file", type=Path)
    load_parser.add_argument("--credentials-out", type=Path, help="write terminal credentials here (mode 0600)")
    commands.add_parser("publish", help="rebuild the Redis reference cache from PostgreSQL")
    arguments = parser.parse_args()
    recorded = use_recorded_services()
    try:
        config = Config.from_env()
    except ConfigError as error:
        print(f"{PROG}: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not config.pg_dsn:
        print(missing_pg_dsn(PROG), file=sys.stderr)
        return EXIT_USAGE

    def body() -> int:
        require_services(pg_dsn=config.pg_dsn, redis_url=config.redis_url, recorded=recorded)
        if arguments.command == "load":
            asyncio.run(load(config, arguments.file, arguments.credentials_out))
        else:
            asyncio.run(publish(config))
        return 0

    try:
        return run_command(PROG, body)
    except ReferenceError as error:
        print(f"invalid reference data: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
