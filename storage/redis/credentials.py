"""The callers' credentials as published in Redis (one hash: caller id -> JSON record with
role, merchant, secret and whether mutual TLS is required; storage/redis/reference.py writes
it), cached in each process and refreshed whenever the published reference version changes, so
a known caller costs no Redis call to authenticate; and the nonces of operator and provider
calls (terminal and partner calls claim theirs inside their own script)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from storage.redis.keys import Keys
from storage.redis.store import text

log = logging.getLogger("subsidy.auth")
MISS_TTL_S = 1.0
MISSES_MAX = 10_000


@dataclass(frozen=True)
class Credential:
    merchant_id: str
    secret: str
    role: str  # terminal, operator, government, auditor, partner or provider (server/rpc/auth.py)
    # The caller must connect with a client certificate naming it (reference data's
    # require_client_certificate; checked by server/rpc/tls.py).
    require_client_certificate: bool = False

    @classmethod
    def from_json(cls, raw: bytes | str) -> Credential:
        record = orjson.loads(raw)
        return cls(
            merchant_id=record.get("merchant", ""),
            secret=record["secret"],
            role=record.get("role", "terminal"),
            require_client_certificate=bool(record.get("mtls", False)),
        )


class CredentialCache:
    """Terminal id -> credential, loaded from Redis and reloaded when the version changes."""

    def __init__(self, redis: Redis, keys: Keys, nonce_ttl_s: int = 660) -> None:
        self._redis = redis
        self._keys = keys
        self._nonce_ttl_s = nonce_ttl_s
        self._credentials: dict[str, Credential] = {}
        self._version: bytes | str | None = None
        self._misses: dict[str, float] = {}

    async def refresh(self) -> None:
        version = await self._redis.get(self._keys.reference_version)
        if version == self._version and self._credentials:
            return
        raw = await self._redis.hgetall(self._keys.credentials)
        self._credentials = {text(caller_id): Credential.from_json(value) for caller_id, value in raw.items()}
        self._version = version

    async def run_refresher(self, interval_ms: int, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.refresh()
            except Exception:
                log.warning("credential refresh failed", exc_info=True)
            try:
                await asyncio.wait_for(stopping.wait(), interval_ms / 1000)
            except TimeoutError:
                pass

    async def claim_nonce(self, caller_id: str, nonce: str) -> bool:
        """Records the nonce for the nonce lifetime; False when it was used already."""
        claimed = await self._redis.set(self._keys.nonce(caller_id, nonce), b"1", nx=True, ex=self._nonce_ttl_s)
        return bool(claimed)

    async def get(self, terminal_id: str) -> Credential | None:
        found = self._credentials.get(terminal_id)
        if found is not None:
            return found
        # A caller onboarded since the last refresh: look it up, at most once a second per id
        # (and for a bounded number of ids), so unknown ids cannot turn into Redis load.
        now = time.monotonic()
        if now - self._misses.get(terminal_id, -MISS_TTL_S) < MISS_TTL_S:
            return None
        raw = await self._redis.hget(self._keys.credentials, terminal_id)
        if raw is None:
            if len(self._misses) >= MISSES_MAX:
                self._misses.clear()
            self._misses[terminal_id] = now
            return None
        found = Credential.from_json(raw)
        self._credentials[terminal_id] = found
        return found
