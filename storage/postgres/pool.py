"""PostgreSQL connections as the layers above see them: the lazily opened pool of the operator
services, and the connection type their storage calls take (so that no servicer imports the
driver)."""

from __future__ import annotations

import asyncio

import asyncpg

Connection = asyncpg.Connection
Pool = asyncpg.Pool
# What a failing or unreachable database raises, for callers above storage that carry on
# without it (live supervision keeps sending Redis figures when PostgreSQL is away).
DATABASE_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


class LazyPool:
    """A small PostgreSQL pool opened on first use, so that a gateway that only authorizes never
    connects to PostgreSQL."""

    def __init__(self, dsn: str, max_size: int = 4) -> None:
        self._dsn = dsn
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                if not self._dsn:
                    raise RuntimeError("SUBSIDY_PG_DSN is not configured; operator services need PostgreSQL")
                self._pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=self._max_size, timeout=10)
            return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
