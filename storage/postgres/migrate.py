"""Applies storage/postgres/migrations/*.sql in order and records what it applied.

Each file runs in its own transaction together with its row in ``schema_migrations``, under
an advisory lock so two processes starting at once apply each file once. Running it again
changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from importlib import resources

import asyncpg

# An arbitrary constant naming this project's migration lock.
MIGRATION_LOCK_ID = 741_852_963


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("storage.postgres") / "migrations"
    names = sorted(item.name for item in folder.iterdir() if item.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), (folder / name).read_text(encoding="utf-8")) for name in names]


async def migrate(connection: asyncpg.Connection) -> list[str]:
    """Applies pending migrations; returns the versions it applied."""
    await connection.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    applied: list[str] = []
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        done = {row["version"] for row in await connection.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            async with connection.transaction():
                await connection.execute(sql)
                await connection.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied


async def _main(dsn: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        applied = await migrate(connection)
    finally:
        await connection.close()
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True, help="PostgreSQL DSN")
    arguments = parser.parse_args()
    asyncio.run(_main(arguments.dsn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
