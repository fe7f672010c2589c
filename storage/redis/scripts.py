"""Loads the Lua scripts (package files) once and calls them by SHA.

Each script is the bindings its declaration in ``storage/redis/contract.py`` produces (the
count of its KEYS and ARGV checked, its tails, its enum constants), then the part of
``_lib.lua`` it uses, then the script's own file, with every ``KEY.<name>`` and ``ARG.<name>``
of the last two turned into the read of ``KEYS`` or ``ARGV`` it stands for (``Script.bind``), so
shared helpers need no cross-script calls and no script reads ``KEYS[i]`` or ``ARGV[i]`` itself.
Only the helpers a script calls (directly or through other helpers) are put in: every ``local
function`` of the library is a closure built anew on every call of the script, so an unused one
is a cost, as tables of the names would be (README, "The authorize script inside Redis"). A call is
one EVALSHA; on NOSCRIPT (after a Redis restart or SCRIPT FLUSH) it loads the script and
retries, as redis-py's Script objects do, so callers never see the miss.

With a ``LeanRedis`` (``storage/redis/lean.py``, ``SUBSIDY_REDIS_CLIENT=lean``) the calls go
over its pipelined connection with the ``EVALSHA <sha>`` part of each command encoded once;
without one (``redis-py``, or a URL the lean path does not support) through redis-py. The
callers (``storage/redis/store.py``) see the same replies and the same exceptions either way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from itertools import chain
from typing import Any, TypeVar

import hiredis
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from storage.redis.contract import FAILURE, LUA_COMMENTS_AND_STRINGS, SCRIPTS, Answer, Reply, Script
from storage.redis.lean import LeanRedis, command_prefix, encode, reply_error

K = TypeVar("K", bound=tuple[Any, ...])
A = TypeVar("A", bound=tuple[Any, ...])
R = TypeVar("R")


# A top-level definition of _lib.lua: "local function name(" or "local NAME =" at column 0.
DEFINITION = re.compile(r"local\s+(?:function\s+)?([A-Za-z_]\w*)")
# The names Lua code reads: outside comments and strings, and not a field (after "." or ":").
NAMES = re.compile(LUA_COMMENTS_AND_STRINGS + r"|(?<![\w.:])(?P<name>[A-Za-z_]\w*)", re.DOTALL)


def script_source(script: Script[Any, Any, Any]) -> str:
    package = resources.files("storage.redis") / "lua"
    library = (package / "_lib.lua").read_text(encoding="utf-8")
    own = (package / f"{script.name}.lua").read_text(encoding="utf-8")
    return script.lua_bindings() + "\n" + script.bind(library_used_by(library, own) + "\n" + own)


def library_used_by(library: str, code: str) -> str:
    """The library's opening comment and the definitions ``code`` uses, directly or through
    the definitions it uses (each with the comment above it), in the library's order."""
    opening, definitions = _definitions(library)
    used: set[str] = set()
    wanted = _names(code)
    while wanted - used:
        used |= wanted
        wanted = used.union(*(_names(text) for name, text in definitions if name in used))
    return opening + "".join(text for name, text in definitions if name in used)


def _definitions(library: str) -> tuple[str, list[tuple[str, str]]]:
    """The library's opening comment, and its top-level definitions in order: (name, text),
    the text starting with the comment lines above the definition."""
    opening, definitions, pending = "", [], ""
    for line in library.splitlines(keepends=True):
        found = DEFINITION.match(line)
        if found:
            definitions.append((found.group(1), pending + line))
            pending = ""
        elif not definitions:
            opening += line
        elif line.startswith("--") or not line.strip():
            pending += line  # the comment above the next definition, or a blank line
        else:
            name, text = definitions[-1]
            definitions[-1] = (name, text + pending + line)
            pending = ""
    if definitions:
        name, text = definitions[-1]
        definitions[-1] = (name, text + pending)
    return opening, definitions


def _names(code: str) -> set[str]:
    """The names ``code`` reads outside comments and strings, fields excluded."""
    return {found.group("name") for found in NAMES.finditer(code) if found.group("name")}


class Scripts:
    def __init__(self, redis: Redis, lean: LeanRedis | None = None) -> None:
        self._redis = redis
        self._lean = lean
        self._scripts: dict[str, AsyncScript] = {
            script.name: redis.register_script(script_source(script)) for script in SCRIPTS
        }
        # The lean path's constant parts, encoded once: "EVALSHA <sha>" and "SCRIPT LOAD <source>".
        self._evalsha = {name: command_prefix("EVALSHA", loaded.sha) for name, loaded in self._scripts.items()}
        self._load = {name: encode(b"", 0, ("SCRIPT", "LOAD", loaded.script)) for name, loaded in self._scripts.items()}

    @property
    def lean(self) -> LeanRedis | None:
        return self._lean

    async def aclose(self) -> None:
        if self._lean is not None:
            await self._lean.aclose()

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
        if self._lean is not None:
            kind, body = await self._lean_call(script.name, (key_count, *keys, *key_tail, *args, *arg_tail))
        else:
            kind, body = await self._redis_py_call(loaded, (key_count, *keys, *key_tail, *args, *arg_tail))
        if kind == b"error":
            return FAILURE.decode(body)
        return Answer(script.decoder.decode(body), kind == b"replay")

    async def _redis_py_call(self, loaded: AsyncScript, arguments: tuple[Any, ...]) -> Any:
        try:
            return await self._redis.evalsha(loaded.sha, *arguments)
        except NoScriptError:
            # Redis restarted or flushed its scripts (as redis-py's Script objects do).
            loaded.sha = await self._redis.script_load(loaded.script)
            return await self._redis.evalsha(loaded.sha, *arguments)

    async def _lean_call(self, name: str, arguments: tuple[Any, ...]) -> Any:
        assert self._lean is not None
        command = encode(self._evalsha[name], 2, arguments)
        reply = await self._lean.call(command)
        if isinstance(reply, hiredis.ReplyError):
            error = reply_error(reply)
            if not isinstance(error, NoScriptError):
                raise error
            # Redis restarted or flushed its scripts: load it (same source, same SHA), retry once.
            loaded = await self._lean.call(self._load[name])
            if isinstance(loaded, hiredis.ReplyError):
                raise reply_error(loaded)
            reply = await self._lean.call(command)
            if isinstance(reply, hiredis.ReplyError):
                raise reply_error(reply)
        return reply
