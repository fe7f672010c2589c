"""Loads the Lua scripts (package files) once and calls them by SHA.

Each script is ``_lib.lua`` followed by the script's own file, so shared helpers need no
cross-script calls. redis-py's Script objects send EVALSHA and, on NOSCRIPT (after a Redis
restart or SCRIPT FLUSH), load the script and retry, so callers never see the miss.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

SCRIPT_NAMES = (
    "authorize",
    "capture",
    "void",
    "refund",
    "expire_hold",
    "claim_qualification",
    "cancel_qualification",
    "expire_qualification",
)


def script_source(name: str) -> str:
    package = resources.files("storage.redis") / "lua"
    library = (package / "_lib.lua").read_text(encoding="utf-8")
    own = (package / f"{name}.lua").read_text(encoding="utf-8")
    return library + "\n" + own


@dataclass(frozen=True)
class Reply:
    """A script's answer: kind is "new", "replay" or "error"; body is the decoded JSON."""

    kind: str
    body: dict[str, Any]


class Scripts:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(script_source(name)) for name in SCRIPT_NAMES
        }

    async def preload(self) -> None:
        """SCRIPT LOAD every script now, so the first call of each is one EVALSHA."""
        for name, script in self._scripts.items():
            sha = await self._redis.script_load(script.script)
            assert sha == script.sha, f"script {name}: SHA mismatch"

    async def call(self, name: str, keys: list[str], args: list[str | int]) -> Reply:
        raw = await self._scripts[name](keys=keys, args=args)
        kind, body = raw
        kind = kind.decode() if isinstance(kind, bytes) else kind
        return Reply(kind=kind, body=orjson.loads(body))
