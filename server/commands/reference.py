"""Reference data tasks (``subsidyctl reference load|publish``, server/ctl/reference.py;
``python -m server.reference`` is their alias).

``load`` validates a YAML or JSON file, upserts it into PostgreSQL in one transaction,
publishes everything to Redis and writes the callers' credentials to a file readable only by
its owner. ``publish`` rebuilds the Redis reference cache from PostgreSQL.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import yaml
from redis.asyncio import Redis

from server.config import Config
from server.domain.reference import ReferenceData, ReferenceError, parse_reference
from storage.postgres.migrate import migrate
from storage.postgres.reference import fetch_reference, save_reference
from storage.redis.keys import Keys
from storage.redis.reference import publish_reference


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
