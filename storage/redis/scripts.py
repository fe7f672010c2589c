"""Loads the Lua scripts (package files) once and calls them by SHA.

Each script is ``_lib.lua``, then the bindings its declaration in ``storage/redis/contract.py``
produces (``KEY``, ``ARG``, its enum constants), then the script's own file, so shared helpers
need no cross-script calls and no script reads ``KEYS[i]`` or ``ARGV[i]`` itself. A call is
one EVALSHA; on NOSCRIPT (after a Redis restart or SCRIPT FLUSH) it loads the script and
retries, as redis-py's Script objects do, so callers never see the miss.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from itertools import chain
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from storage.redis.contract import FAILURE, SCRIPTS, Answer, Reply, Script

K = TypeVar("K", bound=tuple[Any, ...])
A = TypeVar("A", bound=tuple[Any, ...])
R = TypeVar("R")


def script_source(script: Script[Any, Any, Any]) -> str:
    package = resources.files("storage.redis") / "lua"
    library = (package / "_lib.lua").read_text(encoding="utf-8")
    own = (package / f"{script.name}.lua").read_text(encoding="utf-8")
    return library + "\n" + script.lua_bindings() + "\n" + own


class Scripts:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._scripts: dict[str, AsyncScript] = {
            script.name: redis.register_script(script_source(script)) for script in SCRIPTS
        }

    async def preload(self) -> None:
        """SCRIPT LOAD every script now, so the first call of each is one EVALSHA."""
        for name, script in self._scripts.items():
            sha = await self._redis.script_load(script.script)
            assert sha == script.sha, f"script {name}: SHA mismatch"

    async def call(
        self,
        script: Script[K, A, R],
        keys: K,
        args: A,
        key_tail: Sequence[Any] = (),
        arg_tail: Sequence[Any] = (),
    ) -> Reply[R]:
        """One EVALSHA: the declared KEYS and ARGV in order, each followed by its tail, if the
        script declares one (items of the declared type, flattened)."""
        loaded = self._scripts[script.name]
        if (key_tail and not script.key_width) or (arg_tail and not script.arg_width):
            raise TypeError(f"script {script.name} declares no such tail")
        key_count = len(keys) + script.key_width * len(key_tail)
        if script.key_width > 1:
            key_tail = list(chain.from_iterable(key_tail))
        if script.arg_width > 1:
            arg_tail = list(chain.from_iterable(arg_tail))
        try:
            kind, body = await self._redis.evalsha(loaded.sha, key_count, *keys, *key_tail, *args, *arg_tail)
        except NoScriptError:
            # Redis restarted or flushed its scripts (as redis-py's Script objects do).
            loaded.sha = await self._redis.script_load(loaded.script)
            kind, body = await self._redis.evalsha(loaded.sha, key_count, *keys, *key_tail, *args, *arg_tail)
        if kind == b"error":
            return FAILURE.decode(body)
        return Answer(script.decoder.decode(body), kind == b"replay")
